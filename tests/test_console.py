"""The web console (issue 17): server-rendered pages on the API's port, the API's roles, live progress.
The browser tests drive Debian's chromium with Playwright against a running platform."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import api_client, chat_lines, chromium_browser, jsonl, platform_of, running_stack

USE_KEY, ADMIN_KEY = "console-use-key", "console-admin-key"
ARTIFACTS = Path(os.environ.get("VBATCH_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / ".artifacts"))


def _app(**changes):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    return create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, **changes))


def test_the_console_asks_for_a_key_when_keys_are_set_and_keeps_it_in_a_strict_cookie(vbatch_home):
    with api_client(_app(api={"keys": (USE_KEY,), "admin_keys": (ADMIN_KEY,)}), follow_redirects=False) as client:
        for page in ("/ui", "/ui/batches", "/ui/batches/batch_x", "/ui/files/file-x"):
            refused = client.get(page)
            assert refused.status_code == 303 and refused.headers["location"].startswith("/ui/login?next=")
        wrong = client.post("/ui/login", data={"key": "not-a-key", "next": "/ui/batches"})
        assert wrong.status_code == 303 and "error=" in wrong.headers["location"] and "set-cookie" not in wrong.headers
        # a login link cannot send anyone off the console
        assert client.post("/ui/login", data={"key": USE_KEY, "next": "//evil.example"}).headers["location"] == "/ui"
        logged_in = client.post("/ui/login", data={"key": USE_KEY, "next": "/ui/batches"})
        assert logged_in.headers["location"] == "/ui/batches"
        cookie = logged_in.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie and "path=/ui" in cookie
        assert client.get("/ui/batches").status_code == 200
        assert client.get("/v1/batches").status_code == 401  # the console's cookie is not an API key


def test_the_dashboard_and_batch_pages_show_what_the_api_says(platform):
    from vbatch_pipelines.batch.service import update_batch, validate_input

    batch = platform.submit(jsonl(chat_lines(4, prefix="ui")))
    validate_input(platform.db, batch, platform.file_store.batch_dir(batch.id), lambda name: "vbatch-tiny-chat")
    update_batch(platform.db, batch.id, request_completed=3, request_failed=1)
    from vbatch_pipelines.store.models import CurationTask

    with platform.db.session() as session:
        session.add(CurationTask(batch_id=batch.id, custom_id="ui-0", schema="chat", messages=[], response="r",
                                 annotated=True, gold_star=True, created_at=int(time.time()),
                                 reviewed_at=int(time.time())))
    bad = platform.submit(b'{"custom_id": "x"}\nnot json\n')
    validate_input(platform.db, bad, platform.file_store.batch_dir(bad.id), lambda name: "vbatch-tiny-chat")
    with api_client(_app()) as client:
        dashboard = client.get("/ui").text
        assert 'data-metric="batches-in_progress">1<' in dashboard and 'data-metric="batches-failed">1<' in dashboard
        assert 'data-metric="gold-stars">1<' in dashboard and '<svg class="chart"' in dashboard
        listing = client.get("/ui/batches?status=in_progress").text
        assert batch.id in listing and bad.id not in listing
        assert batch.id in client.get("/ui/batches?after=batch_gone").text  # a stale page link starts over
        page = client.get(f"/ui/batches/{batch.id}").text
        assert "3 completed, 1 failed of 4" in page and 'data-refresh="/ui/batches/' in page
        failed = client.get(f"/ui/batches/{bad.id}").text
        assert "invalid_json" in failed and "data-refresh" not in failed  # ended: nothing polls
        refused = client.post("/ui/batches", data={"endpoint": "/v1/images"},
                              files={"file": ("in.jsonl", jsonl(chat_lines(2, prefix="x")))}, follow_redirects=True)
        assert "endpoint must be one of" in refused.text and 'id="form-error"' in refused.text
        unknown = client.post("/ui/batches", data={"endpoint": "/v1/chat/completions", "schema": "nope"},
                              files={"file": ("in.jsonl", jsonl(chat_lines(2, prefix="x")))}, follow_redirects=True)
        assert "Unknown task schema &#39;nope&#39;" in unknown.text and 'id="form-error"' in unknown.text
        assert '<option value="json_extraction">' in client.get("/ui/batches/new").text
        chosen = client.post("/ui/batches", data={"endpoint": "/v1/chat/completions", "schema": "json_extraction"},
                             files={"file": ("in.jsonl", jsonl(chat_lines(2, prefix="x")))}, follow_redirects=False)
        created = platform.batch(chosen.headers["location"].rsplit("/", 1)[1])
        assert created.metadata_ == {"curation_schema": "json_extraction"}
        assert client.get("/ui/batches/batch_nope").status_code == 200  # says so, with a way back
        assert "There is no batch batch_nope" in client.get("/ui/batches/batch_nope").text
        cancelled = client.post(f"/ui/batches/{batch.id}/cancel", follow_redirects=False)
        assert cancelled.status_code == 303
        assert platform.batch(batch.id).status in ("cancelling", "cancelled")


@pytest.fixture(scope="module")
def browser():
    with chromium_browser() as browser:
        yield browser


def _watched_page(browser, base_url: str):
    """A page at laptop size whose console errors and failed requests are collected."""
    page = browser.new_page(viewport={"width": 1366, "height": 768}, base_url=base_url)
    page.problems = []
    page.on("console", lambda message: message.type == "error" and page.problems.append(message.text))
    page.on("pageerror", lambda error: page.problems.append(str(error)))
    page.on("response", lambda response: response.status >= 400 and page.problems.append(
        f"{response.status} {response.url}"))
    return page


@pytest.fixture(scope="module")
def console_stack(tmp_path_factory, tiny_model_path):
    """`vbatch up` with a use key and an admin key, the vLLM engine serving the tiny model."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_stack(tmp_path_factory.mktemp("console-home"), tiny_model_path, VBATCH_CURATION="off",
                       VBATCH_RETRAIN_CRON="off", VBATCH_API_KEYS=USE_KEY, VBATCH_ADMIN_KEYS=ADMIN_KEY) as stack:
        yield stack


