"""Curation at team scale against the real Label Studio, through the official openai SDK: the review queue (list,
filter, page, bulk gold stars, assignment), several reviewers with k-of-N agreement, and filtered datasets that
fine-tuning jobs train on."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import LabelStudioSession, build_gold_star_dataset, chat_line, chat_lines, serving
from tests.test_curation import Curation, _requested
from vbatch_pipelines.curation.schemas import GOLD, annotation_result


@pytest.fixture()
def team(curation_home, label_studio_server, monkeypatch):
    monkeypatch.setenv("VBATCH_MIN_TRAINING_EXAMPLES", "1")
    curation = Curation()
    from api.main import create_app

    with serving(create_app()) as url:
        curation.sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        yield curation


def _get(sdk, path: str, **params) -> dict:
    return sdk.get(path, cast_to=object, options={"params": params})


def _post(sdk, path: str, body: dict) -> dict:
    return sdk.post(path, cast_to=object, body=body)


def _ls_gold(curation: Curation, task_id: int) -> list[bool]:
    """Each Label Studio annotation's gold-star choice on a task."""
    annotations = curation.client.tasks.get(str(task_id)).annotations
    return [any(r["from_name"] == GOLD for r in (a["result"] if isinstance(a, dict) else a.result))
            for a in annotations]


def test_the_queue_lists_pages_and_bulk_stars_tasks_that_land_in_the_next_dataset(team):
    batch_id = team.run_batch(chat_lines(5, prefix="q"))
    tasks = team.tasks(batch_id)
    other = team.run_batch(chat_lines(2, prefix="other"))

    first = _get(team.sdk, "/curation/tasks", batch_id=batch_id, limit=2)
    assert [t["custom_id"] for t in first["data"]] == ["q-0", "q-1"] and first["has_more"] is True
    rest = _get(team.sdk, "/curation/tasks", batch_id=batch_id, after=first["last_id"], limit=10)
    assert [t["custom_id"] for t in rest["data"]] == ["q-2", "q-3", "q-4"] and rest["has_more"] is False
    assert rest["data"][0]["messages"][0]["role"] == "user" and rest["data"][0]["response"]
    assert {t["batch_id"] for t in _get(team.sdk, "/curation/tasks", limit=100)["data"]} >= {batch_id, other}
    assert len(_get(team.sdk, "/curation/tasks", batch_id=batch_id, reviewed=False)["data"]) == 5

    chosen = [tasks["q-0"], tasks["q-2"], tasks["q-4"]]
    # One unknown id: refused whole, naming it; nothing was starred.
    with pytest.raises(openai.NotFoundError) as refused:
        _post(team.sdk, "/curation/tasks/gold-star", {"task_ids": [*chosen, 987654321]})
    assert "987654321" in refused.value.body["message"] and refused.value.body["param"] == "task_ids"
    assert _get(team.sdk, "/curation/tasks", batch_id=batch_id, gold_star=True)["data"] == []
    with pytest.raises(openai.BadRequestError):
        _post(team.sdk, "/curation/tasks/gold-star", {"task_ids": list(range(1, 502))})

    starred = _post(team.sdk, "/curation/tasks/gold-star", {"task_ids": chosen})
    assert [t["id"] for t in starred["data"]] == chosen and all(t["gold_star"] for t in starred["data"])
    assert [_ls_gold(team, task_id) for task_id in chosen] == [[True]] * 3  # Label Studio shows the same
    queued = _get(team.sdk, "/curation/tasks", batch_id=batch_id, gold_star=True)
    assert [t["id"] for t in queued["data"]] == chosen
    assert [t["custom_id"] for t in _get(team.sdk, "/curation/tasks", batch_id=batch_id, reviewed=False)["data"]] \
        == ["q-1", "q-3"]

    # The review page's call: answer, rating and star at once; Label Studio holds the same annotation.
    reviewed = team.sdk.patch(f"/curation/tasks/{tasks['q-1']}", cast_to=object,
                              body={"response": "A reviewer's fix.", "rating": 4})
    assert (reviewed["edited_response"], reviewed["rating"], reviewed["gold_star"]) == ("A reviewer's fix.", 4, False)
    (annotation,) = team.client.tasks.get(str(tasks["q-1"])).annotations
    result = annotation["result"] if isinstance(annotation, dict) else annotation.result
    assert {r["from_name"]: r["value"] for r in result}["rating"] == {"rating": 4}

    assert _requested(team.tick())
    version, _ = team.build_dataset()
    prompts = {e["messages"][0]["content"] for e in team.all_examples(version)}
    lines = chat_lines(5, prefix="q")
    assert prompts == {lines[i]["body"]["messages"][0]["content"] for i in (0, 2, 4)}


