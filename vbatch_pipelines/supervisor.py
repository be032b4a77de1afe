"""`vbatch up`: prepare the platform, start its processes (Dagster webserver and daemon, the API), warm the
engine and Label Studio, supervise them, and stop every one of them — and the engines and Label Studio
it started — on Ctrl-C, SIGTERM or when one of them dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vbatch_pipelines.child_env import without_api_keys
from vbatch_pipelines.names import MAX_BATCHES_PER_RUN
from vbatch_pipelines.net import wait_http
from vbatch_pipelines.services import ServiceRecord, ServiceRegistry, die_with_parent, process_identity
from vbatch_pipelines.settings import Settings

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


class ExposureError(ValueError):
    """`up` was asked to listen beyond this machine without what makes that safe."""


def _reachable(host: str) -> str:
    """The address a local client uses for a server listening on ``host``."""
    if host in ("0.0.0.0", "::", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class Addresses:
    host: str  # where the API listens
    api_port: int
    dagster_port: int
    expose_dagster: bool = False  # the Dagster UI has no authentication: beyond loopback only when asked

    @property
    def dagster_host(self) -> str:
        return self.host if self.expose_dagster else "127.0.0.1"

    @property
    def api_url(self) -> str:
        return f"http://{_reachable(self.host)}:{self.api_port}"

    @property
    def dagster_url(self) -> str:
        return f"http://{_reachable(self.dagster_host)}:{self.dagster_port}"

    @property
    def exposed(self) -> bool:
        return self.host not in LOOPBACK_HOSTS

    def check(self, settings: Settings) -> list[str]:
        """Refuse an API on the network without keys; return what the start-up banner must say about it."""
        if not self.exposed:
            return []
        if not settings.api_keys and not settings.admin_keys:
            raise ExposureError(f"--host {self.host} would let anyone who can reach this machine use vbatch: set "
                                "VBATCH_API_KEYS (and VBATCH_ADMIN_KEYS) first, or keep the default 127.0.0.1")
        if self.expose_dagster:
            return [f"The Dagster UI listens on {self.host} without authentication (--expose-dagster): "
                    "put it behind an authenticating proxy"]
        return [f"The API listens on {self.host}; the Dagster UI stays on 127.0.0.1 (it has no authentication; "
                "--expose-dagster serves it on the network)"]


def spawn(argv: list[str], env: dict, log_path: Path) -> subprocess.Popen:
    """A child in its own session (stopped as a group) with default signal handlers, which gets SIGTERM if
    `vbatch up` dies, even by ``kill -9``."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child's for its life

    def prepare_child() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        die_with_parent(signal.SIGTERM)

    try:
        return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, preexec_fn=prepare_child)
    finally:
        log.close()


class Service:
    """One supervised process: restarted with back-off when it dies, each restart logged and counted."""

    max_backoff_s = 60.0
    stable_after_s = 60.0  # a run this long resets the back-off

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path, port: int | None = None):
        self.name, self.argv, self.env, self.log_path, self.port = name, argv, env, log_path, port
        self.process: subprocess.Popen | None = None
        self.record: ServiceRecord | None = None
        self.restarts = 0
        self.failures_in_row = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.process = spawn(self.argv, self.env, self.log_path)
        identity = process_identity(self.process.pid)
        self.record = ServiceRecord(self.name, self.process.pid, identity[0] if identity else time.time(),
                                    identity[1] if identity else self.argv, self.port, self.restarts)

    def supervise(self, log) -> bool:
        """Look after the process once; True when the record changed (started, exited, restarted)."""
        now = time.monotonic()
        if self.restart_at is not None:
            if now < self.restart_at:
                return False
            self.restart_at = None
            self.restarts += 1
            self.start()
            log(f"{self.name} restarted (restart {self.restarts}, pid {self.process.pid})")
            return True
        if self.process is None or self.process.poll() is None:
            return False
        lived = time.time() - (self.record.since if self.record else time.time())
        self.failures_in_row = 0 if lived >= self.stable_after_s else self.failures_in_row + 1
        delay = min(self.max_backoff_s, 2.0 ** self.failures_in_row) if self.failures_in_row else 1.0
        log(f"{self.name} exited with code {self.process.returncode} after {lived:.0f}s; restarting in "
            f"{delay:.0f}s (see {self.log_path})")
        self.restart_at = now + delay
        return True

    def stop(self) -> None:
        if self.process is not None:
            stop_process_group(self.process)


