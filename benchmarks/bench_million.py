"""One million requests in one batch, end to end through a real `vbatch up` and the openai SDK (issue 28).

1. A 100,000-request batch (tiny model, ``max_tokens`` 1, every body different): create -> completed req/s.
2. A 1,000,000-request batch alike. When half of it has completed, its run worker is killed with SIGKILL;
   Dagster's run retries re-execute the run in a new worker, which resumes from the result files.
Checked: the big batch completes with every custom_id exactly once in its output file; printed: each size's
req/s (the million's includes the kill and the resume; target within 10 % of the 100k figure), and the peak RSS
of the API, the Dagster daemon and the run workers while each ran (target <= 300 MB each; vLLM not counted).

Peer (``--peer REV``): instead, that git revision's `vbatch up` (a worktree) and this one's side by side, each
running ``--reference``-request batches, ``--trials`` times alternating: req/s and the run worker's peak RSS of
each, so a change to the batch step's memory is seen with its cost in speed.

Usage: python benchmarks/bench_million.py [--requests 1000000] [--reference 100000] [--no-kill]
       python benchmarks/bench_million.py --peer REV [--reference 100000] [--trials 3]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import PeakMemory, Stack, alternate, requests_jsonl, worktree  # noqa: E402

LIMIT_MB = 300


def run_worker_pid(stack: Stack, run_id: str) -> int | None:
    """The pid of the worker running ``run_id`` (the tag WarmRunLauncher puts on the run)."""
    os.environ["DAGSTER_HOME"] = str(stack.home / "dagster")
    from dagster import DagsterInstance

    from vbatch_pipelines.names import RUN_WORKER_PID_TAG

    with DagsterInstance.get() as instance:
        run = instance.get_run_by_id(run_id)
        pid = run.tags.get(RUN_WORKER_PID_TAG) if run is not None else None
    return int(pid) if pid else None


def big_batch(stack: Stack, n: int, kill_at: float | None) -> tuple[float, object, str]:
    """Upload (not timed) and run an ``n``-request batch; returns (create -> completed seconds, batch, what
    happened to its worker)."""
    file_id = stack.upload(requests_jsonl(n, f"m{n}", max_tokens=1), f"million{n}.jsonl")
    started = time.monotonic()
    batch_id = stack.create(file_id)
    note = "not killed"
    while kill_at is not None:
        batch = stack.client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            note = f"ended {batch.status} before {kill_at:.0%}"
            break
        if batch.request_counts.completed >= kill_at * n:
            pid = run_worker_pid(stack, _run_id(stack, batch_id))
            if pid is None:
                note = "run worker not found"
            else:
                os.kill(pid, signal.SIGKILL)
                note = f"run worker {pid} killed at {batch.request_counts.completed:,} completed"
            break
        time.sleep(0.5)
    batch = stack.wait(batch_id, interval=0.5)
    return time.monotonic() - started, batch, note


def _run_id(stack: Stack, batch_id: str) -> str:
    """The batch's Dagster run, from the metadata DB (the API does not show it)."""
    import sqlite3

    with sqlite3.connect(stack.home / "vbatch.db") as db:
        return db.execute("select dagster_run_id from batches where id = ?", (batch_id,)).fetchone()[0]


def check_once(stack: Stack, batch, n: int) -> None:
    seen: set[str] = set()
    with stack.client.files.with_streaming_response.content(batch.output_file_id) as response:
        for line in response.iter_lines():
            if line:
                custom_id = json.loads(line)["custom_id"]
                if custom_id in seen:
                    raise AssertionError(f"{custom_id} twice")
                seen.add(custom_id)
    if len(seen) != n:
        raise AssertionError(f"{len(seen)} of {n} custom_ids in the output")


def against_peer(peer: str, n: int, trials: int) -> None:
    """``n``-request batches on the peer's stack and this one's, alternating; prints each side's req/s and peak."""
    stacks = {}
    try:
        for side, root in ((f"peer {peer}", worktree(peer)), ("this", None)):
            stacks[side] = Stack(env={"VBATCH_MAX_UPLOAD_BYTES": str(1 << 30)}, **({"root": root} if root else {}))
            stacks[side].run(requests_jsonl(20, "warm", max_tokens=1))
        figures: dict[str, list[tuple[float, int]]] = {side: [] for side in stacks}

        def run(side: str) -> None:
            with PeakMemory(stacks[side]) as memory:
                seconds, batch, _ = big_batch(stacks[side], n, None)
            if batch.status != "completed" or batch.request_counts.completed != n:
                raise AssertionError(f"{side}: {batch.id}: {batch.status} {batch.request_counts}")
            figures[side].append((n / seconds, memory.peak["run worker"]))
            print(f"   {side}: {n / seconds:.0f} req/s, run worker peak {memory.peak['run worker'] / 2**20:.0f} MB",
                  flush=True)

        for trial in alternate(trials, [lambda side=side: run(side) for side in stacks]):
            print(f"trial {trial + 1} done", flush=True)
        for side, runs in figures.items():
            rates = sorted(rate for rate, _ in runs)
            print(f"{side}: median {rates[len(rates) // 2]:.0f} req/s ({rates[0]:.0f}-{rates[-1]:.0f}), run worker "
                  f"peak {max(peak for _, peak in runs) / 2**20:.0f} MB", flush=True)
    finally:
        for stack in stacks.values():
            stack.stop()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--reference", type=int, default=100_000)
    parser.add_argument("--no-kill", action="store_true", help="let the big batch run without killing its worker")
    parser.add_argument("--peer", help="compare this git revision's stack with this one's on --reference batches")
    parser.add_argument("--trials", type=int, default=3, help="with --peer: batches on each side")
    args = parser.parse_args()
    if min(args.requests, args.reference, args.trials) < 1:
        parser.error("--requests, --reference and --trials must be at least 1")
    if args.peer:
        against_peer(args.peer, args.reference, args.trials)
        return 0
    stack = Stack(env={"VBATCH_MAX_UPLOAD_BYTES": str(1 << 30)})
    try:
        stack.run(requests_jsonl(20, "warm", max_tokens=1))
        rates, peaks = {}, {}
        for n, kill_at in ((args.reference, None), (args.requests, None if args.no_kill else 0.5)):
            with PeakMemory(stack) as memory:
                seconds, batch, note = big_batch(stack, n, kill_at)
            if batch.status != "completed" or batch.request_counts.completed != n:
                raise AssertionError(f"{batch.id}: {batch.status} {batch.request_counts}")
            check_once(stack, batch, n)
            rates[n], peaks[n] = n / seconds, memory.peak
            print(f"{n:>9,} requests: create -> completed {seconds:.0f}s ({rates[n]:.0f} req/s), {note}; every "
                  f"custom_id once; peak RSS {memory.summary()}", flush=True)
        ratio = rates[args.requests] / rates[args.reference]
        worst = max(max(peak.values()) for peak in peaks.values()) / 2**20
        print(f"req/s at {args.requests:,} vs {args.reference:,}: {ratio:.2f} (target >= 0.9); largest process "
              f"{worst:.0f} MB (target <= {LIMIT_MB} MB): {'met' if ratio >= 0.9 and worst <= LIMIT_MB else 'NOT met'}",
              flush=True)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
