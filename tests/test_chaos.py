"""The chaos suite (issue 15): a multi-thousand-request batch with curation on, and one part of the platform
killed with SIGKILL mid-way. Real processes: `vbatch up` on the vLLM CPU engine, Label Studio, Dagster's
daemon and run workers, PostgreSQL. Every case asserts the same outcome:

- the batch ends ``completed``;
- every ``custom_id`` is in the output or error file exactly once, and no line blames a request for the fault;
- every result is a curation task exactly once, in vbatch and in Label Studio;
- nothing is left running after the final stop (`running_stack` checks it).

Each case prints a line ``chaos: <fault> ...`` with its recovery time (kill → batch completed); the
closing note's table is built from them."""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from tests.conftest import chat_lines, jsonl, running_stack, survivors

pytestmark = [pytest.mark.stack, pytest.mark.vllm]

REQUESTS = 1000


def _client_call(fn: Callable, timeout: float = 120.0):
    """A call through the openai SDK that tolerates the API being down (restarting) for a while."""
    import openai

    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except (openai.APIConnectionError, openai.InternalServerError, openai.APITimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _home(stack) -> Path:
    return Path(stack.env["VBATCH_HOME"])


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _submit(stack, prefix: str) -> tuple[str, list[str]]:
    client = stack.client()
    lines = chat_lines(REQUESTS, prefix=prefix)
    uploaded = _client_call(lambda: client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch"))
    batch = _client_call(lambda: client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                                       completion_window="24h"))
    return batch.id, [line["custom_id"] for line in lines]


def _wait_for_progress(stack, batch_id: str, fraction: float = 0.15, timeout: float = 240) -> None:
    output = _home(stack) / "batches" / batch_id / "output.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if output.exists() and sum(1 for _ in open(output, "rb")) >= REQUESTS * fraction:
            return
        time.sleep(0.1)
    raise AssertionError(f"{batch_id} made no progress in {timeout}s")


def _wait_completed(stack, batch_id: str, timeout: float = 420):
    client = stack.client()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            batch = client.batches.retrieve(batch_id)
            if batch.status in ("completed", "failed", "cancelled", "expired"):
                return batch
        except Exception:  # noqa: BLE001 - the API (or its DB) may be down during the fault
            pass
        time.sleep(1)
    raise AssertionError(f"{batch_id} did not end in {timeout}s\n{_diagnosis(stack, batch_id)}")


def _diagnosis(stack, batch_id: str) -> str:
    """What a hung case needs for its post-mortem: the batch's record, the stack's Dagster runs with their
    status and last events, and the tail of each service log."""
    import sqlalchemy as sa
    from dagster import DagsterInstance

    from vbatch_pipelines.detached import tail

    lines = []
    engine = sa.create_engine(f"sqlite:///{_home(stack) / 'vbatch.db'}")
    with engine.connect() as conn:
        row = conn.execute(sa.text("SELECT status, dagster_run_id, lease_owner, lease_until, request_completed, "
                                   "request_failed FROM batches WHERE id = :b"), {"b": batch_id}).one_or_none()
    engine.dispose()
    lines.append(f"batch: {row}")
    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        for record in instance.get_run_records(limit=6):
            run = record.dagster_run
            lines.append(f"run {run.run_id} {run.status.value} tags={dict(run.tags)}")
            for event in instance.all_logs(run.run_id)[-8:]:
                lines.append(f"    {event.dagster_event_type or ''} {event.message[:300]}")
    for log in sorted((_home(stack) / "logs").glob("*.log")):
        lines.append(f"--- {log.name}\n{tail(log, 15)}")
    return "\n".join(lines)


def _curation_tasks(stack, batch_id: str, label_studio) -> tuple[Counter, dict[str, int]]:
    import sqlalchemy as sa

    from vbatch_pipelines.store.db import normalize_url

    url = stack.env.get("VBATCH_DATABASE_URL") or f"sqlite:///{_home(stack) / 'vbatch.db'}"
    engine = sa.create_engine(normalize_url(url))
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT custom_id, ls_task_id, ls_project_id FROM curation_tasks "
                                    "WHERE batch_id = :b"), {"b": batch_id}).all()
    engine.dispose()
    projects = {row.ls_project_id for row in rows if row.ls_project_id}
    in_studio: dict[str, int] = {}
    for project in projects:
        in_studio.update(label_studio.tasks_of_batch(project, batch_id))
    return Counter(row.custom_id for row in rows if row.ls_task_id), in_studio


