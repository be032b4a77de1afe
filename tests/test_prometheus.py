"""The shipped Prometheus config and Grafana dashboard (issue 17) against a running platform: Debian's
`prometheus` scrapes vbatch and its vLLM engine as `deploy/prometheus.yml` says, and every PromQL expression of
`deploy/grafana/vbatch-dashboard.json` returns data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests import tiers
from tests.conftest import chat_lines, jsonl

pytestmark = [pytest.mark.stack, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[1]


def _prometheus_config(api_url: str) -> dict:
    """deploy/prometheus.yml, pointed at this stack and scraping every second."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    address = api_url.removeprefix("http://")
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            static["targets"] = [address]
        for sd in job.get("http_sd_configs", []):
            sd["url"] = sd["url"].replace("127.0.0.1:4080", address)
            sd["refresh_interval"] = "1s"
    return config


COMPLETED = 'vbatch_requests_total{model="vbatch-tiny-chat",outcome="completed"}'
COMPLETED_SERIES = 'vbatch_requests_total{model="vbatch-tiny-chat",outcome="completed",'  # one per project


def _completed_so_far(api_url: str) -> float:
    """The stack's own count of completed requests of the tiny model, every project's (other modules share the
    stack)."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in httpx.get(f"{api_url}/metrics", timeout=30).text.splitlines()
               if line.startswith(COMPLETED_SERIES))


def test_prometheus_scrapes_the_platform_and_every_dashboard_query_returns_data(tmp_path, default_stack):
    from vbatch_pipelines.net import free_port

    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("Debian's `prometheus` is not installed: `make test` installs it (apt-get install prometheus)")
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "vbatch-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    tiers.starting("Prometheus")
    stack = default_stack
    before = _completed_so_far(stack.api_url)
    client = stack.client()
    file_id = client.files.create(file=("in.jsonl", jsonl(chat_lines(20, prefix="prom"))), purpose="batch").id
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 300
    while client.batches.retrieve(batch.id).status != "completed" and time.monotonic() < deadline:
        time.sleep(0.5)
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_prometheus_config(stack.api_url)))
    port = free_port()
    prometheus = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        api = f"http://127.0.0.1:{port}/api/v1"
        deadline = time.monotonic() + 120
        jobs: dict[str, str] = {}
        while time.monotonic() < deadline:
            try:
                active = httpx.get(f"{api}/targets", timeout=5).json()["data"]["activeTargets"]
                jobs = {t["labels"]["job"]: t["health"] for t in active}
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            if jobs.get("vbatch") == "up" and jobs.get("vllm") == "up":
                break
            time.sleep(1)
        assert jobs == {"vbatch": "up", "vllm": "up"}, jobs
        deadline = time.monotonic() + 60  # rate() has data once two scrapes are in its window
        while True:
            empty = {}
            for expression in expressions:
                answer = httpx.get(f"{api}/query", params={"query": expression}, timeout=10).json()
                assert answer["status"] == "success", (expression, answer)
                if not answer["data"]["result"]:
                    empty[expression] = answer
            if not empty or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert not empty, f"dashboard queries without data: {sorted(empty)}"
        completed = httpx.get(f"{api}/query", params={"query": f"sum({COMPLETED})"},
                              timeout=10).json()["data"]["result"]
        assert [float(r["value"][1]) for r in completed] == [before + 20]
    finally:
        prometheus.terminate()
        prometheus.wait(30)
