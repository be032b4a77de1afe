"""Backup and restore (`vbatch backup create|verify|restore`): a consistent archive of a (running) platform, refused
whole when it is damaged or would write outside its place, restored onto an empty home where every path points
into the new home; end to end, a running platform with a batch, a dataset and a deployed fine-tune answers the
same after a restore onto a new home."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sqlite3
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import Platform, api_client, chat_lines, jsonl
from vbatch_pipelines.backup import (
    METADATA_SQLITE,
    BackupError,
    Stage,
    create_backup,
    restore_backup,
    verify_backup,
)
from vbatch_pipelines.settings import load_settings

# -- helpers --------------------------------------------------------------------------------------


def use_home(monkeypatch, home: Path) -> None:
    """Point the settings at ``home`` (its Dagster home inside it), as a shell for that home would."""
    monkeypatch.setenv("VBATCH_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def refused(archive: Path, settings, match: str, root: Path) -> None:
    """The restore fails with ``match`` and writes nothing under ``root`` (no home, no scratch beside it)."""
    before = listing(root)
    with pytest.raises(BackupError, match=match):
        restore_backup(archive, settings)
    assert listing(root) == before, "a refused restore wrote something"
    assert not settings.storage.home.exists()


def entry(name: str, data: bytes, mode: int = 0o644) -> dict:
    return {"name": name, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mode": mode, "mtime": 0}


def manifest_of(members: dict[str, bytes], **fields) -> dict:
    """A manifest for ``members`` (the metadata DB among them, or it says it has none)."""
    return {"format": 1, "vbatch_version": "test", "created_at": 0, "alembic_revision": None, "with_models": False,
            "source": {"home": "/nonexistent/old-home", "store": "/nonexistent/old-home",
                       "dagster_home": "/nonexistent/old-home/dagster", "label_studio": "managed"},
            "databases": {"metadata": {"kind": "sqlite", "member": METADATA_SQLITE}},
            "members": [entry(name, data) for name, data in members.items()], "directories": [], **fields}


def craft(path: Path, manifest: dict | None, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """An archive written by hand: ``manifest`` first (None: none), the members, then symlink members."""
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        files = ([("manifest.json", json.dumps(manifest).encode())] if manifest is not None else []) \
            + list(members.items())
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
    return path


def read_manifest(archive: Path) -> dict:
    with tarfile.open(archive) as tar:
        first = tar.next()
        assert first.name == "manifest.json", "the manifest is not the archive's first member"
        return json.loads(tar.extractfile(first).read())


def old_paths(url: str, *roots: Path) -> list[tuple[str, str, str]]:
    """(table, column, value) of every string in vbatch's tables (JSON included) that is a path under ``roots``."""
    import sqlalchemy as sa

    from vbatch_pipelines.backup import _vbatch_tables
    from vbatch_pipelines.store.db import normalize_url

    def strings(value):
        if isinstance(value, str):
            yield value
        elif isinstance(value, list | tuple):
            for item in value:
                yield from strings(item)
        elif isinstance(value, dict):
            for item in value.values():
                yield from strings(item)

    prefixes = tuple(str(root) for root in roots)
    found = []
    engine = sa.create_engine(normalize_url(url))
    with engine.connect() as conn:
        present = set(sa.inspect(conn).get_table_names())
        for table in _vbatch_tables():
            if table.name not in present:
                continue
            columns = {c["name"] for c in sa.inspect(conn).get_columns(table.name)}
            for row in conn.execute(sa.select(*(c for c in table.columns if c.name in columns))).mappings():
                for column, value in row.items():
                    found += [(table.name, column, text) for text in strings(value)
                              if text in prefixes or text.startswith(tuple(p + "/" for p in prefixes))]
    engine.dispose()
    return found


