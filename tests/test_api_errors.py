"""Bad input at the front door: OpenAI-shaped errors, right status codes, nothing accepted lost.
(In-process app on a real metadata DB; Dagster is deliberately unreachable here.)"""

from __future__ import annotations

import time

import pytest

from tests.conftest import api_client, chat_lines, jsonl, openai_error


@pytest.fixture()
def client(vbatch_home):

    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    # Dagster where nothing listens; a small upload limit
    settings = load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, api={"max_upload_bytes": 4096})
    with api_client(create_app(settings)) as test_client:
        yield test_client


def _upload(client, data: bytes, purpose="batch"):
    return client.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose})


def test_file_errors(client):
    openai_error(_upload(client, b"{}", purpose="pictures"), 400, "invalid_value", "purpose")
    openai_error(_upload(client, b"x" * 5000), 413, "file_too_large", "file")
    openai_error(client.post("/v1/files", files={"purpose": (None, "batch")}), 400, param="file")
    openai_error(client.get("/v1/files/file-nope"), 404, "file_not_found")
    openai_error(client.get("/v1/files/file-nope/content"), 404, "file_not_found")
    openai_error(client.delete("/v1/files/file-nope"), 404, "file_not_found")
    openai_error(client.get("/v1/files", params={"after": "file-nope"}), 400, param="after")
    openai_error(client.get("/v1/files", params={"limit": 0}), 400, param="limit")
    assert client.get("/v1/files").json()["data"] == []  # the refused uploads left nothing behind


def test_batch_errors_and_deferred_launch(client):
    uploaded = _upload(client, jsonl(chat_lines(2))).json()
    openai_error(client.post("/v1/batches", json={"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}),
           404, "file_not_found", "input_file_id")
    openai_error(client.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/images"}),
           400, "invalid_value", "endpoint")
    openai_error(client.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions",
                                            "completion_window": "1h"}), 400, "invalid_value", "completion_window")
    openai_error(client.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions",
                                            "metadata": {f"k{i}": "v" for i in range(17)}}), 400, param="metadata")
    openai_error(client.post("/v1/batches", json={"input_file_id": uploaded["id"], "endpoint": "/v1/completions",
                                            "metadata": {"curation_schema": "nope"}}),
           400, "invalid_value", "metadata.curation_schema")  # refused now, not when its results are reviewed
    openai_error(client.post("/v1/batches", json={"endpoint": "/v1/completions"}), 400, param="input_file_id")
    openai_error(client.post("/v1/batches", content=b"not json", headers={"content-type": "application/json"}), 400)
    openai_error(client.get("/v1/batches/batch_nope"), 404, "batch_not_found")
    openai_error(client.get("/v1/batches", params={"limit": 101}), 400, param="limit")

    # Dagster is down: the batch is still accepted and recorded, waiting for the launch sensor.
    created = client.post("/v1/batches", json={"input_file_id": uploaded["id"],
                                               "endpoint": "/v1/chat/completions"})
    assert created.status_code == 200 and created.json()["status"] == "in_progress"  # validated inline
    batch_id = created.json()["id"]
    assert client.get(f"/v1/batches/{batch_id}").json()["id"] == batch_id
    openai_error(client.delete(f"/v1/files/{uploaded['id']}"), 409, "file_in_use", "file_id")

    # Cancelling a batch that never got a run ends it at once; a second cancel is a conflict.
    cancelled = client.post(f"/v1/batches/{batch_id}/cancel").json()
    assert cancelled["status"] == "cancelled" and cancelled["cancelling_at"] and cancelled["cancelled_at"]
    openai_error(client.post(f"/v1/batches/{batch_id}/cancel"), 409, "batch_not_cancellable")
    assert client.delete(f"/v1/files/{uploaded['id']}").json() == {"id": uploaded["id"], "object": "file",
                                                                   "deleted": True}


def test_inference_errors(client):
    openai_error(client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                      "content": "hi"}]}),
           404, "model_not_found", "model")
    openai_error(client.post("/v1/chat/completions", json={"messages": []}), 400, param="messages")
    openai_error(client.post("/v1/completions", json={"prompt": "x", "temperature": 7}), 400, param="temperature")
    openai_error(client.get("/v1/nothing-here"), 404)


