"""CPU LoRA training through vbatch vs the same TRL run called directly (target: ≤ 1.1× wall).

vbatch: the ``fine_tuned_checkpoint`` asset materialized for a fine-tuning job (the trainer runs out of
process through Dagster Pipes, streams every step as an event, saves each epoch's adapter).
Peer: a plain TRL script in its own process with the same model, data, LoRA recipe, optimizer settings
and number of steps (``benchmarks/peer_trl_sft.py``), with bf16 off as vbatch runs it on CPU (TRL's default
bf16 autocast makes a CPU run about 2x slower; the peer is matched so the ratio measures vbatch's cost). Both walls include starting Python and importing
torch/transformers/trl. Runs alternate; the medians are compared.

Usage: python benchmarks/bench_fine_tuning.py [--examples 400] [--epochs 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HYPERPARAMETERS = {"n_epochs": 2, "batch_size": 4, "learning_rate": 2e-3, "lora_rank": 8, "lora_alpha": 16,
                   "max_length": 256}


def examples(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i} plus {i % 7}?"},
                          {"role": "assistant", "content": f"{i} plus {i % 7} is {i + i % 7}."}]}
            for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="vbatch-ft-bench-"))
    os.environ.update(VBATCH_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), VBATCH_CURATION="off",
                      VBATCH_ENGINE="transformers", VBATCH_TRAINER="trl")
    os.environ.pop("VBATCH_DATABASE_URL", None)

    from dagster import DagsterInstance, materialize

    from resources.factory import build_resources
    from vbatch_pipelines.defs.fine_tuning import fine_tuned_checkpoint
    from vbatch_pipelines.files import store_file
    from vbatch_pipelines.fine_tuning.service import create_job, get_job
    from vbatch_pipelines.models.registry import TINY_MODEL_ID
    from vbatch_pipelines.partitions import fine_tune_partitions
    from vbatch_pipelines.settings import load_settings

    resources = build_resources(load_settings(), defer_secrets=False)
    registry, file_store, trainer = resources.model_registry, resources.file_store, resources.trainer
    model_path = registry.resolve(TINY_MODEL_ID).path
    db = resources.metadata_db.db
    data = ("\n".join(json.dumps(e) for e in examples(args.examples)) + "\n").encode()
    train = store_file(db, file_store.files_dir, io.BytesIO(data), "train.jsonl", "fine-tune")
    hp = {**HYPERPARAMETERS, "n_epochs": args.epochs}
    steps = args.epochs * -(-args.examples // hp["batch_size"])
    print(f"{args.examples} examples x {args.epochs} epochs = {steps} steps of batch {hp['batch_size']}, "
          f"LoRA r={hp['lora_rank']} on {TINY_MODEL_ID} (CPU, {os.cpu_count()} cores)", flush=True)

    instance = DagsterInstance.ephemeral()
    vbatch_walls, peer_walls, vbatch_loops, peer_loops = [], [], [], []
    for repeat in range(args.repeats):
        job = create_job(db, registry, file_store, trainer, model=TINY_MODEL_ID, training_file=train.id,
                         hyperparameters=hp, seed=1)
        instance.add_dynamic_partitions(fine_tune_partitions.name, [job.id])
        started = time.monotonic()
        result = materialize([fine_tuned_checkpoint], partition_key=job.id, resources=resources, instance=instance)
        vbatch_walls.append(time.monotonic() - started)
        metrics = get_job(db, job.id).metrics
        assert result.success and metrics["steps"] == steps
        vbatch_loops.append(metrics["train_seconds"])

        peer_out = home / f"peer-{repeat}"
        started = time.monotonic()
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_trl_sft.py"), str(model_path),
                        str(file_store.fine_tune_dir(job.id) / "data" / "train.jsonl"), str(peer_out),
                        json.dumps(hp)], check=True, stdout=subprocess.DEVNULL,
                       # the environment vbatch's trainer gets: no hub lookups, no tokenizer threads
                       env=dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false"))
        peer_walls.append(time.monotonic() - started)
        peer_result = json.loads((peer_out / "result.json").read_text())
        assert peer_result["steps"] == steps, (peer_result["steps"], steps)
        peer_loops.append(peer_result["train_seconds"])
        print(f"run {repeat + 1}: vbatch {vbatch_walls[-1]:.2f}s, direct TRL {peer_walls[-1]:.2f}s "
              f"(training loops {vbatch_loops[-1]:.2f}s vs {peer_loops[-1]:.2f}s)", flush=True)

    vbatch, peer = statistics.median(vbatch_walls), statistics.median(peer_walls)
    print(f"\nCPU LoRA, {steps} steps: vbatch {vbatch:.2f}s vs direct TRL {peer:.2f}s (medians of {args.repeats}) "
          f"-> {vbatch / peer:.2f}x (target <= 1.10x); training loops {statistics.median(vbatch_loops):.2f}s vs "
          f"{statistics.median(peer_loops):.2f}s")
    return 0 if vbatch / peer <= 1.10 else 1


if __name__ == "__main__":
    sys.exit(main())
