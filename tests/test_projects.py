"""Projects and their keys (issue 27, first part): keys are records holding only a hash, shown once; a revoked key
is refused on its next request with no restart; a project's ids are a 404 to another project; VBATCH_API_KEYS and
VBATCH_ADMIN_KEYS keep working as the default project. Through the official openai SDK where a client calls."""

from __future__ import annotations

import hashlib
import subprocess

import openai
import pytest

from tests.conftest import CLI, api_client, openai_error, serving

ADMIN = "sk-platform-admin"


def _app(**settings):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    return create_app(load_settings().replace(dagster={"url": "http://127.0.0.1:9"}, **settings))


def _bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _project(client, name: str) -> str:
    response = client.post("/v1/organization/projects", json={"name": name}, headers=_bearer(ADMIN))
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "organization.project"
    return response.json()["id"]


def _key(client, project: str, by: str, role: str = "member", name: str = "laptop") -> dict:
    response = client.post(f"/v1/organization/projects/{project}/api_keys", headers=_bearer(by),
                           json={"name": name, "owner": "ada@example.com", "role": role})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_key_is_a_hash_shown_once_and_refused_after_revocation(vbatch_home):
    with serving(_app(api={"admin_keys": (ADMIN,)})) as url, api_client(_app(api={"admin_keys": (ADMIN,)})) as client:
        team = _project(client, "team-a")
        lead = _key(client, team, ADMIN, role="admin", name="lead")
        member = _key(client, team, lead["value"], name="ci")
        assert member["value"].startswith("sk-vb-") and member["redacted_value"].endswith(member["value"][-4:])
        assert "value" not in client.get(f"/v1/organization/projects/{team}/api_keys/{member['id']}",
                                         headers=_bearer(lead["value"])).json()  # shown once, at creation

        # The DB holds its hash, never the secret.
        database = (vbatch_home / "vbatch.db").read_bytes() + b"".join(
            path.read_bytes() for path in vbatch_home.glob("vbatch.db-wal"))
        assert member["value"].encode() not in database
        assert hashlib.sha256(member["value"].encode()).hexdigest().encode() in database

        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=member["value"], max_retries=0)
        uploaded = sdk.files.create(file=("in.jsonl", b'{"custom_id": "a"}\n'), purpose="batch")
        assert [f.id for f in sdk.files.list()] == [uploaded.id]

        gone = client.delete(f"/v1/organization/projects/{team}/api_keys/{member['id']}",
                             headers=_bearer(lead["value"]))
        assert gone.json() == {"object": "organization.project.api_key.deleted", "id": member["id"], "deleted": True}
        with pytest.raises(openai.AuthenticationError, match="Incorrect API key"):
            sdk.files.list()  # the next request: no restart
        assert member["id"] not in [k["id"] for k in client.get(f"/v1/organization/projects/{team}/api_keys",
                                                                   headers=_bearer(lead["value"])).json()["data"]]

        # An archived project's keys stop working too.
        assert client.post(f"/v1/organization/projects/{team}/archive", headers=_bearer(ADMIN)).json()["status"] \
            == "archived"
        openai_error(client.get("/v1/files", headers=_bearer(lead["value"])), 401, "invalid_api_key")


