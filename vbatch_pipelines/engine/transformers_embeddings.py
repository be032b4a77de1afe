"""The transformers fallback for embedding models and cross-encoders: the same vectors vLLM's pooling runner
computes, and the same scores (``/v1/score``, ``/v1/rerank``: the cosine of two texts' embeddings, as vLLM's
bi-encoder scoring; or a cross-encoder's relevance score of each pair, as vLLM's cross-encoder scoring).

vLLM reads how to pool from the model's sentence-transformers files (``modules.json``, ``1_Pooling``): the
pooling mode (mean, CLS, last token) and whether a Normalize module follows; without them it uses the
architecture's default (CLS for the BERT family, the last token otherwise) and normalises. This engine reads
the same files by the same rule, runs the bare transformer (``AutoModel``) on the inputs, pools the last
hidden states over each input's own tokens, cuts the vector to ``dimensions`` and then normalises, in vLLM's
order. Concurrent requests are gathered into micro-batches (right padding, at most ``max_batch_size``
sequences a forward pass). Responses have the shape vLLM's ``/v1/embeddings``, ``/score`` and ``/rerank``
return.

A cross-encoder (``TransformersCrossEncoderEngine``) is run as vLLM's CrossEncoderIOProcessor runs it: each
(query, document) pair tokenised together (``tokenizer(text=query, text_pair=document)``, special tokens
added), the sequence classifier's one logit for it, through vLLM's activation for one label (``score_activation``:
sigmoid unless the config names another).
"""

from __future__ import annotations

import asyncio
import base64
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError

from vbatch_pipelines.engine.base import EngineResponse, MicroBatching, Share
from vbatch_pipelines.models.registry import ModelSpec, dimensions_error
from vbatch_pipelines.protocol import (
    EmbeddingData,
    EmbeddingRequest,
    EmbeddingResponse,
    EmbeddingUsage,
    RerankDocument,
    RerankRequest,
    RerankResponse,
    RerankResult,
    ScoreData,
    ScoreRequest,
    ScoreResponse,
    UsageInfo,
    error_body,
)

EMBEDDINGS = "/v1/embeddings"
SCORING_REQUESTS = {"/v1/score": ScoreRequest, "/v1/rerank": RerankRequest}
_BERT_FAMILY = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "nomic_bert", "new", "modernbert"}


def pooling_of(path: str | Path) -> tuple[str, bool]:
    """(pooling mode: MEAN, CLS or LAST; whether to normalise) as vLLM resolves them for the model at
    ``path`` (config/model.py: sentence-transformers files first, then the architecture's default)."""
    root = Path(path)
    try:
        modules = json.loads((root / "modules.json").read_text())
    except (OSError, ValueError):
        modules = None
    if modules:
        if any("Dense" in str(m.get("type", "")) for m in modules):
            raise ValueError(f"{root}: sentence-transformers Dense modules are not supported by the transformers "
                             "engine; serve this model with vLLM")
        normalize = any("Normalize" in str(m.get("type", "")) for m in modules)
        pooling = next((m for m in modules if "Pooling" in str(m.get("type", ""))), None)
        if pooling is not None:
            try:
                config = json.loads((root / pooling.get("path", "") / "config.json").read_text())
            except (OSError, ValueError):
                config = {}
            for key, value in config.items():
                name = value if key == "pooling_mode" and isinstance(value, str) else key if value is True else None
                if name is None:
                    continue
                name = name.replace("pooling_mode_", "").split("_", 1)[0]
                mode = "LAST" if "lasttoken" in name else name.upper()
                if mode in ("MEAN", "CLS", "LAST"):
                    return mode, normalize
                if mode in ("MAX", "WEIGHTEDMEAN"):
                    raise ValueError(f"{root}: {mode.lower()} pooling is not one vLLM supports")
        default = _default_mode(root)
        return default, normalize
    return _default_mode(root), True