def _log_in(page, path: str, key: str) -> None:
    page.goto(path)
    assert "/ui/login" in page.url
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{path}")


@pytest.mark.stack
@pytest.mark.vllm
def test_in_a_browser_a_user_logs_in_watches_a_batch_complete_and_downloads_it(browser, console_stack, tmp_path):
    stack = console_stack
    client = stack.client(api_key=USE_KEY)
    requests = tmp_path / "requests.jsonl"
    lines = chat_lines(30, prefix="web")
    for line in lines:
        line["body"].pop("model", None)  # the form's model picker fills it in
    requests.write_text(jsonl(lines).decode())

    page = _watched_page(browser, stack.api_url)
    _log_in(page, "/ui/batches/new", USE_KEY)
    page.set_input_files("#file", str(requests))
    page.select_option("#model", "vbatch-tiny-chat")
    page.click("#create")
    page.wait_for_selector("#batch-status")
    batch = client.batches.retrieve(page.url.rstrip("/").rsplit("/", 1)[1])
    page.wait_for_function("document.querySelector('#batch-status').textContent.trim() === 'completed'",
                           timeout=240_000)
    page.screenshot(path=str(ARTIFACTS / "console-batch.png"), full_page=True)
    with page.expect_download() as download:
        page.click("#download-output")
    lines = Path(download.value.path()).read_text().splitlines()
    assert sorted(json.loads(line)["custom_id"] for line in lines) == sorted(f"web-{i}" for i in range(30))

    page.goto("/ui")
    api_completed = sum(1 for b in client.batches.list(limit=100) if b.status == "completed")
    assert page.text_content('[data-metric="batches-completed"]').strip() == str(api_completed)
    today = page.text_content('[data-metric="today-requests-vbatch-tiny-chat"]').strip()
    assert today == "30"
    page.screenshot(path=str(ARTIFACTS / "console-dashboard.png"), full_page=True)
    page.goto("/ui/models")
    page.fill("#chat-input", "Hello there")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-output').textContent.trim().length > 0", timeout=60_000)
    assert not page.get_attribute("#chat-output", "class")  # an answer, not an error
    assert page.query_selector("#install-form") is None  # a use key sees no admin action
    page.screenshot(path=str(ARTIFACTS / "console-models.png"), full_page=True)
    page.goto("/ui/batches")
    assert batch.id in page.content()
    for path in ("/ui/models", "/ui/datasets", "/ui/fine-tunes", "/ui/fine-tunes/new", "/ui/batches/new"):
        page.goto(path)
        page.wait_for_load_state("networkidle")
    assert page.problems == [], page.problems


def _wait_text(page, selector: str, wanted: tuple[str, ...], timeout_s: float) -> str:
    """Wait for the live page (no reload) to show one of ``wanted`` in ``selector``."""
    page.wait_for_function("([selector, wanted]) => { const e = document.querySelector(selector); "
                           "return e && wanted.includes(e.textContent.trim()); }", arg=[selector, list(wanted)],
                           timeout=timeout_s * 1000)
    return page.text_content(selector).strip()


@pytest.mark.stack
@pytest.mark.vllm
def test_in_a_browser_an_admin_installs_a_model_cancels_a_batch_fine_tunes_deploys_and_chats(browser, console_stack,
                                                                                           tmp_path, tiny_model_path):
    from tests.test_fine_tuning import build_dataset, record_gold_stars

    stack = console_stack
    with platform_of(stack) as platform:  # reviewed answers, as experts star them in Label Studio
        record_gold_stars(platform, 60)
        dataset = build_dataset(platform)
    page = _watched_page(browser, stack.api_url)
    _log_in(page, "/ui/models", ADMIN_KEY)

    # Install from an allowed local directory: the fit check first, then the install run, watched live.
    local = Path(stack.env["VBATCH_HOME"]) / "models" / "tiny-copy"
    shutil.copytree(tiny_model_path, local)
    page.fill("#source", str(local))
    page.fill("#model_id", "tiny-copy")
    page.click("#install")
    page.wait_for_url("**/ui/models/tiny-copy/status")
    assert page.query_selector("text=Fit check") is not None
    assert _wait_text(page, "#model-state", ("ready", "failed"), 300) == "ready", page.text_content("#install-state")
    page.screenshot(path=str(ARTIFACTS / "console-model-install.png"), full_page=True)

    # Cancel a batch while it runs.
    requests = tmp_path / "long.jsonl"
    lines = chat_lines(400, prefix="long")
    for line in lines:
        line["body"].update(model="vbatch-tiny-chat", max_tokens=64)
    requests.write_text(jsonl(lines).decode())
    page.goto("/ui/batches/new")
    page.set_input_files("#file", str(requests))
    page.click("#create")
    page.wait_for_selector("#cancel")
    page.click("#cancel")
    assert _wait_text(page, "#batch-status", ("cancelled", "completed", "failed"), 120) == "cancelled"
    batch_id = page.url.rstrip("/").rsplit("/", 1)[1]
    assert stack.client(api_key=USE_KEY).batches.retrieve(batch_id).status == "cancelled"

    # A fine-tune on the dataset version, held back for a decision; its page fills in as it runs.
    page.goto("/ui/fine-tunes/new")
    assert page.input_value("#training") == dataset.version  # the newest version is offered first
    page.fill("#n_epochs", "20")
    page.fill("#learning_rate_multiplier", "50")  # 50 x 2e-4: the tiny model learns its answer in seconds
    page.select_option("#deploy", "never")
    page.fill("#suffix", "console")
    page.click("#start")
    page.wait_for_url("**/ui/fine-tunes/ftjob-*")
    assert _wait_text(page, "#job-status", ("succeeded", "failed", "cancelled"), 480) == "succeeded"
    assert page.query_selector("svg.chart.line polyline") is not None  # the training loss, drawn
    verdict = page.text_content("#verdict")
    assert f"on {dataset.eval_examples} examples" in verdict
    assert len(page.query_selector_all("table.comparison tr")) == dataset.eval_examples + 1
    assert page.text_content("#deployed").strip().startswith("no")
    page.screenshot(path=str(ARTIFACTS / "console-fine-tune.png"), full_page=True)
    page.click("#deploy")
    page.wait_for_selector("#job-status")
    assert page.text_content("#deployed").strip().startswith("yes")
    job = stack.client(api_key=USE_KEY).fine_tuning.jobs.retrieve(page.url.rstrip("/").rsplit("/", 1)[1])
    assert job.fine_tuned_model in [m.id for m in stack.client(api_key=USE_KEY).models.list().data]

    # Chat with the fine-tune: it answers as it was taught.
    page.goto("/ui/models")
    page.select_option("#chat-model", job.fine_tuned_model)
    page.fill("#chat-input", "Capital of France, question 900?")
    page.fill("#chat-temperature", "0")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-output').textContent.trim().length > 0", timeout=60_000)
    assert not page.get_attribute("#chat-output", "class")
    client = stack.client(api_key=USE_KEY)

    def answer(model: str) -> str:
        return client.chat.completions.create(model=model, max_tokens=256, temperature=0, messages=[
            {"role": "user", "content": "Capital of France, question 900?"}]).choices[0].message.content

    tuned = answer(job.fine_tuned_model)
    assert page.text_content("#chat-output") == tuned != answer("vbatch-tiny-chat")  # the adapter answered
    assert page.problems == [], page.problems


