"""The ``vbatch`` command line. It reads the settings once and builds the resources from them, as the code
location and the API do; every command works through those resources."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from functools import cached_property
from pathlib import Path

from vbatch_pipelines.settings import Settings, SettingsError, load_settings


class Context:
    """What a command gets: the settings and, built on first use, the resources."""

    def __init__(self, settings: Settings):
        self.settings = settings

    @cached_property
    def resources(self) -> dict:
        from resources.factory import build_resources

        return build_resources(self.settings, defer_secrets=False)  # a terminal shows no resource config

    def __getitem__(self, name: str):
        return self.resources[name]


# -- models ---------------------------------------------------------------------------------------


def cmd_models_create_tiny(args, ctx: Context) -> int:
    from vbatch_pipelines.models.registry import EMBED, GENERATE, SCORE
    from vbatch_pipelines.models.tiny import TINY_BUILDERS, model_size

    task = SCORE if args.rerank else EMBED if args.embed else GENERATE
    kind = {GENERATE: "chat", EMBED: "embedding", SCORE: "cross-encoder"}[task]
    if args.size != "tiny" and task != GENERATE:
        print(f"vbatch models create-tiny: --size {args.size} is a chat model's size; the {kind} model comes in the "
              "tiny size only (leave out --size)", file=sys.stderr)
        return 2
    options = {"seed": args.seed, **({} if args.train_steps is None else {"train_steps": args.train_steps}),
               **({"size": args.size} if task == GENERATE else {})}
    started = time.monotonic()
    path = TINY_BUILDERS[task](args.path, **options)
    print(f"{args.size.capitalize()} {kind} model written to {path} in {time.monotonic() - started:.1f}s")
    if args.size != "tiny":
        model_id = model_size(args.size).model_id
        print(f"Serve it as {model_id}: vbatch models install {path} --id {model_id}")
    return 0


def cmd_models_list(args, ctx: Context) -> int:
    registry = ctx["model_registry"]
    default = registry.default_model_id()
    for spec in registry.served_models().values():
        marker = "\t(default)" if spec.id == default else ""
        print(f"{spec.id}\t{spec.task}\t{spec.adapter or spec.path}" + (f"\tLoRA on {spec.parent}" if spec.parent else "")
              + marker)
    return 0


def cmd_models_install(args, ctx: Context) -> int:
    """Check, record, then install in this process (materializing installed_model, seen in Dagster)."""
    from dagster import DagsterInstance, materialize

    from vbatch_pipelines.defs.models import installed_model
    from vbatch_pipelines.models.install import InstallPolicy
    from vbatch_pipelines.models.store import request_install
    from vbatch_pipelines.partitions import model_partitions

    # In the operator's shell a directory may be named relative to where they stand.
    source = str(Path(args.source).resolve()) if Path(args.source).is_dir() else args.source
    row = request_install(ctx["metadata_db"].db, ctx["model_registry"], ctx["inference_engine"], source,
                          model_id=args.id, revision=args.revision, trust_remote_code=args.trust_remote_code,
                          policy=InstallPolicy.operator())
    from vbatch_pipelines.projects import CLI, audit

    audit(ctx["metadata_db"].db, CLI, "model.installed", row.id, source=row.source, revision=row.revision,
          trust_remote_code=row.trust_remote_code)
    fit = row.details["fit"]
    print(f"{row.id}: fits ({fit['weight_bytes'] / 2**30:.2f} GiB weights + {fit['kv_cache_bytes'] / 2**30:.2f} GiB "
          f"KV cache of {fit['available_bytes'] / 2**30:.1f} GiB {fit['device']}); installing ...", flush=True)
    ctx.settings.dagster.home.mkdir(parents=True, exist_ok=True)
    with DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(model_partitions.name, [row.id])
        result = materialize([installed_model], partition_key=row.id, instance=instance,
                             resources=ctx.resources, raise_on_error=False)
    print(f"{row.id}: {'ready' if result.success else 'failed (see the run log above)'}")
    return 0 if result.success else 1


def cmd_models_delete(args, ctx: Context) -> int:
    from vbatch_pipelines.models.store import remove_model
    from vbatch_pipelines.projects import CLI, audit

    row = remove_model(ctx["metadata_db"].db, ctx["model_registry"], ctx["inference_engine"], args.model)
    audit(ctx["metadata_db"].db, CLI, "model.deleted", row.id, kind=row.kind)
    print(f"{row.id}: {row.status}")
    return 0


# -- trainer --------------------------------------------------------------------------------------


def cmd_trainer_install(args, ctx: Context) -> int:
    from vbatch_pipelines.fine_tuning.unsloth_env import install_unsloth_env

    if not ctx.settings.engine.gpus:
        print("No GPU here: fine-tunes run on TRL + PEFT in this environment (nothing to install). Unsloth "
              "needs a CUDA GPU.")
        return 0
    print(install_unsloth_env(ctx.settings.storage.envs_dir))
    return 0


def cmd_trainer_status(args, ctx: Context) -> int:
    trainer = ctx["trainer"]
    backend = trainer.resolved_backend()
    try:
        python = trainer.training_python(backend)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        python = f"not available: {exc}"
    print(f"trainer: {backend} (configured: {trainer.backend}, GPUs: {trainer.gpus})\npython: {python}")
    return 0


# -- engine ---------------------------------------------------------------------------------------


def cmd_engine_install(args, ctx: Context) -> int:
    from vbatch_pipelines.engine.vllm_env import install_vllm_env

    print(install_vllm_env(ctx.settings.storage.envs_dir, ctx.settings.engine.gpus))
    return 0


def cmd_engine_start(args, ctx: Context) -> int:
    engine = ctx["inference_engine"]
    model = ctx["model_registry"].resolve(args.model)
    if engine.resolved_backend() != "vllm":
        print("No vLLM available: batches run on the in-process transformers engine (nothing to start).")
        return 0
    started = time.monotonic()
    url = engine.server(model).ensure()
    print(f"{model.id} served by vLLM at {url} (ready in {time.monotonic() - started:.1f}s)")
    return 0


def cmd_engine_stop(args, ctx: Context) -> int:
    for server in ctx["inference_engine"].running_servers():
        if args.model in (None, server.model.id):
            print(f"{server.model.id}: {'stopped' if server.stop() else 'was not running'}")
    return 0


def cmd_engine_status(args, ctx: Context) -> int:
    engine = ctx["inference_engine"]
    print(f"backend: {engine.resolved_backend()} (configured: {engine.backend})")
    for server in engine.running_servers():
        state = server.state() or {}
        health = "healthy" if server.healthy(state) else "down"
        print(f"{server.model.id}\tpid {state.get('pid')}\t{server.url_of(state)}\t{health}")
    others = [r for r in engine.registry().replicas() if not (r.kind == "managed" and r.node == engine.node)]
    if others:
        print("other nodes and external engines (as last seen):")
        for replica in others:
            seen = replica.status + (f" ({replica.last_error[:120]})" if replica.last_error else "")
            print(f"{replica.model}\t{replica.kind} on {replica.node}\t{replica.base_url}\t{seen}")
    return 0


# -- Label Studio ---------------------------------------------------------------------------------


def cmd_label_studio_install(args, ctx: Context) -> int:
    from vbatch_pipelines.curation.server import install_label_studio

    install_label_studio(ctx.settings.storage.envs_dir)
    return 0


def _managed_label_studio(ctx: Context):
    """The Label Studio vbatch runs for this home (whether or not curation is on), or None for an external one."""
    return ctx["label_studio"].server()


def cmd_label_studio_start(args, ctx: Context) -> int:
    server = _managed_label_studio(ctx)
    if server is None:
        print(f"external Label Studio {ctx.settings.curation.label_studio_url}: nothing to start")
        return 0
    started = time.monotonic()
    print(f"Label Studio at {server.ensure()} (ready in {time.monotonic() - started:.1f}s)")
    return cmd_label_studio_status(args, ctx)


def cmd_label_studio_stop(args, ctx: Context) -> int:
    server = _managed_label_studio(ctx)
    print("stopped" if server is not None and server.stop() else "was not running")
    return 0


def cmd_label_studio_add_reviewer(args, ctx: Context) -> int:
    from vbatch_pipelines.projects import CLI, add_reviewer, audit, find_project

    db = ctx["metadata_db"].db
    project = find_project(db, args.project)
    password = sys.stdin.readline().rstrip("\n") if args.password_stdin else None
    made = add_reviewer(db, ctx["label_studio"], project.id, args.email, password=password,
                        move_existing=args.move)
    audit(db, CLI, "reviewer.added", made["email"], project_id=project.id)
    print(f"{made['email']} reviews {project.name}'s tasks at {made['label_studio_url']} (and no other project's)")
    if made["password"] and not args.password_stdin:
        print(f"password, shown this once: {made['password']}")
    return 0


def cmd_label_studio_status(args, ctx: Context) -> int:
    server = _managed_label_studio(ctx)
    if server is None:
        print(f"external Label Studio {ctx.settings.curation.label_studio_url}")
        return 0
    creds = server.credentials()
    password = creds["password"] if getattr(args, "show_password", False) else "(--show-password to print it)"
    print(f"{server.url}\t{'healthy' if server.healthy() else 'down'}\t"
          f"login {creds['username']} / {password}\tdata {server.state_dir}")
    return 0


# -- db and batches -------------------------------------------------------------------------------


def cmd_db_upgrade(args, ctx: Context) -> int:
    """Migrate the metadata DB to this vbatch's newest schema (`vbatch up` does too); one a newer vbatch migrated
    is refused (SchemaTooNew, printed by ``main``) and left as it is."""
    from vbatch_pipelines.store.db import Database

    db = Database(ctx.settings.storage.database_url)  # not the resource's: that one upgrades as it opens
    try:
        before, after = db.upgrade()
    finally:
        db.dispose()
    where = db.engine.url.render_as_string(hide_password=True)
    print(f"Metadata DB at {where} upgraded from {before or 'nothing (new)'} to {after}" if before != after
          else f"Metadata DB at {where} is up to date ({after})")
    return 0


def cmd_batch_submit(args, ctx: Context) -> int:
    from vbatch_pipelines.batch.service import create_batch, get_batch, is_terminal
    from vbatch_pipelines.files import store_file
    from vbatch_pipelines.launch import DagsterUnreachable, launch_batch
    from vbatch_pipelines.projects import CLI, find_project
    from vbatch_pipelines.store.models import Owner

    db = ctx["metadata_db"].db
    owner = Owner(find_project(db, args.project).id, CLI.key_name) if args.project else CLI.owner
    with open(args.file, "rb") as source:
        stored = store_file(db, ctx["file_store"].files_dir, source, Path(args.file).name, "batch", owner=owner)
    batch = create_batch(db, input_file_id=stored.id, endpoint=args.endpoint, owner=owner)
    try:
        run_id = launch_batch(db, batch.id, ctx.settings.dagster.url)
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


def cmd_batch_show(args, ctx: Context) -> int:
    from vbatch_pipelines.batch.service import get_batch

    batch = get_batch(ctx["metadata_db"].db, args.batch_id)
    if batch is None:
        print(f"No batch {args.batch_id}", file=sys.stderr)
        return 1
    print(json.dumps(batch.to_openai(), indent=2))
    return 0


# -- up -------------------------------------------------------------------------------------------


def cmd_up(args, ctx: Context) -> int:
    from vbatch_pipelines.cluster.config import ClusterConfigError
    from vbatch_pipelines.exposure import Addresses, ExposureError
    from vbatch_pipelines.net import PortTaken
    from vbatch_pipelines.processes import AlreadyUp
    from vbatch_pipelines.supervisor import run_platform

    addresses = Addresses(args.host, args.api_port or ctx.settings.api.port,
                          args.dagster_port or ctx.settings.dagster.port,
                          expose_dagster=args.expose_dagster)
    try:
        # No resources here: `up` stays small, its start-up child builds them (vbatch_pipelines.starter).
        return run_platform(ctx.settings, addresses, warm=not args.no_engine, cluster=args.mode == "cluster")
    except (ExposureError, ClusterConfigError, PortTaken) as exc:
        print(f"vbatch up: {exc}", file=sys.stderr)
        return 2
    except AlreadyUp as exc:
        print(f"vbatch up: {exc}", file=sys.stderr)
        return 1


def cmd_worker(args, ctx: Context) -> int:
    """A cluster node: its Celery workers, supervised, until Ctrl-C or SIGTERM."""

    from vbatch_pipelines.cluster.config import ClusterConfigError, check_broker, check_cluster
    from vbatch_pipelines.cluster.node import node_spec, run_worker
    from vbatch_pipelines.processes import AlreadyUp

    try:
        check_cluster(ctx.settings, "vbatch worker")
        spec = node_spec(args.node or ctx.settings.engine.node,
                         [q.strip() for q in (args.queues or "").split(",") if q.strip()],
                         ctx.settings.engine.gpus if args.gpus is None else args.gpus, args.concurrency)
        check_broker(ctx.settings.cluster.broker_url)
        return run_worker(ctx.settings, spec)
    except ClusterConfigError as exc:
        print(f"vbatch worker: {exc}", file=sys.stderr)
        return 2
    except AlreadyUp as exc:
        print(f"vbatch worker: {exc}", file=sys.stderr)
        return 1


def cmd_status(args, ctx: Context) -> int:
    """What `vbatch up` runs on this home: each service, its pid, port, uptime and restarts."""
    from vbatch_pipelines.processes import ProcessRegistry

    live = []
    for registry in (ProcessRegistry(ctx["file_store"].run_dir), ProcessRegistry(ctx["file_store"].run_dir, "worker")):
        owner = registry.live_owner()
        if owner is not None:
            live.append((registry, owner))
    if not live:
        print(f"vbatch is not up on {ctx.settings.storage.home}")
        return 3
    for registry, owner in live:
        if registry.role == "up":
            print(f"vbatch is up on {owner['home']} (pid {owner['pid']}, API {owner['api_url']}, "
                  f"Dagster {owner['dagster_url']}{', cluster mode' if owner.get('mode') == 'cluster' else ''})")
        else:
            print(f"vbatch worker {owner['node']} runs on {owner['home']} (pid {owner['pid']})")
        print(f"{'service':<18} {'pid':>7} {'port':>6} {'uptime':>9} {'restarts':>8}  state")
        for service in registry.services():
            running = service.is_running()
            uptime = f"{time.time() - service.since:.0f}s" if running else "-"
            print(f"{service.name:<18} {service.pid:>7} {service.port or '-':>6} {uptime:>9} {service.restarts:>8}  "
                  f"{'running' if running else 'down (restarting)'}")
    return 0


# -- service --------------------------------------------------------------------------------------


def _service_plan(args, ctx: Context):
    """The units' plan from the command line; the `up`/`worker` arguments are checked by their own parsers
    now, so that a typo fails here and not at the next boot."""
    import shlex

    from vbatch_pipelines import systemd

    up_args = tuple(shlex.split(getattr(args, "up_args", "") or ""))
    worker_args = tuple(shlex.split(args.worker_args or "")) if getattr(args, "worker", False) else None
    parser = build_parser()
    for command, extra in (("up", up_args), ("worker", worker_args)):
        if extra is not None:
            try:
                parser.parse_args([command, *extra])
            except SystemExit:
                raise systemd.ServiceError(f"`vbatch {command} {shlex.join(extra)}` is not a valid command "
                                           "(see above)") from None
    return systemd.default_plan(user=args.user, up_args=up_args, worker_args=worker_args,
                                unit_dir=Path(args.unit_dir) if args.unit_dir else None,
                                env_file=Path(args.env_file) if args.env_file else None)


def cmd_service_install(args, ctx: Context) -> int:
    from vbatch_pipelines import systemd

    plan = _service_plan(args, ctx)
    environ = {**os.environ, "VBATCH_HOME": str(ctx.settings.storage.home)}  # the home this shell uses, absolute
    for path in systemd.install(plan, environ):
        print(f"wrote {path}")
    print(f"settings and secrets: {plan.env_file} (0600; edit it, then restart the service)")
    names = list(plan.units)
    if args.no_enable or not systemd.systemd_running():
        manager = "systemctl" + (" --user" if plan.user_unit else "")
        why = "" if args.no_enable else " (systemd does not run here)"
        print(f"not enabled{why}; to start it now and at boot: {manager} daemon-reload && {manager} enable --now "
              + " ".join(names))
        return 0
    for step in (("daemon-reload",), ("enable", "--now", *names)):
        done = systemd.systemctl(plan, *step)
        if done.returncode != 0:
            print(f"systemctl {' '.join(step)} failed: {done.stderr.strip()}", file=sys.stderr)
            return 1
    print(f"enabled and started: {', '.join(names)} (`vbatch service status` shows them)")
    return 0


def cmd_service_uninstall(args, ctx: Context) -> int:
    from vbatch_pipelines import systemd

    plan = _service_plan(args, ctx)
    present = [name for name in (systemd.UP_UNIT, systemd.WORKER_UNIT) if (plan.unit_dir / name).exists()]
    if present and systemd.systemd_running():
        systemd.systemctl(plan, "disable", "--now", *present)
    removed = systemd.uninstall(plan)
    if removed and systemd.systemd_running():
        systemd.systemctl(plan, "daemon-reload")
    for path in removed:
        print(f"removed {path}")
    if not removed:
        print(f"no vbatch units in {plan.unit_dir}")
    if plan.env_file.exists():
        print(f"kept {plan.env_file} (your settings); delete it yourself if you no longer need it")
    return 0


def cmd_service_status(args, ctx: Context) -> int:
    from vbatch_pipelines import systemd

    plan = _service_plan(args, ctx)
    installed = [name for name in (systemd.UP_UNIT, systemd.WORKER_UNIT) if (plan.unit_dir / name).exists()]
    if not installed:
        print(f"not installed (no vbatch units in {plan.unit_dir}); `vbatch service install` writes them")
        return 3
    running = systemd.systemd_running()
    worst = 0
    for name in installed:
        if not running:
            print(f"{name}\tinstalled in {plan.unit_dir}\t(systemd does not run here)")
            continue
        active = systemd.systemctl(plan, "is-active", name).stdout.strip() or "unknown"
        enabled = systemd.systemctl(plan, "is-enabled", name).stdout.strip() or "unknown"
        status = systemd.systemctl(plan, "show", name, "--property=StatusText", "--value").stdout.strip()
        print(f"{name}\t{active}\t{enabled}" + (f"\t{status}" if status else ""))
        worst = worst or (0 if active == "active" else 3)
    return worst


# -- backup ---------------------------------------------------------------------------------------


def cmd_backup_create(args, ctx: Context) -> int:
    from vbatch_pipelines.backup import create_backup

    manifest = create_backup(ctx.settings, Path(args.path), with_models=args.with_models, log=print)
    print(f"backup of {ctx.settings.storage.home} (metadata DB at migration {manifest['alembic_revision']}) written to "
          f"{Path(args.path).expanduser().resolve()}")
    return 0


def cmd_backup_verify(args, ctx: Context) -> int:
    from vbatch_pipelines.backup import verify_backup

    manifest = verify_backup(Path(args.path))
    print(f"{args.path}: whole, {len(manifest['members'])} members match their checksums (vbatch "
          f"{manifest.get('vbatch_version')}, from {manifest['source'].get('home')}, created "
          f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(manifest.get('created_at', 0)))})")
    return 0


def cmd_backup_restore(args, ctx: Context) -> int:
    """Onto --home (else VBATCH_HOME); the store, Dagster home and databases are those the environment names for
    it, as `vbatch up` will read them there."""
    from vbatch_pipelines.backup import restore_backup

    settings = ctx.settings
    if args.home:
        os.environ["VBATCH_HOME"] = str(Path(args.home).expanduser().resolve())
        settings = load_settings()
    restore_backup(Path(args.path), settings, log=print)
    print(f"restored; start it with: VBATCH_HOME={settings.storage.home} vbatch up")
    return 0


# -- doctor ---------------------------------------------------------------------------------------


def cmd_doctor(args, ctx: Context) -> int:
    from vbatch_pipelines.doctor import Doctor

    return Doctor(ctx.settings, ctx.resources).run(smoke=not args.no_smoke, requests=args.requests,
                                                    steps=args.steps,
                                                    dagster_port=args.dagster_port or ctx.settings.dagster.port)


# -- projects and keys ----------------------------------------------------------------------------


def cmd_projects_create(args, ctx: Context) -> int:
    from vbatch_pipelines.projects import CLI, audit, create_project

    project = create_project(ctx["metadata_db"].db, args.name)
    audit(ctx["metadata_db"].db, CLI, "project.created", project.id, name=project.name)
    print(f"{project.id}\t{project.name}")
    return 0


def cmd_projects_list(args, ctx: Context) -> int:
    from sqlalchemy import select

    from vbatch_pipelines.store.models import Project

    with ctx["metadata_db"].db.session() as session:
        for project in session.scalars(select(Project).order_by(Project.created_at, Project.id)):
            if project.archived_at is None or args.all:
                print(f"{project.id}\t{project.name}" + ("\t(archived)" if project.archived_at else ""))
    return 0


def cmd_projects_archive(args, ctx: Context) -> int:
    from vbatch_pipelines.projects import CLI, archive_project, audit, find_project

    db = ctx["metadata_db"].db
    project = archive_project(db, find_project(db, args.project).id)
    audit(db, CLI, "project.archived", project.id)
    print(f"{project.id}: archived; its keys no longer work")
    return 0


def _limit(text: str) -> str:
    """A quota on the command line: a positive integer, or 'none' for no limit (checked, kept as text)."""
    if text.lower() in ("none", "null", "unlimited"):
        return "none"
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a quota is a positive integer, or none; got {text!r}")
    return text


def cmd_projects_set(args, ctx: Context) -> int:
    from vbatch_pipelines.projects import CLI, audit, find_project
    from vbatch_pipelines.quotas import QUOTAS, set_quotas

    db = ctx["metadata_db"].db
    project = find_project(db, args.project)
    given = {name: getattr(args, name) for name in QUOTAS if getattr(args, name) is not None}
    changes = {name: None if value == "none" else int(value) for name, value in given.items()}
    project = set_quotas(db, project.id, weight=args.weight, **changes)
    audit(db, CLI, "project.updated", project.id, quotas=changes, weight=args.weight)
    limits = ", ".join(f"{name} {value if value is not None else 'none'}" for name, value in project.quotas().items())
    print(f"{project.id}	{project.name}: {limits}; weight {project.weight}")
    return 0


def cmd_keys_create(args, ctx: Context) -> int:
    from vbatch_pipelines.projects import CLI, audit, create_key, find_project

    db = ctx["metadata_db"].db
    project = find_project(db, args.project)
    key, secret = create_key(db, project.id, args.name, args.owner, args.role, created_by=CLI.key_name)
    audit(db, CLI, "api_key.created", key.id, name=key.name, owner=key.owner, role=key.role, project_id=project.id)
    print(f"{key.id} ({key.role} of {project.name}, for {key.owner}). The secret, shown this once:\n{secret}")
    if not (ctx.settings.api.keys or ctx.settings.api.admin_keys):
        print("Every API request now needs a key. An admin key in VBATCH_ADMIN_KEYS keeps platform-wide access.",
              file=sys.stderr)
    return 0


def cmd_keys_list(args, ctx: Context) -> int:
    from vbatch_pipelines.projects import find_project, list_keys

    db = ctx["metadata_db"].db
    project_id = find_project(db, args.project).id if args.project else None
    for key in list_keys(db, project_id, include_revoked=args.all):
        state = "revoked" if key.revoked_at else f"last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(key.last_used_at))}" \
            if key.last_used_at else "never used"
        print(f"{key.id}\t{key.project_id}\t{key.role}\t{key.name}\t{key.owner}\t{key.redacted_value}\t{state}")
    return 0


def cmd_keys_revoke(args, ctx: Context) -> int:
    from vbatch_pipelines.projects import CLI, audit, revoke_key

    key = revoke_key(ctx["metadata_db"].db, args.key_id)
    audit(ctx["metadata_db"].db, CLI, "api_key.revoked", key.id, name=key.name, project_id=key.project_id)
    print(f"{key.id} ({key.name}) revoked: refused from its next request on")
    return 0


# -- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from vbatch_pipelines.models.tiny import MODEL_SIZES

    parser = argparse.ArgumentParser(prog="vbatch", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="start the API, Dagster (webserver, daemon) and the engine")
    up.add_argument("--host", default="127.0.0.1", help="where the API listens (beyond loopback: keys required)")
    up.add_argument("--expose-dagster", action="store_true",
                    help="serve the Dagster UI (no authentication) on --host too; default: 127.0.0.1 only")
    up.add_argument("--api-port", type=int, default=None, help="default VBATCH_API_PORT or 4080")
    up.add_argument("--dagster-port", type=int, default=None, help="default VBATCH_DAGSTER_PORT or 3000")
    up.add_argument("--no-engine", action="store_true", help="do not warm the engine at start")
    up.add_argument("--mode", choices=("single", "cluster"), default="single",
                    help="cluster: runs go to `vbatch worker` nodes through VBATCH_BROKER_URL (needs PostgreSQL for "
                         "VBATCH_DATABASE_URL and VBATCH_DAGSTER_DATABASE_URL)")
    up.set_defaults(func=cmd_up)

    worker = sub.add_parser("worker", help="a cluster node: Celery workers that run what `vbatch up --mode cluster` "
                                           "launches")
    worker.add_argument("--node", default=None, help="this node's name (default VBATCH_NODE or the host name); its "
                                                      "queue is node.<name>")
    worker.add_argument("--queues", default=None, help="more queues to take runs from, comma-separated")
    worker.add_argument("--gpus", type=int, default=None,
                        help="GPUs of this node (default detected): with any, it also takes the gpu queue's runs, "
                             "that many at once")
    worker.add_argument("--concurrency", type=int, default=2, help="runs from the default queues at once")
    worker.set_defaults(func=cmd_worker)

    sub.add_parser("status", help="the services `vbatch up` runs on this home").set_defaults(func=cmd_status)

    models = sub.add_parser("models", help="models vbatch serves").add_subparsers(dest="models", required=True)
    tiny = models.add_parser("create-tiny", help="build the tiny local Llama chat (embedding, cross-encoder) model")
    tiny.add_argument("path")
    kind = tiny.add_mutually_exclusive_group()
    kind.add_argument("--embed", action="store_true", help="the tiny embedding model (mean-pooled, normalised)")
    kind.add_argument("--rerank", action="store_true",
                      help="the tiny cross-encoder (one-label sequence classifier) for /v1/score and /v1/rerank")
    tiny.add_argument("--size", choices=tuple(MODEL_SIZES), default="tiny",
                      help="the chat model's size: tiny (seconds to build) or bench (~27M parameters, a 4k context, "
                           "a few minutes on 2 cores; served as vbatch-bench-chat)")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--train-steps", type=int, default=None, help="AdamW steps (default: the size's own, 300 for "
                                                                     "tiny)")
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
        command = studio.add_parser(name, help=text)
        if name in ("start", "status"):
            command.add_argument("--show-password", action="store_true", help="print the admin password too")
        command.set_defaults(func=func)
    reviewer = studio.add_parser("add-reviewer", help="a Label Studio login for a project's reviewer: they see that "
                                                      "project's tasks only")
    reviewer.add_argument("--project", required=True, help="the project (id or name)")
    reviewer.add_argument("--email", required=True, help="their address, their login")
    reviewer.add_argument("--password-stdin", action="store_true", help="read their password from stdin "
                                                                         "(default: one is made and printed once)")
    reviewer.add_argument("--move", action="store_true", help="an existing account is moved to this project's "
                                                              "organization (from any other)")
    reviewer.set_defaults(func=cmd_label_studio_add_reviewer)

    trainer = sub.add_parser("trainer", help="the fine-tuning trainer").add_subparsers(dest="trainer", required=True)
    trainer.add_parser("install", help="create Unsloth's own virtualenv (CUDA machines)").set_defaults(
        func=cmd_trainer_install)
    trainer.add_parser("status", help="which trainer fine-tunes run on").set_defaults(func=cmd_trainer_status)

    doctor = sub.add_parser("doctor", help="check this machine and installation, then run a batch and a fine-tune "
                                           "on the real engines (exit code 1 on any failure)")
    doctor.add_argument("--no-smoke", action="store_true", help="only the checks, no batch or fine-tune")
    doctor.add_argument("--requests", type=int, default=100, help="requests in the check batch (default 100)")
    doctor.add_argument("--steps", type=int, default=20, help="LoRA steps of the check fine-tune (default 20)")
    doctor.add_argument("--dagster-port", type=int, default=None,
                        help="the Dagster UI's port when doctor starts `vbatch up` itself (default VBATCH_DAGSTER_PORT "
                             "or 3000)")
    doctor.set_defaults(func=cmd_doctor)

    service = sub.add_parser("service", help="run vbatch as a systemd service (start at boot, watchdog)") \
        .add_subparsers(dest="service", required=True)
    for name, func, text in (("install", cmd_service_install, "write (and enable) systemd units for `vbatch up`"),
                             ("uninstall", cmd_service_uninstall, "disable and remove the units"),
                             ("status", cmd_service_status, "whether the units are installed and running")):
        command = service.add_parser(name, help=text)
        command.add_argument("--user", action="store_true",
                             help="a user unit (systemctl --user; no root) instead of a system one")
        command.add_argument("--unit-dir", default=None, help="where the units go (default: systemd's own "
                                                              "directory for system or --user units)")
        command.add_argument("--env-file", default=None, help="the settings file the units read (default "
                                                              "/etc/vbatch/vbatch.env or ~/.config/vbatch/vbatch.env)")
        if name == "install":
            command.add_argument("--up-args", default="", help="arguments for `vbatch up`, e.g. \"--host 0.0.0.0\"")
            command.add_argument("--worker", action="store_true",
                                 help="also a unit for `vbatch worker` (a cluster node)")
            command.add_argument("--worker-args", default="", help="arguments for `vbatch worker`")
            command.add_argument("--no-enable", action="store_true", help="write the units, enable nothing")
        command.set_defaults(func=func)

    projects = sub.add_parser("projects", help="projects: a team's share of the platform, with its own keys") \
        .add_subparsers(dest="projects", required=True)
    created = projects.add_parser("create", help="a new project")
    created.add_argument("name")
    created.set_defaults(func=cmd_projects_create)
    listed = projects.add_parser("list", help="the projects")
    listed.add_argument("--all", action="store_true", help="archived ones too")
    listed.set_defaults(func=cmd_projects_list)
    limits = projects.add_parser("set", help="a project's quotas and its share of the engine")
    limits.add_argument("project", help="its id or name")
    for name, what in (("max_concurrent_batches", "batches not yet ended"),
                       ("max_queued_requests", "requests of its batches not yet run"),
                       ("max_tokens_per_day", "input and output tokens per UTC day")):
        limits.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_limit,
                            help=f"{what} (a number, or none for no limit)")
    limits.add_argument("--weight", type=int, help="its share of the engine when several projects' batches run "
                                                   "(1 to 100; default 1)")
    limits.set_defaults(func=cmd_projects_set)
    archived = projects.add_parser("archive", help="archive a project: its keys stop working")
    archived.add_argument("project", help="its id or name")
    archived.set_defaults(func=cmd_projects_archive)

    keys = sub.add_parser("keys", help="project API keys (only a hash is stored; the secret is shown once)") \
        .add_subparsers(dest="keys", required=True)
    made = keys.add_parser("create", help="a new key for a project; prints its secret once")
    made.add_argument("--project", default="proj_default", help="the project's id or name (default: the default one)")
    made.add_argument("--name", required=True, help="what the key is for")
    made.add_argument("--owner", required=True, help="who holds it (a name or an email)")
    made.add_argument("--role", choices=("member", "admin"), default="member",
                      help="admin: may also manage the project's keys")
    made.set_defaults(func=cmd_keys_create)
    shown = keys.add_parser("list", help="the keys (never their secrets)")
    shown.add_argument("--project", default=None, help="one project's (id or name)")
    shown.add_argument("--all", action="store_true", help="revoked ones too")
    shown.set_defaults(func=cmd_keys_list)
    revoked = keys.add_parser("revoke", help="revoke a key: refused from its next request on")
    revoked.add_argument("key_id")
    revoked.set_defaults(func=cmd_keys_revoke)

    db = sub.add_parser("db", help="the metadata DB").add_subparsers(dest="db", required=True)
    db.add_parser("upgrade", help="apply migrations").set_defaults(func=cmd_db_upgrade)

    batch = sub.add_parser("batch", help="batches").add_subparsers(dest="batch", required=True)
    submit = batch.add_parser("submit", help="upload a JSONL file and launch its batch")
    submit.add_argument("file")
    submit.add_argument("--endpoint", default="/v1/chat/completions")
    submit.add_argument("--project", help="the project (id or name) the batch belongs to; default: the default one")
    submit.add_argument("--wait", action="store_true", help="wait for the batch to end and print it")
    submit.set_defaults(func=cmd_batch_submit)
    show = batch.add_parser("show", help="print a batch object")
    show.add_argument("batch_id")
    show.set_defaults(func=cmd_batch_show)

    backup = sub.add_parser("backup", help="back up a (running) platform, restore it onto a new home").add_subparsers(
        dest="backup", required=True)
    create = backup.add_parser("create", help="write one archive of the databases (consistent snapshots), files, "
                                              "datasets, fine-tunes, Dagster's and Label Studio's data")
    create.add_argument("path", help="the archive to write (.tar, or .tar.gz to compress); it must not exist")
    create.add_argument("--with-models", action="store_true",
                        help="include installed base models' weights (default: downloaded again after a restore)")
    create.set_defaults(func=cmd_backup_create)
    verify = backup.add_parser("verify", help="check an archive whole against its manifest's checksums")
    verify.add_argument("path")
    verify.set_defaults(func=cmd_backup_verify)
    restore = backup.add_parser("restore", help="restore an archive onto an empty home (checked whole first)")
    restore.add_argument("path")
    restore.add_argument("--home", default=None, help="the new home (default VBATCH_HOME); VBATCH_STORE, DAGSTER_HOME "
                                                      "and the database URLs are the environment's, and must be empty")
    restore.set_defaults(func=cmd_backup_restore)
    return parser


def main(argv: list[str] | None = None) -> int:
    from vbatch_pipelines.cluster.config import cluster_env
    from vbatch_pipelines.errors import VbatchError

    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        os.environ.update(cluster_env(settings))  # a cluster-mode dagster.yaml names the Dagster DB's password
        return args.func(args, Context(settings))
    except (SettingsError, VbatchError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
