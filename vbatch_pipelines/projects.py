"""Projects and their API keys: who may call the API, as which project, in which role.

A key is a record: its secret (``sk-vb-...``) is shown once, when it is made, and only its SHA-256 is kept, so
the DB never holds a usable credential. A request's key is looked up by that hash on every request: a revoked
key is refused on the next one, with no restart. The keys of VBATCH_API_KEYS and VBATCH_ADMIN_KEYS (settings)
belong to the default project, so a single user's setup works as before; VBATCH_ADMIN_KEYS are the platform's
admins, who manage every project.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from sqlalchemy import select

from vbatch_pipelines.errors import NotFound, VbatchError
from vbatch_pipelines.store.db import Database
from vbatch_pipelines.store.models import DEFAULT_PROJECT, ApiKey, ConsoleSession, Owner, Project

ProjectRole = Literal["member", "admin"]
PROJECT_ROLES = ("member", "admin")
NAME = re.compile(r"^[^\x00-\x1f]{1,128}$")  # printable, bounded: shown in lists and the audit log
KEY_PREFIX = "sk-vb-"


class ProjectError(VbatchError):
    status = 400
    code = "invalid_value"


class ProjectNotFound(NotFound):
    code = "project_not_found"


class KeyNotFound(NotFound):
    code = "api_key_not_found"


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def _name(value: str, param: str) -> str:
    value = (value or "").strip()
    if not NAME.match(value):
        raise ProjectError(f"{param} must be 1 to 128 printable characters", param)
    return value


def create_project(db: Database, name: str) -> Project:
    name = _name(name, "name")
    with db.session() as session:
        if session.scalars(select(Project.id).where(Project.name == name)).first():
            raise ProjectError(f"A project named {name!r} exists already", "name", "project_exists")
        project = Project(id=f"proj_{uuid.uuid4().hex[:24]}", name=name, created_at=int(time.time()))
        session.add(project)
    return project


def get_project(db: Database, project_id: str) -> Project:
    project = db.get(Project, project_id)
    if project is None:
        raise ProjectNotFound(f"No project with id '{project_id}'", "project_id")
    return project


def find_project(db: Database, id_or_name: str) -> Project:
    """A project by id or by name (the CLI takes either)."""
    with db.session() as session:
        project = session.get(Project, id_or_name) or session.scalars(
            select(Project).where(Project.name == id_or_name)).first()
    if project is None:
        raise ProjectNotFound(f"No project with id or name '{id_or_name}'", "project")
    return project


def rename_project(db: Database, project_id: str, name: str) -> Project:
    name = _name(name, "name")
    with db.session() as session:
        project = session.get(Project, project_id)
        if project is None:
            raise ProjectNotFound(f"No project with id '{project_id}'", "project_id")
        if session.scalars(select(Project.id).where(Project.name == name, Project.id != project_id)).first():
            raise ProjectError(f"A project named {name!r} exists already", "name", "project_exists")
        project.name = name
    return project


def archive_project(db: Database, project_id: str) -> Project:
    """Archive a project: its keys stop working at once (the default project cannot be archived)."""
    if project_id == DEFAULT_PROJECT:
        raise ProjectError("The default project holds the keys of VBATCH_API_KEYS; it cannot be archived",
                           "project_id", "default_project")
    with db.session() as session:
        project = session.get(Project, project_id)
        if project is None:
            raise ProjectNotFound(f"No project with id '{project_id}'", "project_id")
        project.archived_at = project.archived_at or int(time.time())
    return project


def create_key(db: Database, project_id: str, name: str, owner: str, role: str = "member",
               created_by: str | None = None) -> tuple[ApiKey, str]:
    """A new key of ``project_id`` and its secret (returned once; only its hash is stored)."""
    name, owner = _name(name, "name"), _name(owner, "owner")
    if role not in PROJECT_ROLES:
        raise ProjectError(f"role must be one of {', '.join(PROJECT_ROLES)}; got {role!r}", "role")
    project = get_project(db, project_id)
    if project.archived_at:
        raise ProjectError(f"Project '{project_id}' is archived; it takes no new keys", "project_id",
                           "project_archived")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(id=f"key_{uuid.uuid4().hex[:24]}", project_id=project_id, name=name, owner=owner, role=role,
                 secret_hash=secret_hash(secret), redacted_value=f"{secret[:9]}...{secret[-4:]}",
                 created_at=int(time.time()), created_by=created_by)
    with db.session() as session:
        session.add(key)
    return key, secret


def list_keys(db: Database, project_id: str | None = None, include_revoked: bool = False) -> list[ApiKey]:
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if project_id is not None:
        query = query.where(ApiKey.project_id == project_id)
    if not include_revoked:
        query = query.where(ApiKey.revoked_at.is_(None))
    with db.session() as session:
        return list(session.scalars(query))


def get_key(db: Database, key_id: str, project_id: str | None = None) -> ApiKey:
    key = db.get(ApiKey, key_id)
    if key is None or (project_id is not None and key.project_id != project_id):
        raise KeyNotFound(f"No API key with id '{key_id}'" + (f" in project '{project_id}'" if project_id else ""),
                          "key_id")
    return key


def revoke_key(db: Database, key_id: str, project_id: str | None = None) -> ApiKey:
    """Revoke a key: refused from its next request on."""
    get_key(db, key_id, project_id)
    with db.session() as session:
        key = session.get(ApiKey, key_id)
        key.revoked_at = key.revoked_at or int(time.time())
    return key


def any_keys(db: Database) -> bool:
    """Whether a key was ever made: from then on every request needs one (revoking the last key must not open the
    API to whoever asks)."""
    with db.session() as session:
        return session.scalars(select(ApiKey.id).limit(1)).first() is not None


@dataclass(frozen=True)
class Caller:
    """Who is calling: a platform admin (VBATCH_ADMIN_KEYS, or the operator on loopback when no key exists), or a
    project's member or admin."""

    project_id: str
    project_role: ProjectRole
    platform_admin: bool
    key_id: str | None  # None: a settings key or the operator
    key_name: str

    @property
    def role(self) -> Literal["use", "admin"]:
        """The platform role the routes check: admin for platform admins, use for everyone else."""
        return "admin" if self.platform_admin else "use"

    @property
    def owner(self) -> Owner:
        """Whose what this caller creates is."""
        return Owner(self.project_id, self.key_id or self.key_name)

    def may_manage(self, project_id: str) -> bool:
        return self.platform_admin or (self.project_role == "admin" and self.project_id == project_id)