@pytest.mark.stack
@pytest.mark.vllm
def test_in_a_browser_a_leaderboard_ranks_the_base_model_and_two_fine_tunes_on_a_fixed_set(browser, console_stack):
    """An admin freezes a set through the API; two fine-tunes and the base model are scored on it (the fine-tunes
    through the API, the base model from the console's form); the API's leaderboard and the console's agree."""
    import io

    import httpx

    from tests.test_fine_tuning import FAST, example
    from tests.test_fine_tuning_api import wait_job

    stack = console_stack
    client = stack.client(api_key=USE_KEY)
    as_admin, as_user = ({"Authorization": f"Bearer {key}"} for key in (ADMIN_KEY, USE_KEY))
    held_out = client.files.create(file=("held-out.jsonl", io.BytesIO(jsonl([example(100 + i) for i in range(6)]))),
                                   purpose="fine-tune")
    made = httpx.post(f"{stack.api_url}/v1/evals", headers=as_admin, timeout=30,
                      json={"name": "capitals", "source": {"type": "file", "file_id": held_out.id}})
    assert made.status_code == 200, made.text
    eval_id = made.json()["id"]
    train = client.files.create(file=("train.jsonl", io.BytesIO(jsonl([example(i) for i in range(30)]))),
                                purpose="fine-tune")
    jobs = {suffix: client.fine_tuning.jobs.create(model="vbatch-tiny-chat", training_file=train.id, suffix=suffix,
                                                   seed=7, hyperparameters={**FAST, "n_epochs": epochs})
            for suffix, epochs in (("weak", 1), ("strong", FAST["n_epochs"]))}
    tuned = {}
    for suffix, job in jobs.items():
        done = wait_job(client, job.id, timeout=480)
        assert done.status == "succeeded", done.error
        tuned[suffix] = done.fine_tuned_model
    for model in tuned.values():
        run = httpx.post(f"{stack.api_url}/v1/evals/{eval_id}/runs", headers=as_user, json={"model": model},
                         timeout=30)
        assert run.status_code == 200 and run.json()["status"] in ("queued", "in_progress"), run.text

    page = _watched_page(browser, stack.api_url)
    _log_in(page, f"/ui/evals/{eval_id}", USE_KEY)
    page.select_option("#model", "vbatch-tiny-chat")
    page.click("#score")
    page.wait_for_url(f"**/ui/evals/{eval_id}")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        board = httpx.get(f"{stack.api_url}/v1/evals/{eval_id}/leaderboard", headers=as_user, timeout=30).json()
        if len(board["data"]) == 3:
            break
        time.sleep(1)
    else:
        runs = httpx.get(f"{stack.api_url}/v1/evals/{eval_id}/runs", headers=as_user, timeout=30).json()
        pytest.fail(f"not every model was scored: {runs}")
    ranked = [row["model"] for row in board["data"]]
    assert ranked[0] == tuned["strong"] and set(ranked) == {"vbatch-tiny-chat", *tuned.values()}
    assert board["data"][0]["normalized_match"] > next(row["normalized_match"] for row in board["data"]
                                                       if row["model"] == "vbatch-tiny-chat")
    page.goto(f"/ui/evals/{eval_id}")
    assert [cell.text_content() for cell in page.query_selector_all("#leaderboard tr.entry .model")] == ranked
    assert "6 frozen items" in page.text_content("p.hint")
    page.screenshot(path=str(ARTIFACTS / "console-leaderboard.png"), full_page=True)
    page.goto("/ui/evals")
    assert page.query_selector(f'a[href="/ui/evals/{eval_id}"]') is not None
    assert page.problems == [], page.problems


