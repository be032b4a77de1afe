"""The Aris extension: Aristotle's conquests (its own PostgreSQL, never changed in schema by vbatch) kept in
agreement with vbatch's gold stars both ways, and the Eidos in-context-learning examples API.

Registered as the ``aris`` entry point of ``vbatch.extensions`` (pyproject.toml) and on when
``VBATCH_EXTENSIONS`` names it (or, for deployments from before extensions, when ``VBATCH_ARIS_DATABASE_URL`` is
set and ``VBATCH_EXTENSIONS`` is not); off, nothing of it is registered and the core runs exactly as without it."""

from typing import ClassVar

from pydantic import field_validator

from vbatch_pipelines.extensions import Extension
from vbatch_pipelines.settings import SettingsGroup, setting

ENV_VAR = "VBATCH_ARIS_DATABASE_URL"


class ArisSettings(SettingsGroup):
    """The Aris extension's own settings."""

    title: ClassVar[str] = "Aris"
    database_url: str | None = setting(ENV_VAR, None, shown="none", description=(
        "Aristotle's PostgreSQL (`postgresql://user:password@host:port/db`), which the extension needs; set "
        "while `VBATCH_EXTENSIONS` is unset, it turns the extension on"))

    @field_validator("database_url")
    @classmethod
    def _postgres(cls, value: str | None) -> str | None:
        if value is not None and value.split("://", 1)[0].split("+", 1)[0] not in ("postgresql", "postgres"):
            raise ValueError("takes a PostgreSQL URL (postgresql://user:password@host:port/db)")
        return value


def _resources(settings: ArisSettings, secret) -> dict:
    """The ``aristotle`` resource: Aristotle's PostgreSQL, its URL a secret (EnvVar inside Dagster)."""
    from integrations.aris.aristotle import Aristotle
    from vbatch_pipelines.settings import SettingsError

    if not settings.database_url:
        raise SettingsError(f"The aris extension needs {ENV_VAR} (Aristotle's PostgreSQL)")
    return {"aristotle": Aristotle(url=secret(ENV_VAR, settings.database_url))}


def _register() -> None:
    """Conquest types become task schemas (a conquest batch's tasks carry ``conquest_id``)."""
    from integrations.aris.schemas import register_conquest_schemas

    register_conquest_schemas()


def _definitions():
    """The Aris domain's definitions (sensor, sync asset, checks, job); they need the ``aristotle`` resource."""
    from integrations.aris.defs import defs

    return defs


def _api(app) -> None:
    """Mount the Aris routes and push review changes of linked tasks to Aristotle at once."""
    from fastapi import Depends

    from api.deps import caller_role
    from api.schemas import ERRORS
    from integrations.aris.api import UseCounter, router
    from integrations.aris.sync import on_reviews_changed

    app.include_router(router, prefix="/v1", dependencies=[Depends(caller_role)], responses=ERRORS)
    app.state.review_listeners.append(on_reviews_changed)
    app.state.icl_uses = UseCounter(app.state.db)
    app.state.shutdown_hooks.append(app.state.icl_uses.flush)


def _check(resources: dict) -> None:
    """At `vbatch up`: the columns of Aristotle's database vbatch reads and writes (AristotleSchemaMismatch names
    what is missing); a database that is down now is left to the sensor."""
    from integrations.aris.aristotle import AristotleUnavailable

    try:
        resources["aristotle"].check_schema()
    except AristotleUnavailable as exc:
        print(f"Aristotle's database does not answer now ({exc}); its sensor syncs once it does", flush=True)


def _models() -> None:
    import integrations.aris.models  # noqa: F401 - its tables on vbatch's Base


extension = Extension(
    name="aris", description="Aristotle's conquests <-> gold stars, and the Eidos in-context-learning examples API",
    settings=ArisSettings, enabled_by=ENV_VAR, resources=_resources, definitions=_definitions, api=_api,
    register=_register, check=_check,
    models=_models)
