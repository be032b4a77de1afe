"""Dagster's SQLite event log (the embedded default) without an fsync per event.

Every Dagster event is a transaction on its run's own SQLite file, which Dagster opens in WAL mode; under
SQLite's default ``synchronous=FULL`` each commit waits for an fsync, and a run writes several events per
batch (each materialization twice: its run's file and the cross-run index), so a run over many batches
spent much of its time waiting on the disk. ``synchronous=NORMAL`` is SQLite's recommended setting with WAL:
it syncs at checkpoints, so a power cut may lose the last events but never corrupts a file. Each shard's
SQLAlchemy engine is also made once, and its connection kept open, instead of both once per event. A batch
of asset events (what a run over many partitions plans and materializes: two events per batch per step)
is written in one transaction per file instead of one each (`vbatch up` turns on Dagster's event batching,
``DAGSTER_EVENT_BATCH_SIZE``). A new run's file is a copy of a template Dagster's own set-up made once, and a file
stamped with this Dagster's schema revision is taken as it is: Dagster checks (loading alembic's migration
scripts) and sets up every run's file in each process that opens it, ~60 ms a run on a small machine.
vbatch's own records are in its metadata DB, not here. For production, PostgreSQL (``VBATCH_DAGSTER_DATABASE_URL``) replaces all of this.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as db
from dagster import EventLogEntry
from sqlalchemy.pool import QueuePool

from vbatch_pipelines.dagster_ext._compat import ASSET_EVENTS, ConfigurableClassData, db_result
from vbatch_pipelines.dagster_ext._compat import SqliteEventLogStorage as DagsterSqliteEventLogStorage

SQLITE_BUSY_TIMEOUT_SECONDS = 30
ENGINES_KEPT = 32  # shards are per run: keep the engines of the latest ones


def _normal_sync(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _stamped_revision(path: str, *, immutable: bool = False) -> str | None:
    """The alembic revision a shard file is stamped with (None when it has none yet)."""
    mode = "immutable=1" if immutable else "mode=ro"  # the template never changes: no -shm beside it
    try:
        with sqlite3.connect(f"file:{path}?{mode}", uri=True, timeout=SQLITE_BUSY_TIMEOUT_SECONDS) as conn:
            row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


class SqliteEventLogStorage(DagsterSqliteEventLogStorage):
    """Dagster's ``SqliteEventLogStorage`` with ``synchronous=NORMAL`` and one open connection per shard."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self._engines: OrderedDict[str, Any] = OrderedDict()
        self._tables_seen: set[str] = set()
        self._template_info: tuple[str, str] | None = None
        super().__init__(base_dir, inst_data=inst_data)

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData | None, config_value: Any) -> SqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    def _engine(self, shard: str):
        engine = self._engines.get(shard)
        if engine is None:
            # One connection kept open per shard (this process's writes to a shard are serialised by _db_lock):
            # opening a SQLite file, and setting its pragmas, for every event cost more than the insert.
            engine = db.create_engine(self.conn_string_for_shard(shard), poolclass=QueuePool, pool_size=1,
                                      max_overflow=4, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_SECONDS,
                                                                    "check_same_thread": False})
            db.event.listen(engine, "connect", _normal_sync)
            self._engines[shard] = engine
            while len(self._engines) > ENGINES_KEPT:
                self._engines.popitem(last=False)[1].dispose()
        else:
            self._engines.move_to_end(shard)
        return engine

    def _template(self) -> tuple[str, str] | None:
        """(path, revision) of an empty shard set up by Dagster's own ``_initdb`` (once per Dagster version and
        base dir; made by whichever process needs it first), or None if it cannot be made."""
        if self._template_info is None:
            import dagster

            path = os.path.join(self._base_dir, f".shard-template-{dagster.__version__}.sqlite")
            try:
                if not os.path.exists(path):
                    scratch = f"{path}.{os.getpid()}.part"
                    engine = db.create_engine(f"sqlite:///{scratch}")
                    try:
                        super()._initdb(engine)
                        with engine.connect() as conn:  # everything in the main file, none in a -wal beside it
                            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                    finally:
                        engine.dispose()
                    os.replace(scratch, path)
                    for suffix in ("-wal", "-shm"):
                        if os.path.exists(scratch + suffix):
                            os.remove(scratch + suffix)
                revision = _stamped_revision(path, immutable=True)
            except (OSError, sqlite3.Error, db.exc.SQLAlchemyError):
                return None
            if revision is None:
                return None
            self._template_info = (path, revision)
        return self._template_info

    def _initdb(self, engine, for_index_shard: bool = False) -> None:
        template = None if for_index_shard else self._template()
        path = engine.url.database
        if template is not None and path:
            if not os.path.exists(path):
                scratch = f"{path}.{os.getpid()}.part"
                shutil.copyfile(template[0], scratch)
                try:
                    os.link(scratch, path)  # only if no other process made the file meanwhile
                    return
                except FileExistsError:
                    pass
                finally:
                    os.remove(scratch)
            if _stamped_revision(path) == template[1]:
                return
        super()._initdb(engine, for_index_shard)

    @contextmanager
    def _connect(self, shard: str) -> Iterator[Any]:
        with self._db_lock:
            engine = self._engine(shard)
            if shard not in self._initialized_dbs:
                self._initdb(engine)
                self._initialized_dbs.add(shard)
            with engine.connect() as conn:
                with conn.begin():
                    yield conn

    def has_table(self, table_name: str) -> bool:
        """Whether the index has ``table_name``; a table once seen is remembered. Dagster asks before every
        dynamic-partition lookup (each partition of a run's materializations, twice), and its answer opens a
        new SQLite engine and reflects the schema: ~5 ms each, half of a 20-batch run's bookkeeping."""
        if table_name in self._tables_seen:
            return True
        present = super().has_table(table_name)
        if present:
            self._tables_seen.add(table_name)
        return present

    def wipe(self) -> None:
        self._tables_seen.clear()
        super().wipe()

    def store_event_batch(self, events: Sequence[EventLogEntry]) -> None:
        """What ``store_event`` does for each event, in one transaction on the run's file and one on the index
        (Dagster's SQLite storage writes a batch one event at a time: ~8 ms each on a small machine, so 20
        batches launched together waited ~0.3 s for their run's planned events alone)."""
        if not all(event.is_dagster_event and event.dagster_event_type in ASSET_EVENTS for event in events):
            return super().store_event_batch(events)  # run and check events: one at a time, as Dagster does
        statements = [self.prepare_insert_event(event) for event in events]
        for run_id in dict.fromkeys(event.run_id for event in events):
            with self.run_connection(run_id) as conn:
                for event, statement in zip(events, statements):
                    if event.run_id == run_id:
                        conn.execute(statement)
        with self.index_transaction() as conn:  # mirrored in the cross-run index, as store_event does
            for event, statement in zip(events, statements):
                with db_result(conn, statement) as result:
                    event_id = result.inserted_primary_key[0]
                self._store_asset_event_tags(conn, [event], [event_id])
                self._store_asset_event(conn, event, event_id)

    def dispose(self) -> None:
        super().dispose()
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()
