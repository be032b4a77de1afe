"""vbatch as a systemd service: the units `vbatch service install` writes, and the notify protocol the
supervisor speaks so that systemd knows when it is up, what it is doing, and restarts it when it hangs.

The units are ``Type=notify`` with a watchdog: `vbatch up` (and `vbatch worker`) send ``READY=1`` once their
services answer, ``STATUS=`` lines as things change, ``WATCHDOG=1`` only while every service is healthy (a
hung supervisor, or one whose services stay down, is restarted by systemd) and ``STOPPING=1`` when they stop.
Settings and secrets go in an ``EnvironmentFile=`` readable by its owner only (0600), never in the unit.
"""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from vbatch_pipelines.errors import VbatchError
from vbatch_pipelines.paths import write_atomic, write_private

UP_UNIT = "vbatch.service"
WORKER_UNIT = "vbatch-worker.service"
WATCHDOG_S = 120  # longer than a service's longest restart back-off (60 s) plus its start
START_TIMEOUT_S = 900  # warming a large model on a GPU takes minutes
STOP_TIMEOUT_S = 30  # `vbatch up` stops everything in 15 s; then KillMode=mixed kills what is left
# What goes into the environment file: vbatch's settings and what its processes need (Dagster, the hub).
ENV_PREFIXES = ("VBATCH_", "DAGSTER_", "HF_", "HUGGING_FACE_", "CUDA_", "NVIDIA_")


class ServiceError(VbatchError):
    status = 400
    code = "service_error"


# -- sd_notify -------------------------------------------------------------------------------------


class Notifier:
    """The sd_notify protocol without libsystemd: datagrams of ``KEY=value`` lines to ``$NOTIFY_SOCKET`` (a path,
    or an abstract name written with a leading ``@``). Silent when not run by systemd."""

    def __init__(self, address: str | None = None, watchdog_usec: str | None = None):
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        usec = watchdog_usec if watchdog_usec is not None else os.environ.get("WATCHDOG_USEC")
        try:
            self.watchdog_s = int(usec) / 1e6 if usec else None
        except ValueError:
            self.watchdog_s = None
        self._socket: socket.socket | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    @property
    def ping_every_s(self) -> float | None:
        """How often to send WATCHDOG=1: half the watchdog's interval, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_s / 2 if self.watchdog_s else None

    def send(self, **fields: str | int) -> bool:
        """Send one message (``READY=1``, ``STATUS=...``); False when there is no socket or it is gone."""
        if not self.address:
            return False
        address = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.sendto(message, address)
            return True
        except OSError:
            return False

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def status(self, status: str) -> bool:
        return self.send(STATUS=status)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(STOPPING=1, STATUS=status)


# -- units -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServicePlan:
    """Where the units and the environment file go, and what the units run."""

    unit_dir: Path
    env_file: Path
    user_unit: bool  # a user unit (`systemctl --user`) or a system one
    up_args: tuple[str, ...] = ()
    worker_args: tuple[str, ...] | None = None  # a worker unit too (cluster mode), with these arguments
    run_as: str | None = None  # the system unit's User=
    working_directory: Path = Path("/")  # default_plan gives the installing shell's

    @property
    def units(self) -> dict[str, Path]:
        names = [UP_UNIT] + ([WORKER_UNIT] if self.worker_args is not None else [])
        return {name: self.unit_dir / name for name in names}


def default_plan(*, user: bool, up_args: tuple[str, ...], worker_args: tuple[str, ...] | None,
                 unit_dir: Path | None = None, env_file: Path | None = None) -> ServicePlan:
    """User units under ``~/.config/systemd/user`` (settings in ``~/.config/vbatch/vbatch.env``), system units
    under ``/etc/systemd/system`` (settings in ``/etc/vbatch/vbatch.env``), run as the installing user."""
    import getpass

    if user:
        config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        unit_dir, env_file = unit_dir or config / "systemd" / "user", env_file or config / "vbatch" / "vbatch.env"
    else:
        unit_dir, env_file = unit_dir or Path("/etc/systemd/system"), env_file or Path("/etc/vbatch/vbatch.env")
    return ServicePlan(unit_dir=unit_dir, env_file=env_file, user_unit=user, up_args=up_args,
                       worker_args=worker_args, run_as=None if user else getpass.getuser(),
                       working_directory=Path.cwd())


def vbatch_executable() -> Path:
    """The ``vbatch`` script of this installation (beside its python), which the units run."""
    script = Path(sys.executable).with_name("vbatch")
    if not script.exists():
        raise ServiceError(f"no `vbatch` script beside {sys.executable}: install vbatch (pip install -e .) into "
                           "the environment the service should run")
    return script


def render_unit(plan: ServicePlan, command: str, args: tuple[str, ...], description: str) -> str:
    exec_start = shlex.join([str(vbatch_executable()), command, *args])
    wanted_by = "default.target" if plan.user_unit else "multi-user.target"
    user = f"User={plan.run_as}\n" if plan.run_as else ""
    return f"""# Written by `vbatch service install`; `vbatch service uninstall` removes it.