def populate(platform: Platform, instance) -> dict:
    """What a platform holds after some use: a completed batch (its run in Dagster), a gold-star dataset, a
    fine-tune deployed from its adapter, an installed hub model, this node's engine; returns their ids."""
    from tests.test_fine_tuning import build_dataset, record_gold_stars
    from vbatch_pipelines.engine.registry import EngineRegistry, managed_id
    from vbatch_pipelines.models.registry import TINY_MODEL_ID
    from vbatch_pipelines.models.store import register_fine_tune, upsert_model
    from vbatch_pipelines.store.models import FineTuningCheckpoint, FineTuningJob

    batch = platform.submit(jsonl(chat_lines(3)))
    run = platform.materialize(batch.id, instance=instance)
    record_gold_stars(platform, 12)
    dataset = build_dataset(platform)
    job_dir = platform.file_store.fine_tune_dir("ftjob-backup")
    adapter = job_dir / "output" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"r": 8}')
    name = f"ft:{TINY_MODEL_ID}:vbatch:backup:1a2b3c4d"
    with platform.db.session() as session:
        session.add(FineTuningJob(id="ftjob-backup", model=TINY_MODEL_ID, fine_tuned_model=name, status="succeeded",
                                  training_file=dataset.version, dataset_version=dataset.version, hyperparameters={},
                                  seed=1, output_dir=str(job_dir), created_at=1, deployment={"status": "deployed"},
                                  metrics={"adapter_dir": str(adapter), "loss": [1.0, 0.5]}))
        session.add(FineTuningCheckpoint(job_id="ftjob-backup", created_at=1, step_number=3, metrics={},
                                         fine_tuned_model_checkpoint=f"{name}:ckpt-step-3", path=str(adapter)))
    spec = platform.registry.lookup(TINY_MODEL_ID).with_adapter(name, str(adapter))
    register_fine_tune(platform.db, spec, "ftjob-backup")
    upsert_model(platform.db, "owner/hub-model", kind="base", status="ready", source="owner/hub-model",
                 path=str(platform.file_store.models_dir / "owner" / "hub-model"), revision="abc123",
                 details={"source_kind": "hub", "dagster_run_id": "old-run"})
    EngineRegistry(platform.db).record(id=managed_id("old-node", TINY_MODEL_ID), model=TINY_MODEL_ID,
                                       base_url="http://127.0.0.1:1", node="old-node", kind="managed")
    return {"batch": batch.id, "run": run.run_id, "dataset": dataset.version, "fine_tune": name}


# -- a home's round trip ---------------------------------------------------------------------------


def test_a_home_is_restored_onto_a_new_one_and_nothing_points_back(platform, tmp_path, monkeypatch):
    """Batch, files, dataset, fine-tune, Dagster run: the same through the API and Dagster from the new home
    once the old one is gone; every stored path points into the new home; node state is not carried."""
    from dagster import DagsterInstance

    from api.main import create_app
    from vbatch_pipelines.instance import prepare_dagster_home
    from vbatch_pipelines.store.models import EngineRecord, Model

    old_home = platform.settings.storage.home
    with DagsterInstance.from_config(str(prepare_dagster_home(platform.settings))) as instance:
        made = populate(platform, instance)
    (old_home / "engines").mkdir(exist_ok=True)
    (old_home / "engines" / "vbatch-tiny-chat.json").write_text('{"pid": 1}')  # a running node's state
    batch_path = f"/v1/batches/{made['batch']}"
    with api_client(create_app(load_settings())) as client:
        before = {path: client.get(path) for path in (
            batch_path, "/v1/datasets", f"/v1/datasets/{made['dataset']}/export", "/v1/fine_tuning/jobs/ftjob-backup",
            "/v1/models", "/v1/files")}
        output = f"/v1/files/{before[batch_path].json()['output_file_id']}/content"
        before[output] = client.get(output)
    assert all(r.status_code == 200 for r in before.values())

    archive = tmp_path / "backup.tar.gz"
    manifest = create_backup(platform.settings, archive)
    assert read_manifest(archive) == manifest and verify_backup(archive) == manifest
    assert manifest["alembic_revision"] and manifest["databases"]["metadata"] == {"kind": "sqlite",
                                                                                  "member": METADATA_SQLITE}
    names = {m["name"] for m in manifest["members"]}
    assert "dagster/history/runs.db" in names and any(n.startswith("store/batches/") for n in names)
    assert not any(n.startswith(("store/engines", "store/run/", "store/logs/")) or n.endswith(("-wal", "-shm"))
                   or n == "dagster/dagster.yaml" for n in names), names
    assert archive.stat().st_mode & 0o777 == 0o600  # it holds credentials

    shutil.move(old_home, tmp_path / "gone")  # nothing may point back into it
    new_home = tmp_path / "new-home"
    use_home(monkeypatch, new_home)
    restore_backup(archive, load_settings())
    assert not (new_home / "engines").exists()
    assert str(old_home) not in (new_home / "dagster" / "dagster.yaml").read_text()
    url = load_settings().storage.database_url
    assert old_paths(url, old_home) == []
    with api_client(create_app(load_settings())) as client:
        for path, response in before.items():
            again = client.get(path)
            # the same answer, but a path it shows (a fine-tune's metrics) is in the new home
            moved = response.content.replace(str(old_home).encode(), str(new_home).encode())
            if path != "/v1/models":
                assert again.status_code == 200 and again.content == moved, path
        # served as before, but for the hub model, whose weights are downloaded again (not in the archive)
        listed = [m for m in before["/v1/models"].json()["data"] if m["id"] != "owner/hub-model"]
        assert client.get("/v1/models").json()["data"] == listed and made["fine_tune"] in str(listed)
    restored = Platform()
    assert restored.registry.lookup(made["fine_tune"]).adapter.startswith(str(new_home / "fine_tunes"))
    assert restored.db.get(Model, "owner/hub-model").status == "installing"  # downloaded again: weights not kept
    assert "dagster_run_id" not in restored.db.get(Model, "owner/hub-model").details
    with restored.db.session() as session:
        assert session.query(EngineRecord).count() == 0  # the old node's engines: `vbatch up` records its own
    with DagsterInstance.from_config(str(new_home / "dagster")) as instance:
        assert instance.get_run_by_id(made["run"]).is_success


