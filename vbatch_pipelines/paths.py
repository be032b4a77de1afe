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


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), atomically: the temporary file is created 0600 too, so the
    content is never readable by others, not even for a moment."""
    import os
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(descriptor, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()
