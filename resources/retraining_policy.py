"""How fine-tunes are judged, deployed and retrained: one typed resource instead of settings read mid-run.

A value outside its ``Literal`` fails when the resource is built, i.e. when the code location loads
(``load_settings`` names the environment variable and the allowed values), never deep inside a run after
training and comparison have spent their time.
"""

from __future__ import annotations

from resources.config import config_of
from vbatch_pipelines.settings import RetrainSettings


class RetrainingPolicy(config_of(RetrainSettings, exclude=["cron"])):
    """RetrainSettings but the schedule (the code location builds that from the setting)."""
