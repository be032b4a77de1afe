"""Batch assets on the transformers engine: materialize, resume after a kill, cancel mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter

from tests.conftest import chat_lines, jsonl
from vbatch_pipelines.batch.service import update_batch


def _assert_each_once(platform, batch_id, expected_ids):
    out, err = platform.results(batch_id)
    counts = Counter(line["custom_id"] for line in out + err)
    assert set(counts) == set(expected_ids), set(expected_ids) ^ set(counts)
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    return out, err


def test_materialize_chat_batch(platform):
    lines = chat_lines(30)
    lines.append({"custom_id": "too-long", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}})
    batch = platform.submit(jsonl(lines), metadata={"team": "qa"})
    result = platform.materialize(batch.id)
    assert result.success
    record = platform.batch(batch.id)
    assert record.status == "completed" and record.model == "vbatch-tiny-chat"
    assert record.request_total == 31 and record.request_completed == 30 and record.request_failed == 1
    assert record.output_file_id and record.error_file_id
    assert record.usage["output_tokens"] > 0 and record.usage["input_tokens"] > 0
    out, err = _assert_each_once(platform, batch.id, [line["custom_id"] for line in lines])
    first = out[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200
    body = first["response"]["body"]
    assert body["object"] == "chat.completion" and body["model"] == "vbatch-tiny-chat"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert err[0]["custom_id"] == "too-long" and err[0]["response"]["status_code"] == 400
    assert err[0]["response"]["body"]["error"]["code"] == "context_length_exceeded"

    materialization = result.asset_materializations_for_node("batch_output")[0]
    metadata = materialization.metadata
    assert metadata["requests_completed"].value == 30 and metadata["requests_failed"].value == 1
    assert metadata["completion_tokens"].value == record.usage["output_tokens"]
    assert metadata["model"].value == "vbatch-tiny-chat" and metadata["engine"].value == "transformers"
    assert "req-0" in metadata["preview"].value or "req-" in metadata["preview"].value


def test_materialize_completions_batch(platform):
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": f"Please describe {i}", "max_tokens": 8, "temperature": 0}} for i in range(10)]
    batch = platform.submit(jsonl(lines), endpoint="/v1/completions")
    assert platform.materialize(batch.id).success
    out, _ = _assert_each_once(platform, batch.id, [f"c{i}" for i in range(10)])
    body = out[0]["response"]["body"]
    assert body["object"] == "text_completion" and isinstance(body["choices"][0]["text"], str)
    assert body["usage"]["completion_tokens"] <= 8


_RUN_IN_SUBPROCESS = textwrap.dedent("""
    import sys
    from tests.conftest import Platform
    platform = Platform()
    platform.resources = platform.resources.replace(inference_engine=platform.resources.inference_engine.model_copy(
        update={"max_concurrency": 2}))
    platform.materialize(sys.argv[1], raise_on_error=False)
