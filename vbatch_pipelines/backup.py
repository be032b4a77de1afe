"""Backup and restore: a running platform's state as one archive, and that archive onto an empty home.

What goes in: a consistent snapshot of every database first — SQLite through its online backup API (a live
WAL database's files are never copied), PostgreSQL through ``pg_dump`` — in the order that makes what changed
between two snapshots safe to read again (Dagster's run and sensor state, then the metadata DB, then Label
Studio's: a sensor cursor is never ahead of what it read), then the files those rows name: uploads and batch
results, datasets, fine-tunes (adapters, checkpoints, reports), the managed Label Studio's data and credentials,
Dagster's home (runs, event logs, sensor cursors, compute logs). Installed models' weights only with
``with_models``; without them an installed hub model is downloaded again, at its pinned revision, after a
restore. Left out: what belongs to one running node and `vbatch up` makes again (engines/, run/, logs/,
dagster.yaml), and an external Label Studio (it keeps its own data).

The archive is a tar (gzip when its name ends in .gz or .tgz) whose first member, ``manifest.json``, gives its
format, the vbatch version, the metadata DB's Alembic revision, when and from where, and every member's size
and sha256. Files are staged first (hard links where the filesystem allows, so a file replaced meanwhile keeps
the content it had), then hashed, then written; a file that changed on its way into the archive fails the
backup rather than go in with a wrong checksum.

A restore refuses before it writes anything: a missing manifest, an unknown format, a truncated archive, a
member whose bytes do not match the manifest, a member that is a link or would land outside its place, a
metadata DB newer than this code knows, a target (home, store, Dagster home, database) that is not empty. It
then extracts into scratch directories beside the targets, restores the PostgreSQL dumps, points every path
the metadata DB stores at the new home, and renames the scratch directories into place.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import subprocess
import tarfile
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit, urlunsplit

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.paths import UnsafePath, inside
from vbatch_pipelines.settings import Settings

FORMAT = 1
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_MEMBER_NAME = 4096
SQLITE_MAGIC = b"SQLite format 3\x00"
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")
METADATA_SQLITE = "databases/metadata.sqlite3"
AREAS = ("store", "home", "dagster", "label-studio", "databases")  # the first part of every member's name
CHUNK = 1024 * 1024


class BackupError(VbatchError):
    """A backup that cannot be made, or an archive that cannot be restored, and why."""

    code = "backup_error"


# -- where things are -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Places:
    """Where a home's pieces live, for one set of settings."""

    home: Path
    store: Path
    dagster_home: Path
    label_studio: Path | None  # the managed Label Studio's directory (None: an external one)
    database_url: str
    dagster_database_url: str | None
    label_studio_database_url: str | None

    @classmethod
    def of(cls, settings: Settings) -> Places:
        layout, curation = settings.layout(), settings.curation
        return cls(home=settings.storage.home.resolve(), store=layout.shared.resolve(),
                   dagster_home=settings.dagster.home.expanduser().resolve(),
                   label_studio=None if curation.label_studio_url else layout.label_studio_dir.resolve(),
                   database_url=settings.storage.database_url, dagster_database_url=settings.dagster.database_url,
                   label_studio_database_url=None if curation.label_studio_url else curation.label_studio_database_url)

    @property
    def sqlite_path(self) -> Path | None:
        """The metadata DB's file when it is SQLite."""
        if not self.database_url.startswith("sqlite:///"):
            return None
        return Path(self.database_url.removeprefix("sqlite:///")).expanduser().resolve()

    def postgres(self) -> dict[str, str]:
        """The PostgreSQL databases in use, by role."""
        urls = {"metadata": None if self.sqlite_path else self.database_url,
                "dagster": self.dagster_database_url, "label_studio": self.label_studio_database_url}
        return {role: url for role, url in urls.items() if url}

    def area_root(self, area: str) -> Path:
        return {"store": self.store, "home": self.home, "dagster": self.dagster_home,
                "label-studio": self.label_studio}[area]


