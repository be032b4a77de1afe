"""The GPU environments' pins resolve (pip's resolver, no download of the wheels themselves), so a GPU user's
first `make up` does not fail on a pin this CPU machine never installs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PINS = [ROOT / "vbatch_pipelines" / "engine" / "vllm-cuda.txt", ROOT / "vbatch_pipelines" / "fine_tuning" / "unsloth-cuda.txt"]


@pytest.mark.parametrize("pins", PINS, ids=lambda p: p.name)
def test_gpu_pins_resolve(pins, tmp_path):
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--disable-pip-version-check", "--report", str(report), "-r", str(pins)],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    resolved = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                for item in json.loads(report.read_text())["install"]}
    for line in pins.read_text().splitlines():
        pinned = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s#]+)", line.strip())
        if pinned:
            name, version = pinned.group(1).lower().replace("_", "-"), pinned.group(2)
            assert resolved.get(name) == version, f"{name}=={version} resolved to {resolved.get(name)}"
