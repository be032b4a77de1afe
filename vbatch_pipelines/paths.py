"""Client-chosen names are never paths until they are checked: a name is one or a few plain segments (letters,
digits, ``.``, ``-``, ``_``, each starting with a letter or digit: no ``..``, no leading ``/``, bounded), and a
path built from one is resolved and must stay inside its root."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
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


def write_atomic(path: Path, data: bytes | str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` whole: a temporary file (created with ``mode`` from the start), fsynced,
    renamed over it. A reader, or a crash, sees the old content or the new, never a part."""
    import os
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(descriptor, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)
    finally:
        if partial.exists():
            partial.unlink()


def write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (0600), atomically: the temporary file is created 0600 too, so the
    content is never readable by others, not even for a moment."""
    write_atomic(path, text, 0o600)


def build_once(path: Path, build: Callable[[Path], object], done: str) -> Path:
    """The directory ``path``, built by ``build`` into a scratch directory beside it and renamed into place once
    ``build`` returns: a reader never sees half of it, and processes building it at once (xdist workers, runs)
    wait for the first on a lock. ``path / done`` existing means built."""
    from filelock import FileLock

    if (path / done).exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / done).exists():
            scratch = path.with_name(path.name + ".building")
            shutil.rmtree(scratch, ignore_errors=True)  # what a build that died left
            build(scratch)
            scratch.rename(path)
    return path
