"""vbatch's settings, read from the environment once, at the edges: the code location (definitions.py),
the API app and the CLI. Everything that runs inside Dagster gets its configuration from resources
(built from these settings by ``resources.factory.build_resources``).

Everything lives under one home directory (``VBATCH_HOME``, default ``./.vbatch``; its layout is
``vbatch_pipelines.layout``'s) unless an environment variable points a piece elsewhere: the shared files
(``VBATCH_STORE``), the Dagster instance, the metadata DB (SQLite unless ``VBATCH_DATABASE_URL`` is set),
managed virtualenvs, the Celery broker of cluster mode (``VBATCH_BROKER_URL``).

A value that cannot work (an unknown backend or gate, a number that is not one) fails here, naming the
variable and what it takes — so a typo stops the code location from loading instead of failing a run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args

from vbatch_pipelines.engine.base import EngineBackend
from vbatch_pipelines.fine_tuning.comparison import DeployGate, GateMetric
from vbatch_pipelines.fine_tuning.envs import TrainerBackend


class SettingsError(ValueError):
    """A setting has a value vbatch cannot use; the message names the variable and the allowed values."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def is_off(value: str | None) -> bool:
    """How a switch (env var or batch metadata) says off."""
    return str(value).strip().lower() in ("off", "0", "false", "no")


def _switch(name: str, default: bool) -> bool:
    raw = _env(name)
    if raw is None:
        return default
    if raw.strip().lower() in ("on", "1", "true", "yes"):
        return True
    if is_off(raw):
        return False
    raise SettingsError(f"{name}={raw!r} is not a switch; use 1 or 0 (on/off, true/false, yes/no)")


def _choice(name: str, default: str, allowed_type: Any) -> Any:
    value = _env(name, default)
    allowed = get_args(allowed_type)
    if value not in allowed:
        raise SettingsError(f"{name}={value!r} is not allowed; use one of: {', '.join(allowed)}")
    return value


def _int(name: str, default: int | None, minimum: int | None = None) -> int | None:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise SettingsError(f"{name}={value} is too small; it takes an integer of at least {minimum}")
    return value