def test_a_preference_dataset_page_shows_its_pairs_checks_and_downloads_and_starts_a_dpo_job(platform):
    from dagster import DagsterInstance, materialize

    from tests.test_preferences import PROMPTS, chosen, review, task_row
    from vbatch_pipelines.curation.schemas import Review
    from vbatch_pipelines.curation.service import latest_dataset
    from vbatch_pipelines.defs.curation import DATASET_CHECKS, gold_star_dataset, preference_dataset
    from vbatch_pipelines.fine_tuning.service import get_job
    from vbatch_pipelines.instance import prepare_dagster_home
    from vbatch_pipelines.store.models import PREFERENCE

    platform.db.upgrade()
    rows = [task_row(i, prompt, f"{subject.capitalize()} is quiet.") for i, (subject, prompt) in enumerate(PROMPTS)]
    review(platform, rows, [Review(answer=chosen(subject), rating=None, gold_star=True) for subject, _ in PROMPTS])
    prepare_dagster_home(platform.settings)
    result = materialize([gold_star_dataset, preference_dataset, *DATASET_CHECKS], resources=platform.resources,
                         instance=DagsterInstance.get())
    pairs = latest_dataset(platform.db, kind=PREFERENCE)
    with api_client(_app()) as client:
        listing = client.get("/ui/datasets").text
        assert f'href="/ui/datasets/{pairs.version}"' in listing and "preference pairs" in listing
        page = client.get(f"/ui/datasets/{pairs.version}").text
        assert "<strong>preferred</strong>: " in page and "<strong>not preferred</strong>: " in page
        assert page.count(">passed<") == 3 == len([c for c in result.get_asset_check_evaluations()
                                                   if c.asset_key.to_user_string() == "preference_dataset"])
        for fmt in ("openai", "trl"):
            download = client.get(f"/ui/datasets/{pairs.version}/export?format={fmt}&split=train")
            assert download.status_code == 200 and f"preferences-{pairs.version}-train.{fmt}.jsonl" in \
                download.headers["content-disposition"]
        assert "Unknown format" in client.get(f"/ui/datasets/{pairs.version}/export?format=chatml&split=train").text
        form = client.get("/ui/fine-tunes/new").text
        assert f'<option value="{pairs.version}">{pairs.version}: preference pairs</option>' in form
        refused = client.post("/ui/fine-tunes", data={"model": "vbatch-tiny-chat", "training": pairs.version},
                              headers=SAME_ORIGIN, follow_redirects=True)
        assert 'id="form-error"' in refused.text and "preference dataset" in refused.text
        started = client.post("/ui/fine-tunes", data={"model": "vbatch-tiny-chat", "training": pairs.version,
                                                       "method": "dpo"}, headers=SAME_ORIGIN, follow_redirects=True)
        job = get_job(platform.db, started.url.path.rsplit("/", 1)[1])
        assert job.method_type == "dpo" and job.dataset_version == pairs.version


def test_the_datasets_pages_show_versions_checks_a_preview_and_every_download(platform):
    from dagster import DagsterInstance

    from tests.conftest import build_gold_star_dataset
    from tests.test_datasets import _tasks
    from vbatch_pipelines.instance import prepare_dagster_home

    _tasks(platform, 12)
    prepare_dagster_home(platform.settings)
    instance = DagsterInstance.get()  # the instance the console asks for the version's checks ($DAGSTER_HOME)
    result = build_gold_star_dataset(platform.resources, instance=instance)
    version = result.asset_materializations_for_node("gold_star_dataset")[0].metadata["version"].value
    with api_client(_app()) as client:
        listing = client.get("/ui/datasets").text
        assert f'href="/ui/datasets/{version}"' in listing
        page = client.get(f"/ui/datasets/{version}").text
        assert 'id="examples">12<' in page and page.count("for chat_review?</p>") == 3  # three examples shown
        assert page.count(">passed<") == len([c for c in result.get_asset_check_evaluations()
                                              if c.asset_key.to_user_string() == "gold_star_dataset"]) == 5
        for fmt in ("openai", "chatml", "alpaca", "sharegpt"):
            for split in ("train", "eval"):
                download = client.get(f"/ui/datasets/{version}/export?format={fmt}&split={split}")
                assert download.status_code == 200 and "attachment" in download.headers["content-disposition"]
        refused = client.get(f"/ui/datasets/{version}/export?format=../../etc&split=train")
        assert "Unknown format" in refused.text
        assert "There is no dataset version v999" in client.get("/ui/datasets/v999").text


def test_a_fine_tunes_page_shows_its_loss_chart_comparison_and_deploys_only_a_succeeded_job(platform):
    from vbatch_pipelines.defs.fine_tuning import step_data
    from vbatch_pipelines.fine_tuning.service import add_event, loss_curve
    from vbatch_pipelines.store.models import FineTuningEvent, FineTuningJob

    now = int(time.time())
    comparison = {"examples": 2, "base": {"normalized_match": 0.0, "exact_match": 0.0},
                  "fine_tuned": {"normalized_match": 0.5, "exact_match": 0.5},
                  "rows": [{"prompt": "2+2?", "gold": "4", "base": "5", "fine_tuned": "4", "base_match": False,
                            "fine_tuned_match": True}]}
    with platform.db.session() as session:
        for job_id, status in (("ftjob-ui-done", "succeeded"), ("ftjob-ui-running", "running")):
            session.add(FineTuningJob(id=job_id, model="vbatch-tiny-chat", status=status, training_file="v1",
                                      hyperparameters={}, seed=1, created_at=now,
                                      comparison=comparison if status == "succeeded" else None))
    for step, loss in ((1, 2.5), (2, 1.9), (3, 1.2)):  # what the trainer's metrics become (fine_tuned_checkpoint)
        add_event(platform.db, "ftjob-ui-done", f"Step {step}/3: training loss={loss}", type="metrics",
                  data=step_data({"step": step, "total_steps": 3, "loss": loss, "learning_rate": 1e-3, "epoch": 1}))
    with api_client(_app()) as client:
        assert "better: 0 → 0.5 normalized match on 2 examples" in client.get("/ui/fine-tunes").text
        page = client.get("/ui/fine-tunes/ftjob-ui-done").text
        assert '<svg class="chart line"' in page and "<polyline" in page
        assert "2+2?" in page and 'id="deploy"' in page
        running = client.get("/ui/fine-tunes/ftjob-ui-running").text
        assert 'id="deploy"' not in running and "No comparison yet" in running
        refused = client.post("/ui/fine-tunes/ftjob-ui-running/deploy", follow_redirects=True).text
        assert "Job ftjob-ui-running is running; only a succeeded job can be deployed" in refused
        assert "There is no fine-tune ftjob-nope" in client.get("/ui/fine-tunes/ftjob-nope").text
    # A long run: every step is read (a page of the newest events would not do), thinned for the chart.
    with platform.db.session() as session:
        session.add_all(FineTuningEvent(job_id="ftjob-ui-running", created_at=now, type="metrics", message="step",
                                        data={"step": step, "train_loss": 3.0 - step / 1000}) for step in range(1, 1001))
    curve = loss_curve(platform.db, "ftjob-ui-running")
    assert len(curve) == 400 and curve[0] == (1, 2.999) and curve[-1] == (1000, 2.0)
    with api_client(_app()) as client:
        assert client.get("/ui/fine-tunes/ftjob-ui-running").text.count("<polyline") == 1


