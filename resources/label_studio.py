"""Label Studio as a Dagster resource: a thin client over label-studio-sdk 2.x's ``LabelStudio``.

One project per task schema (created on demand, found again by title); tasks imported in batches with
the model's answer as a prediction; tasks changed since a cursor read back with their annotations;
reviews made through vbatch's API written back as annotations.

No secret is resource config (the Dagster UI shows config): an external server's token and the webhook
secret come through ``EnvVar``; the managed server's are read at run time from its credentials file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr

from vbatch_pipelines.curation.schemas import TaskSchema, annotation_result
from vbatch_pipelines.curation.server import ManagedLabelStudio
from vbatch_pipelines.errors import Unavailable


class LabelStudioUnavailable(Unavailable):
    """Label Studio did not answer; whatever asked should retry later and lose nothing."""

    code = "label_studio_unavailable"


def iso(value: Any) -> str:
    """Label Studio returns ``updated_at`` as a datetime or an ISO string: one form, the one its
    Datetime filter parses (UTC, microseconds, ``Z``); it also sorts as text."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _since(since: str | None) -> list[dict[str, Any]]:
    """The task filter "updated after ``since``" (none: every task)."""
    return [{"filter": "filter:tasks:updated_at", "operator": "greater", "type": "Datetime", "value": since}] \
        if since else []


