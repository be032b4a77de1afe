"""The Aris extension against real systems: Aristotle's PostgreSQL (a fresh database per test with the design
notes' DDL), the session's Label Studio, Dagster (sensor ticks and the sync asset with its checks), the REST API.
"""

from __future__ import annotations

import json

import pytest
from dagster import SkipReason, build_sensor_context, materialize
from sqlalchemy import create_engine, text

from tests.conftest import api_client, chat_line
from tests.test_curation import Curation, _requested
from vbatch_pipelines.curation.schemas import annotation_result
from vbatch_pipelines.store.db import normalize_url

PHILOSOPHER, DOMAIN = "ada@example.com", "engineering"


@pytest.fixture()
def aris(curation_home, aristotle_url, monkeypatch):
    monkeypatch.setenv("VBATCH_ARIS_DATABASE_URL", aristotle_url)
    from integrations.aris import extension

    extension.register()
    aris = Aris(aristotle_url)
    try:
        yield aris
    finally:
        aris.close()


class Aris(Curation):
    def __init__(self, url: str):
        super().__init__()
        self.aristotle = self.resources["aristotle"]
        self.sql_engine = create_engine(normalize_url(url), pool_pre_ping=True)
        self.aris_cursor: str | None = None

    def close(self) -> None:
        self.aristotle.dispose()
        self.sql_engine.dispose()

    def sql(self, statement: str, **params):
        with self.sql_engine.begin() as connection:
            result = connection.execute(text(statement), params)
            return result.mappings().all() if result.returns_rows else result.rowcount

    def add_conquests(self, ids: list[str], *, result: str = "PENDING", conquest_type: str = "candidate_evaluation",
                      philosopher: str = PHILOSOPHER, domain: str = DOMAIN) -> None:
        for conquest_id in ids:
            self.sql('INSERT INTO "Conquest" (id, "conquestType", title, result, philosopher, domain) '
                     "VALUES (:id, :type, :title, :result, :philosopher, :domain)", id=conquest_id, type=conquest_type,
                     title=f"Evaluate {conquest_id}", result=result, philosopher=philosopher, domain=domain)

    def conquest(self, conquest_id: str) -> dict:
        return dict(self.sql('SELECT * FROM "Conquest" WHERE id = :id', id=conquest_id)[0])

    def ratings(self, conquest_id: str) -> list[dict]:
        return [dict(r) for r in self.sql("SELECT * FROM ml_analysis_rating WHERE conquest_analysis_id = :id",
                                          id=conquest_id)]

    def run_conquests(self, ids: list[str], conquest_type: str = "candidate_evaluation", **extra) -> dict[str, int]:
        """A conquest batch through batch_input, batch_output and curation_tasks: custom_id -> task id."""
        from vbatch_pipelines.curation.service import known_custom_ids

        lines = [chat_line(conquest_id, f"Evaluate the candidate of conquest {conquest_id}.") for conquest_id in ids]
        batch_id = self.run_batch(lines, metadata={"aris": "conquest", "philosopher": PHILOSOPHER,
                                                  "domain": DOMAIN, "conquest_type": conquest_type, **extra})
        return known_custom_ids(self.db, batch_id)

    def star(self, task_id: int, answer: str | None = None, rating: int | None = None, gold: bool = True) -> None:
        """A review in Label Studio, as an expert makes it there, then read by the curation sensor."""
        task = self.client.tasks.get(str(task_id))
        annotations = task.annotations or []
        if annotations:
            current = annotations[-1]
            self.client.annotations.update(current["id"] if isinstance(current, dict) else current.id,
                                           result=annotation_result(answer, rating, gold))
        else:
            self.client.annotations.create(task_id, result=annotation_result(answer, rating, gold))
        self.tick()

    def aris_tick(self):
        from integrations.aris.defs import aristotle_sensor

        context = build_sensor_context(cursor=self.aris_cursor, instance=self.instance,
                                       resources={"metadata_db": self.resources.metadata_db,
                                                  "aristotle": self.aristotle, "label_studio": self.label_studio})
        result = aristotle_sensor(context)
        self.aris_cursor = context.cursor
        return result

    def settle(self) -> None:
        """A sensor tick and, when it asks for one, a sync run."""
        if _requested(self.aris_tick()):
            self.sync()

    def sync(self, expect_checks: bool = True):
        from integrations.aris.defs import (
            aris_sync,
            no_duplicate_rating_rows,
            no_failed_syncs,
            sides_agree,
            victories_linked,
        )

        result = materialize([aris_sync, sides_agree, no_failed_syncs, no_duplicate_rating_rows, victories_linked],
                             resources=self.resources, instance=self.instance, selection=[aris_sync.key],
                             raise_on_error=False)
        if expect_checks:
            assert result.success
            checks = result.get_asset_check_evaluations()
            assert len(checks) == 4 and all(c.passed for c in checks), [(c.check_name, c.metadata) for c in checks]
        return result

    def task(self, task_id: int):
        from vbatch_pipelines.curation.service import get_task

        return get_task(self.db, task_id)


