"""The layout's promises: settings are read at the edges only, a bad value stops the code location from
loading (naming the variable), first-party modules import no cycle, and the API and CLI never build the
code location's definitions."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vbatch_pipelines", "resources", "api", "integrations")
EDGES = {"vbatch_pipelines.definitions", "vbatch_pipelines.cli", "vbatch_pipelines.settings", "api.main"}


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found[name] = path
    return found


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """First-party modules ``name`` imports, at module level or inside functions (a lazy import is still a
    dependency)."""
    out = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of modules importing each other (ignoring a package importing its own submodules), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep.startswith(node + ".") or node.startswith(dep + "."):
                continue  # a package and its own modules
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if state.get(dep) is None and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None and (found := visit(node)):
            return found
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return seen


def test_first_party_modules_import_no_cycle():
    assert _cycle(_graph()) is None, f"import cycle: {' -> '.join(_cycle(_graph()))}"


def test_the_cycle_check_finds_a_cycle():
    # The check itself, on the shape the layout removed: resources.label_studio <-> curation.server.
    graph = {"resources.label_studio": {"vbatch_pipelines.curation.server"},
             "vbatch_pipelines.curation.server": {"resources.label_studio"}}
    assert _cycle(graph) == ["resources.label_studio", "vbatch_pipelines.curation.server", "resources.label_studio"]


def test_api_and_cli_never_import_the_definitions():
    graph = _graph()
    for edge in ("api.main", "vbatch_pipelines.cli"):
        assert "vbatch_pipelines.definitions" not in _reachable(graph, edge), edge


def test_settings_are_read_only_at_the_edges():
    """No asset, sensor, resource or the code they run calls load_settings(): they get resources."""
    callers = []
    for name, path in _modules().items():
        if name in EDGES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == "load_settings":
                callers.append(f"{name}:{node.lineno}")
    assert not callers, f"load_settings() called inside Dagster code: {callers}"


BAD_VALUES = [
    ("VBATCH_DEPLOY_GATE", "sometimes", "always, no_worse, never"),
    ("VBATCH_GATE_METRIC", "accuracy", "exact_match, normalized_match, mean_length, judge_win_rate"),
    ("VBATCH_ENGINE", "tensorrt", "auto, vllm, transformers"),
    ("VBATCH_TRAINER", "axolotl", "auto, unsloth, trl"),
    ("VBATCH_RETRAIN_MIN_GOLD_STARS", "many", "not an integer"),
    ("VBATCH_RETRAIN_MIN_GOLD_STARS", "0", "at least 1"),
    ("VBATCH_MAX_LORA_RANK", "16.5", "not an integer"),
    ("VBATCH_GPU_MEMORY_UTILIZATION", "1.5", "(0.0, 1.0]"),
    ("VBATCH_KV_CACHE_SEQUENCES", "0", "at least 1"),
    ("VBATCH_KV_CACHE_SEQUENCES", "lots", "not an integer"),
    ("VBATCH_RETRAIN_HYPERPARAMETERS", '{"epochs": 2}', "hyperparameters.epochs"),
    ("VBATCH_RETRAIN_HYPERPARAMETERS", "[1, 2]", "JSON object"),
    ("VBATCH_MODELS", "no-equals-sign", "name=path"),
    ("VBATCH_TOOL_PARSERS", "hermes", "model=parser"),
    ("VBATCH_TOOL_PARSERS", "qwen=--enable-lora", "model=parser"),  # a parser name, never another flag
    ("VBATCH_TOOL_PARSERS", "qwen=hermes,qwen=mistral", "names 'qwen' twice"),
    ("VBATCH_DAGSTER_PORT", "three thousand", "not an integer"),
    ("VBATCH_API_PORT", "70000", "out of range; it takes a number in [1, 65535]"),
    ("VBATCH_CURATION", "maybe", "not a switch"),
    ("VBATCH_ENGINE_SLOTS", "-1", "at least 0"),
    ("VBATCH_ENGINES", "tiny=http://h:1,tiny=http://h:1/", "names the same model and URL twice"),
    ("VBATCH_BROKER_URL", "amqp://guest@h//", "takes a Redis URL"),
    ("VBATCH_ARIS_DATABASE_URL", "mysql://u@h/aristotle", "takes a PostgreSQL URL"),  # an extension's own
]


@pytest.mark.parametrize(("name", "value", "says"), BAD_VALUES)
def test_a_bad_setting_fails_at_load_naming_the_variable(monkeypatch, name, value, says):
    from vbatch_pipelines.settings import SettingsError, load_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert name in str(refused.value) and says in str(refused.value)


def test_a_bad_policy_stops_the_code_location_from_loading(tmp_path):
    """The whole path Dagster takes: importing the code location fails, before any run, with the message."""
    env = dict(os.environ, VBATCH_HOME=str(tmp_path / "home"), VBATCH_DEPLOY_GATE="sometimes")
    load = [sys.executable, "-c", "import vbatch_pipelines.definitions"]
    failed = subprocess.run(load, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0
    assert "VBATCH_DEPLOY_GATE='sometimes' is not allowed; use one of: always, no_worse, never" in failed.stderr
    env["VBATCH_DEPLOY_GATE"] = "never"
    assert subprocess.run(load, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120).returncode == 0


def test_typed_resources_refuse_values_outside_their_literals(tmp_path):
    from pydantic import ValidationError

    from resources import RetrainingPolicy, Trainer

    with pytest.raises(ValidationError, match="deploy_gate"):
        RetrainingPolicy(deploy_gate="sometimes")
    with pytest.raises(ValidationError, match="gate_metric"):
        RetrainingPolicy(gate_metric="accuracy")
    with pytest.raises(ValidationError, match="backend"):
        Trainer(backend="axolotl", envs_dir=str(tmp_path))
    assert RetrainingPolicy(deploy_gate="never", gate_metric="exact_match").deploy_gate == "never"


def test_the_file_store_owns_every_path_under_the_home(vbatch_home):
    """Batch input written by the API's validation and read by batch_input come from one FileStore."""
    from resources import FileStore

    store = FileStore(root=str(vbatch_home))
    paths = [store.files_dir, store.batch_dir("b"), store.datasets_dir, store.fine_tune_dir("j"), store.models_dir,
             store.tiny_model_path, store.engines_dir, store.label_studio_dir, store.logs_dir, store.dagster_dir,
             store.database_path]
    assert all(path.is_relative_to(vbatch_home) for path in paths)
    assert len(set(paths)) == len(paths)


