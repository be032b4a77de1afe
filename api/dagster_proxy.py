"""The Dagster UI's front door under `vbatch up`: Dagster's webserver has no authentication and no Host or Origin
check (a page the operator opens could stop sensors, terminate runs or set the ``gpu`` pool to 0 by a
``text/plain`` POST, a GET, or a DNS-rebound name). So it listens only on a random loopback address and port that
vbatch chooses at each start, and the Dagster UI's port is this guard, which forwards a request (HTTP and the
UI's GraphQL WebSocket) only when:

- its Host is a loopback name, this machine's name, the address it listens on or in VBATCH_ALLOWED_HOSTS
  (DNS rebinding), and its Origin, when it has one, is one of those (cross-site requests and sockets);
- a state-changing request carries ``application/json`` (what the UI sends; a form or ``text/plain`` cannot
  without a CORS preflight, which Dagster never grants);
- it is not a GraphQL operation in a URL (``GET /graphql?query=mutation...``: an ``<img>`` tag could send one).

Its answers must not be framed (clickjacking the UI's buttons), and a body is bounded like the API's.
Run as ``python -m api.dagster_proxy --listen HOST:PORT --upstream URL [--allow-host NAME ...]``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
from urllib.parse import parse_qsl

from api.errors import OpenAIError, error_response
from api.guard import BodyLimit, DriveByGuard, NoFraming

log = logging.getLogger("vbatch.dagster_proxy")
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own on each side; Host is the upstream's.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
                        b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length"})
OWN_HEADERS = frozenset({b"date", b"server"})  # this server sends its own
MAX_REQUEST_BYTES = 16 * 1024 * 1024  # the UI's GraphQL requests are kilobytes


class DagsterForwarder:
    """Forwards HTTP requests and WebSockets to the Dagster webserver at ``upstream`` (http://host:port)."""

    def __init__(self, upstream: str):
        import httpx

        self.upstream = upstream.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.upstream, timeout=httpx.Timeout(300.0, connect=5.0),
                                        trust_env=False)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            return await self._http(scope, receive, send)
        if scope["type"] == "websocket":
            return await self._websocket(scope, receive, send)
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.client.aclose()
                    return await send({"type": "lifespan.shutdown.complete"})

    @staticmethod
    def _target(scope) -> str:
        query = scope.get("query_string", b"")
        return scope.get("raw_path", scope["path"].encode()).decode("latin-1") + (f"?{query.decode('latin-1')}"
                                                                                  if query else "")

    async def _http(self, scope, receive, send):
        import httpx

        if scope["method"] in ("GET", "HEAD") and scope["path"].rstrip("/") == "/graphql" and any(
                key in ("query", "mutation") for key, _ in parse_qsl(scope.get("query_string", b"").decode())):
            refusal = OpenAIError(405, "GraphQL operations are taken only as a POST with an application/json body "
                                       "(an operation in a URL could come from any page's link or image)",
                                  code="graphql_get_refused")
            return await error_response(refusal)(scope, receive, send)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(key, value) for key, value in scope["headers"] if key.lower() not in HOP_BY_HOP]
        request = self.client.build_request(scope["method"], self._target(scope), headers=headers, content=body)
        try:
            response = await self.client.send(request, stream=True)
        except httpx.HTTPError as exc:
            log.warning("the Dagster webserver at %s did not answer: %s", self.upstream, exc)
            refusal = OpenAIError(502, "The Dagster webserver did not answer; `vbatch status` shows its state "
                                       "(it is restarted when it dies)", code="dagster_unavailable")
            return await error_response(refusal)(scope, receive, send)
        try:
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": [(key, value) for key, value in response.headers.raw
                                    if key.lower() not in HOP_BY_HOP - {b"content-length"} | OWN_HEADERS]})
            async for chunk in response.aiter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await response.aclose()

    async def _websocket(self, scope, receive, send):
        from websockets.asyncio.client import connect
        from websockets.exceptions import WebSocketException

        if (await receive())["type"] != "websocket.connect":
            return
        url = "ws" + self.upstream.removeprefix("http") + self._target(scope)
        try:
            upstream = await connect(url, subprotocols=scope.get("subprotocols") or None, max_size=None,
                                     open_timeout=10, proxy=None)
        except (OSError, WebSocketException, TimeoutError) as exc:
            log.warning("the Dagster webserver refused a WebSocket to %s: %s", scope["path"], exc)
            return await send({"type": "websocket.close", "code": 1011})
        await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})

        async def from_client():
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    await upstream.send(message["text"])
                elif message.get("bytes") is not None:
                    await upstream.send(message["bytes"])

        async def from_dagster():
            async for data in upstream:
                await send({"type": "websocket.send", **({"text": data} if isinstance(data, str) else {"bytes": data})})
            await send({"type": "websocket.close", "code": 1000})

        tasks = [asyncio.ensure_future(from_client()), asyncio.ensure_future(from_dagster())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await upstream.close()


def machine_names() -> set[str]:
    """The names a browser on the network may use for this machine (its host name, fully qualified too)."""
    names = {socket.gethostname().lower()}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass
    return names


def create_app(upstream: str, allowed_hosts: set[str]):
    """The guard in front of ``upstream``, answering Hosts in ``allowed_hosts`` (besides loopback names)."""
    app = DagsterForwarder(upstream)
    app = BodyLimit(app, max_upload_bytes=MAX_REQUEST_BYTES, max_request_bytes=MAX_REQUEST_BYTES)
    app = DriveByGuard(app, allowed_hosts=frozenset(allowed_hosts), enabled=lambda: True, what="the Dagster UI",
                       form_paths=(), body_types=("application/json",))
    return NoFraming(app)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="python -m api.dagster_proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", required=True, help="HOST:PORT the Dagster UI is served on")
    parser.add_argument("--upstream", required=True, help="the Dagster webserver's URL (a loopback address)")
    parser.add_argument("--allow-host", action="append", default=[], help="a Host name answered besides loopback")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    host = host.strip("[]")
    allowed = {name.lower() for name in args.allow_host} | machine_names()
    if host not in ("0.0.0.0", "::", ""):
        allowed.add(host.lower())
    uvicorn.run(create_app(args.upstream, allowed), host=host, port=int(port), log_level="warning",
                proxy_headers=False, server_header=False, ws_max_size=MAX_REQUEST_BYTES)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
