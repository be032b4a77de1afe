"""vbatch's settings, read from the environment once, at the edges: the code location (definitions.py),
the API app and the CLI. Everything that runs inside Dagster gets its configuration from resources
(``resources.factory.build_resources``), whose config classes are made from these groups
(``resources.config_of``), so each setting is declared here once: its variable, type, default, bounds and
description. docs/configuration.md's tables are generated from the same declarations
(``python -m vbatch_pipelines.settings``; ``tests/test_settings.py`` fails when they differ).

Everything lives under one home directory (``VBATCH_HOME``, default ``./.vbatch``; its layout is
``vbatch_pipelines.layout``'s) unless a variable points a piece elsewhere.

A value that cannot work (an unknown backend or gate, a number that is not one) fails here, naming the
variable and what it takes, so a typo stops the code location from loading instead of failing a run.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import sys
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from vbatch_pipelines.engine.base import EngineBackend
from vbatch_pipelines.fine_tuning import TrainerBackend
from vbatch_pipelines.fine_tuning.comparison import DeployGate, GateMetric


class SettingsError(ValueError):
    """A setting has a value vbatch cannot use; the message names the variable and the allowed values."""


def is_off(value: Any) -> bool:
    """How a switch (env var or batch metadata) says off."""
    return str(value).strip().lower() in ("off", "0", "false", "no")


def setting(env: str, default: Any = ..., *, description: str, shown: str | None = None, **kwargs) -> Any:
    """One setting: read from the variable ``env``; ``shown`` is its default as the docs say it, where the
    value itself is computed (a path under the home, what the machine has)."""
    extra = {"shown": shown} if shown is not None else None
    return Field(default, validation_alias=env, description=description, json_schema_extra=extra, **kwargs)


class SettingsGroup(BaseSettings):
    """A group of settings, each read from its own variable (``setting``'s ``env``); an empty variable is unset.
    Lists, maps and JSON are parsed by the groups' validators, never as pydantic-settings' JSON. Only the
    variables are read (no field name is: ``home`` would read ``$HOME``); ``note`` is the docs' line above its
    table."""

    model_config = SettingsConfigDict(env_ignore_empty=True, enable_decoding=False,
                                      extra="ignore", frozen=True, validate_default=True)
    title: ClassVar[str] = ""
    note: ClassVar[str] = ""

    @classmethod
    def env_of(cls, field: str) -> str:
        return cls.model_fields[field].validation_alias

    @classmethod
    def load(cls):
        """The group as the environment sets it; a bad value is a SettingsError naming its variable."""
        try:
            return cls()
        except ValidationError as exc:
            raise SettingsError(explain(cls, exc)) from None


def _items(value: Any) -> list[str]:
    if value is None:
        return []
    return [item.strip() for item in value.split(",") if item.strip()] if isinstance(value, str) else list(value)


def _pairs(value: Any, form: str) -> Any:
    """``key=value`` entries of a comma-separated variable, as (entry, key, value); an entry without both sides
    is refused naming the form it takes. A value that is already a dict (set in code) is taken as it is."""
    if not isinstance(value, str):
        return value
    pairs = []
    for item in _items(value):
        key, sep, val = (part.strip() for part in item.partition("="))
        if not sep or not key or not val:
            raise ValueError(f"entry {item!r} is not of the form {form}")
        pairs.append((item, key, val))
    return pairs


def _off_is_none(value: Any) -> Any:
    """A limit or schedule that ``off`` (or 0, as a switch says it) turns off."""
    return None if value is None or is_off(value) else value


def detect_gpus() -> int:
    """GPUs this machine can use, without importing torch (CUDA_VISIBLE_DEVICES or nvidia-smi's devices)."""
    import os

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() not in ("", "-1")])
    if shutil.which("nvidia-smi") is None:
        return 0
    return sum(1 for _ in Path("/dev").glob("nvidia[0-9]*"))