def supervise(title: str, registry: ServiceRegistry, owner: dict, services: dict[str, Service], resources: dict,
              ready: Callable[[], None], stop_detached: Callable[[], None] = lambda: None) -> None:
    """Start ``services``, record them, call ``ready`` (the banner), then restart what dies (with back-off, each
    change recorded) until Ctrl-C or SIGTERM; stop the services, the engines of this home and ``stop_detached``.
    `vbatch up` and `vbatch worker` both run this."""
    stopping = threading.Event()

    def shutdown(signum=None, frame=None) -> None:
        stopping.set()

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    owner = {"pid": os.getpid(), "started": (process_identity(os.getpid()) or (time.time(),))[0], **owner}

    def record() -> None:
        registry.write(owner, {name: service.record for name, service in services.items()
                               if service.record is not None})

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    try:
        for service in services.values():
            service.start()
        record()
        ready()
        while not stopping.is_set():
            if any([service.supervise(log) for service in services.values()]):
                record()
            stopping.wait(1.0)
    finally:
        print(f"Stopping {title} ...", flush=True)
        for service in services.values():
            service.stop()
        for server in resources["inference_engine"].running_servers():
            server.stop()
        stop_detached()
        print("Stopped.", flush=True)


def stop_process_group(process: subprocess.Popen, timeout: float = 15.0) -> None:
    from vbatch_pipelines.detached import kill_group

    kill_group(process.pid, timeout)
    process.wait()


EVENT_BATCH_SIZE = 3 * MAX_BATCHES_PER_RUN  # a run's planned events: up to three steps per batch


def instance_env(settings: Settings, *, cluster: bool = False) -> dict:
    """Write this node's dagster.yaml; the environment its processes open the instance with (also set here)."""
    from vbatch_pipelines.cluster.config import cluster_env
    from vbatch_pipelines.instance import prepare_dagster_home

    settings.home.mkdir(parents=True, exist_ok=True)
    dagster_home = prepare_dagster_home(settings, cluster=cluster)
    extra = {"DAGSTER_HOME": str(dagster_home), "VBATCH_HOME": str(settings.home),
             **(cluster_env(settings) if cluster else {})}
    os.environ.update(extra)
    # Dagster's event batching (off unless set): a run over many batches writes each step's planned events
    # and materializations in one go (see dagster_storage.SqliteEventLogStorage.store_event_batch).
    return {"DAGSTER_EVENT_BATCH_SIZE": str(EVENT_BATCH_SIZE), **os.environ, **extra}


def prepare_platform(settings: Settings, resources: dict, *, cluster: bool = False) -> dict:
    """Everything `up` needs before processes start: DB schema, Dagster home, gpu pool, default model.
    Returns the environment the processes run with."""
    from dagster import DagsterInstance

    from vbatch_pipelines.instance import set_pools

    env = instance_env(settings, cluster=cluster)
    resources["metadata_db"].db.upgrade()
    with DagsterInstance.get() as instance:  # in cluster mode the pools' limits hold for every node
        set_pools(instance, settings.cluster_gpus if cluster else settings.gpus, settings.inference_runs)
    resources["model_registry"].resolve(None)
    return env


def api_workers(settings: Settings, resources: dict) -> int:
    """Two API processes use both cores of a small box for polling clients; with the transformers
    engine each process would hold its own copy of the model, so one."""
    if settings.api_workers:
        return settings.api_workers
    backend = resources["inference_engine"].resolved_backend()
    return 2 if (os.cpu_count() or 1) >= 2 and backend == "vllm" else 1


def start_curation(settings: Settings, resources: dict, api_url: str) -> str:
    """Label Studio for `up`: started when curation is on and it is installed; webhooks to the API."""
    label_studio = resources["label_studio"]
    if not label_studio.enabled:
        return f"off: {label_studio.disabled_reason}"
    try:
        label_studio.ensure_running()
        label_studio.ensure_webhook(f"{api_url}/v1/webhooks/label-studio", label_studio.shared_webhook_secret())
    except Exception as exc:  # noqa: BLE001 - the platform stays up; curation_tasks retries
        return f"failed to start: {exc}"
    server = label_studio.server()
    if server is None:
        return label_studio.url
    return f"{label_studio.url} (login {server.credentials()['username']}, password in " \
           f"{server.state_dir / 'credentials.json'})"