def test_another_projects_ids_are_404_and_a_member_is_403(vbatch_home):
    with api_client(_app(api={"admin_keys": (ADMIN,)})) as client:
        a, b = _project(client, "team-a"), _project(client, "team-b")
        a_admin, b_admin = _key(client, a, ADMIN, role="admin")["value"], _key(client, b, ADMIN, role="admin")
        a_member = _key(client, a, a_admin)["value"]

        assert [p["id"] for p in client.get("/v1/organization/projects", headers=_bearer(a_admin)).json()["data"]] \
            == [a]
        for path in (f"/v1/organization/projects/{b}", f"/v1/organization/projects/{b}/api_keys",
                     f"/v1/organization/projects/{b}/api_keys/{b_admin['id']}"):
            openai_error(client.get(path, headers=_bearer(a_admin)), 404)
        # B's key through A's project: not there either (and still working)
        openai_error(client.delete(f"/v1/organization/projects/{a}/api_keys/{b_admin['id']}",
                                   headers=_bearer(a_admin)), 404, "api_key_not_found")
        assert client.get("/v1/files", headers=_bearer(b_admin["value"])).status_code == 200

        openai_error(client.get(f"/v1/organization/projects/{a}/api_keys", headers=_bearer(a_member)), 403,
                     "project_admin_required")
        openai_error(client.post("/v1/organization/projects", json={"name": "mine"}, headers=_bearer(a_admin)), 403,
                     "admin_key_required")
        openai_error(client.post("/v1/models", json={"source": "x"}, headers=_bearer(a_admin)), 403)  # host: admins

        # Bad input: a clear error, nothing made.
        openai_error(client.post(f"/v1/organization/projects/{a}/api_keys", headers=_bearer(a_admin),
                                 json={"name": "x", "owner": "y", "role": "owner"}), 400, param="role")
        openai_error(client.post("/v1/organization/projects", headers=_bearer(ADMIN), json={"name": "  "}), 400,
                     param="name")
        openai_error(client.post("/v1/organization/projects", headers=_bearer(ADMIN), json={"name": "team-a"}), 400,
                     "project_exists")
        assert len(client.get(f"/v1/organization/projects/{a}/api_keys", headers=_bearer(a_admin)).json()["data"]) == 2


def test_settings_keys_are_the_default_project_and_keys_turn_on_authentication(vbatch_home):
    with api_client(_app(api={"keys": ("sk-use",)})) as client:
        assert client.get("/v1/files", headers=_bearer("sk-use")).status_code == 200
        listed = client.get("/v1/organization/projects", headers=_bearer("sk-use")).json()["data"]
        assert [p["id"] for p in listed] == ["proj_default"]
        openai_error(client.get("/v1/files", headers=_bearer("sk-wrong")), 401, "invalid_api_key")

    with api_client(_app()) as client:  # no keys anywhere: the operator on loopback, an admin
        team = client.post("/v1/organization/projects", json={"name": "team"}).json()["id"]
        secret = client.post(f"/v1/organization/projects/{team}/api_keys",
                             json={"name": "k", "owner": "o"}).json()["value"]
        # From the first key on, every request needs one - and the loopback-only guard of the no-keys mode is off,
        # so a team reaches the API by its own name with project keys alone.
        openai_error(client.get("/v1/files"), 401, "missing_api_key")
        assert client.get("/v1/files", headers=_bearer(secret)).status_code == 200
        openai_error(client.get("/v1/files", headers={"Host": "vbatch.team.example"}), 401, "missing_api_key")
        assert client.get("/v1/files", headers={"Host": "vbatch.team.example", **_bearer(secret)}).status_code == 200


def test_the_cli_makes_lists_and_revokes_keys(vbatch_home):
    def vbatch(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)

    made = vbatch("projects", "create", "research")
    assert made.returncode == 0, made.stderr
    project = made.stdout.split()[0]
    key = vbatch("keys", "create", "--project", "research", "--name", "notebook", "--owner", "grace", "--role", "admin")
    assert key.returncode == 0, key.stderr
    key_id, secret = key.stdout.split()[0], key.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk-vb-")
    listed = vbatch("keys", "list", "--project", project).stdout
    assert key_id in listed and secret not in listed and "never used" in listed

    with api_client(_app()) as client:
        assert client.get("/v1/files", headers=_bearer(secret)).status_code == 200
        assert vbatch("keys", "revoke", key_id).returncode == 0
        openai_error(client.get("/v1/files", headers=_bearer(secret)), 401, "invalid_api_key")
    assert "revoked" in vbatch("keys", "list", "--all").stdout
    missing = vbatch("keys", "create", "--project", "nope", "--name", "n", "--owner", "o")
    assert missing.returncode == 2 and "No project with id or name 'nope'" in missing.stderr


