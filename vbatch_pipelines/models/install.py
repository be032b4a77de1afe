"""Installing a base model: from the Hugging Face hub (revision pinned to a commit, HF_TOKEN honoured,
HF_ENDPOINT for a mirror) or a local directory; a fit check before any weight is downloaded.

The fit check reads config.json only: weights (parameters × bytes per parameter at the serving dtype, or
the exact size from the safetensors index) plus the KV cache of one sequence at the configured context,
against GPU memory (× the engine's memory fraction) or, on CPU, available RAM. When it does not fit the
install is refused with what would fit instead.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.paths import MODEL_ID

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float8": 1, "int8": 1}
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


class InstallError(VbatchError):
    """An install that cannot go ahead (does not fit, remote code, not found); the message says why."""

    def __init__(self, message: str, code: str = "install_failed", status: int | None = None):
        super().__init__(message, "source", code, status or (409 if code == "model_exists" else 400))


@dataclass
class FitReport:
    parameters: int
    weight_bytes: int
    kv_cache_bytes: int
    context: int
    available_bytes: int
    device: str  # gpu | cpu
    dtype: str
    fits: bool
    suggestion: str

    def describe(self) -> str:
        need = (self.weight_bytes + self.kv_cache_bytes) / GIB
        return (f"needs about {need:.2f} GiB ({self.weight_bytes / GIB:.2f} GiB of {self.dtype} weights for "
                f"{self.parameters / 1e9:.2f}B parameters + {self.kv_cache_bytes / GIB:.2f} GiB of KV cache for "
                f"{self.context} tokens); {self.available_bytes / GIB:.2f} GiB {self.device} memory is available")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """Multimodal configs nest the language model's numbers under text_config."""
    return {**config, **config.get("text_config", {})}


def parameter_count(config: dict[str, Any]) -> int:
    """Parameters of a decoder-only transformer from its config (Llama, Mistral, Qwen, Gemma, Mixtral...)."""
    c = _text_config(config)
    hidden, layers, vocab = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or hidden // heads
    intermediate = c.get("intermediate_size") or 4 * hidden
    experts = c.get("num_local_experts") or c.get("num_experts") or c.get("n_routed_experts") or 1
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * (c.get("moe_intermediate_size") or intermediate) * experts
    per_layer = attention + mlp + 2 * hidden
    embeddings = vocab * hidden * (1 if c.get("tie_word_embeddings", False) else 2)
    return layers * per_layer + embeddings + hidden


def serving_dtype(config: dict[str, Any], gpus: int) -> tuple[str, float]:
    """The dtype the engine serves in and its bytes per parameter (vLLM's CPU build runs float32)."""
    quant = config.get("quantization_config") or {}
    bits = quant.get("bits") or (4 if quant.get("load_in_4bit") else 8 if quant.get("load_in_8bit") else None)
    if bits and gpus:
        return f"{bits}-bit {quant.get('quant_method', 'quantized')}", bits / 8
    if not gpus:
        return "float32", 4.0
    name = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").removeprefix("torch.")
    return name, float(DTYPE_BYTES.get(name, 2))


def kv_cache_bytes(config: dict[str, Any], context: int, bytes_per_value: float) -> int:
    c = _text_config(config)
    heads = c["num_attention_heads"]
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or c["hidden_size"] // heads
    return int(2 * c["num_hidden_layers"] * kv_heads * head_dim * context * bytes_per_value)


def serving_context(config: dict[str, Any], context: int | None) -> int:
    """The context the engine serves: VBATCH_MAX_MODEL_LEN when set (never past the model's own), else the
    model's."""
    own = _text_config(config).get("max_position_embeddings")
    return min(context or own or 4096, own or 1 << 30)


# A CPU engine's KV cache is sized to its model instead of a fraction of the machine: ``sequences`` sequences
# of the full context (float32, the CPU build's dtype), no less than the floor (vLLM's blocks for a model whose
# tokens cost next to nothing), no more than the fifth of the machine's memory CPU engines reserved before.
CPU_KV_CACHE_FLOOR = 16 * 1024**2
CPU_KV_CACHE_CAP_FRACTION = 0.2


def cpu_kv_cache_reservation(config: dict[str, Any] | None, context: int | None, sequences: int) -> int:
    """What a CPU engine serving a model of ``config`` reserves for its KV cache (the cap when there is no
    config to size it from, or one without the numbers)."""
    import psutil

    cap = int(CPU_KV_CACHE_CAP_FRACTION * psutil.virtual_memory().total)
    try:
        need = kv_cache_bytes(config or {}, serving_context(config or {}, context), 4.0) * sequences
    except (KeyError, TypeError, ZeroDivisionError):
        return cap
    return min(max(need, CPU_KV_CACHE_FLOOR), cap)


