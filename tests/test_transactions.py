"""Status changes are compare-and-set on both metadata databases (issue 30): a transaction that reads a row to
change it holds that row from its read on, so a change another process commits in between is never overwritten.
On PostgreSQL that is ``SELECT ... FOR UPDATE``; on SQLite, which ignores it, the transaction begins with
``BEGIN IMMEDIATE`` (the write lock) before its read."""

from __future__ import annotations

import threading

from tests.conftest import Platform, chat_lines, jsonl
from vbatch_pipelines.batch import service


def _cancel_between_a_runs_read_and_write(monkeypatch) -> str:
    """A run moves a batch validating → in_progress while the API asks it to cancel, the API's request landing
    after the run has read the row and before it writes: the status the batch ends with."""
    platform = Platform()
    batch = platform.submit(jsonl(chat_lines(2)))
    service.update_batch(platform.db, batch.id, dagster_run_id="run-1")
    read, api_done = threading.Event(), threading.Event()
    original = service._set_fields

    def slow_set_fields(row, fields, only_from=None):
        if fields.get("status") == "in_progress":
            read.set()
            api_done.wait(1.5)  # long enough for the API's write, were it let through
        original(row, fields, only_from)

    monkeypatch.setattr(service, "_set_fields", slow_set_fields)
    errors: list[BaseException] = []

    def api_cancel():
        try:
            read.wait(10)
            service.request_cancel(platform.db, batch.id)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            api_done.set()

    api = threading.Thread(target=api_cancel)
    api.start()
    service.update_batch(platform.db, batch.id, status="in_progress", only_from=("validating",))
    api.join(30)
    assert not errors, errors
    return platform.batch(batch.id).status


def test_sqlite_a_cancel_between_a_runs_read_and_write_is_kept(vbatch_home, monkeypatch):
    assert Platform().db.engine.dialect.name == "sqlite"
    assert _cancel_between_a_runs_read_and_write(monkeypatch) == "cancelling"


def test_postgres_a_cancel_between_a_runs_read_and_write_is_kept(vbatch_home, postgres_url, monkeypatch):
    monkeypatch.setenv("VBATCH_DATABASE_URL", postgres_url)
    assert Platform().db.engine.dialect.name == "postgresql"
    assert _cancel_between_a_runs_read_and_write(monkeypatch) == "cancelling"


def test_sqlite_reads_outside_a_locking_transaction_do_not_wait_for_a_writer(vbatch_home):
    """Only transactions that lock what they read take SQLite's write lock at their start: a plain read while a
    run holds the lock answers at once (WAL), it does not queue behind the writer."""
    platform = Platform()
    batch = platform.submit(jsonl(chat_lines(2)))
    from vbatch_pipelines.store.models import Batch

    with platform.db.session() as writer:
        writer.get(Batch, batch.id, with_for_update=True).metadata_ = {"held": "yes"}
        writer.flush()
        done = threading.Event()

        def read():
            with platform.db.session() as reader:
                assert reader.get(Batch, batch.id) is not None
            done.set()

        threading.Thread(target=read).start()
        assert done.wait(5), "a plain read waited for the writer's lock"


def test_sqlite_a_plain_read_then_write_survives_another_writer_in_between(vbatch_home):
    """A transaction that reads without FOR UPDATE and writes later must not fail because another writer committed
    in between (a read snapshot held from the read would: SQLite's busy-snapshot 'database is locked', which no
    busy timeout waits out). It reads outside a snapshot, as pysqlite has it, and writes under the lock."""
    from vbatch_pipelines.store.models import Batch

    platform = Platform()
    first, second = (platform.submit(jsonl(chat_lines(1))) for _ in range(2))
    with platform.db.session() as session:
        row = session.get(Batch, first.id)
        service.update_batch(platform.db, second.id, metadata_={"other": "writer"})  # commits meanwhile
        row.metadata_ = {"mine": "too"}
    assert platform.batch(first.id).metadata_ == {"mine": "too"}
    assert platform.batch(second.id).metadata_ == {"other": "writer"}
