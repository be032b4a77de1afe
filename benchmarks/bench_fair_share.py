"""Two projects on one engine, end to end through a real `vbatch up` and the openai SDK (issue 27).

Project A runs a large batch (``--big``, 20,000 requests); project B submits small batches (``--size``, 20
requests) one after another, each polled every 0.05 s by its own key. Measured:

1. B alone: create -> completed of ``--idle`` sequential small batches on the idle platform (p50).
2. A alone: A's large batch with nothing else, its throughput from 10 % to 90 % of its requests (its
   ``request_counts.completed`` as the API reports it).
3. Together: A's large batch again; from 10 % to 90 % of it B's small batches run one after another: B's p50,
   A's throughput over the same span, and B's share of the requests completed meanwhile.
4. The control: A's large batch once more while B only polls its last batch at 20 Hz, submitting nothing.
Targets: B's p50 together <= 3x its p50 alone; A's throughput drop <= B's share.

``--peer REV`` runs the same with that revision's code, side by side (default 77a86bf: projects and keys, before
ownership and the engine's fair share: every chunk went straight to vLLM, first come first served).

Usage: python benchmarks/bench_fair_share.py [--big 20000] [--size 20] [--idle 10] [--peer [REV]]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import httpx
import openai
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import (  # noqa: E402
    ROOT,
    Stack,
    cpu_seconds,
    engine_pid,
    load_average,
    requests_jsonl,
    worktree,
)

ADMIN = "bench-admin"


def project_client(stack: Stack, name: str, weight: int = 1) -> openai.OpenAI:
    """A new project's admin key, as an openai SDK client."""
    headers = {"Authorization": f"Bearer {ADMIN}"}
    project = httpx.post(f"{stack.api}/v1/organization/projects", json={"name": name}, headers=headers).json()["id"]
    httpx.post(f"{stack.api}/v1/organization/projects/{project}", json={"weight": weight}, headers=headers)
    key = httpx.post(f"{stack.api}/v1/organization/projects/{project}/api_keys", headers=headers,
                     json={"name": "bench", "owner": "bench", "role": "admin"}).json()["value"]
    return openai.OpenAI(base_url=stack.api + "/v1", api_key=key, max_retries=0)


def small_batch(stack: Stack, client: openai.OpenAI, size: int, tag: str) -> float:
    """One small batch of B's: create -> completed seconds (its upload is not timed); checked complete."""
    file_id = stack.upload(requests_jsonl(size, tag), client=client)
    started = time.monotonic()
    batch = stack.wait(stack.create(file_id, client=client), client=client, interval=0.05)
    if batch.status != "completed" or batch.request_counts.completed != size:
        raise AssertionError(f"{batch.id}: {batch.status} {batch.request_counts}")
    return time.monotonic() - started


class CpuUse:
    """CPU seconds of the engine (the vLLM server's processes), the rest of the platform (API, Dagster, run
    workers) and this client, between two calls of ``take``: where the machine's two cores went."""

    def __init__(self, stack: Stack):
        self.engine = psutil.Process(engine_pid(stack))
        self.platform = psutil.Process(stack.process.pid)
        self.client = psutil.Process()
        self.last = self._now()

    def _now(self) -> tuple[float, float, float, float]:
        engine = {self.engine, *self.engine.children(recursive=True)}
        rest = {self.platform, *self.platform.children(recursive=True)} - engine
        return time.monotonic(), cpu_seconds(engine), cpu_seconds(rest), cpu_seconds([self.client])

    def take(self) -> dict[str, float]:
        """Cores used on average since the last call, by engine, platform and client."""
        now = self._now()
        span = max(now[0] - self.last[0], 1e-6)
        used = {name: (now[i] - self.last[i]) / span for i, name in ((1, "engine"), (2, "platform"), (3, "client"))}
        self.last = now
        return used


