"""Training time-shares the GPU with inference: batch steps share the `inference` pool, a step that needs the
GPU to itself (``gpu_to_itself``) takes every `inference` slot. Dagster's own pool storage, on a real
SQLite instance."""

from __future__ import annotations

import logging
import threading
import time
from types import SimpleNamespace

from dagster import AssetKey
from dagster._core.test_utils import instance_for_test

from vbatch_pipelines.dagster_ext.pools import DRAIN_MARK, gpu_to_itself
from vbatch_pipelines.defs.gpu import gpu_run_tags
from vbatch_pipelines.instance import INFERENCE_POOL, set_pools


def _context(instance, run_id: str, asset: str = "fine_tuned_checkpoint", tags: dict | None = None):
    return SimpleNamespace(instance=instance, run_id=run_id, asset_key=AssetKey(asset),
                           log=logging.getLogger("test"), run=SimpleNamespace(tags=tags or {}))


class DrainRounds:
    """Counts a draining step's claim rounds (its claims of the `inference` slots), so a test waits until the
    step has looked again and is still waiting, instead of sleeping and hoping it looked."""

    def __init__(self, storage, slots: int):
        self.slots, self.attempts, self.changed = slots, 0, threading.Condition()
        claim = storage.claim_concurrency_slot

        def counted(pool, run_id, step_key, *args, **kwargs):
            result = claim(pool, run_id, step_key, *args, **kwargs)
            if DRAIN_MARK in step_key:
                with self.changed:
                    self.attempts += 1
                    self.changed.notify_all()
            return result

        storage.claim_concurrency_slot = counted  # this instance's storage only

    def wait(self, rounds: int = 2, timeout: float = 30) -> None:
        """Until the step made ``rounds`` more claim rounds (its slots' count each) than when this was called."""
        with self.changed:
            start = self.attempts
            assert self.changed.wait_for(lambda: self.attempts >= start + rounds * self.slots, timeout), \
                "the draining step stopped polling"


def _claim(storage, run_id: str) -> bool:
    return storage.claim_concurrency_slot(INFERENCE_POOL, run_id, "batch_output").is_claimed


def test_training_waits_for_running_batches_and_new_batches_wait_for_training():
    with instance_for_test() as instance:
        set_pools(instance, gpus=0, inference_runs=3)
        storage = instance.event_log_storage
        rounds = DrainRounds(storage, slots=3)
        assert _claim(storage, "batches-1") and _claim(storage, "batches-2")  # two batch steps running
        entered, leave = threading.Event(), threading.Event()

        def train():
            with gpu_to_itself(_context(instance, "training"), poll_s=0.05):
                entered.set()
                leave.wait(30)

        trainer = threading.Thread(target=train)
        trainer.start()
        rounds.wait()
        assert not entered.is_set(), "training started while batches held the engine"
        assert not _claim(storage, "batches-3"), "a new batch step jumped ahead of the waiting training"
        storage.free_concurrency_slot_for_step("batches-1", "batch_output")
        rounds.wait()
        assert not entered.is_set()
        storage.free_concurrency_slot_for_step("batches-2", "batch_output")
        assert entered.wait(5), "training did not get the GPU once the batches were done"
        assert not _claim(storage, "batches-3")
        leave.set()
        trainer.join(10)
        deadline = time.monotonic() + 5
        while not _claim(storage, "batches-3") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _claim(storage, "batches-3"), "the batch step waiting behind training never ran"
        info = storage.get_concurrency_info(INFERENCE_POOL)
        assert [slot.run_id for slot in info.claimed_slots] == ["batches-3"]


def test_two_steps_that_need_the_gpu_to_themselves_do_not_wait_for_each_other_forever():
    """On a multi-GPU box two trainings may drain at once, each holding part of the slots: the one that
    waited past its patience lets go, so both run in turn."""
    with instance_for_test() as instance:
        set_pools(instance, gpus=2, inference_runs=4)
        order = []

        def train(name: str):
            with gpu_to_itself(_context(instance, name), poll_s=0.02, patience_s=0.5):
                order.append(name)
                time.sleep(0.3)

        threads = [threading.Thread(target=train, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert sorted(order) == ["a", "b"]
        assert not instance.event_log_storage.get_concurrency_info(INFERENCE_POOL).claimed_slots


def test_a_run_whose_pod_has_its_own_gpu_does_not_stop_the_batches():
    """On Kubernetes a training pod asks for a GPU of its own (``gpu_run_tags``) and the engines are Deployments
    with theirs: draining the `inference` pool would pause every batch in the cluster for nothing."""
    with instance_for_test() as instance:
        set_pools(instance, gpus=1, inference_runs=2)
        storage = instance.event_log_storage
        rounds = DrainRounds(storage, slots=2)
        assert _claim(storage, "batches-1")
        entered, batch_ran = threading.Event(), []

        def train(tags):
            with gpu_to_itself(_context(instance, "training", tags=tags), poll_s=0.05):
                entered.set()
                batch_ran.append(_claim(storage, "batches-2"))  # a batch step starting during the training
                storage.free_concurrency_slot_for_step("batches-2", "batch_output")

        trainer = threading.Thread(target=train, args=(gpu_run_tags(1),))
        trainer.start()
        assert entered.wait(5), "the training waited for batches on engines it does not share a GPU with"
        trainer.join(10)
        assert batch_ran == [True], "a batch step waited for a training on another GPU"
        shared = threading.Thread(target=train, args=({"dagster-k8s/config": "not json"},))  # no GPU of its own
        entered.clear()
        shared.start()
        rounds.wait()
        assert not entered.is_set(), "a run sharing the GPU trained while a batch held the engine"
        storage.free_concurrency_slot_for_step("batches-1", "batch_output")
        assert entered.wait(5)
        shared.join(10)
        assert batch_ran == [True, False], "a batch step ran on the engine while a training had its GPU"