def test_with_models_the_weights_come_along(vbatch_home, tmp_path, monkeypatch):
    platform = Platform()
    platform.db.upgrade()
    weights = platform.file_store.models_dir / "owner" / "hub-model"
    weights.mkdir(parents=True)
    (weights / "model.safetensors").write_bytes(b"weights")
    without, with_models = tmp_path / "without.tar", tmp_path / "with.tar"
    create_backup(platform.settings, without)
    create_backup(platform.settings, with_models, with_models=True)
    assert not any(m["name"].startswith("store/models/") for m in read_manifest(without)["members"])
    use_home(monkeypatch, tmp_path / "new-home")
    restore_backup(with_models, load_settings())
    assert (tmp_path / "new-home" / "models" / "owner" / "hub-model" / "model.safetensors").read_bytes() == b"weights"


# -- refusals -------------------------------------------------------------------------------------


@pytest.fixture()
def good_archive(vbatch_home, tmp_path) -> Path:
    """A real backup of a small home: a file and its record."""
    from vbatch_pipelines.files import store_file

    platform = Platform()
    store_file(platform.db, platform.file_store.files_dir, io.BytesIO(jsonl(chat_lines(2))), "in.jsonl", "batch")
    archive = tmp_path / "archives" / "good.tar"
    archive.parent.mkdir()
    create_backup(platform.settings, archive)
    return archive


@pytest.fixture()
def target(tmp_path, monkeypatch):
    """Settings for an empty new home under tmp_path/targets."""
    (tmp_path / "targets").mkdir()
    use_home(monkeypatch, tmp_path / "targets" / "new-home")
    return load_settings()


def test_the_good_archive_restores(good_archive, target):
    restore_backup(good_archive, target)
    assert len(list((target.storage.home / "files").iterdir())) == 1


def test_a_home_that_was_its_own_store_restores_onto_a_separate_store(good_archive, target, tmp_path, monkeypatch):
    from api.main import create_app

    monkeypatch.setenv("VBATCH_STORE", str(tmp_path / "targets" / "store"))
    restore_backup(good_archive, load_settings())
    with api_client(create_app(load_settings())) as client:
        (stored,) = client.get("/v1/files").json()["data"]
        assert client.get(f"/v1/files/{stored['id']}/content").content == jsonl(chat_lines(2))
    assert listing(tmp_path / "targets" / "store") == {"files", f"files/{stored['id']}"}
    assert old_paths(load_settings().storage.database_url, Path(read_manifest(good_archive)["source"]["home"])) == []


