"""`vbatch doctor`: what a user runs after installing, on a GPU box or a CPU one. It checks the machine and the
installation (drivers, CUDA and torch, the vLLM and trainer environments, memory, disk, ports, Label Studio,
Dagster), then proves the loop on the real engines: a batch of 100 requests through the official openai SDK and
a 20-step LoRA fine-tune, through the API of the running `vbatch up` (started for the check and stopped after it
when none runs), and prints their figures. Any failure makes the exit code non-zero."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vbatch_pipelines.processes import ProcessRegistry
from vbatch_pipelines.settings import Settings

OK, WARN, FAIL = "ok", "warn", "FAIL"


@dataclass
class Finding:
    name: str
    status: str
    detail: str


class Doctor:
    def __init__(self, settings: Settings, resources: dict, out: Callable[[str], None] = print):
        self.settings, self.resources, self.out = settings, resources, out
        self.findings: list[Finding] = []

    def report(self, name: str, status: str, detail: str) -> Finding:
        finding = Finding(name, status, detail)
        self.findings.append(finding)
        self.out(f"[{status:>4}] {name:<14} {detail}")
        return finding

    def check(self, name: str, probe: Callable[[], tuple[str, str]]) -> Finding:
        try:
            status, detail = probe()
        except Exception as exc:  # noqa: BLE001 - a check that breaks is a failed check, reported
            status, detail = FAIL, f"{type(exc).__name__}: {exc}"
        return self.report(name, status, detail)

    @property
    def failed(self) -> bool:
        return any(finding.status == FAIL for finding in self.findings)

    # -- the machine and the installation ---------------------------------------------------------
    def gpu(self) -> tuple[str, str]:
        configured = self.settings.engine.gpus
        if not configured:
            return OK, "no GPU: vLLM's CPU build serves, TRL + PEFT fine-tune (set VBATCH_GPUS if this is wrong)"
        if shutil.which("nvidia-smi") is None:
            return FAIL, f"VBATCH_GPUS/CUDA_VISIBLE_DEVICES say {configured} GPU(s) but nvidia-smi is missing"
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,memory.used",
                               "--format=csv,noheader"], capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            return FAIL, f"nvidia-smi failed (driver not loaded?): {(done.stderr or done.stdout).strip()[:300]}"
        gpus = [line.strip() for line in done.stdout.splitlines() if line.strip()]
        if len(gpus) < self.settings.engine.gpus:
            return FAIL, f"{configured} GPU(s) configured, nvidia-smi sees {len(gpus)}: {'; '.join(gpus)}"
        return OK, "; ".join(gpus)

    def _python_report(self, python: str, code: str, timeout: float = 300) -> dict:
        done = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"{python} exited with {done.returncode}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def engine(self) -> tuple[str, str]:
        engine = self.resources.inference_engine
        backend = engine.resolved_backend()
        if backend != "vllm":
            if engine.backend == "vllm":
                return FAIL, "VBATCH_ENGINE=vllm but no vLLM environment: run `vbatch engine install`"
            return WARN, ("no vLLM environment: batches run on the in-process transformers engine (slow); "
                          "`vbatch engine install` builds vLLM's")
        python = engine._vllm_python()
        versions = self._python_report(python, "import json, torch, vllm; print(json.dumps({'vllm': vllm.__version__,"
                                       " 'torch': torch.__version__, 'cuda': torch.version.cuda,"
                                       " 'cuda_ok': torch.cuda.is_available()}))")
        detail = f"vLLM {versions['vllm']}, torch {versions['torch']}" + \
            (f", CUDA {versions['cuda']}" if versions["cuda"] else " (CPU build)") + f" ({python})"
        if self.settings.engine.gpus and not versions["cuda_ok"]:
            return FAIL, detail + ": torch sees no CUDA device (driver and CUDA versions?)"
        return OK, detail

    def trainer(self) -> tuple[str, str]:
        trainer = self.resources.trainer
        backend = trainer.resolved_backend()
        python = trainer.training_python(backend)
        module = "unsloth" if backend == "unsloth" else "trl"
        versions = self._python_report(python, f"import json, torch, peft, {module}; print(json.dumps({{"
                                       f"'{module}': {module}.__version__, 'peft': peft.__version__, "
                                       "'torch': torch.__version__, 'cuda_ok': torch.cuda.is_available()}))")
        detail = f"{backend}: {module} {versions[module]}, peft {versions['peft']}, torch {versions['torch']}"
        if self.settings.engine.gpus and not versions["cuda_ok"]:
            return FAIL, detail + ": the trainer's torch sees no CUDA device"
        return OK, detail

    def memory(self) -> tuple[str, str]:
        from vbatch_pipelines.models.install import (
            available_memory,
            cpu_kv_cache_reservation,
            fit_check,
        )

        engine = self.resources.inference_engine
        model = self.resources.model_registry.resolve(None)
        config = json.loads((Path(model.path) / "config.json").read_text())
        available, device = available_memory(engine.gpus, engine.gpu_memory_utilization or 1.0)
        report = fit_check(config, gpus=engine.gpus, context=engine.max_model_len, available=available,
                           device=device, kv_reservation=None if engine.gpus else cpu_kv_cache_reservation(
                               config, engine.max_model_len, engine.kv_cache_sequences))
        detail = f"{model.id}: {report.describe()}"
        return (OK, detail) if report.fits else (FAIL, f"{detail}; {report.suggestion}")

    def disk(self) -> tuple[str, str]:
        """Free space on the store's disk, failing under the floor below which the API refuses new batches."""
        from vbatch_pipelines.retention import free_space, human_bytes, require_free_disk

        file_store = self.resources.file_store
        require_free_disk(file_store, self.resources.retention_policy.min_free_disk_percent, "batches")
        free, total = free_space(file_store.shared)
        return OK, f"{human_bytes(free)} free of {human_bytes(total)} ({file_store.shared})"

    def ports(self, up: dict | None, dagster_port: int) -> tuple[str, str]:
        from vbatch_pipelines.exposure import Addresses, check_ports

        if up is not None:
            return OK, f"vbatch up runs on this home (pid {up['pid']}, API {up['api_url']})"
        addresses = Addresses("127.0.0.1", self.settings.api.port, dagster_port)
        check_ports(addresses, self.resources)  # PortTaken names the holder
        return OK, f"free: API {addresses.api_port}, Dagster {addresses.dagster_port}" + \
            (f", Label Studio {self.settings.curation.label_studio_port}" if self.resources.label_studio.enabled
             and self.resources.label_studio.server() else "")

    def label_studio(self) -> tuple[str, str]:
        label_studio = self.resources.label_studio
        if not label_studio.enabled:
            return WARN, label_studio.disabled_reason or "curation is off"
        server = label_studio.server()
        if server is None:
            return (OK, f"external {label_studio.url} answers") if label_studio.reachable() else \
                (FAIL, f"external Label Studio {label_studio.url} does not answer (VBATCH_LABEL_STUDIO_URL)")
        if not server.installed():
            return FAIL, "Label Studio is not installed: run `vbatch label-studio install`"
        state = "running" if server.healthy() else "installed (started by `vbatch up`)"
        return OK, f"managed, {state}, port {server.port}, data {server.state_dir}"

    def dagster(self) -> tuple[str, str]:
        from vbatch_pipelines.supervisor import instance_env

        env = instance_env(self.settings)  # the instance `vbatch up` opens (its dagster.yaml written as up does)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", "import vbatch_pipelines.definitions as d; "
                               "print(len(list(d.defs.resolve_asset_graph().get_all_asset_keys())))"],
                              capture_output=True, text=True, timeout=300, env=env)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines()
            return FAIL, f"the code location does not load: {lines[-1] if lines else done.returncode}"
        from dagster import DagsterInstance

        with DagsterInstance.get() as instance:
            runs = instance.get_runs_count()
        return OK, (f"code location loads in {time.monotonic() - started:.1f}s ({done.stdout.strip()} assets); "
                    f"instance {self.settings.dagster.home} ({runs} runs)")

    # -- the loop on the real engines -------------------------------------------------------------
    def batch(self, client, requests: int) -> tuple[str, str]:
        lines = [json.dumps({"custom_id": f"doctor-{i}", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"messages": [{"role": "user", "content": f"Count to three, then say {i}."}],
                                      "max_tokens": 16, "temperature": 0}}) for i in range(requests)]
        started = time.monotonic()
        uploaded = client.files.create(file=("doctor.jsonl", "\n".join(lines).encode()), purpose="batch")
        batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                      completion_window="24h", metadata={"created_by": "vbatch doctor"})
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(1)
            batch = client.batches.retrieve(batch.id)
        took = time.monotonic() - started
        counts = batch.request_counts
        if batch.status != "completed" or counts.failed or counts.completed != requests:
            errors = "; ".join(e.message for e in (batch.errors.data if batch.errors else [])[:3])
            return FAIL, f"batch {batch.id} {batch.status}: {counts.completed}/{requests} completed {errors}"
        tokens = sum(json.loads(line)["response"]["body"]["usage"]["completion_tokens"]
                     for line in client.files.content(batch.output_file_id).text.splitlines() if line.strip())
        for file_id in (uploaded.id, batch.output_file_id):
            client.files.delete(file_id)
        return OK, (f"{requests} requests in {took:.1f}s from upload to results ({requests / took:.1f} req/s, "
                    f"{tokens / took:.0f} output tokens/s)")

    def fine_tune(self, client, steps: int) -> tuple[str, str]:
        model = self.resources.model_registry.resolve(None).id
        examples = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                             {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]})
                    for i in range(steps)]  # one epoch of batch size 1: one step per example
        started = time.monotonic()
        training = client.files.create(file=("doctor-train.jsonl", "\n".join(examples).encode()),
                                       purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=model, training_file=training.id, suffix="doctor",
                                             hyperparameters={"n_epochs": 1, "batch_size": 1},
                                             metadata={"created_by": "vbatch doctor"})
        while job.status not in ("succeeded", "failed", "cancelled"):
            time.sleep(2)
            job = client.fine_tuning.jobs.retrieve(job.id)
        took = time.monotonic() - started
        client.files.delete(training.id)
        if job.status != "succeeded":
            return FAIL, f"fine-tune {job.id} {job.status}: {job.error.message if job.error else ''}"
        checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
        last = max(checkpoints, key=lambda c: c.step_number) if checkpoints else None
        loss = f", train loss {last.metrics.train_loss:.3f}" if last and last.metrics.train_loss is not None else ""
        trained = last.step_number if last else steps
        if job.fine_tuned_model:
            try:
                client.models.delete(job.fine_tuned_model)  # the check leaves no model deployed
            except Exception:  # noqa: BLE001 - not deployed (the gate kept it back): nothing to undo
                pass
        return OK, f"{trained} LoRA steps on {model} in {took:.1f}s from upload to trained ({took / trained:.1f} s/step" \
                   f" end to end{loss}; {job.trained_tokens or 0} tokens)"

    # -- the whole visit --------------------------------------------------------------------------
    def run(self, *, smoke: bool = True, requests: int = 100, steps: int = 20, dagster_port: int = 3000) -> int:
        self.out(f"vbatch doctor (home {self.settings.storage.home})")
        up = ProcessRegistry(self.resources.file_store.run_dir).live_owner()
        for name, probe in (("GPU", self.gpu), ("engine", self.engine), ("trainer", self.trainer),
                            ("memory", self.memory), ("disk", self.disk),
                            ("ports", lambda: self.ports(up, dagster_port)),
                            ("Label Studio", self.label_studio), ("Dagster", self.dagster)):
            self.check(name, probe)
        if not smoke:
            return 1 if self.failed else 0
        if self.failed:
            self.report("smoke", FAIL, "skipped: fix the failures above first")
            return 1
        started_up = None
        try:
            if up is None:
                self.out("Starting `vbatch up` for the batch and fine-tune checks ...")
                started_up, up = self.start_up(dagster_port)
            client = self.client(up["api_url"])
            self.check("batch", lambda: self.batch(client, requests))
            self.check("fine-tune", lambda: self.fine_tune(client, steps))
        except Exception as exc:  # noqa: BLE001 - reported as a failure
            self.report("smoke", FAIL, f"{type(exc).__name__}: {exc}")
        finally:
            if started_up is not None:
                started_up.send_signal(signal.SIGTERM)
                started_up.wait(60)
        self.out("All checks passed." if not self.failed else "Some checks FAILED (see above).")
        return 1 if self.failed else 0

    def client(self, api_url: str):
        import openai

        key = (self.settings.api.admin_keys + self.settings.api.keys + ("unused",))[0]  # admin: it undeploys its model
        return openai.OpenAI(base_url=f"{api_url}/v1", api_key=key, max_retries=2, timeout=120)

    def start_up(self, dagster_port: int) -> tuple[subprocess.Popen, dict]:
        """`vbatch up` on this home, in the background, until its banner; its owner record."""
        log = self.resources.file_store.logs_dir / "doctor-up.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "wb") as out:
            process = subprocess.Popen([sys.executable, "-m", "vbatch_pipelines.cli", "up", "--dagster-port",
                                        str(dagster_port)], stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 900
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"`vbatch up` exited with {process.returncode}: see {log}")
            if "Ctrl-C stops everything" in log.read_text(errors="replace"):
                up = ProcessRegistry(self.resources.file_store.run_dir).live_owner()
                if up is not None:
                    return process, up
            time.sleep(1)
        process.send_signal(signal.SIGTERM)
        raise RuntimeError(f"`vbatch up` did not come up in 15 min: see {log}")

