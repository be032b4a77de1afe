"""Extensions: a customer's domain (Aris is the first) added to vbatch without the core naming it.

An extension is a Python package that declares an ``Extension`` under the ``vbatch.extensions`` entry-point group
(``pyproject.toml``: ``[project.entry-points."vbatch.extensions"] name = "package.module:extension"``). Installed,
it is still off: ``VBATCH_EXTENSIONS`` names the ones to turn on. The edges (the code location, the API app,
``vbatch up``) ask ``enabled_extensions`` once and add what each brings: resources, Dagster definitions, API
routes, review schemas (in code, or as JSON files in a folder) and console pages. docs/extensions.md walks
through writing one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vbatch_pipelines.errors import VbatchError

ENTRY_POINT_GROUP = "vbatch.extensions"


class ExtensionError(VbatchError):
    """An extension vbatch was asked for and cannot load (not installed, or not an ``Extension``)."""


@dataclass(frozen=True)
class Extension:
    """What an extension adds; every part is optional. Callables are called at the edges, lazily, so an
    extension's heavy imports happen only when it is on."""

    name: str
    description: str = ""
    # its own settings: a SettingsGroup (vbatch_pipelines/settings.py) of its variables, read with vbatch's when it
    # is on (Settings.extension_settings[name]) and given to ``resources``
    settings: type | None = None  # (settings.py imports this module: no import back)
    # a variable of its own whose being set turns it on while VBATCH_EXTENSIONS is unset
    enabled_by: str | None = None
    # Dagster resources it needs, from its settings (secrets through EnvVar: ``secret(variable, value)``)
    resources: Callable[[Any, Callable[[str, str | None], Any]], dict[str, Any]] | None = None
    definitions: Callable[[], Any] | None = None  # its dagster.Definitions (assets, sensors, jobs, checks)
    api: Callable[[Any], None] | None = None  # mounts its routers and hooks on the FastAPI app
    schemas_dir: Path | None = None  # a folder of JSON review schemas (curation/schema_files.py)
    register: Callable[[], None] | None = None  # in-process registration every edge needs (schemas with code)
    console: Callable[[], Any] | None = None  # a FastAPI APIRouter of console pages under /ui/ext/<name>/
    console_links: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (label, path) in the nav
    check: Callable[[dict[str, Any]], None] | None = None  # at `vbatch up`: what it needs, refused loudly
    models: Callable[[], None] | None = None  # imports its tables in vbatch's metadata DB (backups repoint them)


def installed() -> dict[str, Any]:
    """The extensions installed in this environment: name -> entry point (not loaded)."""
    from importlib.metadata import entry_points

    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def enabled_extensions(names: Iterable[str]) -> list[Extension]:
    """The extensions ``names`` turns on (VBATCH_EXTENSIONS, as ``load_settings`` resolved it), loaded; one not
    installed, or whose entry point is not an ``Extension``, is an ExtensionError naming what is installed."""
    available = installed()
    found = []
    for name in names:
        if name not in available:
            raise ExtensionError(f"VBATCH_EXTENSIONS names {name!r}, which is not installed; installed: "
                                 f"{', '.join(sorted(available)) or 'none'} (entry-point group {ENTRY_POINT_GROUP})")
        loaded = available[name].load()
        extension = loaded() if callable(loaded) and not isinstance(loaded, Extension) else loaded
        if not isinstance(extension, Extension) or extension.name != name:
            raise ExtensionError(f"The {ENTRY_POINT_GROUP} entry point {name!r} ({available[name].value}) is not "
                                 f"an Extension named {name!r}")
        found.append(extension)
    return found


def installed_extensions() -> list[Extension]:
    """Every installed extension, on or not (a backup's restore repoints the tables of each)."""
    return enabled_extensions(sorted(installed()))


def enable(settings: Any) -> list[Extension]:  # vbatch_pipelines.settings.Settings
    """At an edge: the enabled extensions, with every review schema registered (the settings' JSON folder, each
    extension's folder and its own registration), so tasks, edits and datasets know them in this process."""
    from vbatch_pipelines.curation.schema_files import register_schema_folder

    extensions = enabled_extensions(settings.extensions.enabled)
    for extension in extensions:
        if extension.schemas_dir is not None:
            register_schema_folder(extension.schemas_dir)
        if extension.register is not None:
            extension.register()
    # last: a file that reuses an extension's name is refused
    register_schema_folder(settings.curation.review_schemas_dir)
    return extensions
