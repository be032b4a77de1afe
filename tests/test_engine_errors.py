"""Engines that cannot start say why (issue 26): the engine's own error line and what to do, online as a 503 and in
a failed batch's errors; a start that keeps failing is paused, not retried for ever.

tests/data/vllm_start_failures/ holds vLLM 0.32 CPU's own logs of real failed starts through ManagedVLLMServer:
kv_cache_too_small (a copy of the tiny chat model with max_position_embeddings 4194304: one sequence needs 8 GiB of
KV cache, a CPU engine reserves a fifth of the machine at most), max_model_len_too_long (VBATCH_MAX_MODEL_LEN=4096
on the tiny model's 1024), missing_weights (model.safetensors removed), unknown_architecture (config.json naming
VbatchMadeUpForCausalLM)."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import Platform, api_client, chat_lines, jsonl, vllm_python
from vbatch_pipelines.detached import START_MARKER, DetachedServer, ServerStartError, error_lines, log_since_start
from vbatch_pipelines.engine.start_errors import explain
from vbatch_pipelines.models.registry import TINY_EMBED_MODEL_ID, TINY_MODEL_ID

CAPTURES = Path(__file__).parent / "data" / "vllm_start_failures"
WRAPPER = "Engine core initialization failed"


@pytest.mark.parametrize("capture, reason, hint", [
    ("kv_cache_too_small", "ValueError: To serve at least one request with the model's max seq len (4194304), (8.0 GiB "
     "KV cache is needed, which is larger than the available KV cache memory (4.71 GiB). Based on the available "
     "memory, the estimated maximum model length is 2468224.", "set VBATCH_MAX_MODEL_LEN to 2468224 tokens or less"),
    ("max_model_len_too_long", "ValidationError: 1 validation error for ModelConfig: Value error, User-specified "
     "max_model_len (4096) is greater than the derived max_model_len (max_position_embeddings=1024.0 or "
     "model_max_length=None in model's config.json).", "VBATCH_MAX_MODEL_LEN (4096) is longer than the model's "
     "context (1024 tokens)"),
    ("missing_weights", "RuntimeError: Cannot find any model weights with `/tmp/eng/noweights`",
     "The model's files are missing or incomplete"),
    ("unknown_architecture", "ValidationError: 1 validation error for ModelConfig: Value error, Model architectures "
     "['VbatchMadeUpForCausalLM'] are not supported for now.", "VBATCH_ENGINE=transformers"),
])
def test_the_engines_own_error_line_and_what_to_do(capture, reason, hint):
    log = log_since_start(CAPTURES / f"{capture}.log")
    line, advice = explain(log)
    assert line == reason  # whole, one line, vLLM's advice in its own flags' terms cut
    assert hint in advice
    errors = error_lines(log)
    if len(errors) > 1:  # vLLM ends with a wrapper that only points back at the reason
        assert WRAPPER in errors[-1] and WRAPPER not in line


def test_only_the_last_start_of_a_log_is_read(tmp_path):
    """A server's log holds every start: an earlier start's failure is not the reason of this one's."""
    log = tmp_path / "engine.log"
    log.write_text((CAPTURES / "kv_cache_too_small.log").read_text()
                   + (CAPTURES / "max_model_len_too_long.log").read_text())
    assert "KV cache" in explain(log.read_text())[0]
    assert "User-specified max_model_len (4096)" in explain(log_since_start(log))[0]