def _is_within(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


# -- backup ---------------------------------------------------------------------------------------


@dataclass
class Staged:
    name: str  # the member's name in the archive
    path: Path  # its staged copy
    mode: int = 0o600
    mtime: float = 0.0  # kept: the API shows some (a model's "created" is its directory's)
    size: int = 0
    sha256: str = ""


@dataclass
class Stage:
    """What goes in the archive, gathered in a scratch directory beside it."""

    root: Path
    members: list[Staged] = field(default_factory=list)
    directories: dict[str, float] = field(default_factory=dict)  # member name -> mtime, empty ones included

    def target(self, name: str) -> Path:
        path = self.root.joinpath(*PurePosixPath(name).parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, name: str, path: Path, source: Path | None = None) -> None:
        """``name`` staged at ``path``, with the mode and time of ``source`` (the file it stands for)."""
        stat = (source or path).stat()
        self.members.append(Staged(name, path, stat.st_mode & 0o777, stat.st_mtime))

    def sqlite(self, source: Path, name: str) -> None:
        """A consistent copy of a live SQLite database through its online backup API: one step, under one read
        transaction, so the copy is the database as of one commit, WAL content included."""
        target = self.target(name)
        src = sqlite3.connect(str(source), timeout=30)
        try:
            dst = sqlite3.connect(str(target))
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
            finally:
                dst.close()
        except sqlite3.Error as exc:
            raise BackupError(f"could not snapshot the SQLite database {source}: {exc}") from None
        finally:
            src.close()
        self.add(name, target, source)

    def file(self, source: Path, name: str) -> None:
        """A hard link to the file (its content as of now even if it is replaced later), a copy across
        filesystems; a file gone meanwhile (a temporary renamed into place) is left out."""
        target = self.target(name)
        try:
            try:
                os.link(source, target)
            except OSError:
                shutil.copyfile(source, target)
            self.add(name, target, source)
        except FileNotFoundError:
            target.unlink(missing_ok=True)

    def hash(self) -> None:
        for member in self.members:
            member.size = member.path.stat().st_size
            digest = hashlib.sha256()
            with open(member.path, "rb") as handle:
                for chunk in _chunks(handle, member.size):
                    digest.update(chunk)
            member.sha256 = digest.hexdigest()


def _chunks(handle: BinaryIO, size: int) -> Iterator[bytes]:
    left = size
    while left > 0:
        chunk = handle.read(min(CHUNK, left))
        if not chunk:
            raise BackupError(f"{getattr(handle, 'name', 'a file')} is shorter than {size} bytes")
        left -= len(chunk)
        yield chunk


def _is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(16) == SQLITE_MAGIC
    except OSError:
        return False


def _walk(root: Path, excluded: frozenset[Path], directories: bool = False) -> Iterator[Path]:
    """Regular files under ``root`` (its directories with ``directories``) but not in ``excluded``; symlinked
    directories are not followed. In a stable order."""
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if Path(directory, d) not in excluded)
        if directories:
            yield from (Path(directory, d) for d in dirs)
            continue
        for name in sorted(files):
            path = Path(directory) / name
            if path not in excluded and not _transient(path) and path.is_file():
                yield path


def _transient(path: Path) -> bool:
    """A file being written (write_atomic's and build_once's temporaries) or a lock: never state."""
    return path.name.endswith((".tmp", ".part", ".partial", ".lock")) or path.parent.name.endswith(".building")


@dataclass
class Tree:
    """A directory that goes in the archive under the member name prefix ``name``; with ``databases`` its
    SQLite databases are snapshotted (and their -wal, -shm files left), every other file is taken as it is."""

    source: Path
    name: str
    databases: bool = False
    excluded: frozenset[Path] = frozenset()

    def files(self) -> Iterator[tuple[Path, str, bool]]:
        """(source, member name, is a database) of each file to take, databases first."""
        if not self.source.is_dir():
            return
        paths = list(_walk(self.source, self.excluded))
        found = [p for p in paths if self.databases and _is_sqlite(p)]
        side = {Path(str(db) + suffix) for db in found for suffix in SQLITE_SIDE_FILES}
        for path in found + [p for p in paths if p not in side and p not in found]:
            yield path, self.member(path), path in found

    def member(self, path: Path) -> str:
        return f"{self.name}/{path.relative_to(self.source).as_posix()}"

    def directories(self) -> Iterator[tuple[str, float]]:
        if self.source.is_dir():
            for path in _walk(self.source, self.excluded, directories=True):
                if not path.name.endswith(".building"):
                    yield self.member(path), path.stat().st_mtime


def _trees(settings: Settings, places: Places, with_models: bool) -> list[Tree]:
    """Dagster's home and the managed Label Studio (databases and files), then the store and the home: everything
    but what `vbatch up` makes again for a node (its engines' state, run dir, logs, dagster.yaml), the metadata
    DB (snapshotted on its own) and, unless asked, installed models' weights. Listed in the order their databases
    are snapshotted: Dagster's sensor cursors before what they point into."""
    layout = settings.layout()
    own = [Tree(places.dagster_home, "dagster", True, frozenset({places.dagster_home / "dagster.yaml"}))]
    if places.label_studio is not None:  # its pid, port and log are the running server's
        own.append(Tree(places.label_studio, "label-studio", True,
                        frozenset(places.label_studio / f"server.{kind}" for kind in ("json", "log", "lock"))))
    skipped = {layout.engines_dir, layout.run_dir, layout.logs_dir, *(tree.source for tree in own)}
    if not with_models:
        skipped.add(layout.models_dir)
    if places.sqlite_path is not None:
        skipped |= {places.sqlite_path, *(Path(f"{places.sqlite_path}{s}") for s in SQLITE_SIDE_FILES)}
    trees = [Tree(places.store, "store", excluded=frozenset(p.resolve() for p in skipped | {places.home}))]
    if places.home != places.store:
        trees.append(Tree(places.home, "home", excluded=frozenset(p.resolve() for p in skipped | {places.store})))
    return own + trees


