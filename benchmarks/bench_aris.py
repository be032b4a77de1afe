"""The Aris extension against a real Aristotle database (a fresh one in the local PostgreSQL, the design notes'
DDL) and vbatch's metadata DB (SQLite in a temp home).

1. ``aristotle_sensor``, one tick over 10,000 changed linked conquests, their changes recorded as pending links
   (target <= 10 s); peer: the bare SELECT of those rows.
2. A full sync of 1,000 pending gold stars to Aristotle (``aris_sync`` materialized in-process: a shortcut
   figure, without the run's launch) — VICTORY plus one rating row each, compare-and-set (target <= 10 s);
   peer: the same UPDATE + INSERT statements in one bare loop.
3. ``GET /v1/icl/examples`` with 20 concurrent clients (each asking 10 times a second, open loop) over 10,000
   examples, through a real uvicorn API (target p99 <= 50 ms); peer: GET /health under the same load. Then
   the saturation point (20 clients, no pause).

Usage: python benchmarks/bench_aris.py [--changed 10000] [--stars 1000] [--examples 10000] [--seconds 15] [--rate 10]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench_api import pct, poll_in_subprocess, wrk  # noqa: E402 - the same open-loop clients as the API benchmark

POSTGRES_URL = os.environ.get("VBATCH_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PHILOSOPHER, DOMAIN = "ada@example.com", "engineering"


def create_aristotle() -> tuple[str, str]:
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url

    name = f"bench_aris_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(normalize_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    admin.dispose()
    url = POSTGRES_URL.rsplit("/", 1)[0] + f"/{name}"
    engine = sa.create_engine(normalize_url(url))
    with engine.begin() as connection:
        connection.exec_driver_sql((ROOT / "tests" / "data" / "aristotle.sql").read_text())
    engine.dispose()
    return name, url


def drop_aristotle(name: str) -> None:
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url

    admin = sa.create_engine(normalize_url(POSTGRES_URL), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


def seed(db, aristotle_engine, prefix: str, n: int, *, starred: bool, agreed_victory: bool) -> dict[str, int]:
    """n conquests in Aristotle, each with a curation task and a link in vbatch: conquest id -> task id."""
    from sqlalchemy import insert, text

    from integrations.aris.models import ArisLink
    from vbatch_pipelines.store.models import CurationTask

    offset = {"tick": 1_000_000, "star": 2_000_000, "icl": 3_000_000}[prefix]  # Label Studio task ids
    ids = {f"{prefix}-{i:05d}": offset + i for i in range(n)}
    with aristotle_engine.begin() as connection:
        connection.execute(text("""INSERT INTO "Conquest" (id, "conquestType", philosopher, domain, result)
                                   VALUES (:id, 'candidate_evaluation', :p, :d, :r)"""),
                           [{"id": c, "p": PHILOSOPHER, "d": DOMAIN, "r": "VICTORY" if agreed_victory else "PENDING"}
                            for c in ids])
        stamps = dict(connection.execute(text('SELECT id, "updatedAt" FROM "Conquest" WHERE id LIKE :p'),
                                         {"p": f"{prefix}-%"}).all())
    now = int(time.time())
    with db.engine.begin() as connection:
        connection.execute(insert(CurationTask), [
            {"batch_id": f"bench-{prefix}", "custom_id": c, "schema": "candidate_evaluation", "model": "m",
             "messages": [{"role": "user", "content": f"Evaluate candidate {c} for the platform team."}],
             "response": f"Candidate {c} is a fit.", "ls_task_id": t, "project_id": 1, "gold_star": starred,
             "annotated": starred, "rating": 5 if starred else None, "reviewer": "expert@example.com",
             "created_at": now, "reviewed_at": now, "changed_seq": now} for c, t in ids.items()])
        connection.execute(insert(ArisLink), [
            {"conquest_id": c, "ls_task_id": t, "batch_id": f"bench-{prefix}", "philosopher": PHILOSOPHER,
             "domain": DOMAIN, "conquest_type": "candidate_evaluation", "agreed_gold": agreed_victory,
             "seen_result": "VICTORY" if agreed_victory else "PENDING",
             "seen_updated_at": stamps[c].isoformat(timespec="microseconds"), "pending": False, "attempts": 0,
             "next_attempt_at": 0, "icl_uses": 0, "example_since": now if agreed_victory else None,
             "created_at": now, "updated_at": now} for c, t in ids.items()])
    return ids


def bench_sensor(db, resources, aristotle_engine, n: int) -> None:
    from dagster import DagsterInstance, RunRequest, build_sensor_context
    from sqlalchemy import text

    from integrations.aris.defs import aristotle_sensor
    from integrations.aris.sync import pending_links

    seed(db, aristotle_engine, "tick", n, starred=False, agreed_victory=False)
    with DagsterInstance.ephemeral() as instance:
        context = build_sensor_context(instance=instance, resources={
            "metadata_db": resources.metadata_db, "aristotle": resources["aristotle"],
            "label_studio": resources.label_studio})
        aristotle_sensor(context)  # the first tick: the whole table, nothing differs from what was seen
        with aristotle_engine.begin() as connection:  # the Aristotle app decides every one of them
            connection.execute(text("""UPDATE "Conquest" SET result = 'DEFEAT', "updatedAt" = now()
                                       WHERE id LIKE 'tick-%'"""))
        started = time.monotonic()
        result = aristotle_sensor(context)
        tick_s = time.monotonic() - started
    pending = len(pending_links(db, due_only=False))
    started = time.monotonic()
    with aristotle_engine.connect() as connection:
        rows = connection.execute(text('SELECT id, result, "updatedAt" FROM "Conquest" WHERE "updatedAt" > '
                                       "now() - interval '10 minutes' ORDER BY \"updatedAt\", id")).all()
    peer_s = time.monotonic() - started
    print(f"1) aristotle_sensor, one tick over {n:,} changed conquests: {tick_s:.2f}s ({pending:,} changes recorded "
          f"as pending, run requested: {isinstance(result, RunRequest)}; target <= 10 s); peer: the bare SELECT of "
          f"{len(rows):,} rows {peer_s:.2f}s -> ratio {tick_s / peer_s:.1f}x", flush=True)
    from integrations.aris.models import ArisLink

    with db.session() as session:  # leave them agreed, out of the next benchmark's way
        session.query(ArisLink).filter(ArisLink.conquest_id.like("tick-%")).update({ArisLink.pending: False})


def bench_sync(db, resources, aristotle_engine, n: int) -> None:
    from dagster import DagsterInstance, materialize
    from sqlalchemy import text

    from integrations.aris.defs import aris_sync
    from integrations.aris.sync import mark_vbatch_changes

    ids = seed(db, aristotle_engine, "star", n, starred=True, agreed_victory=False)
    assert len(mark_vbatch_changes(db)) == n
    with DagsterInstance.ephemeral() as instance:
        started = time.monotonic()
        result = materialize([aris_sync], resources=resources, instance=instance)
        sync_s = time.monotonic() - started
    assert result.success
    with aristotle_engine.connect() as connection:
        victories = connection.execute(text("""SELECT count(*) FROM "Conquest" WHERE id LIKE 'star-%'
                                               AND result = 'VICTORY'""")).scalar()
        ratings = connection.execute(text("SELECT count(*) FROM ml_analysis_rating WHERE id LIKE 'vbatch-%'")).scalar()
    assert victories == n and ratings == n, (victories, ratings)

    # Peer: the same statements for fresh rows in one bare loop (one transaction each, as vbatch does).
    with aristotle_engine.begin() as connection:
        connection.execute(text("""INSERT INTO "Conquest" (id, philosopher, domain)
                                   SELECT 'peer-' || i, 'p', 'd' FROM generate_series(1, :n) AS i"""), {"n": n})
    started = time.monotonic()
    for i in range(1, n + 1):
        with aristotle_engine.begin() as connection:
            connection.execute(text("""UPDATE "Conquest" SET result = 'VICTORY', "useAsExample" = true,
                                       "evaluatedBy" = 'x', "evaluatedAt" = now(), "updatedAt" = now()
                                       WHERE id = :id RETURNING id"""), {"id": f"peer-{i}"})
            connection.execute(text("""INSERT INTO ml_analysis_rating (id, conquest_analysis_id, analysis_type,
                                       rating, is_gold_star, use_as_sample_response, philosopher, domain)
                                       VALUES (:id, :c, 'conquest_analysis', 5, true, true, 'p', 'd')"""),
                               {"id": f"peer-{i}", "c": f"peer-{i}"})
    peer_s = time.monotonic() - started
    print(f"2) aris_sync of {n:,} pending gold stars (in-process materialize, a shortcut figure): {sync_s:.2f}s, "
          f"{victories:,} VICTORY and {ratings:,} rating rows (target <= 10 s); peer: the same statements in a bare "
          f"loop {peer_s:.2f}s -> ratio {sync_s / peer_s:.2f}x", flush=True)
    del ids


def bench_icl(db, home: Path, aristotle_engine, aristotle_url: str, n: int, clients: int, seconds: float,
              rate: float) -> None:
    from vbatch_pipelines.net import free_port, wait_http

    seed(db, aristotle_engine, "icl", n, starred=True, agreed_victory=True)
    port = free_port()
    env = dict(os.environ, VBATCH_HOME=str(home), VBATCH_ARIS_DATABASE_URL=aristotle_url, VBATCH_CURATION="off")
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host",
                               "127.0.0.1", "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_http(base + "/health", 60)
        params = {"philosopher": PHILOSOPHER, "domain": DOMAIN, "limit": 10}
        first = httpx.get(base + "/v1/icl/examples", params=params, timeout=30).json()
        assert first["count"] == 10, first
        url = str(httpx.URL(base + "/v1/icl/examples", params=params))
        poll_in_subprocess(url, clients, rate, 3)  # warm-up (page cache, first compilations), not measured
        icl = poll_in_subprocess(url, clients, rate, seconds)  # the load generator in its own process
        health = poll_in_subprocess(base + "/health", clients, rate, seconds)
        saturated = wrk(url, clients, int(seconds))
    finally:
        server.terminate()
        server.wait(30)
    print(f"3) GET /v1/icl/examples (limit 10 of {n:,} examples), {clients} concurrent clients each asking "
          f"{rate:g}x/s for {seconds:.0f}s (open loop): {len(icl):,} requests, p50 {pct(icl, 50) * 1000:.1f} ms, "
          f"p99 {pct(icl, 99) * 1000:.1f} ms (target p99 <= 50 ms); peer GET /health p50 "
          f"{pct(health, 50) * 1000:.1f} ms, p99 {pct(health, 99) * 1000:.1f} ms. Saturated with wrk ({clients} "
          f"connections, no pause): {saturated}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--changed", type=int, default=10_000)
    parser.add_argument("--stars", type=int, default=1_000)
    parser.add_argument("--examples", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--rate", type=float, default=10, help="requests per second per ICL client")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="vbatch-aris-bench-"))
    name, url = create_aristotle()
    os.environ.update(VBATCH_HOME=str(home), VBATCH_CURATION="off", VBATCH_ARIS_DATABASE_URL=url,
                      VBATCH_ENGINE="transformers")
    os.environ.pop("VBATCH_DATABASE_URL", None)
    import sqlalchemy as sa

    from integrations import aris
    from resources.factory import build_resources
    from vbatch_pipelines.settings import load_settings
    from vbatch_pipelines.store.db import normalize_url

    aris.enable_schemas()
    resources = build_resources(load_settings(), defer_secrets=False)
    db = resources.metadata_db.db
    engine = sa.create_engine(normalize_url(url))
    try:
        bench_sensor(db, resources, engine, args.changed)
        bench_sync(db, resources, engine, args.stars)
        bench_icl(db, home, engine, url, args.examples, args.clients, args.seconds, args.rate)
    finally:
        engine.dispose()
        resources["aristotle"].dispose()
        drop_aristotle(name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
