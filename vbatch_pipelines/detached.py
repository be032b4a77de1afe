"""Long-lived servers that outlive the process that started them (vLLM, Label Studio).

Dagster runs and CLI calls are short-lived; the servers they need must stay up between them. A server is
started detached (its own session, so a cancelled run does not take it down), its pid and port go to a
state file, and whoever needs it next finds it there, health-checks it and reuses it, or starts it again
if it died. A file lock keeps two processes from starting the same server twice.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from vbatch_pipelines.errors import Unavailable
from vbatch_pipelines.paths import write_private


class ServerStartError(Unavailable):
    """A server that did not start, saying why. ``reason``: the first error its own log names (None when it
    names none); ``hint``: what to do about it; ``log_path``: where the rest is; ``retry_at`` (epoch seconds):
    set when it failed to start again and again, and vbatch starts it no more until then."""

    code = "server_unavailable"

    def __init__(self, message: str, *, reason: str | None = None, hint: str | None = None,
                 log_path: Path | None = None, retry_at: float | None = None):
        super().__init__(message)
        self.reason, self.hint, self.log_path, self.retry_at = reason, hint, log_path, retry_at


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


START_MARKER = "=== vbatch starting "
LOG_READ_LIMIT = 1 << 20  # a failed start's log section is read from the last MiB of the log at most
# A log line's prefix as vLLM (and its engine core, in a process of its own) writes it:
# "(EngineCore pid=9767) ERROR 12-04 07:25:55 [core.py:1510] ".
_LOG_PREFIX = re.compile(r"^(?:\(\w+ pid=\d+\) ?)?"
                         r"(?:(?:DEBUG|INFO|WARNING|ERROR|CRITICAL) [\d-]+ [\d:.]+ \[[^\]]*\] ?)?")
_USAGE_ERROR = re.compile(r"^[\w.-]+: error: .+")  # argparse refusing the command line
_QUALIFIED = re.compile(r"^(?:\w+\.)+(?=\w+:)")  # pydantic_core._pydantic_core.ValidationError: its module
_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~$])/(?:[\w.+@-]+/)*([\w.+@-]+)")  # not a URL's, not $VBATCH_HOME/...


def _sentence(text: str) -> str:
    return text if text.endswith((".", "!", "?")) else f"{text}."


def log_since_start(path: Path) -> str:
    """What the server wrote since its last start began (a server's log is appended to across starts)."""
    try:
        with open(path, "rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - LOG_READ_LIMIT))
            text = log.read().decode(errors="replace")
    except OSError:
        return ""
    start = text.rfind(START_MARKER)
    return text[start:] if start >= 0 else text


def error_lines(log: str) -> list[str]:
    """The errors a server's log names, in order: the exception that ends each Python traceback
    (``SomeError: message``, with the first line of a message that goes on below it, as pydantic's does), and
    argparse's ``prog: error: ...``. Log prefixes are stripped; in a chain of tracebacks the root cause
    comes first."""
    lines = [_LOG_PREFIX.sub("", line.rstrip()) for line in log.splitlines()]
    found, in_traceback = [], False
    for index, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
        elif in_traceback and line and not line[0].isspace():
            in_traceback = False
            more = lines[index + 1].strip() if index + 1 < len(lines) else ""
            if more and lines[index + 1][0].isspace() and not more.startswith("For further information"):
                line = f"{line}: {more}"
            found.append(_QUALIFIED.sub("", line))
        elif _USAGE_ERROR.match(line):
            found.append(line)
    return found


def live_groups() -> set[int]:
    """The process groups with a live member (zombies do not count: nobody may reap them)."""
    import psutil

    groups = set()
    for process in psutil.process_iter(["status"]):
        try:
            if process.info["status"] != psutil.STATUS_ZOMBIE:
                groups.add(os.getpgid(process.pid))
        except (ProcessLookupError, PermissionError):
            continue
    return groups


def kill_groups(pids: list[int], timeout: float = 20.0, force=None) -> None:
    """SIGTERM the process groups the ``pids`` lead, all at once, then SIGKILL what is left of them after
    ``timeout`` (at once when the ``force`` event is set: a second Ctrl-C).

    Waits for every member, not only the leader: a child that outlives its leader (a run worker under
    the Dagster daemon, vLLM's engine core) would otherwise be orphaned and keep running."""
    left = list(dict.fromkeys(pids))
    for sig, wait_s in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        for pid in left:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                continue
            except PermissionError:
                os.kill(pid, sig)
        deadline = time.monotonic() + wait_s
        while left and time.monotonic() < deadline:
            groups = live_groups()
            left = [pid for pid in left if pid in groups]
            if not left or (sig == signal.SIGTERM and force is not None and force.is_set()):
                break
            time.sleep(0.2)
        if not left:
            return


def kill_group(pid: int, timeout: float = 20.0) -> None:
    """``kill_groups`` of one group."""
    kill_groups([pid], timeout)


class NoNewServers(RuntimeError):
    """This process is stopping: it starts no more detached servers (they would outlive it unowned)."""


_starts = threading.Lock()
_no_new_servers = False


def refuse_new_servers() -> None:
    """From now on this process starts no detached server; one being started has its state file written when
    this returns, so whoever stops the servers next finds it."""
    global _no_new_servers
    with _starts:
        _no_new_servers = True


HEALTHY_MEMO_S = 10.0
_healthy_seen: dict[tuple[str, int, int | None], float] = {}  # (state file, pid, port) -> when it last answered


class DetachedServer:
    """State file, lock, start, health check and stop; subclasses say how to run and probe the server."""

    name = "server"
    startup_timeout_s = 300.0
    busy_grace_s = 30.0  # how long a live server may take to answer before it is judged hung and restarted
    start_error = ServerStartError
    # A server that failed to start this many times in a row with the same command line is then started at most
    # once every ``start_pause_s``, callers getting its last failure at once meanwhile, instead of each waiting
    # on a start that fails alike; a changed command line (its settings) or a stop (`vbatch up` ending) lets
    # it start at once.
    failed_starts_before_pause = 3
    start_pause_s = 600.0
    niceness = 0  # its CPU priority: above 0 it yields the CPU to the platform's own processes

    def __init__(self, state_dir: Path, key: str):
        self.state_dir = state_dir
        self.state_path = state_dir / f"{key}.json"
        self.log_path = state_dir / f"{key}.log"
        self.lock_path = state_dir / f"{key}.lock"
        self.failures_path = state_dir / f"{key}.failed-starts"  # JSON; not *.json, which names state files

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

    @property
    def label(self) -> str:
        """The server, as its errors name it."""
        return self.name

    def explain_start_failure(self, log: str) -> tuple[str | None, str | None]:
        """Why a start failed, from what the server logged since it began: its first error line (None when it
        names none), and what to do about it (None when there is nothing to say)."""
        errors = error_lines(log)
        return (errors[0][:400] if errors else None), None

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
        """Whether the server of ``state`` runs and answers a probe now (remembered for ``ensure``)."""
        state = state or self.state()
        if not state or not pid_alive(state["pid"]):
            return False
        key = self._seen_key(state)
        if self.probe(self.url_of(state), timeout):
            _healthy_seen[key] = time.monotonic()
            return True
        _healthy_seen.pop(key, None)
        return False

    def _seen_key(self, state: dict[str, Any]) -> tuple[str, int, int | None]:
        return str(self.state_path), state["pid"], state.get("port")

    def _answered_lately(self, state: dict[str, Any] | None) -> bool:
        """Whether this same server process answered this process's probe in the last HEALTHY_MEMO_S (and still
        runs): ``ensure`` then trusts it, as a busy CPU engine takes tenths of a second per probe and every run
        opening its engine paid them."""
        if not state or not pid_alive(state["pid"]):
            return False
        return time.monotonic() - _healthy_seen.get(self._seen_key(state), -HEALTHY_MEMO_S) < HEALTHY_MEMO_S

    def forget_healthy(self) -> None:
        """A request to it failed: the next ``ensure`` probes it again."""
        for key in [key for key in _healthy_seen if key[0] == str(self.state_path)]:
            _healthy_seen.pop(key, None)

    def ensure(self) -> str:
        """The URL of a healthy server, starting (or restarting) one if needed."""
        from filelock import FileLock

        state = self.state()
        if self._answered_lately(state) or self.healthy(state):
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
            paused = self._paused()
            if paused is not None:
                raise paused
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
        from vbatch_pipelines.net import PortTaken, check_port_free

        port = self.choose_port()
        try:
            check_port_free("127.0.0.1", port, self.name)
        except PortTaken as exc:  # another server would answer our probes (another home's: 401s forever)
            raise self.start_error(str(exc)) from None
        argv = self.argv(port)
        with _starts:
            if _no_new_servers:
                raise NoNewServers(f"not starting {self.name}: vbatch is stopping")
            with open(self.log_path, "ab") as log:
                log.write(f"\n{START_MARKER}{self.name} at {time.ctime()}: {' '.join(argv)}\n".encode())
                log.flush()
                process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=self.env(), start_new_session=True, close_fds=True)
                if self.niceness:  # before it starts a thread or a child: they inherit it
                    try:
                        os.setpriority(os.PRIO_PGRP, process.pid, self.niceness)
                    except OSError:
                        pass  # a lower priority is a courtesy: without it the server runs as before
            state = {"pid": process.pid, "port": port, "argv": argv, "started_at": time.time(),
                     **self.state_extra()}
            write_private(self.state_path, json.dumps(state))  # the command line may carry credentials
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise self._start_failed(f"it exited with code {process.returncode} while starting")
            if self.healthy(state):
                self.failures_path.unlink(missing_ok=True)
                return self.url_of(state)
            time.sleep(0.5)
        kill_group(process.pid)
        raise self._start_failed(f"it did not answer within {self.startup_timeout_s:.0f}s")

    # failed starts -------------------------------------------------------------------------------
    def _command_key(self) -> list[str]:
        """The command line without its port: what a failed start is remembered by."""
        return self.argv(0)

    def _start_failed(self, problem: str) -> ServerStartError:
        """The error for a start that just failed, counted with the failures before it."""
        reason, hint = self.explain_start_failure(log_since_start(self.log_path))
        record, key = self._failures() or {}, self._command_key()
        count = record.get("count", 0) + 1 if record.get("command") == key else 1
        record = {"command": key, "count": count, "at": time.time(), "problem": problem, "reason": reason,
                  "hint": hint}
        write_private(self.failures_path, json.dumps(record))  # the command line may carry credentials
        return self._failure_error(record)

    def _paused(self) -> ServerStartError | None:
        """The last failure, while starts are paused after too many in a row (None when a start may go)."""
        record = self._failures()
        if record is None:
            return None
        retry_at = self._retry_at(record)
        if record.get("command") != self._command_key() or retry_at is None or time.time() >= retry_at:
            return None
        return self._failure_error(record)

    def _failures(self) -> dict[str, Any] | None:
        """The record of the failed starts in a row: command (without port), count, at, problem, reason, hint."""
        try:
            return json.loads(self.failures_path.read_text())
        except (OSError, ValueError):
            return None

    def _retry_at(self, record: dict[str, Any]) -> float | None:
        """When starts may be tried again, if they are paused after this failure."""
        return record["at"] + self.start_pause_s if record["count"] >= self.failed_starts_before_pause else None

    def _failure_error(self, record: dict[str, Any]) -> ServerStartError:
        """The error callers get, in words fit for any client: the server's own error line and what to do,
        the log named under $VBATCH_HOME (the home is the state directory's parent), no other paths."""
        reason, hint = record.get("reason"), record.get("hint")
        retry_at = self._retry_at(record)
        log = self._public(str(self.log_path))
        if reason:
            message = f"{self.label} could not start: {_sentence(self._public(reason))}"
            message += f" {_sentence(hint)}" if hint else ""
            message += f" ({record['problem'][0].upper()}{record['problem'][1:]}; its log: {log}.)"
        else:
            message = f"{self.label} could not start: {record['problem']} and its log ({log}) names no error."
        if retry_at is not None:
            message += (f" It failed to start {record['count']} times in a row: vbatch tries again after "
                        f"{time.strftime('%H:%M:%S UTC', time.gmtime(retry_at))}, or at once when its settings "
                        "change or vbatch restarts.")
        return self.start_error(message, reason=reason, hint=hint, log_path=self.log_path, retry_at=retry_at)

    def _public(self, text: str) -> str:
        """``text`` with the home shown as $VBATCH_HOME and any other absolute path cut to its last part."""
        text = text.replace(str(self.state_dir.parent), "$VBATCH_HOME")
        return _ABSOLUTE_PATH.sub(lambda match: f"…/{match.group(1)}", text)

    def handover(self) -> int | None:
        """Forget the server (its state file) and hand over its pid, for the caller to stop it together with
        others; None when it does not run."""
        state = self.state()
        self.state_path.unlink(missing_ok=True)
        self.failures_path.unlink(missing_ok=True)  # stopped on purpose: the next start is tried at once
        return state["pid"] if state and pid_alive(state["pid"]) else None

    def stop(self) -> bool:
        """Stop the server if it runs; True if one was stopped."""
        pid = self.handover()
        if pid is not None:
            kill_group(pid)
        return pid is not None
