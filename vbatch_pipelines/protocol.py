"""OpenAI request and response bodies, mirrored field for field (after vLLM's entrypoints/openai protocol).

The same models validate batch input lines, online requests at the REST front door and what the engines
return, so a body accepted anywhere in vbatch is accepted everywhere.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    ValidationInfo,
    field_validator,
    model_validator,
)
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
    "return_tokens_as_token_ids", "return_token_ids", "include_reasoning",
    # OpenAI fields vbatch passes to the engine as they are
    "tools", "tool_choice", "parallel_tool_calls", "functions", "function_call", "logit_bias", "metadata", "store",
    "service_tier", "reasoning_effort", "modalities", "prediction", "audio", "web_search_options", "verbosity",
    "prompt_cache_key", "safety_identifier",
})
# vLLM's older guided-decoding fields: vLLM 0.32 no longer reads them (it would answer unconstrained), so they are
# refused, each saying what replaces it.
REPLACED_EXTENSIONS = {
    "guided_json": 'structured_outputs: {"json": <schema>}',
    "guided_regex": 'structured_outputs: {"regex": <pattern>}',
    "guided_choice": 'structured_outputs: {"choice": [...]}',
    "guided_grammar": 'structured_outputs: {"grammar": <grammar>}',
    "guided_decoding_backend": "nothing (the server chooses the structured-output backend)",
    "guided_whitespace_pattern": "nothing (the server keeps JSON compact)",
}
MAX_MESSAGES = 2048
MAX_PROMPTS = 2048
MAX_CHOICES = 2048  # n × prompts: sequences one request may ask for
MAX_LOGPROBS = 20  # vLLM's default --max-logprobs


def refuse_unknown_fields(model: type[BaseModel], data: Any, extensions: frozenset[str] = frozenset()) -> Any:
    """A body's fields must be the model's own or the allowed ``extensions``, as OpenAI refuses the rest."""
    if isinstance(data, dict):
        for name in data:
            if name in REPLACED_EXTENSIONS:
                raise PydanticCustomError("unrecognized_argument",
                                          "{name} is no longer supported by vLLM; use {instead}",
                                          {"name": name, "instead": REPLACED_EXTENSIONS[name]})
            if name not in model.model_fields and name not in extensions:
                raise PydanticCustomError("unrecognized_argument",
                                          "Unrecognized request argument supplied: {name}", {"name": name})
    return data


def _at_most_4_stops(value: str | list[str] | None) -> str | list[str] | None:
    if isinstance(value, list) and len(value) > 4:
        raise ValueError("stop takes at most 4 sequences")
    return value


def _stop_sequences(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


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
    max_tokens_param: ClassVar[str] = "max_tokens"  # the field that bounds the answer, for errors

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
        return refuse_unknown_fields(cls, data, ENGINE_EXTENSIONS)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        return _at_most_4_stops(value)

    def stop_sequences(self) -> list[str]:
        return _stop_sequences(self.stop)


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


# OpenAI's limits for one embeddings request: 2,048 inputs, 8,192 tokens each. Characters are bounded too, at
# 8 per token, so a body is refused before any tokenizer sees it; the engine checks the model's context.
MAX_EMBEDDING_INPUTS = 2048
MAX_EMBEDDING_INPUT_TOKENS = 8192
MAX_EMBEDDING_INPUT_CHARS = 8 * MAX_EMBEDDING_INPUT_TOKENS

_Text = Annotated[StrictStr, Field(min_length=1, max_length=MAX_EMBEDDING_INPUT_CHARS)]
_Tokens = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1, max_length=MAX_EMBEDDING_INPUT_TOKENS)]


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_text(text: str, where: str) -> None:
    if not text:
        raise ValueError(f"{where} is an empty string; each input must have text")
    if len(text) > MAX_EMBEDDING_INPUT_CHARS:
        raise ValueError(f"{where} has {len(text)} characters; the limit is {MAX_EMBEDDING_INPUT_CHARS}")


def _check_tokens(tokens: list[int], where: str) -> None:
    if not tokens:
        raise ValueError(f"{where} is an empty list of token ids")
    if len(tokens) > MAX_EMBEDDING_INPUT_TOKENS:
        raise ValueError(f"{where} has {len(tokens)} tokens; the limit is {MAX_EMBEDDING_INPUT_TOKENS}")


class EmbeddingRequest(OpenAIBaseModel):
    """OpenAI's embeddings body, field for field; any other field is refused (vLLM's pooling extensions
    included: the transformers fallback could not honour them)."""

    input: Union[_Text, Annotated[list[_Text], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)], _Tokens,
                 Annotated[list[_Tokens], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return refuse_unknown_fields(cls, data)

    @field_validator("input", mode="before")
    @classmethod
    def _input_shape(cls, value: Any) -> Any:
        """One clear message per malformed input (the union's own errors list every branch it tried)."""
        shape = "input must be a string, a list of strings, a list of token ids or a list of token-id lists"
        if isinstance(value, str):
            _check_text(value, "input")
            return value
        if not isinstance(value, list):
            raise ValueError(shape)
        if not value:
            raise ValueError("input must not be an empty list")
        if len(value) > MAX_EMBEDDING_INPUTS and not _is_token(value[0]):
            raise ValueError(f"input takes at most {MAX_EMBEDDING_INPUTS} inputs per request; got {len(value)}")
        if all(isinstance(item, str) for item in value):
            for index, item in enumerate(value):
                _check_text(item, f"input[{index}]")
        elif all(_is_token(item) for item in value):
            _check_tokens(value, "input")
        elif all(isinstance(item, list) for item in value):
            for index, item in enumerate(value):
                if not all(_is_token(token) for token in item):
                    raise ValueError(f"input[{index}] must be a list of token ids (non-negative integers)")
                _check_tokens(item, f"input[{index}]")
        else:
            raise ValueError(shape)
        return value

    def inputs(self) -> list[str | list[int]]:
        """Each input on its own: a text or a list of token ids."""
        value = self.input
        if isinstance(value, str) or (value and isinstance(value[0], int)):
            return [value]
        return list(value)


# The Responses API. Its body is OpenAI's, field for field; what only OpenAI's hosted service does is refused
# on every engine, never passed on to be ignored: vbatch keeps no responses or conversations (so nothing to
# chain from or retrieve later), runs nothing in the background and has no prompt templates or moderation.
RESPONSES_ONLY_HOSTED = {
    "previous_response_id": "vbatch keeps no responses to continue from; send the earlier turns in input",
    "conversation": "vbatch keeps no conversations; send the earlier turns in input",
    "prompt": "prompt templates are not supported; send the text in input and instructions",
    "background_options": "background responses are not supported",
    "context_management": "context management is an OpenAI-hosted feature vbatch does not offer",
    "access_programs": "access programs are an OpenAI-hosted feature vbatch does not offer",
    "moderation": "moderation is an OpenAI-hosted feature vbatch does not offer",
    "image": "image options are an OpenAI-hosted feature vbatch does not offer",
    "prompt_cache_options": "prompt cache options are an OpenAI-hosted feature vbatch does not offer",
}
# vLLM's own sampling and decoding extensions to the Responses body, passed on to it.
RESPONSES_EXTENSIONS = frozenset({
    "top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "stop_token_ids", "ignore_eos",
    "skip_special_tokens", "include_stop_str_in_output", "logit_bias", "structured_outputs", "include_reasoning",
})
MAX_TOOLS = 128
MAX_METADATA_PAIRS = 16  # OpenAI's metadata: 16 pairs, keys up to 64 characters, values up to 512
RESPONSE_ROLES = ("user", "assistant", "system", "developer")
RESPONSE_CONTENT_PARTS = ("input_text", "input_image", "input_file", "output_text", "refusal")


def _check_input_item(item: Any, where: str) -> None:
    """A message item (``role`` and ``content``) checked closely; any other item needs its ``type`` (vLLM
    checks those items against OpenAI's own types when it runs them)."""
    if not isinstance(item, dict):
        raise ValueError(f"{where} must be an object (a message or another input item)")
    kind = item.get("type", "message" if "role" in item else None)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"{where} needs a type (or a role, for a message)")
    if kind != "message":
        return
    if item.get("role") not in RESPONSE_ROLES:
        raise ValueError(f"{where}.role must be one of {', '.join(RESPONSE_ROLES)}; got {item.get('role')!r}")
    content = item.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise ValueError(f"{where}.content must be a string or a non-empty list of content parts")
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in RESPONSE_CONTENT_PARTS:
            raise ValueError(f"{where}.content[{index}].type must be one of {', '.join(RESPONSE_CONTENT_PARTS)}; "
                             f"got {kind!r}")
        if kind in ("input_text", "output_text") and not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{index}].text must be a string")


