"""Virtualenvs of their own for tools whose pins clash with ours (vLLM, Label Studio, Unsloth).

Each is built from a requirements file shipped with vbatch into ``$VBATCH_ENVS_DIR/<name>-<hash>``: the
hash of the file is in the directory name, so a changed pin builds a fresh env instead of mutating a
working one, and a marker file says the build finished (a half-built env is rebuilt).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

MARKER = ".vbatch-complete"


def pins(requirements: Path) -> list[str]:
    lines = [line.split("#", 1)[0].strip() for line in requirements.read_text().splitlines()]
    return [line for line in lines if line]


def env_dir(envs_dir: Path, name: str, requirements: Path) -> Path:
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:10]
    return envs_dir / f"{name}-{digest}"


def env_python(directory: Path) -> Path:
    return directory / "bin" / "python"


def ready_python(directory: Path) -> str | None:
    """The env's python when the env was built completely, else None."""
    return str(env_python(directory)) if (directory / MARKER).exists() else None


def build_env(directory: Path, steps: Sequence[Sequence[str]], check_import: str,
              log: Callable[[str], None] = print) -> str:
    """Create the env (unless complete) running ``pip install <step>`` for each step; returns its python."""
    python = env_python(directory)
    if (directory / MARKER).exists():
        return str(python)
    log(f"Installing {directory.name} into {directory} ...")
    directory.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(directory)], check=True)
    env = dict(os.environ, PIP_PROGRESS_BAR="off")
    for step in steps:
        subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *step],
                       check=True, env=env)
    subprocess.run([str(python), "-c", f"import {check_import}"], check=True, env=env)
    (directory / MARKER).write_text("ok\n")
    log(f"{directory.name} ready: {python}")
    return str(python)
