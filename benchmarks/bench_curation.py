"""Curation throughput against a real Label Studio (started by vbatch in a temp home).

1. 10,000 batch results exported into Label Studio by the ``curation_tasks`` asset (target <= 30 s),
   side by side with the peer floor: the same tasks imported by one bare SDK ``import_tasks`` loop.
2. ``label_studio_sensor`` processing 1,000 changed (annotated) tasks in one tick (target <= 10 s),
   side by side with the peer floor: listing those tasks once with the SDK.

The batch's results are written as files (no inference: this measures the export, not the model).

Usage: python benchmarks/bench_curation.py [--results 10000] [--changed 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--results", type=int, default=10_000)
    parser.add_argument("--changed", type=int, default=1_000)
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="vbatch-curation-bench-"))
    os.environ.update(VBATCH_HOME=str(home), DAGSTER_HOME=str(home / "dagster"), VBATCH_CURATION="on",
                      VBATCH_ENGINE="transformers")
    for key in ("VBATCH_DATABASE_URL", "VBATCH_LABEL_STUDIO_URL"):
        os.environ.pop(key, None)
    from vbatch_pipelines.net import free_port

    os.environ["VBATCH_LABEL_STUDIO_PORT"] = str(free_port())

    from dagster import DagsterInstance, build_sensor_context, materialize

    from resources.factory import build_resources
    from vbatch_pipelines.batch.service import INPUT_FILE, create_batch, update_batch
    from vbatch_pipelines.batch.validation import validate_batch_file
    from vbatch_pipelines.curation.schemas import CHAT_REVIEW, annotation_result, prediction
    from vbatch_pipelines.defs.batches import batch_input, batch_output
    from vbatch_pipelines.defs.curation import curation_tasks, label_studio_sensor
    from vbatch_pipelines.files import store_file
    from vbatch_pipelines.models.registry import TINY_MODEL_ID
    from vbatch_pipelines.partitions import batch_partitions
    from vbatch_pipelines.settings import load_settings

    resources = build_resources(load_settings(), defer_secrets=False)
    db, studio, file_store = resources.metadata_db.db, resources.label_studio, resources.file_store
    started = time.monotonic()
    studio.ensure_running()
    print(f"Label Studio up in {time.monotonic() - started:.1f}s (home {home})", flush=True)
    try:
        n = args.results
        lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": f"Question {i}?"}]}}
                 for i in range(n)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        import io

        stored = store_file(db, file_store.files_dir, io.BytesIO(data), "bench.jsonl", "batch")
        batch = create_batch(db, input_file_id=stored.id, endpoint="/v1/chat/completions")
        directory = file_store.batch_dir(batch.id)
        directory.mkdir(parents=True, exist_ok=True)
        validate_batch_file(stored.path, endpoint=batch.endpoint, resolve_model=lambda name: TINY_MODEL_ID,
                            output=directory / INPUT_FILE)
        with open(directory / "output.jsonl", "w") as out:
            for i in range(n):
                out.write(json.dumps({"id": f"batch_req_{i}", "custom_id": f"r{i}", "error": None, "response": {
                    "status_code": 200, "request_id": f"req_{i}", "body": {"choices": [
                        {"index": 0, "message": {"role": "assistant", "content": f"Answer {i}."},
                         "finish_reason": "stop"}]}}}) + "\n")
        update_batch(db, batch.id, status="completed", model=TINY_MODEL_ID, request_total=n, request_completed=n)

        instance = DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(batch_partitions.name, [batch.id])
        started = time.monotonic()
        result = materialize([batch_input, batch_output, curation_tasks], selection=[curation_tasks.key],
                             partition_key=batch.id, resources=resources, instance=instance)
        export_s = time.monotonic() - started
        assert result.success
        tasks = studio.tasks_of_batch(studio.project_for(CHAT_REVIEW), batch.id)
        assert len(tasks) == n, len(tasks)

        # Peer: the same tasks, one bare import loop into a second project (no vbatch bookkeeping).
        client = studio.client
        peer_project = client.projects.create(title="bench peer", label_config=CHAT_REVIEW.label_config).id
        peer_tasks = [{"data": {"custom_id": f"r{i}", "batch_id": "peer", "model": TINY_MODEL_ID,
                                "messages": [{"role": "user", "content": f"Question {i}?"}],
                                "response": f"Answer {i}."}, "predictions": [prediction(f"Answer {i}.")]}
                      for i in range(n)]
        started = time.monotonic()
        for chunk in range(0, n, studio.import_chunk):
            client.projects.import_tasks(peer_project, request=peer_tasks[chunk:chunk + studio.import_chunk],
                                         return_task_ids=True)
        peer_s = time.monotonic() - started
        print(f"1) {n:,} results -> Label Studio via curation_tasks: {export_s:.1f}s ({n / export_s:,.0f} tasks/s; "
              f"target <= 30 s); peer bare SDK import {peer_s:.1f}s -> ratio {export_s / peer_s:.2f}x", flush=True)

        cursor_context = build_sensor_context(instance=instance, resources={
            "metadata_db": resources.metadata_db, "label_studio": studio})
        label_studio_sensor(cursor_context)  # the cursor now stands after the import
        cursor = cursor_context.cursor
        ids = list(tasks.values())[: args.changed]
        started = time.monotonic()

        def annotate(k: int) -> None:
            client.annotations.create(ids[k], result=annotation_result(None if k % 2 else f"Edited {k}.",
                                                                       1 + k % 5, k % 3 == 0))

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(annotate, range(len(ids))))
        print(f"   ({len(ids):,} annotations created through the SDK in {time.monotonic() - started:.1f}s)",
              flush=True)
        context = build_sensor_context(cursor=cursor, instance=instance, resources={
            "metadata_db": resources.metadata_db, "label_studio": studio})
        started = time.monotonic()
        outcome = label_studio_sensor(context)
        tick_s = time.monotonic() - started
        project_id = studio.project_for(CHAT_REVIEW)
        started = time.monotonic()
        listed = studio.changed_tasks(project_id, json.loads(cursor)[str(project_id)])
        list_s = time.monotonic() - started
        from vbatch_pipelines.curation.service import stats

        recorded = stats(db)["annotated"]
        print(f"2) label_studio_sensor, one tick over {len(listed):,} changed tasks: {tick_s:.1f}s "
              f"({recorded:,} reviews recorded, run requested: {outcome is not None and not hasattr(outcome, 'skip_message')}; "
              f"target <= 10 s); peer: listing them once {list_s:.1f}s -> ratio {tick_s / list_s:.2f}x")
    finally:
        studio.server().stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