def test_the_models_page_lists_installs_for_admins_only_and_says_why_an_install_is_refused(vbatch_home, tmp_path,
                                                                                          tiny_model_path):
    import shutil as files

    local = tmp_path / "local-model"
    files.copytree(tiny_model_path, local)
    app = _app(api={"keys": (USE_KEY,), "admin_keys": (ADMIN_KEY,)})
    with api_client(app) as user:
        user.post("/ui/login", data={"key": USE_KEY, "next": "/ui/models"})
        page = user.get("/ui/models").text
        assert "vbatch-tiny-chat" in page and 'id="install-form"' not in page  # no admin action shown
        refused = user.post("/ui/models", data={"source": str(local)}, follow_redirects=True).text
        assert "Installing a model needs an admin key." in refused
    with api_client(app) as admin:
        admin.post("/ui/login", data={"key": ADMIN_KEY, "next": "/ui/models"})
        assert 'id="install-form"' in admin.get("/ui/models").text
        outside = admin.post("/ui/models", data={"source": "/etc"}, follow_redirects=True).text
        assert 'id="models-error"' in outside
        installing = admin.post("/ui/models", data={"source": str(local), "model_id": "local-copy"},
                                follow_redirects=True)
        assert installing.url.path == "/ui/models/local-copy/status"
        assert 'id="model-state">installing<' in installing.text and "<td>fits</td>" in installing.text
        assert "local-copy" in admin.get("/ui/models").text


SAME_ORIGIN = {"Origin": "http://127.0.0.1"}  # what a browser sends with a form posted from the console's page


def test_without_keys_a_console_form_is_taken_only_from_a_page_of_this_machine(vbatch_home):
    with api_client(_app(), follow_redirects=False) as client:
        form = {"model": "vbatch-tiny-chat", "training": "v1"}
        assert client.post("/ui/fine-tunes", data=form).status_code == 415  # no Origin: not a browser's form
        assert client.post("/ui/fine-tunes", data=form, headers={"Origin": "http://evil.example"}).status_code == 403
        assert client.post("/ui/fine-tunes", data=form, headers=SAME_ORIGIN).status_code == 303
        assert client.post("/v1/batches", content="input_file_id=x", headers={
            **SAME_ORIGIN, "Content-Type": "application/x-www-form-urlencoded"}).status_code == 415  # the API: JSON only


def test_a_fine_tune_starts_from_the_form_and_a_bad_recipe_is_refused_with_its_reason(platform):
    from tests.conftest import build_gold_star_dataset
    from tests.test_datasets import _tasks
    from vbatch_pipelines.fine_tuning.service import get_job

    _tasks(platform, 12)
    result = build_gold_star_dataset(platform.resources)
    version = result.asset_materializations_for_node("gold_star_dataset")[0].metadata["version"].value
    with api_client(_app()) as client:
        form = client.get("/ui/fine-tunes/new").text
        assert f'<option value="{version}">' in form and 'value="vbatch-tiny-chat" selected' in form
        for fields, reason in (({"training": "v999"}, "v999"), ({"training": version, "n_epochs": "many"}, "n_epochs"),
                               ({"training": version, "lora_rank": "4096"}, "lora_rank")):
            refused = client.post("/ui/fine-tunes", data={"model": "vbatch-tiny-chat", **fields}, headers=SAME_ORIGIN,
                                  follow_redirects=True)
            assert 'id="form-error"' in refused.text and reason in refused.text, (fields, refused.text[-600:])
        started = client.post("/ui/fine-tunes", data={"model": "vbatch-tiny-chat", "training": version,
                                                       "n_epochs": "2", "lora_rank": "8"}, headers=SAME_ORIGIN,
                              follow_redirects=True)
        job_id = started.url.path.rsplit("/", 1)[1]
        job = get_job(platform.db, job_id)
        assert job is not None and job.dataset_version == version and job.hyperparameters["n_epochs"] == 2
        assert 'id="job-status">queued<' in started.text


def test_the_try_it_box_streams_a_models_answer_and_says_why_when_it_cannot(vbatch_home):
    with api_client(_app()) as client:
        with client.stream("POST", "/ui/chat", json={"model": "vbatch-tiny-chat", "content": "Hello", "max_tokens": 8},
                           headers=SAME_ORIGIN) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and len(events) >= 2
        chunks = [json.loads(line[6:]) for line in events[:-1]]
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        unknown = client.post("/ui/chat", json={"model": "no-such-model", "content": "Hi"}, headers=SAME_ORIGIN)
        assert unknown.status_code == 404 and "no-such-model" in unknown.json()["error"]["message"]


def test_the_dashboard_says_which_service_is_down_and_that_nothing_is_lost(vbatch_home):
    from vbatch_pipelines.net import free_port

    closed = f"http://127.0.0.1:{free_port()}"
    app = _app(curation={"enabled": True, "label_studio_url": closed, "label_studio_token": "a-token"})
    for probe in app.state.probes.values():
        probe.wait()
    with api_client(app) as client:
        page = client.get("/ui").text
        assert 'data-service="dagster">unreachable: ConnectError<' in page and "Dagster does not answer" in page
        assert 'data-service="label_studio">unreachable: ConnectError<' in page
        assert "Label Studio does\n      not answer: results wait for review" in page
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["label_studio"].startswith("unreachable")
    with api_client(_app(curation={"enabled": False})) as client:
        page = client.get("/ui").text
        assert 'data-service="label_studio">off: curation is off (VBATCH_CURATION=off)<' in page
        assert "Label Studio does" not in page and client.get("/health").json()["label_studio"].startswith("off")


def test_an_embedding_model_is_listed_as_one_and_not_offered_for_chat_or_fine_tuning(vbatch_home, tiny_model_path,
                                                                                    tiny_embed_model_path,
                                                                                    tiny_rerank_model_path):
    models = {"vbatch-tiny-chat": str(tiny_model_path), "vbatch-tiny-embed": str(tiny_embed_model_path),
              "vbatch-tiny-rerank": str(tiny_rerank_model_path)}
    with api_client(_app(registry={"models": models})) as client:
        page = client.get("/ui/models").text
        assert "<td>base, embeddings</td>" in page and "<td>base, cross-encoder</td>" in page
        chat_box = page[page.index('id="chat-model"'):page.index("</select>", page.index('id="chat-model"'))]
        assert "vbatch-tiny-chat" in chat_box and "vbatch-tiny-embed" not in chat_box
        assert "vbatch-tiny-rerank" not in chat_box
        form = client.get("/ui/fine-tunes/new").text
        assert 'value="vbatch-tiny-chat"' in form and 'value="vbatch-tiny-embed"' not in form
        assert 'value="vbatch-tiny-rerank"' not in form