def scoring_response(model_id: str, request: ScoreRequest | RerankRequest, scores: list[float],
                     tokens: int) -> EngineResponse:
    """vLLM's /score body (one score per pair, in order) or /rerank body (the documents best first, cut to
    ``top_n``), with ``tokens`` prompt tokens."""
    if isinstance(request, ScoreRequest):
        return EngineResponse(200, ScoreResponse(
            model=model_id, data=[ScoreData(index=i, score=score) for i, score in enumerate(scores)],
            usage=UsageInfo(prompt_tokens=tokens, total_tokens=tokens)).model_dump())
    documents = request.texts()[1]
    results = sorted((RerankResult(index=i, document=RerankDocument(text=documents[i]), relevance_score=score)
                      for i, score in enumerate(scores)), key=lambda r: r.relevance_score, reverse=True)
    return EngineResponse(200, RerankResponse(
        model=model_id, results=results[:request.top_n or None],
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)).model_dump())


def score_activation(config) -> Callable:
    """What vLLM applies to a one-label classifier's logit (pooler/activations.py ``get_act_fn``): nothing for a
    regression head, the sentence-transformers activation the config names (torch.nn modules only, as vLLM
    allows), else a sigmoid."""
    import importlib

    import torch

    if getattr(config, "problem_type", None) == "regression":
        return torch.nn.Identity()
    name = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn") or \
        getattr(config, "sbert_ce_default_activation_function", None)
    if name:
        if not name.startswith("torch.nn.modules."):
            raise ValueError(f"activation {name!r}: only torch.nn.modules activations are loaded, as vLLM does")
        module, _, cls = name.rpartition(".")
        return getattr(importlib.import_module(module), cls)()
    return torch.sigmoid


def _default_mode(root: Path) -> str:
    try:
        model_type = json.loads((root / "config.json").read_text()).get("model_type", "")
    except (OSError, ValueError):
        model_type = ""
    return "CLS" if model_type in _BERT_FAMILY else "LAST"


@dataclass
class _Job:
    ids: list[list[int]]
    future: asyncio.Future


