"""Retention and disk (issue 26): files expire as OpenAI's do (``expires_after``, the openai SDK's own encoding)
and go with their bytes while a batch keeps its record; old finished Dagster runs are pruned through the instance,
never a running one; logs rotate by size under a live O_APPEND writer; the disk shows in /metrics and the console;
under the free-space floor new batches get 507 and an accepted batch still completes.

In-process: the API app (TestClient, or uvicorn on a port for the SDK), the retention job through ``materialize`` on
a real Dagster instance; the low disk is a real small tmpfs where this machine allows mounting one."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Platform, api_client, chat_lines, jsonl, openai_error, serving

DAY = 86400


def _app(**changes):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    # Dagster where nothing listens: batches are accepted and recorded, not run (the tests run them in-process).
    return create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, **changes))


def _upload(client, data: bytes, purpose: str = "batch", **fields):
    return client.post("/v1/files", files={"file": ("in.jsonl", data)}, data={"purpose": purpose, **fields})


def _retention(platform: Platform, instance=None, **policy):
    """One run of the retention job's asset on ``instance`` (a fresh ephemeral one by default); its metadata."""
    from dagster import DagsterInstance, materialize

    from tests.conftest import replaced
    from vbatch_pipelines.defs.retention import disk_retention

    resources = platform.resources
    if policy:
        resources = resources.replace(retention_policy=replaced(resources.retention_policy, **policy))
    result = materialize([disk_retention], resources=resources, instance=instance or DagsterInstance.ephemeral())
    assert result.success
    [materialization] = result.asset_materializations_for_node("disk_retention")
    return {key: value.value for key, value in materialization.metadata.items()}


# -- expires_after --------------------------------------------------------------------------------------------------


@pytest.fixture()
def live_api(vbatch_home):
    """The API on a real port, for the official openai SDK (it speaks HTTP, not ASGI)."""
    with serving(_app()) as url:
        yield url


def test_the_openai_sdk_sets_expires_after_on_files_and_batch_outputs(live_api, vbatch_home):
    import openai

    from vbatch_pipelines.batch.service import get_batch
    from vbatch_pipelines.store.db import get_database

    client = openai.OpenAI(base_url=f"{live_api}/v1", api_key="unused", max_retries=0)
    data = jsonl(chat_lines(2))
    hour = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch",
                               expires_after={"anchor": "created_at", "seconds": 3600})
    assert hour.expires_at == hour.created_at + 3600
    default = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
    assert default.expires_at == default.created_at + 30 * DAY  # VBATCH_FILE_RETENTION_DAYS' default
    kept = client.files.create(file=("train.jsonl", io.BytesIO(b'{"messages": []}\n')), purpose="fine-tune")
    assert kept.expires_at is None  # other purposes stay until deleted, as on OpenAI
    assert client.files.retrieve(hour.id).expires_at == hour.expires_at
    listed = {file.id: file.expires_at for file in client.files.list()}
    assert listed == {hour.id: hour.expires_at, default.id: default.expires_at, kept.id: None}

    for seconds, message in ((3599, "between 3600"), (2592001, "between 3600")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch",
                                expires_after={"anchor": "created_at", "seconds": seconds})
        assert refused.value.body["param"] == "expires_after.seconds" and message in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch",
                            expires_after={"anchor": "last_active_at", "seconds": 3600})
    assert refused.value.body["param"] == "expires_after.anchor"
    assert len(client.files.list().data) == 3  # the refused uploads left nothing

    batch = client.batches.create(input_file_id=hour.id, endpoint="/v1/chat/completions", completion_window="24h",
                                  output_expires_after={"anchor": "created_at", "seconds": 7200})
    assert get_batch(get_database(f"sqlite:///{vbatch_home / 'vbatch.db'}"), batch.id).output_expires_after == 7200
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=hour.id, endpoint="/v1/chat/completions", completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 60})
    assert refused.value.body["param"] == "output_expires_after.seconds"
    assert [b.id for b in client.batches.list()] == [batch.id]  # the refused create recorded nothing