def _assert_outcome(stack, batch_id: str, custom_ids: list[str], label_studio, fault: str, killed_at: float):
    batch = _wait_completed(stack, batch_id)
    recovered = time.monotonic() - killed_at
    assert batch.status == "completed", (fault, batch.status, batch.errors)
    directory = _home(stack) / "batches" / batch_id
    output, errors = _lines(directory / "output.jsonl"), _lines(directory / "errors.jsonl")
    seen = Counter(line["custom_id"] for line in output + errors)
    assert set(seen) == set(custom_ids) and max(seen.values()) == 1, \
        (fault, len(set(custom_ids) - set(seen)), [c for c, n in seen.items() if n > 1][:5])
    assert not errors, (fault, errors[:3])  # no request was blamed for the fault
    deadline = time.monotonic() + 240
    while True:  # curation follows the batch in the same run (and retries while Label Studio is down)
        recorded, in_studio = _curation_tasks(stack, batch_id, label_studio)
        if len(recorded) == REQUESTS and len(in_studio) == REQUESTS or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(recorded) == REQUESTS and max(recorded.values()) == 1, (fault, len(recorded))
    assert set(in_studio) == set(custom_ids), (fault, len(in_studio))
    print(f"chaos: {fault}: completed, {len(output)} results each once, 0 request errors from the fault, "
          f"{len(in_studio)} curation tasks once; recovered in {recovered:.1f}s", flush=True)


def _service_pid(stack, name: str) -> int:
    import httpx

    return httpx.get(f"{stack.api_url}/health", timeout=10).json()["services"][name]["pid"]


def _leases(stack, batch_ids) -> dict[str, str]:
    """The batches' lease holders (``run@host:pid``), for those that hold one now."""
    import sqlalchemy as sa

    engine = sa.create_engine(f"sqlite:///{_home(stack) / 'vbatch.db'}")
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, lease_owner, status FROM batches WHERE id IN :ids")
                                .bindparams(sa.bindparam("ids", expanding=True)), {"ids": list(batch_ids)}).all()
    finally:
        engine.dispose()
    if rows and all(row.status in ("completed", "failed", "cancelled", "expired") for row in rows):
        raise AssertionError(f"{sorted(batch_ids)} ended before the fault could land: make them longer")
    return {row.id: row.lease_owner for row in rows if row.lease_owner}


def _output_lines(stack, batch_id: str) -> int:
    output = _home(stack) / "batches" / batch_id / "output.jsonl"
    return sum(1 for _ in open(output, "rb")) if output.exists() else 0