def _float(name: str, default: float | None, low: float, high: float) -> float | None:
    raw = _env(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if not low < value <= high:
        raise SettingsError(f"{name}={value} is out of range; it takes a number in ({low}, {high}]")
    return value


def gpu_count() -> int:
    """GPUs this machine can use, without importing torch (nvidia-smi or CUDA_VISIBLE_DEVICES)."""
    configured = _int("VBATCH_GPUS", None, minimum=0)
    if configured is not None:
        return configured
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
    engine_backend: EngineBackend
    vllm_python: str | None
    envs_dir: Path
    default_model: str | None
    models: dict[str, str]
    engines: tuple[tuple[str, str], ...]  # (base model, URL) of vLLM servers running elsewhere, one per replica
    engines_api_key: str | None  # the key those servers take (their --api-key, or vbatch's engine key)
    tool_parsers: dict[str, str]  # base model -> vLLM tool parser its managed engine reads "auto" tool calls with
    node: str  # VBATCH_NODE (default the short host name): this node in the engine registry and cluster mode
    engine_host: str  # the address this node's engines bind to
    gpus: int
    inference_runs: int  # batch steps running side by side on the engines (the `inference` pool's limit)
    k8s_run_gpus: int  # GPUs a run with `gpu` steps asks Kubernetes for (its job's dagster-k8s/config tag); 0: none
    gpu_hour_cost: float | None  # what an hour of an engine's machine costs: the dashboard's cost per 1k tokens
    dagster_url: str
    api_keys: tuple[str, ...]  # use keys: files, batches, inference, curation, fine-tuning
    admin_keys: tuple[str, ...]  # also: install and delete base models (VBATCH_ADMIN_KEYS)
    allowed_hosts: tuple[str, ...]  # Host names the API answers without keys, besides loopback names
    forwarded_allow_ips: str  # proxies whose X-Forwarded-Proto/-For the API trusts (uvicorn's --forwarded-allow-ips)
    model_sources: tuple[Path, ...]  # directories admins may install local models from
    allow_remote_code: bool  # whether an admin may install a model with trust_remote_code
    api_port: int
    api_workers: int  # 0: two on a machine with two or more cores and a vLLM engine, else one
    max_upload_bytes: int
    max_request_bytes: int  # any other request body (JSON)
    inline_validation_bytes: int  # input files up to this size are validated by the API at create time
    curation: bool  # VBATCH_CURATION=off: no Label Studio, curation_tasks skips every batch
    label_studio_url: str | None  # an external Label Studio; unset: vbatch runs its own
    label_studio_token: str | None
    label_studio_port: int
    label_studio_database_url: str | None  # PostgreSQL for the managed Label Studio (SQLite otherwise)
    webhook_secret: str | None
    max_model_len: int | None  # the engine's context length (None: the model's own)
    gpu_memory_fraction: float  # of GPU memory the engine may take (vLLM's gpu_memory_utilization)
    kv_cache_sequences: int  # on CPU: full-context sequences an engine's KV cache holds (sized from the model)
    engine_slots: int  # chunks a vLLM server runs at once, shared among projects (0: one batch's window)
    plan_batches: bool  # whole-file scheduling of each batch (batch.schedule); off: requests in file order
    trainer: TrainerBackend
    max_lora_rank: int  # the engine's largest LoRA rank; fine-tunes above it are refused
    min_training_examples: int
    retrain_cron: str | None  # the retraining schedule (None: off)
    retrain_model: str | None  # the base model retraining fine-tunes (None: the default model)
    retrain_hyperparameters: dict  # JSON in VBATCH_RETRAIN_HYPERPARAMETERS, as the fine-tuning API takes
    retrain_min_gold_stars: int  # new gold stars since the last checkpoint that trigger a retrain
    deploy_gate: DeployGate  # how retrains deploy
    gate_metric: GateMetric
    judge_model: str | None  # an LLM judge for model_comparison (None: no judge)
    dagster_home: Path  # DAGSTER_HOME, default $VBATCH_HOME/dagster
    aris_database_url: str | None = None  # Aristotle's PostgreSQL (the aris extension's)
    extensions: tuple[str, ...] = ()  # VBATCH_EXTENSIONS: the installed extensions turned on (vbatch.extensions)
    review_schemas_dir: Path | None = None  # VBATCH_REVIEW_SCHEMAS_DIR: JSON review schemas (default home/...)
    retrain_eval_set: str | None = None  # a fixed eval set retrains are compared on (None: each job's own split)
    store: Path | None = None  # VBATCH_STORE: files every node shares (None: the home)
    broker_url: str | None = None  # VBATCH_BROKER_URL: cluster mode's Celery broker (redis://...)
    cluster_gpus: int = 1  # VBATCH_CLUSTER_GPUS: cluster mode's `gpu` pool limit, the GPUs of all nodes together
    # Retention and disk (issue 26): None keeps forever / never rotates
    file_retention_days: int | None = 30  # VBATCH_FILE_RETENTION_DAYS: batch input/output files that set no expiry
    run_retention_days: int | None = 30  # VBATCH_RUN_RETENTION_DAYS: finished Dagster runs and their event logs
    log_max_bytes: int | None = 100 * 1024 * 1024  # VBATCH_LOG_MAX_BYTES: service and engine logs rotate above it
    log_backups: int = 3  # VBATCH_LOG_BACKUPS: rotated copies kept of each log
    min_free_disk_percent: float = 5.0  # VBATCH_MIN_FREE_DISK_PERCENT: below it new batches and uploads get 507
    retention_cron: str | None = "15 4 * * *"  # VBATCH_RETENTION_CRON: the retention schedule (None: off)

    def layout(self):
        """The FileStore of these settings: this node's home and the (shared) store."""
        from resources.file_store import FileStore

        return FileStore.of(self.home, self.store)

    def paths(self):
        """The same layout without Dagster, for what needs only paths (`vbatch up`'s supervisor)."""
        from vbatch_pipelines.layout import StoreLayout

        return StoreLayout.of(self.home, self.store)



def _switchable(value: str | None) -> str | None:
    return None if value is None or is_off(value) else value


def _entries(variable: str, spec: str | None, form: str) -> Iterator[tuple[str, str, str]]:
    """The ``key=value`` entries of a comma-separated setting, as (entry, key, value), stripped; an entry
    without both sides is refused naming the variable and the form it takes."""
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise SettingsError(f"{variable} entry {item!r} is not of the form {form}")
        yield item, key, value


def _parse_models(spec: str | None) -> dict[str, str]:
    """``VBATCH_MODELS="name=path,name2=path2:embed"``: the base models vbatch may serve; a path may end in
    ``:embed`` (or ``:generate``) to say what the model does when its files do not (models/registry.py)."""
    return {name: path for _, name, path in _entries("VBATCH_MODELS", spec, "name=path")}


def _parse_engines(spec: str | None) -> tuple[tuple[str, str], ...]:
    """``VBATCH_ENGINES="model=http://host:port,model=http://host2:port"``: vLLM servers that run elsewhere (a
    Deployment behind a Service, another box); a model named twice has two replicas."""
    from urllib.parse import urlsplit

    engines, form = [], "model=http://host:port"
    for item, name, url in _entries("VBATCH_ENGINES", spec, form):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"VBATCH_ENGINES entry {item!r} is not of the form {form}")
        if (parts.path or "/") != "/" or parts.query or parts.username:
            raise SettingsError(f"VBATCH_ENGINES entry {item!r}: give the server's base URL (scheme, host, port) "
                                "without a path, query or credentials")
        engines.append((name, url.rstrip("/")))
    if len(set(engines)) != len(engines):
        raise SettingsError("VBATCH_ENGINES names the same model and URL twice")
    return tuple(engines)


