"""OpenAI request and response bodies, mirrored field for field (after vLLM's entrypoints/openai protocol).

The same models validate batch input lines, online requests at the REST front door and what the engines
return, so a body accepted anywhere in vbatch is accepted everywhere.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError


class OpenAIBaseModel(BaseModel):
    # Unknown fields are kept and passed to the engine (vLLM has many extensions), as vLLM does.
    model_config = ConfigDict(extra="allow")


# ---- requests -------------------------------------------------------------------------------------

# Beyond OpenAI's own fields, the extensions vLLM documents for sampling, structured output and tools. Any other
# field is refused as OpenAI refuses it ("Unrecognized request argument supplied"), never passed blindly to
# the engine: vLLM's request-level ``chat_template``, ``logits_processors`` or ``kv_transfer_params`` would
# let a client choose code paths on the server.
ENGINE_EXTENSIONS = frozenset({
    "top_k", "min_p", "repetition_penalty", "length_penalty", "use_beam_search", "stop_token_ids",
    "include_stop_str_in_output", "ignore_eos", "min_tokens", "skip_special_tokens", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "prompt_logprobs", "allowed_token_ids", "bad_words", "add_generation_prompt",
    "continue_final_message", "add_special_tokens", "documents", "chat_template_kwargs", "structured_outputs",
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "guided_decoding_backend",
    "guided_whitespace_pattern", "return_tokens_as_token_ids", "return_token_ids", "include_reasoning",
    # OpenAI fields vbatch passes to the engine as they are
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "logit_bias", "metadata", "store",
    "service_tier", "reasoning_effort", "modalities", "prediction", "audio", "web_search_options", "verbosity",
    "prompt_cache_key", "safety_identifier",
})
MAX_MESSAGES = 2048
MAX_PROMPTS = 2048
MAX_CHOICES = 2048  # n × prompts: sequences one request may ask for
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = False


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def text(self) -> str:
        """The message's text; content parts other than text are not supported by local text models."""
        if isinstance(self.content, str) or self.content is None:
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text":
                raise ValueError(f"content part type {part.get('type')!r} is not supported; use text")
            texts.append(str(part.get("text", "")))
        return "".join(texts)


class _SamplingParams(OpenAIBaseModel):
    model: str | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=128)
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data:
                if name not in cls.model_fields and name not in ENGINE_EXTENSIONS:
                    raise PydanticCustomError("unrecognized_argument",
                                              "Unrecognized request argument supplied: {name}", {"name": name})
        return data

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("stop takes at most 4 sequences")
        return value

    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingParams):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    response_format: dict[str, Any] | None = None

    def max_new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class CompletionRequest(_SamplingParams):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: int | None = Field(default=16, ge=1)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = Field(default=None, ge=1, le=128)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        if isinstance(value, list) and value and not isinstance(value[0], int) and len(value) > MAX_PROMPTS:
            raise ValueError(f"prompt takes at most {MAX_PROMPTS} prompts")
        return value

    @model_validator(mode="after")
    def _bounded_work(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of < self.n:
            raise ValueError(f"best_of ({self.best_of}) must be at least n ({self.n})")
        prompts = len(self.prompt) if isinstance(self.prompt, list) and not isinstance(self.prompt[0], int) else 1
        if prompts * max(self.n, self.best_of or 1) > MAX_CHOICES:
            raise ValueError(f"n (or best_of) × the number of prompts is {prompts * max(self.n, self.best_of or 1)}; "
                             f"one request may ask for at most {MAX_CHOICES} completions")
        return self

    def max_new_tokens(self, default: int) -> int:
        return self.max_tokens or default


ENDPOINT_REQUESTS: dict[str, type[_SamplingParams]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
}
SUPPORTED_ENDPOINTS = tuple(ENDPOINT_REQUESTS)


# ---- responses ------------------------------------------------------------------------------------


class UsageInfo(OpenAIBaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ChatCompletionMessage(OpenAIBaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatCompletionChoice(OpenAIBaseModel):
    index: int
    message: ChatCompletionMessage
    logprobs: Any = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class CompletionChoice(OpenAIBaseModel):
    index: int
    text: str
    logprobs: Any = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class ErrorBody(OpenAIBaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


def response_text(body: dict[str, Any]) -> str | None:
    """The first choice's text of a chat or completion response body (None when it has no choices)."""
    choice = (body.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` in OpenAI's shape."""
    return {"error": ErrorBody(message=message, type=type, param=param, code=code).model_dump()}
