"""The REST front door under load, against a real `vbatch up` (API, Dagster, warm vLLM) on a temp home.

1. submit -> in_progress latency over sequential small batches (p50 target <= 2 s), measured by the
   client: from the start of batches.create to the first retrieve that no longer says validating.
2. GET /v1/batches/{id} latency with 50 concurrent clients, each polling 10 times a second on its own
   keep-alive connection, open loop (p99 target <= 50 ms); side by side the same load on GET /health as
   the peer floor. Then the saturation point with wrk (50 connections, no pause) when wrk is installed.
3. 100 batches submitted concurrently: all complete, none lost, no custom_id missing or duplicated.

Usage: python benchmarks/bench_api.py [--latency-batches 20] [--clients 50] [--rate 10] [--seconds 15] [--concurrent 100]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import random
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import Stack, pct, requests_jsonl  # noqa: E402


async def _poll_client(host: str, port: int, path: str, interval: float, until: float, out: list[float]) -> None:
    """One polling client on a keep-alive connection (raw HTTP/1.1: the load generator shares the box's
    two cores with the server, so it must cost little). Open loop: requests are due every ``interval``
    and latency counts from when a request was due, so a slow reply also charges the ones queued behind it."""
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    due = time.perf_counter() + random.random() * interval
    while due < until:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        writer.write(request)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        await reader.readexactly(length)
        out.append(time.perf_counter() - due)
        due += interval
    writer.close()


def poll(url: str, clients: int, rate: float, seconds: float) -> list[float]:
    """``clients`` clients each polling ``url`` ``rate`` times a second for ``seconds``."""
    parts = httpx.URL(url)
    latencies: list[float] = []

    async def run() -> None:
        until = time.perf_counter() + seconds
        await asyncio.gather(*(_poll_client(parts.host, parts.port, parts.raw_path.decode(), 1 / rate, until,
                                            latencies) for _ in range(clients)))

    asyncio.run(run())
    return latencies


def poll_in_subprocess(url: str, clients: int, rate: float, seconds: float) -> list[float]:
    out = subprocess.run([sys.executable, __file__, "--poll", url, "--clients", str(clients), "--rate", str(rate),
                          "--seconds", str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def wrk(url: str, connections: int, seconds: int) -> str:
    """Closed-loop saturation with wrk (apt install wrk), when it is installed."""
    if not shutil.which("wrk"):
        return "wrk not installed"
    out = subprocess.run(["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
                         capture_output=True, text=True).stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    p50, p99 = re.search(r"^\s+50%\s+(\S+)", out, re.M), re.search(r"^\s+99%\s+(\S+)", out, re.M)
    return f"{float(rps.group(1)):.0f} req/s, p50 {p50.group(1)}, p99 {p99.group(1)}" if rps and p99 else out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latency-batches", type=int, default=20)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=10.0, help="polls per second per client")
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--poll", help=argparse.SUPPRESS)  # internal: run the polling clients only
    parser.add_argument("--concurrent", type=int, default=100)
    args = parser.parse_args()
    if args.poll:
        print(json.dumps(poll(args.poll, args.clients, args.rate, args.seconds)))
        return 0
    stack = Stack()
    api = stack.api

    def wait_done(client, batch_id):
        return stack.wait(batch_id, timeout=600, interval=0.25)

    try:
        client = openai.OpenAI(base_url=api + "/v1", api_key="bench", max_retries=0)
        file_id = client.files.create(file=("small.jsonl", io.BytesIO(requests_jsonl(10, "lat"))),
                                      purpose="batch").id
        wait_done(client, client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                                completion_window="24h").id)  # warm-up
        latencies = []
        for _ in range(args.latency_batches):
            started = time.monotonic()
            batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            while client.batches.retrieve(batch.id).status == "validating":
                time.sleep(0.02)
            latencies.append(time.monotonic() - started)
            wait_done(client, batch.id)
        print(f"1) submit -> in_progress over {args.latency_batches} batches: p50 {statistics.median(latencies):.2f}s, "
              f"p90 {pct(latencies, 90):.2f}s, max {max(latencies):.2f}s (target p50 <= 2 s)")

        batch_url = f"{api}/v1/batches/{batch.id}"
        time.sleep(15)  # steady state: the last run's worker exits and the launcher's spares finish importing
        gets = poll_in_subprocess(batch_url, args.clients, args.rate, args.seconds)
        peer = poll_in_subprocess(f"{api}/health", args.clients, args.rate, args.seconds)
        print(f"2) GET /v1/batches/{{id}}, {args.clients} concurrent clients each polling {args.rate:g}/s "
              f"({len(gets)} requests): p50 {statistics.median(gets) * 1000:.1f} ms, p99 {pct(gets, 99) * 1000:.1f} ms "
              f"(target <= 50 ms); peer GET /health p99 {pct(peer, 99) * 1000:.1f} ms")
        print(f"   saturated, {args.clients} connections without pause (wrk): GET /v1/batches/{{id}} "
              f"{wrk(batch_url, args.clients, 8)}; GET /health {wrk(api + '/health', args.clients, 8)}")

        if not args.concurrent:
            return 0
        started = time.monotonic()
        payloads = [requests_jsonl(20, f"c{k}") for k in range(args.concurrent)]

        def submit(k: int) -> str:
            own = openai.OpenAI(base_url=api + "/v1", api_key="bench", max_retries=0)
            uploaded = own.files.create(file=(f"c{k}.jsonl", io.BytesIO(payloads[k])), purpose="batch")
            return own.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h").id

        with ThreadPoolExecutor(max_workers=32) as pool:
            ids = list(pool.map(submit, range(args.concurrent)))
        submitted = time.monotonic() - started
        ok = 0
        for k, batch_id in enumerate(ids):
            done = wait_done(client, batch_id)
            lines = client.files.content(done.output_file_id).text.splitlines() if done.output_file_id else []
            got = sorted(json.loads(x)["custom_id"] for x in lines)
            ok += done.status == "completed" and got == sorted(f"c{k}-{i}" for i in range(20))
        print(f"3) {args.concurrent} batches submitted concurrently in {submitted:.1f}s: {len(set(ids))} distinct, "
              f"{ok} completed with every custom_id exactly once, all done after {time.monotonic() - started:.1f}s")
    finally:
        stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
