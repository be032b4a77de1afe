"""vbatch as a wheel: installed into a fresh virtualenv and run outside the source tree, it finds everything it
ships (its dagster.yaml and workspace.yaml, templates, migrations, requirements) and loads its code location."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECK = """
import vbatch_pipelines, vbatch_pipelines.definitions as location
from vbatch_pipelines.instance import DAGSTER_YAML, WORKSPACE_YAML, prepare_dagster_home
from vbatch_pipelines.settings import load_settings
assert "site-packages" in vbatch_pipelines.__file__, vbatch_pipelines.__file__
repository = location.defs.get_repository_def()
print("jobs", len(repository.get_all_jobs()), "sensors", len(repository.sensor_defs))
print("dagster.yaml", (prepare_dagster_home(load_settings()) / "dagster.yaml").read_text().count("WarmRunLauncher"))
print("workspace", "vbatch_pipelines.definitions" in WORKSPACE_YAML.read_text())
"""


def _clean_copy(target: Path) -> Path:
    """The project's files (tracked, or new and not ignored) without what builds leave in the tree (build/,
    *.egg-info), which would hide a file the package data forgets."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        if (ROOT / name).exists() or (ROOT / name).is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name, follow_symlinks=False)
    return target


def test_a_wheel_installs_in_a_fresh_venv_and_runs_outside_the_source_tree(tmp_path):
    wheels = tmp_path / "wheels"
    source = _clean_copy(tmp_path / "source")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, text=True, timeout=600)
    (wheel,) = wheels.glob("vbatch-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    # vbatch's dependencies from this environment (a path, not its .pth hooks: the editable vbatch stays out)
    Path(site, "vbatch_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, text=True, timeout=300)

    away = tmp_path / "elsewhere"  # not the source tree: nothing importable from the working directory
    away.mkdir()
    env = {**os.environ, "VBATCH_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "home" / "dagster"),
           "PYTHONPATH": ""}
    helped = subprocess.run([str(venv / "bin" / "vbatch"), "up", "--help"], cwd=away, env=env, capture_output=True,
                            text=True, timeout=300)
    assert helped.returncode == 0 and "usage: vbatch up" in helped.stdout, helped.stderr[-2000:]
    loaded = subprocess.run([str(python), "-c", CHECK], cwd=away, env=env, capture_output=True, text=True,
                            timeout=300)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "dagster.yaml 1" in loaded.stdout and "workspace True" in loaded.stdout, loaded.stdout
