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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, cancel: threading.Event | None = None) -> bool:
    """True once ``url`` answers with a status below 500, False after ``timeout`` seconds (or once ``cancel``
    is set)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (cancel is not None and cancel.is_set()):
        try:
            if local_http().get(url, timeout=2).status_code < 500:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    return False


class PortTaken(RuntimeError):
    """A port vbatch would listen on is held by another process; the message names it."""


def port_holder(port: int) -> str:
    """Who listens on ``port`` on this machine: pid, command line and, for another vbatch, its home."""
    import psutil

    try:
        listeners = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr
                     and c.laddr.port == port]
    except psutil.Error:
        listeners = []
    for connection in listeners:
        if connection.pid is None:
            continue
        try:
            process = psutil.Process(connection.pid)
            command = " ".join(process.cmdline())[:200]
            try:
                home = process.environ().get("VBATCH_HOME")
            except psutil.Error:
                home = None
        except psutil.Error:
            continue
        return f"pid {connection.pid} ({command})" + (f", of the vbatch home {home}" if home else "")
    return "a process this user cannot see (another user's, or in a container)"


def check_port_free(host: str, port: int, what: str, setting: str | None = None) -> None:
    """Raise PortTaken naming the process that holds ``host:port``, where ``what`` would listen."""
    import errno

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to listen on
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            hint = f": stop it, or set {setting} to another port" if setting else ": stop it, or choose another port"
            raise PortTaken(f"port {port} ({what}) is taken by {port_holder(port)}{hint}") from None
