"""A toy vbatch extension (tests/test_extensions.py): a route, a sensor, a JSON review schema and a console page,
there only when it is installed and VBATCH_EXTENSIONS names it."""

from pathlib import Path

from vbatch_pipelines.extensions import Extension


def _definitions():
    from dagster import Definitions, SkipReason, sensor

    @sensor(name="toy_sensor", minimum_interval_seconds=60)
    def toy_sensor(context):
        return SkipReason("the toy has nothing to do")

    return Definitions(sensors=[toy_sensor])


def _api(app) -> None:
    from fastapi import APIRouter, Depends

    from api.deps import caller_role

    router = APIRouter(tags=["toy"])

    @router.get("/v1/toy/hello")
    def hello() -> dict:
        return {"hello": "toy"}

    app.include_router(router, dependencies=[Depends(caller_role)])


def _console():
    from fastapi import APIRouter, Depends, Request
    from markupsafe import Markup, escape

    from api.console import console_role, extension_page

    router = APIRouter()

    @router.get("/")
    def page(request: Request, role=Depends(console_role)):
        body = Markup('<p id="toy">') + escape("Hello from the toy <extension>") + Markup("</p>")
        return extension_page(request, "Toy", body, role)

    return router


extension = Extension(name="toy", description="a toy", definitions=_definitions, api=_api,
                      schemas_dir=Path(__file__).with_name("schemas"), console=_console,
                      console_links=(("Toy", "/"),))