def test_a_truncated_archive_is_refused_before_anything_is_written(good_archive, target, tmp_path):
    data = good_archive.read_bytes()
    archives = tmp_path / "archives"
    mid_member = archives / "mid.tar"
    mid_member.write_bytes(data[:len(data) // 2])
    refused(mid_member, target, "truncated", tmp_path / "targets")
    # cut where a member ends: the tar reads as a shorter archive, the manifest says what is missing
    with tarfile.open(good_archive) as tar:
        members = tar.getmembers()
    boundary = members[2].offset  # the manifest and one member whole
    at_boundary = archives / "boundary.tar"
    at_boundary.write_bytes(data[:boundary])
    refused(at_boundary, target, r"truncated: \d+ of its \d+ members are missing", tmp_path / "targets")
    compressed = archives / "good.tar.gz"
    with tarfile.open(good_archive) as source, tarfile.open(compressed, "w:gz") as out:
        for member in source:
            out.addfile(member, source.extractfile(member))
    assert verify_backup(compressed)
    cut = archives / "cut.tar.gz"
    cut.write_bytes(compressed.read_bytes()[:-200])
    refused(cut, target, "truncated", tmp_path / "targets")


def test_a_flipped_byte_is_refused(good_archive, target, tmp_path):
    with tarfile.open(good_archive) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith("store/files/"))
    data = bytearray(good_archive.read_bytes())
    data[member.offset_data + 3] ^= 0x01
    flipped = tmp_path / "archives" / "flipped.tar"
    flipped.write_bytes(bytes(data))
    refused(flipped, target, "does not match its checksum", tmp_path / "targets")


def test_an_archive_without_a_manifest_or_of_an_unknown_format_is_refused(target, tmp_path):
    member = {METADATA_SQLITE: b"", "store/files/file-a": b"data"}
    refused(craft(tmp_path / "archives-none.tar", None, member), target, "no manifest.json first", tmp_path / "targets")
    refused(craft(tmp_path / "archives-v2.tar", manifest_of(member, format=2), member), target,
            "format is 2; this vbatch reads format 1", tmp_path / "targets")
    (tmp_path / "not-a-tar.tar").write_bytes(b"hello" * 100)
    refused(tmp_path / "not-a-tar.tar", target, "truncated or corrupt", tmp_path / "targets")
    no_database = manifest_of(member, databases={"metadata": {"kind": "sqlite", "member": "databases/other"}})
    refused(craft(tmp_path / "archives-db.tar", no_database, member), target, "which it does not hold",
            tmp_path / "targets")


@pytest.mark.parametrize("name", ["store/../../escaped", "/tmp/escaped", "store/files/../../../escaped",
                                  "elsewhere/file", "store"])
def test_a_member_that_would_land_outside_its_place_is_refused(name, target, tmp_path):
    members = {name: b"evil"}
    refused(craft(tmp_path / "evil.tar", manifest_of(members), members), target,
            "would land outside|not part of a vbatch backup", tmp_path / "targets")
    assert not (tmp_path / "escaped").exists() and not Path("/tmp/escaped").exists()


def test_links_and_members_the_manifest_does_not_name_are_refused(target, tmp_path):
    members = {METADATA_SQLITE: b"", "store/files/file-a": b"data"}
    manifest = manifest_of(members)
    manifest["members"].append(entry("store/files/link", b""))
    refused(craft(tmp_path / "link.tar", manifest, members, links={"store/files/link": "/etc/passwd"}), target,
            "is a link", tmp_path / "targets")
    stowaway = craft(tmp_path / "extra.tar", manifest_of(members), {**members, "store/files/extra": b"x"})
    refused(stowaway, target, "not in its manifest", tmp_path / "targets")


def test_a_database_newer_than_this_code_is_refused(good_archive, target, tmp_path):
    with tarfile.open(good_archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.name != "manifest.json"}
    manifest = read_manifest(good_archive)
    manifest["alembic_revision"] = "9999"
    refused(craft(tmp_path / "newer.tar", manifest, members), target, "migration '9999'.*does not know",
            tmp_path / "targets")


def test_a_non_empty_home_is_refused(good_archive, target, tmp_path):
    target.storage.home.mkdir()
    (target.storage.home / "something").write_text("kept")
    with pytest.raises(BackupError, match="is not empty"):
        restore_backup(good_archive, target)
    assert listing(target.storage.home) == {"something"} and listing(tmp_path / "targets") == {"new-home",
                                                                                       "new-home/something"}


def test_the_cli_refuses_with_a_clear_error(good_archive, target, capsys):
    from vbatch_pipelines.cli import main

    target.storage.home.mkdir()
    (target.storage.home / "vbatch.db").write_text("")
    assert main(["backup", "restore", str(good_archive), "--home", str(target.storage.home)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["backup", "verify", str(good_archive)]) == 0
    assert "match their checksums" in capsys.readouterr().out


def test_a_backup_is_not_written_inside_the_home_nor_over_a_file(vbatch_home, tmp_path):
    platform = Platform()
    platform.db.upgrade()
    with pytest.raises(BackupError, match="inside"):
        create_backup(platform.settings, vbatch_home / "backup.tar")
    (tmp_path / "exists.tar").write_text("mine")
    with pytest.raises(BackupError, match="exists"):
        create_backup(platform.settings, tmp_path / "exists.tar")
    assert (tmp_path / "exists.tar").read_text() == "mine"


def test_a_file_that_changes_while_it_is_written_fails_the_backup(vbatch_home, tmp_path, monkeypatch):
    """The manifest's checksums are taken before the members are written: a staged file rewritten in place in
    between (a hard link shares the live file's inode) would go in with a wrong checksum; the backup fails
    instead, and leaves nothing."""
    from vbatch_pipelines.files import store_file

    platform = Platform()
    stored = store_file(platform.db, platform.file_store.files_dir, io.BytesIO(b"original"), "a.jsonl", "batch")
    hashed = Stage.hash

    def rewritten_after_hashing(stage):
        hashed(stage)
        with open(stored.path, "r+b") as live:  # in place, same size: "original" becomes "Original"
            live.write(b"O")

    monkeypatch.setattr(Stage, "hash", rewritten_after_hashing)
    with pytest.raises(BackupError, match="changed while it was being backed up"):
        create_backup(platform.settings, tmp_path / "backup.tar")
    assert not (tmp_path / "backup.tar").exists() and not list(tmp_path.glob(".backup.tar*"))


# -- SQLite: snapshots of a live database ---------------------------------------------------------


def test_a_live_sqlite_database_is_snapshotted_consistently_while_a_writer_writes(tmp_path):
    """Each snapshot is the database as of one commit (two tables written in one transaction always agree), with
    the commits still in the WAL; a copy of the live file (the bad case the online backup replaces) misses them."""
    db = tmp_path / "live.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.executescript("PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE a (n INTEGER); "
                       "CREATE TABLE b (n INTEGER);")
    conn.executescript("BEGIN; INSERT INTO a VALUES (0); INSERT INTO b VALUES (0); COMMIT;")
    stop, committed = threading.Event(), [1]

    def writer() -> None:
        writing = sqlite3.connect(db, isolation_level=None, timeout=30)
        n = 1
        while not stop.is_set():
            writing.executescript(f"BEGIN; INSERT INTO a VALUES ({n}); INSERT INTO b VALUES ({n}); COMMIT;")
            committed[0] = n = n + 1
        writing.close()

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        counts = []
        for i in range(8):
            time.sleep(0.05)
            floor = committed[0]
            stage = Stage(tmp_path / f"stage-{i}")
            stage.sqlite(db, "dagster/live.db")
            with sqlite3.connect(stage.root / "dagster" / "live.db") as snapshot:
                assert snapshot.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                a, b = (snapshot.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in "ab")
            assert a == b >= floor, (a, b, floor)
            assert not (stage.root / "dagster" / "live.db-wal").exists()
            counts.append(a)
    finally:
        stop.set()
        thread.join()
    assert counts == sorted(counts) and counts[-1] > counts[0], "the writer was not writing meanwhile"

    # The bad case: the live file copied as it is. Its last commits are in the WAL (no checkpoint), so the copy
    # lacks them, or cannot be read at all.
    total = conn.execute("SELECT count(*) FROM a").fetchone()[0]
    shutil.copyfile(db, tmp_path / "copied.db")
    try:
        with sqlite3.connect(tmp_path / "copied.db") as copied:
            copied_rows = copied.execute("SELECT count(*) FROM a").fetchone()[0]
    except sqlite3.DatabaseError:
        copied_rows = None
    assert copied_rows != total, "copying the live file would have been enough: this test shows nothing"
    stage = Stage(tmp_path / "stage-final")
    stage.sqlite(db, "dagster/live.db")
    with sqlite3.connect(stage.root / "dagster" / "live.db") as snapshot:
        assert snapshot.execute("SELECT count(*) FROM a").fetchone()[0] == total
    conn.close()


# -- PostgreSQL ------------------------------------------------------------------------------------


def test_metadata_and_dagster_on_postgresql_round_trip(vbatch_home, postgres_url, tmp_path, monkeypatch):
    """Both in one PostgreSQL database (one dump), restored into an empty one; a database that is not empty is
    refused before anything is written."""
    import sqlalchemy as sa
    from dagster import DagsterInstance

    from api.main import create_app
    from tests.postgres_server import fresh_database
    from vbatch_pipelines.instance import prepare_dagster_home
    from vbatch_pipelines.store.db import normalize_url

    monkeypatch.setenv("VBATCH_DATABASE_URL", postgres_url)
    monkeypatch.setenv("VBATCH_DAGSTER_DATABASE_URL", postgres_url)
    platform = Platform()
    batch = platform.submit(jsonl(chat_lines(3)))
    with DagsterInstance.from_config(str(prepare_dagster_home(platform.settings))) as instance:
        run_id = platform.materialize(batch.id, instance=instance).run_id
    with api_client(create_app(load_settings())) as client:
        before = client.get(f"/v1/batches/{batch.id}").json()
        output = client.get(f"/v1/files/{before['output_file_id']}/content").content
    archive = tmp_path / "pg.tar"
    manifest = create_backup(platform.settings, archive)
    dump = "databases/postgresql-1.dump"
    assert manifest["databases"]["metadata"] == manifest["databases"]["dagster"] == {"kind": "postgresql",
                                                                                     "member": dump}
    assert sum(m["name"].startswith("databases/") for m in manifest["members"]) == 1

    (tmp_path / "targets").mkdir()
    use_home(monkeypatch, tmp_path / "targets" / "into-the-same")
    refused(archive, load_settings(), "is not empty", tmp_path / "targets")  # the source database itself

    with fresh_database() as target_url:
        monkeypatch.setenv("VBATCH_DATABASE_URL", target_url)
        monkeypatch.setenv("VBATCH_DAGSTER_DATABASE_URL", target_url)
        use_home(monkeypatch, tmp_path / "targets" / "new-home")
        restore_backup(archive, load_settings())
        assert old_paths(target_url, vbatch_home) == []
        with api_client(create_app(load_settings())) as client:
            assert client.get(f"/v1/batches/{batch.id}").json() == before
            assert client.get(f"/v1/files/{before['output_file_id']}/content").content == output
        with DagsterInstance.from_config(str(tmp_path / "targets" / "new-home" / "dagster")) as instance:
            assert instance.get_run_by_id(run_id).is_success
        engine = sa.create_engine(normalize_url(target_url))
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM files WHERE path LIKE :p"),
                                {"p": f"{tmp_path / 'targets' / 'new-home'}/%"}).scalar() == 2
        engine.dispose()


