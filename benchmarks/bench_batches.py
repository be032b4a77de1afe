"""Many batches sharing the warm engine, end to end through a real `vbatch up` and the openai SDK.

1. Lone small batch: create -> completed for ``--lone`` sequential 20-request batches (the upload before
   each is not timed). Targets: p50 <= 1.5 s, p95 <= 3 s.
2. Many small batches vs one batch of the same requests, side by side: one 400-request batch, then 20
   concurrent 20-request batches (all uploaded first; from the first create to the last completed). Both
   arms are watched the same way, as a dashboard does: one list call every 0.05 s (the lone batches of 1.
   are polled by id, as a single client does). Target: ratio one/many >= 0.7 (the many finish within 1.4x).
   Run ``--trials`` times, alternating; the medians are compared (single trials scatter by +-20 % here).
3. A crowd: 100 concurrent 20-request batches: total time, and the engine's busy fraction (its processes'
   CPU sampled every 0.1 s) over that time.
Every batch is checked: completed, each custom_id exactly once in its own output file.

Usage: python benchmarks/bench_batches.py [--lone 20] [--many 20] [--size 20] [--crowd 100] [--trials 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import EngineBusy, Stack, pct, requests_jsonl  # noqa: E402


def check(stack: Stack, batch, prefix: str, n: int) -> None:
    ids = stack.output_ids(batch)
    if batch.status != "completed" or sorted(ids) != sorted(f"{prefix}-{i}" for i in range(n)):
        raise AssertionError(f"{batch.id}: {batch.status}, {len(ids)} outputs, {len(set(ids))} distinct")


def concurrent(stack: Stack, count: int, size: int, tag: str) -> float:
    """``count`` batches of ``size`` requests created at once; seconds from the first create to the last
    completed (uploads done before)."""
    files = [stack.upload(requests_jsonl(size, f"{tag}{k}")) for k in range(count)]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=min(count, 32)) as pool:
        ids = list(pool.map(stack.create, files))
    ended = stack.wait_all(ids)
    elapsed = time.monotonic() - started
    for k, batch_id in enumerate(ids):
        check(stack, ended[batch_id][1], f"{tag}{k}", size)
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lone", type=int, default=20)
    parser.add_argument("--many", type=int, default=20)
    parser.add_argument("--size", type=int, default=20)
    parser.add_argument("--crowd", type=int, default=100)
    parser.add_argument("--trials", type=int, default=5, help="one-vs-many pairs; medians are compared")
    args = parser.parse_args()
    stack = Stack()
    try:
        stack.run(requests_jsonl(args.size, "warm"))  # the first run pays one-off imports
        if args.lone:
            latencies = []
            for k in range(args.lone):
                seconds, batch = stack.run(requests_jsonl(args.size, f"lone{k}"))
                check(stack, batch, f"lone{k}", args.size)
                latencies.append(seconds)
            print(f"1) lone {args.size}-request batch, create -> completed over {args.lone} batches: "
                  f"p50 {statistics.median(latencies):.2f}s, p95 {pct(latencies, 95):.2f}s, max {max(latencies):.2f}s "
                  "(targets p50 <= 1.5 s, p95 <= 3 s)", flush=True)
        if args.many:
            total = args.many * args.size
            ones, manys = [], []
            for trial in range(args.trials):  # side by side, alternating: the machine's noise hits both
                one = concurrent(stack, 1, total, f"one{trial}-")
                many = concurrent(stack, args.many, args.size, f"many{trial}-")
                ones.append(one)
                manys.append(many)
                print(f"   trial {trial + 1}: one {one:.2f}s, many {many:.2f}s, ratio {one / many:.2f}", flush=True)
            one, many = statistics.median(ones), statistics.median(manys)
            print(f"2) one {total}-request batch {one:.2f}s; {args.many} concurrent {args.size}-request batches "
                  f"{many:.2f}s (medians of {args.trials}); ratio {one / many:.2f} (target >= 0.7)", flush=True)
        if args.crowd:
            with EngineBusy(stack) as busy:
                crowd = concurrent(stack, args.crowd, args.size, "crowd")
            print(f"3) {args.crowd} concurrent {args.size}-request batches: {crowd:.2f}s, "
                  f"{args.crowd * args.size / crowd:.0f} req/s, engine busy {busy.fraction:.0%} of the time",
                  flush=True)
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
