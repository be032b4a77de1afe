"""Cluster test nodes on networks of their own (issue 18): each `vbatch worker` in a Linux network namespace made
for the test, joined to this machine by a veth pair on a free /30 of 10.231.0.0/16 (host side its first address,
node side its second), with no other route, so a node reaches the master's services only at its host-side address, as a node on another machine
would. Loopback when namespaces cannot be made here (not root, no `ip`, or the probe fails), or when
VBATCH_TEST_LOOPBACK_NODES=1.

What the nodes use must listen there: Redis and the vLLM replicas are started bound to every address (Redis with
its password) when namespaces are in use; PostgreSQL and the Dagster webserver listen on 127.0.0.1 only, so a
``Relay`` in the test process forwards each node's host-side address to them. A Redis named in
VBATCH_TEST_REDIS_URL must listen beyond loopback for nodes in namespaces to reach it.

Namespaces and veths are named after the test process (``vbt-<pid>-…``), removed when the block ends, and any
left by a test process that no longer runs (killed outright) are removed before new ones are made."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import psutil

SUBNETS = ipaddress.ip_network("10.231.0.0/16")
PREFIX = "vbt-"
_OURS = re.compile(rf"^{PREFIX}([0-9a-f]+)-([0-9a-f]+)-(\d+)$")


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class NodeNetwork:
    namespace: str
    veth: str  # the host side; its peer, in the namespace, is ``veth_node``
    host_address: str  # where the node reaches this machine
    node_address: str

    @property
    def veth_node(self) -> str:
        return self.veth[:-1] + "n"

    def create(self) -> None:
        _ip("netns", "add", self.namespace)
        _ip("link", "add", self.veth, "type", "veth", "peer", "name", self.veth_node, "netns", self.namespace)
        _ip("addr", "add", f"{self.host_address}/30", "dev", self.veth)
        _ip("link", "set", self.veth, "up")
        _ip("-n", self.namespace, "addr", "add", f"{self.node_address}/30", "dev", self.veth_node)
        _ip("-n", self.namespace, "link", "set", self.veth_node, "up")
        _ip("-n", self.namespace, "link", "set", "lo", "up")  # a node's own servers (a vLLM it starts) use it

    def remove(self) -> None:
        """Deleting the host side takes its peer with it at once (the namespace's own teardown is deferred)."""
        with suppress(RuntimeError):
            _ip("link", "del", self.veth)
        with suppress(RuntimeError):
            _ip("netns", "del", self.namespace)

    def run(self, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace: `ip netns exec` execs it, so its pid is the command's own."""
        return ["ip", "netns", "exec", self.namespace, *argv]


def _free_subnets(count: int) -> list[ipaddress.IPv4Network]:
    used = {ipaddress.ip_interface(word).network for word in _ip("-o", "-4", "addr", "show").split()
            if re.fullmatch(r"\d+\.\d+\.\d+\.\d+/\d+", word)}
    free = []
    while len(free) < count:
        subnet = ipaddress.ip_network(f"{SUBNETS[secrets.randbelow(SUBNETS.num_addresses // 4) * 4]}/30")
        if subnet not in used and subnet not in free:
            free.append(subnet)
    return free


def remove_orphans() -> list[str]:
    """Remove namespaces (and their veths) whose test process is gone; returns their names."""
    removed = []
    for line in _ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        found = _OURS.match(name)
        if found and not psutil.pid_exists(int(found[1], 16)):
            NodeNetwork(name, f"vb{found[1]}{found[2]}{found[3]}h", "", "").remove()
            removed.append(name)
    return removed


@contextmanager
def node_networks(count: int) -> Iterator[list[NodeNetwork]]:
    """``count`` node networks for the block, removed when it ends (a test that fails included)."""
    remove_orphans()
    tag = f"{os.getpid():x}-{secrets.token_hex(1)}"
    networks = [NodeNetwork(f"{PREFIX}{tag}-{index}", f"vb{tag.replace('-', '')}{index}h", str(subnet[1]),
                            str(subnet[2])) for index, subnet in enumerate(_free_subnets(count))]
    try:
        for network in networks:
            network.create()
        yield networks
    finally:
        for network in networks:
            network.remove()


@functools.cache
def namespaces_unavailable() -> str | None:
    """Why the cluster tests' nodes run on loopback, or None when each gets a network namespace."""
    if os.environ.get("VBATCH_TEST_LOOPBACK_NODES") == "1":
        return "VBATCH_TEST_LOOPBACK_NODES=1"
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    try:
        with node_networks(1) as (probe,):
            subprocess.run(probe.run(["true"]), check=True, capture_output=True, timeout=30)
    except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
        return f"a probe namespace could not be made: {exc}"
    return None


class Relay:
    """TCP forwarding, in a thread of the test process, from (address, port) pairs to 127.0.0.1 on the same port:
    how a node reaches a server of this machine that listens on loopback only."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers: list[asyncio.AbstractServer] = []

    def forward(self, address: str, port: int) -> None:
        async def listen() -> asyncio.AbstractServer:
            return await asyncio.start_server(self._pipe_to(port), address, port)

        self.servers.append(asyncio.run_coroutine_threadsafe(listen(), self.loop).result(timeout=10))

    def _pipe_to(self, port: int):
        async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                target_reader, target_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_copy(reader, target_writer), _copy(target_reader, writer))

        return connected

    def close(self) -> None:
        async def shut() -> None:
            for server in self.servers:
                server.close()
            pipes = asyncio.all_tasks() - {asyncio.current_task()}
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        sink.close()
