"""Where vbatch keeps its state, read from the environment.

Everything lives under one home directory (``VBATCH_HOME``, default ``./.vbatch``) unless an
environment variable points a piece elsewhere: the Dagster instance, the metadata DB (SQLite unless
``VBATCH_DATABASE_URL`` is set), the file store, managed engine state and locally built models.
"""

from __future__ import annotations

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

    @property
    def label_studio_dir(self) -> Path:
        return self.home / "label-studio"

    @property
    def datasets_dir(self) -> Path:
        return self.home / "datasets"

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
    )
