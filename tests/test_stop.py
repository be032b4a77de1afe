"""A stop that always stops (issue 26): Ctrl-C or SIGTERM stops `vbatch up` and everything it started in at most
15 s whatever it is doing — idle, a run retrying Label Studio, Label Studio starting, an engine loading — and a
second Ctrl-C stops it at once. A port another process holds is named, with that process, before anything
starts. Real processes throughout; each stop is timed from the signal to the exit of `vbatch up`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import CLI, TINY_MODEL_ID, chat_lines, jsonl, settled_survivors, start_process, vllm_python
from tests.test_supervisor import _env, _wait
from vbatch_pipelines.net import free_port

STOP_LIMIT_S = 15.0


def _up(env: dict, api_port: int, dagster_port: int, ready: str, *args: str) -> subprocess.Popen:
    process, _ = start_process([*CLI, "up", "--api-port", str(api_port), "--dagster-port", str(dagster_port),
                                *args], env, ready, 300, "`vbatch up`")
    return process


def _stop(up: subprocess.Popen, home: Path, *signals: signal.Signals) -> float:
    """Send ``signals`` (0.3 s apart), wait for `vbatch up` to exit; seconds from the first signal to its exit.
    Nothing it started may be left running."""
    started = time.monotonic()
    for sig in signals:
        up.send_signal(sig)
        time.sleep(0.3)
    try:
        up.wait(60)
    finally:
        took = time.monotonic() - started
        left = settled_survivors(home, grace_s=2.0)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after `vbatch up` stopped: {left}"
    print(f"stop took {took:.1f}s")
    return took


@pytest.mark.stack
def test_stop_when_idle(tmp_path, tiny_model_path):
    home = tmp_path / "home"
    env, api_port, dagster_port = _env(home, tiny_model_path)
    up = _up(env, api_port, dagster_port, "Ctrl-C stops everything", "--no-engine")
    assert _stop(up, home, signal.SIGINT) <= STOP_LIMIT_S


@pytest.mark.stack
def test_stop_while_a_run_retries_label_studio(tmp_path, tiny_model_path):
    """curation_tasks waits between retries of an unreachable Label Studio: the run is killed with the rest."""
    from dagster import DagsterEventType, DagsterInstance

    home = tmp_path / "home"
    env, api_port, dagster_port = _env(home, tiny_model_path)
    env.update(VBATCH_CURATION="on", VBATCH_LABEL_STUDIO_URL=f"http://127.0.0.1:{free_port()}",
               VBATCH_LABEL_STUDIO_TOKEN="unused")
    up = _up(env, api_port, dagster_port, "Ctrl-C stops everything", "--no-engine")
    try:
        import openai

        client = openai.OpenAI(base_url=f"http://127.0.0.1:{api_port}/v1", api_key="unused", max_retries=0)
        uploaded = client.files.create(file=("in.jsonl", jsonl(chat_lines(2, max_tokens=4))), purpose="batch")
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h")
        with DagsterInstance.from_config(str(home / "dagster")) as instance:
            def retrying():
                return any(instance.all_logs(run.run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)
                           for run in instance.get_runs())
            _wait(retrying, 240, "curation_tasks to retry the unreachable Label Studio")
    except BaseException:
        up.kill()
        raise
    assert _stop(up, home, signal.SIGTERM) <= STOP_LIMIT_S


@pytest.mark.stack
def test_stop_while_label_studio_starts(tmp_path, tiny_model_path):
    home = tmp_path / "home"
    env, api_port, dagster_port = _env(home, tiny_model_path)
    env.update(VBATCH_CURATION="on", VBATCH_LABEL_STUDIO_PORT=str(free_port()))
    up = _up(env, api_port, dagster_port, "Starting vbatch", "--no-engine")
    try:
        # Its first start (fresh data dir: ~400 migrations) takes far longer than the stop may.
        _wait(lambda: (home / "label-studio" / "server.json").exists(), 120, "Label Studio to start starting")
    except BaseException:
        up.kill()
        raise
    assert _stop(up, home, signal.SIGINT) <= STOP_LIMIT_S


def _engine_env(home: Path, tiny_model_path: Path) -> tuple[dict, int, int]:
    env, api_port, dagster_port = _env(home, tiny_model_path)
    env.update(VBATCH_ENGINE="vllm", VBATCH_VLLM_PYTHON=vllm_python())
    return env, api_port, dagster_port


def _engine_loading(home: Path) -> bool:
    """The engine's process runs and does not answer yet."""
    import json

    from vbatch_pipelines.detached import pid_alive

    states = list((home / "engines").glob("*.json"))
    return bool(states) and pid_alive(json.loads(states[0].read_text())["pid"])


