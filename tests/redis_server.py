"""A real Redis for cluster mode's broker on a machine that runs none: Debian's `redis-server` on a free port
of 127.0.0.1 (or of every address, for cluster test nodes in network namespaces of their own), with a password,
without persistence, in a directory of its own. The cluster tests (the ``redis_url`` fixture) and
benchmarks/bench_scale_out.py start it; it stops when the block ends."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vbatch_pipelines.net import free_port


@contextmanager
def redis_server(directory: Path, password: str, timeout: float = 20.0, bind: str = "127.0.0.1") -> Iterator[str]:
    """Yields the server's URL (127.0.0.1, password included) once it answers PING."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: `apt-get install -y redis-server` (make test-tools), "
                           "or name a running one (VBATCH_TEST_REDIS_URL, --redis)")
    port = free_port()
    with open(directory / "redis.log", "ab") as log:
        server = subprocess.Popen([binary, "--port", str(port), "--bind", bind, "--save", "", "--appendonly",
                                   "no", "--dir", str(directory), "--requirepass", password],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                redis.Redis.from_url(url, socket_timeout=1).ping()
                break
            except redis.RedisError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: {(directory / 'redis.log').read_text()[-2000:]}")
                time.sleep(0.1)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=20)