def test_three_reviewers_agree_k_of_n_for_a_gold_star(team, label_studio_server):
    from vbatch_pipelines.store.models import DEFAULT_PROJECT

    server, conn = label_studio_server
    policy = _post(team.sdk, f"/organization/projects/{DEFAULT_PROJECT}",
                   {"review": {"annotations_per_task": 3, "gold_star_agreement": 2}})
    assert policy["review"] == {"annotations_per_task": 3, "gold_star_agreement": 2}
    with pytest.raises(openai.BadRequestError) as refused:  # k > N: no task could ever be a gold star
        _post(team.sdk, f"/organization/projects/{DEFAULT_PROJECT}", {"review": {"gold_star_agreement": 4}})
    assert refused.value.body["param"] == "review.gold_star_agreement"
    try:
        batch_id = team.run_batch(chat_lines(2, prefix="agree"))
        tasks = team.tasks(batch_id)
        first, second = tasks["agree-0"], tasks["agree-1"]
        project = team.client.projects.get(team.label_studio.project_for(_chat_review()))
        assert project.maximum_annotations == 3  # Label Studio hands each task to three reviewers

        reviewers = {}
        for name in ("alice", "bob", "carol"):
            email = f"{name}-{batch_id[-6:]}@example.com"
            server.add_reviewer(DEFAULT_PROJECT, "Default", email, f"{name}-password-1", only_new=False)
            reviewers[name] = (email, LabelStudioSession(conn.url, email, f"{name}-password-1"))
        assigned = _post(team.sdk, "/curation/tasks/assign",
                         {"task_ids": [first, second], "reviewers": [email for email, _ in reviewers.values()]})
        assert [len(t["assignees"]) for t in assigned["data"]] == [3, 3]

        def annotate(name: str, task_id: int, gold: bool, rating: int) -> int:
            answer = reviewers[name][1].send("POST", f"/api/tasks/{task_id}/annotations/",
                                             {"result": annotation_result(None, rating, gold)})
            assert answer.status_code == 201, answer.text[:300]
            return answer.json()["id"]

        annotate("alice", first, True, 5)
        annotate("alice", second, True, 4)
        annotate("bob", first, True, 4)
        bobs_second = annotate("bob", second, False, 2)
        annotate("carol", first, False, 3)
        annotate("carol", second, False, 2)
        team.tick()

        shown = {t["id"]: t for t in _get(team.sdk, "/curation/tasks", batch_id=batch_id)["data"]}
        assert (shown[first]["gold_star"], shown[first]["gold_votes"], shown[first]["reviews"]) == (True, 2, 3)
        assert (shown[second]["gold_star"], shown[second]["gold_votes"], shown[second]["reviews"]) == (False, 1, 3)
        assert shown[first]["agreement"] == shown[second]["agreement"] == pytest.approx(2 / 3, abs=1e-3)
        assert {v["reviewer"] for v in shown[first]["votes"]} == {email for email, _ in reviewers.values()}

        stats = _get(team.sdk, "/curation/stats")["reviewers"]
        assert stats["policy"] == {"annotations_per_task": 3, "gold_star_agreement": 2}
        assert stats["tasks_with_several_reviews"] == 2 and stats["agreement"] == pytest.approx(2 / 3, abs=1e-3)
        by = {name: stats["by_reviewer"][email]["agreement"] for name, (email, _) in reviewers.items()}
        assert by == {"alice": 0.5, "bob": 1.0, "carol": 0.5}
        alice = reviewers["alice"][0]
        assert [t["id"] for t in _get(team.sdk, "/curation/tasks", assignee=alice, reviewed=True)["data"]] \
            == [first, second]
        assert _get(team.sdk, "/curation/tasks", assignee=alice, reviewed=False)["data"] == []

        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(str(team.sdk.base_url).replace("/v1/", "/metrics")).text
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(text) for s in family.samples}
        assert samples[("vbatch_reviewer_agreement", (("project", DEFAULT_PROJECT), ("reviewer", alice)))] == 0.5
        assert samples[("vbatch_review_agreement", (("project", DEFAULT_PROJECT),))] == pytest.approx(2 / 3, abs=1e-3)

        # Bob changes his mind in Label Studio: two of three now star the second task.
        changed = reviewers["bob"][1].send("PATCH", f"/api/annotations/{bobs_second}/",
                                           {"result": annotation_result(None, 4, True)})
        assert changed.status_code == 200, changed.text[:300]
        team.tick()
        assert _get(team.sdk, f"/curation/tasks/{second}")["gold_star"] is True
    finally:
        _post(team.sdk, f"/organization/projects/{DEFAULT_PROJECT}",
              {"review": {"annotations_per_task": 1, "gold_star_agreement": 1}})


def _chat_review():
    from vbatch_pipelines.curation.schemas import CHAT_REVIEW

    return CHAT_REVIEW


