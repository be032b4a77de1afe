"""`vbatch up` owns its stack (issue 15): one owner per home, services restarted with back-off and reported,
nothing left running when it dies, even by kill -9, and a stale record cleaned up only where it is provably
ours. Real processes throughout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import TINY_MODEL_ID, start_up, survivors
from vbatch_pipelines.net import free_port


def _env(home: Path, tiny_model_path: Path) -> tuple[dict, int, int]:
    api_port, dagster_port = free_port(), free_port()
    env = dict(os.environ, VBATCH_HOME=str(home), VBATCH_ENGINE="transformers", VBATCH_CURATION="off",
               VBATCH_MODELS=f"{TINY_MODEL_ID}={tiny_model_path}", DAGSTER_HOME=str(home / "dagster"),
               VBATCH_DAGSTER_URL=f"http://127.0.0.1:{dagster_port}")
    for key in ("VBATCH_DATABASE_URL", "VBATCH_DAGSTER_DATABASE_URL", "VBATCH_API_KEYS", "VBATCH_ADMIN_KEYS"):
        env.pop(key, None)
    return env, api_port, dagster_port


def _status(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vbatch_pipelines.cli", "status"], env=env, capture_output=True,
                          text=True, timeout=60)


def _health(api_port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{api_port}/health", timeout=10).json()


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.stack
def test_one_owner_restarts_with_status_and_nothing_survives_a_kill_9(tmp_path, tiny_model_path):
    home = tmp_path / "home"
    env, api_port, dagster_port = _env(home, tiny_model_path)
    up, _ = start_up(env, "--api-port", str(api_port), "--dagster-port", str(dagster_port), "--no-engine")
    try:
        # `up` itself stays small (issue 28): no torch mapped, well under 100 MB (its start-up child did the rest).
        import psutil

        assert "libtorch" not in Path(f"/proc/{up.pid}/maps").read_text()
        assert psutil.Process(up.pid).memory_info().rss <= 100 * 2**20
        # and its start-up child, done once it is up, was reaped: no zombie under it.
        assert not [child.pid for child in psutil.Process(up.pid).children()
                    if child.status() == psutil.STATUS_ZOMBIE]

        # A second `up` on a live home says so and starts nothing.
        second = subprocess.run([sys.executable, "-m", "vbatch_pipelines.cli", "up", "--api-port",
                                 str(free_port()), "--dagster-port", str(free_port()), "--no-engine"], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 1 and "already up" in second.stderr and str(up.pid) in second.stderr

        status = _status(env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert all(name in status.stdout for name in ("api", "dagster-ui", "dagster-webserver", "dagster-daemon"))
        services = _health(api_port)["services"]
        assert set(services) == {"api", "dagster-ui", "dagster-webserver", "dagster-daemon"}
        assert all(s["running"] and s["restarts"] == 0 for s in services.values())

        # A crashed service is restarted (with back-off), counted and reported.
        os.killpg(services["dagster-daemon"]["pid"], signal.SIGKILL)
        restarted = _wait(lambda: (lambda s: s if s["restarts"] == 1 and s["running"] else None)(
            _health(api_port)["services"]["dagster-daemon"]), 60, "the daemon's restart")
        assert restarted["pid"] != services["dagster-daemon"]["pid"]
        assert "dagster-daemon" in _status(env).stdout

        # kill -9 of `up` itself: every service it started goes with it (parent-death signal).
        up.kill()
        up.wait(30)
        _wait(lambda: not survivors(home), 60, "the services to die with `vbatch up`")
        assert _status(env).returncode == 3

        # The next `up` on the same home starts cleanly.
        again, banner = start_up(env, "--api-port", str(api_port), "--dagster-port", str(dagster_port),
                                 "--no-engine")
        assert "vbatch is up" in banner and _health(api_port)["status"] == "ok"
        again.send_signal(signal.SIGTERM)
        again.wait(90)
        assert not survivors(home)
    finally:
        if up.poll() is None:
            up.kill()
        for survivor in survivors(home):
            survivor.kill()


def test_a_stale_record_stops_only_processes_that_are_provably_ours(tmp_path):
    """A dead owner's services.json: a process matching pid, start time and command line is stopped; one whose
    pid was reused by something else (other start time) is left alone."""
    from vbatch_pipelines.processes import ProcessRecord, ProcessRegistry, process_identity

    ours = subprocess.Popen(["sleep", "300"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "301"], start_new_session=True)

    def identity(pid: int):
        """Read once the child has exec'd `sleep`: before that (a loaded machine) its command line is this
        Python's, and the record would describe a process that no longer exists."""
        deadline = time.monotonic() + 10
        while (found := process_identity(pid)) is None or found[1][:1] != ["sleep"]:
            assert time.monotonic() < deadline, f"{pid} never became sleep: {found}"
            time.sleep(0.01)
        return found

    try:
        started, argv = identity(ours.pid)
        other_started, other_argv = identity(stranger.pid)
        registry = ProcessRegistry(tmp_path / "run")
        registry.write({"pid": 999_999_999, "started": 0}, {
            "api": ProcessRecord("api", ours.pid, started, argv),
            "dagster-daemon": ProcessRecord("dagster-daemon", stranger.pid, other_started - 100, other_argv),
        })
        registry.acquire()  # the dead owner's lock is gone with it
        stopped = registry.stop_stale()
        assert stopped == [f"api (pid {ours.pid})"]
        assert ours.wait(30) is not None and stranger.poll() is None
        assert not registry.path.exists()
        registry.release()
    finally:
        for process in (ours, stranger):
            if process.poll() is None:
                process.kill()