[Unit]
Description={description}
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
{user}WorkingDirectory={plan.working_directory}
EnvironmentFile={plan.env_file}
Environment=PYTHONUNBUFFERED=1
ExecStart={exec_start}
WatchdogSec={WATCHDOG_S}
TimeoutStartSec={START_TIMEOUT_S}
TimeoutStopSec={STOP_TIMEOUT_S}
KillMode=mixed
Restart=on-failure
RestartSec=5

[Install]
WantedBy={wanted_by}
"""


def environment_file(environ: dict[str, str]) -> str:
    """The settings of this shell, as systemd's EnvironmentFile= reads them (quoted values)."""
    lines = ["# vbatch's settings and secrets for its systemd units (owner-only: 0600)."]
    for name in sorted(environ):
        if name.startswith(ENV_PREFIXES):
            value = environ[name].replace("\\", "\\\\").replace('"', '\\"')
            if "\n" in value:
                raise ServiceError(f"{name} holds a line break, which an EnvironmentFile cannot carry")
            lines.append(f'{name}="{value}"')
    return "\n".join(lines) + "\n"


def install(plan: ServicePlan, environ: dict[str, str]) -> list[Path]:
    """Write the environment file (0600, kept if it exists: it may hold secrets edited by hand) and the units;
    the paths written."""
    written = []
    if not plan.env_file.exists():
        plan.env_file.parent.mkdir(parents=True, exist_ok=True)
        write_private(plan.env_file, environment_file(environ))
        written.append(plan.env_file)
    elif plan.env_file.stat().st_mode & 0o077:
        raise ServiceError(f"{plan.env_file} is readable by others; it holds secrets: chmod 600 it first")
    units = plan.units
    write_atomic(units[UP_UNIT], render_unit(plan, "up", plan.up_args, "vbatch: batch LLM inference, curation and "
                                                                          "fine-tuning (API, Dagster, engines)"))
    written.append(units[UP_UNIT])
    if plan.worker_args is not None:
        write_atomic(units[WORKER_UNIT], render_unit(plan, "worker", plan.worker_args,
                                                     "vbatch worker: this node's Celery workers (cluster mode)"))
        written.append(units[WORKER_UNIT])
    return written


def systemd_running() -> bool:
    """Whether this machine booted with systemd (sd_booted(3)): there is a manager to enable units with."""
    return Path("/run/systemd/system").is_dir() and shutil.which("systemctl") is not None


def systemctl(plan: ServicePlan, *args: str) -> subprocess.CompletedProcess:
    argv = ["systemctl", *(["--user"] if plan.user_unit else []), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def uninstall(plan: ServicePlan) -> list[Path]:
    """Remove the units (the environment file stays: it holds the operator's settings); the paths removed."""
    removed = []
    for unit in (plan.unit_dir / UP_UNIT, plan.unit_dir / WORKER_UNIT):
        if unit.exists():
            unit.unlink()
            removed.append(unit)
    return removed