""")


def _start_run(batch_id: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _RUN_IN_SUBPROCESS, batch_id], env=os.environ.copy(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _wait_for_outputs(platform, batch_id, at_least: int, process, timeout=240):
    path = platform.file_store.batch_dir(batch_id) / "output.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= at_least:
            return
        assert process.poll() is None, "the run ended before it could be interrupted"
        time.sleep(0.05)
    raise AssertionError("no outputs appeared")


def test_killed_run_resumes_without_duplicates_or_gaps(platform):
    lines = chat_lines(2000, prefix="kill")
    batch = platform.submit(jsonl(lines))
    process = _start_run(batch.id)
    _wait_for_outputs(platform, batch.id, 20, process)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    path = platform.file_store.batch_dir(batch.id) / "output.jsonl"
    before = path.read_bytes().count(b"\n")
    assert 20 <= before < 2000
    with open(path, "ab") as f:  # what a kill in the middle of a write leaves behind
        f.write(b'{"id":"batch_req_torn","custom_id":"kill-')

    result = platform.materialize(batch.id)
    assert result.success
    out, err = _assert_each_once(platform, batch.id, [line["custom_id"] for line in lines])
    assert len(out) == 2000 and not err
    metadata = result.asset_materializations_for_node("batch_output")[0].metadata
    assert metadata["requests_resumed"].value >= before
    assert platform.batch(batch.id).status == "completed"


def test_cancel_stops_promptly_and_keeps_finished_results(platform):
    lines = chat_lines(2000, prefix="cancel")
    batch = platform.submit(jsonl(lines))
    process = _start_run(batch.id)
    _wait_for_outputs(platform, batch.id, 10, process)
    update_batch(platform.db, batch.id, status="cancelling")
    cancelled_at = time.monotonic()
    process.wait(timeout=60)
    assert time.monotonic() - cancelled_at < 10
    record = platform.batch(batch.id)
    assert record.status == "cancelled" and record.cancelled_at and record.cancelling_at
    out, _ = platform.results(batch.id)
    assert 10 <= len(out) < 2000
    assert record.output_file_id is not None and record.request_completed == len(out)
    assert len({line["custom_id"] for line in out}) == len(out)
    json.dumps(record.to_openai())


def test_batch_past_its_window_expires_with_openai_semantics(platform):
    lines = chat_lines(2000, prefix="exp")
    batch = platform.submit(jsonl(lines))
    process = _start_run(batch.id)
    _wait_for_outputs(platform, batch.id, 10, process)
    update_batch(platform.db, batch.id, expires_at=int(time.time()) - 1)
    process.wait(timeout=60)
    record = platform.batch(batch.id)
    assert record.status == "expired" and record.expired_at
    out, err = _assert_each_once(platform, batch.id, [line["custom_id"] for line in lines])
    assert out and err and all(e["error"]["code"] == "batch_expired" and e["response"] is None for e in err)
    assert record.request_completed == len(out) and record.request_failed == len(err)
    assert record.output_file_id and record.error_file_id


def test_settle_sensor_ends_batches_no_run_is_working_on(platform):
    from dagster import DagsterInstance, build_sensor_context

    from vbatch_pipelines.defs.batches import batch_settle_sensor

    running = platform.submit(jsonl(chat_lines(3)))
    cancel_me = platform.submit(jsonl(chat_lines(3)))
    expire_me = platform.submit(jsonl(chat_lines(3)))
    assert platform.materialize(running.id).success  # completed: left alone
    update_batch(platform.db, cancel_me.id, status="cancelling", dagster_run_id="run-that-died")
    update_batch(platform.db, expire_me.id, expires_at=int(time.time()) - 5)
    with DagsterInstance.ephemeral() as instance:
        context = build_sensor_context(instance=instance, resources={
            "metadata_db": platform.resources.metadata_db, "file_store": platform.resources.file_store})
        result = batch_settle_sensor(context)
    assert "Settled 2" in result.skip_message
    assert platform.batch(cancel_me.id).status == "cancelled"
    assert platform.batch(expire_me.id).status == "expired" and platform.batch(expire_me.id).expired_at
    assert platform.batch(running.id).status == "completed"


def test_a_batch_its_runs_left_unfinished_is_run_again_then_failed_clearly(platform, monkeypatch):
    """A run that ended without finishing its batch (here: only batch_input ran, as when a run is retried past
    Dagster's run retries) leaves the batch in progress; the settle sensor runs it again, and after
    MAX_RESCUES such runs fails it saying why, with what finished kept. A run terminated in Dagster
    cancels its batch."""
    from dagster import (
        AssetKey,
        DagsterInstance,
        Definitions,
        SensorResult,
        SkipReason,
        build_sensor_context,
        materialize,
    )

    from vbatch_pipelines.defs import batches as batch_defs
    from vbatch_pipelines.names import BATCH_JOB, RESCUE_TAG
    from vbatch_pipelines.partitions import batch_partitions

    monkeypatch.setattr(batch_defs, "RESCUE_AFTER_S", 0)
    recover = platform.submit(jsonl(chat_lines(3, prefix="recover")))
    give_up = platform.submit(jsonl(chat_lines(3, prefix="giveup")))
    terminated = platform.submit(jsonl(chat_lines(3, prefix="terminated")))
    other_job = platform.submit(jsonl(chat_lines(3, prefix="other")))
    with DagsterInstance.ephemeral() as instance:
        def sensor():
            context = build_sensor_context(instance=instance, resources={
                "metadata_db": platform.resources.metadata_db, "file_store": platform.resources.file_store})
            return batch_defs.batch_settle_sensor(context)

        job = Definitions(assets=[batch_defs.batch_input, batch_defs.batch_output],
                          jobs=[batch_defs.build_batch_job(curation=False)],
                          resources=platform.resources).resolve_job_def(BATCH_JOB)

        def input_only(batch_id, tags=None):  # a batch_job run that ends with batch_input
            instance.add_dynamic_partitions(batch_partitions.name, [batch_id])
            return job.execute_in_process(partition_key=batch_id, instance=instance, tags=tags,
                                          asset_selection=[AssetKey("batch_input")])

        for batch in (recover, give_up, terminated):
            assert input_only(batch.id).success and platform.batch(batch.id).status == "in_progress"
        instance.report_run_canceled(instance.get_run_by_id(platform.batch(terminated.id).dagster_run_id))
        # A batch run inside another job's run (as a fine-tune's evaluation batch is) ends with that run.
        instance.add_dynamic_partitions(batch_partitions.name, [other_job.id])
        assert materialize([batch_defs.batch_input], partition_key=other_job.id, resources=platform.resources,
                           instance=instance).success

        result = sensor()
        assert isinstance(result, SensorResult)
        requested = {request.partition_key: request for request in result.run_requests}
        assert set(requested) == {recover.id, give_up.id}
        assert requested[recover.id].tags[RESCUE_TAG] == recover.id
        assert platform.batch(terminated.id).status == "cancelled"
        assert platform.batch(other_job.id).status == "failed"
        assert platform.batch(other_job.id).to_openai()["errors"]["data"][0]["code"] == "run_failed"

        assert requested[recover.id].run_key == f"{recover.id}@{platform.batch(recover.id).dagster_run_id}"
        job.execute_in_process(partition_key=recover.id, instance=instance, tags=requested[recover.id].tags)
        assert platform.batch(recover.id).status == "completed"

        for _ in range(batch_defs.MAX_RESCUES):  # every rescue of give_up ends unfinished again
            assert input_only(give_up.id, tags=requested[give_up.id].tags).success
            result = sensor()
            requested = {request.partition_key: request for request in getattr(result, "run_requests", [])}
            assert recover.id not in requested
        assert give_up.id not in requested
        failed = platform.batch(give_up.id)
        assert failed.status == "failed", failed.status
        error = failed.to_openai()["errors"]["data"][0]
        assert error["code"] == "run_failed" and "ended without finishing it" in error["message"]
        assert isinstance(sensor(), SkipReason)  # nothing left to settle or rescue


def test_a_cancel_during_validation_is_never_overwritten(platform):
    """The run's validation and its start write ``in_progress`` only over ``validating``: a cancel that
    arrived meanwhile stands, and the run ends the batch as cancelled."""
    from vbatch_pipelines.batch.service import request_cancel, validate_input

    batch = platform.submit(jsonl(chat_lines(20, prefix="cas")))
    update_batch(platform.db, batch.id, dagster_run_id="a-run")  # its run has been launched
    assert request_cancel(platform.db, batch.id).status == "cancelling"
    report = validate_input(platform.db, platform.batch(batch.id), platform.file_store.batch_dir(batch.id),
                            lambda name: platform.registry.lookup(name).id)
    assert report.ok and platform.batch(batch.id).status == "cancelling"
    platform.materialize(batch.id, raise_on_error=False)
    record = platform.batch(batch.id)
    assert record.status == "cancelled" and record.request_completed < 20
    update_batch(platform.db, batch.id, status="in_progress")  # an ended batch keeps its status
    assert platform.batch(batch.id).status == "cancelled"


def test_one_batch_is_run_by_one_run_at_a_time(platform):
    """Two runs of one batch at once (possible with more than one gpu slot): the second waits for the first's
    lease, then finds every request done; nothing is written twice."""
    import threading

    from vbatch_pipelines.batch.service import BatchBusy, claim_batch, release_batch

    lines = chat_lines(300, prefix="lease")
    batch = platform.submit(jsonl(lines))
    outcomes = []
    runs = [threading.Thread(target=lambda: outcomes.append(platform.materialize(batch.id).success))
            for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=300)
    assert outcomes == [True, True]
    _assert_each_once(platform, batch.id, [line["custom_id"] for line in lines])
    assert platform.batch(batch.id).status == "completed" and platform.batch(batch.id).lease_owner is None

    claim_batch(platform.db, batch.id, "run-a@elsewhere:1")
    try:
        claim_batch(platform.db, batch.id, "run-b@elsewhere:2", wait_s=0.5)
        raise AssertionError("a held lease was taken")
    except BatchBusy as busy:
        assert "run-a@elsewhere:1" in str(busy)
    claim_batch(platform.db, batch.id, "run-a@elsewhere:1")  # its holder renews it
    release_batch(platform.db, batch.id, "run-a@elsewhere:1")
    claim_batch(platform.db, batch.id, "run-c@elsewhere:3", ttl_s=0.2)
    time.sleep(0.3)
    claim_batch(platform.db, batch.id, "run-d@elsewhere:4", wait_s=0)  # an expired lease is free


def test_ending_a_batch_frees_only_its_runs_lease_and_counts_what_the_run_counted(platform):
    """A run ends its batch in one transaction: status, counts and usage from what it counted, result files
    registered, and its own lease freed; a lease another run took meanwhile stays held."""
    from vbatch_pipelines.batch.runner import BatchProgress, ResultFiles
    from vbatch_pipelines.batch.service import claim_batch, end_batch
    from vbatch_pipelines.engine.base import EngineResponse

    ended = []
    for name, holder, ender in (("mine", "run-a@elsewhere:1", "run-a@elsewhere:1"),
                                ("taken", "run-b@elsewhere:2", "run-a@elsewhere:1")):
        batch = platform.submit(jsonl(chat_lines(2, prefix=name)))
        directory = platform.file_store.batch_dir(batch.id)
        claim_batch(platform.db, batch.id, holder)
        results = ResultFiles(directory)
        body = {"choices": [{"message": {"role": "assistant", "content": "hi"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2}}
        results.write(f"{name}-0", EngineResponse(200, body))
        results.write(f"{name}-1", EngineResponse(400, {"error": {"message": "bad"}}))
        results.close()
        progress = BatchProgress(total=2, completed=1, failed=1, prompt_tokens=3, completion_tokens=2)
        ended.append(end_batch(platform.db, directory, batch.id, "completed", progress=progress, lease_owner=ender))
    mine, taken = (platform.batch(batch.id) for batch in ended)
    assert mine.status == "completed" and mine.lease_owner is None
    assert (mine.request_completed, mine.request_failed, mine.usage["total_tokens"]) == (1, 1, 5)
    assert mine.output_file_id and mine.error_file_id and mine.finalizing_at == mine.completed_at
    assert taken.status == "completed" and taken.lease_owner == "run-b@elsewhere:2"
    lines = [json.loads(x) for x in (platform.file_store.batch_dir(mine.id) / "output.jsonl").read_text().splitlines()]
    assert lines[0]["id"].startswith("batch_req_") and len(lines[0]["id"]) == len("batch_req_") + 32


def test_a_killed_runs_lease_on_this_host_is_taken_at_once(platform):
    import socket

    from vbatch_pipelines.batch.service import claim_batch

    batch = platform.submit(jsonl(chat_lines(2, prefix="dead")))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    claim_batch(platform.db, batch.id, f"run-x@{socket.gethostname()[:40]}:{dead.pid}")
    started = time.monotonic()
    claim_batch(platform.db, batch.id, "run-y@elsewhere:1", wait_s=120)
    # at once, not after waiting out the dead owner's lease (a wait would take the whole 120 s)
    assert time.monotonic() - started < 60 and platform.batch(batch.id).lease_owner == "run-y@elsewhere:1"


def test_batches_launched_together_share_a_run_yet_keep_their_own_results_and_status(platform):
    """One run over a partition range: every batch its own files, counts and materialization metadata; one
    cancelled mid-run stops within a couple of seconds while its neighbours complete, and the run succeeds."""
    import threading

    small = [platform.submit(jsonl(chat_lines(5 + k, prefix=f"s{k}"))) for k in range(3)]
    big = platform.submit(jsonl(chat_lines(3000, prefix="big", max_tokens=16)))
    platform.resources = platform.resources.replace(inference_engine=platform.resources.inference_engine.model_copy(
        update={"max_concurrency": 4, "chunk_size": 4}))
    cancelled_at, stopped_after = [], []

    def cancel_when_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = platform.batch(big.id)
            if not cancelled_at and record.status == "in_progress" and record.request_completed > 0:
                update_batch(platform.db, big.id, status="cancelling")
                cancelled_at.append(time.monotonic())
            elif cancelled_at and record.status == "cancelled":  # timed here: cancelled_at is whole seconds
                stopped_after.append(time.monotonic() - cancelled_at[0])
                return
            time.sleep(0.05)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    result = platform.materialize_together([*(b.id for b in small), big.id])
    canceller.join()
    assert result.success and cancelled_at
    for k, batch in enumerate(small):
        record = platform.batch(batch.id)
        assert record.status == "completed" and record.request_completed == 5 + k
        _assert_each_once(platform, batch.id, [f"s{k}-{i}" for i in range(5 + k)])
    record = platform.batch(big.id)
    # The run looks at its batches every WATCH_EVERY_S (1 s) and then ends the batch: well under 2 s idle, a
    # little more on a loaded machine (CI runs a vLLM engine beside it).
    assert record.status == "cancelled" and stopped_after and stopped_after[0] <= 3, stopped_after
    assert 0 < record.request_completed < 3000
    materialized = {m.partition: m.metadata for m in result.asset_materializations_for_node("batch_output")}
    assert set(materialized) == {b.id for b in small} | {big.id}
    for k, batch in enumerate(small):
        assert materialized[batch.id]["requests_total"].value == 5 + k
        assert f"s{k}-" in materialized[batch.id]["preview"].value
    assert "cancelled" in materialized[big.id]["failed"].value
    inputs = {m.partition: m.metadata["requests"].value for m in result.asset_materializations_for_node("batch_input")}
    assert inputs == {**{b.id: 5 + k for k, b in enumerate(small)}, big.id: 3000}


def test_a_run_whose_batches_all_fail_fails(platform):
    """The step fails only when none of its batches succeeded (a one-batch run fails as it always did)."""
    bad = [platform.submit(b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n')
           for _ in range(2)]
    result = platform.materialize_together([b.id for b in bad], raise_on_error=False)
    assert not result.success
    assert all(platform.batch(b.id).status == "failed" for b in bad)


def test_a_run_being_terminated_whose_interrupt_never_came_interrupts_itself(platform):
    """Dagster's terminate marks the run canceling and signals its process; a Celery revoke is a broadcast that
    can be lost. The run sees itself canceling and, TERMINATE_GRACE_S later, stops as the signal would have made
    it: the run canceled, the batch keeping what it wrote, its lease freed, not failed (a later run resumes it)."""
    import threading

    from dagster import DagsterInstance, DagsterRunStatus

    from vbatch_pipelines.batch.execute import TERMINATE_GRACE_S

    batch = platform.submit(jsonl(chat_lines(20000, prefix="term", max_tokens=16)))  # well past the grace
    platform.resources = platform.resources.replace(inference_engine=platform.resources.inference_engine.model_copy(
        update={"max_concurrency": 4, "chunk_size": 4}))
    instance = DagsterInstance.ephemeral()
    marked = []

    def mark_canceling_without_a_signal():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            record = platform.batch(batch.id)
            runs = instance.get_runs()
            if runs and record.status == "in_progress" and record.request_completed > 0:
                instance.report_run_canceling(runs[0])
                marked.append(time.monotonic())
                return
            time.sleep(0.05)

    marker = threading.Thread(target=mark_canceling_without_a_signal)
    marker.start()
    result = platform.materialize(batch.id, instance=instance, raise_on_error=False)
    ended_after = time.monotonic() - marked[0]
    marker.join()
    assert marked and TERMINATE_GRACE_S <= ended_after <= TERMINATE_GRACE_S + 5, ended_after
    assert not result.success and instance.get_runs()[0].status == DagsterRunStatus.CANCELED
    record = platform.batch(batch.id)
    assert record.status == "in_progress" and record.lease_owner is None
    output, _ = platform.results(batch.id)
    assert 0 < len(output) < 20000 and len({line["custom_id"] for line in output}) == len(output)


def test_an_interrupt_landing_in_the_batch_watcher_still_stops_the_run(platform, monkeypatch):
    """In a run worker Dagster's SIGINT handler raises DagsterExecutionInterruptedError wherever the run's thread
    is. When that is the watcher's task, asyncio would keep it to itself (only KeyboardInterrupt escapes a task)
    and the batches would run on: here every batch stops, resumable, and the interrupt ends the step."""
    from dagster import DagsterExecutionInterruptedError

    from vbatch_pipelines.batch import execute

    batch = platform.submit(jsonl(chat_lines(20000, prefix="sigint", max_tokens=16)))
    watch, rounds = execute._watch, []

    def interrupted_on_the_sixth_round(db, jobs):
        rounds.append(time.monotonic())
        if len(rounds) == 6:
            raise DagsterExecutionInterruptedError()
        return watch(db, jobs)

    monkeypatch.setattr(execute, "_watch", interrupted_on_the_sixth_round)
    result = platform.materialize(batch.id, raise_on_error=False)
    assert not result.success and len(rounds) == 6
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "DagsterExecutionInterruptedError" in str(failure.step_failure_data.error), failure.step_failure_data.error
    record = platform.batch(batch.id)
    assert record.status == "in_progress" and record.lease_owner is None
    output, _ = platform.results(batch.id)
    assert 0 < len(output) < 20000 and record.request_completed == len(output)


def test_sigint_to_a_run_stops_every_batch_then_interrupts_it(platform):
    """Dagster terminates a run with SIGINT. The batches' event loop takes it (raised at a random point, asyncio
    could keep it in a task or callback and the run would go on): every batch of the run stops, resumable, and
    the step then ends interrupted."""
    import os
    import signal
    import threading

    ids = [platform.submit(jsonl(chat_lines(10000, prefix=f"int{k}", max_tokens=16))).id for k in range(2)]
    sent = []

    def interrupt_when_running():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(platform.batch(b).request_completed > 0 for b in ids):
                sent.append(time.monotonic())
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.05)

    sender = threading.Thread(target=interrupt_when_running)
    sender.start()
    result = platform.materialize_together(ids, raise_on_error=False)
    stopped_after = time.monotonic() - sent[0]
    sender.join()
    assert sent and not result.success and stopped_after < 5, stopped_after
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert failure.step_key == "batch_output" and "DagsterExecutionInterruptedError" in str(
        failure.step_failure_data.error)
    for batch_id in ids:
        record = platform.batch(batch_id)
        output, _ = platform.results(batch_id)
        assert record.status == "in_progress" and record.lease_owner is None
        assert 0 < len(output) < 10000 and record.request_completed == len(output)