def test_bad_expires_after_is_a_400_naming_the_field(vbatch_home):
    data = jsonl(chat_lines(1))
    with api_client(_app()) as client:
        for fields, param in (({"expires_after[seconds]": "3600"}, "expires_after.anchor"),
                              ({"expires_after[anchor]": "created_at"}, "expires_after.seconds"),
                              ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "1h"},
                               "expires_after.seconds"),
                              ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "-5"},
                               "expires_after.seconds"),
                              ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600.5"},
                               "expires_after.seconds"),
                              ({"expires_after[anchor]": "created_at", "expires_after[seconds]": "99999999999999"},
                               "expires_after.seconds")):
            openai_error(_upload(client, data, **fields), 400, param=param)
        assert client.get("/v1/files").json()["data"] == []
        good = _upload(client, data, **{"expires_after[anchor]": "created_at",
                                        "expires_after[seconds]": "2592000"}).json()
        assert good["expires_at"] == good["created_at"] + 2592000
        for value, param in (({"anchor": "created_at", "seconds": True}, "output_expires_after.seconds"),
                             ({"anchor": "created_at", "seconds": "3600"}, None),  # digits as text, as in a form
                             ({"anchor": "created_at"}, "output_expires_after.seconds"),
                             ({"seconds": 3600}, "output_expires_after.anchor"),
                             ({"anchor": "created_at", "seconds": 3600, "unit": "s"}, "output_expires_after.unit"),
                             ("3600", "output_expires_after")):
            response = client.post("/v1/batches", json={"input_file_id": good["id"], "endpoint": "/v1/chat/completions",
                                                        "output_expires_after": value})
            if param is None:
                assert response.status_code == 200, response.text
                continue
            openai_error(response, 400, param=param)
        assert len(client.get("/v1/batches").json()["data"]) == 1


# -- expiry and deletion ------------------------------------------------------------------------------------------


def _age(platform: Platform, file_ids: list[str], seconds: int) -> None:
    """Make files ``seconds`` older: as if created (and given their expiry) that long ago."""
    from sqlalchemy import update

    from vbatch_pipelines.store.models import File

    with platform.db.session() as session:
        session.execute(update(File).where(File.id.in_(file_ids)).values(
            created_at=File.created_at - seconds, expires_at=File.expires_at - seconds))


def test_expired_files_go_with_their_bytes_a_running_batchs_input_stays_and_batches_keep_their_record(platform):
    from vbatch_pipelines.store.models import File

    with api_client(_app()) as client:
        hour = _upload(client, jsonl(chat_lines(2, prefix="h")),
                       **{"expires_after[anchor]": "created_at", "expires_after[seconds]": "3600"}).json()
        default = _upload(client, jsonl(chat_lines(2, prefix="d"))).json()
        fresh = _upload(client, jsonl(chat_lines(2, prefix="f"))).json()
        training = _upload(client, b'{"messages": []}\n', purpose="fine-tune").json()
        running_input = _upload(client, jsonl(chat_lines(2, prefix="r"))).json()
        running = client.post("/v1/batches", json={"input_file_id": running_input["id"],
                                                   "endpoint": "/v1/chat/completions"}).json()
        assert running["status"] == "in_progress"  # accepted, not finished (Dagster is down here)

        # A batch that ran, its output set to expire an hour after it was written.
        done = platform.submit(jsonl(chat_lines(3, prefix="done")), output_expires_after=3600)
        platform.materialize(done.id)
        done = platform.batch(done.id)
        assert done.status == "completed" and done.output_file_id and done.error_file_id is None
        output = client.get(f"/v1/files/{done.output_file_id}").json()
        assert output["expires_at"] == output["created_at"] + 3600
        output_path = Path(platform.db.get(File, done.output_file_id).path)
        assert output_path.exists()

        # Nothing is due yet: the sweep deletes nothing.
        assert _retention(platform)["files_deleted"] == 0

        # 31 days later for all but `fresh`: each past its expiry, its own or the 30-day default.
        aged = [hour["id"], default["id"], training["id"], running_input["id"], done.input_file_id,
                done.output_file_id]
        _age(platform, aged, 31 * DAY)
        paths = {file_id: Path(platform.db.get(File, file_id).path) for file_id in aged + [fresh["id"]]}
        done_input_bytes = platform.db.get(File, done.input_file_id).bytes

        # With the default retention off, only the file that set its own expiry (and the output) go.
        swept = _retention(platform, file_retention_days=None)
        assert swept["files_deleted"] == 2 and swept["files_kept_in_use"] == 0
        assert platform.db.get(File, hour["id"]) is None and platform.db.get(File, default["id"]) is not None

        swept = _retention(platform)
        assert swept["files_deleted"] == 2  # default and the done batch's input; not the running batch's input
        assert swept["file_bytes_deleted"] == default["bytes"] + done_input_bytes
        assert swept["files_kept_in_use"] == 1
        for gone in (hour["id"], default["id"], done.input_file_id, done.output_file_id):
            openai_error(client.get(f"/v1/files/{gone}"), 404, "file_not_found")
            assert not paths[gone].exists()
        for kept in (fresh["id"], training["id"], running_input["id"]):
            assert client.get(f"/v1/files/{kept}").status_code == 200 and paths[kept].exists()
        # The batch keeps its record and names its output file, as OpenAI's does; its spent directory is gone.
        after = client.get(f"/v1/batches/{done.id}").json()
        assert after["status"] == "completed" and after["output_file_id"] == done.output_file_id
        assert after["request_counts"]["completed"] == 3
        assert swept["batch_dirs_removed"] == 1 and not platform.file_store.batch_dir(done.id).exists()

        # The running batch's input goes once the batch has ended (here: cancelled), as the API's DELETE would.
        openai_error(client.delete(f"/v1/files/{running_input['id']}"), 409, "file_in_use", "file_id")
        assert client.post(f"/v1/batches/{running['id']}/cancel").json()["status"] == "cancelled"
        swept = _retention(platform)
        assert swept["files_deleted"] == 1 and swept["files_kept_in_use"] == 0
        assert not paths[running_input["id"]].exists()
        assert client.get(f"/v1/batches/{running['id']}").json()["input_file_id"] == running_input["id"]