TOOL_PARSER_NAME = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def _parse_tool_parsers(spec: str | None) -> dict[str, str]:
    """``VBATCH_TOOL_PARSERS="qwen2.5-7b=hermes,llama-3.1-8b=llama3_json"``: the vLLM tool parser that reads the
    calls a model writes itself (its family's syntax), so its managed engine serves ``tool_choice: "auto"``.
    A model not named forces calls only (named and "required"). The name is vLLM's ``--tool-call-parser``;
    vLLM says which it has if the engine does not start."""
    parsers: dict[str, str] = {}
    form = "model=parser (a vLLM --tool-call-parser name such as hermes, llama3_json, mistral)"
    for item, name, parser in _entries("VBATCH_TOOL_PARSERS", spec, form):
        if not TOOL_PARSER_NAME.fullmatch(parser):
            raise SettingsError(f"VBATCH_TOOL_PARSERS entry {item!r} is not of the form {form}")
        if name in parsers:
            raise SettingsError(f"VBATCH_TOOL_PARSERS names {name!r} twice")
        parsers[name] = parser
    return parsers


def _retrain_hyperparameters() -> dict:
    from vbatch_pipelines.fine_tuning import FineTuningError
    from vbatch_pipelines.fine_tuning.hyperparameters import parse_hyperparameters

    raw = _env("VBATCH_RETRAIN_HYPERPARAMETERS", "{}")
    try:
        value = json.loads(raw)
    except ValueError:
        raise SettingsError(f"VBATCH_RETRAIN_HYPERPARAMETERS={raw!r} is not JSON") from None
    if not isinstance(value, dict):
        raise SettingsError("VBATCH_RETRAIN_HYPERPARAMETERS takes a JSON object, as the fine-tuning API's "
                            "hyperparameters")
    try:
        parse_hyperparameters(value)
    except FineTuningError as exc:
        raise SettingsError(f"VBATCH_RETRAIN_HYPERPARAMETERS: {exc}") from None
    return value


