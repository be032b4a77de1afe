"""vbatch vs `vllm run-batch` on the same JSONL, model, engine flags and sampling, side by side.

vbatch is driven as a user drives it: a real `vbatch up` on a fresh home, the openai SDK uploading the file
and creating the batch, the API launching a Dagster run on the daemon's run worker, the warm engine.

1. One 5,000-request batch. run-batch loads the model in every invocation; its processing time is taken
   from its own "Reading batch from" log line (engine ready) to its output file's write, so its start-up is
   not held against it (its wall time is printed too). vbatch: create -> completed on the warm engine
   (the upload before it is timed separately). Each side runs ``--trials`` times, alternating (each side
   first in turn); medians are compared.
   Target: vbatch >= 1.1x run-batch's processing throughput.
2. Ten sequential 500-request batches: ten run-batch invocations vs ten vbatch batches on one warm engine
   (`vbatch up`'s engine start, timed separately, added once). Target: vbatch >= 3x faster.

Usage: python benchmarks/bench_vs_run_batch.py [--requests 5000] [--small 500] [--repeats 10] [--trials 5]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_input(path: Path, n: int, prefix: str) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "vbatch-tiny-chat", "max_tokens": 32, "temperature": 0,
                                         "messages": [{"role": "user", "content": f"What is {i % 97} plus {i // 97}?"}]}})
                    + "\n")
    return path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()

    from benchmarks.stack import Stack, alternate, run_batch

    started = time.monotonic()
    stack = Stack()
    up_seconds = time.monotonic() - started  # `vbatch up` including the engine's start
    try:
        model, engine_args, python = stack.engine()
        print(f"model {model.id} ({model.path}); engine flags: {' '.join(engine_args)}; `vbatch up` {up_seconds:.1f}s")
        work = stack.home / "bench"
        work.mkdir()

        def vbatch(source: Path) -> tuple[float, float]:
            """(create -> completed, upload) seconds through the API."""
            return stack.timed(source)[:2]

        big = make_input(work / "big.jsonl", args.requests, "big")
        vbatch(make_input(work / "warm.jsonl", 20, "warm"))
        # vbatch's engine runs with LoRA on (fine-tunes deploy into it); run-batch gets the same flags, and is
        # also run without LoRA, its best case for a base-model batch.
        plain_args = [a for a in engine_args if a != "--enable-lora"]
        for flag in ("--max-lora-rank", "--max-loras"):
            if flag in plain_args:
                del plain_args[plain_args.index(flag):plain_args.index(flag) + 2]
        runs, plain_runs, vb_runs = [], [], []
        sides = [lambda: runs.append(run_batch(python, model.path, big, work / "big.out", engine_args)),
                 lambda: vb_runs.append(vbatch(big)),
                 lambda: plain_runs.append(run_batch(python, model.path, big, work / "big.out", plain_args))]
        for trial in alternate(args.trials, sides):
            print(f"   trial {trial + 1}: run-batch processing {runs[-1][1]:.2f}s (without LoRA "
                  f"{plain_runs[-1][1]:.2f}s), vbatch {vb_runs[-1][0]:.2f}s, ratio {runs[-1][1] / vb_runs[-1][0]:.2f}x "
                  f"({plain_runs[-1][1] / vb_runs[-1][0]:.2f}x)", flush=True)
        rb_wall, rb_net = median(w for w, _ in runs), median(p for _, p in runs)
        plain_net = median(p for _, p in plain_runs)
        vb_big, vb_upload = median(r for r, _ in vb_runs), median(u for _, u in vb_runs)
        print(f"\n1) {args.requests}-request batch (medians of {args.trials} alternating trials)")
        print(f"   run-batch: {rb_wall:.1f}s wall, of which processing {rb_net:.1f}s (from its 'Reading batch' log "
              f"line to its output file) -> {args.requests / rb_net:.0f} req/s; without LoRA {plain_net:.1f}s "
              f"-> {args.requests / plain_net:.0f} req/s")
        print(f"   vbatch:    {vb_big:.1f}s create -> completed through the API and a Dagster run "
              f"(upload {vb_upload:.1f}s before it) -> {args.requests / vb_big:.0f} req/s")
        print(f"   throughput ratio vbatch/run-batch processing: {rb_net / vb_big:.2f}x (target >= 1.1x); "
              f"wall-clock ratio with run-batch's start-up: {rb_wall / vb_big:.2f}x; with the upload counted on "
              f"vbatch's side: {rb_net / (vb_big + vb_upload):.2f}x; against run-batch without LoRA: "
              f"{plain_net / vb_big:.2f}x")

        smalls = [make_input(work / f"small{k}.jsonl", args.small, f"s{k}") for k in range(args.repeats)]
        rb_total = sum(run_batch(python, model.path, s, work / f"small{k}.out", engine_args)[0]
                       for k, s in enumerate(smalls))
        vb_total = sum(sum(vbatch(s)) for s in smalls)
        print(f"\n2) {args.repeats} sequential {args.small}-request batches")
        print(f"   run-batch: {rb_total:.1f}s ({args.repeats} invocations)")
        print(f"   vbatch:    {vb_total:.1f}s uploads and batches, + {up_seconds:.1f}s `vbatch up` with its engine "
              f"start once = {vb_total + up_seconds:.1f}s")
        print(f"   speed-up: {rb_total / (vb_total + up_seconds):.2f}x (target >= 3x)")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
