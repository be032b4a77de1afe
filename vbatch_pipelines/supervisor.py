"""`vbatch up`: prepare the platform, start its processes (Dagster webserver and daemon, the API), warm the
engine and Label Studio, supervise them, and stop every one of them — and the engines and Label Studio
it started — on Ctrl-C, SIGTERM or when one of them dies.

The supervisor stays up as long as the platform, so it stays small: the work that needs the resources
(Dagster, SQLAlchemy, torch to build the tiny model) runs in a start-up child (``vbatch_pipelines.starter``)
that exits when it is done; the supervisor itself imports none of them (issue 28: it held 481 MB)."""

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
from typing import Any

from vbatch_pipelines.child_env import without_api_keys, without_secrets
from vbatch_pipelines.exposure import Addresses, check_ports, hidden_loopback_address
from vbatch_pipelines.names import MAX_BATCHES_PER_RUN, WARM_AT_START_ENV
from vbatch_pipelines.net import wait_http
from vbatch_pipelines.processes import ProcessRecord, ProcessRegistry, die_with_parent, process_identity
from vbatch_pipelines.settings import Settings
from vbatch_pipelines.starter import StartupChild, serve
from vbatch_pipelines.systemd import Notifier


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


class SupervisedProcess:
    """One supervised process: restarted with back-off when it dies, each restart logged and counted."""

    max_backoff_s = 60.0
    stable_after_s = 60.0  # a run this long resets the back-off

    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path, port: int | None = None,
                 health_url: str | None = None):
        self.name, self.argv, self.env, self.log_path, self.port = name, argv, env, log_path, port
        self.health_url = health_url  # answers 2xx while the service is healthy (the watchdog asks)
        self.process: subprocess.Popen | None = None
        self.record: ProcessRecord | None = None
        self.restarts = 0
        self.failures_in_row = 0
        self.restart_at: float | None = None

    def start(self) -> None:
        self.process = spawn(self.argv, self.env, self.log_path)
        identity = process_identity(self.process.pid)
        self.record = ProcessRecord(self.name, self.process.pid, identity[0] if identity else time.time(),
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

    def running(self) -> bool:
        return self.process is not None and self.restart_at is None and self.process.poll() is None

    def healthy(self, timeout: float) -> bool:
        """Running and, when it serves HTTP, answering: a hung process fails this, a live pid alone would not."""
        if not self.running():
            return False
        if self.health_url is None:
            return True
        import httpx

        from vbatch_pipelines.net import local_http

        try:
            return local_http().get(self.health_url, timeout=timeout).status_code < 400
        except httpx.HTTPError:
            return False


STOP_GRACE_S = 8.0  # SIGTERM to everything at once; SIGKILL what is left after this (a stop takes <= 15 s)


def supervise(title: str, registry: ProcessRegistry, owner: dict, services: dict[str, SupervisedProcess],
              ready: Callable[[threading.Event], None], stop_detached: Callable[[], list[int | None]],
              notifier: Notifier | None = None) -> None:
    """Start ``services``, record them, then restart what dies (with back-off, each change recorded) until Ctrl-C
    or SIGTERM; meanwhile ``ready`` (warming the engine, the banner) runs beside, handed the stop event so that it
    gives up when asked. Then stop everything at once: the services and the detached servers ``stop_detached``
    hands over (their pids: the engines of this home, Label Studio), SIGKILL for what is left after STOP_GRACE_S,
    or at once on a second Ctrl-C. Under systemd it speaks sd_notify (``Notifier``). `vbatch up` and `vbatch
    worker` both run this."""
    stopping, force = threading.Event(), threading.Event()
    notifier = notifier or Notifier()

    def shutdown(signum=None, frame=None) -> None:
        if stopping.is_set():
            force.set()  # the second Ctrl-C: no more waiting
            print("Stopping at once.", flush=True)
        stopping.set()

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    owner = {"pid": os.getpid(), "started": (process_identity(os.getpid()) or (time.time(),))[0], **owner}

    def record() -> None:
        registry.write(owner, {name: service.record for name, service in services.items()
                               if service.record is not None})

    def announce() -> None:
        try:
            ready(stopping)
        except Exception as exc:  # noqa: BLE001 - reported; the supervisor goes on (or is stopping)
            if not stopping.is_set():
                log(f"start-up did not finish: {exc}")
        if not stopping.is_set():
            notifier.ready(f"{title} is up")

    signal.signal(signal.SIGINT, shutdown)
    signal.signal(signal.SIGTERM, shutdown)
    announcer = threading.Thread(target=announce, name="vbatch-ready", daemon=True)
    try:
        notifier.status(f"starting {title}")
        print(f"Starting {title} ...", flush=True)
        for service in services.values():
            service.start()
        record()
        announcer.start()
        next_ping, every = 0.0, notifier.ping_every_s
        while not stopping.is_set():
            if any([service.supervise(log) for service in services.values()]):
                record()
                down = [name for name, service in services.items() if not service.running()]
                notifier.status(f"restarting {', '.join(down)}" if down else f"{title} is up")
            if every and time.monotonic() >= next_ping:
                next_ping = time.monotonic() + every
                if all(service.healthy(min(5.0, every)) for service in services.values()):
                    notifier.watchdog()  # none while a service is down: systemd restarts a supervisor stuck so
            stopping.wait(min(1.0, every or 1.0))
    finally:
        notifier.stopping(f"stopping {title}")
        print(f"Stopping {title} ...", flush=True)
        started = time.monotonic()
        stop_everything(services, stop_detached, force)
        print(f"Stopped in {time.monotonic() - started:.1f}s.", flush=True)


def stop_everything(services: dict[str, SupervisedProcess], stop_detached: Callable[[], list[int | None]],
                    force: threading.Event) -> None:
    """SIGTERM the services and ``stop_detached``'s servers together, SIGKILL what is left after STOP_GRACE_S."""
    from vbatch_pipelines.detached import kill_groups

    groups = [service.process.pid for service in services.values() if service.process is not None]
    groups += stop_detached()
    groups = [pid for pid in groups if pid is not None]
    kill_groups(groups, STOP_GRACE_S, force)
    for service in services.values():
        if service.process is not None:
            service.process.wait()


def hand_over_engines(settings: Settings) -> list[int | None]:
    """Forget this node's managed engines (their state files; marked stopped in the engine registry) and hand
    over their pids, to be stopped with the rest. From the state files and the settings, not the resources:
    the supervisor has none."""
    from vbatch_pipelines.engine.vllm_server import managed_server_states, server_from_state

    engines_dir = settings.paths().engines_dir
    found = managed_server_states(engines_dir)
    if not found:
        return []
    from vbatch_pipelines.engine.registry import EngineRegistry
    from vbatch_pipelines.store.db import Database

    database = Database(settings.storage.database_url)  # migrated by the start-up child
    try:
        registry = EngineRegistry(database)
        return [server_from_state(spec, engines_dir, state, registry, settings.engine.node).handover()
                for spec, state in found]
    finally:
        database.dispose()


EVENT_BATCH_SIZE = 3 * MAX_BATCHES_PER_RUN  # a run's planned events: up to three steps per batch


def instance_env(settings: Settings, *, cluster: bool = False) -> dict:
    """Write this node's dagster.yaml; the environment its processes open the instance with (also set here)."""
    from vbatch_pipelines.cluster.config import cluster_env
    from vbatch_pipelines.instance import prepare_dagster_home

    settings.storage.home.mkdir(parents=True, exist_ok=True)
    dagster_home = prepare_dagster_home(settings, cluster=cluster)
    extra = {"DAGSTER_HOME": str(dagster_home), "VBATCH_HOME": str(settings.storage.home),
             **(cluster_env(settings) if cluster else {})}
    os.environ.update(extra)
    # Dagster's event batching (off unless set): a run over many batches writes each step's planned events
    # and materializations in one go (see dagster_ext.event_log.SqliteEventLogStorage.store_event_batch).
    return {"DAGSTER_EVENT_BATCH_SIZE": str(EVENT_BATCH_SIZE), **os.environ, **extra}


def prepare_platform(settings: Settings, resources: dict, *, cluster: bool = False) -> dict:
    """Everything `up` needs before processes start: DB schema, Dagster home and storage schema, gpu pool, default
    model. Returns the environment the processes run with."""
    from dagster import DagsterInstance

    from vbatch_pipelines.dagster_ext.storage import migrate_storage
    from vbatch_pipelines.instance import set_pools

    env = instance_env(settings, cluster=cluster)
    resources.metadata_db.db.upgrade()
    check_extensions(settings, resources)
    with DagsterInstance.get() as instance:  # in cluster mode the pools' limits hold for every node
        migrate_storage(instance)  # before anything uses it (set_pools does) or its daemon starts
        set_pools(instance, settings.cluster.gpus if cluster else settings.engine.gpus, settings.dagster.inference_runs)
    resources.model_registry.resolve(None)
    return env


def check_extensions(settings: Settings, resources: dict) -> None:
    """The enabled extensions load (and their review schema files with the settings' own), and what each needs of
    the systems it talks to holds, or `up` stops saying what is missing (Aris: the columns of Aristotle's database
    vbatch reads and writes; one that is down now is left to its sensor)."""
    from vbatch_pipelines.extensions import enable

    for extension in enable(settings):
        if extension.check is not None:
            extension.check(resources)


def api_workers(settings: Settings, resources: dict) -> int:
    """Two API processes use both cores of a small box for polling clients; with the transformers
    engine each process would hold its own copy of the model, so one."""
    if settings.api.workers:
        return settings.api.workers
    backend = resources.inference_engine.resolved_backend()
    return 2 if (os.cpu_count() or 1) >= 2 and backend == "vllm" else 1


def start_curation(settings: Settings, resources: dict, api_url: str) -> str:
    """Label Studio for `up`: started when curation is on and it is installed; webhooks to the API."""
    label_studio = resources.label_studio
    if not label_studio.enabled:
        return f"off: {label_studio.disabled_reason}"
    try:
        label_studio.ensure_running()
        for team in label_studio.team_clients():  # every project's organization sends its reviews
            team.ensure_webhook(f"{api_url}/v1/webhooks/label-studio", label_studio.shared_webhook_secret())
    except Exception as exc:  # noqa: BLE001 - the platform stays up; curation_tasks retries
        return f"failed to start: {exc}"
    server = label_studio.server()
    if server is None:
        return label_studio.url
    return f"{label_studio.url} (login {server.credentials()['username']}, password in " \
           f"{server.state_dir / 'credentials.json'})"


@dataclass(frozen=True)
class Prepared:
    """What `up`'s start-up child hands the supervisor before the services start."""

    env: dict  # the services' environment
    api_workers: int
    label_studio: Any  # the ManagedLabelStudio this home runs (stopped with `up`), or None for an external one


def prepare(settings: Settings, resources: dict, addresses: Addresses, cluster: bool) -> Prepared:
    """`up` before its services start (in the start-up child): the ports free, the platform prepared."""
    check_ports(addresses, resources)  # PortTaken, naming who holds it, before anything starts
    env = prepare_platform(settings, resources, cluster=cluster)
    return Prepared(env, api_workers(settings, resources), resources.label_studio.server())


def warm_up(settings: Settings, resources: dict, api_url: str, warm: bool) -> tuple[str, bool, str]:
    """`up` once its services started (in the start-up child): the engine warmed, the API answering, Label Studio
    started with its webhooks to the API. Returns the banner's notes: (engine, API ready, curation)."""
    engine_note = warm_engine(resources) if warm else "transformers (in-process, per run)"
    api_ready = wait_http(f"{api_url}/health", 60)
    curation_note = start_curation(settings, resources, api_url) if api_ready else "off: the API did not start"
    return engine_note, api_ready, curation_note


class StartupSteps:
    """What `up`'s start-up child does for it (``StartupChild.run``), a method a step; the first builds the
    resources, kept for the next."""

    def prepare(self, settings: Settings, addresses: Addresses, cluster: bool) -> Prepared:
        from resources.factory import build_resources

        self.settings = settings
        self.resources = build_resources(settings, defer_secrets=False)  # as the CLI's: a terminal shows no config
        return prepare(settings, self.resources, addresses, cluster)

    def warm_up(self, api_url: str, warm: bool) -> tuple[str, bool, str]:
        return warm_up(self.settings, self.resources, api_url, warm)


def startup_child_main(report_fd: int) -> int:
    """The start-up child's main."""
    return serve(StartupSteps(), report_fd)


def startup_child() -> StartupChild:
    """`up`'s start-up child (started on its first step)."""
    return StartupChild(__name__, startup_child_main.__name__)


def warm_engine(resources: dict) -> str:
    """Start the default model's vLLM server now, so the first batch finds it warm."""
    engine = resources.inference_engine
    if engine.resolved_backend() != "vllm":
        return "transformers (in-process, per run)"
    model = resources.model_registry.resolve(None)
    print(f"Warming vLLM for {model.id} ...", flush=True)
    urls = []
    for server in engine.replica_servers(model):  # this node's started; external ones checked
        try:
            urls.append(server.ensure())
        except Exception as exc:  # noqa: BLE001 - keep the platform up; batches retry the engine
            urls.append(f"failed: {exc}")
    if not all(url.startswith("failed") for url in urls):
        try:
            engine.warm(model)
        except Exception as exc:  # noqa: BLE001 - a batch would meet the same failure and retry it
            print(f"Warming vLLM for {model.id}: its first chunk failed: {exc}", flush=True)
    return f"vLLM {', '.join(urls)} ({model.id})"


def broker_address(url: str) -> str:
    """The broker URL without its credentials, for banners and logs."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def cluster_note(settings: Settings) -> str:
    from vbatch_pipelines.cluster.config import DEFAULT_QUEUE, GPU_QUEUE

    broker = broker_address(settings.cluster.broker_url)
    return (f"cluster mode: runs go to `vbatch worker` nodes through {broker} (queues "
            f"{DEFAULT_QUEUE}, {GPU_QUEUE}, node.<name>); files in {settings.paths().shared}")


def run_platform(settings: Settings, addresses: Addresses, *, warm: bool = True, cluster: bool = False) -> int:
    """`vbatch up`. In cluster mode (``cluster``) the same services run, but Dagster hands runs to the nodes'
    Celery workers (`vbatch worker`) instead of starting them here."""
    from vbatch_pipelines.cluster.config import check_broker, check_cluster
    from vbatch_pipelines.instance import WORKSPACE_YAML

    if cluster:
        check_cluster(settings, "vbatch up --mode cluster")  # ClusterConfigError, before anything starts
        check_broker(settings.cluster.broker_url)
        exposure = addresses.check(settings) + [cluster_note(settings)]
    else:
        exposure = addresses.check(settings)  # before anything starts
    registry = ProcessRegistry(settings.paths().run_dir)
    registry.acquire()  # AlreadyUp when another `up` owns this home
    try:
        stale = registry.stop_stale()
        if stale:
            print(f"Stopped what a previous `vbatch up` left running: {', '.join(stale)}", flush=True)
        with startup_child() as starter:
            return _run(settings, addresses, registry, starter, exposure, warm, WORKSPACE_YAML, cluster)
    finally:
        registry.release()


def _run(settings: Settings, addresses: Addresses, registry: ProcessRegistry, starter: StartupChild,
         exposure: list[str], warm: bool, workspace: Path, cluster: bool) -> int:
    prepared: Prepared = starter.run("prepare", settings, addresses, cluster)
    dagster_host, dagster_port = hidden_loopback_address()
    dagster_url = f"http://{dagster_host}:{dagster_port}"  # vbatch's own processes call it there, not via the guard
    env = dict(prepared.env, VBATCH_DAGSTER_URL=dagster_url)
    logs = settings.paths().logs_dir
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    dagster_env = without_api_keys(env)  # runs need the databases' and Label Studio's secrets, not the API's keys
    guard = [sys.executable, "-m", "api.dagster_proxy", "--upstream", dagster_url,
             "--listen", f"[{addresses.dagster_host}]:{addresses.dagster_port}" if ":" in addresses.dagster_host
             else f"{addresses.dagster_host}:{addresses.dagster_port}",
             *(argument for host in settings.api.allowed_hosts for argument in ("--allow-host", host))]
    api_argv = [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app", "--host", addresses.host,
                "--port", str(addresses.api_port), "--workers", str(prepared.api_workers),
                "--log-level", "warning", "--forwarded-allow-ips", settings.api.forwarded_allow_ips]
    services = {service.name: service for service in (
        SupervisedProcess("dagster-webserver", [str(bin_dir / "dagster-webserver"), "-h", dagster_host,
                                                "-p", str(dagster_port), "-w", str(workspace)],
                          {**dagster_env, WARM_AT_START_ENV: "1"},  # it launches the API's runs: its workers start warm
                          logs / "dagster-webserver.log", dagster_port, f"{dagster_url}/server_info"),
        SupervisedProcess("dagster-ui", guard, without_secrets(), logs / "dagster-ui.log", addresses.dagster_port,
                          f"{addresses.dagster_url}/server_info"),
        SupervisedProcess("dagster-daemon", [str(bin_dir / "dagster-daemon"), "run", "-w", str(workspace)],
                          dagster_env, logs / "dagster-daemon.log"),
        SupervisedProcess("api", api_argv, {**env, WARM_AT_START_ENV: "1"},  # its launcher opens the Dagster instance
                          logs / "api.log", addresses.api_port, f"{addresses.api_url}/health"),
    )}
    owner = {"api_url": addresses.api_url, "dagster_url": addresses.dagster_url, "home": str(settings.storage.home),
             "mode": "cluster" if cluster else "single"}

    def ready(stopping: threading.Event) -> None:
        engine_note, api_ready, curation_note = starter.run("warm_up", addresses.api_url, warm)
        starter.close()  # its work is done: it exits
        if stopping.is_set():
            return
        from vbatch_pipelines.dagster_api import warm_up_runs

        ready = wait_http(f"{dagster_url}/server_info", 120, stopping) and warm_up_runs(dagster_url) \
            and wait_http(f"{addresses.dagster_url}/server_info", 10, stopping)
        if stopping.is_set():
            return
        print(f"vbatch is up (home {settings.storage.home})\n"
              f"  OpenAI API   {addresses.api_url}/v1{'' if api_ready else '  (not answering yet; see logs)'}"
              f"  (docs {addresses.api_url}/docs)\n"
              f"  Dagster UI   {addresses.dagster_url}{'' if ready else '  (not answering yet; see logs)'}\n"
              f"  engine       {engine_note}\n"
              f"  Label Studio {curation_note}\n"
              f"  logs         {logs}\n"
              + "".join(f"  note         {note}\n" for note in exposure)
              + "Ctrl-C stops everything.", flush=True)

    def stop_detached() -> list[int | None]:
        starter.stop()  # first: a server it is starting has its state file written once it is gone
        label_studio = prepared.label_studio
        return hand_over_engines(settings) + ([label_studio.handover()] if label_studio is not None else [])

    supervise("vbatch", registry, owner, services, ready, stop_detached)
    return 0
