"""Fine-tuning: jobs (``service``), their training data (``training_data``), the trainer script (``lora``, run out
of process), comparison, reports and retraining."""

from typing import Literal

from vbatch_pipelines.errors import VbatchError

TrainerBackend = Literal["auto", "unsloth", "trl"]  # auto: Unsloth with a GPU and its env, else TRL


class FineTuningError(VbatchError):
    """A request about fine-tuning that cannot be accepted (HTTP 400, or 404 with code *_not_found)."""
