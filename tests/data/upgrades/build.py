"""Builds the fixture homes of tests/test_upgrades.py: a vbatch home (VBATCH_HOME) as each earlier revision made
it, with data that revision's own code wrote.

One fixture per metadata DB migration, made by the commit that added it (``REVISIONS``), plus the commits that
changed a migration after it was added (a home made in between is stamped with the same revision but has another
schema). Each revision's home holds, where that revision has them: a batch input file and a completed batch (run
by its own batch assets in a Dagster run on its own instance, the transformers engine on the tiny chat model) with
its output file; curation tasks with a gold-star review and a gold-star dataset built from it (the curation
service, without Label Studio); a model install request; a fine-tuning job (both through its own API, with
Dagster unreachable, so they stay recorded). ``expected.json`` in the home says what that revision served: the
batch object, the output file's id and SHA-256, the ids of the other records, its DB revision and its Dagster run.

Rebuild (minutes; needs the tiny chat model the tests build, and git history), from the repository root:

    .venv/bin/python tests/data/upgrades/build.py [SHA ...]

For each revision it adds a git worktree at /tmp/vbatch-rev-<sha> (removed after), runs ``make`` below with that
revision's code on this venv (PYTHONPATH and cwd the worktree), and packs the home as ``<migration>-<sha>.tar.gz``
here. Packing makes the archive small and movable: every SQLite file becomes ``<name>.sql`` (its dump), the home's
absolute path becomes ``HOME_PLACEHOLDER`` in every text file (paths in the DBs and dagster.yaml), and what a home
keeps only while it runs (logs, locks, service state) is left out. tests/test_upgrades.py ``unpack_home`` reverses
it into any directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
HOME_PLACEHOLDER = "@VBATCH_FIXTURE_HOME@"
# (migration head, commit): each migration as the commit that added it made its homes, and the homes of the
# commits whose migration changed after they were made (same revision stamp, another schema)
REVISIONS = [
    ("0001", "121c2c1"),  # files and batches (f58b4bc, which added 0001, stamped it in alembic_version)
    ("0002", "301115f"),  # curation
    ("0003", "f957fcf"),  # models and fine-tuning
    ("0004", "c1ed616"),  # Aris, as added
    ("0004", "c390da3"),  # Aris, as it stayed: aris_links.example_since and ix_aris_links_examples added to 0004
    ("0005", "cf7f9f9"),  # 0005 as first added (0005_review_order: curation_tasks.annotation_updated_at only)
    ("0005", "333a6c8"),  # reliability, as it stayed (5e1c8d9, which added it, had an API that did not import)
    ("0006", "6c6323e"),  # engines
]
LEFT_OUT = ("logs", "run", "engines", "label-studio", "models")  # per-process state; model copies (none here)
CHAT_LINES = [{"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
               "body": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}], "max_tokens": 8,
                        "temperature": 0}} for i in range(3)]
TRAINING_LINES = [{"messages": [{"role": "user", "content": f"Say {i}"}, {"role": "assistant", "content": str(i)}]}
                  for i in range(12)]


def jsonl(lines: list[dict]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


# -- run with the revision's code ---------------------------------------------------------------------------


def _first(*names: str):
    """The first of ``module:attr`` names this revision has."""
    for name in names:
        module, _, attr = name.partition(":")
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {names} in this revision")


def _resources(settings) -> dict:
    try:
        from resources.factory import build_resources
    except ImportError:
        from vbatch_pipelines.definitions import build_resources
    try:
        return build_resources(settings, defer_secrets=False)
    except TypeError:
        return build_resources(settings)


def make(home: Path, revision: str) -> None:
    """Make a home the way this revision does (VBATCH_HOME and the rest are set by ``build``)."""
    from dagster import DagsterInstance, materialize

    from vbatch_pipelines.settings import load_settings

    settings = load_settings()
    resources = _resources(settings)
    db = resources["metadata_db"].db
    expected: dict = {"revision": revision}
    try:
        from vbatch_pipelines.instance import prepare_dagster_home

        prepare_dagster_home(settings)
    except ImportError:
        settings.dagster_home.mkdir(parents=True, exist_ok=True)
    # Its storage set up before the API's launcher opens the instance in a thread of its own.
    instance = DagsterInstance.get()
    if importlib.util.find_spec("api.main") is None:  # before the API: the batch service is the front door
        store_file = _first("vbatch_pipelines.batch.service:store_file")
        create_batch = _first("vbatch_pipelines.batch.service:create_batch")
        stored = store_file(db, resources["file_store"].files_dir, io.BytesIO(jsonl(CHAT_LINES)), "input.jsonl",
                            "batch")
        batch_id = create_batch(db, input_file_id=stored.id, endpoint="/v1/chat/completions").id
        client = None
    else:
        from fastapi.testclient import TestClient

        from api.main import create_app

        client = TestClient(create_app(), base_url="http://127.0.0.1")
        client.__enter__()
        uploaded = client.post("/v1/files", files={"file": ("input.jsonl", jsonl(CHAT_LINES))},
                               data={"purpose": "batch"})
        uploaded.raise_for_status()
        created = client.post("/v1/batches", json={"input_file_id": uploaded.json()["id"],
                                                   "endpoint": "/v1/chat/completions", "completion_window": "24h"})
        created.raise_for_status()
        batch_id = created.json()["id"]

    batch_input = _first("vbatch_pipelines.defs.batches:batch_input", "vbatch_pipelines.assets.batches:batch_input")
    batch_output = _first("vbatch_pipelines.defs.batches:batch_output",
                          "vbatch_pipelines.assets.batches:batch_output")
    from vbatch_pipelines.partitions import batch_partitions

    with instance:
        instance.add_dynamic_partitions(batch_partitions.name, [batch_id])
        result = materialize([batch_input, batch_output], partition_key=batch_id, resources=resources,
                             instance=instance)
        assert result.success
        expected["dagster_run_id"] = result.run_id

    get_batch = _first("vbatch_pipelines.batch.service:get_batch")
    get_file = _first("vbatch_pipelines.files:get_file", "vbatch_pipelines.batch.service:get_file")
    batch = get_batch(db, batch_id)
    assert batch.status == "completed", batch.to_openai()
    expected["batch"] = client.get(f"/v1/batches/{batch_id}").json() if client else batch.to_openai()
    output = Path(get_file(db, batch.output_file_id).path).read_bytes()
    expected["output_sha256"] = hashlib.sha256(output).hexdigest()

    try:
        from vbatch_pipelines.curation import dataset as gold
        from vbatch_pipelines.curation import service as curation
        from vbatch_pipelines.curation.schemas import Review
    except ImportError:
        gold = None
    if gold is not None:  # what curation_tasks records around its Label Studio import, then an expert's review
        rows = []
        for line in output.decode().splitlines():
            result = json.loads(line)
            body = next(x["body"] for x in CHAT_LINES if x["custom_id"] == result["custom_id"])
            answer = result["response"]["body"]["choices"][0]["message"]["content"]
            rows.append({"batch_id": batch_id, "custom_id": result["custom_id"], "schema": "chat",
                         "model": batch.model, "messages": body["messages"], "response": answer})
        curation.add_tasks(db, rows)
        task_ids = {row["custom_id"]: 1000 + i for i, row in enumerate(rows)}
        curation.set_task_ids(db, batch_id, 1, task_ids)
        assert curation.apply_review(db, task_ids["req-0"], Review(answer="0 plus 0 is 0", rating=5,
                                                                   gold_star=True), 1)
        datasets_dir = getattr(settings, "datasets_dir", None) or resources["file_store"].datasets_dir
        dataset = gold.build_dataset(db, datasets_dir, source_seq=curation.latest_change(db))
        expected["curation_tasks"] = len(rows)
        expected["dataset"] = dataset.version

    if client is not None and importlib.util.find_spec("vbatch_pipelines.fine_tuning") is not None:
        model_path = os.environ["VBATCH_FIXTURE_MODEL"]
        installed = client.post("/v1/models", json={"source": model_path, "id": "fixture-install"})
        assert installed.status_code == 200, installed.text
        expected["model"] = installed.json()["id"]
        training = client.post("/v1/files", files={"file": ("train.jsonl", jsonl(TRAINING_LINES))},
                               data={"purpose": "fine-tune"})
        training.raise_for_status()
        job = client.post("/v1/fine_tuning/jobs", json={"model": batch.model, "training_file": training.json()["id"]})
        assert job.status_code == 200, job.text
        expected["fine_tuning_job"] = job.json()["id"]

    with db.engine.connect() as connection:
        expected["db_revision"] = connection.exec_driver_sql("SELECT version_num FROM vbatch_alembic_version").scalar()
    if client is not None:
        client.__exit__(None, None, None)
    db.dispose()
    (home / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")


# -- pack ------------------------------------------------------------------------------------------------------


def _is_sqlite(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(16) == b"SQLite format 3\x00"


def pack_home(home: Path, archive: Path) -> None:
    """``home`` as a movable archive (see the module's docstring)."""
    root = str(home)
    with tarfile.open(archive, "w:gz", compresslevel=9) as tar:
        for path in sorted(home.rglob("*")):
            relative = path.relative_to(home)
            if not path.is_file() or relative.parts[0] in LEFT_OUT or path.suffix in (".lock", ".part") \
                    or path.name.endswith(("-wal", "-shm")):
                continue
            if _is_sqlite(path):
                connection = sqlite3.connect(path)
                data = "\n".join(connection.iterdump()).encode()
                connection.close()
                name = f"{relative}.sql"
            else:
                data, name = path.read_bytes(), str(relative)
            try:
                data = data.decode().replace(root, HOME_PLACEHOLDER).encode()
            except UnicodeDecodeError:
                pass  # binary (a Parquet file): no paths in it
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))