def test_a_gold_star_becomes_a_victory_with_one_rating_row_and_replays_change_nothing(aris):
    aris.add_conquests(["c-1", "c-2"])
    tasks = aris.run_conquests(["c-1", "c-2"])
    assert aris.client.tasks.get(str(tasks["c-1"])).data["conquest_id"] == "c-1"
    aris.settle()  # the links' first agreement: nothing to write
    assert aris.conquest("c-1")["result"] == "PENDING" and not aris.ratings("c-1")

    aris.star(tasks["c-1"], "The candidate is strong in systems design.", 4)
    assert _requested(aris.aris_tick())
    aris.sync()
    row = aris.conquest("c-1")
    assert row["result"] == "VICTORY" and row["useAsExample"] is True and row["evaluatedAt"] is not None
    assert row["evaluatedBy"] == "admin@vbatch.local"
    (rating,) = aris.ratings("c-1")
    assert rating["id"] == f"vbatch-{aris.db.install_id()}-c-1" and rating["is_gold_star"]
    assert rating["use_as_sample_response"]
    assert (rating["rating"], rating["analysis_type"], rating["label_studio_task_id"]) == (4, "conquest_analysis",
                                                                                         tasks["c-1"])
    assert (rating["philosopher"], rating["domain"]) == (PHILOSOPHER, DOMAIN)
    assert aris.conquest("c-2")["result"] == "PENDING" and not aris.ratings("c-2")

    # No echo: vbatch's own write, read back, is no change; replays write nothing new.
    for _ in range(5):
        assert isinstance(aris.aris_tick(), SkipReason)
    aris.sync()
    assert aris.conquest("c-1")["updatedAt"] == row["updatedAt"] and len(aris.ratings("c-1")) == 1

    # Un-star: the result goes back to what it was, the flags come down.
    aris.star(tasks["c-1"], "The candidate is strong in systems design.", 4, gold=False)
    assert _requested(aris.aris_tick())
    aris.sync()
    row = aris.conquest("c-1")
    assert (row["result"], row["useAsExample"]) == ("PENDING", False)
    (rating,) = aris.ratings("c-1")
    assert not rating["is_gold_star"] and not rating["use_as_sample_response"]


def test_a_victory_set_in_aristotle_becomes_a_gold_star_with_the_edit_kept(aris):
    aris.add_conquests(["v-1", "v-2"])
    aris.sql("""UPDATE "Conquest" SET "updatedAt" = now() - interval '1 hour' WHERE id = 'v-2'""")
    tasks = aris.run_conquests(["v-1", "v-2"])
    aris.star(tasks["v-1"], "An expert's corrected analysis.", 3, gold=False)
    aris.settle()

    # The Aristotle app writes VICTORY (and bumps "updatedAt" itself).
    aris.sql("""UPDATE "Conquest" SET result = 'VICTORY', "updatedAt" = now() WHERE id = 'v-1'""")
    assert _requested(aris.aris_tick())
    aris.sync()
    task = aris.task(tasks["v-1"])
    assert task.gold_star and task.edited_response == "An expert's corrected analysis." and task.rating == 3
    assert _requested(aris.tick())  # the curation sensor asks for a new dataset version
    version, _ = aris.build_dataset()
    assert "An expert's corrected analysis." in [e["messages"][-1]["content"] for e in aris.all_examples(version)]
    for _ in range(5):
        assert isinstance(aris.aris_tick(), SkipReason)

    # DEFEAT set there on a starred conquest: the star comes off.
    aris.sql("""UPDATE "Conquest" SET result = 'DEFEAT', "updatedAt" = now() WHERE id = 'v-1'""")
    assert _requested(aris.aris_tick())
    aris.sync()
    assert not aris.task(tasks["v-1"]).gold_star and aris.conquest("v-1")["result"] == "DEFEAT"

    # A raw update that leaves "updatedAt" alone (an hour old: outside the look-back) is caught by the full
    # re-read of linked conquests.
    aris.sql("""UPDATE "Conquest" SET result = 'VICTORY' WHERE id = 'v-2'""")
    assert isinstance(aris.aris_tick(), SkipReason), "not seen by the updatedAt cursor"
    aris.aris_cursor = json.dumps({**json.loads(aris.aris_cursor), "full_at": 0})  # a full re-read is due
    assert _requested(aris.aris_tick())
    aris.sync()
    assert aris.task(tasks["v-2"]).gold_star


def test_a_star_and_a_victory_in_the_same_tick_converge_and_aristotle_wins_conflicts(aris):
    aris.add_conquests(["s-1", "s-2"])
    tasks = aris.run_conquests(["s-1", "s-2"])
    aris.settle()
    # Both sides say gold for s-1 (they agree); for s-2 vbatch stars while Aristotle says DEFEAT.
    aris.star(tasks["s-1"], None, 5)
    aris.star(tasks["s-2"], None, 5)
    aris.sql("""UPDATE "Conquest" SET result = 'VICTORY', "updatedAt" = now() WHERE id = 's-1'""")
    aris.sql("""UPDATE "Conquest" SET result = 'DEFEAT', "updatedAt" = now() WHERE id = 's-2'""")
    assert _requested(aris.aris_tick())
    aris.sync()
    assert aris.task(tasks["s-1"]).gold_star and aris.conquest("s-1")["result"] == "VICTORY"
    assert not aris.task(tasks["s-2"]).gold_star and aris.conquest("s-2")["result"] == "DEFEAT"
    from integrations.aris.models import ArisEvent

    with aris.db.session() as session:
        conflicts = [e.conquest_id for e in session.query(ArisEvent).filter_by(kind="conflict")]
    assert conflicts == ["s-2"]
    assert isinstance(aris.aris_tick(), SkipReason)