def test_the_console_pages_make_keys_show_the_secret_once_and_revoke_them(vbatch_home):
    with api_client(_app(api={"admin_keys": (ADMIN,)}), follow_redirects=False) as console:
        console.post("/ui/login", data={"key": ADMIN, "next": "/ui/projects"})
        made = console.post("/ui/projects", data={"name": "labelers"})
        assert made.status_code == 303
        project_url = made.headers["location"]
        project = project_url.rsplit("/", 1)[1]
        page = console.post(f"{project_url}/keys", data={"name": "tablet", "owner": "ada", "role": "member"})
        assert page.status_code == 200 and 'id="new-key-secret"' in page.text
        secret = page.text.split('<pre id="new-key-secret">')[1].split("</pre>")[0]
        assert secret.startswith("sk-vb-")
        again = console.get(project_url).text
        assert "tablet" in again and secret not in again  # once

        with api_client(_app(api={"admin_keys": (ADMIN,)})) as api:
            assert api.get("/v1/files", headers=_bearer(secret)).status_code == 200
            key_id = api.get(f"/v1/organization/projects/{project}/api_keys",
                             headers=_bearer(ADMIN)).json()["data"][0]["id"]
            assert console.post(f"{project_url}/keys/{key_id}/revoke").status_code == 303
            openai_error(api.get("/v1/files", headers=_bearer(secret)), 401, "invalid_api_key")

        # A member's key logs into the console but manages no project, and makes none.
        member = console.post(f"{project_url}/keys", data={"name": "n", "owner": "o"}).text
        member_secret = member.split('<pre id="new-key-secret">')[1].split("</pre>")[0]
    with api_client(_app(api={"admin_keys": (ADMIN,)}), follow_redirects=False) as console:
        console.post("/ui/login", data={"key": member_secret, "next": "/ui"})
        refused = console.get("/ui/projects")
        assert "managed with an admin key" in refused.text and 'id="projects"' not in refused.text
        assert f'href="/ui/projects/{project}"' not in refused.text and "Project: labelers" in refused.text
        console.post("/ui/projects", data={"name": "sneaky"})
        with api_client(_app(api={"admin_keys": (ADMIN,)})) as api:
            names = [p["name"] for p in api.get("/v1/organization/projects", headers=_bearer(ADMIN)).json()["data"]]
        assert "sneaky" not in names