# -- Dagster runs ---------------------------------------------------------------------------------------------------


def test_old_finished_runs_are_pruned_through_the_instance_and_running_ones_never(platform, tmp_path):
    from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, job, op
    from dagster._core.test_utils import freeze_time
    from dagster._core.utils import make_new_run_id

    @op
    def greet(context):
        print("hello")  # into the run's compute logs
        context.log.info("hello")

    @op
    def fail():
        raise RuntimeError("this run fails")

    @job
    def hello():
        greet()

    @job
    def broken():
        fail()

    (tmp_path / "instance").mkdir()
    instance = DagsterInstance.local_temp(tempdir=str(tmp_path / "instance"), overrides={"telemetry": {"enabled": False}})
    with freeze_time(time.time() - 40 * DAY):  # runs created 40 days ago, as Dagster records a run's creation
        succeeded = hello.execute_in_process(instance=instance).run_id
        failed = broken.execute_in_process(instance=instance, raise_on_error=False).run_id
        cancelled = instance.add_run(DagsterRun(job_name="hello", run_id=make_new_run_id(),
                                                status=DagsterRunStatus.CANCELED)).run_id
        still_running = instance.add_run(DagsterRun(job_name="hello", run_id=make_new_run_id(),
                                                    status=DagsterRunStatus.STARTED)).run_id
        starting = instance.add_run(DagsterRun(job_name="hello", run_id=make_new_run_id(),
                                               status=DagsterRunStatus.STARTING)).run_id
    recent = hello.execute_in_process(instance=instance).run_id
    assert instance.get_run_by_id(failed).status == DagsterRunStatus.FAILURE
    compute_logs = Path(instance.root_directory) / "storage" / succeeded
    assert instance.all_logs(succeeded) and any(compute_logs.rglob("*.out"))

    kept_all = _retention(platform, instance, run_retention_days=None)
    assert kept_all["runs_deleted"] == 0 and instance.get_run_by_id(succeeded) is not None

    kept_all = _retention(platform, instance, run_retention_days=41)  # not old enough yet
    assert kept_all["runs_deleted"] == 0

    swept = _retention(platform, instance)
    assert swept["runs_deleted"] == 3
    for gone in (succeeded, failed, cancelled):
        assert instance.get_run_by_id(gone) is None and not instance.all_logs(gone)
    assert not compute_logs.exists()
    for kept in (still_running, starting, recent):
        assert instance.get_run_by_id(kept) is not None
    assert instance.get_run_by_id(still_running).status == DagsterRunStatus.STARTED
    assert len(instance.get_run_records()) == 3 + 3  # the kept ones and the three retention runs


# -- logs -----------------------------------------------------------------------------------------------------------


WRITER = """
import sys, time
n = 0
while True:
    sys.stdout.write(f"line {n:08d} {'x' * 40}\\n"); sys.stdout.flush(); n += 1; time.sleep(0.002)
"""


def _lines(path: Path) -> list[int]:
    data = path.read_bytes()
    assert b"\0" not in data, f"{path} has a hole: its writer kept its old offset"
    return [int(line.split()[1]) for line in data.decode().splitlines() if line.startswith("line ")]