# -- Label Studio ------------------------------------------------------------------------------------


def test_this_platforms_webhook_moves_to_its_new_address(label_studio_server):
    """A restored home's API listens elsewhere: `vbatch up` moves the hook that carries this platform's secret
    instead of adding a second one, so no review goes on to the old address; another platform's hook stays."""
    import uuid

    from resources import LabelStudio

    _, conn = label_studio_server
    studio = LabelStudio(url=conn.url, token=conn.token)
    project = studio.client.projects.create(title=f"backup-webhooks-{uuid.uuid4().hex[:8]}")
    try:
        studio._add_webhook(project.id, "http://127.0.0.1:1/v1/webhooks/label-studio", "this-platform")
        studio._add_webhook(project.id, "http://127.0.0.1:2/v1/webhooks/label-studio", "this-platform")
        studio._add_webhook(project.id, "http://127.0.0.1:3/v1/webhooks/label-studio", "another-platform")
        studio._add_webhook(project.id, "http://127.0.0.1:2/v1/webhooks/label-studio", "this-platform")
        hooks = sorted(studio.client.webhooks.list(project=str(project.id)), key=lambda hook: hook.url)
        assert [hook.url for hook in hooks] == ["http://127.0.0.1:2/v1/webhooks/label-studio",
                                                "http://127.0.0.1:3/v1/webhooks/label-studio"]
        moved, added = ({key: value for key, value in hook.model_dump().items()
                         if key in ("actions", "send_payload", "send_for_all_actions", "is_active")} for hook in hooks)
        assert moved == added and sorted(moved["actions"]) == ["ANNOTATIONS_DELETED", "ANNOTATION_CREATED",
                                                                "ANNOTATION_UPDATED"]  # it still sends reviews
    finally:
        studio.client.projects.delete(project.id)