class StorageSettings(SettingsGroup):
    title: ClassVar[str] = "Storage"
    home: Path = setting("VBATCH_HOME", Path(".vbatch"), shown="`./.vbatch`", description=(
        "all of this node's state: `vbatch.db`, `files/`, `batches/`, `datasets/`, `fine_tunes/`, `models/`, "
        "`engines/`, `label-studio/`, `logs/`, `dagster/`"))
    store: Path | None = setting("VBATCH_STORE", None, shown="`VBATCH_HOME`", description=(
        "where the files every node shares live (files, batches, datasets, fine-tunes, models); the home keeps "
        "node-local state"))
    database_url: str | None = setting("VBATCH_DATABASE_URL", None, shown="SQLite in `VBATCH_HOME`", description=(
        "the metadata DB, e.g. `postgresql://user@127.0.0.1:5432/vbatch`"))
    envs_dir: Path = setting("VBATCH_ENVS_DIR", Path("~/.cache/vbatch/envs"), shown="`~/.cache/vbatch/envs`",
                             description="where `vbatch engine install`, `vbatch trainer install` and `vbatch "
                                         "label-studio install` build their own virtualenvs")

    @field_validator("home", "store", "envs_dir")
    @classmethod
    def _absolute(cls, value: Path | None) -> Path | None:
        return None if value is None else value.expanduser().resolve()

    @model_validator(mode="after")
    def _database_in_home(self):
        if self.database_url is None:
            from vbatch_pipelines.layout import StoreLayout

            object.__setattr__(self, "database_url", f"sqlite:///{StoreLayout.of(self.home, self.store).database_path}")
        return self


class DagsterSettings(SettingsGroup):
    title: ClassVar[str] = "Dagster"
    home: Path | None = setting("DAGSTER_HOME", None, shown="`$VBATCH_HOME/dagster`", description=(
        "the Dagster instance (`dagster.yaml`, its SQLite storage, compute logs)"))
    database_url: str | None = setting("VBATCH_DAGSTER_DATABASE_URL", None, shown="SQLite in `DAGSTER_HOME`",
                                       description="Dagster's storage on PostgreSQL (dagster-postgres)")
    url: str = setting("VBATCH_DAGSTER_URL", "http://127.0.0.1:3000", shown="`http://127.0.0.1:3000`",
                       description="where the API reaches Dagster to launch runs")
    port: int = setting("VBATCH_DAGSTER_PORT", 3000, ge=1, le=65535, description=(
        "the Dagster webserver's port (`vbatch up --dagster-port`, `vbatch doctor --dagster-port`)"))
    inference_runs: int = setting("VBATCH_INFERENCE_RUNS", 8, ge=1, description=(
        "batch steps running side by side on the engines (the `inference` pool's limit; each may hold up to 100 "
        "batches)"))


