"""A Dagster run launcher that keeps run workers warm and reuses them.

Dagster's default launcher starts every run in a fresh ``dagster api execute_run`` process, which spends
~2.5 s of a 2-core machine importing Dagster and the code location before the first step runs: most of a
small batch's latency, and CPU taken from the run that is executing. ``WarmRunLauncher`` keeps spare
workers that have already done those imports and wait on stdin; a launch hands one the same
``ExecuteRunArgs`` that ``execute_run`` takes, and the worker runs exactly what ``dagster api execute_run``
runs. A worker whose run succeeded says so on a status pipe and waits for the next run, so back-to-back
runs start no process at all; one whose run did not succeed, that ran ``MAX_RUNS_PER_WORKER`` runs or
grew past ``MAX_WORKER_RSS`` exits, and a new spare takes its place.

A worker whose project source changed after it imported it re-executes itself as a cold
``dagster api execute_run``, so code edits reach the next run. Workers are tracked by pid and start time
(run tags), which gives run monitoring a real health check and ``terminate`` a process to interrupt.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dagster import DagsterRun, serialize_value

from vbatch_pipelines.dagster_ext._compat import (
    CheckRunHealthResult,
    ConfigurableClass,
    ConfigurableClassData,
    LaunchRunContext,
    RunLauncher,
    UserConfigSchema,
    WorkerStatus,
    check,
)
from vbatch_pipelines.names import RUN_WORKER_PID_TAG as PID_TAG
from vbatch_pipelines.names import RUN_WORKER_STARTED_TAG as STARTED_TAG
from vbatch_pipelines.names import STEP_MEMORY_ENV, WARM_AT_START_ENV
from vbatch_pipelines.processes import LastingSpawner, die_with_parent, process_identity

POOL_CLAIM_MAX_INTERVAL_S = 2
WARM_AT_START_TIMEOUT_S = 120
MAX_RUNS_PER_WORKER = 200
MAX_WORKER_RSS = 400 * 2**20
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The code location, and what its batch steps import on first use: the input's Parquet, the vLLM client's HTTP.
PRELOAD_MODULES = ("vbatch_pipelines.definitions", "pyarrow.parquet", "aiohttp")


def _process_started(pid: int) -> float | None:
    """The process's start time (as psutil reports it), or None when it does not run (a zombie included)."""
    identity = process_identity(pid)
    return identity[0] if identity else None