def create_backup(settings: Settings, archive: Path, *, with_models: bool = False,
                  log: Callable[[str], None] = lambda message: None) -> dict[str, Any]:
    """Write ``archive`` (it must not exist) from the platform these settings describe, running or not;
    returns its manifest."""
    places = Places.of(settings)
    archive = archive.expanduser().resolve()
    if archive.exists():
        raise BackupError(f"{archive} exists: give the backup a new name", "path")
    for root in (places.home, places.store, places.dagster_home):
        if _is_within(archive, root):
            raise BackupError(f"{archive} is inside {root}, which the backup reads: write it elsewhere", "path")
    if not archive.parent.is_dir():
        raise BackupError(f"{archive.parent} is not a directory", "path")
    started = time.monotonic()
    stage = Stage(archive.with_name(f".{archive.name}.{uuid.uuid4().hex[:8]}.staging"))
    stage.root.mkdir(mode=0o700)
    try:
        trees = _trees(settings, places, with_models)
        databases, revision = _snapshot_databases(places, trees, stage)
        log(f"databases snapshotted in {time.monotonic() - started:.1f}s")
        for tree in trees:
            for source, name, is_database in tree.files():
                if not is_database:
                    stage.file(source, name)
            stage.directories.update(tree.directories())
        stage.hash()
        manifest = {
            "format": FORMAT, "vbatch_version": _vbatch_version(), "created_at": int(time.time()),
            "alembic_revision": revision, "with_models": with_models,
            "source": {"home": str(places.home), "store": str(places.store), "dagster_home": str(places.dagster_home),
                       "label_studio": "managed" if places.label_studio is not None else "external"},
            "databases": databases,
            "members": [{"name": m.name, "size": m.size, "sha256": m.sha256, "mode": m.mode, "mtime": m.mtime}
                        for m in stage.members],
            "directories": [{"name": name, "mtime": mtime} for name, mtime in sorted(stage.directories.items())],
        }
        _write_archive(archive, manifest, stage.members)
    finally:
        shutil.rmtree(stage.root, ignore_errors=True)
    log(f"{archive}: {len(manifest['members'])} members, {archive.stat().st_size / 2**20:.1f} MiB, "
        f"in {time.monotonic() - started:.1f}s")
    return manifest


def _snapshot_databases(places: Places, trees: list[Tree], stage: Stage) -> tuple[dict, str | None]:
    """Every database, before any file, in this order: Dagster's, the metadata DB, Label Studio's. Returns the
    manifest's ``databases`` (role -> kind, and the member of a dump) and the metadata DB's Alembic revision."""
    postgres = places.postgres()
    dumps: dict[tuple, str] = {}  # one dump per PostgreSQL database, whatever roles share it
    databases: dict[str, dict] = {}

    def snapshot(role: str, tree: Tree | None) -> None:
        if role in postgres:
            key = _database_identity(postgres[role])
            if key not in dumps:
                dumps[key] = f"databases/postgresql-{len(dumps) + 1}.dump"
                _pg_dump(postgres[role], stage.target(dumps[key]))
                stage.add(dumps[key], stage.root / dumps[key])
            databases[role] = {"kind": "postgresql", "member": dumps[key]}
        else:
            databases[role] = {"kind": "sqlite"}
        for source, name, is_database in tree.files() if tree is not None else ():
            if is_database:  # SQLite files in the tree (its storage, unless that is PostgreSQL)
                stage.sqlite(source, name)

    own = {tree.name: tree for tree in trees}
    snapshot("dagster", own["dagster"])
    if "metadata" in postgres:
        revision = _revision(postgres["metadata"])
        snapshot("metadata", None)
    else:
        if places.sqlite_path is None or not places.sqlite_path.exists():
            raise BackupError(f"there is no metadata DB at {places.sqlite_path}: nothing to back up")
        stage.sqlite(places.sqlite_path, METADATA_SQLITE)
        databases["metadata"] = {"kind": "sqlite", "member": METADATA_SQLITE}
        revision = _revision(f"sqlite:///{stage.root / METADATA_SQLITE}")
    if "label-studio" in own and own["label-studio"].source.is_dir():
        snapshot("label_studio", own["label-studio"])
    return databases, revision


