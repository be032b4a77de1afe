"""The metadata DB: SQLAlchemy 2 on SQLite (default) or PostgreSQL, schema managed by Alembic."""

from __future__ import annotations

import fcntl
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.orm import Session, sessionmaker

from vbatch_pipelines.errors import VbatchError

_process_locks: dict[str, threading.Lock] = {}
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Its own version table: the same database may also hold Dagster's storage, which uses alembic_version.
VERSION_TABLE = "vbatch_alembic_version"
T = TypeVar("T")


class SchemaNotUpgraded(VbatchError):
    """The metadata DB lacks a migration this code relies on."""

    status = 503
    code = "schema_not_upgraded"


class SchemaTooNew(VbatchError):
    """The metadata DB was migrated by a newer vbatch, to a revision this code does not have."""

    status = 503
    code = "schema_too_new"


def migrations():
    """Alembic's view of this code's migrations (ScriptDirectory)."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return ScriptDirectory.from_config(config)


def known_revisions() -> set[str]:
    return {migration.revision for migration in migrations().walk_revisions()}


def schema_revision(connection) -> str | None:
    """The revision the metadata DB behind ``connection`` is at (None: no vbatch schema)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # WAL lets the API, sensors and run workers read while one of them writes.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


# A server that does not answer fails a connect in 10 s instead of never; a statement runs 2 min at most (vbatch's
# take milliseconds: one that runs longer holds locks others wait for); a peer that vanished is noticed by TCP
# keepalives within about a minute. Migrations lift the statement limit for their own transaction.
POSTGRES_TIMEOUTS = {"connect_timeout": 10, "options": "-c statement_timeout=120000", "keepalives": 1,
                     "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}
def _lock_what_is_read(state) -> None:
    """Session hook: a ``with_for_update`` read that opens its session's transaction begins it with
    ``BEGIN IMMEDIATE`` on SQLite (which ignores FOR UPDATE, and which pysqlite would begin only at the first
    write, leaving the read outside): the write lock is held from the read on, as ``SELECT ... FOR UPDATE`` holds
    the row on PostgreSQL. Other transactions keep pysqlite's way (begun at their first write), so a plain
    read-then-write never meets a snapshot another writer made stale."""
    session = state.session
    if state.is_select and state.statement._for_update_arg is not None \
            and session.bind.dialect.name == "sqlite" and not session.info.get(_BEGUN):
        session.connection().exec_driver_sql("BEGIN IMMEDIATE")


_BEGUN = "vbatch_transaction_begun"  # Session.info: its transaction has begun on a connection


def _begun(session, _transaction, _connection) -> None:
    session.info[_BEGUN] = True


def _ended(session, transaction) -> None:
    if transaction.parent is None:
        session.info.pop(_BEGUN, None)


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg2 here (SQLAlchemy 2.1 would pick psycopg 3, not installed)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


class Database:
    def __init__(self, url: str):
        self.url = normalize_url(url)
        if self.url.startswith("sqlite:///"):
            Path(self.url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            # The pool hands a connection to one thread at a time, but may close it from another (at GC):
            # without check_same_thread=False sqlite3 complains about that close.
            self.engine: Engine = create_engine(self.url, connect_args={"timeout": 30, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(self.url, pool_pre_ping=True, pool_size=5, max_overflow=10,
                                        connect_args=POSTGRES_TIMEOUTS)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._install_id: str | None = None
        event.listen(self._sessions, "do_orm_execute", _lock_what_is_read)
        event.listen(self._sessions, "after_begin", _begun)
        event.listen(self._sessions, "after_transaction_end", _ended)

    def upgrade(self) -> tuple[str | None, str]:
        """Bring the schema to the newest migration this code has; returns the revisions before and after (None: a
        new DB). Idempotent, and one process at a time: the API's workers and the run workers of a new vbatch may
        all meet an old DB at once. A DB that a newer vbatch migrated is refused (SchemaTooNew) and left as it is.
        On SQLite the upgrade is one transaction, so one that fails leaves the DB as it was (PostgreSQL's DDL is
        transactional anyway)."""
        from alembic import command
        from alembic.config import Config

        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS_DIR))
        head = migrations().get_current_head()

        def revision(connection) -> str | None:
            """The DB's revision; SchemaTooNew when it is one this code lacks."""
            current = schema_revision(connection)
            if current is not None and current not in known_revisions():
                raise SchemaTooNew(
                    f"The metadata DB ({self.engine.url.render_as_string(hide_password=True)}) is at schema revision "
                    f"{current}, which this vbatch does not know (its newest is {head}): a newer vbatch upgraded it. "
                    "Run that version (or restore the DB from before the upgrade); this one leaves the DB as it is.")
            return current

        with self.engine.connect() as connection:  # every process starts here: mostly at head already, no lock
            before = revision(connection)
        if before == head:
            return before, head
        with self.engine.begin() as connection:
            # The lock: on PostgreSQL an advisory one for the transaction; on SQLite its write lock, taken from the
            # start (pysqlite would begin the transaction only at the first INSERT, leaving the DDL before it
            # outside); the next process waits for it up to busy_timeout.
            if self.engine.dialect.name == "postgresql":
                connection.exec_driver_sql("SET LOCAL statement_timeout = 0")  # a migration takes what it takes
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(724242)")
            else:
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            if revision(connection) != head:  # else another process upgraded it meanwhile
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
        return before, head

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._sessions() as session:
            with session.begin():
                yield session

    @contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """A lock held across every process that uses this database, for work that must not interleave
        (adding a batch's Dagster partitions in order): a PostgreSQL advisory lock, or a file lock beside a
        SQLite file (one machine, like SQLite itself)."""
        if self.engine.dialect.name == "postgresql":
            key = zlib.crc32(name.encode()) & 0x7FFFFFFF
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT pg_advisory_lock(%s)", (key,))
                try:
                    yield
                finally:
                    connection.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (key,))
                    connection.commit()
            return
        database = self.url.removeprefix("sqlite:///")
        if database in ("", ":memory:") or database == self.url:
            with _process_locks.setdefault(name, threading.Lock()):
                yield
            return
        with open(f"{database}.{name}.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def install_id(self) -> str:
        """This installation's id (migration 0016 made it), read once per process."""
        if self._install_id is None:
            from vbatch_pipelines.store.models import Installation

            row = self.get(Installation, "vbatch")
            if row is None:
                raise SchemaNotUpgraded("The metadata DB has no installation id: run `vbatch db upgrade`")
            self._install_id = row.id
        return self._install_id

    def get(self, model: type[T], key: str) -> T | None:
        """One row by primary key as a detached object, read without a Session: the hot read path
        (a batch polled by its clients) costs a quarter of ``Session.get``."""
        mapper = model.__mapper__  # type: ignore[attr-defined]
        table = mapper.local_table
        with self.engine.connect() as connection:
            row = connection.execute(select(table).where(table.primary_key.columns[0] == key)).mappings().first()
        if row is None:
            return None
        return model(**{attr.key: row[attr.columns[0].name] for attr in mapper.column_attrs})

    def dispose(self) -> None:
        self.engine.dispose()


@lru_cache(maxsize=8)
def get_database(url: str) -> Database:
    """One migrated Database per URL and process."""
    database = Database(url)
    database.upgrade()
    return database
