"""vbatch vs `vllm run-batch` on the same embeddings JSONL, model and engine flags (issue 19's benchmark).

vbatch is driven as a user drives it (benchmarks/stack.py): a real `vbatch up` on a fresh home serving the
locally built tiny embedding model (`vbatch-tiny-embed`, its pooling engine warmed at start), the openai SDK
uploading the file and creating the batch, the API launching a Dagster run, the warm engine. run-batch gets the
engine flags of vbatch's managed pooling server (`ManagedVLLMServer.engine_args`, printed).

``--inputs`` `/v1/embeddings` lines of one text each (what users send most), texts of mixed lengths (half short
queries, a third sentences to a paragraph, the rest a few paragraphs). run-batch's processing time runs from its
"Reading batch from" log line (engine loaded) to its output file's write; vbatch's from create to completed on
the warm engine (the upload before it is timed apart; wall is both). Sides alternate over ``--trials``; medians
are compared. Target: vbatch >= 1.0x run-batch's processing throughput. With ``--list-size N`` the same texts
also go as lists of N inputs a line, one more figure.

Both outputs are checked: every custom_id once, one vector of the model's dimension per input, and vbatch's
vectors agree with run-batch's (cosine >= 0.999 on a sample). This machine is shared with other sessions: the
load average is printed at start and end.

Usage: python benchmarks/bench_embeddings.py [--inputs 20000] [--trials 3] [--list-size 0]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.stack import EngineBusy, Stack, alternate, load_average, run_batch  # noqa: E402
from vbatch_pipelines.models.registry import (  # noqa: E402
    EMBED,
    TINY_EMBED_MODEL_ID,
    embedding_dimensions,
)
from vbatch_pipelines.models.tiny import ensure_tiny_model  # noqa: E402

ENDPOINT = "/v1/embeddings"
SAMPLE = 500  # custom_ids whose vectors are compared between the two sides
_WORDS = ("the a of and to in is was for on with as by at from that this it be are cat ocean river city garden "
          "robot book mountain market violin desert lighthouse sky quiet bright ancient curious gentle vast busy "
          "small blue green describe summarize explain imagine praise criticize plus number question answer "
          "document invoice customer order shipment refund delivered warehouse software release latency "
          "throughput embedding vector search query index cluster database memory kernel network packet").split()


def texts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct texts of mixed lengths: half 3-12 words, a third 20-60, the rest 120-200."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        roll = rng.random()
        words = rng.randint(3, 12) if roll < 0.5 else rng.randint(20, 60) if roll < 0.85 else rng.randint(120, 200)
        out.append(f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) + ".")
    return out


def write_input(path: Path, inputs: list[str], list_size: int) -> list[str]:
    """The embeddings JSONL: one text a line (``list_size`` 0) or lists of ``list_size``; returns its custom_ids."""
    ids = []
    with open(path, "w") as f:
        step = list_size or 1
        for start in range(0, len(inputs), step):
            custom_id = f"emb-{start}"
            given = inputs[start] if not list_size else inputs[start:start + list_size]
            f.write(json.dumps({"custom_id": custom_id, "method": "POST", "url": ENDPOINT,
                                "body": {"model": TINY_EMBED_MODEL_ID, "input": given}}) + "\n")
            ids.append(custom_id)
    return ids


def check_output(lines, ids: list[str], per_line: list[int], dim: int, keep: set[str], side: str) -> dict:
    """Every custom_id once with status 200 and ``per_line`` vectors of ``dim`` floats each; returns the vectors
    of the custom_ids in ``keep``."""
    expected = dict(zip(ids, per_line))
    seen: set[str] = set()
    kept = {}
    for raw in lines:
        line = json.loads(raw)
        custom_id = line["custom_id"]
        assert custom_id in expected and custom_id not in seen, f"{side}: {custom_id} unexpected or twice"
        seen.add(custom_id)
        assert line["response"]["status_code"] == 200 and not line.get("error"), f"{side}: {line}"[:500]
        data = sorted(line["response"]["body"]["data"], key=lambda d: d["index"])
        assert len(data) == expected[custom_id], f"{side}: {custom_id} has {len(data)} vectors"
        assert all(len(d["embedding"]) == dim for d in data), f"{side}: {custom_id} has a vector not of {dim}"
        if custom_id in keep:
            kept[custom_id] = [d["embedding"] for d in data]
    assert seen == set(ids), f"{side}: {len(set(ids) - seen)} custom_ids missing"
    return kept


def min_cosine(ours: dict, theirs: dict) -> float:
    """The lowest cosine between the two sides' vectors of the same custom_id and input."""
    import numpy as np

    a = np.array([v for k in sorted(ours) for v in ours[k]], dtype=np.float64)
    b = np.array([v for k in sorted(theirs) for v in theirs[k]], dtype=np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def compare(stack: Stack, python: str, model, engine_args: list[str], work: Path, inputs: list[str],
            list_size: int, trials: int, dim: int) -> dict:
    """One input layout through both sides, alternating; prints each trial and returns the medians."""
    name = f"list{list_size}" if list_size else "single"
    source = work / f"{name}.jsonl"
    ids = write_input(source, inputs, list_size)
    per_line = [min(list_size, len(inputs) - i * list_size) if list_size else 1 for i in range(len(ids))]
    keep = set(random.Random(1).sample(ids, min(SAMPLE, len(ids))))
    out = work / f"{name}.run-batch.jsonl"
    rb_runs, vb_runs, vectors = [], [], {}

    def rb_side() -> None:
        rb_runs.append(run_batch(python, model.path, source, out, engine_args, served_model=model.id))
        with open(out) as f:
            vectors["run-batch"] = check_output(f, ids, per_line, dim, keep, "run-batch")

    def vb_side() -> None:
        with EngineBusy(stack) as busy:
            seconds, upload, batch = stack.timed(source, endpoint=ENDPOINT)
        assert batch.error_file_id is None, batch
        content = stack.client.files.content(batch.output_file_id).text.splitlines()
        vectors["vbatch"] = check_output(content, ids, per_line, dim, keep, "vbatch")
        vb_runs.append((seconds, upload, busy.fraction))

    for trial in alternate(trials, [rb_side, vb_side]):
        (rb_wall, rb_net), (vb_net, vb_up, busy) = rb_runs[-1], vb_runs[-1]
        print(f"   trial {trial + 1}: run-batch processing {rb_net:.2f}s (wall {rb_wall:.1f}s), vbatch "
              f"{vb_net:.2f}s (+ upload {vb_up:.2f}s; engine busy {busy:.0%}) -> {rb_net / vb_net:.2f}x; "
              f"load average {load_average()}", flush=True)
    cosine = min_cosine(vectors["vbatch"], vectors["run-batch"])
    assert cosine >= 0.999, f"vbatch's vectors differ from run-batch's: min cosine {cosine:.5f}"
    medians = {"rb_wall": median(w for w, _ in rb_runs), "rb_net": median(p for _, p in rb_runs),
               "vb_net": median(s for s, _, _ in vb_runs), "vb_upload": median(u for _, u, _ in vb_runs),
               "busy": median(b for _, _, b in vb_runs), "cosine": cosine, "lines": len(ids)}
    n, m = len(inputs), medians
    print(f"\n   {n} inputs in {len(ids)} lines ({'one text a line' if not list_size else f'lists of {list_size}'}); "
          f"medians of {trials} alternating trials")
    print(f"   run-batch: wall {m['rb_wall']:.1f}s (its start-up included), processing {m['rb_net']:.2f}s "
          f"(its 'Reading batch' log line to its output file) -> {n / m['rb_net']:.0f} inputs/s")
    print(f"   vbatch:    wall {m['vb_net'] + m['vb_upload']:.2f}s (upload {m['vb_upload']:.2f}s + batch), processing "
          f"{m['vb_net']:.2f}s (create -> completed through the API and a Dagster run; engine busy "
          f"{m['busy']:.0%}) -> {n / m['vb_net']:.0f} inputs/s")
    print(f"   ratio vbatch/run-batch processing throughput: {m['rb_net'] / m['vb_net']:.2f}x (target >= 1.0x); with "
          f"the upload on vbatch's side {m['rb_net'] / (m['vb_net'] + m['vb_upload']):.2f}x; outputs checked: every "
          f"custom_id once, {dim}-float vectors, min cosine vbatch vs run-batch {cosine:.6f} over {len(keep)} lines\n",
          flush=True)
    return medians


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--inputs", type=int, default=20000)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--list-size", type=int, default=0, help="also send the texts as lists of this many a line")
    args = parser.parse_args()

    print(f"load average at start {load_average()} (1/5/15 min; this machine is shared with other sessions)",
          flush=True)
    work = Path(tempfile.mkdtemp(prefix="vbatch-bench-embed-"))
    stack = None
    try:
        model_path = ensure_tiny_model(work / TINY_EMBED_MODEL_ID, EMBED)  # the platform's own builder
        started = time.monotonic()
        stack = Stack(env={"VBATCH_MODELS": f"{TINY_EMBED_MODEL_ID}={model_path}"})  # its engine warms at start
        up_seconds = time.monotonic() - started
        model, engine_args, python = stack.engine()
        dim = embedding_dimensions(model.path)[0]
        print(f"model {model.id} ({model.path}, {dim} dimensions); `vbatch up` with the engine's start "
              f"{up_seconds:.1f}s\nengine flags, both sides: {' '.join(engine_args)}", flush=True)
        warm = work / "warm.jsonl"
        write_input(warm, texts(20, seed=2), 0)
        stack.timed(warm, endpoint=ENDPOINT)  # the run worker and the engine's first requests
        inputs = texts(args.inputs)
        results = {0: compare(stack, python, model, engine_args, work, inputs, 0, args.trials, dim)}
        if args.list_size:
            results[args.list_size] = compare(stack, python, model, engine_args, work, inputs, args.list_size,
                                              args.trials, dim)
        for size, m in results.items():
            print(f"{'one text a line' if not size else f'lists of {size}'}: vbatch {args.inputs / m['vb_net']:.0f} "
                  f"inputs/s vs run-batch {args.inputs / m['rb_net']:.0f} -> {m['rb_net'] / m['vb_net']:.2f}x")
    finally:
        if stack is not None:
            stack.stop()
        shutil.rmtree(work, ignore_errors=True)
        print(f"load average at end {load_average()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
