"""How fine-tunes are judged, deployed and retrained: one typed resource instead of settings read mid-run.

A value outside its ``Literal`` fails when the resource is built, i.e. when the code location loads
(``load_settings`` names the environment variable and the allowed values), never deep inside a run after
training and comparison have spent their time.
"""

from __future__ import annotations

from typing import Any

from dagster import ConfigurableResource
from pydantic import Field

from vbatch_pipelines.fine_tuning.comparison import DeployGate, GateMetric


class RetrainingPolicy(ConfigurableResource):
    model: str | None = Field(default=None, description="the base model retrains fine-tune (VBATCH_RETRAIN_MODEL); "
                                                        "default: the default model")
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="as the fine-tuning API takes "
                                                                              "them (VBATCH_RETRAIN_HYPERPARAMETERS)")
    min_gold_stars: int = Field(default=100, ge=1, description="new gold stars that trigger a retrain "
                                                               "(VBATCH_RETRAIN_MIN_GOLD_STARS)")
    deploy_gate: DeployGate = Field(default="no_worse", description="whether retrains deploy (VBATCH_DEPLOY_GATE)")
    gate_metric: GateMetric = Field(default="normalized_match", description="what no_worse compares "
                                                                            "(VBATCH_GATE_METRIC)")
    eval_set: str | None = Field(default=None, description="a fixed eval set (eval_...) retrains are compared on "
                                                           "instead of each job's own split (VBATCH_RETRAIN_EVAL_SET)")
    judge_model: str | None = Field(default=None, description="an LLM judge for model_comparison "
                                                              "(VBATCH_JUDGE_MODEL)")
