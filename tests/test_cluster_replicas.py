"""Issue 18's two halves together: cluster mode (`vbatch up --mode cluster`, two `vbatch worker` nodes, Redis,
PostgreSQL for both stores, as tests/test_cluster.py runs it) whose engine is two vLLM CPU replicas of the tiny
model that vbatch did not start (VBATCH_ENGINES, as tests/test_replicas.py runs them). Every node sends its runs'
requests to both replicas; which node ran a batch is read from its run's tags, which replica answered from each
replica's own /metrics."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest

from tests.conftest import chat_lines, vllm_python
from tests.scale_out import REPLICAS_KEY, Cluster, Replica, running_cluster
from vbatch_pipelines.models.registry import TINY_MODEL_ID
from vbatch_pipelines.names import BATCH_ID_TAG, NODE_TAG

pytestmark = [pytest.mark.stack, pytest.mark.vllm]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_model_path, redis_url, replicas) -> Iterator[Cluster]:
    engines = ",".join(f"{TINY_MODEL_ID}={replica.url}" for replica in replicas)
    with running_cluster(tmp_path_factory.mktemp("cluster"), tiny_model_path, redis_url, VBATCH_ENGINE="vllm",
                         VBATCH_ENGINES=engines, VBATCH_ENGINES_API_KEY=REPLICAS_KEY,
                         VBATCH_VLLM_PYTHON=vllm_python()) as running:
        yield running


def _by_max_tokens(replica: Replica) -> dict[int, float]:
    """Requests this replica received with max_tokens <= 5 and in (5, 10], from vLLM's histogram of it."""
    at_most = {le: replica.metric("vllm:request_params_max_tokens_bucket", le=f"{le}.0") for le in (5, 10)}
    return {5: at_most[5], 10: at_most[10] - at_most[5]}


def test_two_batches_run_on_both_nodes_each_spread_over_both_replicas(cluster, replicas):
    """Two batches submitted one right after the other (as two clients would; created within 50 ms they would
    share one run) while every node runs one run at a time: the second run goes to the node the first leaves
    free. Each batch's chunks go to both replicas: the batches are told apart in the replicas' metrics by their
    max_tokens (5 and 10, in different buckets of vLLM's max_tokens histogram). Each custom_id comes back once."""
    sizes = {"first": (1500, 5), "second": (300, 10)}  # the first long enough to be running when the second comes
    served = [replica.served() for replica in replicas]
    received = [_by_max_tokens(replica) for replica in replicas]
    first = cluster.submit(chat_lines(sizes["first"][0], prefix="first", max_tokens=5, ignore_eos=True))
    cluster.wait_run(lambda: cluster.runs(**{BATCH_ID_TAG: first.id}), "the first batch's run created", timeout=60)
    second = cluster.submit(chat_lines(sizes["second"][0], prefix="second", max_tokens=10, ignore_eos=True))
    nodes = {}
    for prefix, batch in (("first", first), ("second", second)):
        done = cluster.wait_batch(batch.id)
        assert done.status == "completed" and done.request_counts.failed == 0, done
        assert Counter(cluster.custom_ids(done)) == Counter({f"{prefix}-{i}": 1 for i in range(sizes[prefix][0])})
        run = cluster.wait_run(lambda: next((r for r in cluster.runs(**{BATCH_ID_TAG: batch.id}) if r.is_success),
                                            None), "the batch's run succeeded")
        nodes[prefix] = run.tags[NODE_TAG]
    assert sorted(nodes.values()) == ["node-a", "node-b"], nodes

    grown = [replica.served() - before for replica, before in zip(replicas, served)]
    assert sum(grown) == sum(size for size, _ in sizes.values()) and min(grown) > 0, grown
    spread = {}
    for prefix, (size, max_tokens) in sizes.items():
        spread[prefix] = [_by_max_tokens(replica)[max_tokens] - before[max_tokens]
                          for replica, before in zip(replicas, received)]
        assert sum(spread[prefix]) == size and min(spread[prefix]) >= size // 8, (prefix, spread[prefix])
    print("\n" + "; ".join(f"{prefix} on {nodes[prefix]}, replicas answered "
                           f"{' / '.join(f'{n:.0f}' for n in spread[prefix])}" for prefix in sizes))
