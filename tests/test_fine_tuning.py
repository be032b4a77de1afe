"""Fine-tuning in process: the real TRL + PEFT trainer (through Dagster Pipes) on the tiny model, the
comparison batches and the deployment on the transformers engine; bad data; cancel; the deploy gate."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import chat_line, jsonl
from vbatch_pipelines.models.registry import TINY_MODEL_ID

ANSWER = "Paris is the capital."
# Enough for the tiny model to learn the answer in a few seconds of CPU (its base never says it).
FAST = {"n_epochs": 20, "learning_rate": 1e-2, "lora_rank": 16, "batch_size": 4}


def example(i: int, answer: str = ANSWER) -> dict:
    return {"messages": [{"role": "user", "content": f"Capital of France, question {i}?"},
                         {"role": "assistant", "content": answer}]}


def record_gold_stars(platform, count: int, start: int = 0) -> None:
    """What the Label Studio sensor records when experts star answers (that path has its own tests)."""
    from tests.conftest import record_review
    from vbatch_pipelines.curation.schemas import Review
    from vbatch_pipelines.curation.service import add_tasks

    rows = []
    for i in range(start, start + count):
        messages = example(i)["messages"]
        rows.append({"batch_id": "batch_reviewed", "custom_id": f"r-{i}", "schema": "chat_review",
                     "model": TINY_MODEL_ID, "messages": messages[:1], "response": "a draft answer",
                     "ls_project_id": 1, "ls_task_id": 10_000 + i})
    add_tasks(platform.db, rows)
    for row in rows:
        record_review(platform.db, row["ls_task_id"], Review(answer=ANSWER, rating=5, gold_star=True))


def build_dataset(platform):
    from dagster import DagsterInstance, materialize

    from vbatch_pipelines.curation.service import latest_dataset
    from vbatch_pipelines.defs.curation import gold_star_dataset

    assert materialize([gold_star_dataset], resources=platform.resources, instance=DagsterInstance.ephemeral()).success
    return latest_dataset(platform.db)


def upload(platform, lines: list[dict] | bytes, purpose: str = "fine-tune"):
    from vbatch_pipelines.files import store_file

    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return store_file(platform.db, platform.file_store.files_dir, io.BytesIO(data), "train.jsonl", purpose)


def run_job(platform, job_id: str, instance=None):
    from dagster import DagsterInstance, materialize

    from vbatch_pipelines.defs.fine_tuning import deployed_model, fine_tuned_checkpoint, model_comparison

    if instance is None:  # disposed in the thread that made it: its in-memory SQLite is bound to that thread
        with DagsterInstance.ephemeral() as ephemeral:
            return run_job(platform, job_id, ephemeral)
    from vbatch_pipelines.partitions import fine_tune_partitions

    instance.add_dynamic_partitions(fine_tune_partitions.name, [job_id])
    return materialize([fine_tuned_checkpoint, model_comparison, deployed_model], partition_key=job_id,
                       resources=platform.resources, instance=instance, raise_on_error=False)


def create(platform, **kwargs):
    from vbatch_pipelines.fine_tuning.service import create_job

    kwargs.setdefault("model", TINY_MODEL_ID)
    return create_job(platform.db, platform.registry, platform.file_store, platform.resources.trainer, **kwargs)


def test_fine_tune_trains_compares_deploys_and_changes_answers(platform):
    from vbatch_pipelines.fine_tuning.service import get_job, list_checkpoints, list_events

    platform.configure("retraining_policy", judge_model=TINY_MODEL_ID)  # the tiny model judges (its verdicts are noise)
    train = upload(platform, [example(i) for i in range(30)])
    held_out = upload(platform, [example(100 + i) for i in range(4)])
    job = create(platform, training_file=train.id, validation_file=held_out.id,
                 hyperparameters={**FAST, "merge": True}, suffix="paris", seed=7)
    assert job.status == "queued" and job.hyperparameters["lora_alpha"] == 32
    result = run_job(platform, job.id)
    assert result.success

    done = get_job(platform.db, job.id)
    assert done.status == "succeeded" and done.finished_at >= done.created_at
    name = f"ft:{TINY_MODEL_ID}:vbatch:paris:{job.id.removeprefix('ftjob-')[:8]}"
    assert done.fine_tuned_model == name
    assert done.trained_tokens > 0 and done.result_files and done.metrics["eval_loss"] is not None
    merged_config = json.loads((Path(done.metrics["merged_dir"]) / "config.json").read_text())
    assert merged_config.get("dtype", merged_config.get("torch_dtype")) == "bfloat16", "the merged model is 16-bit"
    assert done.metrics["backend"] == "trl" and done.metrics["steps"] == FAST["n_epochs"] * -(-30 // 4)

    events, _ = list_events(platform.db, job.id, after=None, limit=1000)
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == done.metrics["steps"]
    assert {"step", "train_loss", "learning_rate", "total_steps"} <= set(metrics[0].data)
    assert events[0].message == "The job has successfully completed"
    checkpoints, more = list_checkpoints(platform.db, job.id, after=None, limit=100)
    assert len(checkpoints) == FAST["n_epochs"] and not more and checkpoints[0].fine_tuned_model_checkpoint.startswith(name + ":ckpt-step-")

    progress = [e.event_specific_data.asset_observation.metadata for e in result.all_events
                if e.event_type_value == "ASSET_OBSERVATION"]
    assert progress and progress[-1]["step"].value == progress[-1]["total_steps"].value == done.metrics["steps"]
    assert {"train_loss", "learning_rate", "epoch"} <= set(progress[0]), "progress streams into the metadata"
    checkpoint = result.asset_materializations_for_node("fine_tuned_checkpoint")[0].metadata
    assert "| step | loss | learning rate |" in checkpoint["loss_curve"].value
    assert checkpoint["loss_curve_path"].value.endswith("loss_curve.svg")
    comparison = done.comparison
    assert comparison["examples"] == 4 and len(comparison["rows"]) == 4
    assert sum(comparison["judge_verdicts"].values()) == 8, "each pair judged in both orders"
    assert set(comparison["batches"]) == {"base", "fine_tuned", "judge"}
    assert comparison["base"]["normalized_match"] == 0 and comparison["fine_tuned"]["normalized_match"] == 1.0
    table = result.asset_materializations_for_node("model_comparison")[0].metadata["table"].value
    assert "| metric | base | fine-tuned |" in table

    # Deployed: served by name, with its base as parent; its answers differ from the base model's.
    spec = platform.registry.served_models()[name]
    assert spec.parent == TINY_MODEL_ID and spec.adapter.endswith("adapter")
    assert platform.registry.lookup(name) == spec
    base_batch = platform.submit(jsonl([chat_line(f"q{i}", f"Capital of France, question {200 + i}?")
                                        for i in range(3)]))
    tuned_batch = platform.submit(jsonl([chat_line(f"q{i}", f"Capital of France, question {200 + i}?",
                                                   model=name) for i in range(3)]))
    assert platform.materialize(base_batch.id).success and platform.materialize(tuned_batch.id).success
    assert platform.batch(tuned_batch.id).model == name

    def answers(batch_id):
        out, _ = platform.results(batch_id)
        return {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in out}

    assert answers(base_batch.id) != answers(tuned_batch.id)


def test_bad_training_data_is_refused_before_anything_is_queued(platform):
    from vbatch_pipelines.fine_tuning.service import FineTuningError
    from vbatch_pipelines.store.models import FineTuningJob

    few = upload(platform, [example(i) for i in range(3)])
    with pytest.raises(FineTuningError, match="3 example.*at least 10") as small:
        create(platform, training_file=few.id)
    assert small.value.code == "insufficient_examples"

    lines = [json.dumps(example(i)) for i in range(12)]
    lines[2] = '{"messages": [{"role": "user", "content": "no answer"}]}'
    lines[5] = "not json"
    lines[7] = json.dumps({"messages": [{"role": "wizard", "content": "x"}]})
    bad = upload(platform, ("\n".join(lines) + "\n").encode())
    with pytest.raises(FineTuningError) as malformed:
        create(platform, training_file=bad.id)
    message = str(malformed.value)
    assert "line 3: no assistant message" in message and "line 6: not valid JSON" in message
    assert "line 8: messages[0] needs a role" in message and malformed.value.param == "training_file"

    batch_file = upload(platform, [example(i) for i in range(12)], purpose="batch")
    with pytest.raises(FineTuningError, match="purpose 'batch'"):
        create(platform, training_file=batch_file.id)
    good = upload(platform, [example(i) for i in range(12)])
    with pytest.raises(FineTuningError, match="hyperparameters.n_epochs"):
        create(platform, training_file=good.id, hyperparameters={"n_epochs": "many"})
    with pytest.raises(FineTuningError, match="hyperparameters.epochs"):
        create(platform, training_file=good.id, hyperparameters={"epochs": 2})
    with pytest.raises(FineTuningError, match="needs a CUDA GPU"):
        create(platform, training_file=good.id, hyperparameters={"qlora": True})
    with pytest.raises(FineTuningError, match="VBATCH_MAX_LORA_RANK"):
        create(platform, training_file=good.id, hyperparameters={"lora_rank": 64})
    with pytest.raises(FineTuningError, match="No file with id") as missing:
        create(platform, training_file="file-nope")
    assert missing.value.status == 404
    with platform.db.session() as session:
        assert session.query(FineTuningJob).count() == 0


def test_cancel_interrupts_a_running_trainer(platform):
    from vbatch_pipelines.fine_tuning.service import cancel_job, get_job, list_events

    train = upload(platform, [example(i) for i in range(40)])
    job = create(platform, training_file=train.id, hyperparameters={**FAST, "n_epochs": 200, "batch_size": 1})
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=run_job(platform, job.id)))
    runner.start()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        events, _ = list_events(platform.db, job.id, after=None, limit=5)
        if any(e.type == "metrics" for e in events):
            break
        time.sleep(0.2)
    else:
        pytest.fail("training never reported a step")
    trainers = [p for p in psutil.process_iter(["cmdline"]) if "lora.py" in " ".join(p.info["cmdline"] or [])]
    assert trainers, "the trainer runs in its own process"
    assert cancel_job(platform.db, job.id).status == "cancelled"
    runner.join(timeout=60)
    assert not runner.is_alive() and not outcome["result"].success
    assert get_job(platform.db, job.id).status == "cancelled"
    assert get_job(platform.db, job.id).fine_tuned_model is None
    gone, alive = psutil.wait_procs(trainers, timeout=10)
    assert not alive, "the trainer was stopped"
    steps = [e for e in list_events(platform.db, job.id, after=None, limit=100)[0] if e.type == "metrics"]
    assert len(steps) < 200 * 40


@pytest.mark.parametrize("policy,base,tuned,deploys", [
    ("always", 0.9, 0.1, True), ("never", 0.1, 0.9, False),
    ("no_worse", 0.5, 0.5, True), ("no_worse", 0.5, 0.6, True), ("no_worse", 0.5, 0.4, False),
])
def test_deploy_gate(policy, base, tuned, deploys):
    from vbatch_pipelines.fine_tuning.comparison import gate

    summary = {"examples": 10, "base": {"normalized_match": base}, "fine_tuned": {"normalized_match": tuned}}
    assert gate(summary, policy, "normalized_match")[0] is deploys
    assert gate({"examples": 0, "base": {}, "fine_tuned": {}}, "no_worse", "normalized_match")[0] is False


def test_judge_verdicts_cancel_position_bias():
    from vbatch_pipelines.fine_tuning.comparison import judge_win_rate

    # The judge always says "A": one win each way per item, so the fine-tune's rate is exactly one half.
    rate, counts = judge_win_rate({"eval-0:tb": "A", "eval-0:bt": "A", "eval-1:tb": "A", "eval-1:bt": "A"})
    assert rate == 0.5 and counts["fine_tuned"] == counts["base"] == 2
    assert judge_win_rate({"eval-0:tb": "A", "eval-0:bt": "B"})[0] == 1.0
    assert judge_win_rate({"eval-0:tb": "??"})[0] is None


def retraining_defs(platform, cron: str | None = None):
    """The retraining domain as the code location builds it, from the platform's policy resource."""
    from vbatch_pipelines.defs.retraining import build_defs

    return build_defs(platform.resources.retraining_policy, platform.settings.storage.database_url, cron)


