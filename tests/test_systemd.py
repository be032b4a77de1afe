"""vbatch as a systemd service (issue 26): the units `vbatch service install` writes pass systemd's own
verifier (and a broken one does not), settings and secrets go to an owner-only environment file, and `vbatch
up` speaks sd_notify to a real NOTIFY_SOCKET: READY once up, WATCHDOG only while its services are healthy,
STOPPING when it stops."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import CLI, start_up, survivors
from tests.test_supervisor import _env
from vbatch_pipelines import systemd
from vbatch_pipelines.processes import ProcessRegistry

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed (Debian: apt-get install systemd)")


def _install(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, VBATCH_HOME=str(tmp_path / "home"), **env)
    return subprocess.run([*CLI, "service", "install", "--unit-dir", str(tmp_path / "units"), "--env-file",
                           str(tmp_path / "etc" / "vbatch.env"), "--no-enable", *args], env=environ, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)


def _verify(unit: Path, user: bool, tmp_path: Path) -> subprocess.CompletedProcess:
    """systemd-analyze verify, as systemd would load the unit; a user manager needs a runtime dir."""
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["systemd-analyze", *(["--user"] if user else []), "verify", str(unit)],
                          env=dict(os.environ, XDG_RUNTIME_DIR=str(runtime)), capture_output=True, text=True,
                          timeout=60)


def _clean(result: subprocess.CompletedProcess) -> bool:
    """systemd-analyze exits 0 on unknown keys and bad values (it only warns): clean means no word either."""
    return result.returncode == 0 and not (result.stdout + result.stderr).strip()


@needs_systemd_analyze
@pytest.mark.parametrize("user", [False, True], ids=["system", "user"])
def test_installed_units_pass_systemd_analyze_and_keep_secrets_out(tmp_path, user):
    done = _install(tmp_path, *(["--user"] if user else []), "--up-args", "--host 127.0.0.1 --api-port 4090",
                    "--worker", "--worker-args", "--node gpu-1 --gpus 1", VBATCH_API_KEYS="sk-use-secret",
                    VBATCH_ADMIN_KEYS="sk-admin-secret", HF_TOKEN="hf_secret")
    assert done.returncode == 0, done.stderr
    units = {name: tmp_path / "units" / name for name in (systemd.UP_UNIT, systemd.WORKER_UNIT)}
    for unit in units.values():
        verified = _verify(unit, user, tmp_path)
        assert _clean(verified), verified.stdout + verified.stderr
        text = unit.read_text()
        for line in ("Type=notify", f"WatchdogSec={systemd.WATCHDOG_S}", "Restart=on-failure", "KillMode=mixed",
                     f"EnvironmentFile={tmp_path / 'etc' / 'vbatch.env'}"):
            assert line in text
        assert "secret" not in text  # secrets live in the environment file only
        assert ("User=" in text) is not user
    assert "vbatch up --host 127.0.0.1 --api-port 4090" in units[systemd.UP_UNIT].read_text()
    assert "vbatch worker --node gpu-1 --gpus 1" in units[systemd.WORKER_UNIT].read_text()

    env_file = tmp_path / "etc" / "vbatch.env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    settings = env_file.read_text()
    assert 'VBATCH_API_KEYS="sk-use-secret"' in settings and 'HF_TOKEN="hf_secret"' in settings
    assert f'VBATCH_HOME="{tmp_path / "home"}"' in settings  # absolute: the service has another cwd

    status = subprocess.run([*CLI, "service", "status", "--unit-dir", str(tmp_path / "units"), "--env-file",
                             str(env_file)], capture_output=True, text=True, timeout=60)
    assert systemd.UP_UNIT in status.stdout
    gone = subprocess.run([*CLI, "service", "uninstall", "--unit-dir", str(tmp_path / "units"), "--env-file",
                           str(env_file)], capture_output=True, text=True, timeout=60)
    assert gone.returncode == 0 and not any(unit.exists() for unit in units.values())
    assert env_file.exists()  # the operator's settings stay


@needs_systemd_analyze
def test_the_verifier_catches_a_broken_unit(tmp_path):
    """What the check above relies on: a unit systemd cannot run, or one it would half-ignore, is not clean."""
    assert _install(tmp_path).returncode == 0
    good = (tmp_path / "units" / systemd.UP_UNIT).read_text()
    missing = tmp_path / "missing.service"
    missing.write_text(good.replace(str(systemd.vbatch_executable()), str(tmp_path / "no-such-vbatch")))
    misspelt = tmp_path / "misspelt.service"
    misspelt.write_text(good.replace("WatchdogSec=", "WatchdogSecs="))
    for unit in (missing, misspelt):
        assert not _clean(_verify(unit, False, tmp_path))


def test_install_refuses_bad_arguments_and_an_open_environment_file(tmp_path):
    done = _install(tmp_path, "--up-args", "--hots 0.0.0.0")
    assert done.returncode == 2 and "`vbatch up --hots 0.0.0.0` is not a valid command" in done.stderr
    assert not (tmp_path / "units").exists() and not (tmp_path / "etc").exists()  # nothing written

    env_file = tmp_path / "etc" / "vbatch.env"
    env_file.parent.mkdir()
    env_file.write_text('VBATCH_API_KEYS="sk-x"\n')
    env_file.chmod(0o644)
    done = _install(tmp_path)
    assert done.returncode == 2 and "readable by others" in done.stderr
    assert not (tmp_path / "units").exists()


def _datagram_socket(tmp_path: Path) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    return listener


def test_the_notifier_speaks_to_a_path_and_an_abstract_socket(tmp_path):
    listener = _datagram_socket(tmp_path)
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    abstract.bind(f"\0vbatch-test-{os.getpid()}")
    with listener, abstract:
        notifier = systemd.Notifier(str(tmp_path / "notify.sock"), "4000000")
        assert notifier.ping_every_s == 2.0
        assert notifier.ready("vbatch is up") and notifier.watchdog()
        assert listener.recv(4096) == b"READY=1\nSTATUS=vbatch is up"
        assert listener.recv(4096) == b"WATCHDOG=1"
        assert systemd.Notifier(f"@vbatch-test-{os.getpid()}", None).stopping()
        assert abstract.recv(4096) == b"STOPPING=1\nSTATUS=stopping"
    assert not systemd.Notifier("", None).ready("x")  # not under systemd: silent


class Messages:
    """The datagrams `vbatch up` sent, each with the time it arrived."""

    def __init__(self, listener: socket.socket):
        self.listener, self.seen = listener, []
        listener.settimeout(0.2)

    def pump(self, seconds: float) -> list[tuple[float, str]]:
        got, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                got.append((time.monotonic(), self.listener.recv(4096).decode()))
            except TimeoutError:
                continue
        self.seen += got
        return got

    def until(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in message for _, message in self.pump(0.5)):
                return
        raise AssertionError(f"no {text!r} in {timeout}s; seen {[m for _, m in self.seen][-10:]}")


@pytest.mark.stack
def test_up_speaks_sd_notify_and_stops_watchdog_pings_while_a_service_hangs(tmp_path, tiny_model_path):
    home = tmp_path / "home"
    env, api_port, dagster_port = _env(home, tiny_model_path)
    listener = _datagram_socket(tmp_path)
    env.update(NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="2000000")  # a ping every second
    messages = Messages(listener)
    up, _ = start_up(env, "--api-port", str(api_port), "--dagster-port", str(dagster_port), "--no-engine")
    try:
        messages.until("READY=1", 60)
        first = [message for _, message in messages.seen]
        assert first[0].startswith("STATUS=starting")
        pings = [at for at, message in messages.pump(4) if message == "WATCHDOG=1"]
        assert len(pings) >= 2, messages.seen[-10:]

        # The API hangs (stopped, not dead: its pid lives, it answers nothing): no more pings.
        api_pid = next(s.pid for s in ProcessRegistry(home / "run").services() if s.name == "api")
        os.killpg(api_pid, signal.SIGSTOP)
        try:
            messages.pump(3)  # a ping already on its way may still arrive
            hung = messages.pump(6)
            assert not [m for _, m in hung if m == "WATCHDOG=1"], hung
        finally:
            os.killpg(api_pid, signal.SIGCONT)
        messages.until("WATCHDOG=1", 20)  # healthy again: pings again

        started = time.monotonic()
        up.send_signal(signal.SIGTERM)
        messages.until("STOPPING=1", 10)
        up.wait(30)
        assert time.monotonic() - started <= 15
        assert up.returncode == 0
    finally:
        listener.close()
        if up.poll() is None:
            up.kill()
        for survivor in survivors(home):
            survivor.kill()
    assert not survivors(home)