def test_health_reports_dagster_down_but_stays_up(client):
    body = client.get("/health").json()
    assert body["dagster"] == "unknown"  # probed in the background, never in the request
    deadline = time.monotonic() + 10
    while body["dagster"] == "unknown" and time.monotonic() < deadline:
        time.sleep(0.1)
        body = client.get("/health").json()
    assert body["status"] == "ok" and body["database"] == "ok" and body["dagster"].startswith("unreachable")
    assert client.get("/docs").status_code == 200 and "/v1/batches" in client.get("/openapi.json").json()["paths"]


def test_small_files_are_validated_at_create_large_ones_by_batch_input(client):
    bad = _upload(client, jsonl(chat_lines(2)) + b"{oops\n").json()
    failed = client.post("/v1/batches", json={"input_file_id": bad["id"], "endpoint": "/v1/chat/completions"}).json()
    assert failed["status"] == "failed" and failed["failed_at"]
    assert [(e["code"], e["line"]) for e in failed["errors"]["data"]] == [("invalid_json_line", 3)]


    client.app.state.settings = client.app.state.settings.replace(api={"inline_validation_bytes": 10})
    good = _upload(client, jsonl(chat_lines(2))).json()
    waiting = client.post("/v1/batches", json={"input_file_id": good["id"], "endpoint": "/v1/chat/completions"})
    assert waiting.json()["status"] == "validating"  # left to batch_input (Dagster is down here)


def test_non_ascii_credentials_are_a_401_not_a_500(vbatch_home):

    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    settings = load_settings().replace(api={"keys": ("k1",)}, dagster={"url": "http://127.0.0.1:9"})
    with api_client(create_app(settings)) as client:
        for value in ("Bearer é".encode(), "Bearer k1é".encode("latin-1"), b"Bearer \xff\xfe"):
            openai_error(client.get("/v1/models", headers={"Authorization": value}), 401, "invalid_api_key")
        assert client.get("/v1/models", headers={"Authorization": "Bearer k1"}).status_code == 200
        webhook = client.post("/v1/webhooks/label-studio", json={"action": "ANNOTATION_CREATED"},
                              headers={"X-Vbatch-Webhook-Secret": "é".encode()})
        assert webhook.status_code == 401, webhook.text


def test_unknown_fields_on_vbatchs_own_routes_are_refused_naming_them(vbatch_home):
    """An older client's `{"is_gold_star": false}` used to be ignored, and the default (true) starred the task: a
    field vbatch's own routes do not know is a 400 naming it, and the task is left as it was."""

    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    # curation on (Label Studio is never reached: the body is refused first), Dagster where nothing listens
    app = create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, curation={
        "enabled": True, "label_studio_url": "http://127.0.0.1:9", "label_studio_token": "t"}))
    with api_client(app) as client:
        _refuse_unknown_fields(client, app.state.db)


def _refuse_unknown_fields(client, db) -> None:
    from vbatch_pipelines.store.models import CurationTask

    with db.session() as session:
        session.add(CurationTask(batch_id="batch_x", custom_id="c1", schema="chat_review", model="m",
                                 messages=[{"role": "user", "content": "q"}], response="a", ls_task_id=77,
                                 ls_project_id=1, created_at=int(time.time())))
    refused = client.post("/v1/curation/tasks/77/gold-star", json={"is_gold_star": False})
    error = openai_error(refused, 400, "unknown_field", "is_gold_star")
    assert "is_gold_star" in error["message"]
    with db.session() as session:
        task = session.query(CurationTask).filter_by(ls_task_id=77).one()
        assert task.gold_star is False and task.reviewed_at is None, "nothing was recorded"
    both = client.patch("/v1/curation/tasks/77/response", json={"response": "better", "answer": "x", "stars": 5})
    assert "answer, stars" in openai_error(both, 400, "unknown_field", "answer")["message"]
    for method, path, body, field in (
            ("post", "/v1/models", {"source": "owner/name", "trust_code": True}, "trust_code"),
            ("post", "/v1/models/ft:x/share", {"shared": True, "everyone": True}, "everyone"),
            ("post", "/v1/organization/projects", {"name": "p", "colour": "red"}, "colour"),
            ("post", "/v1/evals", {"name": "e", "source": {"type": "file", "file_id": "file-x", "path": "/etc"}},
             "source.path")):
        answer = getattr(client, method)(path, json=body)
        openai_error(answer, 400, "unknown_field", field)
