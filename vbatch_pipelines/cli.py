"""The ``vbatch`` command line."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from vbatch_pipelines.net import wait_http
from vbatch_pipelines.settings import Settings, load_settings


def _resources(settings: Settings):
    from vbatch_pipelines.definitions import build_resources

    return build_resources(settings)


# -- models ---------------------------------------------------------------------------------------


def cmd_models_create_tiny(args, settings: Settings) -> int:
    from vbatch_pipelines.models.tiny import create_tiny_model

    started = time.monotonic()
    path = create_tiny_model(args.path, seed=args.seed, train_steps=args.train_steps)
    print(f"Tiny chat model written to {path} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_models_list(args, settings: Settings) -> int:
    from vbatch_pipelines.models.registry import default_model_id, served_models

    default = default_model_id(settings)
    for spec in served_models(settings).values():
        marker = "\t(default)" if spec.id == default else ""
        print(f"{spec.id}\t{spec.adapter or spec.path}" + (f"\tLoRA on {spec.parent}" if spec.parent else "") + marker)
    return 0


def cmd_models_install(args, settings: Settings) -> int:
    """Check, record, then install in this process (materializing installed_model, seen in Dagster)."""
    from dagster import DagsterInstance, materialize

    from vbatch_pipelines.assets.models import installed_model
    from vbatch_pipelines.models.install import InstallError
    from vbatch_pipelines.models.store import request_install

    db = _resources(settings)["metadata_db"].db
    try:
        row = request_install(db, settings, args.source, model_id=args.id, revision=args.revision,
                              trust_remote_code=args.trust_remote_code)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    fit = row.details["fit"]
    print(f"{row.id}: fits ({fit['weight_bytes'] / 2**30:.2f} GiB weights + {fit['kv_cache_bytes'] / 2**30:.2f} GiB "
          f"KV cache of {fit['available_bytes'] / 2**30:.1f} GiB {fit['device']}); installing ...", flush=True)
    settings.dagster_home.mkdir(parents=True, exist_ok=True)
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions("models", [row.id])
        result = materialize([installed_model], partition_key=row.id, instance=instance,
                             resources=_resources(settings), raise_on_error=False)
    print(f"{row.id}: {'ready' if result.success else 'failed (see the run log above)'}")
    return 0 if result.success else 1


def cmd_models_delete(args, settings: Settings) -> int:
    from vbatch_pipelines.models.registry import ModelNotFound
    from vbatch_pipelines.models.store import ModelStoreError, remove_model

    resources = _resources(settings)
    try:
        row = remove_model(resources["metadata_db"].db, settings, resources["inference_engine"], args.model)
    except (ModelNotFound, ModelStoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{row.id}: {row.status}")
    return 0


# -- trainer --------------------------------------------------------------------------------------


def cmd_trainer_install(args, settings: Settings) -> int:
    from vbatch_pipelines.fine_tuning.envs import install_unsloth_env

    if not settings.gpus:
        print("No GPU here: fine-tunes run on TRL + PEFT in this environment (nothing to install). Unsloth "
              "needs a CUDA GPU.")
        return 0
    print(install_unsloth_env(settings.envs_dir))
    return 0


def cmd_trainer_status(args, settings: Settings) -> int:
    trainer = _resources(settings)["trainer"]
    backend = trainer.resolved_backend()
    try:
        python = trainer.training_python(backend)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        python = f"not available: {exc}"
    print(f"trainer: {backend} (configured: {trainer.backend}, GPUs: {trainer.gpus})\npython: {python}")
    return 0


# -- engine ---------------------------------------------------------------------------------------


def cmd_engine_install(args, settings: Settings) -> int:
    from vbatch_pipelines.engine.envs import install_vllm_env

    print(install_vllm_env(settings))
    return 0


def _engine_for(settings: Settings, model_name: str | None):
    from vbatch_pipelines.models.registry import lookup_model, prepare_model

    engine = _resources(settings)["inference_engine"]
    return engine, prepare_model(settings, lookup_model(settings, model_name))


def cmd_engine_start(args, settings: Settings) -> int:
    engine, model = _engine_for(settings, args.model)
    if engine.resolved_backend() != "vllm":
        print("No vLLM available: batches run on the in-process transformers engine (nothing to start).")
        return 0
    started = time.monotonic()
    url = engine.server(model).ensure()
    print(f"{model.id} served by vLLM at {url} (ready in {time.monotonic() - started:.1f}s)")
    return 0


def cmd_label_studio_install(args, settings: Settings) -> int:
    from vbatch_pipelines.curation.server import install_label_studio

    install_label_studio(settings)
    return 0


def cmd_label_studio_start(args, settings: Settings) -> int:
    from vbatch_pipelines.curation.server import connection

    started = time.monotonic()
    print(f"Label Studio at {connection(settings, start=True).url} (ready in {time.monotonic() - started:.1f}s)")
    return cmd_label_studio_status(args, settings)


def cmd_label_studio_stop(args, settings: Settings) -> int:
    from vbatch_pipelines.curation.server import ManagedLabelStudio

    print("stopped" if ManagedLabelStudio(settings).stop() else "was not running")
    return 0


def cmd_label_studio_status(args, settings: Settings) -> int:
    from vbatch_pipelines.curation.server import ManagedLabelStudio, connection, credentials

    if settings.label_studio_url:
        print(f"external Label Studio {settings.label_studio_url}")
        return 0
    server = ManagedLabelStudio(settings)
    creds = credentials(settings)
    print(f"{connection(settings).url}\t{'healthy' if server.healthy() else 'down'}\t"
          f"login {creds['username']} / {creds['password']}\tdata {settings.label_studio_dir}")
    return 0


def _start_curation(settings: Settings, api_url: str) -> str:
    """Label Studio for `up`: started when curation is on and it is installed; webhooks to the API."""
    from vbatch_pipelines.curation.server import ManagedLabelStudio, credentials, label_studio_resource

    resource = label_studio_resource(settings)
    if not resource.enabled:
        return f"off: {resource.disabled_reason}"
    try:
        resource.ensure_running()
        resource.ensure_webhook(f"{api_url}/v1/webhooks/label-studio", resource.webhook_secret)
    except Exception as exc:  # noqa: BLE001 - the platform stays up; curation_tasks retries
        return f"failed to start: {exc}"
    login = "" if settings.label_studio_url else f" (login {credentials(settings)['username']}, " \
        f"password in {ManagedLabelStudio(settings).state_dir / 'credentials.json'})"
    return resource.url + login


def _managed_servers(settings: Settings):
    return _resources(settings)["inference_engine"].running_servers()


def cmd_engine_stop(args, settings: Settings) -> int:
    for server in _managed_servers(settings):
        if args.model in (None, server.model.id):
            print(f"{server.model.id}: {'stopped' if server.stop() else 'was not running'}")
    return 0


def cmd_engine_status(args, settings: Settings) -> int:
    engine = _resources(settings)["inference_engine"]
    print(f"backend: {engine.resolved_backend()} (configured: {engine.backend})")
    for server in _managed_servers(settings):
        state = server.state() or {}
        health = "healthy" if server.healthy(state) else "down"
        print(f"{server.model.id}\tpid {state.get('pid')}\t{server.url_of(state)}\t{health}")
    return 0


# -- db and batches -------------------------------------------------------------------------------


def cmd_db_upgrade(args, settings: Settings) -> int:
    from vbatch_pipelines.store.db import Database

    Database(settings.database_url).upgrade()
    print(f"Metadata DB at {settings.database_url} is up to date")
    return 0


def cmd_batch_submit(args, settings: Settings) -> int:
    from vbatch_pipelines.batch.service import create_batch, get_batch, is_terminal, store_file
    from vbatch_pipelines.launch import DagsterUnreachable, launch_batch

    db = _resources(settings)["metadata_db"].db
    with open(args.file, "rb") as source:
        stored = store_file(db, settings.files_dir, source, Path(args.file).name, "batch")
    batch = create_batch(db, input_file_id=stored.id, endpoint=args.endpoint)
    try:
        run_id = launch_batch(db, batch.id, settings.dagster_url)
        print(f"{batch.id}: launched Dagster run {run_id}")
    except DagsterUnreachable as exc:
        print(f"{batch.id}: recorded; {exc}; the batch_launch_sensor will launch it", file=sys.stderr)
    if not args.wait:
        print(batch.id)
        return 0
    while not is_terminal((batch := get_batch(db, batch.id)).status):
        time.sleep(1)
    print(json.dumps(batch.to_openai(), indent=2))
    return 0 if batch.status == "completed" else 1


def cmd_batch_show(args, settings: Settings) -> int:
    from vbatch_pipelines.batch.service import get_batch

    batch = get_batch(_resources(settings)["metadata_db"].db, args.batch_id)
    if batch is None:
        print(f"No batch {args.batch_id}", file=sys.stderr)
        return 1
    print(json.dumps(batch.to_openai(), indent=2))
    return 0


# -- up -------------------------------------------------------------------------------------------


def _spawn(argv: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """A child in its own session with default signal handlers, so it can be stopped cleanly."""
    log = open(log_path, "ab")

    def restore_signals() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=restore_signals)


def _stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    from vbatch_pipelines.detached import kill_group

    kill_group(process.pid, timeout)
    process.wait()


def prepare_platform(settings: Settings) -> dict:
    """Everything `up` needs before processes start: DB schema, Dagster home, gpu pool, default model."""
    from dagster import DagsterInstance

    from vbatch_pipelines.instance import prepare_dagster_home, set_gpu_pool
    from vbatch_pipelines.models.registry import lookup_model, prepare_model
    from vbatch_pipelines.store.db import Database

    settings.home.mkdir(parents=True, exist_ok=True)
    Database(settings.database_url).upgrade()
    dagster_home = prepare_dagster_home(settings)
    env = dict(os.environ, DAGSTER_HOME=str(dagster_home), VBATCH_HOME=str(settings.home))
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    with DagsterInstance.get() as instance:
        set_gpu_pool(instance, settings)
    prepare_model(settings, lookup_model(settings, None))
    return env


def _api_workers(settings: Settings) -> int:
    """Two API processes use both cores of a small box for polling clients; with the transformers
    engine each process would hold its own copy of the model, so one."""
    if settings.api_workers:
        return settings.api_workers
    backend = _resources(settings)["inference_engine"].resolved_backend()
    return 2 if (os.cpu_count() or 1) >= 2 and backend == "vllm" else 1


def cmd_up(args, settings: Settings) -> int:
    from vbatch_pipelines.instance import WORKSPACE_YAML

    env = prepare_platform(settings)
    dagster_url = f"http://{args.host}:{args.dagster_port}"
    api_port = args.api_port or settings.api_port
    api_url = f"http://{args.host}:{api_port}"
    env["VBATCH_DAGSTER_URL"] = dagster_url
    logs = settings.home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    processes = {
        "dagster-webserver": _spawn([str(bin_dir / "dagster-webserver"), "-h", args.host, "-p", str(args.dagster_port),
                                     "-w", str(WORKSPACE_YAML)], env, logs / "dagster-webserver.log"),
        "dagster-daemon": _spawn([str(bin_dir / "dagster-daemon"), "run", "-w", str(WORKSPACE_YAML)], env,
                                 logs / "dagster-daemon.log"),
        "api": _spawn([sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", args.host,
                       "--port", str(api_port), "--workers", str(_api_workers(settings)), "--log-level", "warning"],
                      env, logs / "api.log"),
    }
    stopping = threading.Event()

    def shutdown(signum=None, frame=None) -> None:
        stopping.set()

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)

    engine_note = "transformers (in-process, per run)"
    if not args.no_engine:
        engine, model = _engine_for(settings, None)
        if engine.resolved_backend() == "vllm":
            print(f"Warming vLLM for {model.id} ...", flush=True)
            try:
                engine_note = f"vLLM {engine.server(model).ensure()} ({model.id})"
            except Exception as exc:  # noqa: BLE001 - keep the platform up; batches retry the engine
                engine_note = f"vLLM failed to start: {exc}"
    api_ready = wait_http(f"{api_url}/health", 60)
    curation_note = _start_curation(settings, api_url) if api_ready else "off: the API did not start"
    ready = wait_http(f"{dagster_url}/server_info", 120)
    print(f"vbatch is up (home {settings.home})\n"
          f"  OpenAI API   {api_url}/v1{'' if api_ready else '  (not answering yet; see logs)'}  (docs {api_url}/docs)\n"
          f"  Dagster UI   {dagster_url}{'' if ready else '  (not answering yet; see logs)'}\n"
          f"  engine       {engine_note}\n"
          f"  Label Studio {curation_note}\n"
          f"  logs         {logs}\n"
          "Ctrl-C stops everything.", flush=True)
    try:
        while not stopping.is_set():
            for name, process in processes.items():
                if process.poll() is not None:
                    print(f"{name} exited with code {process.returncode}; see {logs / (name + '.log')}",
                          file=sys.stderr)
                    stopping.set()
            stopping.wait(1.0)
    finally:
        print("Stopping vbatch ...", flush=True)
        for process in processes.values():
            _stop_process_group(process)
        for server in _managed_servers(settings):
            server.stop()
        if not settings.label_studio_url:
            from vbatch_pipelines.curation.server import ManagedLabelStudio

            ManagedLabelStudio(settings).stop()
        print("Stopped.", flush=True)
    return 0


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the API, Dagster (webserver, daemon) and the engine")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--api-port", type=int, default=None, help="default VBATCH_API_PORT or 4080")
    up.add_argument("--dagster-port", type=int, default=int(os.environ.get("VBATCH_DAGSTER_PORT", 3000)))
    up.add_argument("--no-engine", action="store_true", help="do not warm the engine at start")
    up.set_defaults(func=cmd_up)

    models = sub.add_parser("models", help="models vbatch serves").add_subparsers(dest="models", required=True)
    tiny = models.add_parser("create-tiny", help="build the tiny local Llama chat model")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--train-steps", type=int, default=300)
    tiny.set_defaults(func=cmd_models_create_tiny)
    models.add_parser("list", help="served models (base and deployed fine-tunes)").set_defaults(func=cmd_models_list)
    install = models.add_parser("install", help="install a base model from the Hugging Face hub or a directory")
    install.add_argument("source", help="a hub repo id (owner/name; HF_TOKEN, HF_ENDPOINT honoured) or a path")
    install.add_argument("--id", help="the name requests will use (default: the repo id or directory name)")
    install.add_argument("--revision", help="branch, tag or commit (pinned to its commit)")
    install.add_argument("--trust-remote-code", action="store_true",
                         help="allow the repository's own modelling code (off unless you say so)")
    install.set_defaults(func=cmd_models_install)
    delete = models.add_parser("delete", help="remove an installed model or undeploy a fine-tune")
    delete.add_argument("model")
    delete.set_defaults(func=cmd_models_delete)

    engine = sub.add_parser("engine", help="the inference engine").add_subparsers(dest="engine", required=True)
    engine.add_parser("install", help="create vLLM's own virtualenv").set_defaults(func=cmd_engine_install)
    for name, func, text in (("start", cmd_engine_start, "start (or find) the warm server for a model"),
                             ("stop", cmd_engine_stop, "stop managed servers"),
                             ("status", cmd_engine_status, "show managed servers")):
        command = engine.add_parser(name, help=text)
        if name != "status":
            command.add_argument("--model", default=None)
        command.set_defaults(func=func)

    studio = sub.add_parser("label-studio", help="the Label Studio vbatch runs for curation").add_subparsers(
        dest="label_studio", required=True)
    for name, func, text in (("install", cmd_label_studio_install, "create Label Studio's own virtualenv"),
                             ("start", cmd_label_studio_start, "start it (or find it running)"),
                             ("stop", cmd_label_studio_stop, "stop it"),
                             ("status", cmd_label_studio_status, "show where it runs and how to log in")):
        studio.add_parser(name, help=text).set_defaults(func=func)

    trainer = sub.add_parser("trainer", help="the fine-tuning trainer").add_subparsers(dest="trainer", required=True)
    trainer.add_parser("install", help="create Unsloth's own virtualenv (CUDA machines)").set_defaults(
        func=cmd_trainer_install)
    trainer.add_parser("status", help="which trainer fine-tunes run on").set_defaults(func=cmd_trainer_status)

    db = sub.add_parser("db", help="the metadata DB").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)

    batch = sub.add_parser("batch", help="batches").add_subparsers(dest="batch", required=True)
    submit = batch.add_parser("submit", help="upload a JSONL file and launch its batch")
    submit.add_argument("file")
    submit.add_argument("--endpoint", default="/v1/chat/completions")
    submit.add_argument("--wait", action="store_true", help="wait for the batch to end and print it")
    submit.set_defaults(func=cmd_batch_submit)
    show = batch.add_parser("show", help="print a batch object")
    show.add_argument("batch_id")
    show.set_defaults(func=cmd_batch_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args, load_settings())


if __name__ == "__main__":
    sys.exit(main())