def test_the_audit_log_says_who_did_what(vbatch_home, tiny_model_path):
    import shutil

    from tests.conftest import chat_lines, jsonl

    shutil.copytree(tiny_model_path, vbatch_home / "models" / "local-tiny")  # a source admins may install from
    with api_client(_app(api={"admin_keys": (ADMIN,)})) as client:
        team = _project(client, "team-a")
        lead = _key(client, team, ADMIN, role="admin", name="lead")
        member = _key(client, team, lead["value"], name="ci")
        client.delete(f"/v1/organization/projects/{team}/api_keys/{member['id']}", headers=_bearer(lead["value"]))
        installed = client.post("/v1/models", headers=_bearer(ADMIN),
                                json={"source": str(vbatch_home / "models" / "local-tiny"), "id": "local-tiny"})
        assert installed.status_code == 200, installed.text
        from vbatch_pipelines.models.store import upsert_model
        from vbatch_pipelines.settings import load_settings
        from vbatch_pipelines.store.db import get_database

        # as its install run does
        upsert_model(get_database(load_settings().storage.database_url), "local-tiny", status="ready")
        assert client.delete("/v1/models/local-tiny", headers=_bearer(ADMIN)).status_code == 200
        uploaded = client.post("/v1/files", headers=_bearer(lead["value"]), data={"purpose": "batch"},
                               files={"file": ("in.jsonl", jsonl(chat_lines(2)))}).json()
        batch = client.post("/v1/batches", headers=_bearer(lead["value"]), json={
            "input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions", "completion_window": "24h"}).json()
        assert client.post(f"/v1/batches/{batch['id']}/cancel", headers=_bearer(lead["value"])).status_code == 200
        other = client.post("/v1/files", headers=_bearer(lead["value"]), data={"purpose": "batch"},
                            files={"file": ("x.jsonl", jsonl(chat_lines(1)))}).json()
        assert client.delete(f"/v1/files/{other['id']}", headers=_bearer(lead["value"])).status_code == 200

        openai_error(client.get("/v1/organization/audit_logs", headers=_bearer(lead["value"])), 403)  # admins only
        events = client.get("/v1/organization/audit_logs", headers=_bearer(ADMIN)).json()["data"]
        seen = [(e["type"], e["actor"]["api_key"]["name"], e[e["type"]]["id"]) for e in reversed(events)]
        assert seen == [("project.created", "VBATCH_ADMIN_KEYS", team), ("api_key.created", "VBATCH_ADMIN_KEYS",
                        lead["id"]), ("api_key.created", "lead", member["id"]), ("api_key.revoked", "lead",
                        member["id"]), ("model.installed", "VBATCH_ADMIN_KEYS", "local-tiny"),
                        ("model.deleted", "VBATCH_ADMIN_KEYS", "local-tiny"), ("batch.cancelled", "lead", batch["id"]),
                        ("file.deleted", "lead", other["id"])]
        assert all(e["project"]["id"] == (team if e["actor"]["api_key"]["name"] == "lead" else "proj_default")
                   for e in events)
        assert client.post("/ui/login", data={"key": ADMIN, "next": "/ui/audit"}).status_code in (200, 303)
        page = client.get("/ui/audit")
        assert page.status_code == 200 and all(f"<td>{t}</td>" in page.text for t, _, _ in seen)
        only = client.get("/v1/organization/audit_logs", params={"event_types[]": "api_key.revoked"},
                          headers=_bearer(ADMIN)).json()["data"]
        assert [e["api_key.revoked"]["id"] for e in only] == [member["id"]]


def _gold_stars(db, project: str, count: int, first_task: int) -> None:
    """What the Label Studio sensor records when a project's experts star answers (that path has its own tests)."""
    from tests.conftest import record_review
    from vbatch_pipelines.curation.schemas import Review
    from vbatch_pipelines.curation.service import add_tasks

    rows = [{"batch_id": f"batch_{project}", "custom_id": f"r-{i}", "schema": "chat_review", "model": "m",
             "messages": [{"role": "user", "content": f"{project} question {i}?"}], "response": "draft",
             "ls_project_id": 1, "ls_task_id": first_task + i, "project_id": project} for i in range(count)]
    add_tasks(db, rows)
    for row in rows:
        record_review(db, row["ls_task_id"], Review(answer="an answer", rating=5, gold_star=True))