def test_a_filtered_dataset_holds_one_schema_and_a_fine_tune_trains_on_what_matched(team, monkeypatch):
    from vbatch_pipelines.curation.dataset import load_examples
    from vbatch_pipelines.models.registry import TINY_MODEL_ID
    from vbatch_pipelines.store.models import DEFAULT_PROJECT, Dataset

    red_lines = [chat_line(f"red-{i}", f"Name a red thing, number {i}.") for i in range(4)]
    red = team.run_batch(red_lines, metadata={"team": "red"})
    extracted = team.run_batch(chat_lines(3, prefix="js"), metadata={"curation_schema": "json_extraction"})
    _post(team.sdk, "/curation/tasks/gold-star", {"task_ids": list(team.tasks(red).values())})
    json_tasks = [t["id"] for t in _get(team.sdk, "/curation/tasks", batch_id=extracted)["data"]]
    for n, task_id in enumerate(json_tasks):
        team.sdk.patch(f"/curation/tasks/{task_id}", cast_to=object,
                       body={"response": json.dumps({"n": n}), "rating": 5, "gold_star": True})
    assert _requested(team.tick())
    whole, _ = team.build_dataset()
    assert {e["schema"] for e in load_examples(team.db.get(Dataset, whole))} == {"chat_review", "json_extraction"}

    # The launchpad's config: a version of json_extraction gold stars only, recording its filter.
    config = {"ops": {"gold_star_dataset": {"config": {"project_id": DEFAULT_PROJECT,
                                                       "dataset_filter": {"schema_name": "json_extraction"}}}}}
    result = build_gold_star_dataset(team.resources, team.instance, run_config=config)
    assert result.success and all(c.passed for c in result.get_asset_check_evaluations())
    filtered = result.asset_materializations_for_node("gold_star_dataset")[0].metadata["version"].value
    lines = team.all_examples(filtered)
    assert len(lines) == 3 and [json.loads(line["messages"][-1]["content"]) for line in lines]
    assert {e["schema"] for e in load_examples(team.db.get(Dataset, filtered))} == {"json_extraction"}
    shown = _get(team.sdk, f"/datasets/{filtered}")
    assert shown["filter"] == {"schema_name": "json_extraction"} and shown["examples"] == 3
    assert _get(team.sdk, f"/datasets/{whole}")["filter"] is None
    assert not _requested(team.tick())  # a filtered version is a part: the whole one is still the latest

    # A fine-tune of the whole version with a filter trains on the red team's batch only.
    job = team.sdk.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=whole,
                                           extra_body={"dataset_filter": {"batch_metadata": {"team": "red"}}})
    assert job.model_extra["vbatch"]["dataset_filter"] == {"batch_metadata": {"team": "red"}}
    data = team.file_store.fine_tune_dir(job.id) / "data"
    trained = [json.loads(line) for name in ("train.jsonl", "eval.jsonl") if (data / name).exists()
               for line in (data / name).read_text().splitlines()]
    red_prompts = {line["body"]["messages"][0]["content"] for line in red_lines}
    assert {line["messages"][0]["content"] for line in trained} == red_prompts
    with pytest.raises(openai.BadRequestError) as refused:  # a misspelt field would filter nothing: refused
        team.sdk.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=whole,
                                         extra_body={"dataset_filter": {"schema": "json_extraction"}})
    assert "schema" in str(refused.value)
    with pytest.raises(openai.BadRequestError) as refused:
        team.sdk.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=whole,
                                         extra_body={"dataset_filter": {"reviewer": "nobody@example.com"}})
    assert refused.value.body["code"] == "insufficient_examples"


