"""Unsloth's own virtualenv (CUDA only): built like vLLM's, by requirements hash."""

from __future__ import annotations

from pathlib import Path

from vbatch_pipelines.virtualenvs import build_env, env_dir, pins, ready_python

REQUIREMENTS = Path(__file__).with_name("unsloth-cuda.txt")


def managed_env_dir(envs_dir: Path) -> Path:
    return env_dir(envs_dir, "unsloth-cuda", REQUIREMENTS)


def find_unsloth_python(envs_dir: Path) -> str | None:
    return ready_python(managed_env_dir(envs_dir))


def install_unsloth_env(envs_dir: Path, log=print) -> str:
    """Unsloth raises at import without a GPU; the check import runs only where one is visible."""
    return build_env(managed_env_dir(envs_dir), [pins(REQUIREMENTS)], "trl, peft, dagster_pipes", log)
