"""The engine's fair share (issue 27): when several projects' batches are in flight on one engine server, a freed
chunk slot goes to the project running the fewest chunks for its weight, so a small batch is not stuck behind
another project's large one. The scheduler itself here (pure asyncio, as the vLLM middleware runs it); its use
by the real vLLM server is tested in tests/test_vllm.py."""

from __future__ import annotations

import asyncio

from vbatch_pipelines.engine.vllm_batch_middleware import FairShare, share_of


def test_a_lone_project_has_every_slot_and_a_newcomer_never_waits_behind_it():
    async def scenario():
        share = FairShare(slots=4)
        for _ in range(4):  # project A alone: no waiting
            await asyncio.wait_for(share.acquire("a"), 0.1)
        a_more = [asyncio.create_task(share.acquire("a")) for _ in range(3)]  # A queues more chunks
        await asyncio.sleep(0)
        assert share.waiting["a"] and not any(task.done() for task in a_more)
        # B comes later, behind A's queue: its first chunk runs at once (one over the limit), first in vLLM's
        # queue too (priority 1: nothing of B's running); its second waits its turn.
        assert await asyncio.wait_for(share.acquire("b"), 0.1) == 1 and share.busy == 5
        b_second = asyncio.create_task(share.acquire("b"))
        await asyncio.sleep(0)
        share.release("a")  # back at the limit: nobody starts
        await asyncio.sleep(0)
        assert not b_second.done() and not any(task.done() for task in a_more)
        share.release("a")  # a slot: B's, running one chunk against A's two, though A asked first
        await asyncio.sleep(0)
        assert b_second.done() and b_second.result() == 1001 and not any(task.done() for task in a_more)
        share.release("b")  # the next goes back to A, behind B's in vLLM's queue (2 running: priority 2001)
        await asyncio.sleep(0)
        assert [task.result() for task in a_more if task.done()] == [2001]
        assert share.running == {"a": 3, "b": 1} and share.busy == 4
        for task in a_more:
            task.cancel()
        await asyncio.gather(*a_more, return_exceptions=True)
        return share

    share = asyncio.run(scenario())
    assert not share.waiting["a"] and share.running["a"] == 3  # a cancelled waiter leaves nothing behind
    assert share.passed_over == {"a": 1}  # B was never passed over


def test_weights_divide_the_slots_and_a_cancelled_grant_is_given_back():
    async def scenario():
        share = FairShare(slots=4)
        done = {"a": 0, "b": 0}

        async def chunk(project, weight):
            await share.acquire(project, weight)
            try:
                await asyncio.sleep(0.002)
                done[project] += 1
            finally:
                share.release(project)

        # Both projects keep far more chunks queued than there are slots: B (weight 3) runs 3 for A's 1.
        tasks = [asyncio.create_task(chunk("a", 1)) for _ in range(200)]
        tasks += [asyncio.create_task(chunk("b", 3)) for _ in range(200)]
        while done["a"] + done["b"] < 160:
            await asyncio.sleep(0.001)
        snapshot = dict(done)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return share, snapshot

    share, done = asyncio.run(scenario())
    assert 2.3 <= done["b"] / done["a"] <= 3.7, done
    assert share.busy == 0 and not any(share.waiting.values())


def test_chunks_say_whose_they_are_in_two_headers():
    assert share_of({"x-vbatch-project": "proj_a", "x-vbatch-weight": "2.5"}) == ("proj_a", 2.5)
    assert share_of({}) == ("", 1.0)  # an older client: one shared anonymous project
    assert share_of({"x-vbatch-weight": "lots"}) == ("", 1.0)
    assert share_of({"x-vbatch-weight": "1e9", "x-vbatch-project": "p" * 100}) == ("p" * 64, 100.0)
