"""The Aris extension: Aristotle's conquests (its own PostgreSQL, never changed in schema by vbatch) kept in
agreement with vbatch's gold stars both ways, and the Eidos in-context-learning examples API.

On when ``VBATCH_ARIS_DATABASE_URL`` is set; off otherwise, and then nothing of it is registered: the core
runs exactly as without it. The edges (definitions, API app) call ``enable_*`` when it is on."""

ENV_VAR = "VBATCH_ARIS_DATABASE_URL"


def enable_schemas() -> None:
    """Conquest types become task schemas (a conquest batch's tasks carry ``conquest_id``)."""
    from integrations.aris.schemas import register_conquest_schemas

    register_conquest_schemas()


def build_defs():
    """The Aris domain's definitions (sensor, sync asset, checks, job); needs the ``aristotle`` resource."""
    from integrations.aris.defs import defs

    enable_schemas()
    return defs


def enable_api(app) -> None:
    """Mount the Aris routes and push review changes of linked tasks to Aristotle at once."""
    from fastapi import Depends

    from api.deps import caller_role
    from api.schemas import ERRORS
    from integrations.aris.api import UseCounter, router
    from integrations.aris.sync import on_reviews_changed

    enable_schemas()
    app.include_router(router, prefix="/v1", dependencies=[Depends(caller_role)], responses=ERRORS)
    app.state.review_listeners.append(on_reviews_changed)
    app.state.icl_uses = UseCounter(app.state.db)
    app.state.shutdown_hooks.append(app.state.icl_uses.flush)
