"""The last known state of a service vbatch depends on (the Dagster webserver, Label Studio), refreshed in the
background: a health check or a console page never waits on a service that answers slowly or not at all."""

from __future__ import annotations

import threading
import time
from typing import Callable

import httpx

from vbatch_pipelines.net import local_http

UNKNOWN = "unknown"  # not checked yet


class BackgroundProbe:
    """``probe()`` answers at once with the state seen last (``"ok"``, or what went wrong) and, when that is
    older than ``every_s``, starts one check in a thread of its own."""

    def __init__(self, check: Callable[[], str], every_s: float = 5.0):
        self._check, self._every_s = check, every_s
        self._state, self._checked_at = UNKNOWN, float("-inf")
        self._lock = threading.Lock()
        self._running = False

    def __call__(self) -> str:
        with self._lock:
            if not self._running and time.monotonic() - self._checked_at > self._every_s:
                self._running = True
                threading.Thread(target=self._run, name="vbatch-probe", daemon=True).start()
            return self._state

    def _run(self) -> None:
        try:
            state = self._check()
        except Exception as exc:  # noqa: BLE001 - a probe reports, it never raises
            state = f"error: {type(exc).__name__}"
        with self._lock:
            self._state, self._checked_at, self._running = state, time.monotonic(), False

    def wait(self, timeout_s: float = 5.0) -> str:
        """The state after a fresh check (tests; a CLI that must know)."""
        with self._lock:
            self._checked_at = float("-inf")
        self()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._running and self._checked_at > float("-inf"):
                    return self._state
            time.sleep(0.02)
        return self._state


class FixedState:
    """A service that is off by configuration: nothing to check, the reason is its state."""

    def __init__(self, state: str):
        self._state = state

    def __call__(self) -> str:
        return self._state

    def wait(self, timeout_s: float = 5.0) -> str:
        return self._state


def http_check(url: str, headers: Callable[[], dict] | None = None, timeout_s: float = 2.0) -> Callable[[], str]:
    """A check that ``url`` answers 2xx (with ``headers()`` computed at check time: a token read from disk)."""

    def check() -> str:
        try:
            response = local_http().get(url, headers=headers() if headers else None, timeout=timeout_s)
        except httpx.HTTPError as exc:
            return f"unreachable: {type(exc).__name__}"
        if response.status_code in (401, 403):
            return f"refused vbatch's token (HTTP {response.status_code})"
        return "ok" if response.is_success else f"HTTP {response.status_code}"

    return check
