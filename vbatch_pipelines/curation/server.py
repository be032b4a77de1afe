"""The Label Studio vbatch runs for you: its own virtualenv, a persistent data dir, a known API token.

Label Studio's pins (Django 5.2, openai<2, pyarrow<25) clash with ours, so it is installed into a managed
virtualenv (``vbatch label-studio install``) and runs as a ``DetachedServer`` on 127.0.0.1
(``VBATCH_LABEL_STUDIO_PORT``, default 4115) with its data under ``$VBATCH_HOME/label-studio``, or in
PostgreSQL when ``VBATCH_LABEL_STUDIO_DATABASE_URL`` is set. The admin user and API token are created on
first start and kept in ``credentials.json`` there. With ``VBATCH_LABEL_STUDIO_URL`` set vbatch uses that
server instead (``VBATCH_LABEL_STUDIO_TOKEN`` is its token) and starts nothing.
"""

from __future__ import annotations

import json
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from vbatch_pipelines.child_env import without_secrets
from vbatch_pipelines.detached import DetachedServer
from vbatch_pipelines.net import local_http
from vbatch_pipelines.paths import write_private
from vbatch_pipelines.virtualenvs import build_env, env_dir, pins, ready_python

REQUIREMENTS = Path(__file__).with_name("label-studio.txt")
CREDENTIALS_FILE = "credentials.json"
# Label Studio's settings for vbatch's teams (an organization per vbatch project, kept apart) and the command that
# makes them: they run inside Label Studio's env, from this directory.
TEAMS_DIR = Path(__file__).with_name("label_studio_teams")
TEAM_ADMIN_TIMEOUT_S = 120.0


class LabelStudioNotInstalled(RuntimeError):
    pass


def managed_env_dir(envs_dir: Path) -> Path:
    return env_dir(envs_dir, "label-studio", REQUIREMENTS)


def install_label_studio(envs_dir: Path, log=print) -> str:
    return build_env(managed_env_dir(envs_dir), [pins(REQUIREMENTS)], "label_studio", log)


def credentials(state_dir: Path, token: str | None = None) -> dict[str, str]:
    """The managed server's admin user, API token and webhook secret, created once per home (``token``:
    the admin token to create it with, instead of a random one)."""
    path = state_dir / CREDENTIALS_FILE
    known = json.loads(path.read_text()) if path.exists() else {}
    if "webhook_secret" in known:
        return known
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keep what a home already has (its Label Studio was created with that user and token).
    created = {"username": "admin@vbatch.local", "password": secrets.token_urlsafe(16),
               "token": token or secrets.token_hex(20), **known,
               "webhook_secret": secrets.token_urlsafe(24)}
    write_private(path, json.dumps(created))
    return created


