"""What a served model is (``ModelSpec``) and the error for one that is not served (the tiny models' builder
is models/tiny.py). Which models are served is the ``ModelRegistry`` resource's answer
(resources/model_registry.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from vbatch_pipelines.errors import NotFound, VbatchError

TINY_MODEL_ID = "vbatch-tiny-chat"
TINY_EMBED_MODEL_ID = "vbatch-tiny-embed"
TINY_RERANK_MODEL_ID = "vbatch-tiny-rerank"

# What a base model does, as vLLM's runners split it: text generation (chat, completions, responses), embeddings
# (vLLM's pooling runner, which also scores and reranks with them: the cosine of two texts' embeddings) or
# cross-encoder scoring (the pooling runner's classify task: one model pass over each query-document pair,
# its one logit through a sigmoid). An engine serves one of them, never two.
GENERATE = "generate"
EMBED = "embed"
SCORE = "score"
DECLARABLE_TASKS = (GENERATE, EMBED)  # a cross-encoder is known by its architecture, never declared
# The tasks that serve each endpoint; a request naming no model gets the first configured model of one of them.
ENDPOINT_TASKS = {"/v1/chat/completions": (GENERATE,), "/v1/completions": (GENERATE,), "/v1/responses": (GENERATE,),
                  "/v1/embeddings": (EMBED,), "/v1/score": (EMBED, SCORE), "/v1/rerank": (EMBED, SCORE)}

READY = "ready"  # an installed base model that can be served
DEPLOYED = "deployed"  # a fine-tune whose adapter is served


@dataclass(frozen=True)
class ModelSpec:
    id: str  # the name requests use
    path: str  # the base model's weights
    parent: str | None = None  # a fine-tune's base model id
    adapter: str | None = None  # a fine-tune's LoRA adapter dir
    trust_remote_code: bool = False
    task: str = GENERATE  # GENERATE, EMBED or SCORE: which endpoints it serves, which vLLM runner serves it

    @property
    def base(self) -> ModelSpec:
        """The base model whose engine serves this one."""
        if self.parent is None:
            return self
        return ModelSpec(self.parent, self.path, trust_remote_code=self.trust_remote_code, task=self.task)

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


class ModelTaskMismatch(VbatchError):
    """A model asked for what its engine cannot do: an embedding model asked to chat, a cross-encoder asked for
    embeddings, a chat model asked to score."""

    code = "model_not_supported"

    def __init__(self, spec: ModelSpec, endpoint: str, alternatives: list[str]):
        does = {EMBED: "embeddings (and score, rerank)", SCORE: "score and rerank (a cross-encoder)"}.get(
            spec.task, "text generation (chat, completions and responses)")
        others = f"; models that serve {endpoint}: {', '.join(alternatives)}" if alternatives else ""
        super().__init__(f"The model {spec.id!r} serves {does} only and cannot serve {endpoint}{others}", "model")


# Architectures vLLM runs as pooling models without conversion (its registry's embedding models are these and
# a few more); a checkpoint saved as the bare transformer (``*Model``) has no LM head to generate with.
_EMBEDDING_ARCHITECTURE_SUFFIXES = ("Model", "ForMaskedLM", "EmbeddingModel")


def parse_model_entry(value: str) -> tuple[str, str | None]:
    """``path`` or ``path:embed`` / ``path:generate`` (a VBATCH_MODELS value): the path and the declared task."""
    path, sep, task = value.rpartition(":")
    if sep and task in DECLARABLE_TASKS and path:
        return path, task
    return value, None


@lru_cache(maxsize=256)
def detect_task(path: str) -> str:
    """What a model directory is, by the rule vLLM's ``--runner auto`` follows: a ``*ForSequenceClassification``
    architecture with one label is a cross-encoder (vLLM's classify task, which its /score and /rerank use);
    a sentence-transformers ``modules.json`` with a Pooling module, or an architecture that is a bare
    encoder/transformer (``BertModel``, ``LlamaModel``, ``*ForMaskedLM``), is an embedding model; anything
    else generates. A decoder to be converted into an embedding model that says neither is declared with
    ``:embed``."""
    root = Path(path)
    try:
        config = json.loads((root / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    config = config if isinstance(config, dict) else {}
    if is_cross_encoder(config):
        return SCORE
    try:
        modules = json.loads((root / "modules.json").read_text())
        if any("Pooling" in str(module.get("type", "")) for module in modules):
            return EMBED
    except (OSError, ValueError, AttributeError):
        pass
    architectures = config.get("architectures") or []
    if architectures and all(arch.endswith(_EMBEDDING_ARCHITECTURE_SUFFIXES) and not arch.endswith("LMHeadModel")
                             for arch in architectures):
        return EMBED
    return GENERATE


def is_cross_encoder(config: dict) -> bool:
    """A sequence classifier with one label (its config's ``id2label``, else ``num_labels``, as transformers
    reads them): the relevance scorer vLLM serves /score and /rerank with."""
    architectures = config.get("architectures") or []
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    return bool(architectures) and labels == 1 and all(
        str(arch).endswith("ForSequenceClassification") for arch in architectures)


def embedding_dimensions(path: str) -> tuple[int | None, bool, list[int] | None]:
    """(embedding size, whether ``dimensions`` may shorten it, the allowed values or None for any) from
    the model's config, as vLLM reads them (``is_matryoshka``, ``matryoshka_dimensions``). The size is None
    when the config does not say."""
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None, False, None
    allowed = config.get("matryoshka_dimensions")
    size = config.get("hidden_size") or config.get("d_model")
    return size, bool(allowed) or bool(config.get("is_matryoshka")), allowed


def dimensions_error(spec: ModelSpec, dimensions: int) -> str | None:
    """Why ``dimensions`` cannot be asked of this model (vLLM's rule and wording), None when it can."""
    size, matryoshka, allowed = embedding_dimensions(spec.path)
    if not matryoshka:
        return (f"Model {spec.id!r} does not support Matryoshka embeddings; dimensions must be unset "
                f"(received dimensions={dimensions}).")
    if size is not None and not 1 <= dimensions <= size:
        return f"Model {spec.id!r} only supports dimensions in range [1, {size}], got {dimensions}."
    if allowed and dimensions not in allowed:
        return f"Model {spec.id!r} only supports Matryoshka dimensions {allowed}, got {dimensions}."
    return None
