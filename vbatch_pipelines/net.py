"""Loopback helpers shared by the engine manager, `vbatch up`, tests and benchmarks."""

from __future__ import annotations

import os
import socket
import threading
import time

import httpx

_clients: dict[int, httpx.Client] = {}
_clients_lock = threading.Lock()


def local_http() -> httpx.Client:
    """This process's HTTP client for the services vbatch talks to (the engine, the Dagster webserver, Label
    Studio), shared by its threads. ``httpx.get`` builds a client, and an SSL context, per call: ~15 ms of
    CPU each, which a run's health probes and every batch launch paid."""
    pid = os.getpid()  # a forked child makes its own
    client = _clients.get(pid)
    if client is None:
        with _clients_lock:
            client = _clients.get(pid)
            if client is None:
                # Idle connections are dropped well before the servers' own keep-alive (uvicorn: 5 s) ends them.
                client = _clients[pid] = httpx.Client(timeout=30.0, limits=httpx.Limits(keepalive_expiry=2.0))
    return client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float) -> bool:
    """True once ``url`` answers with a status below 500, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if local_http().get(url, timeout=2).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False
