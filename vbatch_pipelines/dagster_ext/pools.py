"""Pool-slot claims beyond Dagster's own per-step ones: a step that needs the GPU to itself holds every slot of
the `inference` pool, through Dagster's pool storage (so the UI's pool page shows who holds what, and run
monitoring frees the slots of a run that died). The claims are made under step keys of their own
(``<step>[gpu to itself <n>]``), which Dagster's storage takes as any step's."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dagster import AssetExecutionContext

from vbatch_pipelines.defs.gpu import has_gpu_of_its_own
from vbatch_pipelines.instance import INFERENCE_POOL

DRAIN_MARK = "[gpu to itself "
DRAIN_PRIORITY = 1_000_000  # ahead of every batch step waiting for a slot (Dagster's queue is by priority)


@contextmanager
def gpu_to_itself(context: AssetExecutionContext, *, poll_s: float = 0.25, patience_s: float = 30.0) -> Iterator[None]:
    """Hold every `inference` slot for the duration. The claims go ahead of batch steps waiting in Dagster's
    queue: running batch steps finish, waiting ones start after this step. If another such step holds some
    of the slots after ``patience_s`` (two trainings on a multi-GPU box), this one lets go of its own and
    tries again after a random pause, so neither waits for the other forever."""
    storage = context.instance.event_log_storage
    if not storage.supports_global_concurrency_limits:
        yield
        return
    if has_gpu_of_its_own(context.run.tags):
        context.log.info("This run's pod has a GPU of its own: batches on the engines keep running")
        yield
        return
    slots = storage.get_concurrency_info(INFERENCE_POOL).slot_count
    run_id, step = context.run_id, context.asset_key.to_user_string()
    keys = [f"{step}{DRAIN_MARK}{i}]" for i in range(slots)]
    claimed: set[str] = set()

    def release() -> None:
        for key in keys:
            storage.free_concurrency_slot_for_step(run_id, key)
        claimed.clear()

    try:
        deadline, logged = time.monotonic() + patience_s, False
        while True:
            for key in keys:
                if key not in claimed and storage.claim_concurrency_slot(INFERENCE_POOL, run_id, key,
                                                                         DRAIN_PRIORITY).is_claimed:
                    claimed.add(key)
            if len(claimed) == len(keys):
                break
            if not logged:
                context.log.info(f"Waiting for the batches running on the engine: {len(keys) - len(claimed)} of "
                                 f"{len(keys)} `{INFERENCE_POOL}` slots in use")
                logged = True
            if time.monotonic() > deadline and _another_drain(storage, run_id):
                release()
                time.sleep(random.uniform(1.0, 5.0))
                deadline = time.monotonic() + patience_s
            time.sleep(poll_s)
        yield
    finally:
        release()


def _another_drain(storage, run_id: str) -> bool:
    info = storage.get_concurrency_info(INFERENCE_POOL)
    return any(slot.run_id != run_id and DRAIN_MARK in (slot.step_key or "") for slot in info.claimed_slots)
