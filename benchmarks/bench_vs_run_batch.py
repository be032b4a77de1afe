"""vbatch vs `vllm run-batch` on the same JSONL, model, engine flags and sampling, side by side.

1. One 5,000-request batch. run-batch loads the model in every invocation; its processing time is
   taken from its own "Reading batch from" log line (engine ready) to its output file's write, so its
   start-up is not held against it. vbatch runs against its warm managed server (started once before,
   timed separately), validation included, as an in-process ``materialize`` of batch_input and batch_output
   on a throwaway Dagster instance: a SHORTCUT figure, without the API, the run queue or the run worker a
   user's batch goes through (issue 16 measures that path). Each side runs ``--trials`` times;
   medians are compared. Target: vbatch >= 0.9x.
2. Ten sequential 500-request batches: ten run-batch invocations vs ten vbatch batches on one warm
   engine (its single start included). Target: vbatch >= 3x faster.

Usage: python benchmarks/bench_vs_run_batch.py [--requests 5000] [--small 500] [--repeats 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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
                                         "messages": [{"role": "user", "content": f"What is {i % 97} plus {i % 13}?"}]}})
                    + "\n")
    return path


def run_batch(python: str, model_path: str, source: Path, out: Path, engine_args: list[str]) -> tuple[float, float]:
    """(wall seconds, processing seconds): processing runs from run-batch's "Reading batch from" log
    line (engine loaded) to its output file being written, so its start-up is not counted against it."""
    argv = [python, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(source), "-o", str(out),
            "--model", model_path, "--served-model-name", "vbatch-tiny-chat", *engine_args]
    out.unlink(missing_ok=True)
    started = time.time()
    reading_at = None
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if reading_at is None and "Reading batch from" in line:
            reading_at = time.time()
    if process.wait() != 0 or reading_at is None:
        raise RuntimeError(f"run-batch failed (exit {process.returncode})")
    wall = time.time() - started
    lines = out.read_text().splitlines()
    assert len(lines) == sum(1 for _ in open(source)), "run-batch lost requests"
    return wall, out.stat().st_mtime - reading_at


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--small", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vbatch-bench-"))
    os.environ["VBATCH_HOME"] = str(work / "home")
    os.environ["VBATCH_ENGINE"] = "vllm"
    from dagster import DagsterInstance, materialize

    from resources.factory import build_resources
    from vbatch_pipelines.batch.service import create_batch, get_batch
    from vbatch_pipelines.defs.batches import batch_input, batch_output
    from vbatch_pipelines.files import store_file
    from vbatch_pipelines.partitions import batch_partitions
    from vbatch_pipelines.settings import load_settings

    resources = build_resources(load_settings(), defer_secrets=False)
    engine = resources["inference_engine"]
    model = resources["model_registry"].resolve(None)
    server = engine.server(model)
    engine_args = server.engine_args()
    python = server.config.python
    db = resources["metadata_db"].db
    instance = DagsterInstance.ephemeral()

    def vbatch(source: Path) -> float:
        started = time.monotonic()
        with open(source, "rb") as f:
            stored = store_file(db, resources["file_store"].files_dir, f, source.name, "batch")
        batch = create_batch(db, input_file_id=stored.id, endpoint="/v1/chat/completions")
        instance.add_dynamic_partitions(batch_partitions.name, [batch.id])
        materialize([batch_input, batch_output], partition_key=batch.id, resources=resources, instance=instance)
        elapsed = time.monotonic() - started
        record = get_batch(db, batch.id)
        assert record.status == "completed" and record.request_completed == record.request_total
        return elapsed

    print(f"model {model.id} ({model.path}); engine flags: {' '.join(engine_args)}")
    big = make_input(work / "big.jsonl", args.requests, "big")

    runs = [run_batch(python, model.path, big, work / "big.out", engine_args) for _ in range(args.trials)]
    rb_wall, rb_net = median(w for w, _ in runs), median(p for _, p in runs)
    started = time.monotonic()
    server.ensure()
    vb_start = time.monotonic() - started
    vb_big = median(vbatch(big) for _ in range(args.trials))
    print(f"\n1) {args.requests}-request batch (medians of {args.trials} trials)")
    print(f"   run-batch: {rb_wall:.1f}s wall, of which processing {rb_net:.1f}s (from its 'Reading batch' log "
          f"line to its output file) -> {args.requests / rb_net:.0f} req/s")
    print(f"   vbatch:    {vb_big:.1f}s on the warm engine, validation included (engine start {vb_start:.1f}s, "
          f"once) -> {args.requests / vb_big:.0f} req/s")
    ratio = rb_net / vb_big
    print(f"   throughput ratio vbatch/run-batch: {ratio:.2f}x (target >= 0.9x)")

    smalls = [make_input(work / f"small{k}.jsonl", args.small, f"s{k}") for k in range(args.repeats)]
    rb_total = sum(run_batch(python, model.path, s, work / f"small{k}.out", engine_args)[0]
                   for k, s in enumerate(smalls))
    server.stop()
    started = time.monotonic()
    server.ensure()
    vb_total = (time.monotonic() - started) + sum(vbatch(s) for s in smalls)
    print(f"\n2) {args.repeats} sequential {args.small}-request batches")
    print(f"   run-batch: {rb_total:.1f}s ({args.repeats} invocations)")
    print(f"   vbatch:    {vb_total:.1f}s (one engine start included)")
    print(f"   speed-up: {rb_total / vb_total:.2f}x (target >= 3x)")
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