def test_conflicts_are_visible_in_the_sync_metadata_and_listed_by_the_api(aris, monkeypatch):
    from api.main import create_app
    from integrations.aris.models import ArisEvent

    aris.add_conquests(["k-1", "k-2"])
    tasks = aris.run_conquests(["k-1", "k-2"])
    aris.settle()
    aris.star(tasks["k-1"], "An expert's verdict.", 4)  # vbatch stars while the Aristotle app says DEFEAT
    aris.sql("""UPDATE "Conquest" SET result = 'DEFEAT', "updatedAt" = now() WHERE id = 'k-1'""")
    assert _requested(aris.aris_tick())
    meta = aris.sync().asset_materializations_for_node("aris_sync")[0].metadata
    assert meta["conflict"].value == 1 and meta["conflicts_total"].value == 1
    (shown,) = meta["recent_conflicts"].value
    row = aris.conquest("k-1")
    assert shown["conquest_id"] == "k-1" and shown["object"] == "aris.conflict" and shown["winner"] == "aristotle"
    assert (shown["aristotle_result"], shown["vbatch_gold_star"], shown["agreed_gold"]) == ("DEFEAT", True, False)
    assert shown["task_id"] == tasks["k-1"] and shown["created_at"] > 0
    assert shown["aristotle_updated_at"] == row["updatedAt"].isoformat(timespec="microseconds")

    with aris.db.session() as session:  # more conflicts than a page: the list is paginated, newest first
        for n in range(4):
            session.add(ArisEvent(conquest_id="k-2", kind="conflict", created_at=shown["created_at"] + 1 + n,
                                  detail={"winner": "aristotle", "aristotle_result": "NEUTRAL",
                                          "vbatch_gold_star": bool(n % 2)}))
        session.add(ArisEvent(conquest_id="k-2", kind="to_aristotle", created_at=shown["created_at"] + 9))
    monkeypatch.setenv("VBATCH_API_KEYS", "aris-key")
    with api_client(create_app()) as client:
        assert client.get("/v1/aris/conflicts").status_code == 401, "the API key is required, as on all of /v1"
        key = {"Authorization": "Bearer aris-key"}
        first = client.get("/v1/aris/conflicts", params={"limit": 3}, headers=key).json()
        assert [c["conquest_id"] for c in first["data"]] == ["k-2"] * 3 and first["has_more"] is True
        rest = client.get("/v1/aris/conflicts", params={"limit": 3, "after": first["last_id"]}, headers=key).json()
        assert [c["conquest_id"] for c in rest["data"]] == ["k-2", "k-1"] and rest["has_more"] is False
        assert rest["data"][-1] == shown
        assert all(c["object"] == "aris.conflict" for c in first["data"] + rest["data"])
        for bad in ({"limit": 0}, {"limit": 101}, {"after": "abc"}, {"after": "999999"}):
            response = client.get("/v1/aris/conflicts", params=bad, headers=key)
            assert response.status_code == 400 and response.json()["error"]["param"], bad


def test_many_conquests_sharing_one_updated_at_are_each_read_once(aris):
    from integrations.aris.aristotle import Conquest

    aris.sql("""INSERT INTO "Conquest" (id, philosopher, domain, "updatedAt")
                SELECT 'bulk-' || lpad(i::text, 5, '0'), 'p', 'd', timestamp '2026-01-01 00:00:00'
                FROM generate_series(1, 1500) AS i""")
    pages = list(aris.aristotle.changed_since(None, page=400))
    ids = [c.id for page in pages for c in page]
    assert len(ids) == 1500 == len(set(ids)) and len(pages) == 4
    assert all(isinstance(c, Conquest) for c in pages[0])


def test_push_endpoint_answers_success_replay_404_409_202_and_503(aris, label_studio_server):
    from api.main import create_app

    aris.add_conquests(["p-1", "p-2", "p-late"])
    aris.add_conquests(["p-pending"], result="PENDING")
    tasks = aris.run_conquests(["p-1", "p-2"])
    body = {"conquest_id": "p-1", "philosopher": PHILOSOPHER, "domain": DOMAIN, "result_notes": "Great"}
    with api_client(create_app()) as client:
        push = lambda **changes: client.post("/v1/sync/victory-to-gold-star", json={**body, **changes})  # noqa: E731
        assert push().status_code == 409 and push().json()["error"]["code"] == "not_victory"
        aris.sql("""UPDATE "Conquest" SET result = 'VICTORY', "updatedAt" = now() WHERE id IN ('p-1', 'p-late')""")
        first = push()
        assert first.status_code == 200, first.text
        assert first.json() == {"status": "success", "conquest_id": "p-1", "task_id": tasks["p-1"], "gold_star": True,
                                "changed": True, "message": first.json()["message"]}
        assert aris.task(tasks["p-1"]).gold_star
        replay = push()
        assert replay.status_code == 200 and replay.json()["changed"] is False
        assert push(philosopher="someone@else").status_code == 404
        missing = push(conquest_id="nope")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "conquest_not_found"
        assert push(conquest_id="p-pending").status_code == 409
        late = push(conquest_id="p-late")
        assert late.status_code == 202 and late.json()["status"] == "pending" and late.json()["task_id"] is None
        assert client.post("/v1/sync/victory-to-gold-star", json={"conquest_id": "x"}).status_code == 400

        # Label Studio down: 503 and nothing half-done.
        aris.sql("""UPDATE "Conquest" SET result = 'VICTORY', "updatedAt" = now() WHERE id = 'p-2'""")
        server, _ = label_studio_server
        server.stop()
        try:
            down = push(conquest_id="p-2")
            assert down.status_code == 503, down.text
            assert not aris.task(tasks["p-2"]).gold_star
        finally:
            server.ensure()
        assert push(conquest_id="p-2").json()["changed"] is True
    # The late conquest's result arrives: it becomes a gold star through the sensor and the sync.
    late_tasks = aris.run_conquests(["p-late"])
    assert _requested(aris.aris_tick())
    aris.sync()
    assert aris.task(late_tasks["p-late"]).gold_star


