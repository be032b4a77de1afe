"""Many batches sharing the warm engine (issue 16), as users send them: the openai SDK against `vbatch up` on
the vLLM CPU engine. Batches created together share a run over their partition range, yet each keeps its
own output, status, Dagster partition and materialization; cancelling one stops it within a second without
touching its neighbours."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import chat_lines, jsonl
from tests.test_api import _wait_batch

pytestmark = [pytest.mark.stack, pytest.mark.vllm]


@pytest.fixture()
def stack(default_stack):
    return default_stack


def _create_together(client, inputs: list[list[dict]]) -> list[str]:
    files = [client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch").id for lines in inputs]
    with ThreadPoolExecutor(len(files)) as pool:
        return list(pool.map(lambda f: client.batches.create(input_file_id=f, endpoint="/v1/chat/completions",
                                                             completion_window="24h").id, files))


def _run_ids(stack, batch_ids: list[str]) -> dict[str, str]:
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{Path(stack.env['VBATCH_HOME']) / 'vbatch.db'}")
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, dagster_run_id FROM batches")).all()
    engine.dispose()
    return {row.id: row.dagster_run_id for row in rows if row.id in batch_ids}


def test_batches_created_together_share_runs_and_keep_their_own_results_and_partitions(stack):
    from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

    client = stack.client()
    inputs = [chat_lines(10 + k, prefix=f"t{k}") for k in range(12)]
    batch_ids = _create_together(client, inputs)
    for k, batch_id in enumerate(batch_ids):
        batch = _wait_batch(client, batch_id)
        assert batch.status == "completed" and batch.request_counts.completed == 10 + k
        ids = [json.loads(line)["custom_id"] for line in client.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(ids) == sorted(f"t{k}-{i}" for i in range(10 + k))
    runs = _run_ids(stack, batch_ids)
    assert len(set(runs.values())) < len(batch_ids), "every batch started a run of its own"
    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        for k, batch_id in enumerate(batch_ids):
            deadline = time.monotonic() + 60  # a batch is completed when its requests are; its run records after
            while not (records := instance.fetch_materializations(
                    AssetRecordsFilter(asset_key=AssetKey("batch_output"), asset_partitions=[batch_id]),
                    limit=1).records) and time.monotonic() < deadline:
                time.sleep(0.5)
            assert records, f"{batch_id} has no batch_output materialization"
            event = records[0].event_log_entry
            metadata = event.asset_materialization.metadata
            assert event.run_id == runs[batch_id] and metadata["requests_total"].value == 10 + k


def test_cancelling_one_of_batches_running_side_by_side_stops_it_within_a_second_and_no_other(stack):
    client = stack.client()
    inputs = [chat_lines(3000, prefix="long", max_tokens=32)] + [chat_lines(300, prefix=f"n{k}") for k in range(3)]
    long_id, *neighbours = _create_together(client, inputs)
    deadline = time.monotonic() + 120
    while client.batches.retrieve(long_id).request_counts.completed == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    asked = time.time()
    client.batches.cancel(long_id)
    cancelled = _wait_batch(client, long_id)
    assert cancelled.status == "cancelled" and cancelled.cancelled_at - asked <= 2
    assert 0 < cancelled.request_counts.completed < 3000
    for k, batch_id in enumerate(neighbours):
        batch = _wait_batch(client, batch_id)
        assert batch.status == "completed" and batch.request_counts.completed == 300, (k, batch.status)
