"""The curation loop against a real Label Studio: results in, reviews back, versioned gold-star datasets.

Batches run on the tiny model (transformers engine) through Dagster's ``materialize``; Label Studio is
the session's real server, annotated through its SDK exactly as an expert's browser would.
"""

from __future__ import annotations

import json
import time

import pytest
from dagster import DagsterInstance, SensorResult, SkipReason, build_sensor_context, materialize

from tests.conftest import Platform, build_gold_star_dataset, chat_lines, jsonl, serving
from vbatch_pipelines.curation.schemas import annotation_result


@pytest.fixture()
def curation(curation_home):
    return Curation()


class Curation(Platform):
    def __init__(self):
        super().__init__()
        self.label_studio = self.resources.label_studio
        self.instance = DagsterInstance.ephemeral()
        self.cursor: str | None = None

    @property
    def client(self):
        return self.label_studio.client

    def run_batch(self, lines: list[dict], **kwargs) -> str:
        from vbatch_pipelines.defs.batches import batch_input, batch_output
        from vbatch_pipelines.defs.curation import curation_tasks
        from vbatch_pipelines.partitions import batch_partitions

        batch = self.submit(jsonl(lines), **kwargs)
        self.instance.add_dynamic_partitions(batch_partitions.name, [batch.id])
        result = materialize([batch_input, batch_output, curation_tasks], partition_key=batch.id,
                             resources=self.resources, instance=self.instance)
        assert result.success
        return batch.id

    def recurate(self, batch_id: str):
        from vbatch_pipelines.defs.batches import batch_input, batch_output
        from vbatch_pipelines.defs.curation import curation_tasks

        return materialize([batch_input, batch_output, curation_tasks], selection=[curation_tasks.key],
                           partition_key=batch_id, resources=self.resources, instance=self.instance)

    def tasks(self, batch_id: str) -> dict[str, int]:
        from vbatch_pipelines.curation.schemas import CHAT_REVIEW

        return self.label_studio.tasks_of_batch(self.label_studio.project_for(CHAT_REVIEW), batch_id)

    def tick(self):
        from vbatch_pipelines.defs.curation import label_studio_sensor

        context = build_sensor_context(cursor=self.cursor, instance=self.instance,
                                       resources={"metadata_db": self.resources.metadata_db,
                                                  "label_studio": self.label_studio})
        result = label_studio_sensor(context)
        self.cursor = context.cursor
        return result

    def build_dataset(self):
        result = build_gold_star_dataset(self.resources, self.instance)
        assert result.success
        checks = result.get_asset_check_evaluations()
        assert checks and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
        meta = result.asset_materializations_for_node("gold_star_dataset")[0].metadata
        return meta["version"].value, meta

    def export(self, version: str, split: str = "train", fmt: str = "openai") -> list[dict]:
        from vbatch_pipelines.curation.dataset import export_path
        from vbatch_pipelines.store.models import Dataset

        path = export_path(self.db.get(Dataset, version), fmt, split)
        return [json.loads(line) for line in path.read_text().splitlines()]

    def all_examples(self, version: str) -> list[dict]:
        return self.export(version, "train") + self.export(version, "eval")


def _requested(result) -> bool:
    run_requests = result.run_requests if isinstance(result, SensorResult) else \
        ([result] if result is not None and not isinstance(result, SkipReason) else [])
    return bool(run_requests)