def test_icl_examples_filter_format_limit_and_keep_answering_without_aristotle(aris):
    from api.main import create_app

    aris.add_conquests(["i-1", "i-2", "i-3"])
    aris.add_conquests(["i-other"], philosopher="bob@example.com")
    aris.add_conquests(["i-cv"], conquest_type="cv_parsing")
    tasks = aris.run_conquests(["i-1", "i-2", "i-3"])
    other = aris.run_conquests(["i-other"])
    cv = aris.run_conquests(["i-cv"], conquest_type="cv_parsing")
    aris.star(tasks["i-1"], "Edited: hire for the platform team.", 5)
    aris.star(tasks["i-2"], None, 4)
    aris.star(other["i-other"], None, 5)
    aris.star(cv["i-cv"], '{"name": "Ada", "experience": [{"title": "Engineer"}]}', 5)
    aris.aris_tick()
    aris.sync()
    with api_client(create_app()) as client:
        get = lambda **params: client.get("/v1/icl/examples", params={"philosopher": PHILOSOPHER,  # noqa: E731
                                                                      "domain": DOMAIN, **params})
        page = get().json()
        assert page["count"] == 3 and page["format"] == "chatml" and page["philosopher"] == PHILOSOPHER
        ids = [e["conquest_id"] for e in page["examples"]]
        assert set(ids) == {"i-1", "i-2", "i-cv"} and "i-3" not in ids and "i-other" not in ids
        first = next(e for e in page["examples"] if e["conquest_id"] == "i-1")
        assert first["messages"][-1] == {"role": "assistant", "content": "Edited: hire for the platform team."}
        assert first["text"].startswith("<|im_start|>user") and first["rating"] == 5
        assert first["task_id"] == tasks["i-1"]
        only_cv = get(conquest_type="cv_parsing").json()
        assert [e["conquest_id"] for e in only_cv["examples"]] == ["i-cv"]
        alpaca = get(format="alpaca", limit=1).json()
        assert alpaca["count"] == 1 and set(alpaca["examples"][0]) >= {"instruction", "input", "output"}
        assert "text" not in alpaca["examples"][0]
        assert get(format="openai", exclude=["i-1", "i-2"]).json()["count"] == 1
        ranked = get(query="platform team hire").json()["examples"]
        assert ranked[0]["conquest_id"] == "i-1"
        for bad in ({"limit": 0}, {"limit": 101}, {"format": "xml"}, {"philosopher": ""}):
            response = get(**bad)
            assert response.status_code == 400 and response.json()["error"]["param"], bad
        # Aristotle down: examples are served from vbatch's own DB.
        aris.sql("SELECT 1")
        aris.aristotle.dispose()
        name = aris.sql_engine.url.database
        aris.sql_engine.dispose()
        admin = create_engine(normalize_url(aris.sql_engine.url.set(database="postgres").render_as_string(False)),
                              isolation_level="AUTOCOMMIT")
        with admin.connect() as connection:
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            connection.exec_driver_sql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
        try:
            assert get().json()["count"] == 3
            down = client.post("/v1/sync/victory-to-gold-star", json={"conquest_id": "i-3", "philosopher": PHILOSOPHER,
                                                                      "domain": DOMAIN})
            assert down.status_code == 503 and down.json()["error"]["code"] == "aristotle_unavailable"
        finally:
            with admin.connect() as connection:
                connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            admin.dispose()
    from integrations.aris.models import ArisLink

    with aris.db.session() as session:
        assert session.get(ArisLink, "i-1").icl_uses == 3, "each served example's use is counted"


def test_a_cv_parsing_answer_must_match_its_json_schema(aris):
    from integrations.aris.schemas import conquest_schemas

    cv = conquest_schemas()["cv_parsing"]
    assert cv.validate('{"name": "Ada", "experience": []}') is None
    assert "experience" in cv.validate('{"name": "Ada"}')
    assert "not valid JSON" in cv.validate("Ada, engineer")
    assert conquest_schemas()["candidate_evaluation"].validate("anything") is None


