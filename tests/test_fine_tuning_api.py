"""The fine-tuning loop as a user drives it: gold stars become a dataset version, the official openai SDK
creates a fine-tuning job on it, `vbatch up`'s Dagster trains, compares and deploys the adapter into the
warm vLLM server without restarting it, and a batch on the fine-tuned model answers differently."""

from __future__ import annotations

import io
import json
import time

import httpx
import openai
import pytest

from tests.conftest import chat_line, jsonl, platform_of
from tests.test_fine_tuning import FAST, build_dataset, example, record_gold_stars
from vbatch_pipelines.models.registry import TINY_MODEL_ID

pytestmark = [pytest.mark.stack, pytest.mark.vllm]
TERMINAL = ("succeeded", "failed", "cancelled")


@pytest.fixture()
def ft_stack(default_stack):
    with platform_of(default_stack) as platform:
        default_stack.platform = platform
        yield default_stack


def wait_job(client: openai.OpenAI, job_id: str, statuses=TERMINAL, timeout: float = 400):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    raise AssertionError(f"{job_id} still {job.status}")


def run_batch(client: openai.OpenAI, model: str, prompts: list[str]) -> dict[str, str]:
    lines = [chat_line(f"q{i}", prompt, model=model) for i, prompt in enumerate(prompts)]
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(lines))), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    deadline = time.monotonic() + 300
    while batch.status not in ("completed", "failed", "cancelled", "expired") and time.monotonic() < deadline:
        time.sleep(0.3)
        batch = client.batches.retrieve(batch.id)
    assert batch.status == "completed", batch
    content = client.files.content(batch.output_file_id).text
    return {line["custom_id"]: line["response"]["body"]["choices"][0]["message"]["content"]
            for line in map(json.loads, content.splitlines())}


def engine_pid(platform) -> int:
    return platform.resources.inference_engine.server(platform.registry.lookup(None)).state()["pid"]


def test_gold_stars_to_a_deployed_fine_tune_with_the_openai_sdk(ft_stack):
    platform, client = ft_stack.platform, ft_stack.client()
    record_gold_stars(platform, 60)
    dataset = build_dataset(platform)
    assert dataset.train_examples >= 40 and dataset.eval_examples >= 1

    prompts = [f"Capital of France, question {500 + i}?" for i in range(4)]
    base_answers = run_batch(client, TINY_MODEL_ID, prompts)
    pid = engine_pid(platform)

    job = client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=dataset.version, suffix="paris",
                                         seed=7, hyperparameters=FAST, metadata={"team": "geo"})
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.hyperparameters.n_epochs == FAST["n_epochs"]
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    name = done.fine_tuned_model
    assert name == f"ft:{TINY_MODEL_ID}:vbatch:paris:{job.id.removeprefix('ftjob-')[:8]}"
    assert done.trained_tokens and done.result_files and done.finished_at
    assert client.files.retrieve(done.result_files[0]).purpose == "fine-tune-results"

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    assert events[0].message == "The job has successfully completed"
    assert any(e.type == "metrics" and "train_loss" in e.data for e in events)
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data
    assert len(checkpoints) == FAST["n_epochs"] and checkpoints[0].step_number > checkpoints[-1].step_number
    assert job.id in [j.id for j in client.fine_tuning.jobs.list(limit=10).data]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "geo"}).data] == [job.id]
    assert client.fine_tuning.jobs.list(metadata={"team": "other"}).data == []

    # Deployed into the warm engine: listed with its base as parent, served by the same vLLM process.
    listed = {m.id: m for m in client.models.list().data}
    assert listed[name].parent == TINY_MODEL_ID and listed[name].root == TINY_MODEL_ID
    assert engine_pid(platform) == pid, "the engine was restarted"
    tuned_answers = run_batch(client, name, prompts)
    assert tuned_answers != base_answers, "the LoRA adapter did not change the answers"
    assert engine_pid(platform) == pid
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": prompts[0]}],
                                          max_tokens=12, temperature=0)
    assert chat.model == name and chat.choices[0].message.content == tuned_answers["q0"]

    comparison = httpx.get(f"{ft_stack.api_url}/v1/fine_tuning/jobs/{job.id}/comparison", timeout=10).json()
    assert comparison["examples"] == dataset.eval_examples
    assert set(comparison["base"]) >= {"exact_match", "normalized_match", "mean_length"}
    assert len(comparison["rows"]) == dataset.eval_examples and comparison["fine_tuned_model"] == name
    assert comparison["fine_tuned"]["normalized_match"] > comparison["base"]["normalized_match"], comparison

    # A restarted engine serves the deployed fine-tune from its first start (--lora-modules).
    server = platform.resources.inference_engine.server(platform.registry.lookup(None))
    server.stop()
    again = client.with_options(max_retries=5).chat.completions.create(
        model=name, messages=[{"role": "user", "content": prompts[0]}], max_tokens=12, temperature=0)
    assert again.choices[0].message.content == tuned_answers["q0"]
    pid = engine_pid(platform)
    assert any(name in arg for arg in server.state()["argv"])

    # Undeploy: gone from the list and the engine, still the same engine process.
    assert client.models.delete(name).deleted
    assert name not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert engine_pid(platform) == pid


def test_cancel_a_running_fine_tune_and_the_gpu_slot_is_freed(ft_stack):
    platform, client = ft_stack.platform, ft_stack.client()
    record_gold_stars(platform, 30, start=1000)
    dataset = build_dataset(platform)
    job = client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=dataset.version,
                                         hyperparameters={**FAST, "n_epochs": 200, "batch_size": 1})
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id, limit=5).data):
            break
        time.sleep(0.5)
    else:
        pytest.fail("the job never started training")
    cancelled = client.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    with pytest.raises(openai.APIStatusError) as again:
        client.fine_tuning.jobs.cancel(job.id)
    assert again.value.status_code == 409
    # The run ends, the gpu slot is free again: a batch runs to the end.
    assert run_batch(client, TINY_MODEL_ID, ["after the cancel"])
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None


