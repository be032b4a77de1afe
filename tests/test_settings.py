"""Each setting is declared once (vbatch_pipelines/settings.py, or an extension's own group): the resources'
config is made from the same declarations, the docs' tables are generated from them, and nothing else reads a
setting's variable."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _aris_groups():
    from integrations.aris import ArisSettings

    return {"ArisSettings": ArisSettings}


def test_the_docs_tables_are_the_declarations():
    from vbatch_pipelines.settings import GROUPS, stale_tables

    assert stale_tables((ROOT / "docs" / "configuration.md").read_text(), GROUPS) is None
    assert stale_tables((ROOT / "integrations" / "aris" / "README.md").read_text(), _aris_groups()) is None


def test_a_description_changed_in_code_makes_the_docs_stale(monkeypatch):
    from vbatch_pipelines.settings import GROUPS, RetrainSettings, stale_tables

    text = (ROOT / "docs" / "configuration.md").read_text()
    monkeypatch.setattr(RetrainSettings.model_fields["deploy_gate"], "description", "whether to deploy, now")
    stale = stale_tables(text, GROUPS)
    assert stale is not None and "VBATCH_DEPLOY_GATE" in stale and "python -m vbatch_pipelines.settings" in stale
    assert "marks are missing" in stale_tables(text.replace("<!-- end of the generated settings -->", ""), GROUPS)


def test_writing_the_tables_into_a_file_without_the_marks_is_refused_and_leaves_it(tmp_path):
    import subprocess
    import sys

    page = tmp_path / "page.md"
    page.write_text("# A page\n\nhand-written text\n")
    done = subprocess.run([sys.executable, "-m", "vbatch_pipelines.settings", "--write", str(page)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "marks are missing" in done.stderr and "Traceback" not in done.stderr
    assert page.read_text() == "# A page\n\nhand-written text\n"


def test_every_setting_has_one_variable_and_a_description():
    from vbatch_pipelines.settings import GROUPS

    seen: dict[str, str] = {}
    for group in [*GROUPS.values(), *_aris_groups().values()]:
        for name, info in group.model_fields.items():
            variable = info.validation_alias
            assert isinstance(variable, str) and re.fullmatch(r"[A-Z][A-Z0-9_]+", variable), (group, name)
            assert info.description and len(info.description) > 10, (group, name)
            assert variable not in seen, f"{variable} declared by {seen[variable]} and {group.__name__}.{name}"
            seen[variable] = f"{group.__name__}.{name}"


@pytest.mark.parametrize(("resource", "group", "left_out"), [
    ("InferenceEngine", "EngineSettings", ()),
    ("ModelRegistry", "RegistrySettings", ()),
    ("Trainer", "TrainingSettings", ()),
    ("RetrainingPolicy", "RetrainSettings", ("cron",)),
    ("RetentionPolicy", "RetentionSettings", ("cron",)),
])
def test_a_resources_config_is_its_settings_group(resource, group, left_out):
    """Same names, types, defaults, bounds and descriptions: made from the group, not declared again."""
    import resources as resource_classes
    import vbatch_pipelines.settings as settings_module

    config = getattr(resource_classes, resource).model_fields
    for name, info in getattr(settings_module, group).model_fields.items():
        if name in left_out:
            assert name not in config
            continue
        field = config[name]
        assert (field.annotation, field.description, field.metadata) == (info.annotation, info.description,
                                                                          info.metadata), name
        assert field.default == info.default and field.default_factory is info.default_factory, name


def test_a_variable_reaches_the_resource_that_uses_it(vbatch_home, monkeypatch):
    from resources.factory import build_resources
    from vbatch_pipelines.settings import load_settings

    for name, value in {"VBATCH_ENGINE_SLOTS": "3", "VBATCH_ENGINES": "tiny=http://10.0.0.1:8000,tiny=http://h:1",
                        "VBATCH_MIN_TRAINING_EXAMPLES": "12", "VBATCH_MAX_LORA_RANK": "32",
                        "VBATCH_RETRAIN_MIN_GOLD_STARS": "7", "VBATCH_FILE_RETENTION_DAYS": "off",
                        "VBATCH_DEFAULT_MODEL": "tiny", "VBATCH_ENGINES_API_KEY": "sk-engines"}.items():
        monkeypatch.setenv(name, value)
    resources = build_resources(load_settings())
    engine = resources.inference_engine
    assert engine.engine_slots == 3 and engine.max_lora_rank == 32
    assert engine.external_urls("tiny") == ["http://10.0.0.1:8000", "http://h:1"]
    assert (resources.trainer.min_training_examples, resources.trainer.max_lora_rank) == (12, 32)
    assert resources.retraining_policy.min_gold_stars == 7 and resources.retention_policy.file_retention_days is None
    assert resources.model_registry.default_model == "tiny"
    # A secret stays an EnvVar in what Dagster sees (its config), the value only in the run.
    from dagster import EnvVar

    assert resources.inference_engine.external_engines_api_key == EnvVar("VBATCH_ENGINES_API_KEY")
    assert build_resources(load_settings(), defer_secrets=False).inference_engine.external_engines_api_key == \
        "sk-engines"


# Variables vbatch sets for processes it starts (not settings a user sets): who reads each, and why.
HANDOFF = {
    "VBATCH_ENGINE_KEY": "the engine's key, given by vbatch to the vLLM server it starts (vllm_guard)",
    "VBATCH_ENGINE_ADAPTER_ROOTS": "where a vLLM server may load adapters from, given by vbatch (vllm_guard)",
    "VBATCH_ENGINE_SLOTS": "the engine's fair-share slots, given to the vLLM server vbatch starts (middleware)",
    "VBATCH_WEBHOOK_ADDRESS": "the address the managed Label Studio may send webhooks to, given by vbatch",
    "VBATCH_WARM_AT_START": "whether an API worker warms the engine, set by `vbatch up` for its first worker",
    "VBATCH_RUN_WORKER_STATUS_FD": "the pipe a warm run worker reports on, set by the run launcher",
    "VBATCH_RUN_WORKER_INSTANCE": "the Dagster instance a warm run worker opens, set by the run launcher",
}


def _constants(source: str) -> dict[str, str]:
    """A module's string constants (``NAME = "..."``)."""
    return {target.id: node.value.value for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
            for target in node.targets if isinstance(target, ast.Name)}