def test_with_aris_off_no_aris_route_sensor_or_asset_exists(vbatch_home, monkeypatch):
    import subprocess
    import sys

    from api.main import create_app

    monkeypatch.delenv("VBATCH_ARIS_DATABASE_URL", raising=False)
    paths = create_app().openapi()["paths"]
    assert not [p for p in paths if "/sync/" in p or "/icl/" in p or "/aris/" in p]
    code = ("import vbatch_pipelines.definitions as d; r = d.defs.get_repository_def(); "
            "print(sorted(s.name for s in r.sensor_defs)); print(sorted(k.to_user_string() for k in "
            "r.asset_graph.get_all_asset_keys())); print('aristotle' in d.RESOURCES)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "aristotle_sensor" not in out and "aris_sync" not in out and out.strip().endswith("False")
    monkeypatch.setenv("VBATCH_ARIS_DATABASE_URL", "postgresql://nobody@127.0.0.1:9/aristotle")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "aristotle_sensor" in out and "aris_sync" in out and out.strip().endswith("True")
    paths = create_app().openapi()["paths"]
    assert "/v1/icl/examples" in paths and "/v1/aris/conflicts" in paths


def _set_connections(url, allowed: bool) -> None:
    """Make Aristotle's database refuse (or accept again) connections, dropping the open ones."""
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    admin = create_engine(normalize_url(make_url(url).set(database="postgres").render_as_string(False)),
                          isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allowed else "false"}')
        if not allowed:
            connection.exec_driver_sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                       f"WHERE datname = '{name}' AND pid <> pg_backend_pid()")
    admin.dispose()


def test_aristotle_going_down_mid_sync_loses_nothing(aris, aristotle_url, monkeypatch):
    from integrations.aris.aristotle import Aristotle

    ids = [f"d-{i}" for i in range(10)]
    aris.add_conquests(ids)
    tasks = aris.run_conquests(ids)
    aris.settle()
    for conquest_id in ids:
        aris.client.annotations.create(tasks[conquest_id], result=annotation_result(None, 5, True))
    aris.tick()
    assert _requested(aris.aris_tick())

    real = Aristotle.mark_victory
    written = []

    def fails_after_four(self, *args, **kwargs):
        if len(written) == 4:
            _set_connections(aristotle_url, False)
        result = real(self, *args, **kwargs)
        written.append(result)
        return result

    monkeypatch.setattr(Aristotle, "mark_victory", fails_after_four)
    try:
        failed = aris.sync(expect_checks=False)
        assert not failed.success and len(written) == 4
        assert isinstance(aris.aris_tick(), SkipReason), "Aristotle down: skip, the cursor stays"
    finally:
        _set_connections(aristotle_url, True)
    monkeypatch.setattr(Aristotle, "mark_victory", real)
    from integrations.aris.models import ArisLink

    with aris.db.session() as session:  # the back-off has run out when Aristotle is back
        session.query(ArisLink).update({ArisLink.next_attempt_at: 0})
    assert _requested(aris.aris_tick())
    aris.sync()  # the checks pass: both sides agree, no failed link, one rating row each
    assert sum(aris.conquest(c)["result"] == "VICTORY" for c in ids) == 10
    assert sum(len(aris.ratings(c)) for c in ids) == 10


def test_one_change_arriving_by_webhook_sensor_and_api_at_once_writes_once(aris):
    import threading

    from api.main import create_app
    from integrations.aris.models import ArisEvent, ArisLink

    aris.add_conquests(["w-1"])
    tasks = aris.run_conquests(["w-1"])
    task_id = tasks["w-1"]
    aris.settle()
    before = aris.conquest("w-1")["updatedAt"]
    # An expert stars the task in Label Studio; the change then arrives three ways at once: Label Studio's
    # webhook, the sensors (curation, then Aris, then the sync run), and a reviewer starring it through the API.
    annotation = aris.client.annotations.create(task_id, result=annotation_result("Hire her.", 4, True))
    event = {"action": "ANNOTATION_CREATED", "task": {"id": task_id}, "annotation": annotation.model_dump(mode="json")}
    barrier = threading.Barrier(3)
    answers, errors = {}, []
    with api_client(create_app()) as client:
        def call(name: str, fn) -> None:
            try:
                barrier.wait()
                answers[name] = fn()
            except Exception as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=call, args=("webhook", lambda: client.post(
                       "/v1/webhooks/label-studio", json=event,
                       headers={"X-Vbatch-Webhook-Secret": "test-webhook-secret"}))),
                   threading.Thread(target=call, args=("api", lambda: client.post(
                       f"/v1/curation/tasks/{task_id}/gold-star", json={"gold_star": True})))]
        for thread in threads:
            thread.start()
        barrier.wait()  # the sensors' path, here (Dagster runs in the main thread)
        aris.tick()
        aris.aris_tick()
        aris.sync(expect_checks=False)
        for thread in threads:
            thread.join(60)
    assert not errors, errors
    assert answers["webhook"].status_code == 200 and answers["api"].status_code == 200, answers["api"].text
    aris.settle()
    # Aristotle: written once.
    row = aris.conquest("w-1")
    assert row["result"] == "VICTORY" and row["updatedAt"] > before
    assert [r["rating"] for r in aris.ratings("w-1")] == [4]
    # vbatch: one review (the expert's annotation, its edit and rating kept), one sync event, no failure.
    annotations = aris.client.tasks.get(str(task_id)).annotations
    assert len(annotations) == 1, "the API's star updated the expert's annotation, not a second one"
    task = aris.task(task_id)
    assert (task.gold_star, task.edited_response, task.rating, task.annotation_id) == (True, "Hire her.", 4,
                                                                                      annotation.id)
    with aris.db.session() as session:
        kinds = [e.kind for e in session.query(ArisEvent).filter_by(conquest_id="w-1")]
        link = session.get(ArisLink, "w-1")
        assert kinds == ["to_aristotle"], "written to Aristotle once, nothing failed or conflicted"
        assert link.seen_updated_at == row["updatedAt"].isoformat(timespec="microseconds"), "vbatch's write is the last"
    assert isinstance(aris.aris_tick(), SkipReason)


