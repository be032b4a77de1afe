"""What a child process gets of this process's environment. Services that only compute on files vbatch
hands them (the vLLM engine, the trainer, Label Studio) get none of the secrets; Dagster's processes get what
runs need (database URLs, the Label Studio token, HF_TOKEN for installs) but never the API's keys."""

from __future__ import annotations

import os
import re

API_KEY_VARS = ("VBATCH_API_KEYS", "VBATCH_ADMIN_KEYS")
# Names that hold credentials by convention: *_TOKEN, *_SECRET, *_PASSWORD, *_API_KEY(S), *_DATABASE_URL, ...
SECRET_NAME = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|API_KEYS?|ADMIN_KEYS|DATABASE_URL|BROKER_URL|"
                         r"ACCESS_KEY_ID|SECRET_ACCESS_KEY|CREDENTIALS)$|^PGPASSWORD$|^DATABASE_URL$")
# A URL that carries a password (redis://:pw@host, amqp://user:pw@host), whatever its variable is called.
URL_WITH_PASSWORD = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@\s]*:[^/@\s]*@")


def is_secret(name: str, value: str) -> bool:
    return bool(SECRET_NAME.search(name.upper()) or URL_WITH_PASSWORD.match(value))


def without_secrets(**extra: str) -> dict[str, str]:
    """This environment less every credential, plus ``extra`` (a child's own secrets given explicitly)."""
    env = {name: value for name, value in os.environ.items() if not is_secret(name, value)}
    env.update(extra)
    return env


def without_api_keys(env: dict[str, str]) -> dict[str, str]:
    """``env`` less the API's keys: only the API checks them."""
    return {name: value for name, value in env.items() if name not in API_KEY_VARS}
