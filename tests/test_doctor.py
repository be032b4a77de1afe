"""`vbatch doctor` (issue 26): the checks a user runs after installing, then a 100-request batch and a 20-step LoRA
fine-tune on the real engines with their figures; a non-zero exit on any failure."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.conftest import CLI, TINY_MODEL_ID, settled_survivors, vllm_python
from tests.test_stop import _holder
from vbatch_pipelines.net import free_port


def _doctor_env(home: Path, tiny_model_path: Path, **extra: str) -> dict:
    env = dict(os.environ, VBATCH_HOME=str(home), VBATCH_MODELS=f"{TINY_MODEL_ID}={tiny_model_path}",
               VBATCH_CURATION="off", VBATCH_API_PORT=str(free_port()), DAGSTER_HOME=str(home / "dagster"))
    env.update(extra)
    for key in ("VBATCH_DATABASE_URL", "VBATCH_DAGSTER_DATABASE_URL", "VBATCH_API_KEYS", "VBATCH_ADMIN_KEYS"):
        env.pop(key, None)
    return env


def test_a_failed_check_fails_the_doctor_and_skips_the_smoke_runs(tmp_path, tiny_model_path):
    holder, port = _holder(tmp_path)
    try:
        env = _doctor_env(tmp_path / "home", tiny_model_path, VBATCH_API_PORT=str(port), VBATCH_ENGINE="transformers")
        done = subprocess.run([*CLI, "doctor", "--dagster-port", str(free_port())], env=env, capture_output=True,
                              text=True, timeout=600)
    finally:
        holder.kill()
        holder.wait()
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(rf"\[FAIL\] ports .*port {port} \(the API\) is taken by pid {holder.pid}", done.stdout)
    assert "[FAIL] smoke          skipped" in done.stdout
    assert "[  ok] disk" in done.stdout and "[  ok] Dagster" in done.stdout  # the other checks still ran


@pytest.mark.stack
@pytest.mark.vllm
def test_doctor_runs_a_batch_and_a_fine_tune_on_the_real_engines(tmp_path, tiny_model_path):
    from tests import tiers

    home = tmp_path / "home"
    env = _doctor_env(home, tiny_model_path, VBATCH_ENGINE="vllm", VBATCH_VLLM_PYTHON=vllm_python())
    tiers.starting("`vbatch doctor` (it starts `vbatch up`)")
    done = subprocess.run([*CLI, "doctor", "--dagster-port", str(free_port())], env=env, capture_output=True,
                          text=True, timeout=900)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[  ok] engine         vLLM" in done.stdout
    assert re.search(r"\[  ok\] batch +100 requests in [\d.]+s", done.stdout)
    assert re.search(r"\[  ok\] fine-tune +20 LoRA steps on vbatch-tiny-chat", done.stdout)
    assert "All checks passed." in done.stdout
    assert not settled_survivors(home)  # the `vbatch up` it started is stopped, with its engine
    models = subprocess.run([*CLI, "models", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert "doctor" not in models.stdout  # the check's fine-tune is not left deployed