def test_logs_rotate_by_size_while_their_writer_appends(platform):
    store = platform.file_store
    for directory in (store.logs_dir, store.engines_dir, store.label_studio_dir):
        directory.mkdir(parents=True, exist_ok=True)
    (store.engines_dir / "vbatch-tiny-chat.log").write_bytes(b"engine\n" * 2000)
    (store.label_studio_dir / "label-studio.log").write_bytes(b"studio\n" * 2000)
    (store.logs_dir / "small.log").write_bytes(b"small\n")
    log = store.logs_dir / "api.log"
    with open(log, "ab") as out:  # as `vbatch up` starts its services: the child holds an O_APPEND descriptor
        writer = subprocess.Popen([sys.executable, "-c", WRITER], stdout=out, stderr=subprocess.STDOUT)
    try:
        while log.stat().st_size < 20_000:
            time.sleep(0.05)
        off = _retention(platform, log_max_bytes=None)
        assert off["logs_rotated"] == 0 and not log.with_name("api.log.1").exists()

        swept = _retention(platform, log_max_bytes=8192, log_backups=2)
        assert swept["logs_rotated"] == 3 and swept["log_bytes_rotated"] >= 20_000 + 2 * 14_000
        assert not (store.logs_dir / "small.log.1").exists()
        assert (store.engines_dir / "vbatch-tiny-chat.log").stat().st_size == 0
        assert (store.engines_dir / "vbatch-tiny-chat.log.1").read_bytes() == b"engine\n" * 2000
        rotated = _lines(log.with_name("api.log.1"))
        assert rotated[0] == 0 and rotated == list(range(rotated[-1] + 1))
        time.sleep(0.5)
        current = _lines(log)  # the writer carries on at the start of the truncated file, no hole before it
        assert current and current[0] > rotated[-1] and current == list(range(current[0], current[-1] + 1))
        assert log.stat().st_size < 20_000

        for _ in range(3):  # only log_backups copies are kept
            while log.stat().st_size <= 8192:
                time.sleep(0.05)
            _retention(platform, log_max_bytes=8192, log_backups=2)
        assert sorted(p.name for p in store.logs_dir.iterdir()) == ["api.log", "api.log.1", "api.log.2", "small.log"]
        assert _lines(log.with_name("api.log.2"))[-1] < _lines(log.with_name("api.log.1"))[0]
    finally:
        writer.kill()
        writer.wait()


# -- disk -----------------------------------------------------------------------------------------------------------