def test_files_holding_secrets_are_private(vbatch_home, monkeypatch):
    """Label Studio's credentials, the Dagster instance config with a database password, a managed server's
    state: written 0600 from the first byte (no readable temporary file)."""
    import stat

    from vbatch_pipelines.curation.server import credentials
    from vbatch_pipelines.instance import prepare_dagster_home
    from vbatch_pipelines.paths import write_private
    from vbatch_pipelines.settings import load_settings

    monkeypatch.setenv("VBATCH_DAGSTER_DATABASE_URL", "postgresql://dagster:s3cret@127.0.0.1:5432/dagster")
    old = os.umask(0o022)  # a usual umask: plain writes would be world-readable
    try:
        credentials(vbatch_home / "label-studio")
        dagster_home = prepare_dagster_home(load_settings())
        write_private(vbatch_home / "engines" / "model.json", "{}")
    finally:
        os.umask(old)
    for path in (vbatch_home / "label-studio" / "credentials.json", dagster_home / "dagster.yaml",
                 vbatch_home / "engines" / "model.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        assert not list(path.parent.glob(f".{path.name}.*.tmp")), "no temporary file left behind"
    assert "s3cret" in (dagster_home / "dagster.yaml").read_text()


def test_label_studio_status_prints_the_password_only_when_asked(vbatch_home):
    import json

    status = [sys.executable, "-m", "vbatch_pipelines.cli", "label-studio", "status"]
    shown = subprocess.run(status, capture_output=True, text=True, check=True, timeout=120).stdout
    password = json.loads((vbatch_home / "label-studio" / "credentials.json").read_text())["password"]
    assert "admin@vbatch.local" in shown and password not in shown and "--show-password" in shown
    asked = subprocess.run([*status, "--show-password"], capture_output=True, text=True, check=True, timeout=120)
    assert password in asked.stdout


def test_batches_share_the_inference_pool_and_steps_that_need_the_gpu_to_themselves_claim_gpu():
    """Batch steps run side by side (`inference`); training, the comparison's eval batches and the install's
    smoke test claim `gpu` and then every `inference` slot (test_gpu_sharing.py shows them waiting)."""
    import inspect

    from vbatch_pipelines.defs.batches import batch_output
    from vbatch_pipelines.defs.fine_tuning import fine_tuned_checkpoint, model_comparison
    from vbatch_pipelines.defs.models import installed_model

    exclusive = (fine_tuned_checkpoint, model_comparison, installed_model)
    assert batch_output.op.pool == "inference"
    assert {a.op.name: a.op.pool for a in exclusive} == dict.fromkeys(
        ("fine_tuned_checkpoint", "model_comparison", "installed_model"), "gpu")
    for asset in exclusive:
        assert "gpu_to_itself(context)" in inspect.getsource(asset.op.compute_fn.decorated_fn)


def test_the_embedded_dagster_event_log_commits_without_an_fsync_per_event(vbatch_home, monkeypatch):
    """`vbatch` installs its SQLite event log class (synchronous=NORMAL over Dagster's WAL, one engine per
    shard); with a PostgreSQL URL, dagster-postgres instead."""
    from dagster import DagsterInstance, asset, materialize

    from vbatch_pipelines.dagster_ext.event_log import SqliteEventLogStorage
    from vbatch_pipelines.instance import prepare_dagster_home
    from vbatch_pipelines.settings import load_settings

    home = prepare_dagster_home(load_settings())
    monkeypatch.setenv("DAGSTER_HOME", str(home))

    @asset
    def probe() -> int:
        return 1

    with DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        assert type(storage) is SqliteEventLogStorage
        run_id = materialize([probe], instance=instance).run_id
        with storage.run_connection(run_id) as conn:
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL (FULL is 2)
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert instance.get_run_by_id(run_id).is_success and len(instance.all_logs(run_id)) > 5
    monkeypatch.setenv("VBATCH_DAGSTER_DATABASE_URL", "postgresql://u@127.0.0.1:5432/d")
    from vbatch_pipelines.instance import instance_config

    config = instance_config(load_settings())
    assert "event_log_storage" not in config and "postgres" in config["storage"]


WALL = "vbatch_pipelines.dagster_ext"


def _private_dagster_imports(source: str) -> list[int]:
    """Lines that import Dagster's private modules or names (``dagster._x``, ``from dagster import _x``,
    ``import_module("dagster._x")``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or "", *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            names = [arg.value for arg in node.args if isinstance(arg, ast.Constant) and isinstance(arg.value, str)]
        else:
            continue
        if any(_private_dagster(name) for name in names):
            found.append(node.lineno)
    return found


def _private_dagster(name: str) -> bool:
    """A dotted name inside Dagster (or a dagster_* library) with a private part (``_x``; ``__version__`` is not)."""
    first, *parts = name.split(".")
    return (first == "dagster" or first.startswith("dagster_")) and any(
        part.startswith("_") and not (part.startswith("__") and part.endswith("__")) for part in parts)


def test_dagster_internals_are_imported_behind_one_wall():
    """Only vbatch_pipelines/dagster_ext/ touches Dagster's private modules (through its _compat), so a Dagster
    upgrade is checked in one place."""
    outside = [f"{name}:{line}" for name, path in _modules().items() if not name.startswith(WALL)
               for line in _private_dagster_imports(path.read_text())]
    assert not outside, f"dagster._ imported outside {WALL}: {outside}"
    inside = [name for name, path in _modules().items() if name.startswith(WALL) and name != f"{WALL}._compat"
              and _private_dagster_imports(path.read_text())]
    assert not inside, f"{inside} import dagster._ themselves instead of through {WALL}._compat"


def test_the_wall_check_finds_private_imports():
    assert _private_dagster_imports("from dagster._core.launcher import RunLauncher\n") == [1]
    assert _private_dagster_imports("import os\nfrom dagster import _check as check\n") == [2]
    assert _private_dagster_imports("import importlib\nimportlib.import_module('dagster._serdes')\n") == [2]
    assert _private_dagster_imports("from dagster import DagsterRun, __version__\n") == []
    assert _private_dagster_imports("from dagster_celery.launcher import CeleryRunLauncher\n") == []


def test_an_upgrade_that_moves_a_patched_internal_fails_loudly_at_import(monkeypatch):
    import importlib

    import dagster._core.execution.plan.instance_concurrency_context as claims

    from vbatch_pipelines.dagster_ext import _compat

    monkeypatch.delattr(claims, "MAX_CONCURRENCY_CLAIM_BLOCKED_INTERVAL")
    with pytest.raises(ImportError, match="MAX_CONCURRENCY_CLAIM_BLOCKED_INTERVAL") as moved:  # reload: a new class
        importlib.reload(_compat)
    assert type(moved.value).__name__ == "DagsterInternalsMoved" and "does not support" not in str(moved.value)
    monkeypatch.undo()
    importlib.reload(_compat)