class EngineSettings(SettingsGroup):
    """The inference engine's (``InferenceEngine``'s config)."""

    title: ClassVar[str] = "Engine"
    backend: EngineBackend = setting("VBATCH_ENGINE", "auto", description="`vllm`, `transformers` or `auto`")
    vllm_python: str | None = setting("VBATCH_VLLM_PYTHON", None, shown="managed env", description=(
        "a Python that has vLLM installed"))
    gpus: int = Field(default_factory=detect_gpus, validation_alias="VBATCH_GPUS", ge=0, description=(
        "GPUs; the `gpu` pool gets one slot per GPU (at least 1)"), json_schema_extra={"shown": "detected"})
    max_model_len: int | None = setting("VBATCH_MAX_MODEL_LEN", None, ge=16, shown="the model's", description=(
        "the engine's context length; the install fit check uses it"))
    gpu_memory_utilization: float = setting("VBATCH_GPU_MEMORY_UTILIZATION", 0.9, gt=0.0, le=1.0, description=(
        "the share of GPU memory each base model's vLLM server takes (vLLM's `--gpu-memory-utilization`; the "
        "install fit check uses it): lower it to serve several base models on one GPU"))
    kv_cache_sequences: int = setting("VBATCH_KV_CACHE_SEQUENCES", 16, ge=1, description=(
        "on CPU: how many sequences of the full context an engine's KV cache holds. The cache is sized from the "
        "model's config (2 × layers × KV heads × head size × context × 4 bytes, times this), at least 16 MiB and "
        "at most a fifth of the machine's memory; the install fit check refuses a model one sequence of which "
        "does not fit. A CPU engine also runs its model worker inside its engine core (one process fewer) with "
        "the machine's cores but one"))
    engine_slots: int = setting("VBATCH_ENGINE_SLOTS", 0, ge=0, description=(
        "chunks (64 requests each) a vLLM server runs at once, every batch's together, shared among projects by "
        "weight ([fair share](operations.md#teams-projects-usage-quotas-and-a-fair-share)); 0: one batch's "
        "window (`max_concurrency / chunk_size` = 8)"))
    plan_batches: bool = setting("VBATCH_PLAN_BATCHES", True, description=(
        "[whole-file scheduling](architecture.md#how-it-fits-together): each batch's requests grouped by shared "
        "prefix, longest first, identical deterministic lines run once; `0`: file order"))
    max_lora_rank: int = setting("VBATCH_MAX_LORA_RANK", 16, ge=1, description=(
        "the engine's largest LoRA rank; fine-tunes above it are refused at create time"))
    tool_parsers: dict[str, str] = setting("VBATCH_TOOL_PARSERS", {}, shown="none", description=(
        "`model=parser,...`: vLLM's tool parser (its `--tool-call-parser`: `hermes`, `llama3_json`, `mistral`, "
        "...) for the calls a base model writes itself, so its managed engine serves `tool_choice: \"auto\"` "
        "(see [Structured outputs and tools](api.md#structured-outputs-and-tools)); a model not named forces "
        "calls only"))
    external_engines: dict[str, list[str]] = setting("VBATCH_ENGINES", {}, shown="none", description=(
        "vLLM servers running elsewhere, `model=http://host:port,...`; a model named twice has two replicas "
        "(see [Scaling out](scaling-out.md#scaling-out))"))
    external_engines_api_key: str | None = setting("VBATCH_ENGINES_API_KEY", None, shown="none", description=(
        "the key those servers take (their `--api-key`, or `VBATCH_ENGINE_KEY` of a vLLM running vbatch's "
        "`vllm_guard` middleware)"))
    node: str = Field(default_factory=lambda: socket.gethostname().split(".")[0], validation_alias="VBATCH_NODE",
                      description="this node's name in the engine registry and in cluster mode (`vbatch worker "
                                  "--node`)", json_schema_extra={"shown": "the short host name"})
    engine_host: str = setting("VBATCH_ENGINE_HOST", "127.0.0.1", description=(
        "the address this node's vLLM servers bind to (`0.0.0.0` to serve other nodes; they are registered under "
        "the host name)"))

    @field_validator("tool_parsers", mode="before")
    @classmethod
    def _tool_parsers(cls, value: Any) -> Any:
        form = "model=parser (a vLLM --tool-call-parser name such as hermes, llama3_json, mistral)"
        if isinstance(value, dict):
            return value
        parsers: dict[str, str] = {}
        for item, name, parser in _pairs(value, form):
            if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,63}", parser):  # a parser's name, never another flag
                raise ValueError(f"entry {item!r} is not of the form {form}")
            if name in parsers:
                raise ValueError(f"names {name!r} twice")
            parsers[name] = parser
        return parsers

    @field_validator("external_engines", mode="before")
    @classmethod
    def _external_engines(cls, value: Any) -> Any:
        from urllib.parse import urlsplit

        if isinstance(value, dict):
            return value
        engines: dict[str, list[str]] = {}
        form = "model=http://host:port"
        for item, name, url in _pairs(value, form):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"entry {item!r} is not of the form {form}")
            if (parts.path or "/") != "/" or parts.query or parts.username:
                raise ValueError(f"entry {item!r}: give the server's base URL (scheme, host, port) without a path, "
                                 "query or credentials")
            if url.rstrip("/") in engines.get(name, []):
                raise ValueError("names the same model and URL twice")
            engines.setdefault(name, []).append(url.rstrip("/"))
        return engines