class _HashingReader:
    def __init__(self, handle: BinaryIO):
        self.handle, self.digest = handle, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        return data


def _write_archive(archive: Path, manifest: dict, members: list[Staged]) -> None:
    """The tar, manifest first, written to a temporary name (0600: it holds credentials) and renamed when whole."""
    partial = archive.with_name(f".{archive.name}.{uuid.uuid4().hex[:8]}.partial")
    data = json.dumps(manifest, indent=1).encode()
    mode = "w:gz" if archive.name.endswith((".gz", ".tgz")) else "w"
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "wb") as raw:
            options = {"compresslevel": 6} if mode == "w:gz" else {}
            with tarfile.open(fileobj=raw, mode=mode, format=tarfile.PAX_FORMAT, **options) as tar:
                now = int(time.time())
                tar.addfile(_info(MANIFEST, len(data), 0o600, now), _BytesReader(data))
                for member in members:
                    with open(member.path, "rb") as handle:
                        reader = _HashingReader(handle)
                        tar.addfile(_info(member.name, member.size, member.mode, now), reader)
                    if reader.digest.hexdigest() != member.sha256:
                        raise BackupError(f"{member.name} changed while it was being backed up: run the backup again")
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(partial, archive)
    finally:
        partial.unlink(missing_ok=True)


class _BytesReader:
    def __init__(self, data: bytes):
        self.data, self.offset = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.offset + size
        chunk, self.offset = self.data[self.offset:end], min(end, len(self.data))
        return chunk


