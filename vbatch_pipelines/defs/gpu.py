"""Training time-shares the GPU with inference.

Batch steps claim one slot of the `inference` pool each and run side by side on the warm engine. A step
that needs the GPU to itself (training, a comparison, an install's smoke test) claims a `gpu` slot like
any pool step, then every `inference` slot: running batch steps finish first, new ones wait until it is
done. The claims go through Dagster's own pool storage, so the UI's pool page shows who holds what, and run
monitoring frees the slots of a run that died.

On Kubernetes the pool still says when a `gpu` step may run; the GPU itself comes with the run's pod, which
asks for it through the ``dagster-k8s/config`` tag of the jobs holding `gpu` steps (``gpu_run_tags``). Such a
run shares no GPU with the engines (they are Deployments with GPUs of their own), so it does not drain the
`inference` pool: batches cluster-wide keep running while it trains.
"""

from __future__ import annotations

import json

K8S_CONFIG_TAG = "dagster-k8s/config"  # dagster-k8s's USER_DEFINED_K8S_CONFIG_KEY (dagster-k8s is optional here)
GPU_RESOURCE = "nvidia.com/gpu"  # the NVIDIA device plugin's resource name


def gpu_run_tags(gpus: int) -> dict[str, str]:
    """Tags for a job with `gpu` steps. Its steps run in the run's own process (in-process executor), so on
    Kubernetes (K8sRunLauncher) the GPU is asked for by the run's pod, from the run's tags: ``gpus`` GPUs,
    and a toleration for the taint GPU node pools usually carry. No tag for 0 (one machine); launchers other
    than Dagster's Kubernetes ones ignore it."""
    if not gpus:
        return {}
    config = {"container_config": {"resources": {"limits": {GPU_RESOURCE: gpus}}},
              "pod_spec_config": {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists",
                                                   "effect": "NoSchedule"}]}}
    return {K8S_CONFIG_TAG: json.dumps(config, separators=(",", ":"))}


def has_gpu_of_its_own(tags: dict[str, str]) -> bool:
    """Whether a run with these tags asks Kubernetes for GPUs of its own (``gpu_run_tags``)."""
    try:
        config = json.loads(tags.get(K8S_CONFIG_TAG) or "{}")
        return int(config["container_config"]["resources"]["limits"][GPU_RESOURCE]) > 0
    except (ValueError, TypeError, KeyError):
        return False