def test_retraining_condition_fires_once_per_n_new_gold_stars(platform):
    from dagster import DagsterInstance, Definitions, evaluate_automation_conditions, materialize

    from vbatch_pipelines.fine_tuning.service import get_job

    platform.configure("trainer", min_training_examples=1)
    platform.configure("retraining_policy", deploy_gate="no_worse", min_gold_stars=5)
    (retraining_request,) = retraining_defs(platform).assets
    every_five = retraining_request
    instance = DagsterInstance.ephemeral()

    def tick(cursor=None):
        return evaluate_automation_conditions(defs=Definitions(assets=[every_five], resources=platform.resources),
                                              instance=instance, cursor=cursor)

    record_gold_stars(platform, 4)
    build_dataset(platform)
    result = tick()
    assert result.total_requested == 0
    record_gold_stars(platform, 1, start=4)
    build_dataset(platform)
    result = tick(result.cursor)
    assert result.total_requested == 1, "the fifth gold star fires it"
    result = tick(result.cursor)
    assert result.total_requested == 0, "once per dataset version, even before the retrain is recorded"

    recorded = materialize([retraining_request], resources=platform.resources, instance=instance)
    job = get_job(platform.db, recorded.asset_materializations_for_node("retraining_request")[0]
                  .metadata["fine_tuning_job"].value)
    assert job.trigger == "manual" and job.deploy == "no_worse" and job.dataset_version == "v2"
    record_gold_stars(platform, 4, start=5)
    build_dataset(platform)
    result = tick(result.cursor)
    assert result.total_requested == 0, "four new ones since the recorded retrain"
    record_gold_stars(platform, 1, start=9)
    build_dataset(platform)
    assert tick(result.cursor).total_requested == 1


