"""`vbatch up`'s start-up child: the start-up work that needs the platform's resources, in a process of its own that
exits when it is done, so that the supervisor (which lives as long as the platform) holds none of it.

Building the resources imports Dagster, SQLAlchemy and pydantic; migrating the databases, Alembic and Dagster's
storage; building the tiny model on a fresh home, torch and transformers. In the supervisor that was 481 MB kept
for the platform's life; the supervisor now only starts, watches and stops processes (issue 28).

The child runs the steps the supervisor asks for (``supervisor.StartupSteps``: prepare the platform before the
services start, then warm it up), in order, over two pipes: each order ``(step, args)`` is pickled to its stdin,
and the step's result, or the exception it raised, comes back pickled on its report pipe; the supervisor raises
that exception as if it had run the step itself (with the child's traceback as a note), so ``vbatch up`` reports
a taken port or a too-new schema exactly as before. The child ends when its stdin closes.

The engines and Label Studio it starts are detached servers (``vbatch_pipelines.detached``): they outlive it,
and the supervisor stops them with the rest, found from their state files. SIGTERM ends the child once no server
is half started (``refuse_new_servers``: a server it is starting has its state file written first), so a stop
that comes while the engine warms up still finds that engine. A terminal's Ctrl-C is the supervisor's to act on:
the child ignores SIGINT, and it gets SIGTERM if the supervisor dies.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import traceback
from typing import Any

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.processes import die_with_parent

STOP_WAIT_S = 10.0  # how long a stopped child may take to exit before it is killed


class StartupFailed(VbatchError):
    """The start-up child ended without answering (it crashed or was killed), or its error could not be sent."""

    status = 500
    code = "startup_failed"


class StartupChild:
    """The start-up child as the supervisor sees it: ``run(step, *args)`` returns what the child's step returned,
    or raises what it raised; ``close()`` lets it exit, ``stop()`` ends it (waiting until it is gone). Started on
    the first ``run``, as ``main(report_fd)`` of ``module`` (which ``serve``s its steps)."""

    def __init__(self, module: str, main: str):
        self.module, self.main = module, main
        self.process: subprocess.Popen | None = None
        self._reports = None

    def __enter__(self) -> StartupChild:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()

        def prepare_child() -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            die_with_parent(signal.SIGTERM)

        try:
            code = f"import sys; from {self.module} import {self.main}; sys.exit({self.main}(int(sys.argv[1])))"
            self.process = subprocess.Popen([sys.executable, "-c", code, str(write_fd)], stdin=subprocess.PIPE,
                                            pass_fds=(write_fd,), preexec_fn=prepare_child)
        finally:
            os.close(write_fd)
        self._reports = os.fdopen(read_fd, "rb")

    def run(self, step: str, *args: Any) -> Any:
        if self.process is None:
            self._start()
        try:
            self.process.stdin.write(pickle.dumps((step, args)))
            self.process.stdin.flush()
            ok, value = pickle.load(self._reports)
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):  # it is gone: it answers no more
            raise StartupFailed(f"`vbatch up`'s start-up process ended during its {step} step (exit code "
                                f"{self.process.wait()})") from None
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """No more steps: the child exits, and is reaped (not left a zombie under `vbatch up`)."""
        if self.process is not None:
            try:
                self.process.stdin.close()
            except OSError:
                pass
            try:
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def stop(self) -> None:
        """End the child now (a server it is starting has its state file written by then) and wait for it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.close()


def _outcome(step, args: tuple) -> bytes:
    """The pickled report of one step: (True, its result) or (False, the exception it raised)."""
    try:
        return pickle.dumps((True, step(*args)))
    except Exception as exc:  # noqa: BLE001 - the supervisor raises it
        exc.add_note(f"in `vbatch up`'s start-up process (pid {os.getpid()}):\n"
                     + "".join(traceback.format_exception(exc)).rstrip())
        try:
            report = pickle.dumps((False, exc))
            pickle.loads(report)  # an exception that pickles but does not unpickle would be lost on the way
            return report
        except Exception:  # noqa: BLE001 - sent as its message
            return pickle.dumps((False, StartupFailed(f"{type(exc).__name__}: {exc}")))


def _exit_once_no_server_is_half_started(signum: int) -> None:
    from vbatch_pipelines.detached import refuse_new_servers

    refuse_new_servers()
    os._exit(128 + signum)


def serve(steps: Any, report_fd: int) -> int:
    """The child's loop: run each step ordered on stdin (a method of ``steps``), report it on ``report_fd``; 0 once
    stdin closes."""
    # From a thread: the main thread may be inside a server's start, holding the lock the refusal waits for.
    signal.signal(signal.SIGTERM, lambda signum, frame: threading.Thread(
        target=_exit_once_no_server_is_half_started, args=(signum,), daemon=True).start())
    with os.fdopen(report_fd, "wb") as reports:
        while True:
            try:
                name, args = pickle.load(sys.stdin.buffer)
            except EOFError:
                return 0
            reports.write(_outcome(getattr(steps, name), args))
            reports.flush()

