"""Resource config made from settings groups: a resource whose config is a group of settings takes the group's
fields (type, default, bounds, description) instead of declaring them again, so a setting is declared once
(vbatch_pipelines/settings.py) and the Dagster UI shows its description."""

from __future__ import annotations

import copy
from collections.abc import Iterable

from dagster import ConfigurableResource
from pydantic import create_model

from vbatch_pipelines.settings import SettingsGroup


def config_of(group: type[SettingsGroup], *, exclude: Iterable[str] = (),
              also: Iterable[tuple[type[SettingsGroup], str]] = ()) -> type[ConfigurableResource]:
    """A ConfigurableResource base with ``group``'s fields but ``exclude``, and single fields of other groups
    (``also``: (group, field) pairs). The fields keep their names; the variables they are read from stay with
    the settings (a resource is configured by name, in code or the launchpad)."""
    fields, left_out = {}, set(exclude)
    picked = [(group, name) for name in group.model_fields if name not in left_out] + list(also)
    for source, name in picked:
        info = copy.copy(source.model_fields[name])
        info.validation_alias = info.alias = None
        info.json_schema_extra = None
        fields[name] = (info.annotation, info)
    return create_model(f"{group.__name__.removesuffix('Settings')}Config", __base__=ConfigurableResource, **fields)
