"""Upgrades: a home made by an earlier vbatch (tests/data/upgrades, built by that revision's own code: see build.py
there) is upgraded by the next `vbatch up` (metadata DB to the newest migration, Dagster's storage migrated) and
serves its old batches; a home a newer vbatch migrated is refused, untouched; upgrades from several processes at
once, or one that fails half-way, leave a whole DB."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import CLI, api_client, settled_survivors, start_up
from vbatch_pipelines.store.db import MIGRATIONS_DIR, VERSION_TABLE, Database, SchemaTooNew, normalize_url

FIXTURES = Path(__file__).with_name("data") / "upgrades"
HOME_PLACEHOLDER = "@VBATCH_FIXTURE_HOME@"  # build.py writes the home's path as this
ARCHIVES = sorted(FIXTURES.glob("*.tar.gz"))
# Homes whose migration changed after they were made: stamped with a revision whose schema they do not have.
# Migration 0008 adds what they lack; without it their upgraded schema differs from a new home's and they fail.
DRIFTED = {"0004-c1ed616": "aris_links lacks example_since and ix_aris_links_examples (added to 0004 in c390da3)",
           "0005-cf7f9f9": "0005 was replaced (5e1c8d9): no review_error, lease_owner, lease_until, datasets.status, "
                           "fine_tuning_jobs.deployment"}


def fixture_id(archive: Path) -> str:
    return archive.name.removesuffix(".tar.gz")


def unpack_home(archive: Path, home: Path) -> dict:
    """A fixture home at ``home``: its files with HOME_PLACEHOLDER replaced by ``home``, each ``<name>.sql`` loaded
    into the SQLite file ``<name>``; returns its expected.json."""
    home.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            try:
                data = data.decode().replace(HOME_PLACEHOLDER, str(home)).encode()
            except UnicodeDecodeError:
                pass
            target = home / member.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if member.name.endswith(".sql"):
                connection = sqlite3.connect(target.with_suffix(""))
                connection.executescript(data.decode())
                connection.close()
            else:
                target.write_bytes(data)
    return json.loads((home / "expected.json").read_text())


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config).get_current_head()


def revision_of(url: str) -> str | None:
    engine = sa.create_engine(normalize_url(url))
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql(f"SELECT version_num FROM {VERSION_TABLE}").scalar()
    finally:
        engine.dispose()


def schema_of(url: str) -> dict:
    """Each table's columns (name, type, nullable) and indexes (name, columns, unique): what migrations made."""
    engine = sa.create_engine(normalize_url(url))
    try:
        inspector = sa.inspect(engine)
        return {table: ({(c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table)},
                        {(i["name"], tuple(i["column_names"]), bool(i["unique"]))
                         for i in inspector.get_indexes(table)})
                for table in inspector.get_table_names()}
    finally:
        engine.dispose()


def old_homes(only_whole: bool = False) -> list:
    """The fixture homes; ``only_whole``: not the drifted ones (a copy made through the migrations' final forms
    cannot carry their drift)."""
    return [pytest.param(archive, id=fixture_id(archive)) for archive in ARCHIVES
            if not (only_whole and fixture_id(archive) in DRIFTED)]


@pytest.fixture()
def fresh_schema(tmp_path_factory) -> dict:
    """The schema of a new home's metadata DB (this code's migrations from nothing)."""
    url = f"sqlite:///{tmp_path_factory.mktemp('fresh') / 'vbatch.db'}"
    db = Database(url)
    db.upgrade()
    db.dispose()
    return schema_of(url)


def serves_old_records(client, expected: dict) -> None:
    """The API serves what the old revision served: its batch object (every field it had, the same), the output
    file byte for byte, and where it had them its curation review, dataset, model install and fine-tuning job."""
    old = expected["batch"]
    batch = client.get(f"/v1/batches/{old['id']}")
    assert batch.status_code == 200, batch.text
    assert {key: batch.json().get(key) for key in old} == old
    content = client.get(f"/v1/files/{old['output_file_id']}/content")
    assert content.status_code == 200, content.text
    assert hashlib.sha256(content.content).hexdigest() == expected["output_sha256"]
    if "curation_tasks" in expected:
        task = client.get("/v1/curation/tasks/1000").json()
        assert (task["batch_id"], task["custom_id"], task["gold_star"]) == (old["id"], "req-0", True), task
        assert expected["dataset"] in [d["version"] for d in client.get("/v1/datasets").json()["data"]]
    if "fine_tuning_job" in expected:
        job = client.get(f"/v1/fine_tuning/jobs/{expected['fine_tuning_job']}")
        assert job.status_code == 200 and job.json()["model"] == old["model"], job.text
        model = client.get(f"/v1/models/{expected['model']}")
        assert model.status_code == 200, model.text


