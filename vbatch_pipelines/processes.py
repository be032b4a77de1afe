"""The processes `vbatch up` owns, written down so that nothing it started outlives it unowned.

- One owner per home: `up` holds an exclusive lock on ``run/up.lock`` for its life (the kernel drops it when the
  process dies, even on ``kill -9``), so a second `up` on a live home says so and exits.
- ``run/services.json`` records the owner and each service (pid, start time, command, port, restarts),
  rewritten atomically on every change. A new `up` on a home whose owner died stops what that one left, but
  only processes that are provably its services: same pid, same start time, same command line.
- Children die with their parent: each service gets a parent-death signal (Linux ``PR_SET_PDEATHSIG``);
  the run workers Dagster's daemon starts get SIGKILL when it goes (a run then fails and Dagster's run
  retries re-execute it, resuming from its result files). Engines and Label Studio are detached by design
  (their own state files): the next `up` adopts them when they are healthy.
"""

from __future__ import annotations

import ctypes
import fcntl
import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vbatch_pipelines.paths import write_private

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In a child, between fork and exec: receive ``sig`` when the parent dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        pass


class LastingSpawner:
    """Starts children from one thread that lives as long as this process. Linux sends the parent-death
    signal when the *thread* that forked the child ends, not the process: a child started from a request
    handler's pool thread (as the webserver launches runs) would be killed when that thread idles out."""

    def __init__(self, name: str = "spawner"):
        import queue
        import threading

        self._requests: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            start, done = self._requests.get()
            try:
                done.set_result(start())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                done.set_exception(exc)

    def popen(self, *args: Any, **kwargs: Any):
        """``subprocess.Popen(*args, **kwargs)``, forked from the lasting thread."""
        import subprocess
        from concurrent.futures import Future

        done: Future = Future()
        self._requests.put((lambda: subprocess.Popen(*args, **kwargs), done))
        return done.result()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc's ``malloc_trim``): after a pass over a large file
    the process would otherwise keep its peak for life. A no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def process_identity(pid: int) -> tuple[float, list[str]] | None:
    """(start time, command line) of a live, non-zombie process, or None."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return None
        return process.create_time(), process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


@dataclass
class ProcessRecord:
    name: str
    pid: int
    started: float  # the process's start time as the OS reports it (psutil create_time)
    argv: list[str]
    port: int | None = None
    restarts: int = 0
    since: float = field(default_factory=time.time)  # when this incarnation started

    def is_running(self) -> bool:
        """Whether this very process (pid, start time and command line all match) still runs."""
        identity = process_identity(self.pid)
        return identity is not None and abs(identity[0] - self.started) < 0.05 and identity[1] == self.argv


class AlreadyUp(RuntimeError):
    pass


class ProcessRegistry:
    """``run/services.json`` and ``run/up.lock`` of one home (``role="up"``), or ``run/worker-services.json`` and
    ``run/worker.lock`` for `vbatch worker`, so that a node may run both on one home."""

    def __init__(self, run_dir: Path, role: str = "up"):
        self.run_dir = run_dir
        self.role = role
        self.path = run_dir / ("services.json" if role == "up" else f"{role}-services.json")
        self.lock_path = run_dir / f"{role}.lock"
        self._lock_fd: int | None = None

    # -- the owner's lock ----------------------------------------------------------------------------
    def acquire(self) -> None:
        """Become the home's owner, or raise AlreadyUp naming the live one."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            owner = (self.read() or {}).get("owner") or {}
            what = f"API {owner.get('api_url', '?')}" if self.role == "up" else f"node {owner.get('node', '?')}"
            raise AlreadyUp(f"vbatch {'is already up' if self.role == 'up' else 'worker already runs'} on this home "
                            f"(pid {owner.get('pid', '?')}, {what}); `vbatch status` shows it, Ctrl-C or SIGTERM "
                            "stops it") from None
        self._lock_fd = fd

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- the record ----------------------------------------------------------------------------------
    def read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def live_owner(self) -> dict[str, Any] | None:
        """The record's owner while that very process (pid and start time) runs; None otherwise."""
        owner = (self.read() or {}).get("owner") or {}
        identity = process_identity(int(owner["pid"])) if owner.get("pid") else None
        if identity is None or abs(identity[0] - owner.get("started", 0)) > 0.05:
            return None
        return owner

    def services(self) -> list[ProcessRecord]:
        return [ProcessRecord(**entry) for entry in ((self.read() or {}).get("services") or {}).values()]

    def write(self, owner: dict[str, Any], services: dict[str, ProcessRecord]) -> None:
        write_private(self.path, json.dumps({"owner": owner, "services": {n: asdict(s) for n, s in services.items()}},
                                            indent=1))

    def stop_stale(self, timeout: float = 20.0) -> list[str]:
        """Stop the services a dead owner left running (only provably theirs); what was stopped."""
        from vbatch_pipelines.detached import kill_groups

        stale = [service for service in self.services() if service.is_running()]
        kill_groups([service.pid for service in stale], timeout)  # all at once, as `vbatch up` stops its own
        self.path.unlink(missing_ok=True)
        return [f"{service.name} (pid {service.pid})" for service in stale]