@pytest.mark.parametrize("line, gpus, reason, hint", [
    # As vLLM's GPU worker words it (vllm/v1/worker/utils.py): another process holds the GPU.
    ("ValueError: Free memory on device cuda:0 (10.5/79.19 GiB) on startup is less than desired GPU memory "
     "utilization (0.9, 71.27 GiB). Decrease GPU memory utilization or reduce GPU memory used by other processes.", 1,
     "ValueError: Free memory on device cuda:0 (10.5/79.19 GiB) on startup is less than desired GPU memory "
     "utilization (0.9, 71.27 GiB).", "lower VBATCH_GPU_MEMORY_UTILIZATION"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.", 1,
     "OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB.",
     "lower VBATCH_MAX_MODEL_LEN or VBATCH_GPU_MEMORY_UTILIZATION"),
    ("ValueError: No available memory for the cache blocks. Try increasing `gpu_memory_utilization` when "
     "initializing the engine.", 1, "ValueError: No available memory for the cache blocks.",
     "raise VBATCH_GPU_MEMORY_UTILIZATION"),
    ("ValueError: Available memory on node 0 (0.31/23.54 GiB) on kv cache allocation is less than requested memory "
     "for kv (4.71 GiB). Decrease --kv-cache-memory-bytes, VLLM_CPU_KVCACHE_SPACE, or reduce CPU memory used by "
     "other processes.", 0, "ValueError: Available memory on node 0 (0.31/23.54 GiB) on kv cache allocation is "
     "less than requested memory for kv (4.71 GiB).", "lower VBATCH_KV_CACHE_SEQUENCES or VBATCH_MAX_MODEL_LEN"),
    ("ValueError: a cause vbatch has no words for. Try this.", 0, "ValueError: a cause vbatch has no words for. "
     "Try this.", None),
])
def test_memory_errors_get_hints_in_vbatchs_settings(line, gpus, reason, hint):
    log = f"{START_MARKER}vLLM\nTraceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n{line}\n"
    found, advice = explain(log, gpus)
    assert found == reason
    assert (advice is None) if hint is None else (hint in advice)


FAILING_SERVER = "import sys; open(sys.argv[1])"  # a traceback ending in FileNotFoundError, exit code 1