# -- end to end ------------------------------------------------------------------------------------


def answers(stack, made: dict) -> dict:
    """What the platform answers about what was made: through the openai SDK and vbatch's API, and from Label
    Studio's own API (projects, tasks, annotations, webhooks)."""
    import httpx

    from resources import LabelStudio

    client = stack.client()
    api = httpx.Client(base_url=stack.api_url, timeout=30)
    batch = client.batches.retrieve(made["batch"])
    job = client.fine_tuning.jobs.retrieve(made["job"])
    chat = client.with_options(max_retries=5).chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Capital of France, question 77?"}],
        max_tokens=12, temperature=0)
    home = Path(stack.env["VBATCH_HOME"])
    studio = LabelStudio(url=f"http://127.0.0.1:{stack.env['VBATCH_LABEL_STUDIO_PORT']}",
                         token=json.loads((home / "label-studio" / "credentials.json").read_text())["token"])
    projects = studio.projects()
    reviews = {pid: sorted((task.id, json.dumps([a["result"] for a in task.annotations], sort_keys=True))
                           for task in studio.changed_tasks(pid, None)) for pid in projects}
    hooks = sorted({hook.url for pid in projects for hook in studio.client.webhooks.list(project=str(pid))})
    return {
        "batch": batch.model_dump(), "output": client.files.content(batch.output_file_id).text,
        "files": sorted((f.id, f.filename, f.bytes, f.purpose) for f in client.files.list(limit=100)),
        "datasets": api.get("/v1/datasets").json(),
        "export": api.get(f"/v1/datasets/{made['dataset']}/export", params={"format": "openai"}).text,
        "job": job.model_dump(),
        "checkpoints": [c.model_dump() for c in client.fine_tuning.jobs.checkpoints.list(made["job"]).data],
        "models": [m.model_dump() for m in client.models.list()], "fine_tuned_answer": chat.choices[0].message.content,
        "curation": api.get("/v1/curation/stats").json(), "projects": projects, "reviews": reviews, "webhooks": hooks,
    }