@pytest.mark.parametrize("archive", old_homes())
def test_an_old_home_is_upgraded_by_up_and_serves_its_batches(archive, vbatch_home, fresh_schema):
    """What `vbatch up` does before it starts anything (prepare_platform) upgrades the metadata DB to this code's
    newest migration, with the schema a new home gets, and Dagster's storage; then the real app serves the old
    records and Dagster lists the old run."""
    from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus

    from api.main import create_app
    from resources.factory import build_resources
    from vbatch_pipelines.settings import load_settings
    from vbatch_pipelines.supervisor import prepare_platform

    expected = unpack_home(archive, vbatch_home)
    settings = load_settings()
    assert revision_of(settings.storage.database_url) == expected["db_revision"]
    prepare_platform(settings, build_resources(settings, defer_secrets=False))
    assert revision_of(settings.storage.database_url) == head_revision()
    assert schema_of(settings.storage.database_url) == fresh_schema

    with api_client(create_app(settings)) as client:
        serves_old_records(client, expected)
    with DagsterInstance.get() as instance:
        run = instance.get_run_by_id(expected["dagster_run_id"])
        assert run is not None and run.status == DagsterRunStatus.SUCCESS
        assert expected["dagster_run_id"] in [r.run_id for r in instance.get_runs()]
        assert DagsterEventType.RUN_SUCCESS in [e.dagster_event.event_type for e in instance.all_logs(run.run_id)
                                                if e.dagster_event]


# -- a home a newer vbatch migrated ---------------------------------------------------------------------------

FUTURE_MIGRATION = '''"""a newer vbatch's migration

Revision ID: {revision}
Revises: {down}
"""

import sqlalchemy as sa
from alembic import op

revision = "{revision}"
down_revision = "{down}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("batches", sa.Column("from_a_newer_vbatch", sa.Text(), nullable=True))
    op.create_table("newer_things", sa.Column("id", sa.Integer(), primary_key=True))
    {fail}
'''


def migrations_with(tmp_path: Path, revision: str, fail: bool = False) -> Path:
    """This code's migrations plus one more after its head (a newer vbatch's), which raises when ``fail``."""
    directory = tmp_path / f"migrations-{revision}"
    shutil.copytree(MIGRATIONS_DIR, directory, ignore=shutil.ignore_patterns("__pycache__"))
    (directory / "versions" / f"{revision}_newer.py").write_text(FUTURE_MIGRATION.format(
        revision=revision, down=head_revision(), fail='raise RuntimeError("a migration failed half-way")' if fail
        else "pass"))
    return directory


def upgrade_with(url: str, migrations: Path, monkeypatch) -> None:
    """Upgrade ``url`` as a vbatch whose migrations are ``migrations`` would."""
    with monkeypatch.context() as patch:
        patch.setattr("vbatch_pipelines.store.db.MIGRATIONS_DIR", migrations)
        db = Database(url)
        try:
            db.upgrade()
        finally:
            db.dispose()


def sqlite_state(path: Path) -> tuple[bytes, list[str]]:
    """A SQLite DB's bytes and its dump (read without writing to it)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return path.read_bytes(), list(connection.iterdump())
    finally:
        connection.close()


@pytest.fixture()
def newer_home(vbatch_home, tmp_path, monkeypatch) -> Path:
    """A home that a newer vbatch upgraded: the newest fixture, migrated past this code's head; its DB file."""
    unpack_home(ARCHIVES[-1], vbatch_home)
    database = vbatch_home / "vbatch.db"
    upgrade_with(f"sqlite:///{database}", migrations_with(tmp_path, "9999"), monkeypatch)
    assert revision_of(f"sqlite:///{database}") == "9999"
    return database