def test_each_project_sees_and_acts_on_its_own_objects_only(vbatch_home):
    """Two projects' keys through the openai SDK: files, batches, fine-tuning jobs, datasets, curation tasks and
    fine-tuned models of one are a 404 to the other (never a 403 that confirms them), lists hold one's own, and
    every record says which key made it. A fine-tune is served to its project until one of its admins shares it."""
    from tests.conftest import chat_lines, jsonl
    from vbatch_pipelines.curation.dataset import build_dataset
    from vbatch_pipelines.models.registry import TINY_MODEL_ID
    from vbatch_pipelines.models.store import register_fine_tune
    from vbatch_pipelines.settings import load_settings
    from vbatch_pipelines.store.db import get_database
    from vbatch_pipelines.store.models import Owner

    app = _app(api={"admin_keys": (ADMIN,)})
    with serving(app) as url, api_client(app) as client:
        a, b = _project(client, "team-a"), _project(client, "team-b")
        a_admin, b_member = _key(client, a, ADMIN, role="admin"), _key(client, b, ADMIN)
        a_member = _key(client, a, a_admin["value"], name="intern")
        sdk_a = openai.OpenAI(base_url=f"{url}/v1", api_key=a_admin["value"], max_retries=0)
        sdk_b = openai.OpenAI(base_url=f"{url}/v1", api_key=b_member["value"], max_retries=0)
        training = jsonl([{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
                          for i in range(12)])

        a_input = sdk_a.files.create(file=("a.jsonl", jsonl(chat_lines(3))), purpose="batch")
        a_train = sdk_a.files.create(file=("train.jsonl", training), purpose="fine-tune")
        a_batch = sdk_a.batches.create(input_file_id=a_input.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
        b_input = sdk_b.files.create(file=("b.jsonl", jsonl(chat_lines(2))), purpose="batch")
        b_batch = sdk_b.batches.create(input_file_id=b_input.id, endpoint="/v1/chat/completions",
                                       completion_window="24h")
        a_job = sdk_a.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=a_train.id)
        # Every record says whose it is and which key made it.
        for made in (a_input, a_train, a_batch, a_job):
            assert (made.project_id, made.created_by) == (a, a_admin["id"])
        assert (b_batch.project_id, b_batch.created_by) == (b, b_member["id"])

        # Lists: one's own only.
        assert {f.id for f in sdk_a.files.list()} == {a_input.id, a_train.id}
        assert [f.id for f in sdk_b.files.list()] == [b_input.id]
        assert [x.id for x in sdk_a.batches.list()] == [a_batch.id]
        assert [x.id for x in sdk_b.batches.list()] == [b_batch.id]
        assert [j.id for j in sdk_a.fine_tuning.jobs.list()] == [a_job.id]
        assert list(sdk_b.fine_tuning.jobs.list()) == []
        # A cursor from the other project is no cursor.
        openai_error(client.get("/v1/batches", params={"after": a_batch.id}, headers=_bearer(b_member["value"])),
                     400, param="after")

        # By id: A's objects do not exist for B, whatever B tries - and stay as they were.
        for attempt in (lambda: sdk_b.files.retrieve(a_input.id), lambda: sdk_b.files.content(a_input.id),
                        lambda: sdk_b.files.delete(a_input.id), lambda: sdk_b.batches.retrieve(a_batch.id),
                        lambda: sdk_b.batches.cancel(a_batch.id),
                        lambda: sdk_b.batches.create(input_file_id=a_input.id, endpoint="/v1/chat/completions",
                                                     completion_window="24h"),
                        lambda: sdk_b.fine_tuning.jobs.retrieve(a_job.id),
                        lambda: sdk_b.fine_tuning.jobs.cancel(a_job.id),
                        lambda: sdk_b.fine_tuning.jobs.list_events(a_job.id),
                        lambda: sdk_b.fine_tuning.jobs.checkpoints.list(a_job.id),
                        lambda: sdk_b.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=a_train.id)):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert sdk_a.files.retrieve(a_input.id).id == a_input.id
        assert sdk_a.batches.retrieve(a_batch.id).status != "cancelling"
        assert sdk_a.fine_tuning.jobs.retrieve(a_job.id).status == "queued"
        assert [x.id for x in sdk_b.batches.list()] == [b_batch.id]  # B's refused create made nothing

        # Datasets and curation tasks: each project's gold stars make its own versions.
        db = get_database(load_settings().storage.database_url)
        _gold_stars(db, a, 12, first_task=100)
        _gold_stars(db, b, 2, first_task=200)
        home = load_settings().storage.home
        version_a = build_dataset(db, home / "datasets", source_seq=1, project_id=a).version
        version_b = build_dataset(db, home / "datasets", source_seq=1, project_id=b).version
        assert build_dataset(db, home / "datasets", source_seq=1, project_id=a).examples == 12
        as_a, as_b = _bearer(a_admin["value"]), _bearer(b_member["value"])
        assert [d["id"] for d in client.get("/v1/datasets", headers=as_b).json()["data"]] == [version_b]
        assert version_a in [d["id"] for d in client.get("/v1/datasets", headers=as_a).json()["data"]]
        for path in (f"/v1/datasets/{version_a}", f"/v1/datasets/{version_a}/export", "/v1/curation/tasks/100"):
            openai_error(client.get(path, headers=as_b), 404)
            assert client.get(path, headers=as_a).status_code == 200
        assert client.get("/v1/curation/stats", headers=as_b).json()["gold_stars"] == 2
        with pytest.raises(openai.NotFoundError):  # B cannot train on A's dataset either
            sdk_b.fine_tuning.jobs.create(model=TINY_MODEL_ID, training_file=version_a)

        # A fine-tune is served to its project only, until one of its admins shares it.
        spec = app.state.resources.model_registry.lookup(TINY_MODEL_ID).with_adapter(
            "ft:team-a-model", str(vbatch_home))
        register_fine_tune(db, spec, a_job.id, Owner(a, a_admin["id"]))
        assert "ft:team-a-model" in [m.id for m in sdk_a.models.list()]
        assert "ft:team-a-model" not in [m.id for m in sdk_b.models.list()]
        for attempt in (lambda: sdk_b.models.retrieve("ft:team-a-model"),
                        lambda: sdk_b.models.delete("ft:team-a-model"),
                        lambda: sdk_b.chat.completions.create(model="ft:team-a-model",
                                                              messages=[{"role": "user", "content": "hi"}])):
            with pytest.raises(openai.NotFoundError):
                attempt()
        openai_error(client.post("/v1/models/ft:team-a-model/share", json={"shared": True}, headers=as_b), 404)
        openai_error(client.post("/v1/models/ft:team-a-model/share", json={"shared": True},
                                 headers=_bearer(a_member["value"])), 403, "project_admin_required")
        shared = client.post("/v1/models/ft:team-a-model/share", json={"shared": True}, headers=as_a)
        assert shared.status_code == 200 and shared.json()["shared"] is True, shared.text
        assert "ft:team-a-model" in [m.id for m in sdk_b.models.list()]
        assert sdk_b.models.retrieve("ft:team-a-model").project_id == a
        with pytest.raises(openai.NotFoundError):  # shared to use, still A's to remove
            sdk_b.models.delete("ft:team-a-model")