def load_settings() -> Settings:
    from vbatch_pipelines.layout import StoreLayout

    home = Path(_env("VBATCH_HOME", ".vbatch")).expanduser().resolve()
    store = Path(_env("VBATCH_STORE")).expanduser().resolve() if _env("VBATCH_STORE") else None
    layout = StoreLayout.of(home, store)
    database_url = _env("VBATCH_DATABASE_URL") or f"sqlite:///{layout.database_path}"
    return Settings(
        home=home,
        database_url=database_url,
        dagster_database_url=_env("VBATCH_DAGSTER_DATABASE_URL"),
        engine_backend=_choice("VBATCH_ENGINE", "auto", EngineBackend),
        vllm_python=_env("VBATCH_VLLM_PYTHON"),
        envs_dir=Path(_env("VBATCH_ENVS_DIR", str(Path.home() / ".cache" / "vbatch" / "envs"))),
        default_model=_env("VBATCH_DEFAULT_MODEL"),
        models=_parse_models(_env("VBATCH_MODELS")),
        engines=_parse_engines(_env("VBATCH_ENGINES")),
        engines_api_key=_env("VBATCH_ENGINES_API_KEY"),
        tool_parsers=_parse_tool_parsers(_env("VBATCH_TOOL_PARSERS")),
        node=_env("VBATCH_NODE") or socket.gethostname().split(".")[0],
        engine_host=_env("VBATCH_ENGINE_HOST", "127.0.0.1"),
        gpus=gpu_count(),
        inference_runs=_int("VBATCH_INFERENCE_RUNS", 8, minimum=1),
        k8s_run_gpus=_int("VBATCH_K8S_RUN_GPUS", 0, minimum=0),
        gpu_hour_cost=_float("VBATCH_GPU_HOUR_COST", None, 0.0, 1_000_000.0),
        dagster_url=_env("VBATCH_DAGSTER_URL", "http://127.0.0.1:3000"),
        api_keys=_list("VBATCH_API_KEYS"),
        admin_keys=_list("VBATCH_ADMIN_KEYS"),
        allowed_hosts=tuple(host.lower() for host in _list("VBATCH_ALLOWED_HOSTS")),
        forwarded_allow_ips=_env("VBATCH_FORWARDED_ALLOW_IPS", "127.0.0.1"),
        model_sources=tuple(Path(p).expanduser().resolve() for p in _list("VBATCH_MODEL_SOURCES"))
        or (layout.models_dir,),
        allow_remote_code=_switch("VBATCH_ALLOW_REMOTE_CODE", False),
        api_port=_int("VBATCH_API_PORT", 4080, minimum=1),
        api_workers=_int("VBATCH_API_WORKERS", 0, minimum=0),
        max_upload_bytes=_int("VBATCH_MAX_UPLOAD_BYTES", 512 * 1024 * 1024, minimum=1),
        max_request_bytes=_int("VBATCH_MAX_REQUEST_BYTES", 32 * 1024 * 1024, minimum=1024),
        inline_validation_bytes=_int("VBATCH_INLINE_VALIDATION_BYTES", 8 * 1024 * 1024, minimum=0),
        curation=not is_off(_env("VBATCH_CURATION", "on")),
        label_studio_url=_env("VBATCH_LABEL_STUDIO_URL"),
        label_studio_token=_env("VBATCH_LABEL_STUDIO_TOKEN"),
        label_studio_port=_int("VBATCH_LABEL_STUDIO_PORT", 4115, minimum=1),
        label_studio_database_url=_env("VBATCH_LABEL_STUDIO_DATABASE_URL"),
        webhook_secret=_env("VBATCH_WEBHOOK_SECRET"),
        max_model_len=_int("VBATCH_MAX_MODEL_LEN", None, minimum=16),
        gpu_memory_fraction=_float("VBATCH_GPU_MEMORY_UTILIZATION", 0.9, 0.0, 1.0),
        kv_cache_sequences=_int("VBATCH_KV_CACHE_SEQUENCES", 16, minimum=1),
        engine_slots=_int("VBATCH_ENGINE_SLOTS", 0, minimum=0),
        plan_batches=_switch("VBATCH_PLAN_BATCHES", True),
        trainer=_choice("VBATCH_TRAINER", "auto", TrainerBackend),
        max_lora_rank=_int("VBATCH_MAX_LORA_RANK", 16, minimum=1),
        min_training_examples=_int("VBATCH_MIN_TRAINING_EXAMPLES", 10, minimum=1),
        retrain_cron=_switchable(_env("VBATCH_RETRAIN_CRON", "0 3 * * *")),
        retrain_model=_env("VBATCH_RETRAIN_MODEL"),
        retrain_hyperparameters=_retrain_hyperparameters(),
        retrain_min_gold_stars=_int("VBATCH_RETRAIN_MIN_GOLD_STARS", 100, minimum=1),
        deploy_gate=_choice("VBATCH_DEPLOY_GATE", "no_worse", DeployGate),
        gate_metric=_choice("VBATCH_GATE_METRIC", "normalized_match", GateMetric),
        judge_model=_env("VBATCH_JUDGE_MODEL"),
        retrain_eval_set=_env("VBATCH_RETRAIN_EVAL_SET"),
        dagster_home=Path(_env("DAGSTER_HOME") or layout.dagster_dir),
        aris_database_url=_postgres_url("VBATCH_ARIS_DATABASE_URL"),
        extensions=_extensions(),
        review_schemas_dir=Path(_env("VBATCH_REVIEW_SCHEMAS_DIR") or home / "review-schemas").expanduser(),
        store=store,
        broker_url=_broker_url("VBATCH_BROKER_URL"),
        cluster_gpus=_int("VBATCH_CLUSTER_GPUS", 1, minimum=1),
        **_retention_settings(),
    )