def test_a_home_from_a_newer_vbatch_is_refused_untouched_by_db_upgrade_and_the_api(newer_home):
    from api.main import create_app

    before = sqlite_state(newer_home)
    upgrade = subprocess.run([*CLI, "db", "upgrade"], env=dict(os.environ), capture_output=True, text=True,
                             timeout=120, check=False)
    assert upgrade.returncode == 2, upgrade.stdout + upgrade.stderr
    assert f"schema revision 9999, which this vbatch does not know (its newest is {head_revision()})" in upgrade.stderr
    assert "Traceback" not in upgrade.stderr
    with pytest.raises(SchemaTooNew, match="9999"):
        create_app()  # uvicorn's factory: the API never starts serving
    assert sqlite_state(newer_home) == before


def test_a_home_from_a_newer_vbatch_is_refused_by_up_before_anything_starts(newer_home, vbatch_home):
    from tests.conftest import survivors
    from vbatch_pipelines.net import free_port

    before = sqlite_state(newer_home)
    up = subprocess.run([*CLI, "up", "--no-engine", "--api-port", str(free_port()), "--dagster-port", str(free_port())],
                        env=dict(os.environ), capture_output=True, text=True, timeout=120, check=False)
    assert up.returncode == 2, up.stdout + up.stderr
    assert "9999" in up.stderr and head_revision() in up.stderr and "Traceback" not in up.stderr
    assert sqlite_state(newer_home) == before
    assert not survivors(vbatch_home)


def test_an_upgrade_that_fails_half_way_leaves_the_db_as_it_was(vbatch_home, tmp_path, monkeypatch):
    """Every migration from the fixture's revision to this head, then one that raises: all of it is rolled back."""
    unpack_home(ARCHIVES[0], vbatch_home)
    url = f"sqlite:///{vbatch_home / 'vbatch.db'}"
    before = (revision_of(url), schema_of(url))
    with pytest.raises(RuntimeError, match="half-way"):
        upgrade_with(url, migrations_with(tmp_path, "9999", fail=True), monkeypatch)
    assert (revision_of(url), schema_of(url)) == before


CONCURRENT_UPGRADE = """
import sys, time
from alembic import command  # noqa: F401 - what upgrade() imports, loaded before the start
from vbatch_pipelines.store.db import Database, known_revisions
known_revisions()  # the migration scripts, imported
db = Database(sys.argv[1])
with db.engine.connect():
    pass
late = time.time() - float(sys.argv[2])
time.sleep(max(0.0, -late))  # all start together, imports done
print("late" if late > 0 else "", db.upgrade())
"""