@pytest.mark.stack
@pytest.mark.vllm
def test_a_running_platform_backed_up_and_restored_onto_a_new_home_answers_the_same(tmp_path, tiny_model_path):
    """`vbatch up` with a completed batch reviewed in its own Label Studio, a gold-star dataset and a deployed
    fine-tune; `vbatch backup create` while it runs; stopped, the old home deleted; `vbatch backup restore` onto a
    new home and `vbatch up` there: the same answers from the API, the engine (the fine-tune redeployed) and
    Label Studio, whose webhooks now reach the new API only."""
    import subprocess

    import httpx

    from tests.conftest import CLI, chat_line, label_studio_template, running_stack
    from tests.test_fine_tuning import FAST
    from tests.test_fine_tuning_api import wait_job
    from vbatch_pipelines.models.registry import TINY_MODEL_ID
    from vbatch_pipelines.net import free_port

    timings, started = {}, time.monotonic()

    def lap(name: str) -> None:
        timings[name] = round(time.monotonic() - started - sum(timings.values()), 1)

    old_home, new_home, archive = tmp_path / "home", tmp_path / "new-home", tmp_path / "backup.tar.gz"
    # past its 1st start
    shutil.copytree(label_studio_template(load_settings().storage.envs_dir), old_home / "label-studio")
    env = {"VBATCH_CURATION": "on", "VBATCH_RETRAIN_CRON": "off", "VBATCH_MIN_TRAINING_EXAMPLES": "4",
           "VBATCH_LABEL_STUDIO_PORT": str(free_port())}
    with running_stack(old_home, tiny_model_path, **env) as stack:
        lap("up")
        client, api = stack.client(), httpx.Client(base_url=stack.api_url, timeout=60)
        lines = [chat_line(f"q{i}", f"Capital of France, question {i}?") for i in range(16)]
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        deadline = time.monotonic() + 120
        while (batch := client.batches.retrieve(batch.id)).status != "completed" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert batch.status == "completed", batch
        from resources import LabelStudio

        studio = LabelStudio(url=f"http://127.0.0.1:{env['VBATCH_LABEL_STUDIO_PORT']}",
                             token=json.loads((old_home / "label-studio" / "credentials.json").read_text())["token"])
        while len(task_ids := [task.id for pid in studio.projects() for task in studio.changed_tasks(pid, None)]) \
                < len(lines) and time.monotonic() < deadline:
            time.sleep(0.5)  # curation_tasks imports them, after batch_output in the batch's run
        assert len(task_ids) == len(lines)
        lap("batch")
        for task_id in task_ids:  # an expert's edit and gold star, written through to Label Studio
            assert api.patch(f"/v1/curation/tasks/{task_id}/response", json={"response": "Paris."}).status_code == 200
            assert api.post(f"/v1/curation/tasks/{task_id}/gold-star").status_code == 200
        deadline = time.monotonic() + 120
        while not (datasets := api.get("/v1/datasets", params={"kind": "sft"}).json()["data"]) \
                or datasets[0]["examples"] < len(lines):
            assert time.monotonic() < deadline, datasets
            time.sleep(1)  # label_studio_sensor asks for a version (one may come before the last star)
        assert datasets and datasets[0]["examples"] == len(lines), datasets
        lap("reviews and dataset")
        job = client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=datasets[0]["version"],
                                             suffix="backup", seed=7, hyperparameters=FAST)
        job = wait_job(client, job.id, timeout=300)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model in [m.id for m in client.models.list()]
        lap("fine-tune")
        made = {"batch": batch.id, "dataset": datasets[0]["version"], "job": job.id}
        before = answers(stack, made)
        assert before["fine_tuned_answer"] and any(before["reviews"].values())

        backup = subprocess.run([*CLI, "backup", "create", str(archive)], env=stack.env, capture_output=True,
                                text=True, timeout=300)
        assert backup.returncode == 0, backup.stderr
        lap("backup (running)")
    lap("stop")
    shutil.rmtree(old_home)  # nothing may point back into it

    restore_env = {**stack.env, "VBATCH_HOME": str(new_home), "DAGSTER_HOME": str(new_home / "dagster")}
    restore = subprocess.run([*CLI, "backup", "restore", str(archive), "--home", str(new_home)], env=restore_env,
                             capture_output=True, text=True, timeout=300)
    assert restore.returncode == 0, restore.stderr
    lap("restore")
    with running_stack(new_home, tiny_model_path, **{**env, "VBATCH_LABEL_STUDIO_PORT": str(free_port())}) as again:
        lap("up (restored)")
        after = answers(again, made)
        lap("answers")
    expected = json.loads(json.dumps(before).replace(str(old_home), str(new_home)))  # paths it shows: new home
    after = json.loads(json.dumps(after))
    for key in expected:
        if key != "webhooks":
            assert after[key] == expected[key], key
    assert after["webhooks"] == [f"{again.api_url}/v1/webhooks/label-studio"], after["webhooks"]  # moved along
    print(f"\nbackup {archive.stat().st_size / 2**20:.1f} MiB; timings (s): {timings}; "
          f"total {time.monotonic() - started:.0f} s\n{backup.stdout}{restore.stdout}")