@pytest.mark.stack
@pytest.mark.vllm
@pytest.mark.parametrize("signals, limit", [((signal.SIGTERM,), STOP_LIMIT_S), ((signal.SIGINT, signal.SIGINT), 5.0)],
                         ids=["SIGTERM", "a second Ctrl-C stops at once"])
def test_stop_while_the_engine_loads(tmp_path, tiny_model_path, signals, limit):
    home = tmp_path / "home"
    env, api_port, dagster_port = _engine_env(home, tiny_model_path)
    up = _up(env, api_port, dagster_port, f"Warming vLLM for {TINY_MODEL_ID}")
    try:
        _wait(lambda: _engine_loading(home), 60, "the engine to start loading")
    except BaseException:
        up.kill()
        raise
    assert _stop(up, home, *signals) <= limit


def _holder(tmp_path: Path) -> tuple[subprocess.Popen, int]:
    """Another home's server on a port: a process listening there, with its own VBATCH_HOME."""
    port = free_port()
    other = tmp_path / "other-home"
    holder = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"],
                              env={"VBATCH_HOME": str(other), "PATH": "/usr/bin:/bin"}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    _wait(lambda: not _free(port), 30, "the other server to listen")
    return holder, port


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("which", ["api", "dagster", "label-studio"])
def test_a_taken_port_is_named_with_its_holder_before_anything_starts(tmp_path, tiny_model_path, which):
    home = tmp_path / "home"
    env, api_port, dagster_port = _env(home, tiny_model_path)
    holder, port = _holder(tmp_path)
    try:
        if which == "api":
            api_port = port
        elif which == "dagster":
            dagster_port = port
        else:
            env.update(VBATCH_CURATION="on", VBATCH_LABEL_STUDIO_PORT=str(port))
        started = time.monotonic()
        done = subprocess.run([*CLI, "up", "--api-port", str(api_port), "--dagster-port", str(dagster_port),
                               "--no-engine"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"port {port}" in done.stderr and f"pid {holder.pid}" in done.stderr
        assert f"of the vbatch home {tmp_path / 'other-home'}" in done.stderr
        setting = {"api": "--api-port", "dagster": "--dagster-port", "label-studio": "VBATCH_LABEL_STUDIO_PORT"}
        assert setting[which] in done.stderr
        assert time.monotonic() - started < 60 and not (home / "logs" / "api.log").exists()  # nothing started
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.stack  # it would start Label Studio if the guard failed
def test_label_studio_does_not_start_beside_another_on_its_port(tmp_path):
    """The managed Label Studio refuses a port another process holds (it would move to the next port and its
    probes would meet the other server's 401s until the start timed out), naming the holder at once."""
    from vbatch_pipelines.curation.server import ManagedLabelStudio
    from vbatch_pipelines.detached import ServerStartError

    holder, port = _holder(tmp_path)
    try:
        server = ManagedLabelStudio(tmp_path / "home" / "label-studio", tmp_path / "envs", port)
        started = time.monotonic()
        with pytest.raises(ServerStartError, match=f"port {port} .*pid {holder.pid}"):
            server.ensure()
        assert time.monotonic() - started < 10
    finally:
        holder.kill()
        holder.wait()