def warm_engine(resources: dict) -> str:
    """Start the default model's vLLM server now, so the first batch finds it warm."""
    engine = resources["inference_engine"]
    if engine.resolved_backend() != "vllm":
        return "transformers (in-process, per run)"
    model = resources["model_registry"].resolve(None)
    print(f"Warming vLLM for {model.id} ...", flush=True)
    urls = []
    for server in engine.replica_servers(model):  # this node's started; external ones checked
        try:
            urls.append(server.ensure())
        except Exception as exc:  # noqa: BLE001 - keep the platform up; batches retry the engine
            urls.append(f"failed: {exc}")
    return f"vLLM {', '.join(urls)} ({model.id})"


def broker_address(url: str) -> str:
    """The broker URL without its credentials, for banners and logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def cluster_note(settings: Settings) -> str:
    from vbatch_pipelines.cluster.config import DEFAULT_QUEUE, GPU_QUEUE

    return (f"cluster mode: runs go to `vbatch worker` nodes through {broker_address(settings.broker_url)} (queues "
            f"{DEFAULT_QUEUE}, {GPU_QUEUE}, node.<name>); files in {settings.layout().shared}")


def run_platform(settings: Settings, resources: dict, addresses: Addresses, *, warm: bool = True,
                 cluster: bool = False) -> int:
    """`vbatch up`. In cluster mode (``cluster``) the same services run, but Dagster hands runs to the nodes'
    Celery workers (`vbatch worker`) instead of starting them here."""
    from vbatch_pipelines.cluster.config import check_broker, check_cluster
    from vbatch_pipelines.instance import WORKSPACE_YAML

    if cluster:
        check_cluster(settings, "vbatch up --mode cluster")  # ClusterConfigError, before anything starts
        check_broker(settings.broker_url)
        exposure = addresses.check(settings) + [cluster_note(settings)]
    else:
        exposure = addresses.check(settings)  # before anything starts
    file_store = resources["file_store"]
    registry = ServiceRegistry(file_store.run_dir)
    registry.acquire()  # AlreadyUp when another `up` owns this home
    try:
        stale = registry.stop_stale()
        if stale:
            print(f"Stopped what a previous `vbatch up` left running: {', '.join(stale)}", flush=True)
        return _run(settings, resources, addresses, registry, exposure, warm, WORKSPACE_YAML, cluster)
    finally:
        registry.release()


def _run(settings: Settings, resources: dict, addresses: Addresses, registry: ServiceRegistry,
         exposure: list[str], warm: bool, workspace: Path, cluster: bool) -> int:
    env = prepare_platform(settings, resources, cluster=cluster)
    env["VBATCH_DAGSTER_URL"] = addresses.dagster_url
    logs = resources["file_store"].logs_dir
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    dagster_env = without_api_keys(env)  # runs need the databases' and Label Studio's secrets, not the API's keys
    services = {service.name: service for service in (
        Service("dagster-webserver", [str(bin_dir / "dagster-webserver"), "-h", addresses.dagster_host,
                                      "-p", str(addresses.dagster_port), "-w", str(workspace)], dagster_env,
                logs / "dagster-webserver.log", addresses.dagster_port),
        Service("dagster-daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)], dagster_env,
                logs / "dagster-daemon.log"),
        Service("api", [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", addresses.host,
                        "--port", str(addresses.api_port), "--workers", str(api_workers(settings, resources)),
                        "--log-level", "warning"], env, logs / "api.log", addresses.api_port),
    )}
    owner = {"api_url": addresses.api_url, "dagster_url": addresses.dagster_url, "home": str(settings.home),
             "mode": "cluster" if cluster else "single"}

    def ready() -> None:
        engine_note = warm_engine(resources) if warm else "transformers (in-process, per run)"
        api_ready = wait_http(f"{addresses.api_url}/health", 60)
        curation_note = start_curation(settings, resources, addresses.api_url) if api_ready else \
            "off: the API did not start"
        ready = wait_http(f"{addresses.dagster_url}/server_info", 120)
        print(f"vbatch is up (home {settings.home})\n"
              f"  OpenAI API   {addresses.api_url}/v1{'' if api_ready else '  (not answering yet; see logs)'}"
              f"  (docs {addresses.api_url}/docs)\n"
              f"  Dagster UI   {addresses.dagster_url}{'' if ready else '  (not answering yet; see logs)'}\n"
              f"  engine       {engine_note}\n"
              f"  Label Studio {curation_note}\n"
              f"  logs         {logs}\n"
              + "".join(f"  note         {note}\n" for note in exposure)
              + "Ctrl-C stops everything.", flush=True)

    def stop_detached() -> None:
        label_studio = resources["label_studio"].server()
        if label_studio is not None:
            label_studio.stop()

    supervise("vbatch", registry, owner, services, resources, ready, stop_detached)
    return 0