def test_usage_per_project_sums_the_batches_own_usage_and_online_requests(platform):
    """Usage in OpenAI's shape, bucketed by day and grouped by project, key, model and batch: the batch sums are
    the batches' own ``usage``; online requests are counted for the key that made them; members are refused."""
    import time

    from tests.conftest import chat_lines, jsonl
    from vbatch_pipelines.models.registry import TINY_MODEL_ID
    from vbatch_pipelines.projects import create_key, create_project
    from vbatch_pipelines.store.models import Owner

    a, b = create_project(platform.db, "team-a").id, create_project(platform.db, "team-b").id
    key_a, secret_a = create_key(platform.db, a, "lead", "ada", role="admin")
    _, secret_b_member = create_key(platform.db, b, "ci", "bob")
    started = int(time.time())
    ended = []
    for owner, lines in ((Owner(a, key_a.id), 5), (Owner(a, "VBATCH_API_KEYS"), 3), (Owner(b, "key_b"), 4)):
        batch = platform.submit(jsonl(chat_lines(lines, prefix=f"u{lines}")), owner=owner)
        platform.materialize(batch.id)
        ended.append(platform.batch(batch.id))
    assert all(batch.status == "completed" and batch.usage["output_tokens"] for batch in ended)

    app = _app(api={"admin_keys": (ADMIN,)})
    with api_client(app) as client:
        online = client.post("/v1/chat/completions", headers=_bearer(secret_a), json={
            "model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        assert online.status_code == 200, online.text
        app.state.usage.flush(app.state.db)  # what the API does every few seconds
        answer = client.get("/v1/organization/usage/completions", headers=_bearer(ADMIN), params={
            "start_time": started - 60, "group_by[]": ["project_id", "batch"], "bucket_width": "1d"}).json()
        assert answer["object"] == "page" and answer["has_more"] is False
        results = [r for bucket in answer["data"] for r in bucket["results"]]
        assert all(r["object"] == "organization.usage.completions.result" for r in results)
        totals = {}
        for r in results:
            sums = totals.setdefault((r["project_id"], r["batch"]), [0, 0, 0])
            for i, field in enumerate(("input_tokens", "output_tokens", "num_model_requests")):
                sums[i] += r[field]

        def own(project):
            mine = [x for x in ended if x.project_id == project]
            return [sum(x.usage["input_tokens"] for x in mine), sum(x.usage["output_tokens"] for x in mine),
                    sum(x.request_completed for x in mine)]

        assert totals[(a, True)] == own(a) and totals[(b, True)] == own(b)
        usage = online.json()["usage"]
        assert totals[(a, False)] == [usage["prompt_tokens"], usage["completion_tokens"], 1]
        assert (b, False) not in totals

        # By key, one project's admin sees its own project only; a member is refused.
        by_key = client.get("/v1/organization/usage/completions", headers=_bearer(secret_a), params={
            "start_time": started - 60, "group_by": "api_key_id", "project_ids[]": b}).json()
        keys = {r["api_key_id"]: r["num_model_requests"] for bucket in by_key["data"] for r in bucket["results"]}
        assert keys == {key_a.id: 5 + 1, "VBATCH_API_KEYS": 3}
        openai_error(client.get("/v1/organization/usage/completions", headers=_bearer(secret_b_member),
                                params={"start_time": started}), 403, "project_admin_required")
        openai_error(client.get("/v1/organization/usage/completions", headers=_bearer(ADMIN),
                                params={"start_time": started, "bucket_width": "1w"}), 400, param="bucket_width")
        openai_error(client.get("/v1/organization/usage/completions", headers=_bearer(ADMIN),
                                params={"start_time": started, "group_by": "user"}), 400, param="group_by")
        # Every bucket of the range is there, empty ones too, a page at a time.
        hours = client.get("/v1/organization/usage/embeddings", headers=_bearer(ADMIN), params={
            "start_time": started - 3 * 3600, "end_time": started + 3600, "bucket_width": "1h", "limit": 2}).json()
        assert len(hours["data"]) == 2 and hours["has_more"] and all(not b["results"] for b in hours["data"])
        rest = client.get("/v1/organization/usage/embeddings", headers=_bearer(ADMIN), params={
            "start_time": started - 3 * 3600, "end_time": started + 3600, "bucket_width": "1h",
            "page": hours["next_page"]}).json()
        assert rest["data"][0]["start_time"] == hours["data"][-1]["end_time"] and not rest["has_more"]


def test_a_quota_is_a_429_naming_the_limit_and_loses_nothing(vbatch_home):
    """Concurrent batches, queued requests and tokens per day: past one, the SDK gets a 429 in OpenAI's shape (the
    limit named, x-ratelimit headers online), nothing is recorded, and what was accepted goes on."""
    from tests.conftest import chat_lines, jsonl
    from vbatch_pipelines.models.registry import TINY_MODEL_ID

    app = _app(api={"admin_keys": (ADMIN,)})
    with serving(app) as url, api_client(app) as client:
        team = _project(client, "team-a")
        lead = _key(client, team, ADMIN, role="admin")
        sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=lead["value"], max_retries=0)

        def limit(**body):
            return client.post(f"/v1/organization/projects/{team}", json=body, headers=_bearer(ADMIN))

        # Only platform admins set quotas; bad values are refused whole.
        openai_error(client.post(f"/v1/organization/projects/{team}", json={"quotas": {"max_concurrent_batches": 1}},
                                 headers=_bearer(lead["value"])), 403, "admin_key_required")
        openai_error(limit(quotas={"max_concurrent_batches": 0}), 400, param="quotas.max_concurrent_batches")
        openai_error(limit(quotas={"max_batches": 1}), 400, param="quotas.max_batches")
        openai_error(limit(weight=0), 400, param="weight")
        assert limit(quotas={"max_concurrent_batches": 1}).json()["quotas"] == {
            "max_concurrent_batches": 1, "max_queued_requests": None, "max_tokens_per_day": None}

        first = sdk.files.create(file=("a.jsonl", jsonl(chat_lines(3))), purpose="batch")
        accepted = sdk.batches.create(input_file_id=first.id, endpoint="/v1/chat/completions", completion_window="24h")
        second = sdk.files.create(file=("b.jsonl", jsonl(chat_lines(2))), purpose="batch")
        with pytest.raises(openai.RateLimitError) as refused:
            sdk.batches.create(input_file_id=second.id, endpoint="/v1/chat/completions", completion_window="24h")
        error = refused.value.body
        assert error["code"] == "rate_limit_exceeded" and error["type"] == "batches"
        assert "max_concurrent_batches quota of 1" in error["message"]
        assert [b.id for b in sdk.batches.list()] == [accepted.id]  # nothing recorded ...
        assert sdk.files.retrieve(second.id).id == second.id  # ... nothing lost
        assert sdk.batches.retrieve(accepted.id).status == "in_progress"

        # Queued requests: 3 are waiting; 2 more pass a limit of 4 only once the limit allows them.
        assert limit(quotas={"max_concurrent_batches": None, "max_queued_requests": 4}).status_code == 200
        with pytest.raises(openai.RateLimitError, match="max_queued_requests quota of 4: 3 requests are queued "
                                                        "and this batch adds 2"):
            sdk.batches.create(input_file_id=second.id, endpoint="/v1/chat/completions", completion_window="24h")
        single = sdk.files.create(file=("c.jsonl", jsonl(chat_lines(1))), purpose="batch")
        assert sdk.batches.create(input_file_id=single.id, endpoint="/v1/chat/completions",
                                  completion_window="24h").status == "in_progress"

        # Tokens per day: online answers carry OpenAI's headers; once the day's tokens are used, a 429 with them.
        assert limit(quotas={"max_queued_requests": None, "max_tokens_per_day": 8}).status_code == 200
        ask = {"model": TINY_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6}
        answered = client.post("/v1/chat/completions", json=ask, headers=_bearer(lead["value"]))
        assert answered.status_code == 200, answered.text
        assert answered.headers["x-ratelimit-limit-tokens"] == "8"
        assert answered.headers["x-ratelimit-remaining-tokens"] == "8"  # before this request
        used = answered.json()["usage"]["total_tokens"]
        assert used >= 8
        over = openai_error(client.post("/v1/chat/completions", json=ask, headers=_bearer(lead["value"])), 429,
                            "rate_limit_exceeded")
        assert "max_tokens_per_day quota of 8" in over["message"] and over["type"] == "tokens"
        again = client.post("/v1/chat/completions", json=ask, headers=_bearer(lead["value"]))
        assert again.headers["x-ratelimit-remaining-tokens"] == "0" and again.headers["x-ratelimit-reset-tokens"]
        app.state.usage.flush(app.state.db)  # as the API does within seconds: batches read the written usage
        with pytest.raises(openai.RateLimitError, match="max_tokens_per_day"):
            sdk.batches.create(input_file_id=second.id, endpoint="/v1/chat/completions", completion_window="24h")
        # Another project is not held back by this one's quota.
        other = _key(client, _project(client, "team-b"), ADMIN)
        fine = client.post("/v1/chat/completions", json=ask, headers=_bearer(other["value"]))
        assert fine.status_code == 200 and "x-ratelimit-limit-tokens" not in fine.headers

    limits = subprocess.run([*CLI, "projects", "set", "team-a", "--max-tokens-per-day", "none", "--weight", "3"],
                            capture_output=True, text=True, timeout=120)
    assert limits.returncode == 0 and "max_tokens_per_day none; weight 3" in limits.stdout, limits.stderr
    bad = subprocess.run([*CLI, "projects", "set", "team-a", "--max-concurrent-batches", "-2"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "a quota is a positive integer" in bad.stderr