def test_label_studio_down_a_victory_waits_then_completes(aris, label_studio_server):
    from integrations.aris.models import ArisLink

    aris.add_conquests(["l-1"])
    tasks = aris.run_conquests(["l-1"])
    aris.settle()
    aris.sql("""UPDATE "Conquest" SET result = 'VICTORY', "updatedAt" = now() WHERE id = 'l-1'""")
    server, _ = label_studio_server
    server.stop()
    try:
        assert _requested(aris.aris_tick())
        waiting = aris.sync(expect_checks=False)
        checks = {c.check_name: c.passed for c in waiting.get_asset_check_evaluations()}
        assert checks["no_failed_syncs"] is False, "the failure is visible"
        assert not aris.task(tasks["l-1"]).gold_star
        with aris.db.session() as session:
            link = session.get(ArisLink, "l-1")
            assert link.pending and link.attempts == 1 and "unreachable" in link.last_error
    finally:
        server.ensure()
    with aris.db.session() as session:  # its back-off has run out
        session.get(ArisLink, "l-1").next_attempt_at = 0
    assert _requested(aris.aris_tick())
    aris.sync()  # now every check passes
    assert aris.task(tasks["l-1"]).gold_star


def test_a_victory_with_a_nul_character_is_a_400_not_a_driver_error():
    """PostgreSQL text cannot hold NUL; the fuzzer once sent one and psycopg2 raised (a 500)."""
    import pydantic

    from integrations.aris.api import VictoryRequest

    for field in ("conquest_id", "philosopher", "domain", "result_notes"):
        body = {"conquest_id": "c1", "philosopher": "p", "domain": "d", field: "bad\x00value"}
        with pytest.raises(pydantic.ValidationError, match="pattern"):
            VictoryRequest(**body)
    assert VictoryRequest(conquest_id="c1", philosopher="p", domain="d", result_notes="fine").result_notes == "fine"


def test_a_task_of_any_batch_whose_data_names_a_conquest_is_linked_and_an_unknown_one_is_reported(aris):
    from integrations.aris.models import ArisEvent, ArisLink

    aris.add_conquests(["t-1", "t-2"])
    batch_id = aris.run_batch([chat_line(f"plain-{i}", f"Question {i}?") for i in range(5)])  # not a conquest batch
    tasks = aris.tasks(batch_id)  # chat_review tasks: no conquest_id in their data
    assert "conquest_id" not in aris.client.tasks.get(str(tasks["plain-0"])).data

    def name_conquest(key: str, conquest_id):
        data = aris.client.tasks.get(str(tasks[key])).data
        aris.client.tasks.update(str(tasks[key]), data={**data, "conquest_id": conquest_id})

    name_conquest("plain-0", "t-1")
    name_conquest("plain-1", "nope")  # Aristotle has no such conquest
    name_conquest("plain-2", "t-late")  # not in Aristotle yet
    name_conquest("plain-3", {"not": "an id"})
    aris.star(tasks["plain-0"], None, 4)
    assert _requested(aris.aris_tick())
    aris.sync()
    assert aris.conquest("t-1")["result"] == "VICTORY"
    (rating,) = aris.ratings("t-1")
    assert rating["label_studio_task_id"] == tasks["plain-0"] and rating["rating"] == 4

    def reported() -> dict[int, str]:
        with aris.db.session() as session:
            return {e.detail["task_id"]: e.conquest_id for e in session.query(ArisEvent).filter_by(
                kind="unknown_conquest")}

    assert reported() == {tasks["plain-1"]: "nope", tasks["plain-2"]: "t-late", tasks["plain-3"]: "{'not': 'an id'}"}
    with aris.db.session() as session:
        assert {link.conquest_id for link in session.query(ArisLink)} == {"t-1"}

    # A task named later is read from the cursor on; a conquest created later links the task that named it.
    name_conquest("plain-4", "t-2")
    aris.add_conquests(["t-late"], result="VICTORY")
    assert _requested(aris.aris_tick())
    aris.sync()
    assert aris.task(tasks["plain-2"]).gold_star, "VICTORY in Aristotle: the task that named it is starred"
    with aris.db.session() as session:
        links = {link.conquest_id: link.ls_task_id for link in session.query(ArisLink)}
    assert links == {"t-1": tasks["plain-0"], "t-2": tasks["plain-4"], "t-late": tasks["plain-2"]}
    assert isinstance(aris.aris_tick(), SkipReason)
    assert len(reported()) == 3, "each unknown conquest is reported once, not at every tick"
    meta = aris.sync().asset_materializations_for_node("aris_sync")[0].metadata
    assert meta["unknown_conquests_total"].value == 3


