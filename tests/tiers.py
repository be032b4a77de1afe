"""Test tiers, by what a test starts. A test that starts a stack (`vbatch up`, a vLLM engine, Label Studio,
Celery nodes, Prometheus or chromium: tens of seconds to minutes each) is marked ``stack``; everything else runs
in-process and makes up `make check`, the developer loop. `make test` runs both.

The mark is checked where the cost is paid: every starter calls ``starting(what)``, which fails an unmarked
test before anything starts, so a stack test cannot slip into the fast tier unnoticed. Tests that use the shared
fixtures below are marked from those fixtures (``mark_from_fixtures``) and cannot forget it."""

from __future__ import annotations

import pytest

STACK = "stack"
MARKERS = {
    STACK: "starts services (`vbatch up`, a vLLM engine, Label Studio, Celery nodes, Prometheus or chromium); "
           "`make check` leaves these out, `make test` runs them",
    "vllm": "needs the vLLM engine environment (vbatch engine install)",
    "postgres": "needs PostgreSQL: VBATCH_TEST_POSTGRES_URL, one at 127.0.0.1:5432, or the test's own server",
}
# conftest fixtures by what they need: a test using one gets those marks.
FIXTURE_MARKS = {"label_studio_server": (STACK,), "curation_home": (STACK,), "redis_url": (STACK,),
                 "replicas": (STACK, "vllm"), "default_stack": (STACK, "vllm"), "models_stack": (STACK, "vllm"),
                 "postgres_url": ("postgres",), "aristotle_url": ("postgres",)}

# Stacks shared by several modules (session fixtures in conftest): the xdist scheduler keeps the modules of one
# on the same worker (``scope_of``), so it starts once. Each module makes its own batches, files and fine-tunes
# and compares counts with what it saw before, not with zero.
SHARED_STACKS = {
    "default_stack": ("tests/test_api.py", "tests/test_fine_tuning_api.py", "tests/test_many_batches.py",
                      "tests/test_prometheus.py"),
    "models_stack": ("tests/test_embeddings_vllm.py", "tests/test_responses_vllm.py", "tests/test_score_rerank.py"),
}
_GROUP_OF = {module: fixture for fixture, modules in SHARED_STACKS.items() for module in modules}

_current: pytest.Item | None = None


def scope_of(nodeid: str) -> str:
    """The xdist work unit of a test: its shared stack's group, else its module (as --dist loadscope has it)."""
    module = nodeid.split("::", 1)[0]
    return _GROUP_OF.get(module, module)


def check_shared_stack(item: pytest.Item) -> None:
    """A test on a shared stack must be in that stack's group, or its worker starts another copy of it."""
    module = item.nodeid.split("::", 1)[0]
    for fixture in SHARED_STACKS:
        if fixture in getattr(item, "fixturenames", ()) and _GROUP_OF.get(module) != fixture:
            raise pytest.UsageError(f"{item.nodeid} uses {fixture}: add {module} to tests/tiers.py SHARED_STACKS")


def mark_from_fixtures(item: pytest.Item) -> None:
    for mark in sorted({mark for name in getattr(item, "fixturenames", ()) for mark in FIXTURE_MARKS.get(name, ())}):
        if item.get_closest_marker(mark) is None:
            item.add_marker(mark)


def running(item: pytest.Item | None) -> None:
    """The test whose setup, call or teardown is running (None between tests)."""
    global _current
    _current = item


def starting(what: str) -> None:
    """Called by everything that starts a stack: fails the running test, before ``what`` starts, unless the
    test is marked ``stack``."""
    if _current is not None and _current.get_closest_marker(STACK) is None:
        pytest.fail(f"{_current.nodeid} starts {what} but is not marked `{STACK}`: add "
                    f"`pytestmark = pytest.mark.{STACK}` to its module (or mark the test), so that `make check` "
                    "leaves it out", pytrace=False)