def test_retraining_schedule_skips_without_new_gold_stars(platform):
    from dagster import DagsterInstance, SkipReason, build_schedule_context

    (schedule,) = retraining_defs(platform, "0 3 * * *").schedules
    context = build_schedule_context(instance=DagsterInstance.ephemeral(),
                                     resources={"metadata_db": platform.resources.metadata_db,
                                                "trainer": platform.resources.trainer})
    assert isinstance(schedule(context), SkipReason)
    record_gold_stars(platform, 3)
    build_dataset(platform)
    assert "VBATCH_MIN_TRAINING_EXAMPLES" in schedule(context).skip_message, "too few examples to train on"
    record_gold_stars(platform, 12, start=3)
    dataset = build_dataset(platform)
    request = schedule(context)
    assert request.run_key == f"retrain-{dataset.version}"


def test_fine_tuning_sensor_launches_queued_jobs_and_fails_jobs_whose_run_died(platform):
    from dagster import DagsterInstance, SensorResult, build_sensor_context

    from vbatch_pipelines.defs.fine_tuning import fine_tuning_sensor
    from vbatch_pipelines.fine_tuning.service import get_job, update_job

    train = upload(platform, [example(i) for i in range(12)])
    waiting, orphaned = create(platform, training_file=train.id), create(platform, training_file=train.id)
    update_job(platform.db, waiting.id, created_at=waiting.created_at - 60)
    update_job(platform.db, orphaned.id, status="running", dagster_run_id="a-run-that-is-gone")
    context = build_sensor_context(instance=DagsterInstance.ephemeral(),
                                   resources={"metadata_db": platform.resources.metadata_db})
    result = fine_tuning_sensor(context)
    assert isinstance(result, SensorResult) and [r.run_key for r in result.run_requests] == [waiting.id]
    ended = get_job(platform.db, orphaned.id)
    assert ended.status == "failed" and ended.error["code"] == "run_ended"


