"""The portable fallback engine: transformers in-process, where vLLM is not installed (macOS, no venv).

Concurrent requests are gathered into micro-batches (same sampling settings, left padding) so a batch
still runs at batch speed. Bodies are validated with the same protocol models as everywhere else and
responses have the exact OpenAI shape the vLLM path returns. What a request asks that this engine cannot do
(structured output, tools, logprobs, reasoning, images: see ``honoured``) is refused by name, never ignored.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from vbatch_pipelines.engine.base import EngineResponse, MicroBatching, Share
from vbatch_pipelines.engine.honoured import RequestRefused, Sampling, refuse_unhonoured
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
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
    UsageInfo,
    error_body,
    responses_messages,
)


@dataclass
class _Job:
    key: Sampling
    prompts: list[Any]  # strings, or lists of token ids
    max_new_tokens: int
    stops: list[str]
    future: asyncio.Future
    results: list = field(default_factory=list)


class TransformersEngine(MicroBatching):
    backend = "transformers"
    where = "in this process"

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
        # A fast tokenizer sets padding on its shared Rust backend for each call: a call without padding (counting
        # a prompt, on the event loop) between a batch's setting and its encoding (in a thread) left the batch
        # unpadded ("expected sequence of length 15 at dim 1 (got 16)"). One call at a time.
        self._tokenizing = threading.Lock()
        base = AutoModelForCausalLM.from_pretrained(model.path, dtype="auto",
                                                    trust_remote_code=model.trust_remote_code)
        if model.adapter:  # a fine-tune: its LoRA adapter merged into a private copy of the base
            from peft import PeftModel

            base = PeftModel.from_pretrained(base, model.adapter).merge_and_unload()
        self.model = base.to(self.device).eval()
        self.max_len = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.max_batch_size = max_batch_size
        self.default_max_tokens = default_max_tokens

    # -- request handling --------------------------------------------------------------------------

    async def request(self, endpoint: str, body: dict[str, Any]) -> EngineResponse:
        request_model = ENDPOINT_REQUESTS.get(endpoint)
        if request_model is None:
            return EngineResponse(404, error_body(f"Unsupported endpoint {endpoint}", code="invalid_url"))
        if request_model not in (ChatCompletionRequest, CompletionRequest, ResponsesRequest):
            return EngineResponse(400, error_body(f"The model {self.model_id!r} generates text; it does not serve "
                                                  f"{endpoint}", param="model", code="model_not_supported"))
        try:
            request = request_model.model_validate(body)
            refuse_unhonoured(endpoint, request.model_dump(exclude_unset=True))
            prompts = self._prompts(request)
            max_new = request.max_new_tokens(self.default_max_tokens)
            sampling = Sampling.of(request, vocab=len(self.tokenizer), max_new_tokens=max_new)
        except RequestRefused as exc:
            return EngineResponse(400, error_body(str(exc), param=exc.param, code=exc.code))
        except (ValidationError, ValueError) as exc:
            return EngineResponse(400, error_body(str(exc), code="invalid_request"))
        for prompt in prompts:
            n_prompt = len(prompt) if isinstance(prompt, list) else len(self._token_ids(prompt))
            if n_prompt == 0:
                return EngineResponse(400, error_body("The prompt is empty (no tokens).", param="prompt",
                                                      code="invalid_request"))
            if n_prompt + max_new > self.max_len:
                return EngineResponse(400, error_body(
                    f"This model's maximum context length is {self.max_len} tokens. However, you requested "
                    f"{n_prompt + max_new} tokens ({n_prompt} in the messages, {max_new} in the completion).",
                    param=request.max_tokens_param, code="context_length_exceeded"))
        job = _Job(sampling, prompts, max_new, request.stop_sequences(), asyncio.get_running_loop().create_future())
        await self._enqueue(job)
        outputs = await job.future
        return EngineResponse(200, self._response(request, outputs))

    async def request_many(self, endpoint: str, bodies: list[dict[str, Any]],
                           share: Share | None = None) -> list[EngineResponse]:
        return list(await asyncio.gather(*(self.request(endpoint, body) for body in bodies)))

    async def open_stream(self, endpoint: str, body: dict[str, Any]):
        """Generation runs to the end, then is sent as OpenAI stream chunks (this engine has no
        token-level streaming; the wire format is the same)."""
        response = await self.request(endpoint, {**body, "stream": False})
        if not response.ok:
            return response
        if response.body["object"] == "response":
            return _as_response_events(response.body)
        return _as_sse(response.body, include_usage=bool((body.get("stream_options") or {}).get("include_usage")))

    def _prompts(self, request) -> list[Any]:
        if isinstance(request, ResponsesRequest):
            try:
                messages = responses_messages(request.model_dump(include={"instructions", "input"}))
            except ValueError as exc:
                raise RequestRefused(str(exc), "input") from exc
            return [self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)]
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
        if isinstance(request, ResponsesRequest):
            text, _, reason, _ = choices[0]
            status = "incomplete" if reason == "length" else "completed"
            return ResponsesResponse(
                model=self.model_id, status=status, instructions=request.instructions,
                incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
                output=[ResponseOutputMessage(status=status, content=[ResponseOutputText(text=text)])],
                usage=ResponseUsage(input_tokens=prompt_tokens, output_tokens=completion_tokens,
                                    total_tokens=prompt_tokens + completion_tokens),
                max_output_tokens=request.max_output_tokens, temperature=request.temperature, top_p=request.top_p,
                metadata=request.metadata, text=request.text or {"format": {"type": "text"}},
                service_tier=request.service_tier or "auto", user=request.user).model_dump()
        if isinstance(request, CompletionRequest):
            return CompletionResponse(model=self.model_id, usage=usage, choices=[
                CompletionChoice(index=i, text=text, finish_reason=reason)
                for i, (text, _, reason, _) in enumerate(choices)]).model_dump()
        return ChatCompletionResponse(model=self.model_id, usage=usage, choices=[
            ChatCompletionChoice(index=i, message=ChatCompletionMessage(content=text), finish_reason=reason)
            for i, (text, _, reason, _) in enumerate(choices)]).model_dump()

    # -- micro-batching ----------------------------------------------------------------------------

    async def _work(self) -> None:
        while True:
            jobs = await self._gather(lambda jobs: len(jobs) >= self.max_batch_size)
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault(job.key, []).append(job)
            for group in groups.values():
                try:
                    self._settle(group, await asyncio.to_thread(self._generate, group))
                except Exception as exc:  # noqa: BLE001 - hand the failure to every waiting caller
                    self._settle(group, error=exc)

    def _generate(self, jobs: list[_Job]) -> list[list[list[tuple[str, int, str, int]]]]:
        torch = self._torch
        sampling = jobs[0].key
        n = sampling.n
        flat = [(j, p) for j, job in enumerate(jobs) for p in job.prompts]
        # Greedy decoding gives the same sequence n times (as vLLM does): generate it once, repeat it.
        per_prompt = n if sampling.do_sample else 1
        eos = self.tokenizer.eos_token_id
        kwargs: dict[str, Any] = {"max_new_tokens": max(job.max_new_tokens for job in jobs),
                                  "num_return_sequences": per_prompt, "pad_token_id": self.tokenizer.pad_token_id,
                                  **sampling.generate_kwargs(eos)}
        if sampling.do_sample and sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        stop_ids = sampling.stop_ids(eos)
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
                    finish, text_tokens = "length", tokens
                    end = next((i for i, token in enumerate(tokens) if token in stop_ids), None)
                    if end is not None:  # the stop token is generated (counted) but not part of the text
                        tokens, text_tokens, finish = tokens[: end + 1], tokens[:end], "stop"
                    text = self.tokenizer.decode(text_tokens, skip_special_tokens=True)
                    for stop in job.stops:
                        cut = text.find(stop)
                        if cut != -1:
                            text, finish = text[:cut], "stop"
                    choices.append((text, len(tokens), finish, prompt_lens[row]))
                results[j].append(choices)
        return results

    def _token_ids(self, prompt: str) -> list[int]:
        with self._tokenizing:
            return self.tokenizer(prompt)["input_ids"]

    def _encode(self, prompts: list[Any]) -> dict[str, Any]:
        """Left-padded input ids for texts, token-id lists or a mix of both."""
        with self._tokenizing:
            if all(isinstance(p, str) for p in prompts):
                enc = self.tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
            else:
                ids = [p if isinstance(p, list) else self.tokenizer(p, add_special_tokens=False)["input_ids"]
                       for p in prompts]
                enc = self.tokenizer.pad({"input_ids": ids}, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in enc.items()}


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


async def _as_response_events(body: dict[str, Any]):
    """A finished Response as the Responses API's stream events, in OpenAI's order (the whole text in one
    delta): created, in progress, the message item and its text part, then completed (or incomplete)."""
    import json

    sequence = iter(range(1 << 30))

    def event(kind: str, **payload: Any) -> bytes:
        data = {"type": kind, "sequence_number": next(sequence), **payload}
        return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()

    started = {**body, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    for index, item in enumerate(body["output"]):
        yield event("response.output_item.added", output_index=index,
                    item={**item, "status": "in_progress", "content": []})
        for number, part in enumerate(item["content"]):
            where = {"item_id": item["id"], "output_index": index, "content_index": number}
            yield event("response.content_part.added", **where, part={**part, "text": ""})
            yield event("response.output_text.delta", **where, delta=part["text"], logprobs=[])
            yield event("response.output_text.done", **where, text=part["text"], logprobs=[])
            yield event("response.content_part.done", **where, part=part)
        yield event("response.output_item.done", output_index=index, item=item)
    yield event("response.completed" if body["status"] == "completed" else "response.incomplete", response=body)