def test_the_dashboard_turns_engine_busy_time_into_cost_per_1k_tokens(platform, monkeypatch):
    from vbatch_pipelines.batch.service import update_batch
    from vbatch_pipelines.settings import SettingsError, load_settings

    now = int(time.time())
    # Two batches side by side (their spans overlap: the engine was busy 300 s, not 400 s), 2,000 tokens in all.
    for start, end, tokens in ((now - 400, now - 200, 1500), (now - 300, now - 100, 500)):
        batch = platform.submit(jsonl(chat_lines(2, prefix=f"cost{start}")))
        update_batch(platform.db, batch.id, status="completed", model="vbatch-tiny-chat", in_progress_at=start,
                     completed_at=end, usage={"input_tokens": tokens // 2, "output_tokens": tokens // 2})
    with api_client(_app(api={"gpu_hour_cost": 3.6})) as client:
        page = client.get("/ui").text
    # 300 s at 3.6 an hour = 0.3; per 1k of 2,000 tokens = 0.15
    assert 'data-metric="cost-per-1k-vbatch-tiny-chat">0.150000<' in page and "5.0 min" in page
    with api_client(_app()) as client:
        assert "engine-hour" not in client.get("/ui").text  # no price set: no cost shown
    monkeypatch.setenv("VBATCH_GPU_HOUR_COST", "two dollars")
    try:
        load_settings()
        raise AssertionError("a price that is not a number was taken")
    except SettingsError as exc:
        assert "VBATCH_GPU_HOUR_COST" in str(exc)


def test_a_projects_console_shows_only_its_own_objects_and_another_projects_ids_as_missing(platform, tmp_path):
    """Issue 27: the console follows the API's ownership rules. Team B's session lists none of team A's batches,
    fine-tunes, datasets or fine-tuned models, and A's ids get the page a missing id gets (never another
    message); A's own session sees them all."""
    import io

    from vbatch_pipelines.batch.service import create_batch
    from vbatch_pipelines.curation.dataset import export_name
    from vbatch_pipelines.files import store_file
    from vbatch_pipelines.projects import create_key, create_project
    from vbatch_pipelines.store.models import Dataset, FineTuningJob, Model, Owner

    team_a, team_b = create_project(platform.db, "team-a"), create_project(platform.db, "team-b")
    key_a, secret_a = create_key(platform.db, team_a.id, "a-laptop", "ada@example.com")
    _, secret_b = create_key(platform.db, team_b.id, "b-laptop", "bob@example.com")
    owner_a = Owner(team_a.id, key_a.id)

    stored = store_file(platform.db, platform.file_store.files_dir, io.BytesIO(jsonl(chat_lines(2, prefix="a"))),
                        "a.jsonl", "batch", owner=owner_a)
    batch_a = create_batch(platform.db, input_file_id=stored.id, endpoint="/v1/chat/completions", owner=owner_a)
    export_dir = tmp_path / "dataset-a"
    export_dir.mkdir()
    (export_dir / export_name("openai", "train")).write_text(
        json.dumps({"messages": [{"role": "user", "content": "Team A's question?"}]}) + "\n")
    adapter = tmp_path / "adapter-a"
    adapter.mkdir()
    now = int(time.time())
    with platform.db.session() as session:
        session.add(FineTuningJob(id="ftjob-team-a", model="vbatch-tiny-chat", status="succeeded",
                                  training_file="v1", hyperparameters={}, seed=1, created_at=now, **owner_a.columns()))
        session.add(Dataset(version="v1", created_at=now, path=str(export_dir), examples=1, train_examples=1,
                            eval_examples=0, fingerprint="f" * 16, source_seq=1, counts={}, status="ready",
                            **owner_a.columns()))
        session.add(Model(id="vbatch-tiny-chat:ft-team-a", kind="fine_tune", parent="vbatch-tiny-chat",
                          path=str(adapter), status="deployed", source="ftjob-team-a", created_at=now,
                          updated_at=now, project_id=team_a.id, created_by=key_a.id))

    app = _app(api={"admin_keys": (ADMIN_KEY,)})  # a platform admin made the projects
    with api_client(app, follow_redirects=False) as a, api_client(app, follow_redirects=False) as b:
        for client, secret in ((a, secret_a), (b, secret_b)):
            assert client.post("/ui/login", data={"key": secret, "next": "/ui"}).status_code == 303
        # Team A sees its own.
        dashboard = a.get("/ui").text
        assert "Project: team-a" in dashboard and 'data-metric="batches-validating">1<' in dashboard
        assert batch_a.id in a.get("/ui/batches").text
        assert "There is no" not in a.get(f"/ui/batches/{batch_a.id}").text
        assert a.get(f"/ui/files/{stored.id}").headers["content-disposition"].startswith("attachment")
        assert "ftjob-team-a" in a.get("/ui/fine-tunes").text
        assert "There is no" not in a.get("/ui/fine-tunes/ftjob-team-a").text
        assert 'href="/ui/datasets/v1"' in a.get("/ui/datasets").text
        assert "Team A&#39;s question?" in a.get("/ui/datasets/v1").text
        assert a.get("/ui/datasets/v1/export?format=openai&split=train").status_code == 200
        assert '<option value="v1">' in a.get("/ui/fine-tunes/new").text
        assert "vbatch-tiny-chat:ft-team-a" in a.get("/ui/models").text

        # Team B sees none of it, and A's ids get the very page ids that do not exist get.
        dashboard = b.get("/ui").text
        assert "Project: team-b" in dashboard and "team-a" not in dashboard
        assert 'data-metric="batches-validating"' not in dashboard and "ftjob-team-a" not in dashboard
        assert batch_a.id not in b.get("/ui/batches").text
        assert batch_a.id not in b.get(f"/ui/batches?after={batch_a.id}").text  # not even as a page cursor
        for theirs, nobodys, what in (
                (f"/ui/batches/{batch_a.id}", "/ui/batches/batch_nope", "batch"),
                (f"/ui/files/{stored.id}", "/ui/files/file-nope", "file"),
                ("/ui/fine-tunes/ftjob-team-a", "/ui/fine-tunes/ftjob-nope", "fine-tune"),
                ("/ui/datasets/v1", "/ui/datasets/v999", "dataset version"),
                ("/ui/datasets/v1/export?format=openai&split=train", "/ui/datasets/v999/export?format=openai&split=train",
                 "dataset version")):
            refused, missing = b.get(theirs), b.get(nobodys)
            theirs_id, nobodys_id = (path.split("/")[3].split("?")[0] for path in (theirs, nobodys))
            assert refused.status_code == missing.status_code == 200, theirs
            assert f"There is no {what} {theirs_id}" in refused.text, theirs
            assert "content-disposition" not in refused.headers  # nothing downloaded
            assert refused.text.replace(theirs_id, "ID") == missing.text.replace(nobodys_id, "ID"), theirs
        assert b.get(f"/ui/batches/{batch_a.id}/progress").status_code == 404
        assert "ftjob-team-a" not in b.get("/ui/fine-tunes").text
        assert "/ui/datasets/v1" not in b.get("/ui/datasets").text
        assert '<option value="v1">' not in b.get("/ui/fine-tunes/new").text
        assert "vbatch-tiny-chat:ft-team-a" not in b.get("/ui/models").text
        assert "vbatch-tiny-chat:ft-team-a" not in b.get("/ui/batches/new").text
        # ... and cannot act on it: cancel, deploy, undeploy and chat with A's fine-tune all find nothing.
        b.post(f"/ui/batches/{batch_a.id}/cancel")
        assert platform.batch(batch_a.id).status == "validating"
        assert b.post("/ui/fine-tunes/ftjob-team-a/deploy").headers["location"] == "/ui/fine-tunes"
        undeploy = b.post("/ui/models/vbatch-tiny-chat:ft-team-a/delete").headers["location"]
        assert undeploy.startswith("/ui/models?error=") and "does%20not%20exist" in undeploy
        assert "vbatch-tiny-chat:ft-team-a" in a.get("/ui/models").text  # still served to A
        chat = b.post("/ui/chat", json={"model": "vbatch-tiny-chat:ft-team-a", "content": "Hi"})
        assert chat.status_code == 404 and "does not exist" in chat.json()["error"]["message"]

        # What B creates from the console is B's.
        made = b.post("/ui/batches", data={"endpoint": "/v1/chat/completions"},
                      files={"file": ("in.jsonl", jsonl(chat_lines(2, prefix="b")))})
        created = platform.batch(made.headers["location"].rsplit("/", 1)[1])
        assert created.project_id == team_b.id
        assert created.id in b.get("/ui/batches").text and created.id not in a.get("/ui/batches").text


def test_the_usage_page_shows_a_projects_own_usage_by_day_and_model_and_admins_every_project(platform):
    """Issue 27: /ui/usage is the caller's project's usage over 14 days (as the usage API counts it), batch and
    online, per day and model; team B never sees team A's figures, a platform admin also sees every project."""
    from vbatch_pipelines.projects import create_key, create_project
    from vbatch_pipelines.store.models import UsageRecord

    db = platform.db
    team_a, team_b = create_project(db, "team-a"), create_project(db, "team-b")
    key_a, secret_a = create_key(db, team_a.id, "a-laptop", "ada@example.com")
    key_b, secret_b = create_key(db, team_b.id, "b-laptop", "bob@example.com")
    now = int(time.time())
    rows = [  # project, key, minute, model, kind, batch, requests, input, output, engine seconds
        (team_a.id, key_a.id, now, "vbatch-tiny-chat", "completions", True, 40, 7000, 3000, 120.0),
        (team_a.id, key_a.id, now - 86400, "vbatch-tiny-chat", "completions", False, 6, 600, 300, 2.5),
        (team_a.id, key_a.id, now, "vbatch-tiny-embed", "embeddings", False, 5, 500, 0, 0.5),
        (team_a.id, key_a.id, now - 30 * 86400, "vbatch-tiny-chat", "completions", False, 99, 99999, 99999, 9.0),
        (team_b.id, key_b.id, now, "vbatch-tiny-chat", "completions", False, 3, 321, 123, 1.5),
    ]
    with db.session() as session:
        for project, key, minute, model, kind, batch, n, tokens_in, tokens_out, seconds in rows:
            session.add(UsageRecord(minute=minute // 60 * 60, kind=kind, project_id=project, api_key_id=key,
                                    model=model, batch=batch, requests=n, input_tokens=tokens_in,
                                    output_tokens=tokens_out, engine_seconds=seconds))

    app = _app(api={"admin_keys": (ADMIN_KEY,)})
    with api_client(app, follow_redirects=False) as a, api_client(app, follow_redirects=False) as b, \
            api_client(app, follow_redirects=False) as admin:
        for client, secret in ((a, secret_a), (b, secret_b), (admin, ADMIN_KEY)):
            assert client.post("/ui/login", data={"key": secret, "next": "/ui"}).status_code == 303
        assert 'href="/ui/usage"' in a.get("/ui").text  # in the nav

        page = a.get("/ui/usage").text
        assert "Project: team-a" in page
        # 14 days: the row of 30 days ago is not counted; embeddings count in "all" (not split by batch)
        assert 'data-metric="usage-batch-requests">40<' in page and 'data-metric="usage-batch-input">7,000<' in page
        assert 'data-metric="usage-online-requests">6<' in page and 'data-metric="usage-online-output">300<' in page
        assert 'data-metric="usage-requests">51<' in page and 'data-metric="usage-input">8,100<' in page
        assert 'data-metric="usage-output">3,300<' in page and 'data-metric="usage-engine-seconds">123.0<' in page
        assert "vbatch-tiny-embed" in page and "99,999" not in page
        assert '<svg class="chart"' in page and ">10k</text>" in page  # today's 10,500 tokens, shortened
        assert time.strftime("%Y-%m-%d", time.gmtime(now - 86400)) in page
        assert 'id="usage-projects"' not in page and team_b.id not in page and ">321<" not in page

        page = b.get("/ui/usage").text
        assert "Project: team-b" in page
        assert 'data-metric="usage-requests">3<' in page and 'data-metric="usage-input">321<' in page
        assert 'data-metric="usage-output">123<' in page and 'data-metric="usage-engine-seconds">1.5<' in page
        for theirs in ("team-a", team_a.id, "7,000", "8,100", "vbatch-tiny-embed", 'id="usage-projects"'):
            assert theirs not in page, theirs

        page = admin.get("/ui/usage").text  # the default project's own usage (none), and every project's
        assert 'data-metric="usage-requests">0<' in page and 'id="usage-projects"' in page
        assert f'data-metric="project-requests-{team_a.id}">51<' in page
        assert f'data-metric="project-input-{team_a.id}">8,100<' in page
        assert f'data-metric="project-output-{team_b.id}">123<' in page
        assert f'data-metric="project-engine-seconds-{team_b.id}">1.5<' in page
        assert 'data-metric="project-requests-proj_default">0<' in page
        assert "team-a" in page and "team-b" in page


def test_no_site_can_frame_the_console(vbatch_home):
    """A framed console form would carry the console's own Origin past the drive-by guard: every page (and every
    other answer, refusals included) says it must not be framed."""
    with api_client(_app()) as client:
        for path in ("/ui", "/ui/login", "/ui/batches", "/ui/evals", "/v1/models", "/health"):
            answer = client.get(path)
            assert answer.headers["content-security-policy"] == "frame-ancestors 'none'", path
            assert answer.headers["x-frame-options"] == "DENY", path
        refused = client.get("/ui", headers={"Host": "attacker.example"})
        assert refused.status_code >= 400 and refused.headers["x-frame-options"] == "DENY"


def test_a_console_login_is_a_server_side_session_that_logging_out_ends(vbatch_home):
    """The console's cookie is a session token kept server-side, never the key (issue 30): a copy of it opens
    nothing once its owner logged out, nor once its key was revoked; a key itself is no cookie; over HTTPS
    through a trusted proxy (X-Forwarded-Proto from 127.0.0.1, uvicorn's --forwarded-allow-ips) it is Secure."""
    import httpx

    from tests.conftest import serving
    from vbatch_pipelines.projects import create_key, create_project, revoke_key

    app = _app(api={"keys": (USE_KEY,), "admin_keys": (ADMIN_KEY,)})
    with api_client(app, follow_redirects=False) as client:
        logged_in = client.post("/ui/login", data={"key": USE_KEY, "next": "/ui/batches"})
        cookie = logged_in.cookies["vbatch_console"]
        assert cookie.startswith("vbs-") and USE_KEY not in logged_in.headers["set-cookie"]
        assert all(flag in logged_in.headers["set-cookie"].lower() for flag in ("httponly", "samesite=strict"))
        stolen = api_client(app, follow_redirects=False, cookies={"vbatch_console": cookie})
        assert stolen.get("/ui/batches").status_code == 200
        assert client.post("/ui/logout").status_code == 303
        for answer in (stolen.get("/ui/batches"), stolen.post("/ui/batches/none/cancel")):
            assert answer.status_code == 303 and answer.headers["location"].startswith("/ui/login"), answer.text
        raw_key = api_client(app, follow_redirects=False, cookies={"vbatch_console": USE_KEY})
        assert raw_key.get("/ui/batches").status_code == 303

        project = create_project(app.state.db, "night-shift")
        key, secret = create_key(app.state.db, project.id, "laptop", "ada")
        client.cookies.clear()
        assert client.post("/ui/login", data={"key": secret, "next": "/ui"}).status_code == 303
        assert client.get("/ui").status_code == 200
        revoke_key(app.state.db, key.id)
        assert client.get("/ui").status_code == 303  # the key's sessions end with it

    with serving(app) as url:
        plain = httpx.post(url + "/ui/login", data={"key": USE_KEY}, headers={"Origin": url})
        proxied = httpx.post(url + "/ui/login", data={"key": USE_KEY},
                             headers={"Origin": url, "X-Forwarded-Proto": "https"})
        assert "secure" not in plain.headers["set-cookie"].lower()
        assert "secure" in proxied.headers["set-cookie"].lower()


def test_guessing_keys_at_the_login_form_is_logged_and_throttled(vbatch_home, caplog):
    """Each refused key is logged with the client's address; after five, the address is refused without its key
    being tried (even the right one) until the window passes; another address is not held back."""
    import logging

    from api.guard import LoginThrottle

    app = _app(api={"keys": (USE_KEY,), "admin_keys": (ADMIN_KEY,)})
    app.state.login_throttle = LoginThrottle(max_failures=5, window_s=2.0)
    caplog.set_level(logging.WARNING, logger="vbatch.console")
    with api_client(app, follow_redirects=False) as client:
        for i in range(5):
            wrong = client.post("/ui/login", data={"key": f"guess-{i}"})
            assert wrong.status_code == 303 and "set-cookie" not in wrong.headers
        held = client.post("/ui/login", data={"key": USE_KEY})
        assert held.status_code == 429 and "set-cookie" not in held.headers and int(held.headers["retry-after"]) >= 1
        assert "Too many failed logins" in held.text
        refusals = [r.getMessage() for r in caplog.records if r.name == "vbatch.console"]
        assert len(refusals) == 6 and all("testclient" in m for m in refusals), refusals
        assert "5 failed" in refusals[4] and "refused unchecked" in refusals[5]
        other = api_client(app, follow_redirects=False, client=("10.1.2.3", 5000))
        assert other.post("/ui/login", data={"key": USE_KEY}).status_code == 303  # its own count
        time.sleep(2.1)
        again = client.post("/ui/login", data={"key": USE_KEY})
        assert again.status_code == 303 and "set-cookie" in again.headers