def _run_worker_mid_way(stack, batch_ids, lines: int, timeout: float = 240) -> tuple[int, set[str]]:
    """Wait until the batches wrote ``lines`` results between them while a run still holds a lease on one of
    them; returns that run worker's pid and the batches it held then (the ones the kill lands in the middle
    of). A batch that finished first is no failure of the platform, a batch that never ran is."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        held = _leases(stack, batch_ids)
        if held and sum(_output_lines(stack, b) for b in batch_ids) >= lines:
            pid = int(next(iter(held.values())).rsplit(":", 1)[1])
            return pid, {b for b, owner in held.items() if int(owner.rsplit(":", 1)[1]) == pid}
        time.sleep(0.05)
    raise AssertionError(f"no run held a lease on {sorted(batch_ids)} once {lines} results were written "
                         f"({timeout:.0f}s)\n{_diagnosis(stack, next(iter(batch_ids)))}")


def _kill_run_worker(stack, batch_id: str) -> None:
    pid, _ = _run_worker_mid_way(stack, [batch_id], 1)
    os.kill(pid, signal.SIGKILL)


def _engine_pid(stack) -> int:
    states = [json.loads(p.read_text()) for p in (_home(stack) / "engines").glob("*.json")]
    return next(state["pid"] for state in states if state.get("model"))


@pytest.fixture(scope="module")
def label_studio(label_studio_server):
    from resources import LabelStudio

    server, conn = label_studio_server
    return server, LabelStudio(url=conn.url, token=conn.token)


# Cases with a stack of their own first: the shared stack below lives until the module ends.


def test_a_postgresql_crash_under_the_metadata_db_loses_nothing(tmp_path, tiny_model_path, label_studio):
    from tests.postgres_server import EmbeddedPostgres

    _, resource = label_studio
    database = EmbeddedPostgres()
    url = database.start()
    try:
        with running_stack(tmp_path / "home", tiny_model_path, VBATCH_CURATION="on",
                           VBATCH_LABEL_STUDIO_URL=resource.url, VBATCH_LABEL_STUDIO_TOKEN=resource.token,
                           VBATCH_DATABASE_URL=url) as stack:
            batch_id, custom_ids = _submit(stack, "chaos-pg")
            _wait_for_progress(stack, batch_id)
            killed_at = time.monotonic()
            database.crash_and_restart(down_s=5)
            _assert_outcome(stack, batch_id, custom_ids, resource, "SIGKILL PostgreSQL (metadata DB), back after 5 s",
                            killed_at)
    finally:
        database.stop()


def test_a_full_disk_fails_the_batch_clearly_and_keeps_what_was_written(tmp_path, tiny_model_path, monkeypatch):
    """The batch's home on a 4 MiB tmpfs: the run fails the batch with a disk_full error naming what it kept,
    and every line it kept is a whole result."""
    import subprocess

    from tests.conftest import Platform
    from tests.conftest import chat_lines as lines_of

    mount = tmp_path / "small-disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("this machine does not let the tests mount a small tmpfs")
    try:
        monkeypatch.setenv("VBATCH_HOME", str(mount / "home"))
        monkeypatch.setenv("VBATCH_DATABASE_URL", f"sqlite:///{tmp_path / 'vbatch.db'}")  # the DB elsewhere
        monkeypatch.setenv("VBATCH_ENGINE", "transformers")
        monkeypatch.setenv("VBATCH_MODELS", f"vbatch-tiny-chat={tiny_model_path}")
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
        platform = Platform()
        platform.db.upgrade()
        lines = lines_of(3000, prefix="full", max_tokens=64)
        batch = platform.submit(jsonl(lines))
        filler = mount / "filler"
        size = 4 * 1024 * 1024 - sum(f.stat().st_size for f in mount.rglob("*") if f.is_file()) - 300_000
        filler.write_bytes(b"\0" * max(size, 0))  # ~300 kB left for the results
        result = platform.materialize(batch.id, raise_on_error=False)
        assert not result.success
        failed = platform.batch(batch.id)
        assert failed.status == "failed", failed.status
        error = failed.to_openai()["errors"]["data"][0]
        assert error["code"] == "disk_full" and "are kept" in error["message"]
        kept = _lines(platform.file_store.batch_dir(batch.id) / "output.jsonl")  # every line parses: none torn
        assert kept and failed.request_completed == len(kept) < 3000
        assert len({line["custom_id"] for line in kept}) == len(kept)
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.fixture(scope="module")
def chaos_stack(tmp_path_factory, tiny_model_path, label_studio):
    server, resource = label_studio
    home = tmp_path_factory.mktemp("chaos-home")
    with running_stack(home, tiny_model_path, VBATCH_CURATION="on", VBATCH_LABEL_STUDIO_URL=resource.url,
                       VBATCH_LABEL_STUDIO_TOKEN=resource.token) as stack:
        yield stack


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


FAULTS: dict[str, Callable] = {
    "the API": lambda stack, batch_id, studio: _kill_group(_service_pid(stack, "api")),
    "the Dagster daemon": lambda stack, batch_id, studio: _kill_group(_service_pid(stack, "dagster-daemon")),
    "the run worker": lambda stack, batch_id, studio: _kill_run_worker(stack, batch_id),
    "the vLLM server": lambda stack, batch_id, studio: _kill_group(_engine_pid(stack)),
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_a_killed_service_loses_nothing_and_blames_no_request(chaos_stack, label_studio, fault):
    server, resource = label_studio
    batch_id, custom_ids = _submit(chaos_stack, f"chaos-{fault.split()[-1]}")
    _wait_for_progress(chaos_stack, batch_id)
    killed_at = time.monotonic()
    FAULTS[fault](chaos_stack, batch_id, server)
    _assert_outcome(chaos_stack, batch_id, custom_ids, resource, f"SIGKILL {fault}", killed_at)


def test_a_killed_label_studio_loses_no_curation_task(chaos_stack, label_studio):
    server, resource = label_studio
    batch_id, custom_ids = _submit(chaos_stack, "chaos-studio")
    _wait_for_progress(chaos_stack, batch_id, fraction=0.5)
    killed_at = time.monotonic()
    _kill_group(server.state()["pid"])
    _wait_for_curation_retry(chaos_stack, batch_id)  # down while the batch finishes and its curation step tries
    down_s = time.monotonic() - killed_at
    server.ensure()  # its own supervisor (here: the test) brings it back
    _assert_outcome(chaos_stack, batch_id, custom_ids, resource,
                    f"SIGKILL Label Studio (back after {down_s:.0f} s, once curation had failed on it)", killed_at)


def _wait_for_curation_retry(stack, batch_id: str, timeout: float = 300) -> None:
    """Until the batch's curation step has failed for want of Label Studio and waits for its retry."""
    import sqlalchemy as sa
    from dagster import DagsterEventType, DagsterInstance

    engine = sa.create_engine(f"sqlite:///{_home(stack) / 'vbatch.db'}")
    deadline = time.monotonic() + timeout
    with DagsterInstance.from_config(stack.env["DAGSTER_HOME"]) as instance:
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                run_id = conn.execute(sa.text("SELECT dagster_run_id FROM batches WHERE id = :b"),
                                      {"b": batch_id}).scalar()
            if run_id and any((event.step_key or "").startswith("curation_tasks") for event in
                              instance.all_logs(run_id, of_type=DagsterEventType.STEP_UP_FOR_RETRY)):
                engine.dispose()
                return
            time.sleep(0.5)
    engine.dispose()
    raise AssertionError(f"{batch_id}'s curation step never failed on the killed Label Studio\n"
                         f"{_diagnosis(stack, batch_id)}")


