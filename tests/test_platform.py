"""The platform as a user runs it: `vbatch up` (Dagster webserver + daemon), launching batches through
Dagster's GraphQL API, the launch sensor picking up batches Dagster missed, and a clean stop."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.conftest import Platform, aristotle_database, chat_line, chat_lines, jsonl, start_up, survivors
from vbatch_pipelines.batch.service import is_terminal
from vbatch_pipelines.launch import DagsterUnreachable, launch_batch, launch_run
from vbatch_pipelines.net import free_port

pytestmark = pytest.mark.stack


def _wait_terminal(platform, batch_id, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = platform.batch(batch_id)
        if is_terminal(batch.status):
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {platform.batch(batch_id).status}")


@pytest.fixture(scope="module")
def aristotle_for_up():
    with aristotle_database() as url:
        yield url


@pytest.fixture(scope="module")
def running_platform(tmp_path_factory, tiny_model_path, label_studio_server, aristotle_for_up):
    home = tmp_path_factory.mktemp("up-home")
    port = free_port()
    _, studio = label_studio_server
    env = dict(os.environ, VBATCH_HOME=str(home), VBATCH_ENGINE="transformers",
               VBATCH_MODELS=f"vbatch-tiny-chat={tiny_model_path}", DAGSTER_HOME=str(home / "dagster"),
               VBATCH_DAGSTER_URL=f"http://127.0.0.1:{port}", VBATCH_CURATION="on",
               VBATCH_LABEL_STUDIO_URL=studio.url, VBATCH_LABEL_STUDIO_TOKEN=studio.token,
               VBATCH_RETRAIN_MIN_GOLD_STARS="12", VBATCH_RETRAIN_HYPERPARAMETERS='{"n_epochs": 1}',
               VBATCH_ARIS_DATABASE_URL=aristotle_for_up)
    env.pop("VBATCH_DATABASE_URL", None)
    env.pop("VBATCH_DAGSTER_DATABASE_URL", None)
    process, banner = start_up(env, "--api-port", str(free_port()), "--dagster-port", str(port))
    with pytest.MonkeyPatch.context() as mp:
        for key in ("VBATCH_HOME", "VBATCH_ENGINE", "VBATCH_MODELS", "DAGSTER_HOME", "VBATCH_DAGSTER_URL",
                    "VBATCH_CURATION", "VBATCH_LABEL_STUDIO_URL", "VBATCH_LABEL_STUDIO_TOKEN"):
            mp.setenv(key, env[key])
        mp.delenv("VBATCH_DATABASE_URL", raising=False)
        platform = Platform()
        platform.process, platform.banner, platform.dagster_url = process, banner, env["VBATCH_DAGSTER_URL"]
        yield platform
    if process.poll() is None:
        process.kill()


def test_up_prints_urls_and_sets_gpu_pool(running_platform):
    assert running_platform.dagster_url in running_platform.banner
    assert httpx.get(running_platform.dagster_url + "/server_info", timeout=5).status_code == 200
    from dagster import DagsterInstance

    with DagsterInstance.get() as instance:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 1
        assert instance.event_log_storage.get_concurrency_info("inference").slot_count == 8


def test_launch_batch_through_dagster(running_platform):
    batch = running_platform.submit(jsonl(chat_lines(8)))
    run_id = launch_batch(running_platform.db, batch.id, running_platform.dagster_url)
    record = _wait_terminal(running_platform, batch.id)
    assert record.status == "completed" and record.dagster_run_id == run_id
    assert record.request_completed == 8


def test_a_launch_dagster_refuses_says_why(running_platform):
    """Launches go through Dagster's own GraphQL client: a job the code location does not have is refused by the
    webserver, and the refusal (its kind and message) reaches the caller, as the launchers record it."""
    with pytest.raises(DagsterUnreachable, match=r"did not launch no_such_job .*NotFoundError"):
        launch_run(running_platform.dagster_url, "no_such_job", {"vbatch/test": "refused"})


def test_results_reach_label_studio_and_gold_stars_become_a_dataset(running_platform):
    """The whole loop with the daemon's own sensor: batch -> tasks -> an expert's star -> a dataset."""
    from vbatch_pipelines.curation.schemas import CHAT_REVIEW, annotation_result
    from vbatch_pipelines.curation.service import latest_dataset

    assert "Label Studio http://" in running_platform.banner
    batch = running_platform.submit(jsonl(chat_lines(4, prefix="loop")))
    launch_batch(running_platform.db, batch.id, running_platform.dagster_url)
    assert _wait_terminal(running_platform, batch.id).status == "completed"
    studio = running_platform.resources.label_studio
    project = studio.project_for(CHAT_REVIEW)
    deadline = time.monotonic() + 120
    while len(tasks := studio.tasks_of_batch(project, batch.id)) < 4 and time.monotonic() < deadline:
        time.sleep(1)  # curation_tasks runs right after batch_output, in the same Dagster run
    assert sorted(tasks) == [f"loop-{i}" for i in range(4)]
    studio.client.annotations.create(tasks["loop-2"], result=annotation_result("Starred in the loop.", 5, True))
    deadline = time.monotonic() + 120
    while (dataset := latest_dataset(running_platform.db)) is None and time.monotonic() < deadline:
        time.sleep(1)  # the webhook or label_studio_sensor records it; the sensor requests the dataset run
    assert dataset is not None and dataset.examples == 1, "no gold_star_dataset version appeared"


def test_enough_new_gold_stars_retrain_under_the_daemon(running_platform):
    """The automation condition, evaluated by the daemon in the code server, records a retrain; the
    fine-tuning sensor launches it; it trains, compares and goes through the deploy gate."""
    from sqlalchemy import select

    from tests.test_fine_tuning import build_dataset, record_gold_stars
    from vbatch_pipelines.store.models import FineTuningJob

    record_gold_stars(running_platform, 12, start=100)
    dataset = build_dataset(running_platform)
    deadline = time.monotonic() + 240
    job = None
    while time.monotonic() < deadline:
        with running_platform.db.session() as session:
            job = session.scalars(select(FineTuningJob).where(FineTuningJob.trigger == "automation")).first()
        if job is not None and job.status in ("succeeded", "failed", "cancelled"):
            break
        time.sleep(2)
    assert job is not None, "the retraining automation did not fire"
    # The version the test built from the new gold stars, or a newer one the platform's own dataset sensor built
    # from them meanwhile (under load it may come first): never an older one.
    assert int(job.dataset_version.lstrip("v")) >= int(dataset.version.lstrip("v")), (job.dataset_version, dataset)
    assert job.deploy == "no_worse" and job.dagster_run_id
    assert job.status == "succeeded", job.error
    with running_platform.db.session() as session:
        assert len(session.scalars(select(FineTuningJob)).all()) == 1, "it fired once"


def test_a_victory_set_in_aristotle_shows_as_a_label_studio_gold_star_within_30_s(running_platform, aristotle_for_up):
    """Aris on under `vbatch up`: the daemon's aristotle_sensor and the aris_sync run carry a VICTORY written in
    SQL to the conquest's Label Studio task."""
    from sqlalchemy import create_engine, text

    from vbatch_pipelines.curation.schemas import GOLD, GOLD_STAR
    from vbatch_pipelines.curation.service import known_custom_ids
    from vbatch_pipelines.store.db import normalize_url

    aristotle = create_engine(normalize_url(aristotle_for_up))
    with aristotle.begin() as connection:
        connection.execute(text("""INSERT INTO "Conquest" (id, "conquestType", philosopher, domain)
                                   VALUES ('up-1', 'candidate_evaluation', 'ada@example.com', 'engineering')"""))
    batch = running_platform.submit(jsonl([chat_line("up-1", "Evaluate this candidate.")]),
                                    metadata={"aris": "conquest", "philosopher": "ada@example.com",
                                              "domain": "engineering", "conquest_type": "candidate_evaluation"})
    launch_batch(running_platform.db, batch.id, running_platform.dagster_url)
    assert _wait_terminal(running_platform, batch.id).status == "completed"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not known_custom_ids(running_platform.db, batch.id).get("up-1"):
        time.sleep(0.5)
    task_id = known_custom_ids(running_platform.db, batch.id)["up-1"]
    client = running_platform.resources.label_studio.client

    def starred() -> bool:
        annotations = client.tasks.get(str(task_id)).annotations or []
        return any(item.get("from_name") == GOLD and GOLD_STAR in (item.get("value") or {}).get("choices", [])
                   for a in annotations for item in (a["result"] if isinstance(a, dict) else a.result) or [])

    assert not starred()
    with aristotle.begin() as connection:
        connection.execute(text("""UPDATE "Conquest" SET result = 'VICTORY', "updatedAt" = now() WHERE id = 'up-1'"""))
    started = time.monotonic()
    while time.monotonic() - started < 30 and not starred():
        time.sleep(0.5)
    aristotle.dispose()
    assert starred(), "the VICTORY did not reach Label Studio within 30 s"


def test_batch_accepted_while_dagster_unreachable_is_launched_by_sensor(running_platform):
    batch = running_platform.submit(jsonl(chat_lines(5)))
    with pytest.raises(DagsterUnreachable):
        launch_batch(running_platform.db, batch.id, f"http://127.0.0.1:{free_port()}", timeout=2)
    assert running_platform.batch(batch.id).dagster_run_id is None
    record = _wait_terminal(running_platform, batch.id)
    assert record.status == "completed" and record.dagster_run_id


def test_sigterm_mid_batch_stops_every_process_it_started(running_platform):
    """Stopped while a run worker is busy on a batch, `vbatch up` leaves nothing of its own running."""
    batch = running_platform.submit(jsonl(chat_lines(2000)))
    launch_batch(running_platform.db, batch.id, running_platform.dagster_url)
    deadline = time.monotonic() + 120
    while running_platform.batch(batch.id).status != "in_progress" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_platform.batch(batch.id).status == "in_progress"
    process = running_platform.process
    def cmdline(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # gone, or a zombie not yet reaped
            return ""

    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if "vbatch_pipelines.dagster_ext.run_launcher" in cmdline(p)]
    assert workers
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=90)
    assert not survivors(Path(os.environ["VBATCH_HOME"]))

