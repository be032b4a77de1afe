"""Where vbatch keeps its state, read from the environment.

Everything lives under one home directory (``VBATCH_HOME``, default ``./.vbatch``) unless an
environment variable points a piece elsewhere: the Dagster instance, the metadata DB (SQLite unless
``VBATCH_DATABASE_URL`` is set), the file store, managed engine state and locally built models.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

TINY_MODEL_ID = "vbatch-tiny-chat"


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def is_off(value: str | None) -> bool:
    """How a switch (env var or batch metadata) says off."""
    return str(value).strip().lower() in ("off", "0", "false", "no")


def gpu_count() -> int:
    """GPUs this machine can use, without importing torch (nvidia-smi or CUDA_VISIBLE_DEVICES)."""
    configured = _env("VBATCH_GPUS")
    if configured is not None:
        return int(configured)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    if shutil.which("nvidia-smi") is None:
        return 0
    return sum(1 for entry in Path("/dev").glob("nvidia[0-9]*"))


@dataclass(frozen=True)
class Settings:
    home: Path
    database_url: str
    dagster_database_url: str | None
    engine_backend: str
    vllm_python: str | None
    envs_dir: Path
    default_model: str | None
    models: dict[str, str]
    gpus: int
    dagster_url: str
    api_keys: tuple[str, ...]
    api_port: int
    api_workers: int  # 0: two on a machine with two or more cores and a vLLM engine, else one
    max_upload_bytes: int
    inline_validation_bytes: int  # input files up to this size are validated by the API at create time
    curation: bool  # VBATCH_CURATION=off: no Label Studio, curation_tasks skips every batch
    label_studio_url: str | None  # an external Label Studio; unset: vbatch runs its own
    label_studio_token: str | None
    label_studio_port: int
    label_studio_database_url: str | None  # PostgreSQL for the managed Label Studio (SQLite otherwise)
    webhook_secret: str | None
    max_model_len: int | None  # the engine's context length (None: the model's own)
    gpu_memory_fraction: float  # of GPU memory the engine may take (vLLM's gpu_memory_utilization)
    trainer: str  # auto (Unsloth with a GPU, else TRL) | unsloth | trl
    max_lora_rank: int  # the engine's largest LoRA rank; fine-tunes above it are refused
    min_training_examples: int
    retrain_cron: str | None  # the retraining schedule (None: off)
    retrain_model: str | None  # the base model retraining fine-tunes (None: the default model)
    retrain_hyperparameters: dict  # JSON in VBATCH_RETRAIN_HYPERPARAMETERS, as the fine-tuning API takes
    retrain_min_gold_stars: int  # new gold stars since the last checkpoint that trigger a retrain
    deploy_gate: str  # retrains deploy: always | no_worse (the comparison must not be worse) | never
    gate_metric: str
    judge_model: str | None  # an LLM judge for model_comparison (None: no judge)

    @property
    def label_studio_dir(self) -> Path:
        return self.home / "label-studio"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

    @property
    def fine_tunes_dir(self) -> Path:
        return self.home / "fine_tunes"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"

    @property
    def batches_dir(self) -> Path:
        return self.home / "batches"

    @property
    def engines_dir(self) -> Path:
        return self.home / "engines"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def dagster_home(self) -> Path:
        return Path(_env("DAGSTER_HOME") or self.home / "dagster")

    @property
    def tiny_model_path(self) -> Path:
        return self.models_dir / TINY_MODEL_ID


def _switchable(value: str | None) -> str | None:
    return None if value is None or is_off(value) else value


def _parse_models(spec: str | None) -> dict[str, str]:
    """``VBATCH_MODELS="name=path,name2=path2"``: the base models vbatch may serve."""
    models: dict[str, str] = {}
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"VBATCH_MODELS entry {item!r} is not of the form name=path")
        models[name.strip()] = path.strip()
    return models


def load_settings() -> Settings:
    home = Path(_env("VBATCH_HOME", ".vbatch")).expanduser().resolve()
    database_url = _env("VBATCH_DATABASE_URL") or f"sqlite:///{home / 'vbatch.db'}"
    return Settings(
        home=home,
        database_url=database_url,
        dagster_database_url=_env("VBATCH_DAGSTER_DATABASE_URL"),
        engine_backend=_env("VBATCH_ENGINE", "auto"),
        vllm_python=_env("VBATCH_VLLM_PYTHON"),
        envs_dir=Path(_env("VBATCH_ENVS_DIR", str(Path.home() / ".cache" / "vbatch" / "envs"))),
        default_model=_env("VBATCH_DEFAULT_MODEL"),
        models=_parse_models(_env("VBATCH_MODELS")),
        gpus=gpu_count(),
        dagster_url=_env("VBATCH_DAGSTER_URL", "http://127.0.0.1:3000"),
        api_keys=tuple(k.strip() for k in (_env("VBATCH_API_KEYS") or "").split(",") if k.strip()),
        api_port=int(_env("VBATCH_API_PORT", "4080")),
        api_workers=int(_env("VBATCH_API_WORKERS", "0")),
        max_upload_bytes=int(_env("VBATCH_MAX_UPLOAD_BYTES", str(512 * 1024 * 1024))),
        inline_validation_bytes=int(_env("VBATCH_INLINE_VALIDATION_BYTES", str(8 * 1024 * 1024))),
        curation=not is_off(_env("VBATCH_CURATION", "on")),
        label_studio_url=_env("VBATCH_LABEL_STUDIO_URL"),
        label_studio_token=_env("VBATCH_LABEL_STUDIO_TOKEN"),
        label_studio_port=int(_env("VBATCH_LABEL_STUDIO_PORT", "4115")),
        label_studio_database_url=_env("VBATCH_LABEL_STUDIO_DATABASE_URL"),
        webhook_secret=_env("VBATCH_WEBHOOK_SECRET"),
        max_model_len=int(_env("VBATCH_MAX_MODEL_LEN")) if _env("VBATCH_MAX_MODEL_LEN") else None,
        gpu_memory_fraction=float(_env("VBATCH_GPU_MEMORY_UTILIZATION", "0.9")),
        trainer=_env("VBATCH_TRAINER", "auto"),
        max_lora_rank=int(_env("VBATCH_MAX_LORA_RANK", "16")),
        min_training_examples=int(_env("VBATCH_MIN_TRAINING_EXAMPLES", "10")),
        retrain_cron=_switchable(_env("VBATCH_RETRAIN_CRON", "0 3 * * *")),
        retrain_model=_env("VBATCH_RETRAIN_MODEL"),
        retrain_hyperparameters=json.loads(_env("VBATCH_RETRAIN_HYPERPARAMETERS", "{}")),
        retrain_min_gold_stars=int(_env("VBATCH_RETRAIN_MIN_GOLD_STARS", "100")),
        deploy_gate=_env("VBATCH_DEPLOY_GATE", "no_worse"),
        gate_metric=_env("VBATCH_GATE_METRIC", "normalized_match"),
        judge_model=_env("VBATCH_JUDGE_MODEL"),
    )
