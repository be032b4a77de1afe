"""The portable fallback engine: transformers in-process, where vLLM is not installed (macOS, no venv).

Concurrent requests are gathered into micro-batches (same sampling settings, left padding) so a batch
still runs at batch speed. Bodies are validated with the same protocol models as everywhere else and
responses have the exact OpenAI shape the vLLM path returns.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from vbatch_pipelines.engine.base import EngineResponse
from vbatch_pipelines.models.registry import ModelSpec
from vbatch_pipelines.protocol import (
    ENDPOINT_REQUESTS,
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    error_body,
)

SAMPLING_EPS = 1e-5


@dataclass
class _Job:
    key: tuple
    prompts: list[Any]  # strings, or lists of token ids
    max_new_tokens: int
    stops: list[str]
    future: asyncio.Future
    results: list = field(default_factory=list)


class TransformersEngine:
    backend = "transformers"

    def __init__(self, model: ModelSpec, *, max_batch_size: int = 64, default_max_tokens: int = 256):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_id = model.id
        self._torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model.path, padding_side="left",
                                                       trust_remote_code=model.trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        base = AutoModelForCausalLM.from_pretrained(model.path, dtype="auto",
                                                    trust_remote_code=model.trust_remote_code)
        if model.adapter:  # a fine-tune: its LoRA adapter merged into a private copy of the base
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, model.adapter).merge_and_unload()
        self.model = base.to(self.device).eval()
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_batch_size = max_batch_size
        self.default_max_tokens = default_max_tokens
        self._queue: asyncio.Queue[_Job] | None = None
        self._worker: asyncio.Task | None = None

    # -- request handling --------------------------------------------------------------------------

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        request_model = ENDPOINT_REQUESTS.get(endpoint)
        if request_model is None:
            return EngineResponse(404, error_body(f"Unsupported endpoint {endpoint}", code="invalid_url"))
        try:
            request = request_model.model_validate(body)
            prompts = self._prompts(request)
        except (ValidationError, ValueError) as exc:
            return EngineResponse(400, error_body(str(exc), code="invalid_request"))
        max_new = request.max_new_tokens(self.default_max_tokens)
        for prompt in prompts:
            n_prompt = len(prompt) if isinstance(prompt, list) else len(self.tokenizer(prompt)["input_ids"])
            if n_prompt == 0:
                return EngineResponse(400, error_body("The prompt is empty (no tokens).", param="prompt",
                                                      code="invalid_request"))
            if n_prompt + max_new > self.max_len:
                return EngineResponse(400, error_body(
                    f"This model's maximum context length is {self.max_len} tokens. However, you requested "
                    f"{n_prompt + max_new} tokens ({n_prompt} in the messages, {max_new} in the completion).",
                    param="max_tokens", code="context_length_exceeded"))
        # As vLLM: a temperature below 1e-5 is greedy (dividing logits by it overflows to inf/nan).
        do_sample = (request.temperature if request.temperature is not None else 1.0) >= SAMPLING_EPS
        key = (do_sample, request.temperature, request.top_p, request.seed, request.n)
        job = _Job(key, prompts, max_new, request.stop_sequences(), asyncio.get_running_loop().create_future())
        await self._enqueue(job)
        outputs = await job.future
        return EngineResponse(200, self._response(request, outputs))

    async def request_many(self, endpoint: str, bodies: list[dict[str, Any]]) -> list[EngineResponse]:
        return list(await asyncio.gather(*(self.request(endpoint, body) for body in bodies)))

    async def open_stream(self, endpoint: str, body: dict[str, Any]):
        """Generation runs to the end, then is sent as OpenAI stream chunks (this engine has no
        token-level streaming; the wire format is the same)."""
        response = await self.request(endpoint, {**body, "stream": False})
        if not response.ok:
            return response
        return _as_sse(response.body, include_usage=bool((body.get("stream_options") or {}).get("include_usage")))

    def _prompts(self, request) -> list[Any]:
        if isinstance(request, ChatCompletionRequest):
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
            return [self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)]
        prompt = request.prompt
        if isinstance(prompt, str):
            return [prompt]
        prompts = [list(prompt)] if all(isinstance(p, int) for p in prompt) else list(prompt)
        vocab = len(self.tokenizer)
        for index, item in enumerate(prompts):
            if isinstance(item, list) and not item:
                raise ValueError(f"prompt {index} is an empty list of token ids")
            if isinstance(item, list) and any(not 0 <= token < vocab for token in item):
                raise ValueError(f"prompt {index} has token ids outside the vocabulary (0..{vocab - 1})")
        return prompts

    def _response(self, request, outputs: list[list[tuple[str, int, str, int]]]) -> dict[str, Any]:
        """The OpenAI body, built with the protocol's response models (ids, timestamps, object types)."""
        # outputs: per prompt, its choices as (text, completion tokens, finish reason, prompt tokens)
        prompt_tokens = sum(o[0][3] for o in outputs)
        completion_tokens = sum(n for per_prompt in outputs for _, n, _, _ in per_prompt)
        usage = UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens)
        choices = [choice for per_prompt in outputs for choice in per_prompt]
        if isinstance(request, CompletionRequest):
            return CompletionResponse(model=self.model_id, usage=usage, choices=[
                CompletionChoice(index=i, text=text, finish_reason=reason)
                for i, (text, _, reason, _) in enumerate(choices)]).model_dump()
        return ChatCompletionResponse(model=self.model_id, usage=usage, choices=[
            ChatCompletionChoice(index=i, message=ChatCompletionMessage(content=text), finish_reason=reason)
            for i, (text, _, reason, _) in enumerate(choices)]).model_dump()

    # -- micro-batching ----------------------------------------------------------------------------

    async def _enqueue(self, job: _Job) -> None:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.create_task(self._work())
        await self._queue.put(job)

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            jobs = [await self._queue.get()]
            await asyncio.sleep(0.002)  # let concurrent callers join this micro-batch
            while not self._queue.empty() and len(jobs) < self.max_batch_size:
                jobs.append(self._queue.get_nowait())
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                try:
                    results = await asyncio.to_thread(self._generate, group)
                    for job, result in zip(group, results):
                        if not job.future.done():
                            job.future.set_result(result)
                except Exception as exc:  # noqa: BLE001 - hand the failure to every waiting caller
                    for job in group:
                        if not job.future.done():
                            job.future.set_exception(exc)

    def _generate(self, jobs: list[_Job]) -> list[list[list[tuple[str, int, str, int]]]]:
        torch = self._torch
        do_sample, temperature, top_p, seed, n = jobs[0].key
        flat = [(j, p) for j, job in enumerate(jobs) for p in job.prompts]
        # Greedy decoding gives the same sequence n times (as vLLM does): generate it once, repeat it.
        per_prompt = n if do_sample else 1
        kwargs: dict[str, Any] = {"max_new_tokens": max(job.max_new_tokens for job in jobs),
                                  "num_return_sequences": per_prompt, "pad_token_id": self.tokenizer.pad_token_id}
        if do_sample:
            kwargs.update(do_sample=True, temperature=temperature or 1.0, top_p=top_p or 1.0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        eos = self.tokenizer.eos_token_id
        results: list[list[list[tuple[str, int, str, int]]]] = [[] for _ in jobs]
        # At most max_batch_size sequences per generate() call, so memory stays bounded whatever n and the
        # number of prompts in one request.
        step = max(1, self.max_batch_size // per_prompt)
        for start in range(0, len(flat), step):
            chunk = flat[start:start + step]
            enc = self._encode([p for _, p in chunk])
            with torch.inference_mode():
                generated = self.model.generate(**enc, **kwargs)
            width = enc["input_ids"].shape[1]
            prompt_lens = enc["attention_mask"].sum(dim=1).tolist()
            for row, (j, _) in enumerate(chunk):
                job = jobs[j]
                choices = []
                for k in range(n):
                    tokens = generated[row * per_prompt + k % per_prompt, width:].tolist()[: job.max_new_tokens]
                    finish = "length"
                    if eos in tokens:
                        tokens = tokens[: tokens.index(eos) + 1]
                        finish = "stop"
                    text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                    for stop in job.stops:
                        cut = text.find(stop)
                        if cut != -1:
                            text, finish = text[:cut], "stop"
                    choices.append((text, len(tokens), finish, prompt_lens[row]))
                results[j].append(choices)
        return results

    def _encode(self, prompts: list[Any]) -> dict[str, Any]:
        """Left-padded input ids for texts, token-id lists or a mix of both."""
        if all(isinstance(p, str) for p in prompts):
            enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        else:
            ids = [p if isinstance(p, list) else self.tokenizer(p, add_special_tokens=False)["input_ids"]
                   for p in prompts]
            enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}

    async def recover(self) -> None:
        return None

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            self._worker = None
            self._queue = None


async def _as_sse(body: dict[str, Any], include_usage: bool):
    """A finished completion as OpenAI ``chat.completion.chunk`` / ``text_completion`` stream events."""
    import json

    chat = body["object"] == "chat.completion"
    base = {"id": body["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": body["created"], "model": body["model"]}

    def event(payload: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()

    for choice in body["choices"]:
        if chat:
            for delta in ({"role": "assistant", "content": ""}, {"content": choice["message"]["content"]}):
                yield event({**base, "choices": [{"index": choice["index"], "delta": delta, "logprobs": None,
                                                  "finish_reason": None}]})
            yield event({**base, "choices": [{"index": choice["index"], "delta": {}, "logprobs": None,
                                              "finish_reason": choice["finish_reason"]}]})
        else:
            yield event({**base, "choices": [{"index": choice["index"], "text": choice["text"], "logprobs": None,
                                              "finish_reason": choice["finish_reason"]}]})
    if include_usage:
        yield event({**base, "choices": [], "usage": body["usage"]})
    yield b"data: [DONE]\n\n"
