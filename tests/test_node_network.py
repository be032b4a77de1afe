"""The cluster tests' node networks (tests/node_network.py): made and removed with their block, orphans of a test
process that no longer runs swept, and a node reaching a loopback-only server of this machine through the relay
at its host-side address and at no other."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading

import pytest

from tests.node_network import (
    PREFIX,
    NodeNetwork,
    Relay,
    _free_subnets,
    _ip,
    namespaces_unavailable,
    node_networks,
    remove_orphans,
)

pytestmark = pytest.mark.skipif(bool(namespaces_unavailable()), reason=f"no namespaces: {namespaces_unavailable()}")

CONNECT = """import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as conn:
        conn.sendall(b"ping")
        print(conn.recv(16).decode())
except OSError as exc:
    print(type(exc).__name__)"""


def _exists(network: NodeNetwork) -> tuple[bool, bool]:
    return network.namespace in _ip("netns", "list").split(), f" {network.veth}@" in _ip("-o", "link", "show")


def test_a_node_reaches_a_loopback_server_only_through_the_relay_at_its_address():
    with socket.create_server(("127.0.0.1", 0)) as server, node_networks(1) as (network,):
        port = server.getsockname()[1]

        def echo_once() -> None:
            conn, _ = server.accept()
            with conn:
                conn.sendall(conn.recv(16).upper())

        def from_node(host: str) -> str:
            return subprocess.run(network.run([sys.executable, "-c", CONNECT, host, str(port)]), capture_output=True,
                                  text=True, timeout=60).stdout.strip()

        assert _exists(network) == (True, True)
        assert from_node("127.0.0.1") == "ConnectionRefusedError"  # the namespace's own loopback
        assert from_node(network.host_address) == "ConnectionRefusedError"  # nothing forwards yet
        relay = Relay()
        try:
            relay.forward(network.host_address, port)
            threading.Thread(target=echo_once, daemon=True).start()
            assert from_node(network.host_address) == "PING"
        finally:
            relay.close()
    assert _exists(network) == (False, False)


def test_networks_left_by_a_test_process_that_is_gone_are_swept():
    gone = subprocess.Popen(["true"])
    gone.wait()
    tag = f"{gone.pid:x}-00"
    subnet = _free_subnets(1)[0]
    orphan = NodeNetwork(f"{PREFIX}{tag}-0", f"vb{tag.replace('-', '')}0h", str(subnet[1]), str(subnet[2]))
    orphan.create()
    try:
        assert _exists(orphan) == (True, True)
        with node_networks(1) as (fresh,):
            assert _exists(orphan) == (False, False), "swept before new ones are made"
            assert _exists(fresh) == (True, True)
        assert orphan.namespace not in remove_orphans()  # already gone
    finally:
        orphan.remove()
