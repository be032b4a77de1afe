"""Warm means warm: the first batch after "vbatch is up" against the ones after it (issue 28).

A fresh `vbatch up` (new home, curation off, the CPU engine with the tiny model); as soon as it prints its
banner, a 50-request batch through the openai SDK (create -> completed; its upload not timed), then ``--next``
more alike, one after another. Target: the first <= 2x the median of the next ones. Repeated ``--trials``
times, each on a fresh home; also printed: how long `vbatch up` took to say it is up, and where the first
batch's time went against the median of the next (from its Dagster run's records).

Usage: python benchmarks/bench_first_batch.py [--size 50] [--next 5] [--trials 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import Stack, requests_jsonl  # noqa: E402

PHASES = ("create call", "to run start", "resources", "batch_input", "to batch_output", "batch_output",
          "to seen completed")


def timed_batch(stack: Stack, size: int, tag: str) -> tuple[float, dict[str, float]]:
    """(create -> completed seconds, where they went: PHASES)."""
    file_id = stack.upload(requests_jsonl(size, tag))
    started, wall_started = time.monotonic(), time.time()
    batch_id = stack.create(file_id)
    created = time.monotonic() - started
    batch = stack.wait(batch_id)
    seconds = time.monotonic() - started
    if batch.status != "completed" or batch.request_counts.completed != size:
        raise AssertionError(f"{batch.id}: {batch.status} {batch.request_counts}")
    return seconds, phases(stack, batch_id, wall_started, created, seconds)


def phases(stack: Stack, batch_id: str, wall_started: float, created: float, seconds: float) -> dict[str, float]:
    """The batch's time split by its Dagster run's records: the API's create call, then until the run started
    (launch, worker hand-over), its resources' set-up (until its first step), each step, and until the client
    saw the batch completed."""
    import os
    import sqlite3

    from dagster import DagsterEventType, DagsterInstance

    with sqlite3.connect(stack.home / "vbatch.db") as db:
        run_id = db.execute("select dagster_run_id from batches where id = ?", (batch_id,)).fetchone()[0]
    os.environ["DAGSTER_HOME"] = str(stack.home / "dagster")
    with DagsterInstance.get() as instance:
        record = instance.get_run_record_by_id(run_id)
        steps: dict[tuple[str, str], float] = {}
        for event in instance.all_logs(run_id, of_type={DagsterEventType.STEP_START, DagsterEventType.STEP_SUCCESS}):
            steps[(event.step_key, event.dagster_event_type.value)] = event.timestamp
    start = record.start_time or record.create_timestamp.timestamp()
    marks = [wall_started, wall_started + created, start,
             steps[("batch_input", "STEP_START")], steps[("batch_input", "STEP_SUCCESS")],
             steps[("batch_output", "STEP_START")], steps[("batch_output", "STEP_SUCCESS")],
             wall_started + seconds]
    return dict(zip(PHASES, [b - a for a, b in zip(marks, marks[1:])]))


def split(parts: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.2f}" for name, value in parts.items())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=50)
    parser.add_argument("--next", type=int, default=5)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    ratios = []
    for trial in range(args.trials):
        began = time.monotonic()
        stack = Stack()
        up = time.monotonic() - began
        try:
            first, first_parts = timed_batch(stack, args.size, f"first{trial}-")
            timed = [timed_batch(stack, args.size, f"next{trial}-{k}-") for k in range(args.next)]
        finally:
            stack.stop()
        later = [seconds for seconds, _ in timed]
        ratio = first / statistics.median(later)
        ratios.append(ratio)
        typical = {name: statistics.median(parts[name] for _, parts in timed) for name in PHASES}
        print(f"trial {trial + 1}: up in {up:.1f}s; first {args.size}-request batch {first:.2f}s, next "
              f"{args.next}: median {statistics.median(later):.2f}s ({', '.join(f'{x:.2f}' for x in later)}) "
              f"-> first/median {ratio:.2f}x (target <= 2x)\n  first:  {split(first_parts)}\n"
              f"  median: {split(typical)}", flush=True)
    print(f"first batch / median of the next: {statistics.median(ratios):.2f}x over {args.trials} trials "
          f"({'met' if max(ratios) <= 2 else 'NOT met'}: target <= 2x in every trial)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
