"""Scale-out, end to end (the openai SDK -> the API -> a Dagster run -> the engines), on vLLM CPU servers of the
tiny model that vbatch did not start (VBATCH_ENGINES), as pods of a Deployment on GPU nodes would be.

1. Replicas: one batch on one vLLM replica vs the same batch spread over two, with each replica's busy
   fraction. The arms alternate, each on its own `vbatch up`: ``--trials`` times "one replica" (VBATCH_ENGINES
   names one) and "two replicas" (it names both). On this 2-core machine the two replicas share the same two
   cores, so the gain is bounded by the cores, not by the replicas: the figure shows that the work is spread
   (both busy) and what the spreading costs, not what two GPUs give.
2. Cluster overhead: a small batch (``--small`` requests, create -> completed, ``--batches`` in a row after a
   warm-up) on single-machine `vbatch up` (SQLite, as by default), on single-machine `vbatch up` with both
   stores on PostgreSQL, and on `vbatch up --mode cluster` + one `vbatch worker` (PostgreSQL for both stores,
   runs handed over Redis to the worker's Celery pool), all three on the same single replica. The arms
   alternate for ``--trials`` trials, each on a fresh stack and fresh databases (made on ``--postgres`` and
   dropped; default: as the tests pick a server); Redis is ``--redis`` or Debian's redis-server started here.
Every batch is checked: completed, each custom_id exactly once.

Usage: python benchmarks/bench_scale_out.py [--part all|replicas|overhead] [--requests 2000] [--trials 3]
       [--max-tokens 16] [--small 50] [--batches 5] [--postgres URL] [--redis URL]
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import EngineBusy, Stack, requests_jsonl  # noqa: E402
from tests.postgres_server import fresh_database  # noqa: E402 - the databases and broker the cluster tests use
from tests.redis_server import redis_server  # noqa: E402
from vbatch_pipelines.engine.vllm_env import find_vllm_python  # noqa: E402
from vbatch_pipelines.engine.vllm_server import ManagedVLLMServer, VLLMServerConfig  # noqa: E402
from vbatch_pipelines.models.registry import TINY_MODEL_ID, ModelSpec  # noqa: E402
from vbatch_pipelines.net import free_port  # noqa: E402
from vbatch_pipelines.settings import load_settings  # noqa: E402

MODEL = TINY_MODEL_ID
ENGINES_KEY = secrets.token_urlsafe(24)  # the replicas' key, as the platform is told it (VBATCH_ENGINES_API_KEY)


def start_replicas(count: int, model_path: str, root: Path) -> list[ManagedVLLMServer]:
    settings = load_settings()
    python = find_vllm_python(settings.engine.vllm_python, settings.storage.envs_dir, 0)
    if python is None:
        raise SystemExit("vLLM is not installed: run `vbatch engine install` (or `make engine`)")
    servers = []
    for n in range(count):
        server = ManagedVLLMServer(ModelSpec(MODEL, model_path), root / f"node-{n}",
                                   VLLMServerConfig(python=python, api_key=ENGINES_KEY))
        port = free_port()
        server.choose_port = lambda port=port: port
        servers.append(server)
    threads = [threading.Thread(target=server.ensure) for server in servers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return servers


def engine_env(urls: list[str], model_path: str) -> dict[str, str]:
    return {"VBATCH_ENGINE": "vllm", "VBATCH_MODELS": f"{MODEL}={model_path}",
            "VBATCH_ENGINES": ",".join(f"{MODEL}={url}" for url in urls), "VBATCH_ENGINES_API_KEY": ENGINES_KEY}


def check(stack: Stack, batch, requests: int) -> None:
    ids = stack.output_ids(batch)
    if batch.status != "completed" or len(ids) != len(set(ids)) or len(ids) != requests:
        raise AssertionError(f"{batch.id}: {batch.status}, {len(ids)} outputs, {len(set(ids))} distinct")


def one_arm(urls: list[str], model_path: str, data: bytes, servers: list[ManagedVLLMServer]) -> tuple[float, list]:
    stack = Stack(env=engine_env(urls, model_path))
    try:
        stack.run(requests_jsonl(20, "warm"))  # the run worker and both connections warm, as in use
        busy = [EngineBusy(pid=server.state()["pid"]) for server in servers]
        for sampler in busy:
            sampler.__enter__()
        seconds, batch = stack.run(data)
        for sampler in busy:
            sampler.__exit__(None, None, None)
        check(stack, batch, data.count(b"\n"))
        return seconds, [sampler.fraction for sampler in busy]
    finally:
        stack.stop()


def replicas(args, model_path: str, servers: list[ManagedVLLMServer], urls: list[str]) -> None:
    data = requests_jsonl(args.requests, "scale", max_tokens=args.max_tokens)
    results: dict[str, list[tuple[float, list]]] = {"one replica": [], "two replicas": []}
    for trial in range(args.trials):
        for arm, chosen in (("one replica", urls[:1]), ("two replicas", urls)):
            seconds, busy = one_arm(chosen, model_path, data, servers)
            results[arm].append((seconds, busy))
            print(f"trial {trial + 1} {arm}: {seconds:.2f} s, {args.requests / seconds:.0f} req/s, "
                  f"replicas busy {' / '.join(f'{b:.0%}' for b in busy)}", flush=True)
    one = statistics.median(s for s, _ in results["one replica"])
    two = statistics.median(s for s, _ in results["two replicas"])
    busy_two = [statistics.median(b[i] for _, b in results["two replicas"]) for i in range(2)]
    print(f"\n{args.requests} requests, medians of {args.trials}: one replica {one:.2f} s, two replicas {two:.2f} s "
          f"-> speed-up {one / two:.2f}x; with two, replicas busy {busy_two[0]:.0%} / {busy_two[1]:.0%} "
          f"(this machine: {os.cpu_count()} cores shared by both replicas)\n", flush=True)


OVERHEAD_ARMS = ("single, SQLite", "single, PostgreSQL", "cluster")


@contextmanager
def overhead_stack(arm: str, env: dict[str, str], postgres: str | None, redis: str) -> Iterator[Stack]:
    """A fresh stack for one arm of part 2, on databases made for it (dropped once it stopped)."""
    with ExitStack() as databases:
        stores = {} if arm == "single, SQLite" else {
            "VBATCH_DAGSTER_DATABASE_URL": databases.enter_context(fresh_database(postgres)),
            "VBATCH_DATABASE_URL": databases.enter_context(fresh_database(postgres))}
        if arm == "cluster":
            stack = Stack(env=env, cluster={**stores, "VBATCH_BROKER_URL": redis})
        else:
            stack = Stack(env={**env, **stores})
        try:
            yield stack
        finally:
            stack.stop()


def overhead(args, model_path: str, url: str, redis: str) -> None:
    data = requests_jsonl(args.small, "small", max_tokens=args.max_tokens)
    env = engine_env([url], model_path)
    times: dict[str, list[float]] = {arm: [] for arm in OVERHEAD_ARMS}
    for trial in range(args.trials):
        shift = trial % len(OVERHEAD_ARMS)  # each arm goes first in turn
        for arm in OVERHEAD_ARMS[shift:] + OVERHEAD_ARMS[:shift]:
            with overhead_stack(arm, env, args.postgres, redis) as stack:
                stack.run(requests_jsonl(20, "warm"))  # the run workers (or the Celery pool) warm, as in use
                seconds = []
                for _ in range(args.batches):
                    elapsed, batch = stack.run(data)
                    check(stack, batch, args.small)
                    seconds.append(elapsed)
            times[arm] += seconds
            print(f"trial {trial + 1} {arm}: median {statistics.median(seconds):.2f} s "
                  f"({min(seconds):.2f}-{max(seconds):.2f}) over {args.batches} batches", flush=True)
    single, postgres, cluster = (statistics.median(times[arm]) for arm in OVERHEAD_ARMS)
    print(f"\n{args.small}-request batch, create -> completed, medians of {args.trials} trials x {args.batches} "
          f"batches on one replica: single-machine on SQLite {single:.2f} s, on PostgreSQL {postgres:.2f} s, cluster "
          f"mode (PostgreSQL, one Celery worker) {cluster:.2f} s -> cluster / single-machine {cluster / single:.2f}x "
          f"({cluster - single:+.2f} s): PostgreSQL {postgres / single:.2f}x ({postgres - single:+.2f} s), the "
          f"Celery hand-off {cluster / postgres:.2f}x ({cluster - postgres:+.2f} s)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=("all", "replicas", "overhead"), default="all")
    parser.add_argument("--requests", type=int, default=2000, help="part 1's batch")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--small", type=int, default=50, help="part 2's batch")
    parser.add_argument("--batches", type=int, default=5, help="part 2's timed batches per arm and trial")
    parser.add_argument("--postgres", default=None, help="part 2: the PostgreSQL server (an admin URL) to make "
                        "fresh databases on; default VBATCH_TEST_POSTGRES_URL, 127.0.0.1:5432, or one started here")
    parser.add_argument("--redis", default=None, help="part 2: the broker (redis://...); default: Debian's "
                        "redis-server started here on a free port")
    args = parser.parse_args()
    from vbatch_pipelines.models.tiny import create_tiny_model

    root = Path(tempfile.mkdtemp(prefix="vbatch-scale-out-"))
    model_path = str(create_tiny_model(root / "model"))
    with ExitStack() as broker:
        redis = args.redis
        if redis is None and args.part in ("all", "overhead"):  # before part 1: no redis-server fails at once
            (root / "redis").mkdir()
            redis = broker.enter_context(redis_server(root / "redis", secrets.token_hex(12)))
        servers = start_replicas(1 if args.part == "overhead" else 2, model_path, root)
        urls = [server.url_of(server.state()) for server in servers]
        try:
            if args.part in ("all", "replicas"):
                replicas(args, model_path, servers, urls)
            if args.part in ("all", "overhead"):
                overhead(args, model_path, urls[0], redis)
        finally:
            for server in servers:
                server.stop()
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