def test_the_services_file_is_private_and_written_whole(tmp_path):
    from vbatch_pipelines.processes import ProcessRecord, ProcessRegistry

    registry = ProcessRegistry(tmp_path / "run")
    registry.write({"pid": os.getpid()}, {"api": ProcessRecord("api", os.getpid(), 0.0, ["x"], 4080)})
    assert (registry.path.stat().st_mode & 0o777) == 0o600
    assert json.loads(registry.path.read_text())["services"]["api"]["port"] == 4080
    assert [p.name for p in registry.run_dir.iterdir()] == ["services.json"]


@pytest.mark.parametrize("signal_name", ["SIGKILL"])
def test_a_run_worker_dies_with_the_daemon(tmp_path, signal_name):
    """The parent-death signal the launcher gives its workers: a worker outlives no daemon."""
    script = ("import signal, subprocess, sys, time\n"
              "from vbatch_pipelines.processes import die_with_parent\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],\n"
              "                         preexec_fn=lambda: die_with_parent(signal.SIGKILL))\n"
              "print(child.pid, flush=True)\n"
              "time.sleep(300)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    os.kill(parent.pid, getattr(signal, signal_name))
    parent.wait(10)
    from vbatch_pipelines.processes import process_identity

    _wait(lambda: process_identity(child_pid) is None, 10, "the child to die with its parent")


def test_a_run_worker_outlives_the_request_thread_that_launched_it(tmp_path):
    """Linux sends the parent-death signal when the thread that started a child ends; the webserver launches
    runs from pool threads that end when idle. The launcher's workers must live on after that thread."""
    import threading

    from dagster import DagsterInstance

    from vbatch_pipelines.dagster_ext.run_launcher import WarmRunLauncher
    from vbatch_pipelines.processes import process_identity

    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        launcher = WarmRunLauncher(spares=1)
        launcher.register_instance(instance)
        taken = []
        request = threading.Thread(target=lambda: taken.append(launcher._take_worker()))
        request.start()
        request.join()
        time.sleep(1.5)
        try:
            workers = [taken[0], *launcher._idle]
            assert len(workers) == 2
            assert all(process_identity(w.process.pid) is not None for w in workers), \
                [w.process.poll() for w in workers]
        finally:
            launcher.dispose()
            for worker in taken:
                worker.process.kill()
                worker.process.wait(10)


@pytest.mark.parametrize("warm", [True, False])
def test_the_apis_launcher_opens_the_dagster_instance_as_it_starts_when_marked(vbatch_home, monkeypatch, warm):
    """`vbatch up` marks its API (WARM_AT_START_ENV): its batch launcher opens the Dagster instance as it starts,
    not at the first launch (the first batch paid ~0.3 s for it). Unmarked, it opens it when it first launches."""
    from vbatch_pipelines import launch
    from vbatch_pipelines.store.db import Database

    (vbatch_home / "dagster").mkdir(parents=True, exist_ok=True)  # DAGSTER_HOME
    monkeypatch.setattr(launch, "_instances", {})
    db = Database(f"sqlite:///{vbatch_home / 'launch.db'}")
    launcher = launch.BatchLauncher(db, "http://127.0.0.1:9", warm=warm)
    try:
        deadline = time.monotonic() + 60
        while warm and not launch._instances and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert bool(launch._instances) is warm
    finally:
        launcher.close()
        for instance in launch._instances.values():
            instance.dispose()
        db.engine.dispose()


@pytest.mark.parametrize("preload, warm", [(("vbatch_pipelines.definitions",), True), (("no_such_module_here",), False)])
def test_the_webservers_launcher_starts_warm_workers_as_it_is_made(tmp_path, monkeypatch, preload, warm):
    """`vbatch up` marks its webserver (WARM_AT_START_ENV): its launcher starts the spares as it is made
    and returns once one has imported the code location and opened the instance, so the first batch after
    "vbatch is up" pays no imports. A worker that cannot import is not taken for warm. Unmarked (the daemon),
    nothing starts until a run is launched."""
    from dagster import DagsterInstance

    from vbatch_pipelines.dagster_ext.run_launcher import WarmRunLauncher
    from vbatch_pipelines.names import STEP_MEMORY_ENV, WARM_AT_START_ENV

    (tmp_path / "dagster").mkdir()
    with DagsterInstance.local_temp(str(tmp_path / "dagster")) as instance:
        unmarked = WarmRunLauncher(spares=1)
        unmarked.register_instance(instance)
        assert unmarked._idle == [] and unmarked.warm_at_start is None
        monkeypatch.setenv(WARM_AT_START_ENV, "1")
        launcher = WarmRunLauncher(preload_modules=preload, spares=1)
        launcher.register_instance(instance)
        try:
            assert launcher.warm_at_start is warm
            assert len(launcher._idle) == 1 and launcher._idle[0].alive() is warm
            if warm:  # a worker gives back what a batch step read through as it frees it (names.STEP_MEMORY_ENV)
                environ = Path(f"/proc/{launcher._idle[0].process.pid}/environ").read_bytes().split(b"\0")
                assert {f"{name}={value}".encode() for name, value in STEP_MEMORY_ENV.items()} <= set(environ)
        finally:
            launcher.dispose()
