"""Client-chosen names are never paths until they are checked: a name is one or a few plain segments (letters,
digits, ``.``, ``-``, ``_``, each starting with a letter or digit: no ``..``, no leading ``/``, bounded), and a
path built from one is resolved and must stay inside its root."""

from __future__ import annotations

import re
from pathlib import Path

SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}"
# A model id: a name, or a hub-style owner/name (valid as a Dagster partition key too).
MODEL_ID = re.compile(rf"^{SEGMENT}(/{SEGMENT})?$")


class UnsafePath(ValueError):
    """A path built from a name would leave its root."""


def inside(root: Path, *parts: str) -> Path:
    """``root / parts``, resolved, refusing anything that would end outside ``root``."""
    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if path == base or not path.is_relative_to(base):
        raise UnsafePath(f"{'/'.join(parts)!r} is not a name inside {base}")
    return path