def _scrape(client) -> dict[tuple, float]:
    from prometheus_client.parser import text_string_to_metric_families

    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return {(sample.name, *sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_disk_use_by_kind_and_free_space_are_in_metrics_and_on_the_dashboard(platform):
    from vbatch_pipelines.retention import DISK_USAGE_MAX_AGE_S

    store = platform.file_store
    store.models_dir.mkdir(parents=True, exist_ok=True)
    (store.models_dir / "weights.bin").write_bytes(b"\1" * 300_000)
    with api_client(_app()) as client:
        uploaded = _upload(client, jsonl(chat_lines(50))).json()
        metrics = _scrape(client)
        assert metrics[("vbatch_disk_bytes", ("kind", "files"))] == uploaded["bytes"]
        assert metrics[("vbatch_disk_bytes", ("kind", "models"))] == 300_000
        assert metrics[("vbatch_disk_bytes", ("kind", "database"))] > 0
        usage = shutil.disk_usage(store.shared)
        assert metrics[("vbatch_disk_total_bytes",)] == usage.total
        assert abs(metrics[("vbatch_disk_free_bytes",)] - usage.free) < 64 * 2**20
        # Sizes are measured at most once a minute (the walk is the expensive part); free space every scrape.
        (store.models_dir / "more.bin").write_bytes(b"\1" * 1000)
        assert _scrape(client)[("vbatch_disk_bytes", ("kind", "models"))] == 300_000
        assert DISK_USAGE_MAX_AGE_S <= 60
        page = client.get("/ui").text
        assert 'data-metric="disk-files"' in page and 'data-metric="disk-free"' in page
        assert 'data-alert="disk"' not in page


@pytest.fixture()
def small_store(vbatch_home, tmp_path, monkeypatch):
    """VBATCH_STORE on a 16 MiB tmpfs (its own filesystem, so its free space is what the test leaves), or, where
    this machine does not let the tests mount one, None (the test raises the floor above the real free share)."""
    mount = tmp_path / "store"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        yield None
        return
    monkeypatch.setenv("VBATCH_STORE", str(mount))
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_under_the_free_space_floor_new_batches_get_507_and_an_accepted_batch_completes(small_store, vbatch_home):
    platform = Platform()
    store = platform.file_store.shared
    with api_client(_app()) as client:
        uploaded = _upload(client, jsonl(chat_lines(3, prefix="ok"))).json()
        accepted = client.post("/v1/batches", json={"input_file_id": uploaded["id"],
                                                    "endpoint": "/v1/chat/completions"}).json()
        assert accepted["status"] == "in_progress"

        if small_store is not None:  # fill the disk until 3 % is left
            usage = shutil.disk_usage(store)
            filler = store / "filler"
            filler.write_bytes(b"\0" * (usage.free - int(0.03 * usage.total)))
            low_client = client
        else:
            usage = shutil.disk_usage(store)
            floor = min(99.9, 100 * usage.free / usage.total + 1)
            low_client = api_client(_app(retention={"min_free_disk_percent": floor}))
            low_client.__enter__()
        try:
            refused = openai_error(low_client.post("/v1/batches", json={"input_file_id": uploaded["id"],
                                                                  "endpoint": "/v1/chat/completions"}),
                             507, "insufficient_storage")
            assert refused["type"] == "server_error" and "VBATCH_MIN_FREE_DISK_PERCENT" in refused["message"]
            assert "free" in refused["message"] and "already accepted carry on" in refused["message"]
            openai_error(_upload(low_client, jsonl(chat_lines(1))), 507, "insufficient_storage")
            assert [b["id"] for b in low_client.get("/v1/batches").json()["data"]] == [accepted["id"]]
            assert [f["id"] for f in low_client.get("/v1/files").json()["data"]] == [uploaded["id"]]
            page = low_client.get("/ui").text
            assert 'data-alert="disk"' in page
            if small_store is not None:
                metrics = _scrape(low_client)
                assert metrics[("vbatch_disk_free_bytes",)] < 0.05 * metrics[("vbatch_disk_total_bytes",)]

            # What was accepted before is untouched and runs to the end on the little space left.
            platform.materialize(accepted["id"])
            done = low_client.get(f"/v1/batches/{accepted['id']}").json()
            assert done["status"] == "completed" and done["request_counts"] == {"total": 3, "completed": 3,
                                                                                 "failed": 0}
            output = low_client.get(f"/v1/files/{done['output_file_id']}/content").text.splitlines()
            assert sorted(json.loads(line)["custom_id"] for line in output) == ["ok-0", "ok-1", "ok-2"]
        finally:
            if small_store is not None:
                (store / "filler").unlink()
            else:
                low_client.__exit__(None, None, None)
        # Space back: batches are taken again.
        assert client.post("/v1/batches", json={"input_file_id": uploaded["id"],
                                                "endpoint": "/v1/chat/completions"}).status_code == 200


# -- settings -------------------------------------------------------------------------------------------------------


def test_retention_settings_are_checked_at_load(vbatch_home, monkeypatch):
    from vbatch_pipelines.settings import SettingsError, load_settings

    settings = load_settings()
    retention = settings.retention
    assert (retention.file_retention_days, retention.run_retention_days, retention.min_free_disk_percent) == (30, 30, 5.0)
    for name, value in (("VBATCH_FILE_RETENTION_DAYS", "off"), ("VBATCH_RUN_RETENTION_DAYS", "0"),
                        ("VBATCH_LOG_MAX_BYTES", "off"), ("VBATCH_RETENTION_CRON", "off")):
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert settings.retention.file_retention_days is None and settings.retention.run_retention_days is None
    assert settings.retention.log_max_bytes is None and settings.retention.cron is None
    for name, value in (("VBATCH_FILE_RETENTION_DAYS", "a month"), ("VBATCH_RUN_RETENTION_DAYS", "-1"),
                        ("VBATCH_MIN_FREE_DISK_PERCENT", "100"), ("VBATCH_MIN_FREE_DISK_PERCENT", "lots"),
                        ("VBATCH_LOG_MAX_BYTES", "100"), ("VBATCH_LOG_BACKUPS", "0")):
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            with pytest.raises(SettingsError, match=name):
                load_settings()
    assert os.environ["VBATCH_FILE_RETENTION_DAYS"] == "off"
