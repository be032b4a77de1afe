"""Cost as work grows, end to end through a real `vbatch up` and the openai SDK: batches of 1k, 10k and 100k
requests, each upload -> create -> completed, with the peak RSS of the API (its largest process), the
Dagster daemon and the run workers (vLLM excluded) sampled while each runs.

Targets: req/s at 100k within 10% of 10k; each process's peak flat in the batch size and <= 300 MB at 100k.

Usage: python benchmarks/bench_scale.py [--sizes 1000,10000,100000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import PeakMemory, Stack, requests_jsonl  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="1000,10000,100000")
    args = parser.parse_args()
    sizes = [int(size) for size in args.sizes.split(",")]
    stack = Stack()
    rates = {}
    try:
        stack.run(requests_jsonl(20, "warm"))
        for size in sizes:
            data = requests_jsonl(size, f"n{size}")
            with PeakMemory(stack) as memory:
                started = time.monotonic()
                file_id = stack.upload(data, f"scale{size}.jsonl")
                uploaded = time.monotonic()
                batch = stack.wait(stack.create(file_id), interval=0.2)
                done = time.monotonic()
            assert batch.status == "completed" and batch.request_counts.completed == size, batch
            rates[size] = size / (done - uploaded)
            print(f"{size:>7} requests: upload {uploaded - started:.1f}s, create -> completed {done - uploaded:.1f}s "
                  f"({rates[size]:.0f} req/s); peak RSS {memory.summary()}", flush=True)
        if len(sizes) >= 2:
            last, before = sizes[-1], sizes[-2]
            print(f"req/s at {last} vs {before}: {rates[last] / rates[before]:.2f} (target >= 0.9)")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