def test_a_write_that_loses_the_race_overwrites_nothing_and_converges_next_round(aris, monkeypatch):
    from integrations.aris.aristotle import Aristotle
    from integrations.aris.models import ArisEvent, ArisLink
    from integrations.aris.sync import sync_pending

    aris.add_conquests(["r-1"])
    tasks = aris.run_conquests(["r-1"])
    aris.settle()
    aris.star(tasks["r-1"], None, 4)
    assert _requested(aris.aris_tick())
    real = Aristotle.read

    def read_then_the_app_writes(self, ids, *args, **kwargs):
        rows = real(self, ids, *args, **kwargs)  # vbatch has read the row; the Aristotle app writes it now
        aris.sql("""UPDATE "Conquest" SET "resultNotes" = 'Noted by the app', "updatedAt" = now() WHERE id = 'r-1'""")
        return rows

    monkeypatch.setattr(Aristotle, "read", read_then_the_app_writes)
    report = sync_pending(aris.db, aris.aristotle, aris.label_studio)
    monkeypatch.setattr(Aristotle, "read", real)
    assert report.outcomes == {"changed_meanwhile": 1}
    row = aris.conquest("r-1")
    assert (row["result"], row["resultNotes"], row["useAsExample"]) == ("PENDING", "Noted by the app", False)
    assert not aris.ratings("r-1"), "nothing written"
    with aris.db.session() as session:
        link = session.get(ArisLink, "r-1")
        assert link.pending and link.attempts == 1 and link.agreed_gold is False
        assert not session.query(ArisEvent).filter_by(conquest_id="r-1", kind="to_aristotle").count()

    assert _requested(aris.aris_tick()), "retried next round"
    aris.sync()
    row = aris.conquest("r-1")
    assert (row["result"], row["resultNotes"], row["useAsExample"]) == ("VICTORY", "Noted by the app", True)
    assert [r["rating"] for r in aris.ratings("r-1")] == [4]
    assert isinstance(aris.aris_tick(), SkipReason)


def test_a_star_without_a_rating_is_rated_5_and_an_unstar_with_no_earlier_result_restores_neutral(aris):
    aris.add_conquests(["n-1"], result="VICTORY")  # a VICTORY before vbatch saw it: its earlier result is unknown
    aris.add_conquests(["n-2"])
    tasks = aris.run_conquests(["n-1", "n-2"])
    aris.settle()
    assert aris.task(tasks["n-1"]).gold_star

    aris.star(tasks["n-2"], "Strong candidate.", None)  # no rating given
    assert _requested(aris.aris_tick())
    aris.sync()
    (rating,) = aris.ratings("n-2")
    assert rating["rating"] == 5 and rating["is_gold_star"]

    aris.star(tasks["n-1"], None, None, gold=False)
    assert _requested(aris.aris_tick())
    aris.sync()
    row = aris.conquest("n-1")
    assert (row["result"], row["useAsExample"]) == ("NEUTRAL", False)
    assert not aris.ratings("n-1"), "vbatch never wrote a rating row for it"


def test_the_gold_star_route_and_the_label_studio_webhook_reach_aristotle_over_http(aris):
    from api.main import create_app

    aris.add_conquests(["h-1", "h-2"])
    tasks = aris.run_conquests(["h-1", "h-2"])
    aris.settle()
    with api_client(create_app()) as client:
        starred = client.post(f"/v1/curation/tasks/{tasks['h-1']}/gold-star", json={"gold_star": True})
        assert starred.status_code == 200 and starred.json()["gold_star"] is True
        row = aris.conquest("h-1")  # no sensor tick, no sync run: the route pushed it
        assert (row["result"], row["useAsExample"], row["evaluatedBy"]) == ("VICTORY", True, "admin@vbatch.local")
        assert [r["rating"] for r in aris.ratings("h-1")] == [5]

        # An expert stars h-2 in Label Studio; the event arrives at the webhook.
        annotation = aris.client.annotations.create(tasks["h-2"], result=annotation_result("Hire.", 4, True))
        event = {"action": "ANNOTATION_CREATED", "task": {"id": tasks["h-2"]},
                 "annotation": annotation.model_dump(mode="json")}
        secret = {"X-Vbatch-Webhook-Secret": "test-webhook-secret"}
        received = client.post("/v1/webhooks/label-studio", json=event, headers=secret)
        assert received.status_code == 200 and received.json()["changed_tasks"] == [tasks["h-2"]]
        assert aris.conquest("h-2")["result"] == "VICTORY" and [r["rating"] for r in aris.ratings("h-2")] == [4]
        replay = client.post("/v1/webhooks/label-studio", json=event, headers=secret)
        assert replay.json()["changed_tasks"] == []

        unstarred = client.post(f"/v1/curation/tasks/{tasks['h-1']}/gold-star", json={"gold_star": False})
        assert unstarred.status_code == 200 and unstarred.json()["gold_star"] is False
        assert aris.conquest("h-1")["result"] == "PENDING"
    assert isinstance(aris.aris_tick(), SkipReason), "all done by the routes: nothing left for the sensor"


