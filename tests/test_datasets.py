"""Gold-star dataset versions: claimed before they are written, whole or absent, and checks that read the
files of the version just built — each shown failing on the corruption it exists for."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import build_gold_star_dataset
from vbatch_pipelines.curation.schemas import annotation_result, read_annotation
from vbatch_pipelines.store.models import CurationTask, Dataset


def _tasks(platform, n: int, schema: str = "chat_review", answer=lambda i: f"Answer {i}.") -> None:
    with platform.db.session() as session:
        for i in range(n):
            session.add(CurationTask(batch_id="batch_ds", custom_id=f"{schema}-{i}", schema=schema, model="m",
                                     messages=[{"role": "user", "content": f"Question {i} for {schema}?"}],
                                     response=answer(i), ls_task_id=None, created_at=int(time.time()),
                                     gold_star=True, annotated=True, reviewed_at=int(time.time()), changed_seq=i + 1))


def _build(platform):
    result = build_gold_star_dataset(platform.resources)
    assert result.success
    version = result.asset_materializations_for_node("gold_star_dataset")[0].metadata["version"].value
    return version, {c.check_name: c for c in result.get_asset_check_evaluations()}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


CORRUPTIONS = {
    "empty_responses": lambda train, eval_: _write(train, [
        {"messages": [*_lines(train)[0]["messages"][:-1], {"role": "assistant", "content": "  "}]},
        *_lines(train)[1:]]),
    "duplicate_prompts": lambda train, eval_: _write(train, _lines(train) + _lines(train)[:1]),
    "split_leak": lambda train, eval_: _write(eval_, _lines(eval_) + _lines(train)[:1]),
    "chat_structure": lambda train, eval_: _write(train, [
        {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}, *_lines(train)]),
    "valid_answers": None,  # a json_extraction answer that is not JSON: see below
}


@pytest.mark.parametrize("check", sorted(CORRUPTIONS))
def test_each_dataset_check_fails_on_the_corruption_it_exists_for(platform, check):
    from vbatch_pipelines.curation.dataset import check_dataset

    platform.db.upgrade()
    _tasks(platform, 40)
    if check == "valid_answers":  # the model's answer to a json_extraction request, starred unedited
        _tasks(platform, 3, schema="json_extraction", answer=lambda i: '{"city": "Oslo"' if i == 1 else '{"a": 1}')
    version, checks = _build(platform)
    directory = Path(platform.db.get(Dataset, version).path)
    if check == "valid_answers":
        assert not checks["valid_answers"].passed  # caught in the run that built it
        assert [name for name, c in checks.items() if not c.passed] == ["valid_answers"]
    else:
        assert all(c.passed for c in checks.values()), {n: c.metadata for n, c in checks.items()}
        CORRUPTIONS[check](directory / "train.openai.jsonl", directory / "eval.openai.jsonl")
    found_version, found = check_dataset(platform.db, None, check)
    assert found_version == version and found, f"{check} did not see the corruption"
    if check in ("empty_responses", "valid_answers"):  # an answer's fault: the structural checks still pass
        assert not [name for name in CORRUPTIONS if name != check and check_dataset(platform.db, None, name)[1]]


def test_checks_read_the_version_their_run_built_not_the_newest(platform):
    """A check of an older run's version is not fooled by a newer version built meanwhile (and the other way)."""
    from vbatch_pipelines.curation.dataset import check_dataset

    platform.db.upgrade()
    _tasks(platform, 20)
    first, _ = _build(platform)
    run_of_first = platform.db.get(Dataset, first).dagster_run_id
    second, _ = _build(platform)
    directory = Path(platform.db.get(Dataset, first).path)
    _write(directory / "train.openai.jsonl", _lines(directory / "train.openai.jsonl") * 2)
    assert check_dataset(platform.db, run_of_first, "duplicate_prompts")[0] == first
    assert check_dataset(platform.db, run_of_first, "duplicate_prompts")[1]
    assert check_dataset(platform.db, None, "duplicate_prompts") == (second, [])


def test_concurrent_builds_claim_different_versions_and_write_whole_directories(platform):
    from vbatch_pipelines.curation.dataset import build_dataset
    from vbatch_pipelines.curation.service import latest_dataset

    platform.db.upgrade()
    _tasks(platform, 30)
    versions, errors = [], []

    def build():
        try:
            versions.append(build_dataset(platform.db, platform.file_store.datasets_dir, source_seq=30).version)
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and sorted(versions) == ["v1", "v2", "v3", "v4"]
    for version in versions:
        directory = platform.file_store.datasets_dir / version
        assert len(_lines(directory / "train.openai.jsonl")) + len(_lines(directory / "eval.openai.jsonl")) == 30
    assert not list(platform.file_store.datasets_dir.glob(".*partial")), "no half-written directory left"
    for n in range(5, 12):  # "v10" and "v11" are newer than "v9"
        build_dataset(platform.db, platform.file_store.datasets_dir, source_seq=30)
    assert latest_dataset(platform.db).version == "v11"


def test_an_invalid_edit_from_label_studio_is_recorded_kept_out_and_visible(platform):
    """A json_extraction answer edited in Label Studio is validated as the API's PATCH validates it."""
    from vbatch_pipelines.curation.dataset import build_dataset, load_examples
    from vbatch_pipelines.curation.sync import record_annotation

    platform.db.upgrade()
    with platform.db.session() as session:
        for i in range(3):
            session.add(CurationTask(batch_id="batch_js", custom_id=f"js-{i}", schema="json_extraction", model="m",
                                     messages=[{"role": "user", "content": f"Extract {i}"}], response='{"a": 1}',
                                     ls_task_id=100 + i, created_at=int(time.time())))
    record_annotation(platform.db, 100, {"id": 1, "result": annotation_result('{"a": 2}', 5, True)})
    record_annotation(platform.db, 101, {"id": 2, "result": annotation_result('{"a": 2', 5, True)})
    assert read_annotation(annotation_result('{"a": 2', 5, True)).gold_star
    with platform.db.session() as session:
        bad = session.query(CurationTask).filter_by(ls_task_id=101).one()
        assert bad.gold_star and "not valid JSON" in bad.review_error and bad.to_api()["review_error"]
    dataset = build_dataset(platform.db, platform.file_store.datasets_dir, source_seq=10)
    assert [e["custom_id"] for e in load_examples(dataset)] == ["js-0"]
    record_annotation(platform.db, 101, {"id": 2, "result": annotation_result('{"a": 3}', 5, True)})  # fixed
    with platform.db.session() as session:
        assert session.query(CurationTask).filter_by(ls_task_id=101).one().review_error is None