def test_results_reviews_and_gold_star_versions(curation):
    lines = chat_lines(6, prefix="cur")
    batch_id = curation.run_batch(lines)
    tasks = curation.tasks(batch_id)
    assert sorted(tasks) == sorted(line["custom_id"] for line in lines)

    # Re-materializing creates no duplicates, in vbatch or in Label Studio.
    assert curation.recurate(batch_id).success
    assert curation.tasks(batch_id) == tasks

    # The first tick reads everything there is (nothing reviewed yet): no dataset needed.
    assert not _requested(curation.tick())

    edited, kept = tasks["cur-0"], tasks["cur-1"]
    curation.client.annotations.create(edited, result=annotation_result("An expert's better answer.", 5, True))
    curation.client.annotations.create(kept, result=annotation_result(None, 4, True))
    curation.client.annotations.create(tasks["cur-2"], result=annotation_result(None, 2, False))
    assert _requested(curation.tick())
    version, meta = curation.build_dataset()
    examples = curation.all_examples(version)
    answers = sorted(e["messages"][-1]["content"] for e in examples)
    assert len(examples) == 2 and "An expert's better answer." in answers
    assert meta["examples"].value == 2
    model_answer = next(r for r in curation.results(batch_id)[0] if r["custom_id"] == "cur-1")
    assert model_answer["response"]["body"]["choices"][0]["message"]["content"] in answers
    assert not _requested(curation.tick())  # nothing new since that version

    # The same run built the preference pairs: the expert's edit over the model's answer it replaced.
    from vbatch_pipelines.curation.service import latest_dataset
    from vbatch_pipelines.store.models import PREFERENCE

    pairs = latest_dataset(curation.db, kind=PREFERENCE)
    assert pairs is not None and pairs.examples == 1 and pairs.counts["by_source"] == {"edit": 1}
    edited_model_answer = next(r for r in curation.results(batch_id)[0] if r["custom_id"] == "cur-0")
    (pair,) = curation.export(pairs.version, "train", "trl") + curation.export(pairs.version, "eval", "trl")
    assert pair["chosen"] == [{"role": "assistant", "content": "An expert's better answer."}]
    assert pair["rejected"][0]["content"] == edited_model_answer["response"]["body"]["choices"][0]["message"]["content"]

    # Unmark the edited one: the next version drops it.
    annotation = curation.client.tasks.get(str(edited)).annotations[0]
    curation.client.annotations.update(annotation["id"] if isinstance(annotation, dict) else annotation.id,
                                       result=annotation_result("An expert's better answer.", 5, False))
    assert _requested(curation.tick())
    next_version, _ = curation.build_dataset()
    assert next_version != version
    assert [e["messages"][-1]["content"] for e in curation.all_examples(next_version)] == \
        [model_answer["response"]["body"]["choices"][0]["message"]["content"]]


def test_curation_off_per_batch_and_label_studio_restart_loses_nothing(curation, label_studio_server):
    skipped = curation.run_batch(chat_lines(2, prefix="off"), metadata={"curation": "off"})
    assert curation.tasks(skipped) == {}

    batch_id = curation.run_batch(chat_lines(3, prefix="rs"))
    tasks = curation.tasks(batch_id)
    curation.tick()
    curation.client.annotations.create(tasks["rs-0"], result=annotation_result(None, 5, True))

    server, _ = label_studio_server
    server.stop()
    try:
        cursor = curation.cursor
        result = curation.tick()
        assert isinstance(result, SkipReason) and "unreachable" in result.skip_message
        assert curation.cursor == cursor
    finally:
        server.ensure()
    assert _requested(curation.tick())
    version, _ = curation.build_dataset()
    assert any(e["messages"][0]["content"] == chat_lines(3, prefix="rs")[0]["body"]["messages"][0]["content"]
               for e in curation.all_examples(version))


@pytest.fixture()
def live_api(curation):
    """The REST API on a real port, so Label Studio can call its webhook."""
    from api.main import create_app

    with serving(create_app()) as url:
        yield url


