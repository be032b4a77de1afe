"""Fixed evaluation sets in process: an admin freezes a set (from a dataset version's eval split or a file), nothing
later changes it, each (set, model) is a partition of ``eval_score``, the leaderboard ranks the base model and
two fine-tunes, the console shows it, and a retrain can be gated on the set instead of its own split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import api_client
from tests.test_fine_tuning import FAST, build_dataset, create, example, record_gold_stars, run_job, upload
from vbatch_pipelines.models.registry import TINY_MODEL_ID

USE_KEY, ADMIN_KEY = "evals-use-key", "evals-admin-key"


def _app(monkeypatch):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    monkeypatch.setenv("VBATCH_API_KEYS", USE_KEY)
    monkeypatch.setenv("VBATCH_ADMIN_KEYS", ADMIN_KEY)
    return create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}))


def _auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def score(platform, eval_id: str, model: str):
    """The (set, model) partition materialized as the eval job does."""
    from dagster import DagsterInstance, MultiPartitionKey, materialize

    from vbatch_pipelines.defs.evals import eval_score
    from vbatch_pipelines.partitions import eval_model_partitions, eval_set_partitions

    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(eval_set_partitions.name, [eval_id])
        instance.add_dynamic_partitions(eval_model_partitions.name, [model])
        return materialize([eval_score], partition_key=MultiPartitionKey({"eval_set": eval_id, "model": model}),
                           resources=platform.resources, instance=instance, raise_on_error=False)


def test_an_admin_freezes_a_set_that_nothing_later_changes(platform, monkeypatch):
    from vbatch_pipelines.store.models import File

    platform.db.upgrade()
    record_gold_stars(platform, 60)
    dataset = build_dataset(platform)
    chat = upload(platform, [example(900 + i) for i in range(5)])
    broken = upload(platform, b'{"messages": [{"role": "user", "content": "no answer"}]}\n')
    with api_client(_app(monkeypatch)) as client:
        refused = client.post("/v1/evals", json={"name": "geo", "source": {"type": "dataset", "version": dataset.version}},
                              headers=_auth(USE_KEY))
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "admin_key_required"
        made = client.post("/v1/evals", json={"name": "geo", "source": {"type": "dataset", "version": dataset.version}},
                           headers=_auth(ADMIN_KEY))
        assert made.status_code == 200, made.text
        frozen = made.json()
        assert frozen["items"] == dataset.eval_examples and frozen["object"] == "eval"
        from_file = client.post("/v1/evals", json={"name": "held-out file", "source": {"type": "file", "file_id": chat.id}},
                                headers=_auth(ADMIN_KEY)).json()
        assert from_file["items"] == 5
        for body, status, param in (
                ({"name": "x", "source": {"type": "dataset", "version": "v999"}}, 404, "source.version"),
                ({"name": "x", "source": {"type": "file", "file_id": broken.id}}, 400, "source.file_id"),
                ({"name": "x", "source": {"type": "url", "file_id": chat.id}}, 400, "source.type"),
                ({"name": "x", "source": {"type": "file", "file_id": chat.id}, "items": []}, 400, "items")):
            answer = client.post("/v1/evals", json=body, headers=_auth(ADMIN_KEY))
            assert answer.status_code == status and answer.json()["error"]["param"] == param, (body, answer.text)
        assert "line 1:" in client.post("/v1/evals", json={"name": "x", "source": {"type": "file", "file_id": broken.id}},
                                        headers=_auth(ADMIN_KEY)).json()["error"]["message"]
        listed = client.get("/v1/evals", headers=_auth(USE_KEY)).json()
        assert {e["id"] for e in listed["data"]} == {from_file["id"], frozen["id"]}

        # Frozen: a new dataset version, or the uploaded file changing, leaves the set as it was.
        record_gold_stars(platform, 20, start=2000)
        assert build_dataset(platform).version != dataset.version
        Path(platform.db.get(File, chat.id).path).write_text("")
        again = client.get(f"/v1/evals/{frozen['id']}", headers=_auth(USE_KEY)).json()
        assert again["items"] == frozen["items"] and again["fingerprint"] == frozen["fingerprint"]
        assert client.get(f"/v1/evals/{from_file['id']}", headers=_auth(USE_KEY)).json()["items"] == 5

    # Its items file edited behind vbatch's back: scoring refuses instead of ranking models on other questions.
    from vbatch_pipelines import evals

    record = evals.get_eval_set(platform.db, from_file["id"])
    Path(record.path).write_text(Path(record.path).read_text().replace("Paris", "Lyon"))
    result = score(platform, record.id, TINY_MODEL_ID)
    assert not result.success
    failed = evals.runs_of(platform.db, record.id)[0]
    assert failed.status == "failed" and "changed on disk" in failed.error["message"]


def test_a_leaderboard_over_the_base_model_and_two_fine_tunes(platform, monkeypatch):
    from vbatch_pipelines import evals
    from vbatch_pipelines.fine_tuning.service import get_job

    platform.db.upgrade()
    held_out = upload(platform, [example(100 + i) for i in range(6)])
    record = evals.create_eval_set(platform.db, platform.file_store.evals_dir, name="capitals",
                                   source={"type": "file", "file_id": held_out.id})
    train = upload(platform, [example(i) for i in range(30)])
    tuned = {}
    for suffix, epochs in (("weak", 1), ("strong", FAST["n_epochs"])):
        job = create(platform, training_file=train.id, suffix=suffix, seed=7,
                     hyperparameters={**FAST, "n_epochs": epochs})
        assert run_job(platform, job.id).success
        tuned[suffix] = get_job(platform.db, job.id).fine_tuned_model
    platform.configure("retraining_policy", judge_model=TINY_MODEL_ID)  # the tiny model judges (its verdicts are noise)
    for model in (TINY_MODEL_ID, tuned["weak"], tuned["strong"]):
        result = score(platform, record.id, model)
        assert result.success
        metadata = result.asset_materializations_for_node("eval_score")[0].metadata
        assert metadata["model"].value == model and metadata["eval_id"].value == record.id

    board = evals.leaderboard(platform.db, record.id)
    assert [row["model"] for row in board][0] == tuned["strong"] and board[-1]["model"] == TINY_MODEL_ID
    assert {row["model"] for row in board} == {TINY_MODEL_ID, *tuned.values()}
    assert board[0]["normalized_match"] == 1.0 and board[-1]["normalized_match"] == 0.0, [
        (run.model, run.rows[:2]) for run in evals.runs_of(platform.db, record.id)]
    assert all(row["examples"] == 6 for row in board)
    assert all(sum(row["judge_verdicts"].values()) == 12 for row in board), "each answer judged in both orders"
    print("\nleaderboard: " + ", ".join(f"{row['model']} {row['normalized_match']}" for row in board))

    # Scored again: the leaderboard keeps each model's latest score, once.
    assert score(platform, record.id, TINY_MODEL_ID).success
    assert len(evals.leaderboard(platform.db, record.id)) == 3
    assert len(evals.runs_of(platform.db, record.id)) == 4

    with api_client(_app(monkeypatch)) as client:
        api = client.get(f"/v1/evals/{record.id}/leaderboard", headers=_auth(USE_KEY)).json()
        assert [row["model"] for row in api["data"]] == [row["model"] for row in evals.leaderboard(platform.db,
                                                                                                  record.id)]
        runs = client.get(f"/v1/evals/{record.id}/runs", headers=_auth(USE_KEY)).json()["data"]
        assert len(runs) == 4 and all(run["status"] == "completed" for run in runs)
        one = client.get(f"/v1/evals/{record.id}/runs/{runs[0]['id']}", headers=_auth(USE_KEY)).json()
        assert one["scores"]["examples"] == 6 and len(one["rows"]) == 6
        assert client.get(f"/v1/evals/{record.id}/runs/evalrun_missing", headers=_auth(USE_KEY)).status_code == 404
        missing = client.post(f"/v1/evals/{record.id}/runs", json={"model": "no-such-model"}, headers=_auth(USE_KEY))
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"

        client.post("/ui/login", data={"key": USE_KEY, "next": "/ui/evals"}, headers={"Origin": "http://127.0.0.1"})
        listing = client.get("/ui/evals").text
        assert f'href="/ui/evals/{record.id}"' in listing and "capitals" in listing
        page = client.get(f"/ui/evals/{record.id}").text
        assert "6 frozen items" in page and '<td class="num">6</td>' in listing
        shown = [line.split('class="model">', 1)[1].split("<", 1)[0] for line in page.splitlines()
                 if 'class="model">' in line]
        assert shown == [row["model"] for row in api["data"]]
        assert "There is no evaluation set" in client.get("/ui/evals/eval_nope").text


def test_a_retrain_can_be_gated_on_a_fixed_set_instead_of_its_own_split(platform):
    from vbatch_pipelines import evals
    from vbatch_pipelines.fine_tuning.service import get_job

    platform.db.upgrade()
    record_gold_stars(platform, 40)
    dataset = build_dataset(platform)
    held_out = upload(platform, [example(800 + i) for i in range(3)])
    record = evals.create_eval_set(platform.db, platform.file_store.evals_dir, name="fixed",
                                   source={"type": "file", "file_id": held_out.id})
    platform.configure("retraining_policy", eval_set=record.id, judge_model=TINY_MODEL_ID)
    job = create(platform, training_file=dataset.version, hyperparameters=FAST, trigger="schedule", deploy="no_worse")
    assert run_job(platform, job.id).success
    done = get_job(platform.db, job.id)
    assert done.comparison["eval_set"] == record.id and done.comparison["examples"] == 3 != dataset.eval_examples
    assert done.deployed, done.deployment
    board = evals.leaderboard(platform.db, record.id)
    assert {row["model"] for row in board} == {TINY_MODEL_ID, done.fine_tuned_model}
    assert "judge_win_rate" in done.comparison["fine_tuned"] and not any("judge_win_rate" in row for row in board), \
        "the comparison's judge compares the two models, not each with gold: it stays out of the leaderboard"
    # An API job keeps its own split.
    api_job = create(platform, training_file=dataset.version, hyperparameters={**FAST, "n_epochs": 1})
    assert run_job(platform, api_job.id).success
    assert get_job(platform.db, api_job.id).comparison["eval_set"] is None


@pytest.mark.parametrize("model", ["a|b"])
def test_a_model_name_that_cannot_be_a_partition_key_is_refused(platform, model):
    from vbatch_pipelines import evals

    platform.db.upgrade()
    held_out = upload(platform, [example(1)])
    record = evals.create_eval_set(platform.db, platform.file_store.evals_dir, name="one",
                                   source={"type": "file", "file_id": held_out.id})
    with pytest.raises(evals.EvalError) as refused:
        evals.record_run(platform.db, record, model)
    assert refused.value.param == "model"
    assert json.loads(Path(record.path).read_text().splitlines()[0])["gold"] == example(1)["messages"][-1]["content"]


def test_the_eval_sensor_launches_recorded_runs_once_each(platform):
    """What the API recorded while Dagster was unreachable gets a run: its (set, model) partition, tagged with the
    eval run; a run already launched, or one just recorded (the API's own launch is still coming), gets none."""
    import time

    from dagster import DagsterInstance, MultiPartitionKey, SensorResult, SkipReason, build_sensor_context

    from vbatch_pipelines import evals
    from vbatch_pipelines.defs.evals import eval_score_sensor
    from vbatch_pipelines.names import EVAL_RUN_TAG
    from vbatch_pipelines.store.models import EvalRun

    platform.db.upgrade()
    held_out = upload(platform, [example(1)])
    record = evals.create_eval_set(platform.db, platform.file_store.evals_dir, name="one",
                                   source={"type": "file", "file_id": held_out.id})
    waiting = evals.record_run(platform.db, record, TINY_MODEL_ID)
    fresh = evals.record_run(platform.db, record, "ft:another")
    with platform.db.session() as session:
        session.get(EvalRun, waiting.id).created_at = int(time.time()) - 60
    with DagsterInstance.ephemeral() as instance:
        context = build_sensor_context(instance=instance, resources={"metadata_db": platform.resources.metadata_db})
        result = eval_score_sensor(context)
        assert isinstance(result, SensorResult)
        (request,) = result.run_requests
        assert request.run_key == waiting.id and request.tags[EVAL_RUN_TAG] == waiting.id
        assert request.partition_key == MultiPartitionKey({"eval_set": record.id, "model": TINY_MODEL_ID})
        assert fresh.id not in [r.run_key for r in result.run_requests]
        from dagster._core.test_utils import create_run_for_test

        # the run the request makes carries the tag: the next tick launches nothing

        create_run_for_test(instance, job_name="eval_score_job", tags={EVAL_RUN_TAG: waiting.id})
        assert isinstance(eval_score_sensor(build_sensor_context(
            instance=instance, resources={"metadata_db": platform.resources.metadata_db})), SkipReason)
