"""Projects and their keys (issue 27, first part): keys are records holding only a hash, shown once; a revoked key
is refused on its next request with no restart; a project's ids are a 404 to another project; VBATCH_API_KEYS and
VBATCH_ADMIN_KEYS keep working as the default project. Through the official openai SDK where a client calls."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import replace

import openai
import pytest

from tests.conftest import CLI, api_client, openai_error, serving

ADMIN = "sk-platform-admin"


def _app(**settings):
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    return create_app(replace(load_settings(), dagster_url="http://127.0.0.1:9", **settings))


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
    with serving(_app(admin_keys=(ADMIN,))) as url, api_client(_app(admin_keys=(ADMIN,))) as client:
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
    with api_client(_app(admin_keys=(ADMIN,))) as client:
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
    with api_client(_app(api_keys=("sk-use",))) as client:
        assert client.get("/v1/files", headers=_bearer("sk-use")).status_code == 200
        listed = client.get("/v1/organization/projects", headers=_bearer("sk-use")).json()["data"]
        assert [p["id"] for p in listed] == ["proj_default"]
        openai_error(client.get("/v1/files", headers=_bearer("sk-wrong")), 401, "invalid_api_key")

    with api_client(_app()) as client:  # no keys anywhere: the operator on loopback, an admin
        team = client.post("/v1/organization/projects", json={"name": "team"}).json()["id"]
        secret = client.post(f"/v1/organization/projects/{team}/api_keys",
                             json={"name": "k", "owner": "o"}).json()["value"]
        # From the first key on, every request needs one.
        openai_error(client.get("/v1/files"), 401, "missing_api_key")
        assert client.get("/v1/files", headers=_bearer(secret)).status_code == 200


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
    with api_client(_app(admin_keys=(ADMIN,)), follow_redirects=False) as console:
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

        with api_client(_app(admin_keys=(ADMIN,))) as api:
            assert api.get("/v1/files", headers=_bearer(secret)).status_code == 200
            key_id = api.get(f"/v1/organization/projects/{project}/api_keys",
                             headers=_bearer(ADMIN)).json()["data"][0]["id"]
            assert console.post(f"{project_url}/keys/{key_id}/revoke").status_code == 303
            openai_error(api.get("/v1/files", headers=_bearer(secret)), 401, "invalid_api_key")

        # A member's key logs into the console but manages no project, and makes none.
        member = console.post(f"{project_url}/keys", data={"name": "n", "owner": "o"}).text
        member_secret = member.split('<pre id="new-key-secret">')[1].split("</pre>")[0]
    with api_client(_app(admin_keys=(ADMIN,)), follow_redirects=False) as console:
        console.post("/ui/login", data={"key": member_secret, "next": "/ui"})
        refused = console.get("/ui/projects")
        assert "managed with an admin key" in refused.text and "labelers" not in refused.text
        console.post("/ui/projects", data={"name": "sneaky"})
        with api_client(_app(admin_keys=(ADMIN,))) as api:
            names = [p["name"] for p in api.get("/v1/organization/projects", headers=_bearer(ADMIN)).json()["data"]]
        assert "sneaky" not in names


def test_the_audit_log_says_who_did_what(vbatch_home, tiny_model_path):
    import shutil

    from tests.conftest import chat_lines, jsonl

    shutil.copytree(tiny_model_path, vbatch_home / "models" / "local-tiny")  # a source admins may install from
    with api_client(_app(admin_keys=(ADMIN,))) as client:
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

        upsert_model(get_database(load_settings().database_url), "local-tiny", status="ready")  # as its install run does
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
        page = client.get("/ui/audit", headers={"Cookie": f"vbatch_console={ADMIN}"})
        assert page.status_code == 200 and all(f"<td>{t}</td>" in page.text for t, _, _ in seen)
        only = client.get("/v1/organization/audit_logs", params={"event_types[]": "api_key.revoked"},
                          headers=_bearer(ADMIN)).json()["data"]
        assert [e["api_key.revoked"]["id"] for e in only] == [member["id"]]
