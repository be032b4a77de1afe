"""Extensions as plugins: a toy extension (tests/data/toy_extension: a package and its dist-info with a
``vbatch.extensions`` entry point, "installed" by being on the path) adds a route, a sensor, a JSON review schema
and a console page only when it is installed and ``VBATCH_EXTENSIONS`` names it; JSON review schema files are
checked, a bad one named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import api_client

TOY = Path(__file__).parent / "data" / "toy_extension"
# what the code location has: its sensors, whether the toy's schema is known, its resources
LOCATION = ("import vbatch_pipelines.definitions as d; from vbatch_pipelines.curation.schemas import SCHEMAS; "
            "r = d.defs.get_repository_def(); print(sorted(s.name for s in r.sensor_defs)); "
            "print('toy_review' in SCHEMAS)")


@pytest.fixture(autouse=True)
def schemas_restored():
    """Review schemas are registered per process: what a test registers is taken back after it."""
    from vbatch_pipelines.curation.schemas import SCHEMA_RULES, SCHEMAS

    saved, rules = dict(SCHEMAS), list(SCHEMA_RULES)
    yield
    SCHEMAS.clear()
    SCHEMAS.update(saved)
    SCHEMA_RULES[:] = rules


def _location(extra_path: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(extra_path), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", LOCATION], capture_output=True, text=True, env=env, timeout=300)


def test_the_toy_extension_appears_only_when_installed_and_enabled(vbatch_home, monkeypatch):
    from api.main import create_app
    from vbatch_pipelines.curation.schemas import get_schema
    from vbatch_pipelines.extensions import installed

    # Not installed, or installed and not enabled: no sensor, no schema, no route, no page, no link.
    assert "toy" not in installed()
    assert "toy_sensor" not in _location().stdout
    monkeypatch.syspath_prepend(str(TOY))
    assert "toy" in installed()
    off = _location(TOY)
    assert off.returncode == 0, off.stderr[-2000:]
    assert "toy_sensor" not in off.stdout and off.stdout.strip().endswith("False")
    with api_client(create_app()) as client:
        assert client.get("/v1/toy/hello").status_code == 404
        assert client.get("/ui/ext/toy/").status_code == 404
        assert 'href="/ui/ext/toy/"' not in client.get("/ui/review").text
    assert "toy_review" not in get_schema.__globals__["SCHEMAS"]

    # Enabled: all four.
    monkeypatch.setenv("VBATCH_EXTENSIONS", "toy")
    on = _location(TOY)
    assert on.returncode == 0, on.stderr[-2000:]
    assert "toy_sensor" in on.stdout and on.stdout.strip().endswith("True")
    with api_client(create_app()) as client:
        assert client.get("/v1/toy/hello").json() == {"hello": "toy"}
        page = client.get("/ui/ext/toy/")
        assert page.status_code == 200 and "Hello from the toy &lt;extension&gt;" in page.text
        assert 'href="/ui/ext/toy/"' in client.get("/ui/review").text  # in every page's nav
        assert "/v1/toy/hello" in client.get("/openapi.json").json()["paths"]
    toy = get_schema("toy_review")
    assert toy.validate('{"colour": "red"}') is None
    assert "colour" in toy.validate('{"size": 1}') and "not valid JSON" in toy.validate("red")


def test_an_extension_not_installed_stops_the_start_naming_those_that_are(vbatch_home, monkeypatch):
    from api.main import create_app
    from vbatch_pipelines.extensions import ExtensionError
    from vbatch_pipelines.settings import SettingsError, load_settings

    monkeypatch.setenv("VBATCH_EXTENSIONS", "nope")
    with pytest.raises(ExtensionError, match=r"'nope', which is not installed; installed: aris"):
        create_app()
    failed = _location()
    assert failed.returncode != 0 and "'nope', which is not installed" in failed.stderr
    monkeypatch.setenv("VBATCH_EXTENSIONS", "../aris")
    with pytest.raises(SettingsError, match="VBATCH_EXTENSIONS"):
        load_settings()
    # Before VBATCH_EXTENSIONS, Aris was on when its database was set: still so, unless the list says otherwise.
    monkeypatch.delenv("VBATCH_EXTENSIONS")
    monkeypatch.setenv("VBATCH_ARIS_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/aristotle")
    assert load_settings().extensions.enabled == ("aris",)
    monkeypatch.setenv("VBATCH_EXTENSIONS", "off")
    assert load_settings().extensions.enabled == ()


GOOD = {"name": "invoice_fields", "kind": "json_extraction", "description": "Check the fields read from an invoice.",
        "answer_schema": {"type": "object", "required": ["total"]}}


@pytest.mark.parametrize("bad, says", [
    ("{not json", "Expecting property name"),
    (json.dumps({**GOOD, "name": "../../etc/passwd"}), "must match"),
    (json.dumps({**GOOD, "name": "chat_review"}), "already defined (built in)"),
    (json.dumps({**GOOD, "answer_schema": {"type": 12}}), "not a valid JSON Schema"),
    (json.dumps({**GOOD, "answr_schema": {}}), "unknown key(s) answr_schema"),
    (json.dumps({**GOOD, "kind": "essay"}), "kind 'essay'"),
    (json.dumps([GOOD]), "not a JSON object"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "name"}), "name None must match"),
    (json.dumps({**GOOD, "name": "other", "description": " "}), "description must say"),
    (json.dumps({**GOOD, "name": "other", "kind": "review"}), "answer_schema needs kind json_extraction"),
    (json.dumps(GOOD), "already defined (by another file here)"),
    (json.dumps({**GOOD, "name": "other", "description": "x" * 300_000}), "larger than 256 KiB"),
])
def test_a_bad_review_schema_file_stops_the_start_naming_the_file(vbatch_home, tmp_path, monkeypatch, bad, says):
    from api.main import create_app
    from vbatch_pipelines.curation.schema_files import SchemaFileError

    folder = tmp_path / "review-schemas"
    folder.mkdir()
    (folder / "a_good.json").write_text(json.dumps(GOOD))
    (folder / "broken.json").write_text(bad)
    monkeypatch.setenv("VBATCH_REVIEW_SCHEMAS_DIR", str(folder))
    with pytest.raises(SchemaFileError) as refused:
        create_app()
    assert str(folder / "broken.json") in str(refused.value) and says in str(refused.value)


def test_review_schemas_in_a_folder_need_no_code(vbatch_home, tmp_path, monkeypatch):
    from api.main import create_app
    from vbatch_pipelines.curation.schemas import get_schema, schema_for_batch

    folder = vbatch_home / "review-schemas"  # the default folder
    folder.mkdir(parents=True)
    (folder / "invoice_fields.json").write_text(json.dumps(GOOD))
    with api_client(create_app()):
        invoice = schema_for_batch({"curation_schema": "invoice_fields"})
    assert invoice is get_schema("invoice_fields") and invoice.project_title == "vbatch · invoice_fields"
    assert invoice.validate('{"total": 12.5}') is None
    assert "total" in invoice.validate('{"sum": 12.5}')


def _install(root: Path, package: str, source: str, entry_points: str) -> None:
    """Write a package and its dist-info (``vbatch.extensions`` entry points) under ``root``: on the path, installed."""
    (root / package).mkdir(parents=True)
    (root / package / "__init__.py").write_text(source)
    info = root / f"{package}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vbatch.extensions]\n{entry_points}")


def test_an_entry_point_is_an_extension_or_a_function_returning_one_named_as_the_entry_point(tmp_path, monkeypatch):
    from vbatch_pipelines.extensions import ExtensionError, enabled_extensions

    _install(tmp_path, "shapes_ext", "from vbatch_pipelines.extensions import Extension\n"
             "def made():\n    return Extension(name='made')\n"
             "misnamed = Extension(name='someone_else')\n"
             "junk = 42\n",
             "made = shapes_ext:made\nmisnamed = shapes_ext:misnamed\njunk = shapes_ext:junk\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert [extension.name for extension in enabled_extensions(["made"])] == ["made"]
    for name in ("misnamed", "junk"):
        with pytest.raises(ExtensionError, match=rf"entry point '{name}' \(shapes_ext:{name}\) is not an Extension"):
            enabled_extensions([name])


def test_a_schema_file_reusing_an_enabled_extensions_schema_stops_the_start(vbatch_home, monkeypatch):
    from api.main import create_app
    from vbatch_pipelines.curation.schema_files import SchemaFileError

    folder = vbatch_home / "review-schemas"
    folder.mkdir(parents=True)
    (folder / "toy_review.json").write_text(json.dumps({**GOOD, "name": "toy_review"}))
    monkeypatch.syspath_prepend(str(TOY))
    monkeypatch.setenv("VBATCH_EXTENSIONS", "toy")
    with pytest.raises(SchemaFileError, match=r"'toy_review' in .*review-schemas is already defined elsewhere"):
        create_app()
    # a schema an extension registers in code (Aris's conquest schemas) is not replaced by a file either
    (folder / "toy_review.json").unlink()
    (folder / "conquest.json").write_text(json.dumps({**GOOD, "name": "conquest"}))
    monkeypatch.setenv("VBATCH_EXTENSIONS", "aris")
    monkeypatch.setenv("VBATCH_ARIS_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/aristotle")
    with pytest.raises(SchemaFileError, match=r"'conquest' in .*review-schemas is already defined elsewhere"):
        create_app()


def test_aris_enabled_without_its_database_stops_the_start(vbatch_home, monkeypatch):
    from api.main import create_app
    from vbatch_pipelines.settings import SettingsError

    monkeypatch.delenv("VBATCH_ARIS_DATABASE_URL", raising=False)
    monkeypatch.setenv("VBATCH_EXTENSIONS", "aris")
    with pytest.raises(SettingsError, match="The aris extension needs VBATCH_ARIS_DATABASE_URL"):
        create_app()
