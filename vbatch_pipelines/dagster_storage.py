"""Dagster's SQLite event log (the embedded default) without an fsync per event.

Every Dagster event is a transaction on its run's own SQLite file, which Dagster opens in WAL mode; under
SQLite's default ``synchronous=FULL`` each commit waits for an fsync, and a run writes several events per
batch (each materialization twice: its run's file and the cross-run index), so a run over many batches
spent much of its time waiting on the disk. ``synchronous=NORMAL`` is SQLite's recommended setting with WAL:
it syncs at checkpoints, so a power cut may lose the last events but never corrupts a file. Each shard's
SQLAlchemy engine is also made once, and its connection kept open, instead of both once per event.
vbatch's own records are in its metadata DB, not here. For production, PostgreSQL (``VBATCH_DAGSTER_DATABASE_URL``) replaces all of this.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as db
from dagster._core.storage.event_log import SqliteEventLogStorage as DagsterSqliteEventLogStorage
from dagster._serdes import ConfigurableClassData
from sqlalchemy.pool import QueuePool

SQLITE_BUSY_TIMEOUT_SECONDS = 30
ENGINES_KEPT = 32  # shards are per run: keep the engines of the latest ones


def _normal_sync(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class SqliteEventLogStorage(DagsterSqliteEventLogStorage):
    """Dagster's ``SqliteEventLogStorage`` with ``synchronous=NORMAL`` and one open connection per shard."""

    def __init__(self, base_dir: str, inst_data: ConfigurableClassData | None = None):
        self._engines: OrderedDict[str, Any] = OrderedDict()
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

    def dispose(self) -> None:
        super().dispose()
        for engine in self._engines.values():
            engine.dispose()
        self._engines.clear()