class FailingServer(DetachedServer):
    """A real process that fails to start the way a server missing a file does."""

    name = "failing"
    startup_timeout_s = 30.0

    def __init__(self, state_dir: Path, missing: str):
        super().__init__(state_dir, "failing")
        self.missing = missing
        self.works = False

    def argv(self, port: int) -> list[str]:
        if self.works:
            return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)]
        return [sys.executable, "-c", FAILING_SERVER, self.missing]

    def probe(self, url: str, timeout: float) -> bool:
        import httpx

        try:
            return httpx.get(url, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False


def _fails(server: DetachedServer) -> ServerStartError:
    with pytest.raises(ServerStartError) as caught:
        server.ensure()
    return caught.value


def test_a_server_that_keeps_failing_to_start_is_paused_not_retried_for_ever(tmp_path):
    home = tmp_path / "home"
    server = FailingServer(home / "engines", "/srv/private/models/weights.bin")
    starts = lambda: server.log_path.read_text().count(START_MARKER)  # noqa: E731
    try:
        first, second, third = _fails(server), _fails(server), _fails(server)
        assert [e.retry_at is not None for e in (first, second, third)] == [False, False, True]
        assert first.reason == "FileNotFoundError: [Errno 2] No such file or directory: " \
                               "'/srv/private/models/weights.bin'"
        assert first.status == 503 and first.log_path == server.log_path
        # Its words for any client: the reason, the log under $VBATCH_HOME, no other path, no traceback.
        assert "No such file or directory: '…/weights.bin'" in first.message
        assert "$VBATCH_HOME/engines/failing.log" in first.message and "exited with code 1" in first.message
        assert "/srv/private" not in first.message and str(home) not in first.message
        assert "Traceback" not in first.message
        assert "3 times in a row" in third.message and "tries again after" in third.message

        began = time.monotonic()
        paused = _fails(server)  # at once, the last failure, without starting it again
        assert time.monotonic() - began < 2 and starts() == 3
        assert paused.reason == first.reason and paused.retry_at == third.retry_at

        server.missing = "/srv/private/models/other.bin"  # its settings changed: tried at once
        changed = _fails(server)
        assert starts() == 4 and "other.bin" in changed.reason and changed.retry_at is None

        _fails(server), _fails(server)
        assert _fails(server).retry_at and starts() == 6
        server.stop()  # stopped on purpose (`vbatch up` ending): the next start goes at once
        assert _fails(server).retry_at is None and starts() == 7

        _fails(server), _fails(server)
        server.start_pause_s = 0.0  # the pause over: one more try
        assert _fails(server).reason and starts() == 10

        server.works = True
        assert server.ensure().startswith("http://127.0.0.1:")
        assert not server.failures_path.exists()  # a good start forgets the failures before it
    finally:
        server.stop()


# --- the real thing: a CPU vLLM engine that cannot start --------------------------------------------------------


def _too_long_for_the_kv_cache(source: Path, target: Path) -> Path:
    """A copy of a tiny model whose context (max_position_embeddings) is too long for one sequence to fit in the KV
    cache a CPU engine reserves (a fifth of the machine at most), as a long-context model on a small machine."""
    import psutil

    from vbatch_pipelines.models.install import CPU_KV_CACHE_CAP_FRACTION, cpu_kv_cache_reservation, kv_cache_bytes

    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    per_token = kv_cache_bytes(config, 1, 4.0)
    config["max_position_embeddings"] = int(1.5 * CPU_KV_CACHE_CAP_FRACTION * psutil.virtual_memory().total / per_token)
    (target / "config.json").write_text(json.dumps(config))
    assert kv_cache_bytes(config, config["max_position_embeddings"], 4.0) > cpu_kv_cache_reservation(config, None, 16)
    return target


@pytest.fixture(scope="module")
def failing_home(tmp_path_factory, tiny_model_path, tiny_embed_model_path):
    """A home whose chat and embedding models' engines cannot start. Models named in VBATCH_MODELS reach the engine
    as they are (an install would refuse them first: its fit check counts the KV cache)."""
    models = tmp_path_factory.mktemp("long-context")
    chat = _too_long_for_the_kv_cache(tiny_model_path, models / "chat")
    embed = _too_long_for_the_kv_cache(tiny_embed_model_path, models / "embed")
    home = tmp_path_factory.mktemp("failing-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VBATCH_HOME", str(home))
        mp.setenv("VBATCH_MODELS", f"{TINY_MODEL_ID}={chat},{TINY_EMBED_MODEL_ID}={embed}")
        mp.setenv("VBATCH_ENGINE", "vllm")
        mp.setenv("VBATCH_VLLM_PYTHON", vllm_python())
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        for name in ("VBATCH_DATABASE_URL", "VBATCH_API_KEYS", "VBATCH_ADMIN_KEYS"):
            mp.delenv(name, raising=False)
        platform = Platform()
        try:
            yield platform, models
        finally:
            for server in platform.resources.inference_engine.running_servers():
                server.stop()


def _starts(platform: Platform, model_id: str) -> int:
    log = platform.file_store.engines_dir / f"{model_id}.log"
    return log.read_text().count(START_MARKER) if log.exists() else 0


def _says_why(message: str, models: Path) -> None:
    assert "KV cache is needed, which is larger than the available KV cache memory" in message, message
    assert "set VBATCH_MAX_MODEL_LEN to " in message  # what to do, in vbatch's settings
    assert "Traceback" not in message and "gpu_memory_utilization" not in message and str(models) not in message


@pytest.mark.stack
@pytest.mark.vllm
def test_online_requests_answer_503_with_the_engines_reason(failing_home):
    """Before: a 500 internal_error naming nothing."""
    from api.main import create_app

    platform, models = failing_home
    with api_client(create_app()) as client:
        response = client.post("/v1/embeddings", json={"model": TINY_EMBED_MODEL_ID, "input": "hello"})
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
    _says_why(error["message"], models)
    assert f"$VBATCH_HOME/engines/{TINY_EMBED_MODEL_ID}.log" in error["message"]
    assert _starts(platform, TINY_EMBED_MODEL_ID) == 1


@pytest.mark.stack
@pytest.mark.vllm
def test_a_batch_retries_the_engine_then_fails_with_its_reason_and_starts_stop(failing_home):
    from api.main import create_app

    platform, models = failing_home
    batch = platform.submit(jsonl(chat_lines(3)))
    result = platform.materialize(batch.id, raise_on_error=False)
    assert not result.success
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 2 and _starts(platform, TINY_MODEL_ID) == 3  # three starts, then no more
    record = platform.batch(batch.id)
    assert record.status == "failed"
    error = record.errors["data"][0]
    assert error["code"] == "engine_unavailable" and "failed to start 3 times in a row" in error["message"]
    _says_why(error["message"], models)

    with api_client(create_app()) as client:
        assert client.get(f"/v1/batches/{batch.id}").json()["errors"]["data"][0] == error
        began = time.monotonic()  # online too, the engine is not started again for now: answered at once
        response = client.post("/v1/chat/completions", json={
            "model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert time.monotonic() - began < 10 and response.status_code == 503
    assert "tries again after" in response.json()["error"]["message"]
    _says_why(response.json()["error"]["message"], models)
    assert _starts(platform, TINY_MODEL_ID) == 3