def _info(name: str, size: int, mode: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, mode, mtime, tarfile.REGTYPE
    return info


def _vbatch_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("vbatch")
    except PackageNotFoundError:
        return "unknown"


def _revision(url: str) -> str | None:
    """The Alembic revision of the metadata DB at ``url`` (a staged SQLite copy, or the live PostgreSQL)."""
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url, schema_revision

    engine = sa.create_engine(normalize_url(url))
    try:
        with engine.connect() as conn:
            return schema_revision(conn)
    except sa.exc.SQLAlchemyError as exc:
        raise BackupError(f"the metadata DB at {_redacted(url)} cannot be read: {exc.__class__.__name__}") from None
    finally:
        engine.dispose()


# -- PostgreSQL -----------------------------------------------------------------------------------


def _database_identity(url: str) -> tuple:
    parts = urlsplit(url)
    return ((parts.hostname or "127.0.0.1").lower(), parts.port or 5432, parts.path.lstrip("/") or "postgres")


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    host = f"{parts.hostname or ''}{f':{parts.port}' if parts.port else ''}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _libpq(url: str) -> tuple[str, dict[str, str]]:
    """The URL for pg_dump/pg_restore without its password, and the environment that carries it (an argument
    would show in ps)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    netloc = f"{user}@{parts.hostname or '127.0.0.1'}:{parts.port or 5432}"
    env = {**os.environ}
    if parts.password:
        env["PGPASSWORD"] = unquote(parts.password)
    return urlunsplit(("postgresql", netloc, parts.path or "/postgres", parts.query, "")), env


def _pg_engine(url: str):
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url

    return sa.create_engine(normalize_url(url), connect_args={"connect_timeout": 10})


def _pg_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BackupError(f"{name} is not installed (the PostgreSQL client tools, e.g. `apt install "
                          "postgresql-client`): it is needed for the PostgreSQL databases")
    return path


def _pg_dump(url: str, target: Path) -> None:
    dsn, env = _libpq(url)
    done = subprocess.run([_pg_tool("pg_dump"), "--format=custom", "--no-owner", "--no-privileges",
                           "--file", str(target), "--dbname", dsn], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"pg_dump of {_redacted(url)} failed: {done.stderr.strip()[-2000:]}")


def _pg_restore(url: str, dump: Path) -> None:
    dsn, env = _libpq(url)
    done = subprocess.run([_pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error",
                           "--single-transaction", "--dbname", dsn, str(dump)], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BackupError(f"pg_restore into {_redacted(url)} failed (nothing was restored there): "
                          f"{done.stderr.strip()[-2000:]}")


def _pg_tables(url: str) -> int:
    """How many tables the database holds (0: empty, a restore may go there)."""
    import sqlalchemy as sa

    engine = _pg_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM information_schema.tables WHERE table_schema NOT IN "
                                        "('pg_catalog', 'information_schema')")).scalar()
    except sa.exc.SQLAlchemyError as exc:
        raise BackupError(f"the database {_redacted(url)} cannot be reached: {exc.__class__.__name__}") from None
    finally:
        engine.dispose()


# -- reading an archive ---------------------------------------------------------------------------


def _member_parts(name: Any) -> tuple[str, ...]:
    """A member name's parts, refused unless it is relative, plain and in a known area (tar traversal)."""
    if not isinstance(name, str) or not name or len(name) > MAX_MEMBER_NAME or "\\" in name or "\0" in name:
        raise BackupError(f"archive member {name!r} is not a plain relative path")
    path = PurePosixPath(name)
    if path.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
        raise BackupError(f"archive member {name!r} would land outside its place (absolute or '..')")
    if name != MANIFEST and (len(path.parts) < 2 or path.parts[0] not in AREAS):
        raise BackupError(f"archive member {name!r} is not part of a vbatch backup")
    return path.parts


HEX64 = re.compile(r"[0-9a-f]{64}")


def _parse_manifest(data: bytes) -> dict[str, Any]:
    try:
        manifest = json.loads(data)
    except ValueError:
        raise BackupError("the archive's manifest.json is not JSON: the archive is corrupt") from None
    if not isinstance(manifest, dict) or "format" not in manifest:
        raise BackupError("the archive's manifest.json has no format: not a vbatch backup")
    if manifest["format"] != FORMAT:
        raise BackupError(f"the archive's format is {manifest['format']!r}; this vbatch reads format {FORMAT}: "
                          "restore it with the vbatch version that made it (or a newer one)")
    members, directories = manifest.get("members"), manifest.get("directories")
    if not isinstance(members, list) or not isinstance(directories, list) \
            or not isinstance(manifest.get("databases"), dict) or not isinstance(manifest.get("source"), dict):
        raise BackupError("the archive's manifest.json is incomplete: the archive is corrupt")
    for entry in directories:
        if not (isinstance(entry, dict) and isinstance(entry.get("mtime"), int | float)):
            raise BackupError(f"the archive's manifest has a malformed entry: {str(entry)[:200]}")
        _member_parts(entry.get("name"))
    names = set()
    for entry in members:
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and HEX64.fullmatch(entry["sha256"])
                and isinstance(entry.get("mode"), int) and 0 <= entry["mode"] <= 0o777
                and isinstance(entry.get("mtime"), int | float)):
            raise BackupError(f"the archive's manifest has a malformed entry: {str(entry)[:200]}")
        _member_parts(entry.get("name"))
        if entry["name"] in names or entry["name"] == MANIFEST:
            raise BackupError(f"the archive's manifest names {entry['name']!r} twice")
        names.add(entry["name"])
    databases = manifest["databases"]
    for role, entry in databases.items():
        if role not in ("metadata", "dagster", "label_studio") or not isinstance(entry, dict) \
                or entry.get("kind") not in ("sqlite", "postgresql") \
                or entry.get("member", METADATA_SQLITE if role == "metadata" else None) not in names | {None}:
            raise BackupError(f"the archive's manifest says its {role} database is {str(entry)[:200]}, which it does "
                              "not hold: the archive is corrupt")
    if "metadata" not in databases:
        raise BackupError("the archive's manifest names no metadata DB: the archive is corrupt")
    return manifest


@contextmanager
def _reading(archive: Path) -> Iterator[tarfile.TarFile]:
    """The archive as a stream of members (gzip or plain, told by its bytes); a truncated or damaged one raises
    BackupError naming it."""
    if not archive.is_file():
        raise BackupError(f"{archive} is not a file", "path")
    try:
        with tarfile.open(archive, "r|*") as tar:
            yield tar
    except BackupError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise BackupError(f"{archive} is truncated or corrupt ({exc.__class__.__name__}: {exc}); nothing was "
                          "restored") from None


def _copy_member(tar: tarfile.TarFile, member: tarfile.TarInfo, entry: dict, out: BinaryIO | None) -> None:
    """Read a member whole (into ``out`` when given), checking its type, size and checksum against the
    manifest."""
    if not member.isreg():
        kind = "a link" if member.issym() or member.islnk() else "not a regular file"
        raise BackupError(f"archive member {member.name!r} is {kind}: a vbatch backup holds regular files only")
    if member.size != entry["size"]:
        raise BackupError(f"archive member {member.name!r} has {member.size} bytes, its manifest says "
                          f"{entry['size']}: the archive is corrupt")
    source = tar.extractfile(member)
    digest, left = hashlib.sha256(), member.size
    while left > 0:
        chunk = source.read(min(CHUNK, left))
        if not chunk:
            raise BackupError(f"archive member {member.name!r} ends early: the archive is truncated")
        digest.update(chunk)
        if out is not None:
            out.write(chunk)
        left -= len(chunk)
    if digest.hexdigest() != entry["sha256"]:
        raise BackupError(f"archive member {member.name!r} does not match its checksum: the archive is corrupt")


