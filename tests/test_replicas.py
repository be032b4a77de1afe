"""Engines as network services (issue 18): a model served by two vLLM CPU replicas that vbatch did not start
(VBATCH_ENGINES, as a Kubernetes Deployment behind two pods would be). A batch is spread over both, survives one
dying mid-batch with nothing lost or answered twice, a LoRA deploy reaches both, and a replica that restarts
gets it back; the engine registry in the metadata DB says what each node saw. The replicas (the ``replicas``
fixture) are shared with tests/test_cluster_replicas.py, which runs them under cluster mode."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

from tests.conftest import Platform, chat_lines, jsonl, vllm_python
from tests.scale_out import REPLICAS_KEY
from vbatch_pipelines.models.registry import TINY_MODEL_ID


@pytest.fixture()
def cluster(vbatch_home, replicas, monkeypatch):
    """This node: the platform with both replicas as its external engines for the tiny model."""
    monkeypatch.setenv("VBATCH_ENGINE", "vllm")
    monkeypatch.setenv("VBATCH_VLLM_PYTHON", vllm_python())
    monkeypatch.setenv("VBATCH_ENGINES", ",".join(f"{TINY_MODEL_ID}={r.url}" for r in replicas))
    monkeypatch.setenv("VBATCH_ENGINES_API_KEY", REPLICAS_KEY)
    monkeypatch.setenv("VBATCH_NODE", "node-c")
    for replica in replicas:
        if not replica.server.healthy():
            replica.start()
    return Platform()


def _custom_ids(platform, batch_id: str) -> Counter:
    out, err = platform.results(batch_id)
    assert err == []
    return Counter(line["custom_id"] for line in out)


def test_a_batch_is_spread_over_both_replicas_and_each_request_is_answered_once(cluster, replicas, capsys):
    from vbatch_pipelines.cli import main

    before = [replica.served() for replica in replicas]
    batch = cluster.submit(jsonl(chat_lines(300, prefix="spread")))
    assert cluster.materialize(batch.id).success
    assert cluster.batch(batch.id).status == "completed"
    assert _custom_ids(cluster, batch.id) == Counter({f"spread-{i}": 1 for i in range(300)})
    served = [replica.served() - start for replica, start in zip(replicas, before)]
    assert sum(served) == 300 and min(served) >= 60, served  # both replicas took a fair share
    assert not any((cluster.file_store.engines_dir).glob("*.json"))  # this node started no engine of its own
    registry = cluster.resources.inference_engine.registry()
    seen = {r.base_url: r for r in registry.replicas(TINY_MODEL_ID)}
    assert set(seen) == {r.url for r in replicas} and {r.status for r in seen.values()} == {"up"}
    assert {r.kind for r in seen.values()} == {"external"}
    assert main(["engine", "status"]) == 0  # an operator sees the same
    status = capsys.readouterr().out
    assert all(f"external on external\t{replica.url}\tup" in status for replica in replicas), status


def _registry(platform) -> list[tuple[str, str, str | None]]:
    """What this node's engine registry says of each replica (URL, status, last error)."""
    return [(r.base_url, r.status, r.last_error)
            for r in platform.resources.inference_engine.registry().replicas(TINY_MODEL_ID)]


SUCCESS, RUNNING, WAITING = "vllm:request_success_total", "vllm:num_requests_running", "vllm:num_requests_waiting"