def test_a_fine_tune_the_gate_rejects_says_so_and_can_be_deployed_later(platform):
    """The job succeeds (a valid OpenAI object) with vbatch's deployment status ``rejected`` and its reason; its
    model is not served until POST /v1/fine_tuning/jobs/{id}/deploy; deleting it marks it undeployed."""

    from api.main import create_app
    from tests.conftest import api_client
    from vbatch_pipelines.fine_tuning.service import get_job

    train = upload(platform, [example(i) for i in range(12)])
    job = create(platform, training_file=train.id, hyperparameters={**FAST, "n_epochs": 2}, deploy="never")
    assert run_job(platform, job.id).success
    done = get_job(platform.db, job.id)
    assert done.status == "succeeded" and done.deployment["status"] == "rejected"
    assert "never" in done.deployment["reason"] and done.to_openai()["vbatch"]["deployment"]["status"] == "rejected"
    assert done.fine_tuned_model not in platform.registry.served_models()
    settings = platform.settings.replace(dagster={"url": "http://127.0.0.1:9"})
    with api_client(create_app(settings)) as client:
        deployed = client.post(f"/v1/fine_tuning/jobs/{job.id}/deploy")
        assert deployed.status_code == 200 and deployed.json()["vbatch"]["deployment"]["status"] == "deployed"
        assert done.fine_tuned_model in [m["id"] for m in client.get("/v1/models").json()["data"]]
        chat = client.post("/v1/chat/completions", json={"model": done.fine_tuned_model, "max_tokens": 4,
                                                         "messages": [{"role": "user", "content": "hi"}]})
        assert chat.status_code == 200, chat.text
        assert client.delete(f"/v1/models/{done.fine_tuned_model}").status_code == 200
        assert get_job(platform.db, job.id).deployment["status"] == "undeployed"
        assert client.post("/v1/fine_tuning/jobs/ftjob-nope/deploy").status_code == 404
        queued = create(platform, training_file=train.id, hyperparameters=FAST)
        refused = client.post(f"/v1/fine_tuning/jobs/{queued.id}/deploy")
        assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_not_succeeded"