def _keep_limit(name: str, default: int) -> int | None:
    """A retention limit: a positive integer, or 0 / off for none (keep everything)."""
    raw = _env(name)
    if raw is not None and is_off(raw):
        return None
    return _int(name, default, minimum=0) or None


def _retention_settings() -> dict[str, Any]:
    """Retention and disk (issue 26): how long files and runs are kept, log rotation, the free-space floor."""
    percent = _env("VBATCH_MIN_FREE_DISK_PERCENT")
    try:
        min_free = 5.0 if percent is None else 0.0 if is_off(percent) else float(percent)
    except ValueError:
        raise SettingsError(f"VBATCH_MIN_FREE_DISK_PERCENT={percent!r} is not a number") from None
    if not 0 <= min_free < 100:
        raise SettingsError(f"VBATCH_MIN_FREE_DISK_PERCENT={percent} is out of range; it takes a percentage "
                            "from 0 (off) to below 100")
    log_max_bytes = _keep_limit("VBATCH_LOG_MAX_BYTES", 100 * 1024 * 1024)
    if log_max_bytes is not None and log_max_bytes < 4096:
        raise SettingsError(f"VBATCH_LOG_MAX_BYTES={log_max_bytes} is too small; it takes at least 4096 bytes, "
                            "or 0 / off for no rotation")
    return {"file_retention_days": _keep_limit("VBATCH_FILE_RETENTION_DAYS", 30),
            "run_retention_days": _keep_limit("VBATCH_RUN_RETENTION_DAYS", 30),
            "log_max_bytes": log_max_bytes, "log_backups": _int("VBATCH_LOG_BACKUPS", 3, minimum=1),
            "min_free_disk_percent": min_free,
            "retention_cron": _switchable(_env("VBATCH_RETENTION_CRON", "15 4 * * *"))}


def _list(name: str) -> tuple[str, ...]:
    """A comma-separated setting, blanks dropped."""
    return tuple(item.strip() for item in (_env(name) or "").split(",") if item.strip())


def _extensions() -> tuple[str, ...]:
    """VBATCH_EXTENSIONS: the extensions to turn on (``off``: none). Unset, Aris is on when its database is set,
    as it was before extensions were plugins."""
    raw = _env("VBATCH_EXTENSIONS")
    if raw is None:
        return ("aris",) if _env("VBATCH_ARIS_DATABASE_URL") else ()
    return () if is_off(raw) else _names("VBATCH_EXTENSIONS")


def _names(name: str) -> tuple[str, ...]:
    """A comma-separated list of names (each ``^[a-z][a-z0-9_-]{0,63}$``), in order, once each."""
    import re

    names = tuple(dict.fromkeys(_list(name)))
    bad = [n for n in names if not re.match(r"^[a-z][a-z0-9_-]{0,63}$", n)]
    if bad:
        raise SettingsError(f"{name} takes comma-separated extension names (lower-case letters, digits, - and _); "
                            f"got {', '.join(map(repr, bad))}")
    return names


def _broker_url(name: str) -> str | None:
    """Cluster mode's broker: Redis (the transport the workers' prefetch-free scheduling needs)."""
    value = _env(name)
    if value is not None and value.split("://", 1)[0] not in ("redis", "rediss"):
        raise SettingsError(f"{name} takes a Redis URL (redis://[:password@]host:port/db or rediss://...)")
    return value


def _postgres_url(name: str) -> str | None:
    value = _env(name)
    if value is not None and value.split("://", 1)[0].split("+", 1)[0] not in ("postgresql", "postgres"):
        raise SettingsError(f"{name} takes a PostgreSQL URL (postgresql://user:password@host:port/db)")
    return value