def _members(archive: Path, visit: Callable[[tarfile.TarFile, tarfile.TarInfo, dict], None]) -> dict[str, Any]:
    """Read the archive through: the manifest first, then each member handed to ``visit`` with its manifest
    entry; every member the manifest names must come, and nothing else. Returns the manifest."""
    with _reading(archive) as tar:
        first = tar.next()
        if first is None or first.name != MANIFEST:
            raise BackupError(f"{archive} has no manifest.json first: it is not a vbatch backup (or is damaged)")
        if not first.isreg() or first.size > MAX_MANIFEST_BYTES:
            raise BackupError(f"{archive}'s manifest.json is not a plain file of at most {MAX_MANIFEST_BYTES} bytes")
        manifest = _parse_manifest(tar.extractfile(first).read())
        expected = {entry["name"]: entry for entry in manifest["members"]}
        seen: set[str] = set()
        while (member := tar.next()) is not None:
            entry = expected.get(member.name)
            if entry is None or member.name in seen:
                _member_parts(member.name)
                raise BackupError(f"archive member {member.name!r} is not in its manifest (or comes twice)")
            visit(tar, member, entry)
            seen.add(member.name)
    missing = [name for name in expected if name not in seen]
    if missing:
        raise BackupError(f"{archive} is truncated: {len(missing)} of its {len(expected)} members are missing "
                          f"(the first: {missing[0]})")
    return manifest


def verify_backup(archive: Path) -> dict[str, Any]:
    """Read the whole archive and check it against its manifest; returns the manifest."""
    return _members(archive.expanduser().resolve(), lambda tar, member, entry: _copy_member(tar, member, entry, None))


# -- restore --------------------------------------------------------------------------------------


class Placement:
    """Where each member goes: into a scratch copy beside the place that is renamed into position at the end —
    the home for everything inside it, else the piece's own place (a store, a Dagster home, a metadata DB file
    elsewhere)."""

    def __init__(self, places: Places):
        self.places = places
        self.token = uuid.uuid4().hex[:8]
        self.scratch: dict[Path, Path] = {}  # final place -> its scratch copy, for those written so far
        self.dumps = places.home.parent / f".{places.home.name}.dumps-{self.token}"  # PostgreSQL dumps, then gone

    def place(self, name: str) -> tuple[Path, Path] | None:
        """(where the member ends up, the place renamed into position with it); None for a PostgreSQL dump,
        restored into its database instead. A name that would land outside its place is refused."""
        parts = _member_parts(name)
        if name == METADATA_SQLITE:
            final = root = self.places.sqlite_path
        elif parts[0] == "databases":
            return None
        else:
            root = self.places.area_root(parts[0])
            if root is None:
                raise BackupError("the archive holds a managed Label Studio's data, but these settings name an "
                                  "external one (VBATCH_LABEL_STUDIO_URL): unset it to restore vbatch's own")
            try:
                final = inside(root, *parts[1:])
            except UnsafePath as exc:
                raise BackupError(f"archive member {name!r} would land outside its place: {exc}") from None
        return final, self.places.home if _is_within(final, self.places.home) else root

    def scratch_path(self, name: str) -> Path:
        placed = self.place(name)
        if placed is None:
            return self.dumps.joinpath(*PurePosixPath(name).parts[1:])
        final, root = placed
        scratch = self.scratch.setdefault(root, root.parent / f".{root.name}.restoring-{self.token}")
        return scratch / final.relative_to(root) if final != root else scratch

    def discard(self) -> None:
        for scratch in [*self.scratch.values(), self.dumps]:
            if scratch.is_dir():
                shutil.rmtree(scratch, ignore_errors=True)
            else:
                scratch.unlink(missing_ok=True)


def _empty(path: Path) -> bool:
    return not path.exists() and not path.is_symlink() or (path.is_dir() and not any(path.iterdir()))