def test_a_replica_killed_mid_batch_loses_and_duplicates_nothing(cluster, replicas):
    # Every answer 32 tokens long (no early end of sequence): the batch's length does not hang on the answers.
    # Long enough that the kill lands mid-batch even when a scrape of a busy replica's /metrics takes seconds
    # (CI saw one take 7.5 s, while 1,000 requests were answered).
    total = 4000
    batch = cluster.submit(jsonl(chat_lines(total, prefix="kill", max_tokens=32, ignore_eos=True)))
    done = threading.Event()
    outcome = {}

    def run():
        from dagster import DagsterInstance

        with DagsterInstance.ephemeral() as instance:  # made and closed in this thread (its SQLite is)
            outcome["result"] = cluster.materialize(batch.id, instance=instance, raise_on_error=False)
        done.set()

    starts = [replica.served() for replica in replicas]
    threading.Thread(target=run, daemon=True).start()
    deadline = time.monotonic() + 120
    began = time.monotonic()
    timeline = []  # (seconds, answered by each replica, each one's running and waiting requests)
    victim = None
    # Killed once the batch is under way (some answered), the replica that holds requests of it at that moment
    # (which one gets the first chunks is the dispatcher's choice, not the test's).
    while victim is None and time.monotonic() < deadline:
        now = [replica.metrics(SUCCESS, RUNNING, WAITING) for replica in replicas]
        answered = [m[SUCCESS] - start for m, start in zip(now, starts)]
        holding = [m[RUNNING] + m[WAITING] for m in now]
        timeline.append((round(time.monotonic() - began, 2), answered, holding))
        if sum(answered) >= 20 and max(holding) > 0:
            victim = replicas[holding.index(max(holding))]
        time.sleep(0.01)
    assert victim is not None, f"no replica held requests of the batch once it was under way: {timeline[-40:]}"
    victim.kill()
    survivor = next(replica for replica in replicas if replica is not victim)
    print(f"killed {victim.url} at {timeline[-1]} (seconds, answered by each replica, running + waiting on each)")
    assert sum(timeline[-1][1]) < total - 1000, \
        f"the kill came too late to be mid-batch ({sum(timeline[-1][1])} of {total} answered): {timeline[-40:]}; " \
        f"the registry: {_registry(cluster)}"
    assert done.wait(300), "the batch did not finish on the surviving replica"
    assert outcome["result"].success and cluster.batch(batch.id).status == "completed"
    assert _custom_ids(cluster, batch.id) == Counter({f"kill-{i}": 1 for i in range(total)})
    engine = cluster.resources.inference_engine
    seen = {r.base_url: r for r in engine.registry().replicas(TINY_MODEL_ID)}
    assert seen[victim.url].status == "down" and seen[victim.url].last_error, seen  # as the batch saw it
    assert seen[survivor.url].status == "up"
    opened = engine.open(cluster.registry.lookup(TINY_MODEL_ID))  # the next batch finds only the survivor
    assert [replica.url for replica in opened.replicas] == [survivor.url]
    asyncio.run(opened.aclose())


def test_a_lora_deploy_reaches_both_replicas_and_a_restarted_one_gets_it_back(cluster, replicas, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from vbatch_pipelines.fine_tuning.service import fine_tuned_model_name
    from vbatch_pipelines.models.store import register_fine_tune

    base = cluster.registry.lookup(TINY_MODEL_ID)
    adapter = tmp_path / "adapter"
    model = AutoModelForCausalLM.from_pretrained(base.path)
    get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter)
    name = fine_tuned_model_name(TINY_MODEL_ID, "replicas", "ftjob-replicas")
    spec = base.with_adapter(name, str(adapter))

    engine = cluster.resources.inference_engine
    engine.deploy_adapter(spec)
    register_fine_tune(cluster.db, spec, "ftjob-replicas")
    assert all(name in replica.models() for replica in replicas)

    first = replicas[0]
    first.server.stop()  # its Deployment restarts it, knowing nothing of vbatch's adapters
    first.start()
    assert name not in first.models()
    batch = cluster.submit(jsonl(chat_lines(40, prefix="lora", model=name)))
    assert cluster.materialize(batch.id).success
    assert name in first.models()  # loaded back before the batch used it
    assert _custom_ids(cluster, batch.id) == Counter({f"lora-{i}": 1 for i in range(40)})

    assert engine.undeploy_adapter(spec)
    assert all(name not in replica.models() for replica in replicas)


def test_engines_that_are_not_urls_are_refused_at_load(monkeypatch):
    from vbatch_pipelines.settings import SettingsError, load_settings

    for bad in ("tiny", "tiny=ftp://host:1", "tiny=http://host:1/v1", "tiny=http://user:pw@host:1",
                "tiny=http://h:1,tiny=http://h:1"):
        monkeypatch.setenv("VBATCH_ENGINES", bad)
        with pytest.raises(SettingsError, match="VBATCH_ENGINES"):
            load_settings()
    monkeypatch.setenv("VBATCH_ENGINES", "a=http://h:1, a=http://h2:2/ ,b=https://b.example")
    assert load_settings().engine.external_engines == {"a": ["http://h:1", "http://h2:2"], "b": ["https://b.example"]}