def available_memory(gpus: int, memory_fraction: float) -> tuple[int, str]:
    if gpus:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, check=True).stdout.split()
        return int(min(int(x) for x in out[:gpus]) * 1024**2 * gpus * memory_fraction), "gpu"
    import psutil

    return int(psutil.virtual_memory().available), "cpu"


def fit_check(config: dict[str, Any], *, gpus: int, context: int | None, available: int, device: str,
              weight_bytes: int | None = None, kv_reservation: int | None = None) -> FitReport:
    """``kv_reservation``: what a CPU engine reserves for this model's KV cache (cpu_kv_cache_reservation); one
    sequence of the full context must fit in it, and the reservation beside the weights in ``available``."""
    dtype, per_param = serving_dtype(config, gpus)
    params = parameter_count(config)
    weights = weight_bytes if weight_bytes is not None else int(params * per_param)
    context = serving_context(config, context)
    kv_value_bytes = 4.0 if not gpus else 2.0
    kv = kv_cache_bytes(config, context, kv_value_bytes)
    per_token = kv_cache_bytes(config, 1, kv_value_bytes) or 1
    reserved = max(kv, kv_reservation or 0)
    fits = weights + reserved <= available and (kv_reservation is None or kv <= kv_reservation)

    def longest_context(weight: int) -> int:
        room = max(0, available - weight)
        return int(min(room, kv_reservation or room) // per_token)

    suggestion = ""
    if not fits and weights > available:
        four_bit = int(params * 0.5)
        suggestion = f"a 4-bit quantized build (AWQ/GPTQ) needs about {four_bit / GIB:.2f} GiB of weights"
        if gpus and four_bit + kv <= available:
            suggestion += " and would fit"
        elif gpus and longest_context(four_bit) >= 1024:
            suggestion += f" and would fit with VBATCH_MAX_MODEL_LEN={longest_context(four_bit)} or less"
        suggestion += "; or pick a smaller model"
    elif not fits and kv_reservation is not None and kv <= kv_reservation:
        suggestion = (f"the weights fit but not beside the {kv_reservation / GIB:.2f} GiB KV cache a CPU engine "
                      f"reserves for VBATCH_KV_CACHE_SEQUENCES sequences of {context} tokens: lower "
                      "VBATCH_KV_CACHE_SEQUENCES or VBATCH_MAX_MODEL_LEN")
    elif not fits:
        suggestion = (f"the weights fit but the KV cache for {context} tokens does not: set "
                      f"VBATCH_MAX_MODEL_LEN={longest_context(weights)} or less")
    return FitReport(params, weights, reserved, context, available, device, dtype, fits, suggestion)


@dataclass(frozen=True)
class InstallPolicy:
    """What an install may use on this host. The API applies the server's (admins only; local directories
    under VBATCH_MODEL_SOURCES; remote code only with VBATCH_ALLOW_REMOTE_CODE=1); the CLI is the operator's
    own shell on the host and may name any directory and allow remote code."""

    local_sources: tuple[Path, ...] | None  # directories local sources must be inside; None: any
    remote_code: bool

    @classmethod
    def operator(cls) -> InstallPolicy:
        return cls(local_sources=None, remote_code=True)

    def check(self, source: str, trust_remote_code: bool) -> Path | None:
        """The local directory ``source`` names (None: a hub id), refused before anything on the disk is
        looked at when it is outside the allowed directories, so a refusal says nothing of what exists."""
        if trust_remote_code and not self.remote_code:
            raise InstallError("This server does not install models with trust_remote_code: its operator must "
                               "set VBATCH_ALLOW_REMOTE_CODE=1 first", "remote_code_disabled", status=403)
        local = local_source(source)
        if local is None or self.local_sources is None:
            return local
        if not any(local.is_relative_to(root) for root in self.local_sources):
            raise InstallError("Local model directories can be installed only from the directories in "
                               "VBATCH_MODEL_SOURCES (default: the home's models directory)",
                               "source_not_allowed", status=403)
        return local


def check_remote_code(config: dict[str, Any], allowed: bool, source: str) -> None:
    if config.get("auto_map") and not allowed:
        raise InstallError(f"{source} needs custom modelling code from its repository (config.json has auto_map). "
                           "vbatch does not run remote code unless you allow it: install again with "
                           "trust_remote_code=true once you have read that code", "remote_code_not_allowed")


def local_source(source: str) -> Path | None:
    """The directory a path-like ``source`` (``/…``, ``~…``, ``./…``, ``../…``) names, normalised without
    touching the disk beyond resolving links; None for anything else (a hub id ``owner/name``)."""
    if not source.startswith(("/", "~", "./", "../")):
        return None
    try:
        return Path(source).expanduser().resolve()
    except RuntimeError:  # ~nosuchuser: names no directory; refused as any path outside the sources would be
        return Path(source)
    except (OSError, ValueError) as exc:  # a NUL byte, a name too long
        raise InstallError(f"{source!r} is not a usable path", "invalid_model") from exc


@dataclass
class Source:
    """Where a model comes from, resolved: a local directory, or a hub repo pinned to a commit."""

    kind: str  # local | hub
    location: str  # the directory, or the repo id
    revision: str | None  # the commit sha (hub)
    config: dict[str, Any]
    weight_bytes: int | None  # exact, from the safetensors index, when known


def resolve(source: str, revision: str | None = None, token: str | None = None) -> Source:
    """Read config.json (and the safetensors index) without downloading any weights."""
    local = local_source(source)
    if local is not None:
        config_path = local / "config.json"
        if not config_path.is_file():
            raise InstallError(f"{source} is not a Hugging Face model directory (no config.json)", "invalid_model")
        weights = sum(p.stat().st_size for p in local.glob("*.safetensors")) or None
        return Source("local", str(local.resolve()), None, json.loads(config_path.read_text()), weights)
    if not MODEL_ID.match(source) or "/" not in source:
        raise InstallError(f"{source!r} is neither a local model directory nor a Hugging Face repo id "
                           "(owner/name)", "invalid_model")
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # HF_ENDPOINT and HF_TOKEN are read now, not when huggingface_hub was first imported.
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token or os.environ.get("HF_TOKEN"))
    try:
        info = api.model_info(source, revision=revision)
        sha = info.sha
        config = json.loads(Path(hf_hub_download(source, "config.json", revision=sha, token=api.token,
                                                 endpoint=api.endpoint)).read_text())
    except RevisionNotFoundError as exc:
        raise InstallError(f"{source} has no revision {revision!r}", "revision_not_found") from exc
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise InstallError(f"{source} was not found on {api.endpoint} (or needs an HF_TOKEN with access to it)",
                           "model_not_found") from exc
    except HfHubHTTPError as exc:
        raise InstallError(f"The hub at {api.endpoint} refused {source}: {exc}", "hub_error") from exc
    except Exception as exc:  # the transport's own errors (DNS, refused, TLS) are not OSErrors
        raise InstallError(f"The hub at {api.endpoint} cannot be reached: {exc}", "hub_unreachable") from exc
    weights = None
    names = {s.rfilename for s in info.siblings or []}
    if "model.safetensors.index.json" in names:
        index = json.loads(Path(hf_hub_download(source, "model.safetensors.index.json", revision=sha,
                                                token=api.token, endpoint=api.endpoint)).read_text())
        weights = (index.get("metadata") or {}).get("total_size")
    return Source("hub", source, sha, config, weights)


