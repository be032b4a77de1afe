"""Each vbatch project's reviewers see only that project's tasks, in the real Label Studio (issue 27).

vbatch gives each project an organization of its own in the Label Studio it runs, its tasks go there with that
organization's token, and its reviewers are members of it alone. Label Studio Community would let one
organization's users at another's tasks through several routes; vbatch's settings for it
(vbatch_pipelines/curation/label_studio_teams) close them. Checked here as a reviewer's browser session does it,
and by the platform's own sensor reading each project's reviews back."""

from __future__ import annotations

import httpx
import pytest
from dagster import DagsterInstance, SensorResult, build_sensor_context, materialize

from tests.conftest import LabelStudioSession as Session
from tests.conftest import Platform, api_client, chat_lines, jsonl, openai_error
from vbatch_pipelines.curation.schemas import annotation_result


@pytest.fixture()
def teams(vbatch_home, label_studio_server, monkeypatch):
    """A platform whose Label Studio is the session's managed one (its credentials and teams in its state dir)."""
    server, conn = label_studio_server
    monkeypatch.setenv("VBATCH_CURATION", "on")
    platform = Platform()
    platform.configure("label_studio", url=conn.url, managed_dir=str(server.state_dir), managed_port=server.port,
                       envs_dir=str(server.envs_dir), token=None, enabled=True, disabled_reason="",
                       webhook_url=None, webhook_secret="teams-secret")
    return platform


def _curate(platform, owner, prefix: str) -> str:
    from vbatch_pipelines.defs.batches import batch_input, batch_output
    from vbatch_pipelines.defs.curation import curation_tasks
    from vbatch_pipelines.partitions import batch_partitions

    batch = platform.submit(jsonl(chat_lines(3, prefix=prefix)), owner=owner)
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(batch_partitions.name, [batch.id])
    assert materialize([batch_input, batch_output, curation_tasks], partition_key=batch.id,
                       resources=platform.resources, instance=instance).success
    return batch.id