class _SequenceEngine(MicroBatching, ABC):
    """What the embedding and cross-encoder engines share: token sequences of concurrent requests run together,
    in micro-batches of similar lengths with right padding, one result per sequence (``_forward``)."""

    backend = "transformers"
    where = "in this process"
    max_batch_size: int
    pad_id: int

    @abstractmethod
    def _forward(self, ids, mask) -> list[Any]:
        """One result per row of a padded batch (``ids`` and ``mask`` on the CPU)."""

    async def _run(self, ids: list[list[int]]) -> list[Any]:
        """The results of these sequences, computed in the next micro-batch."""
        job = _Job(ids, asyncio.get_running_loop().create_future())
        await self._enqueue(job)
        return await job.future

    async def request_many(self, endpoint: str, bodies: list[dict[str, Any]],
                           share: Share | None = None) -> list[EngineResponse]:
        return list(await asyncio.gather(*(self.request(endpoint, body) for body in bodies)))

    async def open_stream(self, endpoint: str, body: dict[str, Any]):
        return EngineResponse(400, error_body(f"stream is not supported for {endpoint}", param="stream"))

    async def _work(self) -> None:
        while True:
            jobs = await self._gather(lambda jobs: sum(len(j.ids) for j in jobs) >= 4 * self.max_batch_size)
            try:
                results = await asyncio.to_thread(self._run_sequences, [ids for job in jobs for ids in job.ids])
            except Exception as exc:  # noqa: BLE001 - hand the failure to every waiting caller
                self._settle(jobs, error=exc)
                continue
            starts = [sum(len(j.ids) for j in jobs[:k]) for k in range(len(jobs))]
            self._settle(jobs, [results[start:start + len(job.ids)] for start, job in zip(starts, jobs)])

    def _run_sequences(self, sequences: list[list[int]]) -> list[Any]:
        torch = self._torch
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad little
        out: list[Any] = [None] * len(sequences)
        for start in range(0, len(order), self.max_batch_size):
            chunk = order[start:start + self.max_batch_size]
            width = max(len(sequences[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, : len(sequences[i])] = torch.tensor(sequences[i])
                mask[row, : len(sequences[i])] = 1
            with torch.inference_mode():
                results = self._forward(ids, mask)
            for row, i in enumerate(chunk):
                out[i] = results[row]
        return out


class TransformersEmbeddingEngine(_SequenceEngine):

    def __init__(self, model: ModelSpec, *, max_batch_size: int = 64):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.spec = model
        self.model_id = model.id
        self._torch = torch
        self.pooling, self.normalize = pooling_of(model.path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        self.model = AutoModel.from_pretrained(model.path, dtype="auto",
                                               trust_remote_code=model.trust_remote_code).to(self.device).eval()
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 512))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_batch_size = max_batch_size

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        if endpoint == EMBEDDINGS:
            return await self._embeddings(body)
        if endpoint in SCORING_REQUESTS:
            return await self._scores(endpoint, body)
        return EngineResponse(400, error_body(f"The model {self.model_id!r} serves embeddings, score and rerank "
                                              f"only, not {endpoint}", param="model", code="model_not_supported"))

    async def _embeddings(self, body: dict[str, Any]) -> EngineResponse:
        try:
            request = EmbeddingRequest.model_validate(body)
        except ValidationError as exc:
            return EngineResponse(400, error_body(str(exc), code="invalid_request"))
        if request.dimensions is not None:
            problem = dimensions_error(self.spec, request.dimensions)
            if problem:
                return EngineResponse(400, error_body(problem, param="dimensions", code="invalid_value"))
        inputs = request.inputs()
        try:
            ids = self._tokenize(inputs, [f"input {index}" for index in range(len(inputs))])
        except ValueError as exc:
            return EngineResponse(400, error_body(str(exc), param="input", code="invalid_request"))
        return EngineResponse(200, self._response(request, ids, await self._run(ids)))

    async def _scores(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        """vLLM's bi-encoder scoring: every text embedded once (queries, then documents), each pair's score the
        cosine of its two vectors (one query against each document, or pair by pair); usage counts every
        text's tokens once."""
        import numpy as np

        try:
            request = SCORING_REQUESTS[endpoint].model_validate(body)
        except ValidationError as exc:
            return EngineResponse(400, error_body(str(exc), code="invalid_request"))
        first, second = request.texts()
        names = [f"query {index}" for index in range(len(first))] + \
            [f"document {index}" for index in range(len(second))]
        try:
            ids = self._tokenize(first + second, names)
        except ValueError as exc:
            return EngineResponse(400, error_body(str(exc), code="invalid_request"))
        vectors = [np.asarray(v, dtype=np.float32) for v in await self._run(ids)]
        queries, documents = vectors[:len(first)], vectors[len(first):]
        scores = [float(q @ d / max(float(np.linalg.norm(q) * np.linalg.norm(d)), 1e-8))
                  for q, d in zip(queries * len(documents) if len(queries) == 1 else queries, documents)]
        return scoring_response(self.model_id, request, scores, sum(len(x) for x in ids))

    def _tokenize(self, inputs: list[str | list[int]], names: list[str]) -> list[list[int]]:
        """Token ids of each input, as vLLM renders them (special tokens added to texts), within the context;
        an error names the input (``names``, in the same order)."""
        vocab = len(self.tokenizer)
        ids = []
        for name, item in zip(names, inputs):
            tokens = self.tokenizer(item, add_special_tokens=True)["input_ids"] if isinstance(item, str) else item
            if not tokens:
                raise ValueError(f"{name} has no tokens")
            if any(not 0 <= token < vocab for token in tokens):
                raise ValueError(f"{name} has token ids outside the vocabulary (0..{vocab - 1})")
            if len(tokens) > self.max_len:
                raise ValueError(f"This model's maximum context length is {self.max_len} tokens. However, {name} "
                                 f"has {len(tokens)} tokens. Please reduce the length of the input.")
            ids.append(list(tokens))
        return ids

    def _response(self, request: EmbeddingRequest, ids: list[list[int]], vectors) -> dict[str, Any]:
        import numpy as np

        if request.dimensions is not None:
            vectors = [v[: request.dimensions] for v in vectors]
        if self.normalize:
            vectors = [v / max(float(np.linalg.norm(v)), 1e-12) for v in vectors]
        data = []
        for index, vector in enumerate(vectors):
            vector = np.asarray(vector, dtype="<f4")
            embedding = base64.b64encode(vector.tobytes()).decode() if request.encoding_format == "base64" \
                else vector.tolist()
            data.append(EmbeddingData(index=index, embedding=embedding))
        tokens = sum(len(x) for x in ids)
        return EmbeddingResponse(model=self.model_id, data=data,
                                 usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens)).model_dump()

    def _forward(self, ids, mask) -> list[Any]:
        """Pooled (not yet cut or normalised) float32 vectors, one per row."""
        torch = self._torch
        hidden = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state.float()
        lengths = mask.sum(dim=1).to(self.device)
        if self.pooling == "MEAN":
            m = mask.to(self.device).unsqueeze(-1).float()
            pooled = (hidden * m).sum(dim=1) / lengths.unsqueeze(-1)
        elif self.pooling == "CLS":
            pooled = hidden[:, 0]
        else:  # LAST: each sequence's own last token (right padding)
            pooled = hidden[torch.arange(len(ids), device=self.device), lengths - 1]
        return [row.cpu().numpy() for row in pooled]


class TransformersCrossEncoderEngine(_SequenceEngine):
    """A cross-encoder's /v1/score and /v1/rerank: every pair (one query against each document, or pair by pair)
    run through the sequence classifier, micro-batched like the embedding engine; usage counts each pair's
    tokens (the query once per document, as vLLM counts them)."""

    def __init__(self, model: ModelSpec, *, max_batch_size: int = 64):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.spec = model
        self.model_id = model.id
        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, trust_remote_code=model.trust_remote_code)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model.path, dtype="auto", trust_remote_code=model.trust_remote_code).to(self.device).eval()
        if self.model.config.num_labels != 1:
            raise ValueError(f"{model.path}: a cross-encoder has one label, this model {self.model.config.num_labels}")
        self.activation = score_activation(self.model.config)
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 512))
        # The classifier finds each right-padded row's last real token by its pad id: pad with the one it knows.
        self.pad_id = next(p for p in (self.model.config.pad_token_id, self.tokenizer.pad_token_id, 0) if p is not None)
        self.model.config.pad_token_id = self.pad_id
        self.max_batch_size = max_batch_size

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        if endpoint not in SCORING_REQUESTS:
            return EngineResponse(400, error_body(f"The model {self.model_id!r} serves score and rerank only, "
                                                  f"not {endpoint}", param="model", code="model_not_supported"))
        try:
            request = SCORING_REQUESTS[endpoint].model_validate(body)
        except ValidationError as exc:
            return EngineResponse(400, error_body(str(exc), code="invalid_request"))
        first, second = request.texts()
        pairs = list(zip(first * len(second) if len(first) == 1 else first, second))
        ids = []
        for index, (query, document) in enumerate(pairs):
            tokens = self.tokenizer(text=query, text_pair=document, add_special_tokens=True)["input_ids"]
            if len(tokens) > self.max_len:
                return EngineResponse(400, error_body(
                    f"This model's maximum context length is {self.max_len} tokens. However, pair {index} has "
                    f"{len(tokens)} tokens. Please reduce the length of the input.", code="invalid_request"))
            ids.append(list(tokens))
        return scoring_response(self.model_id, request, await self._run(ids), sum(len(x) for x in ids))

    def _forward(self, ids, mask) -> list[float]:
        """Each row's score (right padding: the classifier reads each row's last real token by the pad id)."""
        logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return [float(score) for score in self.activation(logits.float()[:, 0])]