def responses_messages(body: dict[str, Any], *, strict: bool = True) -> list[dict[str, str]]:
    """A Responses body's ``instructions`` and ``input`` as chat messages, as vLLM builds them: the
    instructions first as a system message, a string input as one user message, each message item with its
    text parts joined. ``strict``: any other item or part (tool calls and their outputs, images, files, a
    partial assistant message to continue) is a ValueError naming it, for an engine that reads text only;
    otherwise it is left out (to show a reviewer the conversation)."""
    messages = [{"role": "system", "content": body["instructions"]}] if body.get("instructions") else []
    items = body.get("input")
    if isinstance(items, str):
        return messages + [{"role": "user", "content": items}]
    for index, item in enumerate(items or []):
        kind = item.get("type", "message" if "role" in item else None)
        if kind != "message":
            if strict:
                raise ValueError(f"input[{index}] is a {kind!r} item; this engine reads text messages only")
            continue
        if strict and item.get("status") in ("in_progress", "incomplete"):
            raise ValueError(f"input[{index}] is a partial assistant message to continue; this engine answers "
                             "complete messages only")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for number, part in enumerate(content):
                if part.get("type") in ("input_text", "output_text", "refusal"):
                    texts.append(part.get("text") or part.get("refusal") or "")
                elif strict:
                    raise ValueError(f"input[{index}].content[{number}] is {part.get('type')!r}; this engine reads "
                                     "text parts only")
            content = "".join(texts)
        messages.append({"role": str(item.get("role")), "content": content or ""})
    return messages