class ManagedLabelStudio(DetachedServer):
    name = "Label Studio"
    startup_timeout_s = 240.0  # the first start runs ~400 migrations (~45 s here)

    def __init__(self, state_dir: Path, envs_dir: Path, port: int, *, database_url: str | None = None,
                 token: str | None = None):
        super().__init__(state_dir, "server")
        self.envs_dir = envs_dir
        self.port = port
        self.database_url = database_url  # PostgreSQL for its data (SQLite under state_dir otherwise)
        self.token = token

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def credentials(self) -> dict[str, str]:
        return credentials(self.state_dir, self.token)

    def installed(self) -> bool:
        return ready_python(managed_env_dir(self.envs_dir)) is not None

    def python(self) -> str:
        python = ready_python(managed_env_dir(self.envs_dir))
        if python is None:
            raise LabelStudioNotInstalled("Label Studio is not installed: run `vbatch label-studio install` "
                                          "(or set VBATCH_LABEL_STUDIO_URL to use a running one)")
        return python

    def choose_port(self) -> int:
        return self.port

    def argv(self, port: int) -> list[str]:
        data = self.state_dir / "data"
        label_studio = str(Path(self.python()).with_name("label-studio"))
        return [label_studio, "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(port),
                "--data-dir", str(data)]

    def env(self) -> dict[str, str]:
        creds = self.credentials()
        env = without_secrets(
                   LABEL_STUDIO_BASE_DATA_DIR=str(self.state_dir / "data"),
                   LABEL_STUDIO_USERNAME=creds["username"], LABEL_STUDIO_PASSWORD=creds["password"],
                   LABEL_STUDIO_USER_TOKEN=creds["token"], LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN="true",
                   # SSRF protection is on (vbatch_ls_settings: every reserved range but the API's 127.0.0.1)
                   LATEST_VERSION_CHECK="false", SENTRY_DSN="",
                   FRONTEND_SENTRY_DSN="", COLLECT_ANALYTICS="false", PYTHONUNBUFFERED="1",
                   # each vbatch project's reviewers in an organization of their own, kept apart; people join
                   # through vbatch (`vbatch label-studio add-reviewer`), not an open sign-up page
                   PYTHONPATH=str(TEAMS_DIR), DJANGO_SETTINGS_MODULE="vbatch_ls_settings",
                   DISABLE_SIGNUP_WITHOUT_LINK="true")
        if self.database_url:
            parts = urlsplit(self.database_url)
            env.update(DJANGO_DB="default", POSTGRE_NAME=parts.path.lstrip("/") or "postgres",
                       POSTGRE_USER=parts.username or "postgres", POSTGRE_PASSWORD=parts.password or "",
                       POSTGRE_HOST=parts.hostname or "127.0.0.1", POSTGRE_PORT=str(parts.port or 5432))
        return env

    def probe(self, url: str, timeout: float) -> bool:
        # A busy port makes Label Studio silently take the next one: check ours answers with our token.
        try:
            token = self.credentials()["token"]
            response = local_http().get(f"{url}/api/projects", params={"page_size": 1}, timeout=timeout,
                                 headers={"Authorization": f"Token {token}"})
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    # -- teams: an organization per vbatch project -----------------------------------------------------------

    def team(self, project_id: str, title: str) -> dict[str, str]:
        """The Label Studio organization of vbatch project ``project_id``: its admin's email and API token, and
        its id; made the first time (the server must have started once: its database exists). The default
        project's is the first organization, the one the managed admin made."""
        from filelock import FileLock

        from vbatch_pipelines.store.models import DEFAULT_PROJECT

        creds = self.credentials()
        if project_id == DEFAULT_PROJECT:
            return {"org_id": "1", "email": creds["username"], "token": creds["token"]}
        if project_id in creds.get("teams", {}):
            return creds["teams"][project_id]
        with FileLock(str(self.state_dir / f"{CREDENTIALS_FILE}.lock")):
            creds = self.credentials()  # another process may have made it meanwhile
            if project_id not in creds.get("teams", {}):
                made = self._team_command("team", ["--title", f"vbatch · {title}"[:1000],
                                                   "--email", f"admin+{project_id}@vbatch.local"],
                                          {"token": secrets.token_hex(20)})
                team = {"org_id": str(made["org_id"]), "email": made["email"], "token": made["token"]}
                write_private(self.state_dir / CREDENTIALS_FILE,
                              json.dumps({**creds, "teams": {**creds.get("teams", {}), project_id: team}}))
                creds = self.credentials()
        return creds["teams"][project_id]

    def teams(self) -> list[str]:
        """The vbatch projects that have an organization here (the default project's always)."""
        from vbatch_pipelines.store.models import DEFAULT_PROJECT

        return [DEFAULT_PROJECT, *sorted(self.credentials().get("teams", {}))]

    def add_reviewer(self, project_id: str, title: str, email: str, password: str | None, *,
                     only_new: bool) -> bool:
        """Make ``email`` a reviewer of ``project_id``'s organization, and of no other (someone who signed up with
        the first organization's invite link is moved); its password set when given. With ``only_new`` an
        existing account is left alone (False)."""
        team = self.team(project_id, title)
        made = self._team_command("reviewer", ["--org", team["org_id"], "--email", email,
                                               *(["--only-new"] if only_new else [])],
                                  {"password": password} if password else {})
        return not made["exists"]

    def _team_command(self, command: str, args: list[str], secret: dict[str, str]) -> dict:
        """Run a vbatch_ls_teams.py command with Label Studio's python and the server's environment (its
        database), the secrets on stdin; its JSON answer."""
        import subprocess

        done = subprocess.run([self.python(), str(TEAMS_DIR / "vbatch_ls_teams.py"), command, *args],
                              input=json.dumps(secret), capture_output=True, text=True, env=self.env(),
                              timeout=TEAM_ADMIN_TIMEOUT_S, cwd=str(TEAMS_DIR))
        if done.returncode != 0:
            raise RuntimeError(f"Label Studio's team command {command} failed (exit {done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
