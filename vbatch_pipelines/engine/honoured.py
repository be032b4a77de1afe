"""What the transformers fallback does with each field of a generation request: it honours it, or the field asks
nothing of the engine (its neutral value), or the request is refused naming it. Never silently ignored: a batch
line that asks for structured output, tools, logprobs or penalties this engine does not implement gets its own
error saying to serve the model on vLLM, and the rest of the batch runs.

The sampling extensions vLLM documents that map onto transformers' ``generate`` (top_k, min_p,
repetition_penalty, min_tokens, ignore_eos, stop_token_ids) are honoured, so a line moves between the two
engines unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SAMPLING_EPS = 1e-5
MAX_STOP_TOKEN_IDS = 64

# vLLM's sampling extensions this engine implements (see ``Sampling``).
SAMPLING_EXTENSIONS = frozenset({"top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids"})
# Fields this engine acts on, or that ask nothing of any engine (who sent it, where to bill or cache it).
_EVERY_ENDPOINT = frozenset({
    "model", "temperature", "top_p", "seed", "stop", "stream", "stream_options", "user", "metadata", "store",
    "service_tier", "prompt_cache_key", "safety_identifier", *SAMPLING_EXTENSIONS,
})
HONOURED: dict[str, frozenset[str]] = {
    "/v1/chat/completions": _EVERY_ENDPOINT | {"messages", "max_tokens", "max_completion_tokens", "n"},
    "/v1/completions": _EVERY_ENDPOINT | {"prompt", "max_tokens", "n"},
    "/v1/responses": _EVERY_ENDPOINT | {"input", "instructions", "max_output_tokens", "prompt_cache_retention",
                                        "background"},
}
# Values that leave the answer as it would be without the field. Anything else is refused.
NEUTRAL: dict[str, tuple] = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "echo": (False,), "best_of": (1,), "logit_bias": ({},), "response_format": ({"type": "text"},),
    "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False), "functions": ([],),
    "function_call": ("none", "auto"), "use_beam_search": (False,), "length_penalty": (1,), "bad_words": ([],),
    "skip_special_tokens": (True,), "spaces_between_special_tokens": (True,), "include_stop_str_in_output": (False,),
    "add_generation_prompt": (True,), "continue_final_message": (False,), "chat_template_kwargs": ({},),
    "include_reasoning": (True, False), "return_tokens_as_token_ids": (False,), "return_token_ids": (False,),
    "modalities": (["text"],), "include": ([],), "truncation": ("disabled",), "text": ({"format": {"type": "text"}},),
}


class RequestRefused(ValueError):
    """A request this engine cannot answer as asked, with the parameter that asks it."""

    def __init__(self, message: str, param: str | None = None, code: str = "unsupported_parameter"):
        super().__init__(message)
        self.param = param
        self.code = code


def _same(value: Any, neutral: Any) -> bool:
    # bools are not numbers here: ``echo: 0`` is not ``False`` and ``presence_penalty: False`` is not 0
    if isinstance(value, bool) or isinstance(neutral, bool):
        return value is neutral
    return value == neutral


def _neutral(name: str, value: Any) -> bool:
    return value is None or any(_same(value, neutral) for neutral in NEUTRAL.get(name, ()))


def unhonoured(endpoint: str, body: dict[str, Any]) -> str | None:
    """The first field of ``body`` this engine would have to ignore to answer it, or None."""
    honoured = HONOURED[endpoint]
    for name, value in body.items():
        if name not in honoured and not _neutral(name, value):
            return name
    return None


def refuse_unhonoured(endpoint: str, body: dict[str, Any]) -> None:
    name = unhonoured(endpoint, body)
    if name is not None:
        raise RequestRefused(f"{name} is not supported by the transformers engine (it samples text, with vLLM's "
                             f"sampling extensions but no structured output, tools, logprobs or penalties); serve "
                             f"the model on vLLM to use it", name)


@dataclass(frozen=True)
class Sampling:
    """The decoding settings of a request. Requests with equal settings are decoded in one micro-batch."""

    do_sample: bool
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    top_k: int = 0  # 0: all tokens (vLLM's -1 and 0 alike)
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: tuple[int, ...] = ()

    @classmethod
    def of(cls, request: Any, *, vocab: int, max_new_tokens: int) -> "Sampling":
        """Read (and check) a validated request's settings, including vLLM's extensions it carries as extra fields."""
        extra = request.model_extra or {}
        temperature = request.temperature
        # As vLLM: a temperature below 1e-5 is greedy (dividing logits by it overflows to inf/nan).
        do_sample = (temperature if temperature is not None else 1.0) >= SAMPLING_EPS
        top_k = _number(extra, "top_k", int, -1, None, 0)
        min_p = _number(extra, "min_p", float, 0.0, 1.0, 0.0)
        repetition_penalty = _number(extra, "repetition_penalty", float, 0.0, None, 1.0)
        if repetition_penalty == 0:
            raise RequestRefused("repetition_penalty must be greater than 0", "repetition_penalty", "invalid_request")
        min_tokens = _number(extra, "min_tokens", int, 0, max_new_tokens, 0)
        ignore_eos = extra.get("ignore_eos")
        if ignore_eos is not None and not isinstance(ignore_eos, bool):
            raise RequestRefused("ignore_eos must be a boolean", "ignore_eos", "invalid_request")
        stop_token_ids = extra.get("stop_token_ids") or []
        if not (isinstance(stop_token_ids, list) and len(stop_token_ids) <= MAX_STOP_TOKEN_IDS
                and all(type(t) is int and 0 <= t < vocab for t in stop_token_ids)):
            raise RequestRefused(f"stop_token_ids must be a list of at most {MAX_STOP_TOKEN_IDS} token ids in "
                                 f"0..{vocab - 1}", "stop_token_ids", "invalid_request")
        return cls(do_sample=do_sample, temperature=temperature, top_p=request.top_p, seed=request.seed,
                   n=getattr(request, "n", 1), top_k=max(top_k, 0) if do_sample else 0,
                   min_p=min_p if do_sample else 0.0, repetition_penalty=repetition_penalty, min_tokens=min_tokens,
                   ignore_eos=bool(ignore_eos), stop_token_ids=tuple(dict.fromkeys(stop_token_ids)))

    def generate_kwargs(self, eos_token_id: int | None) -> dict[str, Any]:
        """transformers ``generate`` arguments for these settings (greedy ones fix every sampling knob off)."""
        stops = ([] if self.ignore_eos or eos_token_id is None else [eos_token_id]) + list(self.stop_token_ids)
        kwargs: dict[str, Any] = {"eos_token_id": stops or None, "repetition_penalty": self.repetition_penalty,
                                  "min_new_tokens": self.min_tokens or None}
        if self.do_sample:
            kwargs.update(do_sample=True, temperature=self.temperature or 1.0, top_p=self.top_p or 1.0,
                          top_k=self.top_k, min_p=self.min_p or None)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs

    def stop_ids(self, eos_token_id: int | None) -> set[int]:
        """Token ids that end an answer (the stop token counts as generated but is not in the text, as in vLLM)."""
        return set(self.stop_token_ids) | ({eos_token_id} if eos_token_id is not None and not self.ignore_eos else set())


def _number(extra: dict[str, Any], name: str, kind: type, low: float, high: float | None, default):
    value = extra.get(name)
    if value is None:
        return default
    if type(value) is bool or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise RequestRefused(f"{name} must be {'an integer' if kind is int else 'a number'}", name, "invalid_request")
    if value < low or (high is not None and value > high):
        bounds = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise RequestRefused(f"{name} must be {bounds}; got {value}", name, "invalid_request")
    return kind(value)