def test_a_killed_run_worker_loses_nothing_of_batches_running_side_by_side(chaos_stack, label_studio):
    """Batches created together run in one run, side by side on the engine: SIGKILL its worker mid-way and
    every batch still completes with each custom_id exactly once, and its own curation tasks."""
    from concurrent.futures import ThreadPoolExecutor

    _, resource = label_studio
    client, size = chaos_stack.client(), 400
    inputs = {f"side{k}": chat_lines(size, prefix=f"side{k}") for k in range(5)}
    files = {prefix: _client_call(lambda lines=lines: client.files.create(file=("in.jsonl", jsonl(lines)),
                                                                         purpose="batch")).id
             for prefix, lines in inputs.items()}

    def create(file_id: str) -> str:
        return _client_call(lambda: client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                          completion_window="24h")).id

    with ThreadPoolExecutor(len(files)) as pool:
        batch_ids = dict(zip(files, pool.map(create, files.values())))
    # Batches of one run may finish at different times (the engine serves them in bursts): the kill goes to
    # the worker of whichever still holds a lease once a fifth of all results are written.
    pid, caught = _run_worker_mid_way(chaos_stack, list(batch_ids.values()), len(batch_ids) * size // 5)
    caught_at = {b: _output_lines(chaos_stack, b) for b in caught}
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    for prefix, batch_id in batch_ids.items():
        batch = _wait_completed(chaos_stack, batch_id)
        assert batch.status == "completed", (batch_id, batch.status, batch.errors)
        directory = _home(chaos_stack) / "batches" / batch_id
        output_lines, errors = _lines(directory / "output.jsonl"), _lines(directory / "errors.jsonl")
        seen = Counter(line["custom_id"] for line in output_lines + errors)
        assert set(seen) == {line["custom_id"] for line in inputs[prefix]} and max(seen.values()) == 1
        assert not errors, errors[:3]
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        recorded = {b: _curation_tasks(chaos_stack, b, resource)[0] for b in batch_ids.values()}
        if all(len(r) == size for r in recorded.values()):
            break
        time.sleep(2)
    short = [b for b, r in recorded.items() if len(r) != size]
    assert all(len(r) == size and max(r.values()) == 1 for r in recorded.values()), \
        f"{ {b: len(r) for b, r in recorded.items()} }\n{_diagnosis(chaos_stack, short[0]) if short else ''}"
    print(f"chaos: SIGKILL the run worker of {len(batch_ids)} batches side by side, {len(caught)} of them held by that run "
          f"(results then: {sorted(caught_at.values())}): all completed, each result once; recovered in "
          f"{time.monotonic() - killed_at:.1f}s", flush=True)


def test_kill_9_of_vbatch_up_then_up_again_finishes_the_batch(chaos_stack, label_studio):
    """Last in the module: it replaces the stack's `vbatch up`."""
    _, resource = label_studio
    batch_id, custom_ids = _submit(chaos_stack, "chaos-up")
    _wait_for_progress(chaos_stack, batch_id)
    killed_at = time.monotonic()
    chaos_stack.process.kill()
    chaos_stack.process.wait(30)
    home = _home(chaos_stack)
    # Every service goes with it (the detached engine stays, to be adopted). A code server the webserver or the
    # daemon started goes when their heartbeats stop: Dagster's TTL is 45 s, checked every 45 s, so up to 90 s.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and [p for p in survivors(home) if "vllm" not in " ".join(p.info["cmdline"])]:
        time.sleep(0.5)
    left = [p.info["cmdline"][:6] for p in survivors(home) if "vllm" not in " ".join(p.info["cmdline"])]
    assert not left, f"outlived `vbatch up`: {left}"
    engine = _engine_pid(chaos_stack)
    banner = chaos_stack.restart_up()
    assert "vbatch is up" in banner
    _assert_outcome(chaos_stack, batch_id, custom_ids, resource, "kill -9 of `vbatch up`, then `vbatch up`",
                    killed_at)
    assert psutil.pid_exists(engine) and _engine_pid(chaos_stack) == engine, "the warm engine was adopted"
