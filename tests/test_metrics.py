"""GET /metrics (issue 17): the platform in Prometheus' text format, read from the metadata DB when scraped,
so every API worker reports the same figures."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import api_client, chat_lines, jsonl
from vbatch_pipelines.store.models import DEFAULT_PROJECT

USE_KEY, ADMIN_KEY = "use-key-1", "admin-key-1"


def _app(**changes):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    return create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, **changes))


def _scrape(client, headers: dict | None = None) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def _sum(metrics: dict[tuple, float], name: str, **labels: str) -> float:
    """What PromQL's ``sum(name{labels})`` gives: the samples of ``name`` with those labels, whatever else."""
    return sum(value for (sample, *pairs), value in metrics.items()
               if sample == name and set(labels.items()) <= set(pairs))


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
    # everything here is the default project's: labelled so, and the platform's figures are the sums by project
    project = ("project", DEFAULT_PROJECT)
    assert metrics[("vbatch_batches", project, ("status", "completed"))] == 2
    assert metrics[("vbatch_batches", project, ("status", "validating"))] == 2
    assert metrics[("vbatch_batches", project, ("status", "failed"))] == 0
    assert metrics[("vbatch_batches_waiting", project)] == 1  # the held one is being run
    assert metrics[("vbatch_requests_total", model, ("outcome", "completed"), project)] == 7
    assert metrics[("vbatch_requests_total", model, ("outcome", "failed"), project)] == 1
    assert metrics[("vbatch_tokens_total", ("kind", "input"), model, project)] == 80
    assert metrics[("vbatch_tokens_total", ("kind", "output"), model, project)] == 32
    assert metrics[("vbatch_curation_tasks", project, ("state", "reviewed"))] == 2
    assert metrics[("vbatch_curation_tasks", project, ("state", "pending"))] == 1
    assert metrics[("vbatch_gold_stars", project)] == 1
    assert metrics[("vbatch_fine_tunes", project, ("status", "succeeded"))] == 1
    assert _sum(metrics, "vbatch_requests_total", model="vbatch-tiny-chat", outcome="completed") == 7
    node = platform.resources.inference_engine.node
    assert metrics[("vbatch_engine_up", model, ("node", node), ("url", "http://127.0.0.1:9"))] == 0  # process gone
    assert metrics[("vbatch_engine_up", model, ("node", "external"), ("url", elsewhere))] == 0  # not answering
    assert not any(name.startswith(("python_", "process_")) for name, *_ in metrics)  # per-worker figures


def test_metrics_need_a_key_when_keys_are_set(vbatch_home):
    with api_client(_app(api={"keys": (USE_KEY,)})) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "missing_api_key"
        scraped = _scrape(client, {"Authorization": f"Bearer {USE_KEY}"})
        assert scraped[("vbatch_batches", ("project", DEFAULT_PROJECT), ("status", "completed"))] == 0


