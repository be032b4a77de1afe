"""How long Ctrl-C (or SIGTERM) takes to stop `vbatch up` and everything it started, in the states a user meets:
idle, a run retrying an unreachable Label Studio, Label Studio starting for the first time, the engine loading,
and a second Ctrl-C while the engine loads. Timed from the first signal to the exit of `vbatch up`; what is
still running of the home afterwards (after 2 s) is counted and killed.

Peer (``--peer REV``, default the commit before issue 26): the same states with that revision's code, from a git
worktree, side by side.

    .venv/bin/python benchmarks/bench_stop.py [--peer 6dc44c1]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import ROOT, requests_jsonl, worktree  # noqa: E402
from vbatch_pipelines.engine.vllm_env import find_vllm_python  # noqa: E402
from vbatch_pipelines.models.registry import TINY_MODEL_ID  # noqa: E402
from vbatch_pipelines.models.tiny import ensure_tiny_model  # noqa: E402
from vbatch_pipelines.net import free_port  # noqa: E402
from vbatch_pipelines.settings import load_settings  # noqa: E402

STATES = ("idle", "run retrying Label Studio", "Label Studio starting", "engine loading", "second Ctrl-C")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, ValueError, KeyError, openai.APIError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}")


def home_processes(home: Path) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["environ", "status"]):
        try:
            if (process.info["environ"] or {}).get("VBATCH_HOME") == str(home) and \
                    process.info["status"] != psutil.STATUS_ZOMBIE and process.pid != os.getpid():
                found.append(process)
        except psutil.Error:
            continue
    return found


def retrying(dagster_home: Path) -> bool:
    from dagster import DagsterEventType, DagsterInstance

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        return any(instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)
                   for run in instance.get_runs())


def engine_loading(home: Path) -> bool:
    states = list((home / "engines").glob("*.json"))
    return bool(states) and psutil.pid_exists(json.loads(states[0].read_text())["pid"])


def measure(repo: Path, state: str, model: Path, vllm: str) -> tuple[float, int]:
    """(seconds to stop, processes left) for ``state`` with the code in ``repo``."""
    home = Path(tempfile.mkdtemp(prefix="vbatch-stop-"))
    api_port, dagster_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("VBATCH_", "DAGSTER_"))}
    env.update(VBATCH_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), PYTHONPATH=str(repo),
               VBATCH_MODELS=f"{TINY_MODEL_ID}={model}", VBATCH_CURATION="off", VBATCH_ENGINE="transformers",
               VBATCH_DAGSTER_URL=f"http://127.0.0.1:{dagster_port}")
    args = ["--api-port", str(api_port), "--dagster-port", str(dagster_port), "--no-engine"]
    if state == "run retrying Label Studio":
        env.update(VBATCH_CURATION="on", VBATCH_LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}",
                   VBATCH_LABEL_STUDIO_TOKEN="unused")
    elif state == "Label Studio starting":
        env.update(VBATCH_CURATION="on", VBATCH_LABEL_STUDIO_PORT=str(free_port()))
    elif state in ("engine loading", "second Ctrl-C"):
        env.update(VBATCH_ENGINE="vllm", VBATCH_VLLM_PYTHON=vllm)
        args.remove("--no-engine")
    log = home / "up.out"
    with open(log, "wb") as out:
        up = subprocess.Popen([sys.executable, "-m", "vbatch_pipelines.cli", "up", *args], cwd=repo, env=env,
                              stdout=out, stderr=subprocess.STDOUT)
    try:
        if state in ("idle", "run retrying Label Studio"):
            wait_for(lambda: "Ctrl-C stops everything" in log.read_text(), 300, "the banner")
        if state == "run retrying Label Studio":
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0)
            uploaded = client.files.create(file=("in.jsonl", requests_jsonl(4, "stop")), purpose="batch")
            client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
            wait_for(lambda: retrying(home / "dagster"), 300, "curation_tasks to retry")
        elif state == "Label Studio starting":
            wait_for(lambda: (home / "label-studio" / "server.json").exists(), 300, "Label Studio to start")
        elif state in ("engine loading", "second Ctrl-C"):
            wait_for(lambda: engine_loading(home), 300, "the engine to load")
        started = time.monotonic()
        up.send_signal(signal.SIGINT)
        if state == "second Ctrl-C":
            time.sleep(0.3)
            up.send_signal(signal.SIGINT)
        up.wait(300)
        took = time.monotonic() - started
    finally:
        if up.poll() is None:
            up.kill()
        time.sleep(2)
        left = home_processes(home)
        for process in left:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                process.kill()
    return took, len(left)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peer", default=None, help="a git revision to measure side by side (e.g. 6dc44c1)")
    parser.add_argument("--states", default=",".join(STATES), help="comma-separated subset of the states")
    args = parser.parse_args()
    settings = load_settings()
    model = ensure_tiny_model(Path(tempfile.gettempdir()) / "vbatch-bench-models" / TINY_MODEL_ID)
    vllm = find_vllm_python(None, settings.storage.envs_dir, 0)
    sides = {"vbatch": ROOT, **({f"peer {args.peer}": worktree(args.peer)} if args.peer else {})}
    print(f"{'state':28} " + " ".join(f"{side:>24}" for side in sides))
    for state in [s.strip() for s in args.states.split(",") if s.strip()]:
        cells = []
        for repo in sides.values():
            took, left = measure(repo, state, model, vllm)
            cells.append(f"{took:6.1f} s, {left} left")
        print(f"{state:28} " + " ".join(f"{cell:>24}" for cell in cells), flush=True)


if __name__ == "__main__":
    main()