class _Worker:
    """A run worker process and the read end of its status pipe (one "ready" line after each run it
    finished and is free to take another)."""

    def __init__(self, process: subprocess.Popen, status_fd: int):
        self.process = process
        self.status_fd = status_fd
        os.set_blocking(status_fd, False)

    def alive(self) -> bool:
        return self.process.poll() is None

    def said_ready(self) -> bool:
        try:
            return b"ready" in os.read(self.status_fd, 4096)
        except BlockingIOError:
            return False
        except OSError:
            return False

    def wait_warm(self, timeout: float) -> bool:
        """Wait until the worker says "warm" (imports done, instance open); False if it exited or took longer."""
        deadline = time.monotonic() + timeout
        while self.alive() and (left := deadline - time.monotonic()) > 0:
            if select.select([self.status_fd], [], [], min(left, 0.5))[0]:
                try:
                    if b"warm" in os.read(self.status_fd, 4096):
                        return True
                except (BlockingIOError, OSError):
                    pass
        return False

    def hand(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def release(self) -> None:
        """Let an idle worker go: it exits on end of input."""
        try:
            if self.process.stdin is not None:
                self.process.stdin.close()
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        try:
            os.close(self.status_fd)
        except OSError:
            pass


class WarmRunLauncher(RunLauncher, ConfigurableClass):
    """Launches each run in a pre-imported worker process, reused run after run."""

    def __init__(self, inst_data: ConfigurableClassData | None = None,
                 preload_modules: Sequence[str] = PRELOAD_MODULES, spares: int = 2):
        self._inst_data = inst_data
        self._preload_modules = list(preload_modules)
        self._spare_count = max(1, spares)
        self._idle: list[_Worker] = []  # ready for a run: finished ones first, then fresh spares
        self._busy: list[_Worker] = []
        self._lock = threading.Lock()
        self._workers: dict[str, subprocess.Popen] = {}
        self._spawner: LastingSpawner | None = None
        self.warm_at_start: bool | None = None  # whether a spare was warm when register_instance returned
        super().__init__()

    @property
    def inst_data(self) -> ConfigurableClassData | None:
        return self._inst_data

    def register_instance(self, instance) -> None:
        """In the process `vbatch up` marks (WARM_AT_START_ENV: its webserver, which launches the API's runs),
        start the spares now and wait until the first is warm: the first batch after "vbatch is up" must not
        pay a worker's imports (seconds on a busy machine)."""
        super().register_instance(instance)
        if os.environ.get(WARM_AT_START_ENV) == "1":
            with self._lock:
                while len(self._idle) < self._spare_count:
                    self._idle.append(self._start_worker())
                first = self._idle[0]
            self.warm_at_start = first.wait_warm(WARM_AT_START_TIMEOUT_S)

    @classmethod
    def config_type(cls) -> UserConfigSchema:
        from dagster import Array, Field

        return {
            "preload_modules": Field(Array(str), is_required=False, default_value=list(PRELOAD_MODULES)),
            # Two: a run launched right after another still finds a worker that finished importing.
            "spares": Field(int, is_required=False, default_value=2),
        }

    @classmethod
    def from_config_value(cls, inst_data: ConfigurableClassData, config_value: Mapping[str, Any]):
        return cls(inst_data=inst_data, **config_value)

    def _start_worker(self) -> _Worker:
        # The spare also opens the instance ahead of time (storage set-up is another ~0.5 s).
        read_fd, write_fd = os.pipe()
        env = {**STEP_MEMORY_ENV, **os.environ,
               "VBATCH_RUN_WORKER_INSTANCE": serialize_value(self._instance.get_ref()),
               "VBATCH_RUN_WORKER_STATUS_FD": str(write_fd)}
        # SIGKILL when the launching process goes (even by kill -9): its run then fails, and Dagster's run
        # retries re-execute it in the next worker, resuming from the batch's result files.
        if self._spawner is None:
            # Launches come from the webserver's request threads, which end when idle: the parent-death signal
            # must be tied to a thread that lasts, or a worker would die with the request that started it.
            self._spawner = LastingSpawner("run-worker-spawner")
        process = self._spawner.popen(
            [sys.executable, "-m", "vbatch_pipelines.dagster_ext.run_launcher", *self._preload_modules],
            stdin=subprocess.PIPE, cwd=os.getcwd(), text=True, env=env, pass_fds=(write_fd,),
            preexec_fn=lambda: die_with_parent(signal.SIGKILL))
        os.close(write_fd)
        return _Worker(process, read_fd)

    def _take_worker(self) -> _Worker:
        """A worker for the next run: one that finished a run (warm for sure), else the oldest spare, topping
        the spares up behind it."""
        with self._lock:
            for worker in list(self._busy):
                if not worker.alive():
                    self._busy.remove(worker)
                    worker.close()
                elif worker.said_ready():
                    self._busy.remove(worker)
                    self._idle.insert(0, worker)
            self._idle = [worker for worker in self._idle if worker.alive() or worker.close()]
            worker = self._idle.pop(0) if self._idle else self._start_worker()
            while len(self._idle) < self._spare_count:
                self._idle.append(self._start_worker())
            self._busy.append(worker)
            return worker

    def launch_run(self, context: LaunchRunContext) -> None:
        from vbatch_pipelines.dagster_ext._compat import ExecuteRunArgs

        run = context.dagster_run
        args = ExecuteRunArgs(
            job_origin=check.not_none(run.job_code_origin),
            run_id=run.run_id,
            instance_ref=self._instance.get_ref(),
            set_exit_code_on_failure=True,
        )
        worker = self._take_worker()
        started = _process_started(worker.process.pid)
        self._instance.add_run_tags(run.run_id, {PID_TAG: str(worker.process.pid), STARTED_TAG: repr(started)})
        worker.hand(serialize_value(args))
        self._workers[run.run_id] = worker.process
        self._reap()

    def _reap(self) -> None:
        """Forget runs whose worker exited, and all but the latest runs of reused workers (their health is
        checked by pid from the run's tags either way)."""
        for run_id, worker in list(self._workers.items()):
            if worker.poll() is not None or len(self._workers) > 256:
                del self._workers[run_id]

    def _worker_pid(self, run: DagsterRun) -> int | None:
        """The run's worker pid, when that very process (same start time) is still alive."""
        pid, started = run.tags.get(PID_TAG), run.tags.get(STARTED_TAG)
        if not pid:
            return None
        actual = _process_started(int(pid))
        if actual is None or (started not in (None, "None") and abs(actual - float(started)) > 0.01):
            return None
        return int(pid)

    @property
    def supports_check_run_worker_health(self) -> bool:
        return True

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        if PID_TAG not in run.tags:
            return CheckRunHealthResult(WorkerStatus.NOT_FOUND, "run was not launched by WarmRunLauncher")
        worker = self._workers.get(run.run_id)
        if worker is not None and worker.poll() is not None:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker exited with code {worker.returncode}")
        if self._worker_pid(run) is None:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"run worker (pid {run.tags[PID_TAG]}) is gone")
        return CheckRunHealthResult(WorkerStatus.RUNNING, run_worker_id=run.tags[PID_TAG])

    def terminate(self, run_id: str) -> bool:
        run = self._instance.get_run_by_id(run_id)
        if not run or run.is_finished:
            return False
        self._instance.report_run_canceling(run)
        pid = self._worker_pid(run)
        if pid is None:
            self._instance.report_engine_event("Run worker not found; nothing to interrupt.", run,
                                               cls=self.__class__)
            return False
        os.kill(pid, signal.SIGINT)  # Dagster turns it into an interrupt and marks the run canceled
        return True

    def dispose(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            busy, self._busy = self._busy, []
        for worker in idle:
            worker.release()
        for worker in idle:
            try:
                worker.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                worker.process.kill()
        for worker in busy:  # its run goes on; it exits after it
            worker.release()

    def join(self, timeout: int = 30) -> None:
        """Wait for the runs this launcher started to finish (their workers may stay for the next run)."""
        deadline = time.monotonic() + timeout
        for run_id in list(self._workers):
            while time.monotonic() < deadline:
                run = self._instance.get_run_by_id(run_id)
                if run is None or run.is_finished:
                    break
                time.sleep(0.1)


def _project_changed_since(moment: float) -> bool:
    for module in list(sys.modules.values()):
        path = getattr(module, "__file__", None)
        if not path or not path.startswith(str(PROJECT_ROOT)) or "site-packages" in path:
            continue
        try:
            if os.stat(path).st_mtime > moment:
                return True
        except OSError:
            return True
    return False


def _worth_keeping(process_runs: int) -> bool:
    import psutil

    return process_runs < MAX_RUNS_PER_WORKER and psutil.Process().memory_info().rss < MAX_WORKER_RSS


def _resolve_definitions(module) -> None:
    """A code location's Definitions resolved into its repository and jobs, as a run's first step would (a
    few tenths of a second, cached on the object every run of this worker reconstructs its job from)."""
    from dagster import Definitions

    defs = getattr(module, "defs", None)
    if isinstance(defs, Definitions):
        defs.get_repository_def().get_all_jobs()


def worker_main(preload_modules: Sequence[str]) -> int:
    """Import Dagster and the code location, open the instance, then run each ExecuteRunArgs read from stdin,
    saying "ready" on the status pipe after every run that succeeded (and exiting after any other)."""
    imported_at = time.time()
    import importlib

    from dagster import DagsterInstance, DagsterRunStatus, deserialize_value

    from vbatch_pipelines.dagster_ext._compat import (
        ExecuteRunArgs,
        InstanceRef,
        capture_interrupts,
        shorten_pool_claim_backoff,
    )
    from vbatch_pipelines.dagster_ext._compat import execute_run_command_body as _execute_run_command_body

    shorten_pool_claim_backoff(POOL_CLAIM_MAX_INTERVAL_S)
    status_fd = os.environ.pop("VBATCH_RUN_WORKER_STATUS_FD", None)
    try:
        for module in preload_modules:
            _resolve_definitions(importlib.import_module(module))
        ref = deserialize_value(os.environ.pop("VBATCH_RUN_WORKER_INSTANCE"), InstanceRef)
        instance = DagsterInstance.from_ref(ref)
    except KeyboardInterrupt:  # Ctrl-C of `vbatch up` reaches the idle spare too
        return 0
    if status_fd is not None:
        os.write(int(status_fd), b"warm\n")
    runs = 0
    with instance:
        while True:
            try:
                line = sys.stdin.readline()
            except KeyboardInterrupt:
                return 0
            if not line.strip():
                return 0  # the launcher let this worker go
            if _project_changed_since(imported_at):
                instance.dispose()
                os.execv(sys.executable, [sys.executable, "-m", "dagster", "api", "execute_run", line.strip()])
            with capture_interrupts():
                args = deserialize_value(line, ExecuteRunArgs)
                if args.instance_ref != ref:
                    with DagsterInstance.from_ref(check.not_none(args.instance_ref)) as other:
                        return _execute_run_command_body(args.run_id, other, lambda event: None,
                                                         set_exit_code_on_failure=bool(args.set_exit_code_on_failure))
                code = _execute_run_command_body(args.run_id, instance, lambda event: None,
                                                 set_exit_code_on_failure=bool(args.set_exit_code_on_failure))
            runs += 1
            run = instance.get_run_by_id(args.run_id)
            if code or status_fd is None or run is None or run.status != DagsterRunStatus.SUCCESS \
                    or not _worth_keeping(runs):
                return code
            os.write(int(status_fd), b"ready\n")


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:] or PRELOAD_MODULES))