def large_batch(stack: Stack, client: openai.OpenAI, size: int, tag: str, meanwhile=None) -> tuple[float, int, dict]:
    """A's large batch: its throughput (req/s) from 10 % to 90 % of its requests, calling ``meanwhile()`` over
    and over in that span (B's small batches); the requests it completed in the span, and the cores used then."""
    batch_id = client.batches.create(input_file_id=stack.upload(requests_jsonl(size, tag), client=client),
                                     endpoint="/v1/chat/completions", completion_window="24h").id

    def completed() -> tuple[float, int, str]:
        batch = client.batches.retrieve(batch_id)
        return time.monotonic(), batch.request_counts.completed, batch.status

    while (now := completed())[1] < size // 10:
        time.sleep(0.1)
    cpu = CpuUse(stack)
    t0, c0, _ = now
    t1, c1, status = now
    while c1 < size * 9 // 10 and status == "in_progress":
        if meanwhile is not None:
            meanwhile()
        else:
            time.sleep(0.1)
        t1, c1, status = completed()
    cores = cpu.take()
    final = stack.wait(batch_id, client=client)
    assert final.status == "completed" and final.request_counts.completed == size, final
    return (c1 - c0) / (t1 - t0), c1 - c0, cores


def scenario(stack: Stack, args) -> dict:
    a, b = project_client(stack, "project-a"), project_client(stack, "project-b")
    small_batch(stack, b, args.size, "warm-b")  # first runs pay one-off imports
    small_batch(stack, a, args.size, "warm-a")
    cpu, started = CpuUse(stack), time.monotonic()
    idle = [small_batch(stack, b, args.size, f"idle{k}-") for k in range(args.idle)]
    per_batch = {name: cores * (time.monotonic() - started) / args.idle for name, cores in cpu.take().items()}
    a_alone, _, cores_alone = large_batch(stack, a, args.big, "alone")
    together: list[float] = []
    a_with, a_requests, cores_with = large_batch(
        stack, a, args.big, "with",
        meanwhile=lambda: together.append(small_batch(stack, b, args.size, f"with{len(together)}-")))
    b_requests = args.size * len(together)
    # The control: B only polls (its last batch, done, at 20 Hz, as it polls its own) and submits nothing. What A
    # loses then no scheduler can give back: the API's and database's CPU is the engine's on this machine.
    last = b.batches.list(limit=1).data[0].id
    a_polled, _, cores_polled = large_batch(stack, a, args.big, "polled",
                                            meanwhile=lambda: (b.batches.retrieve(last), time.sleep(0.05)))
    return {"idle_p50": statistics.median(idle), "with_p50": statistics.median(together), "with_n": len(together),
            "a_alone": a_alone, "a_with": a_with, "drop": 1 - a_with / a_alone,
            "b_share": b_requests / (b_requests + a_requests), "cores_alone": cores_alone, "cores_with": cores_with,
            "per_batch": per_batch, "a_polled": a_polled, "polled_drop": 1 - a_polled / a_alone, "cores_polled": cores_polled}


def report(label: str, r: dict) -> None:
    ratio = r["with_p50"] / r["idle_p50"]
    print(f"{label}: B's {r['with_n']} small batches p50 {r['with_p50']:.2f}s while A runs vs {r['idle_p50']:.2f}s "
          f"idle -> {ratio:.2f}x (target <= 3x); A {r['a_alone']:.0f} req/s alone, "
          f"{r['a_with']:.0f} req/s with B -> drop {r['drop']:.1%}, B's share of the requests {r['b_share']:.1%} "
          f"(target: drop <= share)", flush=True)
    print("   CPU-s each small batch took on the idle platform (upload, create, its Dagster run, polls): " +
          ", ".join(f"{name} {value:.2f}" for name, value in r["per_batch"].items()), flush=True)
    if "a_polled" in r:
        print(f"   control: B only polling at 20 Hz, nothing submitted: A {r['a_polled']:.0f} req/s -> drop "
              f"{r['polled_drop']:.1%}", flush=True)
    for span, words in (("alone", "alone"), ("with", "with B"), ("polled", "with B only polling")):
        if f"cores_{span}" in r:
            print(f"   cores used while A ran {words}: " +
                  ", ".join(f"{name} {value:.2f}" for name, value in r[f"cores_{span}"].items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--big", type=int, default=20000)
    parser.add_argument("--size", type=int, default=20)
    parser.add_argument("--idle", type=int, default=10)
    parser.add_argument("--peer", nargs="?", const="77a86bf", default=None,
                        help="also with this revision's code, side by side (default 77a86bf)")
    args = parser.parse_args()
    arms = [("fair share", ROOT)] + ([(f"peer {args.peer}", worktree(args.peer))] if args.peer else [])
    for label, root in arms:
        stack = Stack(env={"VBATCH_ADMIN_KEYS": ADMIN}, root=root)
        try:
            print(f"{label}: load average {load_average()}", flush=True)
            report(label, scenario(stack, args))
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