class ResponsesRequest(OpenAIBaseModel):
    """OpenAI's Responses body (``client.responses.create``), field for field, plus vLLM's sampling
    extensions (``RESPONSES_EXTENSIONS``); any other field is refused, as OpenAI refuses it."""

    max_tokens_param: ClassVar[str] = "max_output_tokens"

    input: Union[StrictStr, list[Any]]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=16)  # OpenAI's minimum
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    include: list[Literal["file_search_call.results", "web_search_call.results", "web_search_call.action.sources",
                          "message.input_image.image_url", "computer_call_output.output.image_url",
                          "code_interpreter_call.outputs", "reasoning.encrypted_content",
                          "message.output_text.logprobs"]] | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(default=None, ge=1)
    truncation: Literal["auto", "disabled"] | None = None
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority"] | None = None
    store: bool | None = None
    background: bool | None = None
    stream: bool | None = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=128)
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    # vLLM extensions the transformers fallback honours too
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    # OpenAI-hosted only: refused when set (RESPONSES_ONLY_HOSTED says why)
    previous_response_id: Any = None
    conversation: Any = None
    prompt: Any = None
    background_options: Any = None
    context_management: Any = None
    access_programs: Any = None
    moderation: Any = None
    image: Any = None
    prompt_cache_options: Any = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return refuse_unknown_fields(cls, data, RESPONSES_EXTENSIONS)

    @field_validator(*RESPONSES_ONLY_HOSTED)
    @classmethod
    def _hosted_only(cls, value: Any, info) -> Any:
        if value is not None:
            raise ValueError(RESPONSES_ONLY_HOSTED[info.field_name])
        return value

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("vbatch does not store responses for later retrieval; leave store out or set it to false")
        return value

    @field_validator("background")
    @classmethod
    def _not_background(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("background responses are not supported: a batch runs requests without waiting on them")
        return value

    @field_validator("input", mode="before")
    @classmethod
    def _input_items(cls, value: Any) -> Any:
        if not isinstance(value, (str, list)):
            raise ValueError("input must be a string or a list of input items")
        if isinstance(value, list):
            if not value:
                raise ValueError("input must be a string or a non-empty list of input items")
            if len(value) > MAX_MESSAGES:
                raise ValueError(f"input takes at most {MAX_MESSAGES} items; got {len(value)}")
            for index, item in enumerate(value):
                _check_input_item(item, f"input[{index}]")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_pairs(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None:
            if len(value) > MAX_METADATA_PAIRS:
                raise ValueError(f"metadata takes at most {MAX_METADATA_PAIRS} pairs; got {len(value)}")
            if any(len(key) > 64 for key in value):
                raise ValueError("metadata keys are at most 64 characters")
        return value

    @field_validator("text")
    @classmethod
    def _text_format(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        fmt = (value or {}).get("format")
        if fmt is not None:
            kind = fmt.get("type") if isinstance(fmt, dict) else None
            if kind not in ("text", "json_object", "json_schema"):
                raise ValueError(f"text.format.type must be text, json_object or json_schema; got {kind!r}")
            if kind == "json_schema" and not (isinstance(fmt.get("name"), str) and isinstance(fmt.get("schema"), dict)):
                raise ValueError("a json_schema text.format needs a name and a schema object")
        return value

    @field_validator("tools")
    @classmethod
    def _tool_types(cls, value: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
        for index, tool in enumerate(value or []):
            if not isinstance(tool.get("type"), str):
                raise ValueError(f"tools[{index}] needs a type")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        return _at_most_4_stops(value)

    def max_new_tokens(self, default: int) -> int:
        return self.max_output_tokens or default

    def stop_sequences(self) -> list[str]:
        return _stop_sequences(self.stop)


# Score and rerank take texts only (vLLM's multimodal ``{"content": [...]}`` inputs need a multimodal model),
# at most this many on each side of a request, each bounded as an embedding input is.
MAX_SCORE_TEXTS = MAX_EMBEDDING_INPUTS
# vLLM 0.32's four names for the two sides of a score request; each pair scores the same way.
SCORE_PAIRS = {"documents": "queries", "items": "queries", "data_2": "data_1", "text_2": "text_1"}
_SCORE_FIELDS = (*dict.fromkeys(SCORE_PAIRS.values()), *SCORE_PAIRS)

_ScoreTexts = Union[_Text, Annotated[list[_Text], Field(min_length=1, max_length=MAX_SCORE_TEXTS)]]


def _check_score_texts(value: Any, name: str, *, many: bool = True) -> Any:
    """One clear message per malformed side of a score or rerank request."""
    if isinstance(value, dict):
        raise ValueError(f"{name}: multimodal inputs ({{'content': [...]}}) are not supported; send text")
    if isinstance(value, str):
        _check_text(value, name)
        return value
    if not many:
        raise ValueError(f"{name} must be a string")
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"{name} must be a string or a list of strings")
    if not value:
        raise ValueError(f"{name} must not be an empty list")
    if len(value) > MAX_SCORE_TEXTS:
        raise ValueError(f"{name} takes at most {MAX_SCORE_TEXTS} texts per request; got {len(value)}")
    for index, item in enumerate(value):
        _check_text(item, f"{name}[{index}]")
    return value


def _as_list(value: str | list[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


class _ScoringRequest(OpenAIBaseModel):
    """What score and rerank bodies share. vLLM's pooling extensions (``truncate_prompt_tokens``,
    ``max_tokens_per_doc``, ``use_activation``, ``instruction``...) are refused as unrecognized, as for
    embeddings: no engine may silently ignore them."""

    model: str | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return refuse_unknown_fields(cls, data)


class ScoreRequest(_ScoringRequest):
    """vLLM's score body, field for field: the texts on each side as ``queries`` and ``documents`` (or
    ``items``), ``data_1`` and ``data_2`` or ``text_1`` and ``text_2``, a string or a list each, 1:1, 1:N or
    N:N. Each pair's score is the model's own (the cosine of its embeddings, for an embedding model)."""

    queries: _ScoreTexts | None = None
    data_1: _ScoreTexts | None = None
    text_1: _ScoreTexts | None = None
    documents: _ScoreTexts | None = None
    items: _ScoreTexts | None = None
    data_2: _ScoreTexts | None = None
    text_2: _ScoreTexts | None = None

    @field_validator(*_SCORE_FIELDS, mode="before")
    @classmethod
    def _text_shape(cls, value: Any, info: ValidationInfo) -> Any:
        return value if value is None else _check_score_texts(value, info.field_name)

    @field_validator(*SCORE_PAIRS)
    @classmethod
    def _lengths(cls, value: Any, info: ValidationInfo) -> Any:
        """vLLM's rule, reported on the second side: one first text for any number, else as many."""
        first = info.data.get(SCORE_PAIRS[info.field_name])
        if value is not None and isinstance(first, list) and len(first) > 1 and len(first) != len(_as_list(value)):
            raise ValueError(f"Input lengths must be either 1:1, 1:N or N:N; {SCORE_PAIRS[info.field_name]} has "
                             f"{len(first)} texts, {info.field_name} {len(_as_list(value))}")
        return value

    def _given(self) -> list[str]:
        return [name for name in _SCORE_FIELDS if getattr(self, name) is not None]

    @model_validator(mode="after")
    def _one_pair(self) -> "ScoreRequest":
        given = self._given()
        if len(given) != 2 or given[0] != SCORE_PAIRS.get(given[1]):
            raise ValueError("give the texts to score as one pair of fields: queries and documents (or items), "
                             f"data_1 and data_2, or text_1 and text_2; got {', '.join(given) or 'none'}")
        return self

    def texts(self) -> tuple[list[str], list[str]]:
        """(first texts, second texts): each first text scored against its second, or one against each."""
        first, second = (getattr(self, name) for name in self._given())
        return _as_list(first), _as_list(second)


class RerankRequest(_ScoringRequest):
    """vLLM's (and Jina's) rerank body: ``documents`` ranked by their score against ``query``, the best
    ``top_n`` of them (0: all)."""

    query: _Text
    documents: _ScoreTexts
    top_n: int = Field(default=0, ge=0)

    @field_validator("query", "documents", mode="before")
    @classmethod
    def _text_shape(cls, value: Any, info: ValidationInfo) -> Any:
        return _check_score_texts(value, info.field_name, many=info.field_name == "documents")

    def texts(self) -> tuple[list[str], list[str]]:
        """([query], documents), as a 1:N score request has them."""
        return [self.query], _as_list(self.documents)


ENDPOINT_REQUESTS: dict[str, type[OpenAIBaseModel]] = {
    "/v1/chat/completions": ChatCompletionRequest,
    "/v1/completions": CompletionRequest,
    "/v1/embeddings": EmbeddingRequest,
    "/v1/responses": ResponsesRequest,
    "/v1/score": ScoreRequest,
    "/v1/rerank": RerankRequest,
}
SUPPORTED_ENDPOINTS = tuple(ENDPOINT_REQUESTS)
POOLING_ENDPOINTS = ("/v1/embeddings", "/v1/score", "/v1/rerank")  # one model pass, no generation: input tokens only
# The other paths vLLM serves score and rerank at, which ``vllm run-batch`` lines use too.
ENDPOINT_ALIASES = {"/score": "/v1/score", "/rerank": "/v1/rerank", "/v2/rerank": "/v1/rerank"}


def canonical_endpoint(url: Any) -> Any:
    """The endpoint a batch line's ``url`` names: vLLM's own score and rerank paths are ours."""
    return ENDPOINT_ALIASES.get(url, url) if isinstance(url, str) else url




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


class EmbeddingUsage(OpenAIBaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0


class EmbeddingData(OpenAIBaseModel):
    index: int
    object: Literal["embedding"] = "embedding"
    embedding: Union[list[float], str]  # floats, or base64 of little-endian float32 (encoding_format)


class EmbeddingResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"embd-{uuid.uuid4().hex}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[EmbeddingData]
    usage: EmbeddingUsage


class ResponseOutputText(OpenAIBaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] | None = None


class ResponseOutputMessage(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "completed"
    content: list[ResponseOutputText]


class ResponseUsage(OpenAIBaseModel):
    input_tokens: int = 0
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0, "cache_write_tokens": 0})
    output_tokens: int = 0
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})
    total_tokens: int = 0


class ResponsesResponse(OpenAIBaseModel):
    """OpenAI's Response object. ``output`` holds message items here; vLLM may add its other item types
    (function calls, reasoning), as OpenAI does."""

    id: str = Field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "incomplete", "in_progress", "failed", "cancelled", "queued"]
    incomplete_details: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    model: str
    instructions: str | None = None
    output: list[Union[ResponseOutputMessage, dict[str, Any]]]
    usage: ResponseUsage | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    metadata: dict[str, str] | None = None
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Union[str, dict[str, Any]] = "none"
    parallel_tool_calls: bool = True
    truncation: str | None = "disabled"
    service_tier: str | None = "auto"
    store: bool = False
    background: bool = False
    previous_response_id: str | None = None
    reasoning: dict[str, Any] | None = None
    user: str | None = None


class ScoreData(OpenAIBaseModel):
    index: int
    object: Literal["score"] = "score"
    score: float


class ScoreResponse(OpenAIBaseModel):
    id: str = Field(default_factory=lambda: f"score-{uuid.uuid4().hex}")
    object: Literal["list"] = "list"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    data: list[ScoreData]
    usage: UsageInfo


class RerankDocument(OpenAIBaseModel):
    text: str | None = None
    multi_modal: list[dict[str, Any]] | None = None


class RerankResult(OpenAIBaseModel):
    index: int  # the document's place in the request
    document: RerankDocument
    relevance_score: float


class RerankResponse(OpenAIBaseModel):
    """vLLM's rerank response: the results best first, no ``object`` or ``created``."""

    id: str = Field(default_factory=lambda: f"score-{uuid.uuid4().hex}")
    model: str
    usage: EmbeddingUsage
    results: list[RerankResult]


class ErrorBody(OpenAIBaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


def response_text(body: dict[str, Any]) -> str | None:
    """The answer of a response body: the first choice's text of a chat or completion, or, of a Responses
    body, the text of its output messages joined, as the SDK's ``output_text`` (None when it has none)."""
    if body.get("object") == "response":
        texts = [part.get("text") or "" for item in body.get("output") or [] if item.get("type") == "message"
                 for part in item.get("content") or [] if part.get("type") == "output_text"]
        return "".join(texts) if texts else None
    choice = (body.get("choices") or [{}])[0]
    return (choice.get("message") or {}).get("content") if "message" in choice else choice.get("text")


def calls_tools(body: dict[str, Any]) -> bool:
    """Whether a response body answers with tool calls (a chat message's ``tool_calls``, a Responses
    ``function_call`` item) rather than text for a reviewer to correct."""
    if body.get("object") == "response":
        return any(item.get("type") == "function_call" for item in body.get("output") or [])
    choice = (body.get("choices") or [{}])[0]
    return bool((choice.get("message") or {}).get("tool_calls"))


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """``{"error": {...}}`` in OpenAI's shape."""
    return {"error": ErrorBody(message=message, type=type, param=param, code=code).model_dump()}