def download(source: Source, target: Path, token: str | None, progress: Callable[[str], None]) -> Path:
    """Download the pinned revision's weights and tokenizer into ``target`` (resumable, atomic rename)."""
    if source.kind == "local":
        return Path(source.location)
    from huggingface_hub import snapshot_download
    from tqdm.auto import tqdm

    class LoggingTqdm(tqdm):
        """Progress to the run's log every few seconds (the bars themselves go nowhere in a run)."""

        def __init__(self, *args, **kwargs):
            kwargs["disable"] = False
            kwargs["file"] = open(os.devnull, "w")  # noqa: SIM115 - closed with the bar
            super().__init__(*args, **kwargs)
            self._logged = 0.0

        def update(self, n=1):
            super().update(n)
            if time.monotonic() - self._logged >= 3 or (self.total and self.n >= self.total):
                self._logged = time.monotonic()
                total = f"/{self.total / 1e6:.1f}" if self.total and self.unit == "B" else ""
                done = f"{self.n / 1e6:.1f}{total} MB" if self.unit == "B" else f"{self.n}/{self.total} files"
                progress(f"downloading {source.location}@{source.revision[:10]}: {done}")

        def close(self):
            super().close()
            self.fp.close()

    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    snapshot_download(source.location, revision=source.revision, local_dir=partial, allow_patterns=WEIGHT_PATTERNS,
                      token=token or os.environ.get("HF_TOKEN"), endpoint=os.environ.get("HF_ENDPOINT"),
                      tqdm_class=LoggingTqdm)
    shutil.rmtree(partial / ".cache", ignore_errors=True)
    if target.exists():
        shutil.rmtree(target)
    partial.rename(target)
    return target


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