class LabelStudio(ConfigurableResource):
    url: str = ""
    token: str | None = Field(default=None, description="an external server's API token (EnvVar); the managed "
                                                        "server's is read from its credentials file")
    enabled: bool = True
    disabled_reason: str = ""
    managed_dir: str | None = Field(default=None, description="set when vbatch runs this Label Studio (its state "
                                                              "and credentials): started on demand")
    managed_port: int = 4115
    envs_dir: str | None = Field(default=None, description="where the managed server's virtualenv is")
    managed_database_url: str | None = Field(default=None, description="PostgreSQL for the managed server (EnvVar)")
    webhook_url: str | None = None  # vbatch's receiver, registered on the projects vbatch creates
    webhook_secret: str | None = Field(default=None, description="VBATCH_WEBHOOK_SECRET (EnvVar); default: the "
                                                                 "managed server's credentials file")
    import_chunk: int = 2000
    timeout_s: float = 60.0
    team: str | None = Field(default=None, description="the vbatch project whose Label Studio organization this "
                                                       "client speaks for (None: the first, the default project's)")

    _client: Any = PrivateAttr(default=None)
    _projects: dict[str, int] = PrivateAttr(default_factory=dict)
    _teams: dict[str, "LabelStudio"] = PrivateAttr(default_factory=dict)
    _team_title: str | None = PrivateAttr(default=None)
    _me: str | None = PrivateAttr(default=None)
    _emails: dict[str, str] = PrivateAttr(default_factory=dict)

    def for_project(self, project_id: str, title: str | None = None) -> LabelStudio:
        """This Label Studio as vbatch project ``project_id`` sees it: its own organization (made the first time,
        ``title`` naming it), whose reviewers see only its tasks. An external Label Studio has one organization
        for every project (its token's)."""
        from vbatch_pipelines.store.models import DEFAULT_PROJECT

        if project_id == (self.team or DEFAULT_PROJECT) or self.server() is None:
            return self
        if project_id not in self._teams:
            fields = {name: getattr(self, name) for name in type(self).model_fields}
            scoped = LabelStudio(**{**fields, "team": project_id})
            scoped._team_title = title or project_id
            self._teams[project_id] = scoped
        return self._teams[project_id]

    def team_clients(self) -> list[LabelStudio]:
        """A client per organization vbatch made here (the default project's first): what the sensor reads."""
        server = self.server()
        if server is None:
            return [self]
        return [self.for_project(project) for project in server.teams()]

    @property
    def client(self):
        if self._client is None:
            import httpx
            from label_studio_sdk import LabelStudio as Client

            self._client = Client(base_url=self.url, api_key=self.api_token, timeout=self.timeout_s,
                                  httpx_client=httpx.Client(timeout=self.timeout_s))
        return self._client

    def _call(self, fn, *args, **kwargs):
        import httpx

        try:
            return fn(*args, **kwargs)
        except (httpx.TransportError, ConnectionError) as exc:
            raise LabelStudioUnavailable(f"Label Studio at {self.url} is unreachable: {exc}") from exc

    def server(self) -> ManagedLabelStudio | None:
        """The Label Studio vbatch runs (None: an external one)."""
        if not self.managed_dir:
            return None
        return ManagedLabelStudio(Path(self.managed_dir), Path(self.envs_dir or ""), self.managed_port,
                                  database_url=self.managed_database_url, token=self.token)

    @property
    def api_token(self) -> str:
        """The token of this client's organization: the managed admin's, a team's (made on first use), or an
        external server's."""
        server = self.server()
        if server is None:
            return self.token or ""
        if self.team is not None:
            return server.team(self.team, self._team_title or self.team)["token"]
        return server.credentials()["token"]

    def shared_webhook_secret(self) -> str:
        """The secret Label Studio sends in X-Vbatch-Webhook-Secret."""
        server = self.server()
        if self.webhook_secret or server is None:
            return self.webhook_secret or ""
        return server.credentials()["webhook_secret"]

    def ensure_running(self) -> None:
        """Start the managed Label Studio if it is down (an external one is only checked)."""
        server = self.server()
        if server is not None:
            server.ensure()
        elif not self.reachable():
            raise LabelStudioUnavailable(f"Label Studio at {self.url} is unreachable")

    def reachable(self) -> bool:
        try:
            self._call(lambda: list(self.client.projects.list(page_size=1)))
            return True
        except LabelStudioUnavailable:
            return False

    # -- projects ----------------------------------------------------------------------------------

    def project_for(self, schema: TaskSchema) -> int:
        """The schema's project, created with its labeling config the first time."""
        if schema.name in self._projects:
            return self._projects[schema.name]
        for project in self._call(lambda: list(self.client.projects.list(title=schema.project_title))):
            if project.title == schema.project_title:
                self._projects[schema.name] = project.id
                return project.id
        project = self._call(self.client.projects.create, title=schema.project_title,
                             description=schema.description, label_config=schema.label_config)
        if self.webhook_url:
            self._add_webhook(project.id, self.webhook_url, self.shared_webhook_secret())
        self._projects[schema.name] = project.id
        return project.id

    def projects(self) -> dict[int, str]:
        """vbatch's projects here: id -> title."""
        return {p.id: p.title for p in self._call(lambda: list(self.client.projects.list()))
                if (p.title or "").startswith("vbatch · ")}

    # -- tasks -------------------------------------------------------------------------------------

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks (``data``, ``meta``, ``predictions``) in chunks; their ids in order."""
        ids: list[int] = []
        for start in range(0, len(tasks), self.import_chunk):
            chunk = tasks[start:start + self.import_chunk]
            result = self._call(self.client.projects.import_tasks, project_id, request=chunk,
                                return_task_ids=True)
            ids.extend(result.task_ids or [])
        return ids

    def _filtered(self, project_id: int, filters: dict[str, Any], include: str,
                  page_size: int = 1000) -> Iterator[Any]:
        """Tasks matching ``filters``, oldest change first, with only the ``include``d fields, which Label
        Studio applies to nested objects too (the full task serializer costs it ~8 ms a task; the fields the
        sensor needs, under 3 ms)."""
        query = json.dumps({"filters": filters, "ordering": ["tasks:updated_at"]})
        pager = self._call(self.client.tasks.list, project=project_id, query=query, fields="all",
                           include=include, page_size=page_size)
        yield from self._call(lambda: list(pager))

    def tasks_of_batch(self, project_id: int, batch_id: str) -> dict[str, int]:
        """custom_id -> task id of a batch's tasks already in the project (to never import twice)."""
        filters = {"conjunction": "and", "items": [
            {"filter": "filter:tasks:data.batch_id", "operator": "equal", "type": "String", "value": batch_id}]}
        return {task.data["custom_id"]: task.id for task in self._filtered(project_id, filters, include="id,data")}

    def changed_tasks(self, project_id: int, since: str | None) -> list[Any]:
        """Tasks updated after ``since`` (strictly), oldest first, with their annotations."""
        return list(self._filtered(project_id, {"conjunction": "and", "items": _since(since)},
                                   include="id,annotations,updated_at,result,was_cancelled,completed_by"))

    def tasks_with_data(self, project_id: int, field: str, since: str | None) -> list[Any]:
        """Tasks whose data has ``field`` (present, not empty), updated after ``since`` (strictly), oldest
        first, with their id, data and updated_at (an extension's own key, e.g. Aris' ``conquest_id``)."""
        items = [{"filter": f"filter:tasks:data.{field}", "operator": "empty", "type": "String", "value": False},
                 *_since(since)]
        return list(self._filtered(project_id, {"conjunction": "and", "items": items}, include="id,data,updated_at"))

    def task(self, task_id: int) -> Any:
        return self._call(self.client.tasks.get, str(task_id))

    # -- reviews -----------------------------------------------------------------------------------

    def write_review(self, task_id: int, answer: str | None, rating: int | None, gold_star: bool,
                     annotation_id: int | None) -> dict[str, Any]:
        """Create the task's annotation, or update the one vbatch knows; returns it as a dict."""
        result = annotation_result(answer, rating, gold_star)
        if annotation_id is not None:
            try:
                annotation = self._call(self.client.annotations.update, annotation_id, result=result)
                return annotation.model_dump() if hasattr(annotation, "model_dump") else dict(annotation)
            except LabelStudioUnavailable:
                raise
            except Exception:  # noqa: BLE001 - deleted in Label Studio meanwhile: create a new one
                pass
        annotation = self._call(self.client.annotations.create, task_id, result=result)
        return annotation.model_dump() if hasattr(annotation, "model_dump") else dict(annotation)

    def own_reviewer(self) -> str:
        """The reviewer id of this client's Label Studio user (the one vbatch's own reviews are made as)."""
        if self._me is None:
            self._me = self.reviewer_name(str(self._call(self.client.users.whoami).id))
        return self._me

    def set_annotations_per_task(self, project_id: int, annotations: int) -> None:
        """Label Studio hands each task of the project to ``annotations`` reviewers (every task overlaps) and
        counts it labeled only then."""
        self._call(self.client.projects.update, project_id, maximum_annotations=annotations,
                   overlap_cohort_percentage=100)

    def reviewer_name(self, user_id: str) -> str:
        """A reviewer as vbatch records them: their email (Label Studio gives a user id), the id when unknown."""
        if user_id not in self._emails:
            try:
                self._emails = self.user_emails()
            except LabelStudioUnavailable:
                return user_id
            self._emails.setdefault(user_id, user_id)
        return self._emails[user_id]

    def user_emails(self) -> dict[str, str]:
        """Label Studio user id -> email (a reviewer is recorded by id; Aristotle wants the email)."""
        return {str(user.id): user.email for user in self._call(lambda: list(self.client.users.list()))
                if getattr(user, "email", None)}

    def ensure_webhook(self, url: str, secret: str | None) -> None:
        """Send annotation events of every vbatch project to ``url`` (new projects get it on creation)."""
        for project_id in self.projects():
            self._add_webhook(project_id, url, secret)

    def _add_webhook(self, project_id: int, url: str, secret: str | None) -> None:
        headers = {"X-Vbatch-Webhook-Secret": secret} if secret else {}
        # Only annotation events: TASKS_CREATED would send every imported task back in full.
        hook_settings = {"url": url, "send_payload": True, "send_for_all_actions": False, "headers": headers,
                         "actions": ["ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_DELETED"]}
        for hook in self._call(self.client.webhooks.list, project=str(project_id)):
            if hook.url == url:
                return
            if secret and (hook.headers or {}).get("X-Vbatch-Webhook-Secret") == secret:
                # This platform's hook at an earlier address (another API port, a home restored from a backup):
                # moved, so no review goes on to where this platform no longer runs. An update sets every field
                # (Label Studio empties the actions it is not given).
                self._call(self.client.webhooks.update, hook.id, **hook_settings)
                return
        self._call(self.client.webhooks.create, project=project_id, **hook_settings)
