"""Training time-shares the GPU with inference.

Batch steps claim one slot of the `inference` pool each and run side by side on the warm engine. A step
that needs the GPU to itself (training, a comparison, an install's smoke test) claims a `gpu` slot like
any pool step, then every `inference` slot: running batch steps finish first, new ones wait until it is
done. The claims go through Dagster's own pool storage, so the UI's pool page shows who holds what, and run
monitoring frees the slots of a run that died.

On Kubernetes the pool still says when a `gpu` step may run; the GPU itself comes with the run's pod, which
asks for it through the ``dagster-k8s/config`` tag of the jobs holding `gpu` steps (``gpu_run_tags``). Such a
run shares no GPU with the engines (they are Deployments with GPUs of their own), so it does not drain the
`inference` pool: batches cluster-wide keep running while it trains.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager

from dagster import AssetExecutionContext

from vbatch_pipelines.instance import INFERENCE_POOL

K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster-k8s's USER_DEFINED_K8S_CONFIG_KEY (dagster-k8s is optional here)
GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's resource name
DRAIN_MARK = "[gpu to itself "
DRAIN_PRIORITY = 1_000_000  # ahead of every batch step waiting for a slot (Dagster's queue is by priority)


def gpu_run_tags(gpus: int) -> dict[str, str]:
    """Tags for a job with `gpu` steps. Its steps run in the run's own process (in-process executor), so on
    Kubernetes (K8sRunLauncher) the GPU is asked for by the run's pod, from the run's tags: ``gpus`` GPUs,
    and a toleration for the taint GPU node pools usually carry. No tag for 0 (one machine); launchers other
    than Dagster's Kubernetes ones ignore it."""
    if not gpus:
        return {}
    config = {"container_config": {"resources": {"limits": {GPU_RESOURCE: gpus}}},
              "pod_spec_config": {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists",
                                                   "effect": "NoSchedule"}]}}
    return {K8S_CONFIG_TAG: json.dumps(config, separators=(",", ":"))}


def has_gpu_of_its_own(tags: dict[str, str]) -> bool:
    """Whether a run with these tags asks Kubernetes for GPUs of its own (``gpu_run_tags``)."""
    try:
        config = json.loads(tags.get(K8S_CONFIG_TAG) or "{}")
        return int(config["container_config"]["resources"]["limits"][GPU_RESOURCE]) > 0
    except (ValueError, TypeError, KeyError):
        return False


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