OPERATOR = Caller(DEFAULT_PROJECT, "admin", True, None, "operator (no keys)")
USED_EVERY_S = 60  # last_used_at is written at most this often per key (a write per request would cost)


def caller_of_key(db: Database, token: str) -> Caller | None:
    """The caller a project key makes, or None: unknown, revoked, or its project archived."""
    if not token.startswith(KEY_PREFIX):
        return None
    return caller_of_key_hash(db, secret_hash(token))


def caller_of_key_hash(db: Database, key_hash: str) -> Caller | None:
    """``caller_of_key`` by the key's hash (what a console session keeps)."""
    with db.session() as session:
        row = session.execute(select(ApiKey, Project.archived_at).join(Project, Project.id == ApiKey.project_id)
                              .where(ApiKey.secret_hash == key_hash)).first()
        if row is None:
            return None
        key, archived_at = row
        if key.revoked_at is not None or archived_at is not None:
            return None
        now = int(time.time())
        if key.last_used_at is None or now - key.last_used_at >= USED_EVERY_S:
            key.last_used_at = now
        return Caller(key.project_id, key.role, False, key.id, key.name)


CLI = Caller(DEFAULT_PROJECT, "admin", True, None, "operator (CLI)")
SESSION_PREFIX = "vbs-"
SESSION_TTL_S = 12 * 3600  # a console login lasts a working day


def start_session(db: Database, key: str) -> str:
    """A console session for a key already checked: its token (the cookie's value), shown to nobody else. Sessions
    past their time are swept as a new one starts."""
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    now = int(time.time())
    with db.session() as session:
        session.query(ConsoleSession).filter(ConsoleSession.expires_at < now).delete()
        session.add(ConsoleSession(id=secret_hash(token), key_hash=secret_hash(key), created_at=now,
                                   expires_at=now + SESSION_TTL_S))
    return token


def session_key_hash(db: Database, token: str) -> str | None:
    """The hash of the key a live session was opened with; None for an unknown, ended or expired one."""
    if not token.startswith(SESSION_PREFIX):
        return None
    row = db.get(ConsoleSession, secret_hash(token))
    if row is None or row.ended_at is not None or row.expires_at <= time.time():
        return None
    return row.key_hash


def end_session(db: Database, token: str) -> None:
    """Log out: the session's token opens nothing from now on, wherever its cookie was copied to."""
    with db.session() as session:
        row = session.get(ConsoleSession, secret_hash(token), with_for_update=True)
        if row is not None and row.ended_at is None:
            row.ended_at = int(time.time())


def audit(db: Database, caller: Caller, type: str, target: str, **details) -> None:
    """Record that ``caller`` did ``type`` (``model.installed``, ``api_key.revoked``, ...) to ``target``."""
    from vbatch_pipelines.store.models import AuditEvent

    with db.session() as session:
        # ids sort as the events happened (lists order by time, then id): nanoseconds in fixed-width hex first
        session.add(AuditEvent(id=f"audit_log-{time.time_ns():016x}{uuid.uuid4().hex[:8]}",
                               created_at=int(time.time()), type=type, project_id=caller.project_id,
                               key_id=caller.key_id, actor=caller.key_name, target=str(target)[:512],
                               details=details or None))


EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,190}$")


def add_reviewer(db: Database, label_studio, project_id: str, email: str, *, password: str | None = None,
                 move_existing: bool = False) -> dict:
    """A Label Studio login for a reviewer of ``project_id``: a member of that project's organization only, who
    sees its tasks and no other project's. A new account gets ``password`` or a generated one (returned once);
    an existing account is moved here only with ``move_existing`` (the operator's CLI: a project's admin must
    not take another project's reviewer, nor any account's password). vbatch's own accounts are refused."""
    project = get_project(db, project_id)
    email = (email or "").strip().lower()
    if not EMAIL.match(email) or email.endswith("@vbatch.local"):
        raise ProjectError("email must be a reviewer's address (name@domain), not one of vbatch's own", "email")
    if not label_studio.enabled:
        raise ProjectError(f"Curation is unavailable: {label_studio.disabled_reason}", None, "curation_disabled", 409)
    server = label_studio.server()
    if server is None:
        raise ProjectError("This Label Studio is external: add reviewers there (vbatch keeps the teams of the Label "
                           "Studio it runs)", None, "label_studio_external", 409)
    label_studio.ensure_running()
    given = password
    password = password or secrets.token_urlsafe(12)
    if not server.add_reviewer(project.id, project.name, email, password, only_new=True):
        if not move_existing:
            raise ProjectError(f"{email} has a Label Studio account already; the operator can move it here with "
                               "`vbatch label-studio add-reviewer --move`", "email", "reviewer_exists", 409)
        server.add_reviewer(project.id, project.name, email, given, only_new=False)  # its password kept unless given
        password = given
    return {"object": "organization.project.reviewer", "project_id": project.id, "email": email,
            "password": password, "label_studio_url": label_studio.url}
