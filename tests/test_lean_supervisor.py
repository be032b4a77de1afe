"""`vbatch up` itself stays small (issue 28, "a lean supervisor"): what needs the resources — the databases
migrated, Dagster's instance, the tiny model built with torch on a fresh home, the engine warmed — runs in its
start-up child (vbatch_pipelines.starter), and the supervisor that lives as long as the platform imports none of
it. benchmarks/bench_idle_rss.py measures the RSS of a whole idle platform; the `vbatch up` of
tests/test_supervisor.py's stack is checked for torch and its RSS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# Never in the supervisor; the stop sweep may import SQLAlchemy (to mark its engines stopped), nothing else here.
NEVER = ("torch", "transformers", "tokenizers", "vllm", "dagster", "pandas", "pyarrow")
NOT_BEFORE_STOPPING = NEVER + ("sqlalchemy", "alembic")

# What `vbatch up` does in its own process before and after its services run, on a fresh home: load the settings,
# have the start-up child prepare the platform (build the default tiny model among the rest), and at the stop
# hand over this home's engines (one engine's state file is there).
SUPERVISOR_PATH = """
import json, sys
import vbatch_pipelines.cli
from vbatch_pipelines.cluster.config import cluster_env
from vbatch_pipelines.net import free_port
from vbatch_pipelines.settings import load_settings
from vbatch_pipelines.exposure import Addresses
from vbatch_pipelines.supervisor import hand_over_engines, startup_child

never, not_before_stopping = json.loads(sys.argv[1])
settings = load_settings()
addresses = Addresses("127.0.0.1", free_port(), free_port())
with startup_child() as starter:
    prepared = starter.run("prepare", settings, addresses, False)
prepared_with = sorted(m for m in sys.modules if m.split(".")[0] in not_before_stopping)
engines = settings.paths().engines_dir
engines.mkdir(parents=True, exist_ok=True)
(engines / "vbatch-tiny-chat.json").write_text(json.dumps(
    {"pid": 999999999, "port": 1, "argv": ["python"], "model": "vbatch-tiny-chat", "path": "/nowhere"}))
handed_over = hand_over_engines(settings)
print(json.dumps({"prepared_with": prepared_with, "api_workers": prepared.api_workers,
                  "handed_over": handed_over, "engine_state_left": (engines / "vbatch-tiny-chat.json").exists(),
                  "stopped_with": sorted(m for m in sys.modules if m.split(".")[0] in never)}))
"""


def test_the_supervisor_imports_no_torch_dagster_or_vllm_while_its_child_builds_the_tiny_model(tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, VBATCH_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), VBATCH_CURATION="off",
               VBATCH_ENGINE="transformers")
    for key in ("VBATCH_MODELS", "VBATCH_DEFAULT_MODEL", "VBATCH_STORE", "VBATCH_DATABASE_URL",
                "VBATCH_DAGSTER_DATABASE_URL"):
        env.pop(key, None)  # the default model: the tiny one, built on first use
    done = subprocess.run([sys.executable, "-c", SUPERVISOR_PATH, json.dumps([NEVER, NOT_BEFORE_STOPPING])],
                          env=env, capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert (home / "models" / "vbatch-tiny-chat" / "config.json").exists()  # built meanwhile, by the child
    assert seen["prepared_with"] == [] and seen["api_workers"] == 1
    assert seen["handed_over"] == [None] and not seen["engine_state_left"]  # a dead engine: forgotten, no pid
    assert seen["stopped_with"] == []
