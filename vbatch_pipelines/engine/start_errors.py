"""Why a vLLM engine did not start, in its own words and in vbatch's: the error line its log names, and what to do.

vLLM prints a Python traceback when it cannot start, often twice (its engine core's, then its API server's), and
ends with a wrapper ("Engine core initialization failed. See root cause above."). The reason is the first
exception of a known cause (out of memory, the context too long for the KV cache, missing files, an architecture
it does not know), else the first that is not a wrapper. A known cause gets a hint in vbatch's terms: its
settings (VBATCH_MAX_MODEL_LEN, VBATCH_KV_CACHE_SEQUENCES, VBATCH_GPU_MEMORY_UTILIZATION), not vLLM's flags, and
vLLM's own advice in those terms is cut from the line.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from vbatch_pipelines.detached import ServerStartError, error_lines
from vbatch_pipelines.engine.base import EngineUnavailable

REASON_CHARS = 400
# vLLM's errors that only say another one came first.
WRAPPERS = ("Engine core initialization failed", "EngineCore failed to start", "See root cause above")
# Where vLLM's own advice starts in a line (its flags, its docs): dropped when vbatch has a hint of its own.
_VLLM_ADVICE = re.compile(r"\s+(?:Try |To resolve|To allow overriding|Supported architectures|See https?://|"
                          r"Decrease |On the CPU backend, )")


class EngineStartError(ServerStartError, EngineUnavailable):
    """A vLLM engine that did not start: a 503 saying why online; a batch retries it, then fails with it."""

    code = "engine_unavailable"


@dataclass(frozen=True)
class Cause:
    pattern: re.Pattern
    hint: Callable[[re.Match, bool], str]  # (the match, on a GPU) -> what to do


def _kv_cache_too_small(match: re.Match, gpu: bool) -> str:
    limit = f"to {match['estimate']} tokens or less" if match["estimate"] else "lower"
    more = " (or raise VBATCH_GPU_MEMORY_UTILIZATION)" if gpu else ""
    return (f"The model's whole context ({match['context']} tokens) does not fit in the engine's KV cache: set "
            f"VBATCH_MAX_MODEL_LEN {limit}{more}.")


CAUSES = (
    Cause(re.compile(r"max seq len \((?P<context>\d+)\).*KV cache is needed.*larger than the available KV cache "
                     r"memory(?:.*estimated maximum model length is (?P<estimate>\d+))?"), _kv_cache_too_small),
    Cause(re.compile(r"User-specified max_model_len \((?P<asked>\d+)\) is greater than the derived max_model_len "
                     r"\((?:max_position_embeddings=)?(?P<own>\d+)"),
          lambda m, gpu: f"VBATCH_MAX_MODEL_LEN ({m['asked']}) is longer than the model's context ({m['own']} "
                         "tokens): lower it, or unset it to serve the model's own."),
    Cause(re.compile(r"Available memory on node \d+ .*less than"),
          lambda m, gpu: "This machine has too little free memory for the engine: free some (other engines, "
                         "other programs), or lower VBATCH_KV_CACHE_SEQUENCES or VBATCH_MAX_MODEL_LEN."),
    Cause(re.compile(r"Free memory on device|less than desired GPU memory utilization"),
          lambda m, gpu: "Another process holds GPU memory (an engine still stopping, a training run): free the "
                         "GPU, or lower VBATCH_GPU_MEMORY_UTILIZATION."),
    Cause(re.compile(r"No available memory for the cache blocks"),
          lambda m, gpu: "The model's weights leave no memory for its KV cache: "
                         + ("raise VBATCH_GPU_MEMORY_UTILIZATION, free the GPU" if gpu else "free memory")
                         + ", or serve a smaller or quantized model."),
    Cause(re.compile(r"out of memory|OutOfMemoryError|Insufficient memory|Cannot allocate memory", re.IGNORECASE),
          lambda m, gpu: "The engine ran out of memory while starting: "
                         + ("lower VBATCH_MAX_MODEL_LEN or VBATCH_GPU_MEMORY_UTILIZATION, free the GPU"
                            if gpu else "free memory, lower VBATCH_KV_CACHE_SEQUENCES or VBATCH_MAX_MODEL_LEN")
                         + ", or serve a smaller model."),
    Cause(re.compile(r"Cannot find any model weights|does not appear to have a file named|No such file or "
                     r"directory|is not a valid model identifier|not a local folder|Can't load the configuration"),
          lambda m, gpu: "The model's files are missing or incomplete: check its directory (VBATCH_MODELS, "
                         "`vbatch models list`), or install it again."),
    Cause(re.compile(r"Model architectures? \[.*\] (?:are|is) not supported|Unrecognized model|"
                     r"does not recognize this architecture"),
          lambda m, gpu: "This vLLM does not run the model's architecture: serve it on the transformers engine "
                         "(VBATCH_ENGINE=transformers), or pick a model vLLM supports."),
    Cause(re.compile(r"trust_remote_code"),
          lambda m, gpu: "The model needs code of its own: install it with trust_remote_code (an admin's choice; "
                         "VBATCH_ALLOW_REMOTE_CODE)."),
)


def explain(log: str, gpus: int = 0) -> tuple[str | None, str | None]:
    """The error line of a failed vLLM start (from its log since the start) and a hint, either None."""
    errors = error_lines(log)
    for line in errors:
        for cause in CAUSES:
            match = cause.pattern.search(line)
            if match:
                return _VLLM_ADVICE.split(line, maxsplit=1)[0][:REASON_CHARS], cause.hint(match, gpus > 0)
    own = [line for line in errors if not any(wrapper in line for wrapper in WRAPPERS)]
    line = (own or errors or [None])[0]
    return (line[:REASON_CHARS] if line else None), None