class RegistrySettings(SettingsGroup):
    """The base models vbatch may serve (``ModelRegistry``'s config)."""

    title: ClassVar[str] = "Models"
    models: dict[str, str] = setting("VBATCH_MODELS", {}, shown="the tiny local model", description=(
        "base models `name=path,...`; a path may end in `:embed` (or `:generate`) to say what the model does "
        "when its files do not"))
    default_model: str | None = setting("VBATCH_DEFAULT_MODEL", None, shown="the first configured", description=(
        "the model a request that names none gets"))
    model_sources: list[str] = setting("VBATCH_MODEL_SOURCES", [], shown="`$VBATCH_HOME/models`", description=(
        "directories `POST /v1/models` may install local models from"))
    allow_remote_code: bool = setting("VBATCH_ALLOW_REMOTE_CODE", False, shown="`0`", description=(
        "`1`: admins may install models with `trust_remote_code`"))

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        return value if isinstance(value, dict) else {name: path for _, name, path in _pairs(value, "name=path")}

    @field_validator("model_sources", mode="before")
    @classmethod
    def _sources(cls, value: Any) -> list[str]:
        return [str(Path(path).expanduser().resolve()) for path in _items(value)]


class ApiSettings(SettingsGroup):
    title: ClassVar[str] = "API"
    port: int = setting("VBATCH_API_PORT", 4080, ge=1, le=65535, description="the API's port (`vbatch up --api-port`)")
    workers: int = setting("VBATCH_API_WORKERS", 0, ge=0, shown="2 with vLLM on ≥ 2 cores, else 1",
                           description="API processes (0: chosen as the default says)")
    keys: tuple[str, ...] = setting("VBATCH_API_KEYS", (), shown="none (loopback only)", description=(
        "comma-separated use keys; with any key set every `/v1` route needs `Authorization: Bearer <key>`"))
    admin_keys: tuple[str, ...] = setting("VBATCH_ADMIN_KEYS", (), shown="none", description=(
        "comma-separated admin keys: also install and delete base models (see [Security](operations.md#security))"))
    allowed_hosts: tuple[str, ...] = setting("VBATCH_ALLOWED_HOSTS", (), shown="none", description=(
        "Host names the API answers without keys, besides `localhost`, `127.0.0.1`, `::1`"))
    forwarded_allow_ips: str = setting("VBATCH_FORWARDED_ALLOW_IPS", "127.0.0.1", description=(
        "proxies whose `X-Forwarded-Proto`/`-For` the API trusts (a TLS proxy on another host: its address)"))
    max_upload_bytes: int = setting("VBATCH_MAX_UPLOAD_BYTES", 512 * 1024 * 1024, ge=1, shown="512 MiB", description=(
        "upload limit, enforced while the body streams (chunked too), answered with 413"))
    max_request_bytes: int = setting("VBATCH_MAX_REQUEST_BYTES", 32 * 1024 * 1024, ge=1024, shown="32 MiB",
                                     description="limit of any other request body (JSON), answered with 413")
    inline_validation_bytes: int = setting("VBATCH_INLINE_VALIDATION_BYTES", 8 * 1024 * 1024, ge=0, shown="8 MiB",
                                           description=(
        "input files up to this size are validated by `POST /v1/batches` itself (the batch is `in_progress` or "
        "`failed` when it returns); larger ones stay `validating` until `batch_input` streams them"))
    gpu_hour_cost: float | None = setting("VBATCH_GPU_HOUR_COST", None, ge=0.0, le=1_000_000.0, shown="none",
                                          description=(
        "what an hour of an engine's machine costs: the dashboard shows each model's cost and cost per 1k tokens "
        "today (engine busy time: the union of its batches' in-progress spans)"))

    @field_validator("keys", "admin_keys", mode="before")
    @classmethod
    def _list(cls, value: Any) -> tuple[str, ...]:
        return tuple(_items(value))

    @field_validator("allowed_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> tuple[str, ...]:
        return tuple(host.lower() for host in _items(value))


class CurationSettings(SettingsGroup):
    title: ClassVar[str] = "Curation"
    enabled: bool = setting("VBATCH_CURATION", True, shown="`on`", description=(
        "`off`: no Label Studio, `curation_tasks` skips every batch"))
    label_studio_url: str | None = setting("VBATCH_LABEL_STUDIO_URL", None, shown="managed", description=(
        "a running Label Studio to use instead of vbatch's own"))
    label_studio_token: str | None = setting("VBATCH_LABEL_STUDIO_TOKEN", None, shown="none", description=(
        "that Label Studio's API token"))
    label_studio_port: int = setting("VBATCH_LABEL_STUDIO_PORT", 4115, ge=1, le=65535, description=(
        "port of the managed Label Studio (data in `$VBATCH_HOME/label-studio`)"))
    label_studio_database_url: str | None = setting("VBATCH_LABEL_STUDIO_DATABASE_URL", None, shown="SQLite",
                                                    description="PostgreSQL for the managed Label Studio")
    webhook_secret: str | None = setting("VBATCH_WEBHOOK_SECRET", None, shown="generated", description=(
        "shared secret Label Studio sends in `X-Vbatch-Webhook-Secret`"))
    review_schemas_dir: Path | None = setting("VBATCH_REVIEW_SCHEMAS_DIR", None, shown="`$VBATCH_HOME/review-schemas`",
                                              description=(
        "review schemas as JSON files (one per schema; see [docs/extensions.md](extensions.md)); a bad file stops "
        "the start, named"))


class TrainingSettings(SettingsGroup):
    """How fine-tunes train (``Trainer``'s config)."""

    title: ClassVar[str] = "Fine-tuning"
    backend: TrainerBackend = setting("VBATCH_TRAINER", "auto", description=(
        "`unsloth` (CUDA; `vbatch trainer install`, which `make` runs, builds its env), `trl` (TRL + PEFT, CPU or "
        "GPU), `auto`: Unsloth when there is a GPU and its env, else TRL"))
    min_training_examples: int = setting("VBATCH_MIN_TRAINING_EXAMPLES", 10, ge=1, description=(
        "smaller training sets are refused (as OpenAI does)"))


class RetrainSettings(SettingsGroup):
    """How fine-tunes are judged, deployed and retrained (``RetrainingPolicy``'s config, but the schedule)."""

    title: ClassVar[str] = "Retraining"
    cron: str | None = setting("VBATCH_RETRAIN_CRON", "0 3 * * *", description=(
        "the retraining schedule (`off` to drop it)"))
    min_gold_stars: int = setting("VBATCH_RETRAIN_MIN_GOLD_STARS", 100, ge=1, description=(
        "new gold stars since the last checkpoint that trigger a retrain (automation condition)"))
    model: str | None = setting("VBATCH_RETRAIN_MODEL", None, shown="the default model", description=(
        "the base model a retrain fine-tunes"))
    hyperparameters: dict[str, Any] = setting("VBATCH_RETRAIN_HYPERPARAMETERS", {}, shown="`{}`", description=(
        "how a retrain fine-tunes: JSON, as the fine-tuning API takes its hyperparameters"))
    deploy_gate: DeployGate = setting("VBATCH_DEPLOY_GATE", "no_worse", description=(
        "when a retrain deploys: `always`, `no_worse` (the comparison's metric is not lower than the base's), "
        "`never`"))
    gate_metric: GateMetric = setting("VBATCH_GATE_METRIC", "normalized_match", description=(
        "what `no_worse` compares"))
    judge_model: str | None = setting("VBATCH_JUDGE_MODEL", None, shown="none", description=(
        "a served model that judges base vs fine-tune answers in `model_comparison`, and answers against gold in "
        "`eval_score`"))
    eval_set: str | None = setting("VBATCH_RETRAIN_EVAL_SET", None, shown="none", description=(
        "a fixed eval set (`eval_...`) retrains are compared on, for the deploy gate, instead of each job's own "
        "split; both models join the set's leaderboard"))

    @field_validator("cron", mode="before")
    @classmethod
    def _cron(cls, value: Any) -> Any:
        return _off_is_none(value)

    @field_validator("hyperparameters", mode="before")
    @classmethod
    def _hyperparameters(cls, value: Any) -> Any:
        from vbatch_pipelines.fine_tuning import FineTuningError
        from vbatch_pipelines.fine_tuning.hyperparameters import parse_hyperparameters

        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                raise ValueError(f"{value!r} is not JSON") from None
        if not isinstance(value, dict):
            raise ValueError("takes a JSON object, as the fine-tuning API's hyperparameters")
        try:
            parse_hyperparameters(value)
        except FineTuningError as exc:
            raise ValueError(str(exc)) from None
        return value


class RetentionSettings(SettingsGroup):
    """What vbatch keeps and for how long (``RetentionPolicy``'s config, but the schedule)."""

    title: ClassVar[str] = "Retention and disk"
    note: ClassVar[str] = "See [Retention and disk](operations.md#retention-and-disk)."
    file_retention_days: int | None = setting("VBATCH_FILE_RETENTION_DAYS", 30, ge=1, description=(
        "batch input and output files that set no `expires_after` are deleted this many days after creation "
        "(`0`/`off`: kept)"))
    run_retention_days: int | None = setting("VBATCH_RUN_RETENTION_DAYS", 30, ge=1, description=(
        "finished Dagster runs older than this are deleted with their event and compute logs (`0`/`off`: kept)"))
    log_max_bytes: int | None = setting("VBATCH_LOG_MAX_BYTES", 100 * 1024 * 1024, ge=4096, shown="100 MiB",
                                        description=(
        "service, engine and Label Studio logs larger than this are rotated at each retention run (`0`/`off`: "
        "never)"))
    log_backups: int = setting("VBATCH_LOG_BACKUPS", 3, ge=1, description="rotated copies kept of each log")
    min_free_disk_percent: float = setting("VBATCH_MIN_FREE_DISK_PERCENT", 5.0, ge=0.0, lt=100.0, shown="`5`",
                                           description=(
        "under this share free on the store's filesystem, new batches and uploads are refused with 507 (`0`: "
        "never)"))
    cron: str | None = setting("VBATCH_RETENTION_CRON", "15 4 * * *", description=(
        "the retention schedule (`off` to drop it; `retention_job` still runs from the UI)"))

    @field_validator("file_retention_days", "run_retention_days", "log_max_bytes", "cron", mode="before")
    @classmethod
    def _limit_or_schedule(cls, value: Any) -> Any:
        return _off_is_none(value)

    @field_validator("min_free_disk_percent", mode="before")
    @classmethod
    def _floor(cls, value: Any) -> Any:
        return 0.0 if isinstance(value, str) and is_off(value) else value


class ClusterSettings(SettingsGroup):
    """Several nodes on Dagster's own launchers."""

    title: ClassVar[str] = "Cluster"
    note: ClassVar[str] = "See [Scaling out](scaling-out.md#scaling-out)."
    broker_url: str | None = setting("VBATCH_BROKER_URL", None, shown="none", description=(
        "cluster mode's Celery broker (`redis://...`)"))
    gpus: int = setting("VBATCH_CLUSTER_GPUS", 1, ge=1, description=(
        "cluster mode's `gpu` pool limit: the GPUs of all nodes together"))
    k8s_run_gpus: int = setting("VBATCH_K8S_RUN_GPUS", 0, ge=0, description=(
        "GPUs the pod of a fine-tuning or install run asks Kubernetes for (0: no request)"))

    @field_validator("broker_url")
    @classmethod
    def _redis(cls, value: str | None) -> str | None:
        if value is not None and value.split("://", 1)[0] not in ("redis", "rediss"):
            raise ValueError("takes a Redis URL (redis://[:password@]host:port/db or rediss://...)")
        return value


class ExtensionSettings(SettingsGroup):
    """Which installed extensions are on; each declares its own settings (Extension.settings)."""

    title: ClassVar[str] = "Extensions"
    note: ClassVar[str] = "See [Extensions](extensions.md); each extension's own settings are in its guide."
    enabled: tuple[str, ...] | None = setting("VBATCH_EXTENSIONS", None, shown="none (or those whose own "
                                              "variable is set)", description=(
        "the installed extensions to turn on, comma-separated (`off`: none); unset, an extension that names a "
        "variable of its own as its switch (`enabled_by`) is on when that is set. An unknown name stops "
        "the start, naming the installed ones"))

    @field_validator("enabled", mode="before")
    @classmethod
    def _names(cls, value: Any) -> Any:
        if value is None:
            return None
        if isinstance(value, str) and is_off(value):
            return ()
        names = tuple(dict.fromkeys(_items(value)))
        bad = [n for n in names if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", n)]
        if bad:
            raise ValueError(f"takes comma-separated extension names (lower-case letters, digits, - and _); got "
                             f"{', '.join(map(repr, bad))}")
        return names


class Settings(BaseModel):
    """Every group, read together (``load_settings``); defaults that depend on the home are filled in here."""

    model_config = ConfigDict(frozen=True)
    storage: StorageSettings
    dagster: DagsterSettings
    engine: EngineSettings
    registry: RegistrySettings
    api: ApiSettings
    curation: CurationSettings
    training: TrainingSettings
    retrain: RetrainSettings
    retention: RetentionSettings
    cluster: ClusterSettings
    extensions: ExtensionSettings
    extension_settings: dict[str, Any] = Field(default_factory=dict)  # an enabled extension's own, by its name

    @model_validator(mode="after")
    def _defaults_in_home(self):
        """What lives under the home unless set: the Dagster home, model sources, review schemas."""
        layout = self.paths()
        if self.dagster.home is None:
            object.__setattr__(self.dagster, "home", layout.dagster_dir)
        if not self.registry.model_sources:
            object.__setattr__(self.registry, "model_sources", [str(layout.models_dir)])
        if self.curation.review_schemas_dir is None:
            object.__setattr__(self.curation, "review_schemas_dir", self.storage.home / "review-schemas")
        return self

    def replace(self, **groups: dict[str, Any]) -> Settings:
        """These settings with some of the groups' fields changed: ``replace(api={"keys": ("k",)})``."""
        return self.model_copy(update={name: getattr(self, name).model_copy(update=changes)
                                       for name, changes in groups.items()})

    def layout(self):
        """The FileStore of these settings: this node's home and the (shared) store."""
        from resources.file_store import FileStore

        return FileStore.of(self.storage.home, self.storage.store)

    def paths(self):
        """The same layout without Dagster, for what needs only paths (`vbatch up`'s supervisor)."""
        from vbatch_pipelines.layout import StoreLayout

        return StoreLayout.of(self.storage.home, self.storage.store)


GROUPS: dict[str, type[SettingsGroup]] = {name: field.annotation for name, field in Settings.model_fields.items()
                                          if isinstance(field.annotation, type) and issubclass(field.annotation,
                                                                                             SettingsGroup)}


def load_settings() -> Settings:
    """The settings as the environment sets them; a bad value is a SettingsError naming its variable. Which
    extensions are on is resolved here (VBATCH_EXTENSIONS, else those whose own ``enabled_by`` variable is set),
    and their own settings read with vbatch's."""
    import os

    from vbatch_pipelines.extensions import enabled_extensions, installed_extensions

    groups = {name: group.load() for name, group in GROUPS.items()}
    names = groups["extensions"].enabled
    on = (enabled_extensions(names) if names is not None else
          [extension for extension in installed_extensions()
           if extension.enabled_by and os.environ.get(extension.enabled_by)])
    groups["extensions"] = groups["extensions"].model_copy(update={"enabled": tuple(e.name for e in on)})
    return Settings(**groups, extension_settings={e.name: e.settings.load() for e in on if e.settings is not None})


# -- what a refused value is told ---------------------------------------------------------------------------


def explain(group: type[BaseModel], exc: ValidationError) -> str:
    """pydantic's errors in the words of the variables: ``VBATCH_X='v' is not an integer``, one line each."""
    return "; ".join(_explain_one(group, error) for error in exc.errors())


def _explain_one(group: type[BaseModel], error: dict) -> str:
    key = str(error["loc"][0]) if error["loc"] else ""
    field = next((info for name, info in group.model_fields.items() if key in (name, info.validation_alias)), None)
    env = (field.validation_alias if field is not None else None) or key
    value, kind, ctx = error.get("input"), error["type"], error.get("ctx") or {}
    if kind == "value_error":
        return f"{env} {ctx.get('error', error['msg'])}"
    if kind == "literal_error" and field is not None:
        allowed = ", ".join(map(str, _literal_values(field.annotation)))
        return f"{env}={value!r} is not allowed; use one of: {allowed}"
    if kind in ("int_parsing", "int_from_float", "int_type"):
        return f"{env}={value!r} is not an integer"
    if kind in ("float_parsing", "float_type"):
        return f"{env}={value!r} is not a number"
    if kind in ("bool_parsing", "bool_type"):
        return f"{env}={value!r} is not a switch; use 1 or 0 (on/off, true/false, yes/no)"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal") and field is not None:
        low, high = _bounds(field)
        if high is None and kind == "greater_than_equal" and isinstance(low[1], int):
            return f"{env}={value} is too small; it takes an integer of at least {low[1]}"
        low_text = "(-inf" if low is None else f"{'(' if low[0] == 'gt' else '['}{low[1]}"
        high_text = "inf)" if high is None else f"{high[1]}{']' if high[0] == 'le' else ')'}"
        return f"{env}={value} is out of range; it takes a number in {low_text}, {high_text}"
    return f"{env}={value!r}: {error['msg']}"


def _literal_values(annotation: Any) -> list:
    if get_origin(annotation) is Literal:
        return list(get_args(annotation))
    return [value for arg in get_args(annotation) for value in _literal_values(arg)]


def _bounds(field) -> tuple[tuple[str, Any] | None, tuple[str, Any] | None]:
    low = high = None
    for item in field.metadata:
        for name in ("gt", "ge"):
            if getattr(item, name, None) is not None:
                low = (name, getattr(item, name))
        for name in ("lt", "le"):
            if getattr(item, name, None) is not None:
                high = (name, getattr(item, name))
    return low, high


# -- the docs' tables ---------------------------------------------------------------------------------------


def settings_table(groups: dict[str, type[SettingsGroup]]) -> str:
    """Markdown: a table per group, one row per setting (variable, default, what it does), from the declarations."""
    parts = []
    for group in groups.values():
        rows = ["| variable | default | meaning |", "|---|---|---|"]
        for info in group.model_fields.values():
            shown = (info.json_schema_extra or {}).get("shown") if isinstance(info.json_schema_extra, dict) else None
            if shown is None:
                shown = f"`{_plain(info.default)}`"
            rows.append(f"| `{info.validation_alias}` | {shown} | {info.description} |")
        parts.append("\n".join([f"## {group.title}", "", *([group.note, ""] if group.note else []), *rows]))
    return "\n\n".join(parts) + "\n"


def _plain(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return "none" if value is None else str(value)


GENERATED = ("<!-- generated from the declarations in vbatch_pipelines/settings.py (or an extension's settings) by "
             "`python -m vbatch_pipelines.settings --write FILE [module:Group ...]`: edit those, not this table -->",
             "<!-- end of the generated settings -->")


def with_tables(text: str, tables: str) -> str:
    """``text`` with what lies between the GENERATED marks replaced by ``tables``; without both marks, a
    SettingsError saying which to add."""
    if GENERATED[0] not in text or GENERATED[1] not in text:
        raise SettingsError(f"the generated settings' marks are missing: add the lines {GENERATED[0]} and "
                            f"{GENERATED[1]} where the tables go")
    start, end = text.index(GENERATED[0]) + len(GENERATED[0]), text.index(GENERATED[1])
    return f"{text[:start]}\n\n{tables}\n{text[end:]}"


def stale_tables(text: str, groups: dict[str, type[SettingsGroup]]) -> str | None:
    """None when ``text``'s generated tables are ``groups``' declarations; else what differs and how to mend it."""
    try:
        regenerated = with_tables(text, settings_table(groups))
    except SettingsError as exc:  # no marks
        return str(exc)
    if regenerated == text:
        return None
    written = set(text[text.index(GENERATED[0]):text.index(GENERATED[1])].splitlines())
    differ = [line for line in settings_table(groups).splitlines() if line not in written]
    return (f"the settings tables differ from the declarations ({'; '.join(differ[:3]) or 'lines removed'}); "
            "regenerate them with python -m vbatch_pipelines.settings --write FILE [module:Group ...]")


def _main(argv: list[str]) -> int:
    """``[--write] [FILE [module:Group ...]]``: print the tables of the groups (default: vbatch's own), or write
    them between FILE's marks (default: docs/configuration.md)."""
    import importlib

    write = "--write" in argv
    args = [arg for arg in argv if arg != "--write"]
    target = Path(args[0]) if args else Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    groups = GROUPS
    if len(args) > 1:
        groups = {}
        for spec in args[1:]:
            module, _, name = spec.partition(":")
            groups[name] = getattr(importlib.import_module(module), name)
    tables = settings_table(groups)
    if write:
        try:
            target.write_text(with_tables(target.read_text(), tables))
        except SettingsError as exc:
            sys.stderr.write(f"{target}: {exc}\n")
            return 2
    else:
        sys.stdout.write(tables)
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