def test_engine_addresses_are_for_admins_only(vbatch_home):
    """/metrics/targets names every engine's address (Prometheus finds them there): an admin key's, never a use
    key's (issue 30)."""
    with api_client(_app(api={"keys": (USE_KEY,), "admin_keys": (ADMIN_KEY,)})) as client:
        refused = client.get("/metrics/targets", headers={"Authorization": f"Bearer {USE_KEY}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        answered = client.get("/metrics/targets", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert answered.status_code == 200 and isinstance(answered.json(), list)


def _usage(db, project_id: str, *, minute: int, model: str = "vbatch-tiny-chat", kind: str = "completions",
           batch: bool = False, requests: int = 1, tokens: tuple[int, int] = (10, 5), seconds: float = 1.0,
           key: str | None = None) -> None:
    from vbatch_pipelines.store.models import UsageRecord

    with db.session() as session:
        session.add(UsageRecord(minute=minute // 60 * 60, kind=kind, project_id=project_id, api_key_id=key,
                                model=model, batch=batch, requests=requests, input_tokens=tokens[0],
                                output_tokens=tokens[1], engine_seconds=seconds))


def test_metrics_carry_each_projects_batches_and_usage_under_a_project_label(platform):
    """Issue 27: what belongs to a project is labelled with its id, so an operator sums by project; usage (batch
    and online, as the usage API counts it) is there per project, model, usage type and batch."""
    from vbatch_pipelines.batch.service import update_batch
    from vbatch_pipelines.projects import create_key, create_project
    from vbatch_pipelines.store.models import FineTuningJob, Owner

    db = platform.db
    team_a, team_b = create_project(db, "team-a"), create_project(db, "team-b")
    key_a, _ = create_key(db, team_a.id, "a-laptop", "ada@example.com")
    key_b, _ = create_key(db, team_b.id, "b-laptop", "bob@example.com")
    idle = create_project(db, "team-idle")  # nothing yet: zeros, so its series exist from the start
    for team, key, (completed, failed, tokens) in ((team_a, key_a, (3, 1, (30, 12))), (team_b, key_b, (5, 0, (70, 40)))):
        batch = platform.submit(jsonl(chat_lines(4, prefix=team.name)), owner=Owner(team.id, key.id))
        update_batch(db, batch.id, status="completed", model="vbatch-tiny-chat", request_completed=completed,
                     request_failed=failed, usage={"input_tokens": tokens[0], "output_tokens": tokens[1]})
    platform.submit(jsonl(chat_lines(2, prefix="b-waiting")), owner=Owner(team_b.id, key_b.id))
    now = int(time.time())
    with db.session() as session:
        session.add(FineTuningJob(id="ftjob-b", model="vbatch-tiny-chat", status="running", training_file="file-x",
                                  hyperparameters={}, seed=1, created_at=now, **Owner(team_b.id, key_b.id).columns()))
    # usage: A's batch and online chat, an old row (two days ago) and embeddings; B's online chat
    _usage(db, team_a.id, minute=now, batch=True, requests=4, tokens=(30, 12), seconds=20.0, key=key_a.id)
    _usage(db, team_a.id, minute=now - 120, requests=2, tokens=(8, 4), seconds=0.5, key=key_a.id)
    _usage(db, team_a.id, minute=now - 2 * 86400, requests=1, tokens=(2, 1), seconds=0.25, key=key_a.id)
    _usage(db, team_a.id, minute=now, model="vbatch-tiny-embed", kind="embeddings", requests=3, tokens=(9, 0),
           seconds=0.1, key=key_a.id)
    _usage(db, team_b.id, minute=now, requests=7, tokens=(100, 50), seconds=3.0, key=key_b.id)

    with api_client(_app(api={"admin_keys": (ADMIN_KEY,)})) as client:  # keys exist: /metrics takes one
        metrics = _scrape(client, {"Authorization": f"Bearer {ADMIN_KEY}"})
        again = _scrape(client, {"Authorization": f"Bearer {ADMIN_KEY}"})  # the kept usage sums give the same
    a, b = ("project", team_a.id), ("project", team_b.id)
    model = ("model", "vbatch-tiny-chat")
    assert metrics[("vbatch_batches", a, ("status", "completed"))] == 1
    assert metrics[("vbatch_batches", b, ("status", "completed"))] == 1
    assert metrics[("vbatch_batches", b, ("status", "validating"))] == 1
    assert metrics[("vbatch_batches", ("project", idle.id), ("status", "completed"))] == 0
    assert metrics[("vbatch_batches_waiting", a)] == 0 and metrics[("vbatch_batches_waiting", b)] == 1
    assert metrics[("vbatch_requests_total", model, ("outcome", "completed"), a)] == 3
    assert metrics[("vbatch_requests_total", model, ("outcome", "failed"), a)] == 1
    assert metrics[("vbatch_requests_total", model, ("outcome", "completed"), b)] == 5
    assert metrics[("vbatch_tokens_total", ("kind", "input"), model, a)] == 30
    assert metrics[("vbatch_tokens_total", ("kind", "output"), model, b)] == 40
    assert _sum(metrics, "vbatch_tokens_total", model="vbatch-tiny-chat", kind="input") == 100  # sum by (model)
    assert metrics[("vbatch_fine_tunes", b, ("status", "running"))] == 1
    assert metrics[("vbatch_fine_tunes", a, ("status", "running"))] == 0

    chat = {"model": "vbatch-tiny-chat", "usage": "completions"}
    assert _sum(metrics, "vbatch_usage_requests_total", project=team_a.id, **chat, batch="true") == 4
    assert _sum(metrics, "vbatch_usage_requests_total", project=team_a.id, **chat, batch="false") == 3
    assert _sum(metrics, "vbatch_usage_tokens_total", project=team_a.id, **chat, kind="input") == 40
    assert _sum(metrics, "vbatch_usage_tokens_total", project=team_a.id, **chat, kind="output") == 17
    assert _sum(metrics, "vbatch_usage_tokens_total", project=team_a.id, usage="embeddings", kind="input") == 9
    assert not _sum(metrics, "vbatch_usage_tokens_total", usage="embeddings", kind="output")  # none: input only
    assert _sum(metrics, "vbatch_usage_engine_seconds_total", project=team_a.id) == pytest.approx(20.85)
    assert _sum(metrics, "vbatch_usage_requests_total", project=team_b.id) == 7
    assert _sum(metrics, "vbatch_usage_tokens_total", project=team_b.id) == 150
    assert _sum(metrics, "vbatch_usage_engine_seconds_total", project=team_b.id) == 3.0
    assert _sum(metrics, "vbatch_usage_requests_total") == 17
    usage = {key: value for key, value in metrics.items() if key[0].startswith("vbatch_usage_")}
    assert usage == {key: value for key, value in again.items() if key[0].startswith("vbatch_usage_")}


def test_usage_totals_sum_old_rows_once_and_the_last_day_at_each_call(platform):
    """/metrics' usage counters do not re-read the whole usage table at each scrape: rows older than a day are
    summed once and kept, newer ones are summed each time; the totals are the table's all along."""
    from vbatch_pipelines.metrics import UsageTotals

    db, now = platform.db, int(time.time())
    totals = UsageTotals(db, settled_s=3600)
    _usage(db, "proj_x", minute=now - 7200, requests=1, tokens=(10, 1))
    _usage(db, "proj_x", minute=now - 60, requests=2, tokens=(20, 2))
    key = ("proj_x", "vbatch-tiny-chat", "completions", False)
    assert totals.totals(now)[key][:3] == (3, 30, 3)
    assert totals._settled[key][:3] == (1, 10, 1)  # the old row, kept
    _usage(db, "proj_x", minute=now, requests=4, tokens=(40, 4))  # a new row counts at the next call
    assert totals.totals(now)[key][:3] == (7, 70, 7)
    # an hour on, the recent rows are old too: moved into the kept sums, the totals unchanged
    assert totals.totals(now + 7200)[key][:3] == (7, 70, 7)
    assert totals._settled[key][:3] == (7, 70, 7)
    assert totals.totals(now + 7200)[key][:3] == (7, 70, 7)