def _check_targets(manifest: dict, places: Places, placement: Placement) -> dict[str, list[str]]:
    """Refuse unless everything the restore writes is empty or absent; returns each PostgreSQL dump's target
    roles (member -> roles)."""
    revision = manifest.get("alembic_revision")
    from vbatch_pipelines.store.db import known_revisions

    known = known_revisions()
    if revision is not None and revision not in known:
        raise BackupError(f"the archive's metadata DB is at migration {revision!r}, which this vbatch does not know "
                          f"(it knows up to {max(known)}): restore it with the vbatch version that made it or a newer "
                          "one")
    for final in {places.home, places.store, places.dagster_home}:
        if not _empty(final):
            raise BackupError(f"{final} is not empty: a backup is restored onto an empty home (choose a new --home, "
                              "and a new VBATCH_STORE and DAGSTER_HOME when they are set)", "home")
    for name in (entry["name"] for entry in manifest["members"]):
        placement.place(name)  # every member's place is known and inside it
    databases = manifest["databases"]
    metadata = databases.get("metadata") or {}
    if metadata.get("kind") == "sqlite" and places.sqlite_path is None:
        raise BackupError("the archive's metadata DB is SQLite but VBATCH_DATABASE_URL names PostgreSQL here: unset "
                          "it to restore (then move it to PostgreSQL as you would any SQLite home)")
    if metadata.get("kind") == "sqlite" and not _empty(places.sqlite_path):
        raise BackupError(f"{places.sqlite_path} exists: the metadata DB is restored onto none")
    targets = places.postgres()
    dumps: dict[str, list[str]] = {}
    for role, entry in databases.items():
        if entry.get("kind") == "postgresql":
            if role not in targets:
                variable = {"metadata": "VBATCH_DATABASE_URL", "dagster": "VBATCH_DAGSTER_DATABASE_URL",
                            "label_studio": "VBATCH_LABEL_STUDIO_DATABASE_URL"}[role]
                raise BackupError(f"the archive's {role} database is PostgreSQL: set {variable} to an empty "
                                  "PostgreSQL database to restore it into")
            dumps.setdefault(entry["member"], []).append(role)
        elif role in targets:
            raise BackupError(f"the archive's {role} database is SQLite but these settings name PostgreSQL for it")
    seen: dict[tuple, str] = {}
    for member, roles in dumps.items():
        identities = {_database_identity(targets[role]) for role in roles}
        if len(identities) != 1:
            raise BackupError(f"the archive has {' and '.join(roles)} in one PostgreSQL database; name one database "
                              "for them here too")
        identity = identities.pop()
        if identity in seen:
            raise BackupError(f"the archive has {roles[0]} and {seen[identity]} in different databases; name two "
                              "different databases for them here")
        seen[identity] = roles[0]
        if _pg_tables(targets[roles[0]]):
            raise BackupError(f"the database {_redacted(targets[roles[0]])} is not empty: a backup is restored into "
                              "an empty database")
    return dumps


def restore_backup(archive: Path, settings: Settings, log: Callable[[str], None] = lambda message: None) -> dict:
    """Restore ``archive`` onto the (empty) home, store, Dagster home and databases these settings name;
    returns its manifest. Nothing is written unless the whole archive checked out and every target is empty."""
    from vbatch_pipelines.instance import prepare_dagster_home

    archive = archive.expanduser().resolve()
    started = time.monotonic()
    manifest = verify_backup(archive)
    places = Places.of(settings)
    placement = Placement(places)
    dumps = _check_targets(manifest, places, placement)
    log(f"{archive} checked ({len(manifest['members'])} members) in {time.monotonic() - started:.1f}s")

    def extract(tar: tarfile.TarFile, member: tarfile.TarInfo, entry: dict) -> None:
        target = placement.scratch_path(member.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, entry["mode"] & 0o777 or 0o600)
        with os.fdopen(descriptor, "wb") as out:
            _copy_member(tar, member, entry, out)  # checked again: the archive may have changed since
        os.utime(target, (entry["mtime"], entry["mtime"]))

    try:
        _members(archive, extract)
        directories = [(placement.scratch_path(d["name"]), d["mtime"]) for d in manifest["directories"]
                       if placement.place(d["name"]) is not None]
        for path, _ in directories:
            path.mkdir(parents=True, exist_ok=True)
        for path, mtime in sorted(directories, key=lambda item: -len(item[0].parts)):  # a child's before its parent
            os.utime(path, (mtime, mtime))
        moves = _moves(manifest, places)
        if manifest["databases"]["metadata"]["kind"] == "sqlite":
            _repoint(f"sqlite:///{placement.scratch_path(METADATA_SQLITE)}", moves, manifest, places)
        targets = places.postgres()
        for member, roles in dumps.items():
            _pg_restore(targets[roles[0]], placement.scratch_path(member))
            if "metadata" in roles:
                _repoint(targets["metadata"], moves, manifest, places)
        shutil.rmtree(placement.dumps, ignore_errors=True)
        for final, scratch in placement.scratch.items():
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.is_dir():
                final.rmdir()  # empty (checked): the restored copy takes its place
            os.replace(scratch, final)
    except BaseException:
        placement.discard()
        raise
    prepare_dagster_home(settings)
    log(f"restored onto {places.home} in {time.monotonic() - started:.1f}s")
    return manifest


