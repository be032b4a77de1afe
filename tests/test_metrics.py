"""GET /metrics (issue 17): the platform in Prometheus' text format, read from the metadata DB when scraped,
so every API worker reports the same figures."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

from tests.conftest import api_client, chat_lines, jsonl

USE_KEY = "use-key-1"


def _app(**changes):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    return create_app(dataclasses.replace(load_settings(), dagster_url="http://127.0.0.1:9", **changes))


def _scrape(client, headers: dict | None = None) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_report_batches_requests_tokens_reviews_fine_tunes_and_engines(platform):
    from vbatch_pipelines.batch.service import update_batch
    from vbatch_pipelines.engine.registry import EngineRegistry
    from vbatch_pipelines.net import free_port
    from vbatch_pipelines.store.models import CurationTask, FineTuningJob

    db = platform.db
    done = [platform.submit(jsonl(chat_lines(n, prefix=f"m{n}"))) for n in (3, 5)]
    for batch, (completed, failed, tokens) in zip(done, ((3, 0, (30, 12)), (4, 1, (50, 20)))):
        update_batch(db, batch.id, status="completed", model="vbatch-tiny-chat", request_completed=completed,
                     request_failed=failed,
                     usage={"input_tokens": tokens[0], "output_tokens": tokens[1], "total_tokens": sum(tokens)})
    platform.submit(jsonl(chat_lines(2, prefix="waiting")))  # accepted, no run has it yet
    held = platform.submit(jsonl(chat_lines(2, prefix="held")))
    update_batch(db, held.id, lease_owner="run@elsewhere:1", lease_until=time.time() + 60)
    now = int(time.time())
    with db.session() as session:
        for n, (annotated, gold) in enumerate(((True, True), (True, False), (False, False))):
            session.add(CurationTask(batch_id=done[0].id, custom_id=f"m3-{n}", schema="chat", messages=[],
                                     response="r", annotated=annotated, gold_star=gold, created_at=now))
        session.add(FineTuningJob(id="ftjob-metrics", model="vbatch-tiny-chat", status="succeeded",
                                  training_file="file-x", hyperparameters={}, seed=1, created_at=now))
    engines = platform.file_store.engines_dir
    engines.mkdir(parents=True, exist_ok=True)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (engines / "vbatch-tiny-chat.json").write_text(json.dumps({"model": "vbatch-tiny-chat", "port": 9,
                                                               "pid": gone.pid}))
    # A replica of the same model running elsewhere, which the registry knows and which does not answer now.
    elsewhere = f"http://127.0.0.1:{free_port()}"
    EngineRegistry(db).record(id="ext:metrics", model="vbatch-tiny-chat", base_url=elsewhere, node="external",
                              kind="external")

    with api_client(_app()) as client:
        metrics = _scrape(client)
    model = ("model", "vbatch-tiny-chat")
    assert metrics[("vbatch_batches", ("status", "completed"))] == 2
    assert metrics[("vbatch_batches", ("status", "validating"))] == 2
    assert metrics[("vbatch_batches", ("status", "failed"))] == 0
    assert metrics[("vbatch_batches_waiting",)] == 1  # the held one is being run
    assert metrics[("vbatch_requests_total", model, ("outcome", "completed"))] == 7
    assert metrics[("vbatch_requests_total", model, ("outcome", "failed"))] == 1
    assert metrics[("vbatch_tokens_total", ("kind", "input"), model)] == 80
    assert metrics[("vbatch_tokens_total", ("kind", "output"), model)] == 32
    assert metrics[("vbatch_curation_tasks", ("state", "reviewed"))] == 2
    assert metrics[("vbatch_curation_tasks", ("state", "pending"))] == 1
    assert metrics[("vbatch_gold_stars",)] == 1
    assert metrics[("vbatch_fine_tunes", ("status", "succeeded"))] == 1
    node = platform.resources["inference_engine"].node
    assert metrics[("vbatch_engine_up", model, ("node", node), ("url", "http://127.0.0.1:9"))] == 0  # process gone
    assert metrics[("vbatch_engine_up", model, ("node", "external"), ("url", elsewhere))] == 0  # not answering
    assert not any(name.startswith(("python_", "process_")) for name, *_ in metrics)  # per-worker figures


def test_metrics_need_a_key_when_keys_are_set(vbatch_home):
    with api_client(_app(api_keys=(USE_KEY,))) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
        assert _scrape(client, {"Authorization": f"Bearer {USE_KEY}"})[("vbatch_batches", ("status", "completed"))] == 0