def _variable_reads(source: str, constants: dict[str, str] | None = None) -> list[str]:
    """The ``VBATCH_*`` variables a module reads from the environment (os.environ.get / [] / os.getenv), by
    literal name or through a constant (its own, or one of ``constants``: another module's)."""
    tree = ast.parse(source)
    constants = {**(constants or {}), **_constants(source)}
    found = []
    for node in ast.walk(tree):
        key = None
        if isinstance(node, ast.Call) and node.args and ast.unparse(node.func) in (
                "os.environ.get", "os.getenv", "os.environ.pop", "environ.get"):
            key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ" \
                and isinstance(node.ctx, ast.Load):
            key = node.slice
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            found.append(key.value)
        elif isinstance(key, ast.Name) and key.id in constants:
            found.append(constants[key.id])
    return [name for name in found if name.startswith("VBATCH_")]


def test_no_setting_is_read_outside_its_declaration():
    from vbatch_pipelines.settings import GROUPS

    declared = {info.validation_alias for group in [*GROUPS.values(), *_aris_groups().values()]
                for info in group.model_fields.values()}
    paths = [path for package in ("api", "vbatch_pipelines", "resources", "integrations")
             for path in (ROOT / package).rglob("*.py")]
    constants = {name: value for path in paths for name, value in _constants(path.read_text()).items()}
    reads = {f"{path.relative_to(ROOT)}: {name}" for path in paths
             for name in _variable_reads(path.read_text(), constants)}
    stray = sorted(read for read in reads if read.split(": ")[1] not in HANDOFF)
    assert not stray, f"settings read outside vbatch_pipelines/settings.py (declare them there): {stray}"
    assert {read.split(": ")[1] for read in reads} == set(HANDOFF)  # each hand-off is still read somewhere
    assert declared & set(HANDOFF) == {"VBATCH_ENGINE_SLOTS"}  # the one vbatch passes on under its own name


def test_the_reader_check_finds_each_form():
    source = '''import os
PORT_ENV = "VBATCH_DAGSTER_PORT"
a = os.environ.get("VBATCH_API_PORT", 4080)
b = os.getenv("VBATCH_HOME")
c = os.environ["VBATCH_STORE"]
d = os.environ.get(PORT_ENV)
os.environ["VBATCH_NOT_READ"] = "set, not read"
'''
    assert _variable_reads(source) == ["VBATCH_API_PORT", "VBATCH_HOME", "VBATCH_STORE", "VBATCH_DAGSTER_PORT"]
