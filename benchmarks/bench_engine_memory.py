"""What the CPU vLLM engines of the tiny models hold in memory, after a batch each, through `vbatch up` and the
openai SDK: the chat, embedding and cross-encoder models, one engine each, sized as vbatch sizes them (KV
cache from the model's config, the model worker inside the engine core). RSS as `ps` shows it, summed over each
engine's processes (API server, engine core, any helper), and the total.

Peer (``--peer``): the same three engines as vbatch started them before (`--gpu-memory-utilization 0.2`: a fifth
of the machine's memory for the KV cache; vLLM's default executor, a separate model worker process), each started
here with those flags, given 20 requests, measured alike, then stopped.

    .venv/bin/python benchmarks/bench_engine_memory.py [--peer]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.stack import Stack, load_average, requests_jsonl  # noqa: E402
from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_MODEL_ID, TINY_RERANK_MODEL_ID  # noqa: E402
from vbatch_pipelines.models.tiny import ensure_tiny_model  # noqa: E402
from vbatch_pipelines.net import free_port, wait_http  # noqa: E402

MB = 1024 * 1024


def engine_rss(model_id: str) -> tuple[int, list[tuple[str, int]]]:
    """Every process of the vLLM server serving ``model_id`` (the server and its children): total RSS, parts."""
    parts = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "vllm.entrypoints.openai.api_server" in cmdline and model_id in cmdline:
            for member in [process, *process.children(recursive=True)]:
                try:
                    parts.append((member.name(), member.memory_info().rss))
                except psutil.Error:
                    continue
    return sum(rss for _, rss in parts), parts


def lines(endpoint: str, n: int) -> bytes:
    if endpoint == "/v1/chat/completions":
        return requests_jsonl(n, "chat")
    if endpoint == "/v1/embeddings":
        body = lambda i: {"model": TINY_EMBED_MODEL_ID, "input": f"text number {i} about cats"}  # noqa: E731
    else:
        body = lambda i: {"model": TINY_RERANK_MODEL_ID, "text_1": f"query {i}",  # noqa: E731
                          "text_2": ["a cat", "a dog", f"number {i}"]}
    return "".join(json.dumps({"custom_id": f"r-{i}", "method": "POST", "url": endpoint, "body": body(i)}) + "\n"
                   for i in range(n)).encode()


def vbatch_side(models: dict[str, Path]) -> dict[str, int]:
    env = {"VBATCH_ENGINE": "vllm", "VBATCH_MODELS": ",".join(f"{m}={p}" for m, p in models.items())}
    stack = Stack(env=env)
    try:
        sizes = {}
        for model_id, endpoint in ((TINY_MODEL_ID, "/v1/chat/completions"), (TINY_EMBED_MODEL_ID, "/v1/embeddings"),
                                   (TINY_RERANK_MODEL_ID, "/v1/score")):
            file_id = stack.upload(lines(endpoint, 500))
            started = time.monotonic()
            batch = stack.wait(stack.create(file_id, endpoint=endpoint))
            seconds = time.monotonic() - started
            assert batch.status == "completed" and batch.request_counts.completed == 500, batch
            total, parts = engine_rss(model_id)
            sizes[model_id] = total
            print(f"vbatch   {model_id:22} 500-line {endpoint} batch {seconds:5.1f} s; engine RSS {total / MB:6.0f} MB "
                  f"({', '.join(f'{name} {rss / MB:.0f}' for name, rss in parts)})", flush=True)
        return sizes
    finally:
        stack.stop()


def peer_side(models: dict[str, Path], python: str, args_of) -> dict[str, int]:
    """The engines as vbatch started them before: --gpu-memory-utilization 0.2, vLLM's default executor."""
    sizes = {}
    for model_id, path in models.items():
        port = free_port()
        argv = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(path), "--served-model-name",
                model_id, "--port", str(port), *args_of(model_id, path)]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            assert wait_http(f"http://127.0.0.1:{port}/health", 300), f"{model_id} did not start"
            endpoint = {TINY_MODEL_ID: "v1/completions", TINY_EMBED_MODEL_ID: "v1/embeddings"}.get(model_id, "score")
            body = ({"model": model_id, "prompt": "hello", "max_tokens": 16} if endpoint == "v1/completions" else
                    {"model": model_id, "input": ["hello"] * 64} if endpoint == "v1/embeddings" else
                    {"model": model_id, "text_1": "q", "text_2": ["a", "b"]})
            import httpx

            for _ in range(20):
                httpx.post(f"http://127.0.0.1:{port}/{endpoint}", json=body, timeout=60).raise_for_status()
            total, parts = engine_rss(model_id)
            sizes[model_id] = total
            print(f"before   {model_id:22} engine RSS {total / MB:6.0f} MB "
                  f"({', '.join(f'{name} {rss / MB:.0f}' for name, rss in parts)})", flush=True)
        finally:
            os.killpg(process.pid, 9)
            process.wait(30)
            time.sleep(2)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peer", action="store_true", help="also measure the engines as sized before")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vbatch-memory-"))
    models = {TINY_MODEL_ID: ensure_tiny_model(work / TINY_MODEL_ID, "generate"),
              TINY_EMBED_MODEL_ID: ensure_tiny_model(work / TINY_EMBED_MODEL_ID, "embed"),
              TINY_RERANK_MODEL_ID: ensure_tiny_model(work / TINY_RERANK_MODEL_ID, "score")}
    print(f"load average {load_average()}; {psutil.virtual_memory().total / 2**30:.1f} GiB, {os.cpu_count()} cores",
          flush=True)
    ours = vbatch_side(models)
    total = sum(ours.values())
    two = ours[TINY_MODEL_ID] + ours[TINY_EMBED_MODEL_ID]
    print(f"vbatch: chat + embed engines {two / MB:.0f} MB; chat + embed + rerank {total / MB:.0f} MB")
    if args.peer:
        from vbatch_pipelines.engine.vllm_env import find_vllm_python
        from vbatch_pipelines.settings import load_settings

        settings = load_settings()
        python = find_vllm_python(settings.engine.vllm_python, settings.storage.envs_dir, settings.engine.gpus)
        old = {TINY_MODEL_ID: ["--enable-lora", "--max-lora-rank", "16", "--max-loras", "4"]}
        theirs = peer_side(models, python, lambda model_id, path: [
            *old.get(model_id, ["--runner", "pooling"]), "--dtype", "float32", "--enforce-eager",
            "--gpu-memory-utilization", "0.2"])
        before = sum(theirs.values())
        print(f"before: chat + embed {(theirs[TINY_MODEL_ID] + theirs[TINY_EMBED_MODEL_ID]) / MB:.0f} MB; all three "
              f"{before / MB:.0f} MB -> vbatch holds {total / before:.2f} of that")


if __name__ == "__main__":
    main()