def _wait(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_webhook_and_api_write_through(curation, live_api):
    import httpx

    from vbatch_pipelines.curation.service import get_task

    batch_id = curation.run_batch(chat_lines(3, prefix="wh"))
    curation.label_studio.ensure_webhook(f"{live_api}/v1/webhooks/label-studio", "test-webhook-secret")
    tasks = curation.tasks(batch_id)

    # An expert stars a task in Label Studio: the webhook records it at once, no sensor tick.
    annotation = curation.client.annotations.create(tasks["wh-0"], result=annotation_result(None, 5, True))
    assert _wait(lambda: get_task(curation.db, tasks["wh-0"]).gold_star)
    curation.client.annotations.delete(annotation.id)
    assert _wait(lambda: not get_task(curation.db, tasks["wh-0"]).gold_star)

    # A wrong secret is refused.
    assert httpx.post(f"{live_api}/v1/webhooks/label-studio", json={"action": "ANNOTATION_CREATED"},
                      headers={"X-Vbatch-Webhook-Secret": "nope"}).status_code == 401

    # Through vbatch's API: edit and star, written through to Label Studio.
    task_id = tasks["wh-1"]
    edited = httpx.patch(f"{live_api}/v1/curation/tasks/{task_id}/response", json={"response": "Fixed by API."})
    assert edited.status_code == 200 and edited.json()["edited_response"] == "Fixed by API."
    starred = httpx.post(f"{live_api}/v1/curation/tasks/{task_id}/gold-star", json={"gold_star": True})
    assert starred.json()["gold_star"] is True and starred.json()["edited_response"] == "Fixed by API."
    ls_annotations = curation.client.tasks.get(str(task_id)).annotations
    assert len(ls_annotations) == 1
    result = ls_annotations[0]["result"] if isinstance(ls_annotations[0], dict) else ls_annotations[0].result
    assert {"Fixed by API."} == {t for r in result if r["from_name"] == "answer" for t in r["value"]["text"]}
    assert httpx.get(f"{live_api}/v1/curation/tasks/999999999").status_code == 404
    audit = httpx.get(f"{live_api}/v1/organization/audit_logs").json()["data"]  # newest first
    assert [(e["type"], e["curation.starred" if e["type"] == "curation.starred" else "curation.edited"]["id"])
            for e in audit[:2]] == [("curation.starred", str(task_id)), ("curation.edited", str(task_id))]

    stats = httpx.get(f"{live_api}/v1/curation/stats").json()
    assert stats["tasks"] == 3 and stats["gold_stars"] == 1 and stats["by_schema"]["chat_review"]["tasks"] == 3

    # The tick after these changes requests a dataset; its export is served by the API.
    assert _requested(curation.tick())
    version, _ = curation.build_dataset()
    listed = httpx.get(f"{live_api}/v1/datasets", params={"kind": "sft"}).json()["data"]
    assert listed[0]["version"] == version
    lines = []
    for split in ("train", "eval"):
        exported = httpx.get(f"{live_api}/v1/datasets/{version}/export", params={"format": "openai", "split": split})
        assert exported.status_code == 200
        lines += [json.loads(x) for x in exported.text.splitlines()]
    assert [line["messages"][-1]["content"] for line in lines] == ["Fixed by API."]
    bad = httpx.get(f"{live_api}/v1/datasets/{version}/export", params={"format": "csv"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"


def test_json_schema_validates_edits(curation, live_api):
    import httpx

    # the batch's metadata picks the schema (the transformers engine these tests run on refuses response_format)
    batch_id = curation.run_batch(chat_lines(2, prefix="js"), metadata={"curation_schema": "json_extraction"})
    from vbatch_pipelines.curation.schemas import JSON_EXTRACTION

    project = curation.label_studio.project_for(JSON_EXTRACTION)
    tasks = curation.label_studio.tasks_of_batch(project, batch_id)
    assert len(tasks) == 2
    bad = httpx.patch(f"{live_api}/v1/curation/tasks/{tasks['js-0']}/response", json={"response": "{not json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    good = httpx.patch(f"{live_api}/v1/curation/tasks/{tasks['js-0']}/response", json={"response": '{"a": 1}'})
    assert good.status_code == 200 and good.json()["schema"] == "json_extraction"


def test_every_way_to_ask_for_json_is_reviewed_as_json_extraction():
    """OpenAI's response_format and a Responses text.format, and vLLM's own extensions (structured_outputs with
    json or json_object), pick json_extraction; other constraints stay chat reviews."""
    from vbatch_pipelines.curation.schemas import CHAT_REVIEW, JSON_EXTRACTION, schema_for_batch

    chat = chat_lines(1)[0]["body"]
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for extra in ({"response_format": {"type": "json_object"}},
                  {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}},
                  {"structured_outputs": {"json": schema}}, {"structured_outputs": {"json": json.dumps(schema)}},
                  {"structured_outputs": {"json_object": True}},
                  {"input": "hi", "text": {"format": {"type": "json_schema", "name": "a", "schema": schema}}}):
        assert schema_for_batch({}, {**chat, **extra}) is JSON_EXTRACTION, extra
    for extra in ({}, {"response_format": {"type": "text"}}, {"structured_outputs": {"regex": "[a-z]+"}},
                  {"structured_outputs": {"choice": ["yes", "no"]}}, {"structured_outputs": {"json_object": False}}):
        assert schema_for_batch({}, {**chat, **extra}) is CHAT_REVIEW, extra
    assert schema_for_batch({"curation_schema": "chat_review"}, {**chat, "structured_outputs": {"json": schema}}) \
        is CHAT_REVIEW
