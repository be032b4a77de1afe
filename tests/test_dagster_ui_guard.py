"""The Dagster UI under `vbatch up` behind vbatch's guard (issue 30): the webserver itself has no Host or Origin
check, so a page the operator opened could drive it (a ``text/plain`` POST or a GET carrying a mutation, a name
rebound to 127.0.0.1). Against a real `vbatch up`: each such request is refused and changes nothing, while the UI,
its GraphQL and its WebSocket work from its own origin."""

from __future__ import annotations

import asyncio
import json
import os
from urllib.parse import quote

import httpx
import pytest

from tests.conftest import TINY_MODEL_ID, chromium_browser, start_up
from vbatch_pipelines.net import free_port

GPU_SLOTS = '{ instance { concurrencyLimit(concurrencyKey: "gpu") { slotCount } } }'
ZERO_GPUS = 'mutation { setConcurrencyLimit(concurrencyKey: "gpu", limit: 0) }'


@pytest.fixture(scope="module")
def dagster_ui(tmp_path_factory, tiny_model_path) -> str:
    home = tmp_path_factory.mktemp("guarded") / "home"
    api_port, dagster_port = free_port(), free_port()
    env = dict(os.environ, VBATCH_HOME=str(home), VBATCH_ENGINE="transformers", VBATCH_CURATION="off",
               VBATCH_MODELS=f"{TINY_MODEL_ID}={tiny_model_path}", DAGSTER_HOME=str(home / "dagster"))
    for key in ("VBATCH_DATABASE_URL", "VBATCH_DAGSTER_DATABASE_URL", "VBATCH_API_KEYS", "VBATCH_ADMIN_KEYS",
                "VBATCH_DAGSTER_URL"):
        env.pop(key, None)
    up, _ = start_up(env, "--api-port", str(api_port), "--dagster-port", str(dagster_port), "--no-engine")
    try:
        yield f"http://127.0.0.1:{dagster_port}"
    finally:
        up.terminate()
        up.wait(120)


def _gpu_slots(url: str) -> int:
    answer = httpx.post(f"{url}/graphql", json={"query": GPU_SLOTS}, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]["instance"]["concurrencyLimit"]["slotCount"]


@pytest.mark.stack
def test_cross_site_and_foreign_host_requests_to_the_dagster_ui_are_refused(dagster_ui):
    slots = _gpu_slots(dagster_ui)
    assert slots >= 1
    # What a page at attacker.example can send without a CORS preflight: a text/plain POST, the query in the URL.
    attack = httpx.post(f"{dagster_ui}/graphql?query={quote(ZERO_GPUS)}", content=b"x", timeout=30,
                        headers={"Content-Type": "text/plain", "Origin": "http://attacker.example"})
    assert attack.status_code == 403 and attack.json()["error"]["code"] == "origin_not_allowed", attack.text
    # ... from a page whose Origin the guard would take: still no text/plain body.
    same_site = httpx.post(f"{dagster_ui}/graphql?query={quote(ZERO_GPUS)}", content=b"x", timeout=30,
                           headers={"Content-Type": "text/plain"})
    assert same_site.status_code == 415, same_site.text
    # An <img src> or a link: a GET with the mutation in its URL (no Origin at all).
    image = httpx.get(f"{dagster_ui}/graphql", params={"query": ZERO_GPUS}, timeout=30)
    assert image.status_code == 405 and image.json()["error"]["code"] == "graphql_get_refused", image.text
    # DNS rebinding: attacker.example resolving to 127.0.0.1, a JSON POST from its own (same-origin) page.
    rebound = httpx.post(f"{dagster_ui}/graphql", json={"query": ZERO_GPUS}, timeout=30,
                         headers={"Host": "attacker.example", "Origin": "http://attacker.example"})
    assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "host_not_allowed", rebound.text
    assert _gpu_slots(dagster_ui) == slots, "a refused request changed the gpu pool"

    # The UI's own requests pass: its page (not frameable), and a mutation from its origin, as JSON.
    page = httpx.get(dagster_ui + "/runs", timeout=30)
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert "frame-ancestors 'none'" in page.headers.get("content-security-policy", "")
    own = httpx.post(f"{dagster_ui}/graphql", timeout=30, headers={"Origin": dagster_ui},
                     json={"query": f'mutation {{ setConcurrencyLimit(concurrencyKey: "gpu", limit: {slots + 1}) }}'})
    assert own.status_code == 200 and own.json()["data"]["setConcurrencyLimit"] is True, own.text
    assert _gpu_slots(dagster_ui) == slots + 1


@pytest.mark.stack
def test_the_dagster_uis_websocket_opens_only_from_its_own_origin(dagster_ui):
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    url = "ws" + dagster_ui.removeprefix("http") + "/graphql"

    async def handshake(origin: str) -> dict:
        async with connect(url, subprotocols=["graphql-ws"], origin=origin, open_timeout=20) as socket:
            await socket.send(json.dumps({"type": "connection_init", "payload": {}}))
            return json.loads(await asyncio.wait_for(socket.recv(), 20))

    assert asyncio.run(handshake(dagster_ui))["type"] == "connection_ack"
    with pytest.raises(InvalidStatus) as refused:
        asyncio.run(handshake("http://attacker.example"))
    assert refused.value.response.status_code == 403


@pytest.mark.stack
def test_the_dagster_webserver_itself_listens_only_where_no_page_can_guess(dagster_ui):
    """The guard is the only way in: the webserver behind it is on a random 127.x.y.z address (Linux) and port,
    not on the UI's port or 127.0.0.1."""
    from urllib.parse import urlsplit

    import psutil

    port = int(dagster_ui.rsplit(":", 1)[1])
    listeners = {(c.laddr.ip, c.laddr.port): c.pid for c in psutil.net_connections("tcp") if c.status == "LISTEN"}
    guard = psutil.Process(listeners[("127.0.0.1", port)]).cmdline()
    assert "api.dagster_proxy" in guard
    upstream = urlsplit(guard[guard.index("--upstream") + 1])  # this stack's webserver (others may run beside it)
    webserver = psutil.Process(listeners[(upstream.hostname, upstream.port)])
    assert "dagster-webserver" in " ".join(webserver.cmdline())
    assert upstream.hostname.startswith("127.") and upstream.hostname != "127.0.0.1", upstream.hostname
    assert not any(pid == webserver.pid and ip == "127.0.0.1" for (ip, _), pid in listeners.items())


@pytest.mark.stack
def test_the_dagster_ui_works_through_its_guard_in_chromium(dagster_ui):
    """The UI served through the guard, in a browser: its app loads, its GraphQL and WebSocket answer, no request
    is refused and the page raises no error."""
    with chromium_browser() as browser:
        page = browser.new_page(base_url=dagster_ui)
        problems, sockets = [], []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("response", lambda response: response.status >= 400 and problems.append(
            f"{response.status} {response.url}"))
        page.on("websocket", lambda socket: sockets.append(socket.url))
        page.goto("/locations")
        page.get_by_text("vbatch", exact=True).first.wait_for(timeout=60_000)
        page.goto("/jobs")
        page.get_by_text("batch_job").first.wait_for(timeout=60_000)
    assert not problems, problems
    assert any(url.endswith("/graphql") for url in sockets), sockets