@pytest.mark.parametrize("reader", ["dagster", "vbatch"])
def test_a_progress_message_read_while_the_trainer_writes_it_arrives_whole(tmp_path, reader):
    """The reader finds half a message (the trainer is writing it), then the rest: vbatch's reader hands over
    both messages whole; Dagster's own hands over the half as a line, and its thread dies on it."""
    from dagster import PipesFileMessageReader

    from resources.trainer import whole_line_reader

    path = tmp_path / "messages.pipes"
    first = {"__dagster_pipes_version": "0.1", "method": "report_custom_message", "params": {"payload": {"step": 1}}}
    second = {**first, "params": {"payload": {"step": 2}}}
    text = json.dumps(first) + "\n" + json.dumps(second) + "\n"
    path.write_text(text[:20])
    checks = []

    class Complete:  # asked each time the reader finds no whole line: the writer goes on meanwhile
        def is_set(self) -> bool:
            checks.append(1)
            if len(checks) == 1:
                with open(path, "a") as stream:
                    stream.write(text[20:])
            return len(checks) > 2

    class Handler:
        messages: list = []
        failures: list = []

        def handle_message(self, message):
            self.messages.append(message)

        def report_pipes_framework_exception(self, origin, exc_info):
            self.failures.append(exc_info[1])

    handler = Handler()
    chosen = whole_line_reader(path) if reader == "vbatch" else PipesFileMessageReader(str(path))
    if reader == "vbatch":
        chosen._reader_thread(handler, Complete())
        assert handler.messages == [first, second] and handler.failures == []
    else:
        with pytest.raises(json.JSONDecodeError):
            chosen._reader_thread(handler, Complete())
        assert handler.messages == [] and isinstance(handler.failures[0], json.JSONDecodeError)
