"""Preference fine-tuning in process: pairs from expert edits and ratings, the versioned preference dataset and
its checks, DPO jobs refused on bad files and methods, and a DPO job on the tiny model (TRL's DPOTrainer + PEFT
through Dagster Pipes) that makes the fine-tune prefer, and answer more like, the experts' answers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import chat_line, jsonl
from tests.test_fine_tuning import create, run_job, upload
from vbatch_pipelines.models.registry import TINY_MODEL_ID

SUBJECTS = ["the sky", "a cat", "the ocean", "my garden", "a robot", "the city", "an old book", "the mountain",
            "a river", "the market", "a violin", "the desert", "a lighthouse"]
VERBS = ["describe", "summarize", "explain", "praise", "criticize", "imagine"]
PROMPTS = [(subject, f"Please {verb} {subject}.") for subject in SUBJECTS for verb in VERBS]


def chosen(subject: str) -> str:
    """What the experts want: the corpus' own phrasing with two adjectives the tiny model rarely picks."""
    return f"{subject.capitalize()} is gentle and vast."


def task_row(i: int, prompt: str, response: str, **extra) -> dict:
    return {"batch_id": "batch_pref", "custom_id": f"p-{i}", "schema": "chat_review", "model": TINY_MODEL_ID,
            "messages": [{"role": "user", "content": prompt}], "response": response, "ls_project_id": 1,
            "ls_task_id": 50_000 + i, **extra}


def review(platform, rows: list[dict], reviews: list) -> None:
    """What the Label Studio sensor records when experts edit and rate answers (that path has its own tests)."""
    from tests.conftest import record_review
    from vbatch_pipelines.curation.service import add_tasks

    add_tasks(platform.db, rows)
    for row, given in zip(rows, reviews):
        if given is not None:
            record_review(platform.db, row["ls_task_id"], given)


def build(platform):
    """The dataset job's two assets with all their checks, as the Label Studio sensor runs it."""
    from dagster import DagsterInstance, materialize

    from vbatch_pipelines.defs.curation import DATASET_CHECKS, gold_star_dataset, preference_dataset

    result = materialize([gold_star_dataset, preference_dataset, *DATASET_CHECKS], resources=platform.resources,
                         instance=DagsterInstance.ephemeral())
    assert result.success
    return result


def pairs_in(result) -> dict:
    return result.asset_materializations_for_node("preference_dataset")[0].metadata