def test_each_projects_reviewers_see_and_review_only_its_tasks(teams):
    from vbatch_pipelines.curation.service import gold_star_tasks, latest_change
    from vbatch_pipelines.defs.curation import label_studio_sensor
    from vbatch_pipelines.projects import add_reviewer, create_key, create_project
    from vbatch_pipelines.store.models import CurationTask, Owner

    db, label_studio = teams.db, teams.resources.label_studio
    a, b = create_project(db, "team-a").id, create_project(db, "team-b").id
    batch_a = _curate(teams, Owner(a, "key_a"), "a")
    batch_b = _curate(teams, Owner(b, "key_b"), "b")
    with db.session() as session:
        tasks = {row.custom_id: (row.ls_task_id, row.ls_project_id, row.project_id)
                 for row in session.query(CurationTask).filter(CurationTask.batch_id.in_([batch_a, batch_b]))}
    a_task, a_ls_project, _ = tasks["a-0"]
    b_task, b_ls_project, _ = tasks["b-0"]
    assert a_ls_project != b_ls_project and {t[2] for t in tasks.values()} == {a, b}

    # Reviewers: a login each, in their project's organization only (the password shown once).
    alice = add_reviewer(db, label_studio, a, "alice@example.com")
    bob = add_reviewer(db, label_studio, b, "bob@example.com")
    assert alice["password"] and alice["label_studio_url"] == label_studio.url
    as_alice = Session(label_studio.url, "alice@example.com", alice["password"])
    as_bob = Session(label_studio.url, "bob@example.com", bob["password"])
    assert as_alice.project_ids() == {a_ls_project} and as_bob.project_ids() == {b_ls_project}

    # Every road Label Studio Community leaves open between organizations is closed (404 or 403, never data).
    for session, theirs, their_task in ((as_alice, b_ls_project, b_task), (as_bob, a_ls_project, a_task)):
        for answer in (session.get(f"/api/projects/{theirs}/"), session.get(f"/api/tasks/{their_task}/"),
                       session.get("/api/tasks/", project=theirs),
                       session.get(f"/api/projects/{theirs}/summary/"),
                       session.send("POST", f"/api/tasks/{their_task}/annotations/",
                                    {"result": annotation_result("mine now", 1, True)}),
                       session.send("POST", "/api/tasks/", {"project": theirs, "data": {"text": "planted"}})):
            assert answer.status_code in (403, 404), (answer.request.url, answer.status_code, answer.text[:300])
        me = session.get("/api/current-user/whoami").json()
        moved = session.send("PATCH", f"/api/users/{me['id']}/", {"active_organization": 1})
        assert moved.status_code >= 400 and session.get("/api/current-user/whoami").json()[
            "active_organization"] == me["active_organization"]
    # An open sign-up page is no way in: people join through vbatch.
    signup = httpx.Client(base_url=label_studio.url, timeout=60, follow_redirects=False)
    signup.get("/user/signup/")
    csrf = signup.cookies.get("csrftoken", "")
    signup.post("/user/signup/", data={"email": "eve@example.com", "password": "eve-password-1",
                                       "csrfmiddlewaretoken": csrf},
                headers={"Referer": label_studio.url + "/", "X-CSRFToken": csrf})
    with pytest.raises(AssertionError):
        Session(label_studio.url, "eve@example.com", "eve-password-1")

    # Alice reviews her task as an expert does; the platform reads it back with her project's token.
    answer = as_alice.send("POST", f"/api/tasks/{a_task}/annotations/",
                           {"result": annotation_result("Alice's answer", 5, True)})
    assert answer.status_code == 201, answer.text[:300]
    context = build_sensor_context(cursor=None, resources={"metadata_db": teams.resources.metadata_db,
                                                           "label_studio": label_studio})
    result = label_studio_sensor(context)
    requests = result.run_requests if isinstance(result, SensorResult) else result
    assert [r.run_config["ops"]["gold_star_dataset"]["config"]["project_id"] for r in requests] == [a]
    assert [t.final_response() for t in gold_star_tasks(db, a)] == ["Alice's answer"]
    assert not gold_star_tasks(db, b) and latest_change(db, b) == 0

    # Through the API: a project's admin adds its reviewers, never another project's, never an existing login.
    from api.main import create_app
    from vbatch_pipelines.settings import load_settings

    app = create_app(load_settings())
    app.state.resources = app.state.resources.replace(label_studio=label_studio)
    _, a_admin = create_key(db, a, "lead", "ada", role="admin")
    _, b_admin = create_key(db, b, "lead", "bea", role="admin")
    with api_client(app) as client:
        made = client.post(f"/v1/organization/projects/{a}/reviewers", json={"email": "carol@example.com"},
                           headers={"Authorization": f"Bearer {a_admin}"})
        assert made.status_code == 200 and made.json()["password"], made.text
        assert Session(label_studio.url, "carol@example.com", made.json()["password"]).project_ids() == \
            {a_ls_project}
        openai_error(client.post(f"/v1/organization/projects/{a}/reviewers", json={"email": "dan@example.com"},
                                 headers={"Authorization": f"Bearer {b_admin}"}), 404)
        openai_error(client.post(f"/v1/organization/projects/{b}/reviewers", json={"email": "alice@example.com"},
                                 headers={"Authorization": f"Bearer {b_admin}"}), 409, "reviewer_exists")
        openai_error(client.post(f"/v1/organization/projects/{b}/reviewers",
                                 json={"email": "admin@vbatch.local"}, headers={"Authorization": f"Bearer {b_admin}"}),
                     400, param="email")
    assert as_alice.project_ids() == {a_ls_project}  # her login was left as it was


def test_label_studio_reaches_no_private_address_but_vbatchs_webhook(label_studio_server):
    """Label Studio runs with its SSRF protection on (issue 30): a webhook (or any URL a user gives it) into a
    private network, cloud metadata or this machine is refused; the one address vbatch takes its webhooks at
    (the API on 127.0.0.1) is not."""
    _, conn = label_studio_server
    headers = {"Authorization": f"Token {conn.token}"}
    project = httpx.post(conn.url + "/api/projects", json={"title": "ssrf"}, headers=headers, timeout=30).json()["id"]

    def webhook(url: str) -> httpx.Response:
        return httpx.post(conn.url + "/api/webhooks/", json={"project": project, "url": url, "send_payload": True},
                          headers=headers, timeout=30)

    for url in ("http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/hook", "http://192.168.1.1/hook",
                "http://127.0.0.2:4080/hook", "http://[::1]:4080/hook", "http://0.0.0.0:4080/hook"):
        refused = webhook(url)
        # 403 "URL resolves to a reserved network address"; an IPv6 literal Label Studio cannot even resolve (500)
        assert refused.status_code >= 400, (url, refused.status_code, refused.text)
    allowed = webhook("http://127.0.0.1:4080/v1/webhooks/label-studio")
    assert allowed.status_code == 201, allowed.text
    made = httpx.get(conn.url + "/api/webhooks/", params={"project": project}, headers=headers, timeout=30).json()
    assert [hook["url"] for hook in made] == ["http://127.0.0.1:4080/v1/webhooks/label-studio"]
