"""Warm means warm: the first batch after "vbatch is up" against the ones after it (issue 28).

A fresh `vbatch up` (new home, curation off, the CPU engine with the tiny model); as soon as it prints its
banner, a 50-request batch through the openai SDK (create -> completed; its upload not timed), then ``--next``
more alike, one after another. Target: the first <= 2x the median of the next ones. Repeated ``--trials``
times, each on a fresh home; also printed: how long `vbatch up` took to say it is up.

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


def timed_batch(stack: Stack, size: int, tag: str) -> float:
    file_id = stack.upload(requests_jsonl(size, tag))
    started = time.monotonic()
    batch = stack.wait(stack.create(file_id))
    if batch.status != "completed" or batch.request_counts.completed != size:
        raise AssertionError(f"{batch.id}: {batch.status} {batch.request_counts}")
    return time.monotonic() - started


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
            first = timed_batch(stack, args.size, f"first{trial}-")
            later = [timed_batch(stack, args.size, f"next{trial}-{k}-") for k in range(args.next)]
        finally:
            stack.stop()
        ratio = first / statistics.median(later)
        ratios.append(ratio)
        print(f"trial {trial + 1}: up in {up:.1f}s; first {args.size}-request batch {first:.2f}s, next "
              f"{args.next}: median {statistics.median(later):.2f}s ({', '.join(f'{x:.2f}' for x in later)}) "
              f"-> first/median {ratio:.2f}x (target <= 2x)", flush=True)
    print(f"first batch / median of the next: {statistics.median(ratios):.2f}x over {args.trials} trials "
          f"({'met' if max(ratios) <= 2 else 'NOT met'}: target <= 2x in every trial)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
