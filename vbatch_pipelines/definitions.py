"""The vbatch code location: the domains' definitions merged with the resources. Loads fast (no torch,
vLLM or transformers import) and reads the settings here, once: nothing inside Dagster reads them again.
A setting vbatch cannot use stops the location from loading with a message naming it."""

from dagster import Definitions

from resources.factory import build_resources
from vbatch_pipelines.defs import batches, curation, evals, fine_tuning, models, retention, retraining
from vbatch_pipelines.extensions import enable
from vbatch_pipelines.settings import load_settings

SETTINGS = load_settings()
EXTENSIONS = enable(SETTINGS)  # VBATCH_EXTENSIONS: their review schemas registered here, their parts added below
RESOURCES = build_resources(SETTINGS, extensions=EXTENSIONS)

DOMAINS = [
    batches.build_defs(curation=SETTINGS.curation.enabled),
    curation.defs,
    models.build_defs(run_gpus=SETTINGS.cluster.k8s_run_gpus),
    fine_tuning.build_defs(run_gpus=SETTINGS.cluster.k8s_run_gpus),
    evals.build_defs(run_gpus=SETTINGS.cluster.k8s_run_gpus),
    retraining.build_defs(RESOURCES["retraining_policy"], SETTINGS.storage.database_url, SETTINGS.retrain.cron),
    retention.build_defs(SETTINGS.retention.cron),
]
DOMAINS += [extension.definitions() for extension in EXTENSIONS if extension.definitions is not None]

defs = Definitions.merge(*DOMAINS, Definitions(resources=RESOURCES))
