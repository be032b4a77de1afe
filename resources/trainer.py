"""The trainer as a Dagster resource: LoRA fine-tuning out of process, through Dagster Pipes.

The training script (vbatch_pipelines/fine_tuning/lora.py) runs in the environment that has the right pins:
Unsloth's own virtualenv on a CUDA machine (it pins transformers<=5.17, trl<=1.15), this one (TRL + PEFT)
otherwise. Progress arrives as Pipes custom messages while it runs; a cancelled job interrupts it.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import Field

from resources.config import config_of
from vbatch_pipelines.detached import tail
from vbatch_pipelines.fine_tuning import (
    lora,  # stdlib-only at import: the script the trainer runs
)
from vbatch_pipelines.fine_tuning.unsloth_env import find_unsloth_python
from vbatch_pipelines.processes import die_with_parent
from vbatch_pipelines.settings import EngineSettings, TrainingSettings

SCRIPT = Path(lora.__file__).resolve()


def whole_line_reader(path: Path):
    """Dagster's file message reader, reading only whole lines. Its own tails the file with readline(), which
    returns a message the trainer is still writing as if it were a line: the JSON error stops its thread, and
    every later message (metrics, checkpoints) is lost. Seen on 2 loaded cores: 53 of 160 step metrics."""
    import time

    from dagster import PipesFileMessageReader

    class WholeLineFileMessageReader(PipesFileMessageReader):
        def _reader_thread(self, handler, is_resource_complete) -> None:
            try:
                with open(self._path, encoding="utf-8") as stream:
                    pending = ""
                    while True:
                        pending += stream.readline()
                        if pending.endswith("\n"):
                            handler.handle_message(json.loads(pending))
                            pending = ""
                        elif is_resource_complete.is_set():
                            pending += stream.read()  # what the process wrote before it ended
                            for line in pending.splitlines():
                                handler.handle_message(json.loads(line))
                            return
                        else:
                            time.sleep(0.01)
            except Exception:
                handler.report_pipes_framework_exception(f"{type(self).__name__} reader thread", sys.exc_info())
                raise

    return WholeLineFileMessageReader(str(path))


class TrainingFailed(RuntimeError):
    pass


class TrainingCancelled(RuntimeError):
    pass


class Trainer(config_of(TrainingSettings, also=[(EngineSettings, "gpus"), (EngineSettings, "max_lora_rank")])):
    """The training settings, the GPUs and the engine's largest LoRA rank (larger ranks are refused), and what
    only code sets."""

    python: str | None = Field(default=None, description="Python for the training process; default: chosen "
                                                         "by backend (the managed Unsloth env, or this one)")
    envs_dir: str = Field(description="where `vbatch trainer install` builds Unsloth's own virtualenv")
    stop_grace_s: float = 30.0

    def resolved_backend(self) -> str:
        if self.backend != "auto":
            return self.backend
        if self.gpus > 0 and find_unsloth_python(Path(self.envs_dir)):
            return "unsloth"
        return "trl"  # TRL + PEFT in this env, on the GPU when there is one

    def training_python(self, backend: str) -> str:
        if self.python:
            return self.python
        if backend == "unsloth":
            python = find_unsloth_python(Path(self.envs_dir))
            if python is None:
                raise TrainingFailed("Unsloth is not installed: run `vbatch trainer install` (needs a CUDA GPU), "
                                     "or set VBATCH_TRAINER=trl")
            return python
        return sys.executable

    def train(self, context, params: dict[str, Any], log_path: Path, *,
              on_messages: Callable[[list[dict[str, Any]]], None],
              should_stop: Callable[[], bool] = lambda: False, poll_s: float = 0.5) -> dict[str, Any]:
        """Run one training job; ``on_messages`` gets the metrics/checkpoint messages as they arrive.
        Returns the result the trainer wrote to ``<output_dir>/result.json``. Raises TrainingCancelled or
        TrainingFailed."""
        from dagster import PipesTempFileContextInjector, open_pipes_session

        backend = self.resolved_backend()
        python = self.training_python(backend)
        extras = {**params, "backend": backend}
        log_path.parent.mkdir(parents=True, exist_ok=True)
        result_path = Path(params["output_dir"]) / lora.RESULT_FILE
        result_path.unlink(missing_ok=True)  # a result left by an earlier attempt is not this one's
        cancelled = False
        messages = log_path.with_name(log_path.name + ".pipes")  # beside the log; removed when the session ends
        with open_pipes_session(context=context, context_injector=PipesTempFileContextInjector(),
                                message_reader=whole_line_reader(messages), extras=extras) as session:
            with open(log_path, "ab") as log:
                process = subprocess.Popen([python, str(SCRIPT)], stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL,
                                           env=_training_env(session.get_bootstrap_env_vars()),
                                           # a run worker killed outright takes its training with it
                                           preexec_fn=lambda: die_with_parent(signal.SIGKILL))
            seen = 0

            def take_messages() -> None:
                nonlocal seen
                messages = session.get_custom_messages()
                fresh = messages[seen:]
                seen = len(messages)
                if fresh:  # all that arrived since the last poll at once: one DB write, not one a step
                    on_messages(fresh)

            try:
                while process.poll() is None:
                    take_messages()
                    if not cancelled and should_stop():
                        cancelled = True
                        context.log.info("Training cancelled: interrupting the trainer")
                        _interrupt(process, self.stop_grace_s)
                        break
                    try:  # returns as soon as training ends, not at the next tick
                        process.wait(timeout=poll_s)
                    except subprocess.TimeoutExpired:
                        pass
            except BaseException:
                if process.poll() is None:  # the run itself was interrupted: do not leave training behind
                    _interrupt(process, self.stop_grace_s)
                raise
        take_messages()  # progress the reader took in after the last poll
        if cancelled:
            raise TrainingCancelled("Training was cancelled")
        if process.returncode != 0 or not result_path.is_file():
            raise TrainingFailed(f"The trainer exited with code {process.returncode}"
                                 + ("" if process.returncode else " without writing its result")
                                 + f"; last lines of {log_path}:\n{tail(log_path, 15)}")
        return json.loads(result_path.read_text(encoding="utf-8"))


def _interrupt(process: subprocess.Popen, grace_s: float) -> None:
    """SIGINT (as Dagster interrupts a run), then a kill when the trainer does not stop within the grace."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _training_env(bootstrap: dict[str, str]) -> dict[str, str]:
    from vbatch_pipelines.child_env import without_secrets

    # The base model is on disk: training needs none of vbatch's secrets (nor HF_TOKEN).
    env = without_secrets(**bootstrap, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env.setdefault("HF_HUB_OFFLINE", "1")  # the base model is on disk already; never reach for the hub
    return env