@pytest.mark.stack
def test_the_review_page_edits_rates_stars_and_moves_on_by_keyboard_in_chromium(team):
    from tests.conftest import chromium_browser

    batch_id = team.run_batch(chat_lines(4, prefix="page"))
    tasks = team.tasks(batch_id)
    base = str(team.sdk.base_url).removesuffix("/v1/")
    with chromium_browser() as browser:
        page = browser.new_page(viewport={"width": 1366, "height": 768}, base_url=base)
        problems: list[str] = []
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("response", lambda response: response.status >= 400 and problems.append(
            f"{response.status} {response.url}"))

        page.goto(f"/ui/review?batch_id={batch_id}")
        assert page.get_attribute("#review-form", "data-task") == str(tasks["page-0"])
        assert page.locator("#queue li").count() == 4
        page.fill("#answer", "Edited in the review page.")
        page.keyboard.press("Escape")  # out of the editor: the keys are shortcuts again
        page.keyboard.press("4")
        page.keyboard.press("g")
        page.keyboard.press("Control+Enter")
        page.wait_for_function(f"document.querySelector('#review-form').dataset.task === '{tasks['page-1']}'")
        saved = _get(team.sdk, f"/curation/tasks/{tasks['page-0']}")
        assert (saved["edited_response"], saved["rating"], saved["gold_star"]) == \
            ("Edited in the review page.", 4, True)
        (annotation,) = team.client.tasks.get(str(tasks["page-0"])).annotations  # Label Studio shows the same
        result = annotation["result"] if isinstance(annotation, dict) else annotation.result
        assert {r["from_name"]: r["value"] for r in result}["answer"] == {"text": ["Edited in the review page."]}
        assert page.locator("#queue li").count() == 3  # reviewed: out of the "to review" queue

        page.keyboard.press("n")
        page.wait_for_function(f"document.querySelector('#review-form').dataset.task === '{tasks['page-2']}'")
        page.keyboard.press("p")
        page.wait_for_function(f"document.querySelector('#review-form').dataset.task === '{tasks['page-1']}'")

        # Two more starred from the queue at once.
        page.check(f"#queue input[value='{tasks['page-2']}']")
        page.check(f"#queue input[value='{tasks['page-3']}']")
        page.click("[data-bulk='true']")
        page.wait_for_function("document.querySelectorAll('#queue li').length === 1")
        starred = _get(team.sdk, "/curation/tasks", batch_id=batch_id, gold_star=True)["data"]
        assert [t["id"] for t in starred] == [tasks["page-0"], tasks["page-2"], tasks["page-3"]]
        page.goto("/ui/review?status=gold")
        assert page.locator("#team").is_visible() and page.locator("#queue li").count() >= 3
        assert problems == [], problems


def test_votes_are_each_reviewers_latest_and_a_task_reviewed_before_keeps_its_vote(vbatch_home):
    """In-process: the settle rules without Label Studio (the paths that feed them are tested above)."""
    from tests.conftest import Platform
    from vbatch_pipelines.curation.schemas import Review
    from vbatch_pipelines.curation.service import (
        AnnotationReview,
        add_tasks,
        apply_reviews,
        get_task,
        set_review_policy,
    )
    from vbatch_pipelines.projects import ProjectError
    from vbatch_pipelines.store.models import DEFAULT_PROJECT, CurationTask

    db = Platform().db
    add_tasks(db, [{"batch_id": "batch_x", "custom_id": f"r-{i}", "schema": "chat_review", "model": "m",
                    "messages": [{"role": "user", "content": f"q{i}"}], "response": "draft", "ls_project_id": 1,
                    "ls_task_id": 70 + i} for i in range(2)])
    set_review_policy(db, DEFAULT_PROJECT, annotations_per_task=3, gold_star_agreement=2)
    star, plain = Review(None, 5, True), Review(None, 2, False)
    apply_reviews(db, 70, [AnnotationReview(1, "ann", star, "2026-12-05T10:00:00.000000Z")])
    assert get_task(db, 70).gold_star is False  # one vote of the two needed
    apply_reviews(db, 70, [AnnotationReview(2, "ann", plain, "2026-12-05T10:01:00.000000Z"),
                           AnnotationReview(3, "ben", star, "2026-12-05T10:02:00.000000Z")])
    task = get_task(db, 70)
    assert (task.gold_votes, task.reviews, task.gold_star) == (1, 2, False)  # ann's latest says no: one vote
    apply_reviews(db, 70, [AnnotationReview(4, "cal", star, "2026-12-05T10:03:00.000000Z")])
    task = get_task(db, 70)
    assert (task.gold_votes, task.reviews, task.gold_star, task.agreement) == (2, 3, True, 0.6667)
    # A late webhook event older than what is recorded for that annotation changes nothing.
    assert not apply_reviews(db, 70, [AnnotationReview(4, "cal", plain, "2026-12-05T09:00:00.000000Z")],
                             only_if_newer=True)
    # Lowering k settles the project's tasks again; k > N is refused and nothing changes.
    with pytest.raises(ProjectError):
        set_review_policy(db, DEFAULT_PROJECT, gold_star_agreement=4)
    set_review_policy(db, DEFAULT_PROJECT, annotations_per_task=1, gold_star_agreement=1)
    assert get_task(db, 70).gold_star is True

    # A task reviewed before each annotation was kept (an upgraded home): its review counts as one vote.
    with db.session() as session:
        old = session.query(CurationTask).filter_by(ls_task_id=71).one()
        old.annotated, old.gold_star, old.annotation_id, old.reviewer, old.reviews, old.gold_votes = \
            True, True, 900, "old-expert", 1, 1
    set_review_policy(db, DEFAULT_PROJECT, annotations_per_task=2, gold_star_agreement=2)
    apply_reviews(db, 71, [AnnotationReview(901, "new-expert", star, "2026-12-05T11:00:00.000000Z")])
    task = get_task(db, 71)
    assert (task.reviews, task.gold_votes, task.gold_star) == (2, 2, True)
