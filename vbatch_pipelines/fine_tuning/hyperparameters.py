"""A fine-tuning job's hyperparameters: OpenAI's knobs (DPO's beta too) plus the LoRA recipe. Their own module (pydantic only), so
that loading the settings (VBATCH_RETRAIN_HYPERPARAMETERS is checked there) imports no more than it needs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vbatch_pipelines.fine_tuning import FineTuningError

BASE_LEARNING_RATE = 2e-4  # LoRA's usual rate; OpenAI's learning_rate_multiplier scales it


class Hyperparameters(BaseModel):
    """OpenAI's three knobs ("auto" or a value) plus the LoRA recipe; unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    lora_rank: int = Field(default=16, ge=1, le=256)
    lora_alpha: int | None = Field(default=None, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    max_length: int | None = Field(default=None, ge=16)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=1024)
    warmup_ratio: float = Field(default=0.0, ge=0, lt=1)
    qlora: bool = False
    merge: bool = False

    def resolved(self, train_examples: int, model_max_length: int | None) -> dict[str, Any]:
        """Concrete values for "auto" (OpenAI's convention: the service picks from the data)."""
        n_epochs = 3 if self.n_epochs == "auto" else self.n_epochs
        batch_size = max(1, min(8, train_examples // 10)) if self.batch_size == "auto" else self.batch_size
        multiplier = 1.0 if self.learning_rate_multiplier == "auto" else self.learning_rate_multiplier
        max_length = self.max_length or min(1024, model_max_length or 1024)
        if model_max_length and max_length > model_max_length:
            raise FineTuningError(f"max_length {max_length} exceeds the model's context of {model_max_length} tokens",
                                  "hyperparameters.max_length", "invalid_value")
        for name, value in (("n_epochs", n_epochs), ("batch_size", batch_size)):
            if not 1 <= value <= 256:
                raise FineTuningError(f"{name} must be between 1 and 256", f"hyperparameters.{name}",
                                      "invalid_value")
        if not 0 < multiplier <= 100:
            raise FineTuningError("learning_rate_multiplier must be in (0, 100]",
                                  "hyperparameters.learning_rate_multiplier", "invalid_value")
        return {
            **self.model_dump(), "n_epochs": n_epochs, "batch_size": batch_size,
            "learning_rate_multiplier": multiplier, "max_length": max_length,
            "learning_rate": self.learning_rate or BASE_LEARNING_RATE * multiplier,
            "lora_alpha": self.lora_alpha or 2 * self.lora_rank,
        }


class DpoHyperparameters(Hyperparameters):
    """DPO's: OpenAI's ``beta`` (how far the fine-tune may move from the model it starts from; "auto": 0.1) and
    vbatch's ``sft_weight``: a weight > 0 adds the chosen answers' language-model loss (DPO then also learns to say
    them, not only to prefer them; 0, the default, is plain DPO)."""

    beta: float | Literal["auto"] = "auto"
    sft_weight: float = Field(default=0.0, ge=0, le=10)

    def resolved(self, train_examples: int, model_max_length: int | None) -> dict[str, Any]:
        beta = 0.1 if self.beta == "auto" else self.beta
        if not 0 < beta <= 10:
            raise FineTuningError("beta must be in (0, 10]", "hyperparameters.beta", "invalid_value")
        return {**super().resolved(train_examples, model_max_length), "beta": beta}


METHODS = {"supervised": Hyperparameters, "dpo": DpoHyperparameters}


def parse_hyperparameters(raw: dict[str, Any] | None, method: str = "supervised") -> Hyperparameters:
    only_dpo = sorted(set(raw or {}) & (set(DpoHyperparameters.model_fields) - set(Hyperparameters.model_fields)))
    if method != "dpo" and only_dpo:
        raise FineTuningError(f"hyperparameters.{only_dpo[0]} is a DPO hyperparameter; this job's method is "
                              f"{method}", f"hyperparameters.{only_dpo[0]}", "invalid_value")
    try:
        return METHODS[method].model_validate(raw or {})
    except ValidationError as exc:
        first = exc.errors()[0]
        # the field, not the member of its union that failed last (beta.float)
        param = "hyperparameters" + "".join(f".{part}" for part in first["loc"][:1])
        raise FineTuningError(f"{param}: {first['msg']}", param, "invalid_value") from exc