# -- pointing the metadata DB at the new home -----------------------------------------------------


def _moves(manifest: dict, places: Places) -> list[tuple[str, str]]:
    """(old prefix, new prefix) for each place that moved, the longest first: each top directory of the store and
    of the home where it went (a store that was the home may now be elsewhere), then the roots themselves."""
    source = manifest["source"]
    roots = {"home": (source.get("home"), places.home), "store": (source.get("store"), places.store),
             "dagster": (source.get("dagster_home"), places.dagster_home)}
    pairs = {}
    for entry in manifest["members"] + manifest["directories"]:
        area, top = PurePosixPath(entry["name"]).parts[:2]
        if area in ("store", "home") and roots[area][0]:
            pairs[f"{roots[area][0]}/{top}"] = str(roots[area][1] / top)
    for old, new in roots.values():
        pairs.setdefault(old, str(new))
    return sorted(((old, new) for old, new in pairs.items() if old and old != new), key=lambda pair: -len(pair[0]))


def moved(value: Any, moves: list[tuple[str, str]]) -> Any:
    """``value`` with every path under an old place (a whole string, or one inside JSON) under the new one."""
    if isinstance(value, str):
        for old, new in moves:
            if value == old or value.startswith(old + "/"):
                return new + value[len(old):]
        return value
    if isinstance(value, list):
        return [moved(item, moves) for item in value]
    if isinstance(value, dict):
        return {key: moved(item, moves) for key, item in value.items()}
    return value


def _vbatch_tables():
    """vbatch's own tables (with those of every installed extension): those whose paths are repointed."""
    from vbatch_pipelines.extensions import installed_extensions
    from vbatch_pipelines.store.models import Base

    for extension in installed_extensions():
        if extension.models is not None:
            extension.models()  # registers its tables on Base
    return Base.metadata.sorted_tables


def _repoint(url: str, moves: list[tuple[str, str]], manifest: dict, places: Places) -> None:
    """After a restore, in the restored metadata DB: every stored path points into the new home; the old node's
    engines are forgotten (`vbatch up` records its own); installed hub models whose weights were not in the
    archive are downloaded again at their pinned revision (the install sensor picks them up)."""
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url

    engine = sa.create_engine(normalize_url(url))
    try:
        with engine.begin() as conn:
            inspector = sa.inspect(conn)
            present = set(inspector.get_table_names())
            for table in _vbatch_tables():
                if table.name in present and moves:
                    _repoint_table(conn, table, {c["name"] for c in inspector.get_columns(table.name)}, moves)
            if "engines" in present:
                conn.execute(sa.text("DELETE FROM engines WHERE kind = 'managed'"))
            if "models" in present and not manifest.get("with_models"):
                _reinstall_models(conn, places)
    finally:
        engine.dispose()


def _repoint_table(conn, table, existing: set[str], moves: list[tuple[str, str]]) -> None:
    import sqlalchemy as sa

    columns = [c for c in table.columns if c.name in existing and isinstance(c.type, (sa.String, sa.Text, sa.JSON))]
    key = list(table.primary_key.columns)
    if not columns or not key:
        return
    matches = []
    for column in columns:
        for old, _ in moves:
            pattern = old.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            if isinstance(column.type, sa.JSON):
                matches.append(sa.cast(column, sa.Text).like(f"%{pattern}%", escape="\\"))
            else:
                matches.append(sa.or_(column == old, column.like(f"{pattern}/%", escape="\\")))
    for row in conn.execute(sa.select(*key, *columns).where(sa.or_(*matches))).mappings().all():
        changes = {c.name: new for c in columns if (new := moved(row[c.name], moves)) != row[c.name]}
        if changes:
            conn.execute(table.update().where(*(k == row[k.name] for k in key)).values(**changes))


def _reinstall_models(conn, places: Places) -> None:
    import sqlalchemy as sa

    models = sa.Table("models", sa.MetaData(), autoload_with=conn)
    models_dir = places.store / "models"
    rows = conn.execute(sa.select(models).where(models.c.kind == "base",
                                                models.c.status.in_(("ready", "installing")))).mappings().all()
    for row in rows:
        details = row["details"] if isinstance(row["details"], dict) else json.loads(row["details"] or "{}")
        if details.get("source_kind") == "local" or not _is_within(Path(row["path"]), models_dir):
            continue  # installed from a directory vbatch does not own: still there, or the operator's to bring
        details.pop("dagster_run_id", None)
        conn.execute(models.update().where(models.c.id == row["id"]).values(
            status="installing", details=details, updated_at=int(time.time())))