def test_pairs_come_from_edits_beyond_whitespace_and_from_ratings(platform):
    from vbatch_pipelines.curation.schemas import Review
    from vbatch_pipelines.curation.service import latest_dataset
    from vbatch_pipelines.store.models import PREFERENCE, SFT

    platform.db.upgrade()
    rows = [task_row(0, "Please describe the sky.", "The sky is quiet and quiet."),  # edited: a pair
            task_row(1, "Please describe a cat.", "A cat is blue."),  # edited in whitespace only: no pair
            task_row(2, "Please praise a river.", "A river is busy."),  # rated 2
            task_row(3, "Please praise a river.", "A river is vast and gentle.", batch_id="batch_pref_2"),  # rated 5
            task_row(4, "Please explain a robot.", "A robot is small.")]  # starred as it is: no pair
    review(platform, rows, [Review(answer="The sky is gentle and vast.", rating=None, gold_star=True),
                            Review(answer="  A cat is\n blue. ", rating=None, gold_star=False),
                            Review(answer=None, rating=2, gold_star=False),
                            Review(answer=None, rating=5, gold_star=True),
                            Review(answer=None, rating=None, gold_star=True)])
    result = build(platform)
    metadata = pairs_in(result)
    assert metadata["pairs"].value == 2, metadata
    assert metadata["by_source"].value == {"edit": 1, "rating": 1}
    checks = {e.check_name: e.passed
              for e in result.get_asset_check_evaluations() if e.asset_key.to_user_string() == "preference_dataset"}
    assert checks == {"no_identical_pairs": True, "valid_pair_structure": True, "pairs_train_eval_disjoint": True}

    version = latest_dataset(platform.db, kind=PREFERENCE)
    assert version.kind == PREFERENCE and latest_dataset(platform.db, kind=SFT).version != version.version
    directory = Path(version.path)
    lines = [json.loads(x) for split in ("train", "eval")
             for x in (directory / f"{split}.openai.jsonl").read_text().splitlines()]
    by_prompt = {line["input"]["messages"][-1]["content"]: line for line in lines}
    assert by_prompt["Please describe the sky."]["preferred_output"] == [
        {"role": "assistant", "content": "The sky is gentle and vast."}]
    assert by_prompt["Please describe the sky."]["non_preferred_output"][0]["content"] == "The sky is quiet and quiet."
    assert by_prompt["Please praise a river."]["preferred_output"][0]["content"] == "A river is vast and gentle."
    assert by_prompt["Please praise a river."]["non_preferred_output"][0]["content"] == "A river is busy."
    trl = [json.loads(x) for split in ("train", "eval") for x in (directory / f"{split}.trl.jsonl").read_text().splitlines()]
    assert sorted(t["chosen"][0]["content"] for t in trl) == ["A river is vast and gentle.", "The sky is gentle and vast."]
    assert all(set(t) == {"prompt", "chosen", "rejected"} and t["prompt"][-1]["role"] == "user" for t in trl)

    # The API lists both kinds, one kind on request, and serves a preference version's exports.

    from api.main import create_app
    from tests.conftest import api_client
    from vbatch_pipelines.settings import load_settings

    with api_client(create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}))) as client:
        listed = client.get("/v1/datasets").json()["data"]
        assert {(d["version"], d["kind"]) for d in listed} == {(version.version, "preference"),
                                                               (latest_dataset(platform.db, kind=SFT).version, "sft")}
        only = client.get("/v1/datasets", params={"kind": "preference"}).json()["data"]
        assert [d["version"] for d in only] == [version.version] and only[0]["formats"] == ["openai", "trl"]
        assert client.get("/v1/datasets", params={"kind": "dpo"}).json()["error"]["param"] == "kind"
        split = "train" if version.train_examples else "eval"
        download = client.get(f"/v1/datasets/{version.version}/export", params={"format": "trl", "split": split})
        assert download.status_code == 200 and set(json.loads(download.text.splitlines()[0])) == {
            "prompt", "chosen", "rejected"}
        wrong = client.get(f"/v1/datasets/{version.version}/export", params={"format": "alpaca", "split": split})
        assert wrong.status_code == 400 and "for a preference dataset" in wrong.json()["error"]["message"]

    # Nothing changed: no new version. A later review reversing a preference replaces the earlier pair.
    assert pairs_in(build(platform))["new_version"].value is False
    assert latest_dataset(platform.db, kind=PREFERENCE).version == version.version
    from tests.conftest import record_review

    record_review(platform.db, 50_002, Review(answer=None, rating=5, gold_star=False))
    record_review(platform.db, 50_003, Review(answer=None, rating=1, gold_star=False))
    again = pairs_in(build(platform))
    assert again["new_version"].value is True and again["pairs"].value == 2
    newer = latest_dataset(platform.db, kind=PREFERENCE)
    pairs = [json.loads(x) for split in ("train", "eval")
             for x in (Path(newer.path) / f"{split}.trl.jsonl").read_text().splitlines()]
    river = [p for p in pairs if p["prompt"][-1]["content"] == "Please praise a river."]
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in river] == [
        ("A river is busy.", "A river is vast and gentle.")]


def _corrupt(path: Path, change) -> None:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(line) + "\n" for line in change(lines)))


PREFERENCE_CORRUPTIONS = {
    "identical_pairs": lambda train, eval_: _corrupt(train, lambda lines: [
        {**lines[0], "non_preferred_output": [{"role": "assistant",
                                              "content": " " + lines[0]["preferred_output"][0]["content"]}]},
        *lines[1:]]),
    "pair_structure": lambda train, eval_: _corrupt(train, lambda lines: [
        {"input": lines[0]["input"], "preferred_output": lines[0]["preferred_output"]}, *lines[1:]]),
    "split_leak": lambda train, eval_: _corrupt(eval_, lambda lines: lines + [
        json.loads(train.read_text().splitlines()[0])]),
}


@pytest.mark.parametrize("check", sorted(PREFERENCE_CORRUPTIONS))
def test_each_preference_check_fails_on_the_corruption_it_exists_for(platform, check):
    from vbatch_pipelines.curation.preferences import check_preference_dataset
    from vbatch_pipelines.curation.schemas import Review
    from vbatch_pipelines.store.models import Dataset

    platform.db.upgrade()
    rows = [task_row(i, prompt, f"{subject.capitalize()} is quiet.") for i, (subject, prompt) in enumerate(PROMPTS)]
    review(platform, rows, [Review(answer=chosen(subject), rating=None, gold_star=True) for subject, _ in PROMPTS])
    build(platform)
    version, found = check_preference_dataset(platform.db, None, check)
    assert version and found == [], found
    directory = Path(platform.db.get(Dataset, version).path)
    PREFERENCE_CORRUPTIONS[check](directory / "train.openai.jsonl", directory / "eval.openai.jsonl")
    _, found = check_preference_dataset(platform.db, None, check)
    assert found, f"{check} did not see the corruption"
    others = [name for name in PREFERENCE_CORRUPTIONS if name != check and check_preference_dataset(
        platform.db, None, name)[1]]
    assert others == [], f"{check}'s corruption also failed {others}"