def test_a_rating_row_is_this_installs_and_this_conquests_never_anothers(aris):
    """Rating ids carry the install's id and the conquest's (issue 30): another vbatch install's row, or one this
    install wrote before Label Studio was reset (``vbatch-<task id>``: the same task id, another conquest), is never
    taken for this conquest's."""
    aris.add_conquests(["i-1", "i-other"])
    tasks = aris.run_conquests(["i-1"])
    aris.settle()
    task_id = tasks["i-1"]
    aris.sql("INSERT INTO ml_analysis_rating (id, conquest_analysis_id, analysis_type, rating, is_gold_star, "
             "use_as_sample_response, philosopher, domain, label_studio_task_id) VALUES (:id, 'i-other', "
             "'conquest_analysis', 2, false, false, :p, :d, :task)", id=f"vbatch-{task_id}", p=PHILOSOPHER, d=DOMAIN,
             task=task_id)
    aris.sql("INSERT INTO ml_analysis_rating (id, conquest_analysis_id, analysis_type, rating, is_gold_star, "
             "use_as_sample_response, philosopher, domain, label_studio_task_id) VALUES ('vbatch-0123456789ab-i-1', "
             "'i-1', 'conquest_analysis', 1, false, false, :p, :d, :task)", p=PHILOSOPHER, d=DOMAIN, task=task_id)

    aris.star(task_id, "Solid.", 4)
    assert _requested(aris.aris_tick())
    aris.sync()
    mine = f"vbatch-{aris.db.install_id()}-i-1"
    by_id = {row["id"]: row for row in aris.ratings("i-1")}
    assert set(by_id) == {mine, "vbatch-0123456789ab-i-1"}
    assert by_id[mine]["is_gold_star"] and by_id[mine]["rating"] == 4
    assert not by_id["vbatch-0123456789ab-i-1"]["is_gold_star"], "another install's row was written"
    (other,) = aris.ratings("i-other")
    assert (other["id"], other["is_gold_star"], other["rating"]) == (f"vbatch-{task_id}", False, 2)


def test_a_customer_schema_without_a_column_vbatch_writes_is_refused_at_start_not_retried(aris):
    """Aristotle's database lacking a column vbatch writes (issue 30): `vbatch up` refuses to start naming it, the
    sensor asks for no sync run and says why, a sync run fails with the same words; no link is failed and retried
    with back-off for it."""
    from integrations.aris.aristotle import AristotleSchemaMismatch
    from integrations.aris.models import ArisLink
    from vbatch_pipelines.supervisor import check_extensions

    aris.add_conquests(["m-1"])
    tasks = aris.run_conquests(["m-1"])
    aris.settle()
    check_extensions(aris.settings, aris.resources)  # the schema as vbatch needs it: no refusal
    aris.sql('ALTER TABLE "Conquest" DROP COLUMN "evaluatedBy"')
    aris.star(tasks["m-1"], "Solid.", 4)

    with pytest.raises(AristotleSchemaMismatch, match='Conquest."evaluatedBy"'):
        check_extensions(aris.settings, aris.resources)
    skipped = aris.aris_tick()
    assert isinstance(skipped, SkipReason) and 'Conquest."evaluatedBy"' in skipped.skip_message
    result = aris.sync(expect_checks=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert 'Conquest."evaluatedBy"' in failure
    with aris.db.session() as session:
        link = session.get(ArisLink, "m-1")
        assert link.last_error is None and link.attempts == 0
    assert aris.conquest("m-1")["result"] == "PENDING"


def test_a_crash_between_aristotles_write_and_vbatchs_record_keeps_the_result_to_restore(aris, monkeypatch):
    """The result VICTORY replaces is recorded before Aristotle is written (issue 30): a process that dies right
    after Aristotle's commit, before vbatch records the agreement, still has it, and a later un-star puts back
    DEFEAT, not NEUTRAL."""
    import integrations.aris.sync as aris_sync_module
    from integrations.aris.models import ArisLink

    aris.add_conquests(["d-1"], result="DEFEAT")
    tasks = aris.run_conquests(["d-1"])
    aris.settle()
    aris.star(tasks["d-1"], "Actually strong.", 4)
    assert _requested(aris.aris_tick())

    def crash(*args, **kwargs):
        raise SystemExit("the run worker died right after Aristotle's commit")

    monkeypatch.setattr(aris_sync_module, "_agreed", crash)
    with aris.db.session() as session:
        link = session.get(ArisLink, "d-1")
        session.expunge(link)
    with pytest.raises(SystemExit):
        aris_sync_module.sync_link(aris.db, aris.aristotle, aris.label_studio, link, aris.aristotle.get("d-1"),
                                   lambda reviewer: "expert@example.com")
    monkeypatch.undo()
    assert aris.conquest("d-1")["result"] == "VICTORY"

    aris.settle()  # the next round finds both sides gold: agreed
    aris.star(tasks["d-1"], "Actually strong.", 4, gold=False)
    assert _requested(aris.aris_tick())
    aris.sync()
    assert aris.conquest("d-1")["result"] == "DEFEAT"
