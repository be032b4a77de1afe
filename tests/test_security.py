"""Security (issue 14): what a key lets a client do, what reaches the host, bounded input, secrets kept.
Each test fails on the code before the protection it covers."""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import api_client

USE_KEY, ADMIN_KEY = "use-key-1", "admin-key-1"


def _app(**changes):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    return create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, **changes))


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _code(response, status: int) -> str:
    assert response.status_code == status, response.text
    return response.json()["error"]["code"]


# -- roles -----------------------------------------------------------------------------------------


@pytest.fixture()
def keyed(vbatch_home):
    with api_client(_app(api={"keys": (USE_KEY,), "admin_keys": (ADMIN_KEY,)})) as client:
        yield client


def test_a_use_key_uses_the_platform_but_cannot_install_or_delete_base_models(keyed, tiny_model_path, platform):
    from vbatch_pipelines.models.store import get_model

    assert keyed.get("/v1/models", headers=_bearer(USE_KEY)).status_code == 200
    chat = keyed.post("/v1/chat/completions", headers=_bearer(USE_KEY),
                      json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200, chat.text
    body = {"source": str(tiny_model_path), "id": "by-user"}
    assert _code(keyed.post("/v1/models", json=body, headers=_bearer(USE_KEY)), 403) == "admin_key_required"
    assert get_model(platform.db, "by-user") is None
    assert _code(keyed.post("/v1/models", json=body), 401) == "missing_api_key"
    assert _code(keyed.post("/v1/models", json=body, headers=_bearer("nope")), 401) == "invalid_api_key"

    installed = keyed.post("/v1/models", json={**body, "id": "by-admin"}, headers=_bearer(ADMIN_KEY))
    assert installed.status_code == 200 and installed.json()["status"] == "installing", installed.text
    platform.db.session  # the row is there; make it servable as installed_model would
    from vbatch_pipelines.models.store import upsert_model

    upsert_model(platform.db, "by-admin", status="ready")
    assert _code(keyed.delete("/v1/models/by-admin", headers=_bearer(USE_KEY)), 403) == "admin_key_required"
    assert get_model(platform.db, "by-admin").status == "ready"
    assert keyed.delete("/v1/models/by-admin", headers=_bearer(ADMIN_KEY)).status_code == 200
    assert (tiny_model_path / "config.json").exists()


def test_local_sources_only_from_the_allowed_directories_and_nothing_said_about_others(keyed, tmp_path):
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    answers = set()
    for source in ("/etc", str(outside), "/no/such/dir", "~nosuchuser-vbatch/model", "/etc/../etc/passwd"):
        response = keyed.post("/v1/models", json={"source": source, "id": "probe"}, headers=_bearer(ADMIN_KEY))
        assert _code(response, 403) == "source_not_allowed", source
        answers.add(response.json()["error"]["message"])
    assert len(answers) == 1, "the refusal is the same whether the directory exists or not"


def test_the_default_model_sources_are_the_homes_models_directory(vbatch_home, monkeypatch, tiny_model_path):
    import shutil

    from vbatch_pipelines.settings import load_settings

    monkeypatch.delenv("VBATCH_MODEL_SOURCES")
    settings = load_settings()
    assert settings.registry.model_sources == [str((vbatch_home / "models").resolve())]
    inside = vbatch_home / "models" / "copied"
    shutil.copytree(tiny_model_path, inside)
    with api_client(_app(registry={"model_sources": settings.registry.model_sources})) as client:
        assert _code(client.post("/v1/models", json={"source": str(tiny_model_path), "id": "a"}), 403) == \
            "source_not_allowed"
        assert client.post("/v1/models", json={"source": str(inside), "id": "b"}).status_code == 200


def test_remote_code_needs_an_admin_key_and_the_servers_switch(vbatch_home, tiny_model_path):
    body = {"source": str(tiny_model_path), "id": "remote", "trust_remote_code": True}
    with api_client(_app(api={"keys": (USE_KEY,), "admin_keys": (ADMIN_KEY,)})) as client:
        assert _code(client.post("/v1/models", json=body, headers=_bearer(USE_KEY)), 403) == "admin_key_required"
        assert _code(client.post("/v1/models", json=body, headers=_bearer(ADMIN_KEY)), 403) == "remote_code_disabled"
    keys = {"keys": (USE_KEY,), "admin_keys": (ADMIN_KEY,)}
    with api_client(_app(api=keys, registry={"allow_remote_code": True})) as client:
        assert _code(client.post("/v1/models", json=body, headers=_bearer(USE_KEY)), 403) == "admin_key_required"
        allowed = client.post("/v1/models", json=body, headers=_bearer(ADMIN_KEY))
        assert allowed.status_code == 200 and allowed.json()["status"] == "installing", allowed.text


def test_the_allow_remote_code_switch_is_checked_at_start(monkeypatch, vbatch_home):
    from vbatch_pipelines.settings import SettingsError, load_settings

    monkeypatch.setenv("VBATCH_ALLOW_REMOTE_CODE", "maybe")
    with pytest.raises(SettingsError, match="VBATCH_ALLOW_REMOTE_CODE"):
        load_settings()


# -- drive-by requests (no keys) -------------------------------------------------------------------


def test_without_keys_foreign_hosts_origins_and_form_posts_are_refused(vbatch_home):
    from fastapi.testclient import TestClient

    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with api_client(_app()) as local:
        assert local.post("/v1/chat/completions", json=chat).status_code == 200
        assert _code(local.post("/v1/chat/completions", json=chat, headers={"Host": "evil.example"}), 403) == \
            "host_not_allowed"  # DNS rebinding: a page at evil.example resolving to 127.0.0.1
        assert _code(local.post("/v1/chat/completions", json=chat, headers={"Origin": "https://evil.example"}),
                     403) == "origin_not_allowed"
        assert _code(local.get("/v1/models", headers={"Origin": "null"}), 403) == "origin_not_allowed"
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            response = local.post("/v1/chat/completions", content=json.dumps(chat),
                                  headers={"Content-Type": content_type})
            assert _code(response, 415) == "unsupported_media_type"
        no_type = local.post("/v1/batches/batch_x/cancel", content=b"{}", headers={"Content-Type": ""})
        assert _code(no_type, 415) == "unsupported_media_type"
        assert local.post("/v1/chat/completions", json=chat, headers={"Origin": "http://localhost:4080"}).status_code == 200
    with TestClient(_app(api={"allowed_hosts": ("vbatch.lan",)}), base_url="http://vbatch.lan") as named:
        assert named.get("/v1/models").status_code == 200
    with TestClient(_app(api={"keys": (USE_KEY,)}), base_url="http://vbatch.example.com") as keyed:
        assert keyed.get("/v1/models", headers=_bearer(USE_KEY)).status_code == 200  # keys: any host


def test_up_refuses_the_network_without_keys_and_keeps_dagster_local(vbatch_home, monkeypatch):
    from vbatch_pipelines.exposure import Addresses, ExposureError
    from vbatch_pipelines.settings import load_settings

    settings = load_settings()
    with pytest.raises(ExposureError, match="VBATCH_API_KEYS"):
        Addresses("0.0.0.0", 4080, 3000).check(settings)
    keyed = settings.replace(api={"keys": (USE_KEY,)})
    exposed = Addresses("0.0.0.0", 4080, 3000)
    assert exposed.dagster_host == "127.0.0.1" and "stays on 127.0.0.1" in exposed.check(keyed)[0]
    opted = Addresses("0.0.0.0", 4080, 3000, expose_dagster=True)
    assert opted.dagster_host == "0.0.0.0" and "without authentication" in opted.check(keyed)[0]
    assert Addresses("127.0.0.1", 4080, 3000).check(settings) == []

    started = time.monotonic()
    up = subprocess.run([sys.executable, "-m", "vbatch_pipelines.cli", "up", "--host", "0.0.0.0", "--no-engine"],
                        capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert up.returncode == 2 and "VBATCH_API_KEYS" in up.stderr, up.stderr
    assert time.monotonic() - started < 60 and not (vbatch_home / "dagster").exists(), "nothing was started"


# -- bounded input ---------------------------------------------------------------------------------


@pytest.fixture()
def live_api(vbatch_home):
    """The API as uvicorn serves it, in its own process (its memory measured), with a 1 MiB upload limit and
    a 64 KiB request limit."""
    import psutil

    from vbatch_pipelines.net import free_port, wait_http

    port = free_port()
    env = dict(os.environ, VBATCH_MAX_UPLOAD_BYTES=str(1 << 20), VBATCH_MAX_REQUEST_BYTES=str(64 << 10),
               VBATCH_DAGSTER_URL="http://127.0.0.1:9")
    process = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host",
                                "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env)
    try:
        assert wait_http(f"http://127.0.0.1:{port}/health", 60)
        yield port, psutil.Process(process.pid)
    finally:
        process.terminate()
        process.wait(30)


def _stream(port: int, head: str, chunks, limit_bytes: int) -> tuple[int | None, int]:
    """Send ``head`` then the chunked body until the server answers (or closes); returns (status, sent)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sock.sendall(head.encode())
    sent, answer = 0, b""
    try:
        for chunk in chunks:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable or sent > limit_bytes:
                break
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        answer = sock.recv(4096)
    except (BrokenPipeError, ConnectionResetError):
        try:
            answer = sock.recv(4096)
        except OSError:
            answer = b""
    finally:
        sock.close()
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    return status, sent


def _declared(port: int, path: str, content_type: str, length: int, first: bytes) -> tuple[int, bytes]:
    """A request that declares a ``length``-byte body and sends only its ``first`` bytes: the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
                     f"Content-Length: {length}\r\n\r\n".encode() + first)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def _length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def test_a_2gib_chunked_upload_is_refused_once_over_the_limit_with_memory_flat(live_api):
    import httpx

    port, server = live_api
    before = server.memory_info().rss
    boundary = "vbatchboundary"
    preamble = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
                f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()
    head = ("POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n")
    megabyte = b"x" * (1 << 20)
    chunks = [preamble] + [megabyte] * 2048  # 2 GiB, never all sent
    status, sent = _stream(port, head, iter(chunks), limit_bytes=256 << 20)
    assert status in (413, None) and sent < 256 << 20, (status, sent)  # the server stopped reading early
    assert server.memory_info().rss - before < 64 << 20, "the server's memory stayed flat"
    files = httpx.get(f"http://127.0.0.1:{port}/v1/files").json()["data"]
    assert files == [], "nothing of the refused upload was kept"
    # Declared up front, the same upload is refused before a byte of it is read, with a 413.
    status, body = _declared(port, "/v1/files", f"multipart/form-data; boundary={boundary}", 2 << 30, preamble)
    assert status == 413 and json.loads(body)["error"]["code"] == "file_too_large"


def test_a_1gib_json_body_is_refused_early(live_api):
    port, server = live_api
    status, body = _declared(port, "/v1/chat/completions", "application/json", 1 << 30, b'{"messages": [')
    assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
    head = ("POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/json\r\n\r\n")
    chunks = [b'{"messages": [{"role": "user", "content": "'] + [b"y" * 65536] * (1 << 14)  # 1 GiB
    before = server.memory_info().rss
    status, sent = _stream(port, head, iter(chunks), limit_bytes=128 << 20)
    assert status in (413, None) and sent < 128 << 20, (status, sent)
    assert server.memory_info().rss - before < 64 << 20


def test_sampling_parameters_and_request_shapes_are_capped(vbatch_home):
    def chat(**body):
        return {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **body}

    with api_client(_app()) as client:
        assert _code(client.post("/v1/chat/completions", json=chat(n=10_000)), 400) == "invalid_request"
        too_long = client.post("/v1/chat/completions", json=chat(max_tokens=10**6))
        assert _code(too_long, 400) == "context_length_exceeded" and "1024" in too_long.text
        assert _code(client.post("/v1/completions", json={"prompt": "a", "max_completion_tokens": 2, "n": 1,
                                                          "max_tokens": 5000}), 400) in ("context_length_exceeded",
                                                                                          "invalid_request")
        assert _code(client.post("/v1/completions", json={"prompt": ["a"] * 3000, "max_tokens": 2}), 400) == \
            "invalid_request"
        assert _code(client.post("/v1/completions", json={"prompt": ["a"] * 100, "n": 100, "max_tokens": 2}),
                     400) == "invalid_request"
        assert _code(client.post("/v1/completions", json={"prompt": "a", "n": 4, "best_of": 2}), 400) == \
            "invalid_request"
        many = [{"role": "user", "content": "hi"}] * 3000
        assert _code(client.post("/v1/chat/completions", json={"messages": many}), 400) == "invalid_request"
        for field in ("chat_template", "logits_processors", "kv_transfer_params", "no_such_field"):
            refused = client.post("/v1/chat/completions", json=chat(**{field: "x"}))
            assert _code(refused, 400) == "invalid_request"
            assert refused.json()["error"]["message"].endswith(f"Unrecognized request argument supplied: {field}")
        assert client.post("/v1/chat/completions", json=chat(top_k=5, seed=1)).status_code == 200
        # vLLM's removed guided-decoding fields would be answered unconstrained: refused, saying what replaces them
        for field, instead in (("guided_json", '{"json"'), ("guided_choice", '{"choice"'), ("guided_regex", '{"regex"')):
            refused = client.post("/v1/chat/completions", json=chat(**{field: ["a"]}))
            assert _code(refused, 400) == "invalid_request" and instead in refused.json()["error"]["message"]


def test_an_unknown_field_in_a_batch_line_fails_validation_naming_the_line(platform):
    """As OpenAI's Batch API: the file is refused at validation, each bad line named; nothing reaches the engine."""
    from tests.conftest import chat_line, jsonl

    lines = [chat_line("ok", "hi"), chat_line("bad", "hi", chat_template="{{ 7*7 }}"),
             chat_line("old", "hi", guided_json={"type": "object"})]
    batch = platform.submit(jsonl(lines))
    assert not platform.materialize(batch.id, raise_on_error=False).success
    failed = platform.batch(batch.id)
    assert failed.status == "failed" and failed.request_completed == 0
    errors = failed.to_openai()["errors"]["data"]
    assert [(e["line"], e["param"]) for e in errors] == [(2, "body"), (3, "body")]
    assert "chat_template" in errors[0]["message"] and "structured_outputs" in errors[1]["message"]


# -- secrets ---------------------------------------------------------------------------------------


def test_error_bodies_carry_no_internals(vbatch_home, monkeypatch):
    import logging

    from resources.model_registry import ModelRegistry

    def broken(self):
        raise RuntimeError("password=hunter2 at /srv/secret/path")

    class Records(logging.Handler):
        records: list[logging.LogRecord] = []

        def emit(self, record):
            self.records.append(record)

    monkeypatch.setattr(ModelRegistry, "served_models", broken)
    handler = Records()
    logging.getLogger("vbatch.api").addHandler(handler)
    try:
        with api_client(_app(), raise_server_exceptions=False) as client:
            response = client.get("/v1/models")
    finally:
        logging.getLogger("vbatch.api").removeHandler(handler)
    assert response.status_code == 500
    error = response.json()["error"]
    assert "hunter2" not in response.text and "/srv" not in response.text and "RuntimeError" not in response.text
    assert error["code"] == "internal_error" and error["message"].startswith("Internal error (err_")
    incident = error["message"].split("(", 1)[1].split(")", 1)[0]
    assert any(incident in r.getMessage() and r.exc_info for r in handler.records), "logged with its id"


def test_child_processes_get_no_secrets_they_do_not_need(vbatch_home, monkeypatch, tmp_path):
    from resources.trainer import _training_env
    from vbatch_pipelines.child_env import without_api_keys
    from vbatch_pipelines.curation.server import ManagedLabelStudio
    from vbatch_pipelines.engine.vllm_server import ManagedVLLMServer, VLLMServerConfig
    from vbatch_pipelines.models.registry import ModelSpec

    secrets = {"VBATCH_API_KEYS": "k1", "VBATCH_ADMIN_KEYS": "a1", "HF_TOKEN": "hf_x", "VBATCH_WEBHOOK_SECRET": "w",
               "VBATCH_DATABASE_URL": "postgresql://u:p@h/db", "VBATCH_LABEL_STUDIO_TOKEN": "t",
               "AWS_SECRET_ACCESS_KEY": "s", "PGPASSWORD": "p"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    engine_env = ManagedVLLMServer(ModelSpec("m", str(tmp_path)), tmp_path, VLLMServerConfig(sys.executable)).env()
    trainer_env = _training_env({"DAGSTER_PIPES_CONTEXT": "c"})
    label_studio = ManagedLabelStudio(tmp_path / "ls", tmp_path / "envs", 1)
    label_studio_env = label_studio.env()
    for env in (engine_env, trainer_env, label_studio_env):
        assert not set(secrets) & set(env), set(secrets) & set(env)
        assert env["PATH"] == os.environ["PATH"]
    assert trainer_env["DAGSTER_PIPES_CONTEXT"] == "c" and engine_env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert label_studio_env["LABEL_STUDIO_PASSWORD"] == label_studio.credentials()["password"]  # its own, given
    dagster_env = without_api_keys(dict(os.environ))
    assert "VBATCH_API_KEYS" not in dagster_env and "VBATCH_ADMIN_KEYS" not in dagster_env
    assert dagster_env["VBATCH_DATABASE_URL"] and dagster_env["HF_TOKEN"]  # runs need these


# -- the webhook -----------------------------------------------------------------------------------


def test_a_replayed_older_webhook_event_leaves_the_newer_review(vbatch_home, monkeypatch, platform):
    from vbatch_pipelines.curation.schemas import annotation_result
    from vbatch_pipelines.store.models import CurationTask

    monkeypatch.setenv("VBATCH_CURATION", "on")
    monkeypatch.setenv("VBATCH_LABEL_STUDIO_URL", "http://127.0.0.1:9")  # not called: events come in
    monkeypatch.setenv("VBATCH_LABEL_STUDIO_TOKEN", "unused")
    monkeypatch.setenv("VBATCH_WEBHOOK_SECRET", "hook-secret")
    platform.db.upgrade()
    with platform.db.session() as session:
        session.add(CurationTask(batch_id="batch_1", custom_id="r-1", schema="chat_quality", model="m",
                                 messages=[{"role": "user", "content": "q"}], response="a", ls_task_id=41,
                                 created_at=int(time.time())))

    def event(updated_at: str, gold: bool, action="ANNOTATION_UPDATED") -> dict:
        return {"action": action, "task": {"id": 41}, "project": {"id": 1},
                "annotation": {"id": 7, "updated_at": updated_at, "completed_by": 1,
                               "result": annotation_result(None, 5 if gold else 1, gold)}}

    def task() -> CurationTask:
        with platform.db.session() as session:
            return session.query(CurationTask).filter_by(ls_task_id=41).one()

    secret = {"X-Vbatch-Webhook-Secret": "hook-secret"}
    older, newer = event("2026-11-27T10:00:00.100000Z", True), event("2026-11-27T11:00:00.150000+01:00", False)
    newest = event("2026-11-27T10:00:00.200000Z", True)  # later than `newer` once both are in UTC
    with api_client(_app()) as client:
        assert client.post("/v1/webhooks/label-studio", json=older, headers=secret).json()["changed_tasks"] == [41]
        assert task().gold_star
        assert client.post("/v1/webhooks/label-studio", json=newer, headers=secret).json()["changed_tasks"] == [41]
        assert not task().gold_star
        replay = client.post("/v1/webhooks/label-studio", json=older, headers=secret)  # Label Studio retried
        assert replay.status_code == 200 and replay.json()["changed_tasks"] == []
        assert not task().gold_star and task().rating == 1, "the newer review stands"
        assert client.post("/v1/webhooks/label-studio", json=newest, headers=secret).json()["changed_tasks"] == [41]
        assert task().gold_star
        assert _code(client.post("/v1/webhooks/label-studio", json=older), 401) == "invalid_webhook_secret"
        assert _code(client.post("/v1/webhooks/label-studio", json=older,
                                 headers={"X-Vbatch-Webhook-Secret": "wrong"}), 401) == "invalid_webhook_secret"


@pytest.mark.parametrize("path, headers", [
    ("/v1/files", {}),                                             # no key
    ("/v1/files", {"authorization": "Bearer wrong-key"}),          # a wrong key
    ("/ui/batches", {"cookie": "vbatch_console=wrong-key"}),       # a console form without a login
])
def test_a_request_without_a_valid_key_is_refused_before_its_body_is_read(vbatch_home, monkeypatch, path, headers):
    """An anonymous client must not make vbatch read (and parse) a body of up to 512 MiB: the key is checked from
    the headers first, and the body is never received."""
    import asyncio

    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    monkeypatch.setenv("VBATCH_API_KEYS", "the-right-key")
    app = create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}))
    reads, sent = [], []
    body = b"x" * (1 << 20)

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": body, "more_body": len(reads) < 64}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "scheme": "http", "server": ("127.0.0.1", 4080), "client": ("127.0.0.1", 5555),
             "http_version": "1.1", "asgi": {"version": "3.0"},
             "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"multipart/form-data; boundary=zz"),
                         (b"content-length", str(64 << 20).encode()),
                         *((k.encode(), v.encode()) for k, v in headers.items())]}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    assert status == (303 if path.startswith("/ui") else 401), sent[:1]
    assert reads == [], f"{len(reads)} MiB of an anonymous body were read"