def preference_line(prompt: str, good: str, bad: str) -> dict:
    return {"input": {"messages": [{"role": "user", "content": prompt}]},
            "preferred_output": [{"role": "assistant", "content": good}],
            "non_preferred_output": [{"role": "assistant", "content": bad}]}


def test_bad_preference_files_and_methods_are_refused_naming_the_line_or_field(platform):
    from vbatch_pipelines.fine_tuning import FineTuningError

    platform.db.upgrade()
    good = [preference_line(f"Please describe {s}.", chosen(s), f"{s} is quiet.") for s, _ in PROMPTS[:12]]
    cases = {
        "missing field": (good[:3] + [{k: v for k, v in good[3].items() if k != "non_preferred_output"}] + good[4:],
                          "line 4: non_preferred_output"),
        "identical": (good[:5] + [preference_line("Hi?", "Same answer.", "Same   answer. ")] + good[5:],
                      "line 6: preferred_output and non_preferred_output are the same answer"),
        "prompt ends with the assistant": (
            [{**good[0], "input": {"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}]}}] + good[1:],
            "line 1: input.messages must end with a user"),
        "a chat file": ([{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 12,
                        "line 1: input.messages"),
    }
    for name, (lines, expected) in cases.items():
        with pytest.raises(FineTuningError) as refused:
            create(platform, training_file=upload(platform, lines).id, method="dpo")
        assert expected in str(refused.value) and refused.value.param == "training_file", (name, str(refused.value))

    # A preference file is not a supervised job's, nor a preference dataset version; DPO's knobs are DPO's only.
    preferences = upload(platform, good)
    with pytest.raises(FineTuningError) as supervised:
        create(platform, training_file=preferences.id)
    assert "line 1:" in str(supervised.value) and "messages" in str(supervised.value)
    with pytest.raises(FineTuningError) as beta:
        create(platform, training_file=preferences.id, hyperparameters={"beta": 0.2})
    assert beta.value.param == "hyperparameters.beta"
    with pytest.raises(FineTuningError) as bad_beta:
        create(platform, training_file=preferences.id, method="dpo", hyperparameters={"beta": -1})
    assert bad_beta.value.param == "hyperparameters.beta"
    with pytest.raises(FineTuningError) as method:
        create(platform, training_file=preferences.id, method="reinforcement")
    assert method.value.param == "method.type"
    job = create(platform, training_file=preferences.id, method="dpo", hyperparameters={"beta": 0.25})
    assert job.method_type == "dpo" and job.hyperparameters["beta"] == 0.25
    assert job.to_openai()["method"] == {"type": "dpo", "dpo": {"hyperparameters": {
        "n_epochs": 3, "batch_size": 1, "learning_rate_multiplier": 1.0, "beta": 0.25}}}
    data = [json.loads(x) for x in (Path(job.output_dir) / "data" / "train.jsonl").read_text().splitlines()]
    assert data[0] == {"prompt": good[0]["input"]["messages"], "chosen": good[0]["preferred_output"],
                       "rejected": good[0]["non_preferred_output"]}, "the trainer reads TRL's format"


def test_dataset_kinds_and_methods_must_match(platform):
    from vbatch_pipelines.curation.schemas import Review
    from vbatch_pipelines.curation.service import latest_dataset
    from vbatch_pipelines.fine_tuning import FineTuningError
    from vbatch_pipelines.store.models import PREFERENCE, SFT

    platform.db.upgrade()
    rows = [task_row(i, prompt, f"{subject.capitalize()} is quiet.") for i, (subject, prompt) in enumerate(PROMPTS)]
    review(platform, rows, [Review(answer=chosen(subject), rating=None, gold_star=True) for subject, _ in PROMPTS])
    build(platform)
    gold, pairs = latest_dataset(platform.db, kind=SFT), latest_dataset(platform.db, kind=PREFERENCE)
    with pytest.raises(FineTuningError) as sft_on_pairs:
        create(platform, training_file=pairs.version)
    assert "preference dataset" in str(sft_on_pairs.value) and '"dpo"' in str(sft_on_pairs.value)
    with pytest.raises(FineTuningError) as dpo_on_gold:
        create(platform, training_file=gold.version, method="dpo")
    assert "sft dataset" in str(dpo_on_gold.value) and '"supervised"' in str(dpo_on_gold.value)
    job = create(platform, training_file=pairs.version, method="dpo")
    assert job.dataset_version == pairs.version
    assert json.loads((Path(job.output_dir) / "data" / "train.jsonl").read_text().splitlines()[0]).keys() == {
        "prompt", "chosen", "rejected"}


def base_answers(platform) -> dict[str, str]:
    batch = platform.submit(jsonl([chat_line(f"q{i}", prompt, max_tokens=16) for i, (_, prompt) in
                                   enumerate(PROMPTS)]))
    assert platform.materialize(batch.id).success
    out, _ = platform.results(batch.id)
    return {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"] for line in out}


def test_dpo_on_expert_edits_raises_preference_accuracy_and_moves_answers_to_the_chosen(platform):
    """Experts replaced the tiny model's answers with their own: DPO on those pairs makes the fine-tune find the
    chosen answers likelier than the rejected ones on held-out prompts, and answer less like the rejected ones; a
    second DPO job continues that fine-tune (``ft:``) with the chosen answers' loss added, and says them."""
    from vbatch_pipelines.curation.schemas import Review
    from vbatch_pipelines.curation.service import latest_dataset
    from vbatch_pipelines.fine_tuning.service import get_job
    from vbatch_pipelines.store.models import PREFERENCE

    platform.db.upgrade()
    answers = base_answers(platform)
    rows = [task_row(i, prompt, answers[f"q{i}"]) for i, (_, prompt) in enumerate(PROMPTS)]
    review(platform, rows, [Review(answer=chosen(subject), rating=None, gold_star=False) for subject, _ in PROMPTS])
    build(platform)
    pairs = latest_dataset(platform.db, kind=PREFERENCE)
    assert pairs.eval_examples >= 4 and pairs.counts["by_source"] == {"edit": pairs.examples}

    job = create(platform, training_file=pairs.version, method="dpo", suffix="dpo", seed=3,
                 hyperparameters={"n_epochs": 5, "learning_rate": 1e-3, "batch_size": 4, "beta": 0.1})
    assert run_job(platform, job.id).success
    done = get_job(platform.db, job.id)
    assert done.status == "succeeded", done.error
    accuracy = done.metrics["preference_accuracy"]
    assert accuracy["fine_tuned"] > accuracy["base"], accuracy
    comparison = done.comparison
    assert comparison["examples"] == pairs.eval_examples
    assert comparison["fine_tuned"]["preference_accuracy"] == accuracy["fine_tuned"]
    assert comparison["fine_tuned"]["closer_to_chosen"] > comparison["base"]["closer_to_chosen"], comparison
    assert comparison["fine_tuned"]["rejected_match"] < comparison["base"]["rejected_match"], comparison
    print(f"\nDPO: preference accuracy {accuracy['base']} -> {accuracy['fine_tuned']}; closer to chosen "
          f"{comparison['base']['closer_to_chosen']} -> {comparison['fine_tuned']['closer_to_chosen']}; rejected "
          f"match {comparison['base']['rejected_match']} -> {comparison['fine_tuned']['rejected_match']}")
    assert done.deployed and done.fine_tuned_model in platform.registry.served_models()
    from vbatch_pipelines.fine_tuning.service import list_checkpoints

    checkpoints, _ = list_checkpoints(platform.db, job.id, after=None, limit=100)
    assert len(checkpoints) == 5, "an adapter per epoch, as a supervised job saves"
    assert all(not (Path(c.path) / "ref").exists() for c in checkpoints), "the reference copy is not saved"

    # Continue that fine-tune: its adapter trained further, compared with it, one adapter on the same base.
    more = create(platform, training_file=pairs.version, method="dpo", suffix="dpo2", seed=3,
                  model=done.fine_tuned_model,
                  hyperparameters={"n_epochs": 5, "learning_rate": 1e-3, "batch_size": 4, "sft_weight": 1.0})
    assert more.starting_model == done.fine_tuned_model and more.model == TINY_MODEL_ID
    assert more.to_openai()["model"] == done.fine_tuned_model
    assert run_job(platform, more.id).success
    second = get_job(platform.db, more.id)
    assert second.status == "succeeded", second.error
    assert second.comparison["base_model"] == done.fine_tuned_model
    assert second.comparison["base"]["closer_to_chosen"] == comparison["fine_tuned"]["closer_to_chosen"]
    assert second.comparison["fine_tuned"]["normalized_match"] > comparison["fine_tuned"]["normalized_match"]
    print(f"continued with sft_weight 1: chosen answers matched {comparison['fine_tuned']['normalized_match']} -> "
          f"{second.comparison['fine_tuned']['normalized_match']}")
    assert platform.registry.served_models()[second.fine_tuned_model].parent == TINY_MODEL_ID
    adapter = Path(second.metrics["adapter_dir"])
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "ref").exists(), \
        "one adapter on the base: the frozen reference copy is not part of it"
