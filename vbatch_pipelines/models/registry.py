"""What a served model is (``ModelSpec``), the error for one that is not served, and the tiny model's
builder. Which models are served is the ``ModelRegistry`` resource's answer (resources/model_registry.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from vbatch_pipelines.errors import NotFound

TINY_MODEL_ID = "vbatch-tiny-chat"

READY = "ready"  # an installed base model that can be served
DEPLOYED = "deployed"  # a fine-tune whose adapter is served


@dataclass(frozen=True)
class ModelSpec:
    id: str  # the name requests use
    path: str  # the base model's weights
    parent: str | None = None  # a fine-tune's base model id
    adapter: str | None = None  # a fine-tune's LoRA adapter dir
    trust_remote_code: bool = False

    @property
    def base(self) -> ModelSpec:
        """The base model whose engine serves this one."""
        if self.parent is None:
            return self
        return ModelSpec(self.parent, self.path, trust_remote_code=self.trust_remote_code)

    def with_adapter(self, name: str, adapter: str) -> ModelSpec:
        return replace(self.base, id=name, parent=self.base.id, adapter=adapter)


class ModelNotFound(NotFound):
    code = "model_not_found"

    def __init__(self, name: str, known: list[str]):
        self.name = name
        self.known = known
        super().__init__(
            f"The model {name!r} does not exist or is not served here; available: {', '.join(known) or 'none'}",
            "model")


def ensure_tiny_model(path: Path) -> Path:
    """Build the tiny model at ``path`` once (a lock keeps concurrent builders apart)."""
    from filelock import FileLock

    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not (path / "config.json").exists():
            from vbatch_pipelines.models.tiny import create_tiny_model

            tmp = path.with_name(path.name + ".building")
            create_tiny_model(tmp)
            tmp.rename(path)
    return path
