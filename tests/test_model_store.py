"""The model store: the fit check, and installing from a Hugging Face-compatible hub (a local one: the real
hub cannot be reached here) or a directory, smoke-tested on the engine, served, deleted."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from tests.conftest import api_client, chat_lines, jsonl
from tests.hub import LocalHub

GIB = 1024**3
LLAMA_7B = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096,
            "torch_dtype": "float16"}
LLAMA_70B = {**LLAMA_7B, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "intermediate_size": 28672, "max_position_embeddings": 131072}


def test_parameter_count_matches_known_models():
    from vbatch_pipelines.models.install import parameter_count

    assert abs(parameter_count(LLAMA_7B) - 6.74e9) / 6.74e9 < 0.01
    assert abs(parameter_count(LLAMA_70B) - 68.98e9) / 68.98e9 < 0.01  # Llama 2 70B


def test_fit_check_refuses_with_a_suggestion():
    from vbatch_pipelines.models.install import fit_check

    gpu = fit_check(LLAMA_7B, gpus=1, context=4096, available=72 * GIB, device="gpu")
    assert gpu.fits and gpu.dtype == "float16" and gpu.weight_bytes == gpu.parameters * 2
    assert gpu.kv_cache_bytes == 2 * 32 * 32 * 128 * 4096 * 2
    cpu = fit_check(LLAMA_7B, gpus=0, context=4096, available=16 * GIB, device="cpu")
    assert not cpu.fits and cpu.dtype == "float32" and "4-bit" in cpu.suggestion
    big = fit_check(LLAMA_70B, gpus=1, context=None, available=72 * GIB, device="gpu")
    assert not big.fits and "4-bit" in big.suggestion and "would fit with VBATCH_MAX_MODEL_LEN=" in big.suggestion
    long = fit_check(LLAMA_70B, gpus=1, context=131072, available=160 * GIB, device="gpu")
    assert not long.fits and "VBATCH_MAX_MODEL_LEN" in long.suggestion
    room = int(long.suggestion.split("VBATCH_MAX_MODEL_LEN=")[1].split()[0])
    assert fit_check(LLAMA_70B, gpus=1, context=room, available=160 * GIB, device="gpu").fits


def test_a_cpu_engines_kv_cache_is_sized_to_its_model_within_a_floor_and_a_cap(tiny_model_path):
    import psutil

    from vbatch_pipelines.engine.vllm_server import ManagedVLLMServer, VLLMServerConfig
    from vbatch_pipelines.models.install import CPU_KV_CACHE_FLOOR, cpu_kv_cache_reservation, fit_check
    from vbatch_pipelines.models.registry import ModelSpec

    total = psutil.virtual_memory().total
    tiny = json.loads((tiny_model_path / "config.json").read_text())  # 2 layers, 4 KV heads of 32, 1,024 tokens
    per_sequence = 2 * 2 * 4 * 32 * 1024 * 4
    assert cpu_kv_cache_reservation(tiny, None, 16) == 16 * per_sequence == 32 * 1024**2
    assert cpu_kv_cache_reservation(tiny, 256, 16) == CPU_KV_CACHE_FLOOR  # 8 MiB wanted: the floor
    assert cpu_kv_cache_reservation(LLAMA_7B, None, 16) == int(0.2 * total)  # 32 GiB wanted: the cap
    assert cpu_kv_cache_reservation(None, None, 16) == int(0.2 * total)  # no config to size from
    # The managed CPU engine is started with it, instead of a fraction of the machine.
    server = ManagedVLLMServer(ModelSpec("tiny", str(tiny_model_path)), tiny_model_path,
                               VLLMServerConfig(python="python", kv_cache_sequences=12))
    args = server.engine_args()
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(12 * per_sequence)
    assert "--gpu-memory-utilization" not in args and server.env()["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    # A model one sequence of which does not fit in what its engine may reserve is refused, with a context that fits.
    wide = {**LLAMA_7B, "max_position_embeddings": 131072}
    reservation = cpu_kv_cache_reservation(wide, None, 16)
    refused = fit_check(wide, gpus=0, context=None, available=1024 * GIB, device="cpu", kv_reservation=reservation)
    assert not refused.fits and "VBATCH_MAX_MODEL_LEN=" in refused.suggestion
    room = int(refused.suggestion.split("VBATCH_MAX_MODEL_LEN=")[1].split()[0])
    assert room * 2 * 32 * 32 * 128 * 4 <= reservation
    assert fit_check(wide, gpus=0, context=room, available=1024 * GIB, device="cpu", kv_reservation=reservation).fits
    # One that fits a sequence, but not the whole reservation beside its weights: which settings make room.
    crowded = fit_check(LLAMA_7B, gpus=0, context=None, available=28 * GIB, device="cpu", kv_reservation=4 * GIB)
    assert not crowded.fits and "lower VBATCH_KV_CACHE_SEQUENCES or VBATCH_MAX_MODEL_LEN" in crowded.suggestion
    assert crowded.kv_cache_bytes == 4 * GIB


@pytest.fixture()
def hub(tmp_path, tiny_model_path, monkeypatch):
    hub = LocalHub()
    repo = tmp_path / "repo"
    shutil.copytree(tiny_model_path, repo)
    hub.sha = hub.add("vbatch-test/tiny-chat", repo, private=True, token="hf_secret")
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield hub
    hub.close()


def install(platform, model_id: str):
    from dagster import DagsterInstance, materialize

    from vbatch_pipelines.defs.models import installed_model

    instance = DagsterInstance.ephemeral()
    from vbatch_pipelines.partitions import model_partitions

    instance.add_dynamic_partitions(model_partitions.name, [model_id])
    return materialize([installed_model], partition_key=model_id, resources=platform.resources, instance=instance,
                       raise_on_error=False)


def test_install_from_a_hub_pinned_with_a_token_then_serve_and_delete(platform, hub, monkeypatch):
    from vbatch_pipelines.models.install import InstallError
    from vbatch_pipelines.models.store import get_model, remove_model, request_install

    with pytest.raises(InstallError, match="HF_TOKEN") as no_token:
        request_install(platform.db, platform.registry, platform.resources.inference_engine, "vbatch-test/tiny-chat")
    assert no_token.value.code == "model_not_found"
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    with pytest.raises(InstallError, match="no revision 'nope'"):
        request_install(platform.db, platform.registry, platform.resources.inference_engine, "vbatch-test/tiny-chat", revision="nope")
    row = request_install(platform.db, platform.registry, platform.resources.inference_engine, "vbatch-test/tiny-chat", model_id="tiny-from-hub",
                          revision="main")
    assert row.status == "installing" and row.revision == hub.sha and row.details["fit"]["fits"]
    assert "model.safetensors" not in hub.downloads, "the fit check downloads no weights"

    result = install(platform, "tiny-from-hub")
    assert result.success
    metadata = result.asset_materializations_for_node("installed_model")[0].metadata
    assert metadata["revision"].value == hub.sha and metadata["smoke_test_seconds"].value > 0
    assert "model.safetensors" in hub.downloads and "Bearer hf_secret" in hub.auth_seen
    stored = get_model(platform.db, "tiny-from-hub")
    assert stored.status == "ready" and stored.bytes > 0
    installed_dir = platform.file_store.models_dir / "tiny-from-hub"
    assert (installed_dir / "config.json").exists() and not (installed_dir / ".cache").exists()

    assert "tiny-from-hub" in platform.registry.served_models()
    batch = platform.submit(jsonl(chat_lines(3, model="tiny-from-hub")))
    assert platform.materialize(batch.id).success
    assert platform.batch(batch.id).model == "tiny-from-hub"

    with pytest.raises(InstallError, match="already ready"):
        request_install(platform.db, platform.registry, platform.resources.inference_engine, "vbatch-test/tiny-chat", model_id="tiny-from-hub")
    removed = remove_model(platform.db, platform.registry, platform.resources.inference_engine, "tiny-from-hub")
    assert removed.status == "deleted" and not installed_dir.exists()
    assert "tiny-from-hub" not in platform.registry.served_models()


def test_remote_code_and_oversized_models_are_refused_before_download(platform, hub, tmp_path, tiny_model_path):
    from vbatch_pipelines.models.install import InstallError
    from vbatch_pipelines.models.store import request_install

    custom = tmp_path / "custom"
    shutil.copytree(tiny_model_path, custom)
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "x.Y"}}))
    with pytest.raises(InstallError, match="trust_remote_code") as remote:
        request_install(platform.db, platform.registry, platform.resources.inference_engine, str(custom))
    assert remote.value.code == "remote_code_not_allowed"
    with pytest.raises(InstallError, match="VBATCH_ALLOW_REMOTE_CODE") as switched_off:  # the server's switch
        request_install(platform.db, platform.registry, platform.resources.inference_engine, str(custom),
                        trust_remote_code=True)
    assert switched_off.value.code == "remote_code_disabled"
    allowed = dataclasses.replace(platform.registry.install_policy(), remote_code=True)
    assert request_install(platform.db, platform.registry, platform.resources.inference_engine, str(custom),
                           trust_remote_code=True, policy=allowed).status == "installing"

    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "config.json").write_text(json.dumps(LLAMA_70B))
    hub.add("vbatch-test/huge", huge)
    with pytest.raises(InstallError, match="does not fit") as too_big:
        request_install(platform.db, platform.registry, platform.resources.inference_engine, "vbatch-test/huge")
    assert too_big.value.code == "model_does_not_fit" and "4-bit" in str(too_big.value)
    with pytest.raises(InstallError, match="neither a local model directory"):
        request_install(platform.db, platform.registry, platform.resources.inference_engine, "nothing-here")


def test_install_from_a_local_directory_keeps_its_files(platform, tiny_model_path):
    from vbatch_pipelines.models.store import remove_model, request_install

    row = request_install(platform.db, platform.registry, platform.resources.inference_engine, str(tiny_model_path), model_id="local-tiny")
    assert row.revision is None and row.path == str(tiny_model_path.resolve())
    assert install(platform, "local-tiny").success
    remove_model(platform.db, platform.registry, platform.resources.inference_engine, "local-tiny")
    assert (tiny_model_path / "config.json").exists(), "a directory vbatch did not download is left alone"


def test_an_installed_cross_encoder_is_smoke_tested_by_scoring(platform, tmp_path, tiny_rerank_model_path):
    """A local cross-encoder install: known as one from its config, smoke-tested with a /v1/score pair on the
    engine that serves it, then served for score only."""
    from vbatch_pipelines.models.registry import ModelTaskMismatch
    from vbatch_pipelines.models.store import get_model, request_install

    source = tmp_path / "reranker"
    shutil.copytree(tiny_rerank_model_path, source)
    request_install(platform.db, platform.registry, platform.resources.inference_engine, str(source),
                    model_id="local-rerank")
    assert install(platform, "local-rerank").success
    answer = get_model(platform.db, "local-rerank").details["smoke_test"]["answer"]
    assert answer.startswith("a score of 0.") and 0 < float(answer.split()[-1]) < 1, answer
    assert platform.registry.for_endpoint("local-rerank", "/v1/rerank").task == "score"
    with pytest.raises(ModelTaskMismatch):
        platform.registry.for_endpoint("local-rerank", "/v1/embeddings")

@pytest.mark.parametrize("source", ["x" * 5000, "a/b\x00c", "not a model", "no-such-dir/model!"])
def test_a_source_that_names_nothing_is_a_clear_error(platform, source):
    from vbatch_pipelines.models.install import InstallError
    from vbatch_pipelines.models.store import get_model, request_install

    with pytest.raises(InstallError, match="neither a local model directory nor a Hugging Face repo id") as bad:
        request_install(platform.db, platform.registry, platform.resources.inference_engine, source, model_id="named")
    assert bad.value.code == "invalid_model" and get_model(platform.db, "named") is None
    with pytest.raises(InstallError):  # with no id given, the id is taken from the source: refused as clearly
        request_install(platform.db, platform.registry, platform.resources.inference_engine, source)


def test_an_unreachable_hub_is_a_clear_error(platform, monkeypatch):
    from vbatch_pipelines.models.install import InstallError
    from vbatch_pipelines.models.store import get_model, request_install
    from vbatch_pipelines.net import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(InstallError, match="cannot be reached") as unreachable:
        request_install(platform.db, platform.registry, platform.resources.inference_engine, "someone/some-model")
    assert unreachable.value.code == "hub_unreachable" and get_model(platform.db, "someone/some-model") is None


def test_installs_accepted_while_dagster_is_down_are_launched_by_the_sensor(platform, tiny_model_path):
    from dagster import DagsterInstance, SensorResult, build_sensor_context

    from api.main import create_app
    from vbatch_pipelines.defs.models import model_install_sensor
    from vbatch_pipelines.store.models import Model

    unreachable = platform.settings.replace(dagster={"url": "http://127.0.0.1:9"})  # nothing listens
    with api_client(create_app(unreachable)) as client:
        created = client.post("/v1/models", json={"source": str(tiny_model_path), "id": "later-tiny"})
        assert created.status_code == 200 and created.json()["status"] == "installing"
        assert client.get("/v1/models/later-tiny").json()["status"] == "installing"
        assert client.post("/v1/models", json={"source": str(tiny_model_path), "id": "later-tiny"}).status_code == 409
    with platform.db.session() as session:
        session.get(Model, "later-tiny").updated_at -= 60
    context = build_sensor_context(instance=DagsterInstance.ephemeral(),
                                   resources={"metadata_db": platform.resources.metadata_db})
    result = model_install_sensor(context)
    assert isinstance(result, SensorResult) and [r.partition_key for r in result.run_requests] == ["later-tiny"]


def test_deleting_an_alias_leaves_the_model_it_points_to(platform, tiny_model_path):
    """An install from a directory inside the home's models/ (here: the default model's own) is an alias: it
    never owns those files."""
    import shutil

    from vbatch_pipelines.models.store import remove_model, request_install

    real = platform.file_store.models_dir / "real-model"
    shutil.copytree(tiny_model_path, real)
    request_install(platform.db, platform.registry, platform.resources.inference_engine, str(real), model_id="alias")
    assert install(platform, "alias").success
    remove_model(platform.db, platform.registry, platform.resources.inference_engine, "alias")
    assert (real / "config.json").exists() and (real / "model.safetensors").exists()


@pytest.mark.parametrize("model_id", ["x/../../canary", "../canary", "/etc/canary", "a/b/c", "..", "x/..",
                                      "ft:base:vbatch:x:1", "a" * 101])
def test_a_model_id_that_is_a_path_is_refused_before_anything_touches_the_disk(platform, tiny_model_path, model_id):

    from api.main import create_app

    before = {p for p in platform.file_store.home.rglob("*")} if platform.file_store.home.exists() else set()
    outside = set(platform.file_store.home.parent.iterdir())
    with api_client(create_app(platform.settings.replace(dagster={"url": "http://127.0.0.1:9"}))) as client:
        response = client.post("/v1/models", json={"source": str(tiny_model_path), "id": model_id})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_model_id", response.text
    assert set(platform.file_store.home.parent.iterdir()) == outside, "nothing created beside the home"
    created = {p for p in platform.file_store.home.rglob("*")} - before
    assert not [p for p in created if "canary" in str(p)]


def test_an_engine_serving_a_hub_id_is_found_and_stopped_at_shutdown(platform, tmp_path):
    """Model ids with "/" keep their engine's state file in the engines directory itself, where the shutdown
    of `vbatch up` (InferenceEngine.running_servers) looks for the servers to stop."""
    import subprocess

    from vbatch_pipelines.models.registry import ModelSpec

    engine = platform.resources.inference_engine
    server = engine.server(ModelSpec("owner/served-model", str(tmp_path)))
    assert server.state_path.parent == engine.engines_dir and server.state_path.name == "owner+served-model.json"
    stand_in = subprocess.Popen(["sleep", "300"], start_new_session=True)  # the process a state file names
    try:
        engine.engines_dir.mkdir(parents=True, exist_ok=True)
        server.state_path.write_text(json.dumps({"pid": stand_in.pid, "port": 1, "model": "owner/served-model",
                                                 "path": str(tmp_path)}))
        running = engine.running_servers()
        assert [s.model.id for s in running] == ["owner/served-model"]
        assert running[0].stop() and stand_in.wait(timeout=30) is not None and not server.state_path.exists()
    finally:
        if stand_in.poll() is None:
            stand_in.kill()
