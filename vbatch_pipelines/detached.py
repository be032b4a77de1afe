"""Long-lived servers that outlive the process that started them (vLLM, Label Studio).

Dagster runs and CLI calls are short-lived; the servers they need must stay up between them. A server is
started detached (its own session, so a cancelled run does not take it down), its pid and port go to a
state file, and whoever needs it next finds it there, health-checks it and reuses it, or starts it again
if it died. A file lock keeps two processes from starting the same server twice.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from vbatch_pipelines.paths import write_private


class ServerStartError(RuntimeError):
    pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our own exited child) is not alive
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies do not count: nobody may reap them)."""
    import psutil

    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError):
            continue
    return False


def kill_group(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM the process group ``pid`` leads, then SIGKILL what is left of it after ``timeout``.

    Waits for every member, not only the leader: a child that outlives its leader (a run worker under
    the Dagster daemon, vLLM's engine core) would otherwise be orphaned and keep running."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        except PermissionError:
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not group_alive(pid):
                return
            time.sleep(0.2)


class DetachedServer:
    """State file, lock, start, health check and stop; subclasses say how to run and probe the server."""

    name = "server"
    startup_timeout_s = 300.0
    busy_grace_s = 30.0  # how long a live server may take to answer before it is judged hung and restarted

    def __init__(self, state_dir: Path, key: str):
        self.state_dir = state_dir
        self.state_path = state_dir / f"{key}.json"
        self.log_path = state_dir / f"{key}.log"
        self.lock_path = state_dir / f"{key}.lock"

    # subclasses ----------------------------------------------------------------------------------
    def argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        from vbatch_pipelines.child_env import without_secrets

        return without_secrets()

    def probe(self, url: str, timeout: float) -> bool:
        raise NotImplementedError

    def state_extra(self) -> dict[str, Any]:
        """More to record in the state file (enough to find the server again from it)."""
        return {}

    def choose_port(self) -> int:
        from vbatch_pipelines.net import free_port

        return free_port()

    # shared --------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None

    @staticmethod
    def url_of(state: dict[str, Any]) -> str:
        return f"http://127.0.0.1:{state['port']}"

    def healthy(self, state: dict[str, Any] | None = None, timeout: float = 2.0) -> bool:
        state = state or self.state()
        if not state or not pid_alive(state["pid"]):
            return False
        return self.probe(self.url_of(state), timeout)

    def ensure(self) -> str:
        """The URL of a healthy server, starting (or restarting) one if needed."""
        from filelock import FileLock

        state = self.state()
        if self.healthy(state):
            return self.url_of(state)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_path), timeout=self.startup_timeout_s + 60):
            state = self.state()  # another process may have started it while we waited
            if self.healthy(state):
                return self.url_of(state)
            if state and pid_alive(state["pid"]):
                # Alive but slow to answer: a busy server (a CPU engine mid-batch) is given time before it is
                # judged hung; killing it would lose every request in flight.
                if self._answers_within(state, self.busy_grace_s):
                    return self.url_of(state)
                kill_group(state["pid"])
            return self._start()

    def _answers_within(self, state: dict[str, Any], grace_s: float) -> bool:
        deadline = time.monotonic() + grace_s
        while (left := deadline - time.monotonic()) > 0:
            if not pid_alive(state["pid"]):
                return False
            if self.probe(self.url_of(state), min(10.0, max(left, 0.5))):
                return True
            time.sleep(min(1.0, max(deadline - time.monotonic(), 0)))
        return False

    def _start(self) -> str:
        port = self.choose_port()
        argv = self.argv(port)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== vbatch starting {self.name} at {time.ctime()}: {' '.join(argv)}\n".encode())
            log.flush()
            process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       env=self.env(), start_new_session=True, close_fds=True)
        state = {"pid": process.pid, "port": port, "argv": argv, "started_at": time.time(), **self.state_extra()}
        write_private(self.state_path, json.dumps(state))  # the command line may carry credentials
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerStartError(f"{self.name} exited with code {process.returncode} while starting; "
                                       f"log {self.log_path}:\n{tail(self.log_path)}")
            if self.healthy(state):
                return self.url_of(state)
            time.sleep(0.5)
        kill_group(process.pid)
        raise ServerStartError(f"{self.name} did not become healthy in {self.startup_timeout_s:.0f}s; "
                               f"log {self.log_path}:\n{tail(self.log_path)}")

    def stop(self) -> bool:
        """Stop the server if it runs; True if one was stopped."""
        state = self.state()
        self.state_path.unlink(missing_ok=True)
        if state and pid_alive(state["pid"]):
            kill_group(state["pid"])
            return True
        return False