def test_bad_training_data_gets_a_clear_error(ft_stack):
    client = ft_stack.client()
    few = client.files.create(file=("few.jsonl", io.BytesIO(jsonl([example(i) for i in range(3)]))),
                              purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as small:
        client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=few.id)
    assert "at least 10" in small.value.message and small.value.code == "insufficient_examples"
    broken = client.files.create(file=("bad.jsonl", io.BytesIO(b'{"messages": []}\n' * 12)), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as malformed:
        client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=broken.id)
    assert "line 1:" in malformed.value.message and malformed.value.param == "training_file"
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="no-such-model", training_file=few.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-missing")
    assert client.fine_tuning.jobs.list(limit=100).data is not None


def test_dpo_on_expert_replacements_with_the_openai_sdk(ft_stack):
    """Experts replaced the model's answers: a DPO job on those pairs (OpenAI's preference format, uploaded) makes
    the fine-tune prefer the experts' answers on held-out prompts, and the served fine-tune stops giving the answers
    they replaced."""
    from tests.test_preferences import PROMPTS, chosen, preference_line
    from vbatch_pipelines.fine_tuning.comparison import normalize, similarity

    client = ft_stack.client()
    prompts = [prompt for _, prompt in PROMPTS]
    served = run_batch(client, TINY_MODEL_ID, prompts)
    lines = [preference_line(prompt, chosen(subject), served[f"q{i}"]) for i, (subject, prompt) in enumerate(PROMPTS)]
    held_out = list(range(0, len(lines), 6))  # one verb of each subject
    train = client.files.create(file=("pairs.jsonl", io.BytesIO(jsonl(
        [line for i, line in enumerate(lines) if i not in held_out]))), purpose="fine-tune")
    validation = client.files.create(file=("held-out.jsonl", io.BytesIO(jsonl([lines[i] for i in held_out]))),
                                     purpose="fine-tune")

    job = client.fine_tuning.jobs.create(
        model=TINY_MODEL_ID, training_file=train.id, validation_file=validation.id, suffix="dpo", seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "n_epochs": 5, "batch_size": 4,
                                                           "learning_rate_multiplier": 5}}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.1
    done = wait_job(client, job.id)
    assert done.status == "succeeded", done.error
    comparison = httpx.get(f"{ft_stack.api_url}/v1/fine_tuning/jobs/{job.id}/comparison", timeout=10).json()
    accuracy = (comparison["base"]["preference_accuracy"], comparison["fine_tuned"]["preference_accuracy"])
    assert accuracy[1] > accuracy[0], comparison

    # The served fine-tune, asked the held-out prompts through the SDK, answers less like the replaced answers.
    held_prompts = [prompts[i] for i in held_out]
    tuned = run_batch(client, done.fine_tuned_model, held_prompts)
    base = {f"q{k}": served[f"q{i}"] for k, i in enumerate(held_out)}

    def closer(answers: dict[str, str]) -> int:
        return sum(similarity(answers[f"q{k}"], chosen(PROMPTS[i][0])) > similarity(answers[f"q{k}"], served[f"q{i}"])
                   for k, i in enumerate(held_out))

    replaced = sum(normalize(tuned[f"q{k}"]) == normalize(served[f"q{i}"]) for k, i in enumerate(held_out))
    assert closer(tuned) > closer(base) == 0 and replaced < len(held_out), (tuned, base)
    print(f"\nDPO through the SDK: held-out preference accuracy {accuracy[0]} -> {accuracy[1]}; of {len(held_out)} "
          f"held-out answers, closer to the chosen: {closer(base)} -> {closer(tuned)}, still the replaced answer: "
          f"{len(held_out)} -> {replaced}")


def test_bad_preference_files_and_methods_get_a_clear_400(ft_stack):
    from tests.test_preferences import preference_line

    client = ft_stack.client()
    before = [j.id for j in client.fine_tuning.jobs.list(limit=100).data]
    good = [preference_line(f"Question {i}?", "The right answer.", f"A wrong answer {i}.") for i in range(12)]
    bad = good[:1] + [{**good[1], "preferred_output": [{"role": "user", "content": "x"}]}] + good[2:]
    broken = client.files.create(file=("bad.jsonl", io.BytesIO(jsonl(bad))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as refused:
        client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=broken.id, method={"type": "dpo"})
    assert "line 2: preferred_output[0].role must be assistant" in refused.value.message
    assert refused.value.param == "training_file"
    same = good[:3] + [preference_line("Q?", "Same.", " Same. ")] + good[3:]
    identical = client.files.create(file=("same.jsonl", io.BytesIO(jsonl(same))), purpose="fine-tune")
    with pytest.raises(openai.BadRequestError) as twins:
        client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=identical.id, method={"type": "dpo"})
    assert "line 4:" in twins.value.message and "same answer" in twins.value.message
    fine = client.files.create(file=("good.jsonl", io.BytesIO(jsonl(good))), purpose="fine-tune")
    for method, param in (({"type": "reinforcement"}, "method.type"),
                          ({"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}}, "method.dpo"),
                          ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}, "hyperparameters.beta"),
                          ({"type": "dpo", "dpo": {"hyperparameters": {"temperature": 1}}}, "hyperparameters.temperature")):
        with pytest.raises(openai.BadRequestError) as wrong:
            client.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=fine.id, method=method)
        assert wrong.value.param == param, (method, wrong.value.message)
    assert [j.id for j in client.fine_tuning.jobs.list(limit=100).data] == before, "nothing refused was queued"