def test_upgrades_from_several_processes_at_once_make_one_whole_db(vbatch_home, fresh_schema):
    """The API's workers and the run workers of a new vbatch meet an old home at once: each upgrade waits for the
    one before it, none fails, the result is the schema a new home gets, with the old rows."""
    expected = unpack_home(ARCHIVES[0], vbatch_home)
    url = f"sqlite:///{vbatch_home / 'vbatch.db'}"
    start = time.time() + 15  # past every process's imports, even on a loaded machine
    processes = [subprocess.Popen([sys.executable, "-c", CONCURRENT_UPGRADE, url, str(start)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(4)]
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, "\n".join(outputs)
    raced = [output for output in outputs if output.strip().endswith(f"('{expected['db_revision']}', "
                                                                     f"'{head_revision()}')")]
    assert not [output for output in outputs if output.startswith("late")], outputs  # all were there at the start
    assert len(raced) >= 2, outputs  # they did meet the old revision at once
    assert revision_of(url) == head_revision() and schema_of(url) == fresh_schema
    engine = sa.create_engine(url)
    with engine.connect() as connection:
        assert connection.exec_driver_sql("SELECT status FROM batches WHERE id = ?",
                                          (expected["batch"]["id"],)).scalar() == "completed"
    engine.dispose()


# -- Dagster's storage ---------------------------------------------------------------------------------------

DAGSTER_STORAGES = ("history/runs.db", "history/runs/index.db", "schedules/schedules.db")


def set_dagster_revision(dagster_home: Path, revision: str, *, downgrade: bool) -> None:
    """Put the instance's storages at ``revision`` of Dagster's schema: with Dagster's own migrations run down
    (``downgrade``: the schema an older Dagster made), or only stamped (a newer Dagster's revision)."""
    from dagster._core.storage import sql

    config = sql.get_alembic_config(sql.__file__)
    for name in DAGSTER_STORAGES:
        engine = sa.create_engine(f"sqlite:///{dagster_home / name}")
        with engine.begin() as connection:
            if downgrade:
                sql.run_alembic_downgrade(config, connection, revision)
            else:
                connection.exec_driver_sql("UPDATE alembic_version SET version_num = ?", (revision,))
        engine.dispose()


def dagster_revisions(dagster_home: Path) -> set:
    revisions = set()
    for name in DAGSTER_STORAGES:
        connection = sqlite3.connect(f"file:{dagster_home / name}?mode=ro", uri=True)
        revisions.add(connection.execute("SELECT version_num FROM alembic_version").fetchone()[0])
        connection.close()
    return revisions


# A Dagster of January 2025, before the concurrency_limits.using_default_limit column (7e2f3204cf8e): set_pools,
# which `vbatch up` runs, writes that column.
OLDER_DAGSTER_REVISION = "6b7fb194ff9c"


def test_dagster_storage_an_older_dagster_made_is_migrated_by_up(vbatch_home):
    from dagster import DagsterInstance
    from dagster._core.storage import sql

    from resources.factory import build_resources
    from vbatch_pipelines.settings import load_settings
    from vbatch_pipelines.supervisor import prepare_platform

    expected = unpack_home(ARCHIVES[-1], vbatch_home)
    dagster_home = vbatch_home / "dagster"
    set_dagster_revision(dagster_home, OLDER_DAGSTER_REVISION, downgrade=True)
    assert dagster_revisions(dagster_home) == {OLDER_DAGSTER_REVISION}
    settings = load_settings()
    prepare_platform(settings, build_resources(settings, defer_secrets=False))
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(sql.get_alembic_config(sql.__file__)).get_current_head()
    assert dagster_revisions(dagster_home) == {head}
    with DagsterInstance.get() as instance:
        assert [run.run_id for run in instance.get_runs()] == [expected["dagster_run_id"]]
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == max(1, settings.engine.gpus)


def test_dagster_storage_a_newer_dagster_migrated_is_refused_untouched(vbatch_home):
    from resources.factory import build_resources
    from vbatch_pipelines.settings import load_settings
    from vbatch_pipelines.supervisor import prepare_platform

    unpack_home(ARCHIVES[-1], vbatch_home)
    dagster_home = vbatch_home / "dagster"
    set_dagster_revision(dagster_home, "f00dfeedf00d", downgrade=False)
    before = [sqlite_state(dagster_home / name) for name in DAGSTER_STORAGES]
    settings = load_settings()
    with pytest.raises(SchemaTooNew, match="schema revision f00dfeedf00d, which this Dagster"):
        prepare_platform(settings, build_resources(settings, defer_secrets=False))
    assert [sqlite_state(dagster_home / name) for name in DAGSTER_STORAGES] == before


# -- PostgreSQL -------------------------------------------------------------------------------------------------


def migrate_to(url: str, revision: str) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    engine = sa.create_engine(normalize_url(url))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    engine.dispose()


def copy_to_postgres(sqlite_url: str, postgres_url: str, revision: str) -> None:
    """The fixture's rows in a PostgreSQL DB at its revision: the schema from this code's migrations up to that
    revision (the old revision's own, for a fixture not in DRIFTED), then every table's rows, JSON and booleans as
    PostgreSQL takes them, and each id sequence past the copied ids."""
    migrate_to(postgres_url, revision)
    source, target = sa.create_engine(sqlite_url), sa.create_engine(normalize_url(postgres_url))
    metadata = sa.MetaData()
    metadata.reflect(target)
    with source.connect() as reading, target.begin() as writing:
        for table in metadata.sorted_tables:
            if table.name == VERSION_TABLE:
                continue
            rows = [dict(row) for row in reading.execute(sa.select(sa.text("*")).select_from(sa.table(table.name)))
                    .mappings()]
            for row in rows:
                for column in table.columns:
                    if row.get(column.name) is not None and isinstance(column.type, sa.JSON):
                        row[column.name] = json.loads(row[column.name])
                    elif row.get(column.name) is not None and isinstance(column.type, sa.Boolean):
                        row[column.name] = bool(row[column.name])
            if rows:
                writing.execute(table.insert(), rows)
            for column in table.primary_key.columns:
                if isinstance(column.type, sa.Integer) and column.autoincrement in (True, "auto"):
                    writing.exec_driver_sql(f"SELECT setval(pg_get_serial_sequence('{table.name}', '{column.name}'), "
                                            f"(SELECT COALESCE(MAX({column.name}), 0) + 1 FROM {table.name}), false)")
    source.dispose()
    target.dispose()


# The oldest home (every migration runs on PostgreSQL) and the newest (every kind of record).
@pytest.mark.parametrize("archive", [old_homes(only_whole=True)[0], old_homes(only_whole=True)[-1]])
def test_an_old_home_on_postgresql_is_upgraded_by_up_and_serves_its_batches(archive, vbatch_home, postgres_url,
                                                                            monkeypatch):
    from api.main import create_app
    from resources.factory import build_resources
    from tests.postgres_server import fresh_database
    from vbatch_pipelines.settings import load_settings
    from vbatch_pipelines.supervisor import prepare_platform

    expected = unpack_home(archive, vbatch_home)
    copy_to_postgres(f"sqlite:///{vbatch_home / 'vbatch.db'}", postgres_url, expected["db_revision"])
    monkeypatch.setenv("VBATCH_DATABASE_URL", postgres_url)
    settings = load_settings()
    assert revision_of(postgres_url) == expected["db_revision"]
    prepare_platform(settings, build_resources(settings, defer_secrets=False))
    assert revision_of(postgres_url) == head_revision()
    with fresh_database() as new:
        migrate_to(new, "head")
        assert schema_of(postgres_url) == schema_of(new)
    with api_client(create_app(settings)) as client:
        serves_old_records(client, expected)


# -- the real `vbatch up` -------------------------------------------------------------------------------------


@pytest.mark.stack
def test_vbatch_up_upgrades_the_oldest_home_and_serves_its_batch(tmp_path, tiny_model_path):
    """`vbatch up` on the oldest fixture home, its Dagster storage also an older Dagster's: the metadata DB reaches
    this code's newest migration and Dagster's storage this Dagster's schema before the services start; the API
    serves the old batch and its output, Dagster's webserver lists the old run."""
    import signal

    import httpx

    from tests.conftest import TINY_MODEL_ID
    from vbatch_pipelines.net import free_port

    home = tmp_path / "home"
    expected = unpack_home(ARCHIVES[0], home)
    set_dagster_revision(home / "dagster", OLDER_DAGSTER_REVISION, downgrade=True)
    api_port, dagster_port = free_port(), free_port()
    env = {key: value for key, value in os.environ.items()
           if key not in ("VBATCH_DATABASE_URL", "VBATCH_DAGSTER_DATABASE_URL", "VBATCH_API_KEYS", "VBATCH_ADMIN_KEYS")}
    env.update(VBATCH_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), VBATCH_ENGINE="transformers",
               VBATCH_MODELS=f"{TINY_MODEL_ID}={tiny_model_path}",
               VBATCH_DAGSTER_URL=f"http://127.0.0.1:{dagster_port}")
    url = f"sqlite:///{home / 'vbatch.db'}"
    assert revision_of(url) == expected["db_revision"]
    up, banner = start_up(env, "--no-engine", "--api-port", str(api_port), "--dagster-port", str(dagster_port))
    try:
        assert "Migrating Dagster's storage" in banner
        assert revision_of(url) == head_revision() and OLDER_DAGSTER_REVISION not in dagster_revisions(home / "dagster")
        api = f"http://127.0.0.1:{api_port}/v1"
        old = expected["batch"]
        batch = httpx.get(f"{api}/batches/{old['id']}", timeout=30).json()
        assert {key: batch.get(key) for key in old} == old
        content = httpx.get(f"{api}/files/{old['output_file_id']}/content", timeout=30)
        assert hashlib.sha256(content.content).hexdigest() == expected["output_sha256"]
        runs = httpx.post(f"http://127.0.0.1:{dagster_port}/graphql", timeout=30, json={
            "query": "{ runsOrError { ... on Runs { results { runId status } } } }"}).json()
        assert {"runId": expected["dagster_run_id"], "status": "SUCCESS"} in runs["data"]["runsOrError"]["results"]
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(timeout=90)
        left = settled_survivors(home)
        for pid, _ in left:
            os.kill(pid, signal.SIGKILL)
    assert not left, f"still running after `vbatch up` stopped: {left}"