def build(migration: str, sha: str, model: Path) -> Path:
    worktree = Path(f"/tmp/vbatch-rev-{sha}")
    added = not worktree.exists()
    if added:
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), sha], check=True)
    try:
        with tempfile.TemporaryDirectory(prefix="vbatch-fixture-") as tmp:
            home = Path(tmp) / "home"
            env = {key: value for key, value in os.environ.items() if not key.startswith(("VBATCH_", "DAGSTER_"))}
            env.update(PYTHONPATH=str(worktree), VBATCH_HOME=str(home), DAGSTER_HOME=str(home / "dagster"),
                       VBATCH_ENGINE="transformers", VBATCH_MODELS=f"vbatch-tiny-chat={model}",
                       VBATCH_MODEL_SOURCES=str(model.parent), VBATCH_CURATION="off",
                       VBATCH_DAGSTER_URL="http://127.0.0.1:9", VBATCH_FIXTURE_MODEL=str(model))
            subprocess.run([sys.executable, str(Path(__file__).resolve()), "--make", str(home), sha], env=env,
                           cwd=worktree, check=True)
            archive = HERE / f"{migration}-{sha}.tar.gz"
            pack_home(home, archive)
            return archive
    finally:
        if added:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], check=True)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--make"]:
        # Only the revision's code: this venv's editable install of the current tree would otherwise supply the
        # modules the revision does not have.
        sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
        make(Path(argv[1]), argv[2])
        return 0
    sys.path.insert(0, str(REPO))
    from tests.conftest import _tiny
    from vbatch_pipelines.models.registry import GENERATE, TINY_MODEL_ID

    model = _tiny(TINY_MODEL_ID, GENERATE)
    wanted = set(argv)
    for migration, sha in REVISIONS:
        if not wanted or sha in wanted:
            archive = build(migration, sha, model)
            print(f"{archive.name}: {archive.stat().st_size / 1024:.0f} KiB")
    shutil.rmtree(HERE / "__pycache__", ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
