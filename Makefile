# vbatch: `make up` brings the platform up, `make test` runs every test, `make check` the in-process ones (the
# developer loop, a few minutes). Each sets up what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU build of torch (a local wheel on the project's machines; from PyPI elsewhere).
TORCH  ?= torch==2.13.0

.PHONY: install engine test-tools up check test bench clean

$(BIN)/vbatch: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(BIN)/vbatch

# vLLM, Label Studio and (on a GPU) Unsloth in virtualenvs of their own (their pins clash with ours), built side
# by side; skipped when built.
engine: install
	@$(BIN)/vbatch engine install & e=$$!; $(BIN)/vbatch label-studio install & l=$$!; \
	$(BIN)/vbatch trainer install & t=$$!; \
	wait $$e; a=$$?; wait $$l; b=$$?; wait $$t; c=$$?; [ $$a$$b$$c = 000 ] || { echo "an engine env failed"; exit 1; }

up: engine
	$(BIN)/vbatch up

# System tools the tests drive: Debian's prometheus (the shipped Prometheus config and Grafana dashboard
# are checked against a running platform), chromium (the console's browser tests, through Playwright) and
# redis-server (cluster mode's broker, started by the cluster tests and bench_scale_out.py). Installed with
# apt when missing; `make bench` asks only for redis-server.
TOOLS ?= prometheus chromium redis-server
test-tools:
	@missing=""; for tool in $(TOOLS); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -n "$$missing" ]; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

# Tests run on two xdist workers, a module to a worker (a module's stack starts once, and modules whose tests
# depend on order keep it); the slowest 25 are listed at the end. PYTEST_ARGS adds to both targets.
PYTEST := $(BIN)/python -m pytest -n 2 --dist loadscope --no-loadscope-reorder --durations=25 $(PYTEST_ARGS)

# The in-process tier: no `vbatch up`, engine, Label Studio, Celery node or browser (tests/tiers.py).
check: install
	$(PYTEST) -m "not stack"

test: engine test-tools
	$(PYTEST)

# Every benchmark script; each prints its figures (benchmarks/RESULTS.md keeps them, with dates).
bench: engine
	@$(MAKE) --no-print-directory test-tools TOOLS=redis-server
	$(BIN)/python benchmarks/bench_validation.py
	$(BIN)/python benchmarks/bench_engine_memory.py --peer
	$(BIN)/python benchmarks/bench_idle_rss.py
	$(BIN)/python benchmarks/bench_vs_run_batch.py
	$(BIN)/python benchmarks/bench_realistic.py
	$(BIN)/python benchmarks/bench_first_batch.py
	$(BIN)/python benchmarks/bench_embeddings.py --list-size 32
	$(BIN)/python benchmarks/bench_batches.py
	$(BIN)/python benchmarks/bench_scale.py
	$(BIN)/python benchmarks/bench_million.py
	$(BIN)/python benchmarks/bench_api.py
	$(BIN)/python benchmarks/bench_curation.py
	$(BIN)/python benchmarks/bench_fine_tuning.py
	$(BIN)/python benchmarks/bench_aris.py
	$(BIN)/python benchmarks/bench_scale_out.py

clean:
	rm -rf $(VENV) .vbatch
