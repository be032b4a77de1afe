"""deploy/kubernetes/ checked without a cluster: every manifest against Kubernetes' own schemas (strict: an
unknown field fails), the names they refer to against what they define, the engine against the argv vbatch
starts vLLM with, the Helm values against Dagster's own config schemas, and the Kubernetes Job that
dagster-k8s's K8sRunLauncher builds for each of vbatch's jobs (GPU, image, env), by Dagster's own code.
Each validator is also fed a broken input, to show it would catch one."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "kubernetes"
VALUES = DEPLOY / "dagster-values.yaml"
KUSTOMIZATION = DEPLOY / "kustomization.yaml"
RELEASE, NAMESPACE = "dagster", "vbatch"  # the Helm release and namespace the README's commands use
CHART_INSTANCE_CONFIGMAP = f"{RELEASE}-instance"  # the Dagster instance config Dagster's chart writes
# The oldest Kubernetes still commonly run by managed clusters, and the newest kubernetes-validate knows.
K8S_VERSIONS = ("1.30", kubernetes_validate.utils.latest_version())
GPU_JOBS = {"fine_tuning_job", "installed_model_job", "eval_score_job"}
WORKLOADS = ("Deployment", "StatefulSet", "Job")


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> dict[str, list[dict]]:
    """The files `kubectl apply -k` applies (kustomization.yaml's resources), by file name."""
    return {name: _docs(DEPLOY / name) for name in _docs(KUSTOMIZATION)[0]["resources"]}


def _resources() -> list[dict]:
    return [doc for docs in _manifests().values() for doc in docs]


def _by_kind(kind: str) -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc for doc in _resources() if doc["kind"] == kind}


def _config() -> dict[str, str]:
    return _by_kind("ConfigMap")["vbatch-config"]["data"]


def _generated_secrets() -> dict[str, set[str]]:
    """The Secrets kustomize generates, with the keys their example env files name."""
    secrets = {}
    for generator in _docs(KUSTOMIZATION)[0]["secretGenerator"]:
        keys = set()
        for env_file in generator["envs"]:
            for line in (DEPLOY / f"{env_file}.example").read_text().splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    keys.add(line.split("=", 1)[0].strip())
        secrets[generator["name"]] = keys
    return secrets


def _pod_specs() -> dict[str, dict]:
    return {doc["metadata"]["name"]: doc["spec"]["template"]["spec"] for doc in _resources()
            if doc["kind"] in WORKLOADS}


def _k8s_error(resource: dict, version: str) -> str | None:
    try:
        kubernetes_validate.validate(resource, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return str(exc)
    return None


# -- the manifests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version):
    resources = _resources()
    assert {doc["kind"] for doc in resources} >= {"Namespace", "ConfigMap", "PersistentVolumeClaim", "Service",
                                                  "StatefulSet", "Deployment", "Job"}
    errors = {f"{doc['kind']}/{doc['metadata']['name']}": _k8s_error(doc, version) for doc in resources}
    assert {name: error for name, error in errors.items() if error} == {}


def test_the_schema_check_refuses_broken_manifests():
    api = _by_kind("Deployment")["vbatch-api"]
    typo = copy.deepcopy(api)
    typo["spec"]["template"]["spec"]["containers"][0]["envForm"] = typo["spec"]["template"]["spec"]["containers"][0].pop("envFrom")
    wrong_type = copy.deepcopy(api)
    wrong_type["spec"]["replicas"] = "two"
    no_containers = copy.deepcopy(api)
    del no_containers["spec"]["template"]["spec"]["containers"]
    for broken in (typo, wrong_type, no_containers):
        assert _k8s_error(broken, K8S_VERSIONS[0])


def test_kustomization_applies_every_manifest_and_no_secret_value():
    listed = set(_docs(KUSTOMIZATION)[0]["resources"])
    on_disk = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", VALUES.name}
    assert listed == on_disk
    tracked = subprocess.run(["git", "ls-files", "deploy/kubernetes/secrets"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    for path in tracked:  # only examples (and the rule that keeps filled-in files out)
        assert path.endswith((".gitignore", ".env.example")), path
    assert "*.env" in (DEPLOY / "secrets" / ".gitignore").read_text().split()
    assert not [doc for doc in _resources() if doc["kind"] == "Secret"]  # generated from the env files only


def _refs(spec: dict) -> set[tuple[str, str, str | None]]:
    """(kind, name, key) of every ConfigMap, Secret and claim a pod spec refers to."""
    refs = set()
    for container in spec.get("containers", []) + spec.get("initContainers", []):
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                refs.add(("ConfigMap", source["configMapRef"]["name"], None))
            if "secretRef" in source:
                refs.add(("Secret", source["secretRef"]["name"], None))
        for var in container.get("env", []):
            for kind, field in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                if field in var.get("valueFrom", {}):
                    refs.add((kind, var["valueFrom"][field]["name"], var["valueFrom"][field]["key"]))
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            refs.add(("ConfigMap", volume["configMap"]["name"], None))
        if "persistentVolumeClaim" in volume:
            refs.add(("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"], None))
    return refs


def _dangling(specs: dict[str, dict]) -> list[str]:
    secrets = _generated_secrets()
    configmaps = {name: set(doc.get("data", {})) for name, doc in _by_kind("ConfigMap").items()}
    defined = {"Secret": secrets, "ConfigMap": {**configmaps, CHART_INSTANCE_CONFIGMAP: {"dagster.yaml"}},
               "PersistentVolumeClaim": {name: set() for name in _by_kind("PersistentVolumeClaim")}}
    return [f"{owner}: {kind} {name}" + (f" key {key}" if key else "")
            for owner, spec in specs.items() for kind, name, key in sorted(_refs(spec), key=str)
            if name not in defined[kind] or (key is not None and key not in defined[kind][name])]


def test_every_name_a_pod_refers_to_is_defined():
    """ConfigMaps, Secrets (and their keys) and claims exist (the chart's instance ConfigMap comes with
    `helm install`); each Service selects a pod that has the port it targets."""
    assert _dangling(_pod_specs()) == []
    broken = copy.deepcopy(_pod_specs())
    broken["vbatch-api"]["containers"][0]["env"][1]["valueFrom"]["secretKeyRef"]["key"] = "password"
    assert _dangling(broken) == ["vbatch-api: Secret dagster-postgresql-secret key password"]
    pods = [(doc["spec"]["template"]["metadata"]["labels"], spec) for doc, spec in
            ((doc, doc["spec"]["template"]["spec"]) for doc in _resources() if doc["kind"] in WORKLOADS)]
    for name, service in _by_kind("Service").items():
        selected = [spec for labels, spec in pods if service["spec"]["selector"].items() <= labels.items()]
        assert selected, f"Service {name} selects no pod"
        ports = {port["name"] for spec in selected for c in spec["containers"] for port in c.get("ports", [])}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports, name


def test_vbatch_finds_the_engines_dagster_and_its_databases_by_these_names():
    config, services = _config(), _by_kind("Service")
    for entry in config["VBATCH_ENGINES"].split(","):
        model, url = entry.split("=", 1)
        host, port = url.removeprefix("http://").split(":")
        assert host in services and int(port) in {p["port"] for p in services[host]["spec"]["ports"]}, entry
        engine = _by_kind("Deployment")[host]["spec"]["template"]["spec"]["containers"][0]["args"]
        assert engine[engine.index("--served-model-name") + 1] == model
    assert config["VBATCH_DAGSTER_URL"] == f"http://{RELEASE}-dagster-webserver:80"  # the chart's Service
    values = yaml.safe_load(VALUES.read_text())
    assert values["postgresql"]["postgresqlHost"] in services
    database_url = (DEPLOY / "secrets" / "vbatch.env.example").read_text()
    assert f"@{values['postgresql']['postgresqlHost']}:5432/vbatch" in database_url
    assert "CREATE DATABASE " + values["postgresql"]["postgresqlDatabase"] in \
        _by_kind("ConfigMap")["postgres-init"]["data"]["10-dagster.sql"]
    assert values["global"]["postgresqlSecretName"] in _generated_secrets()
    assert "postgresql-password" in _generated_secrets()[values["global"]["postgresqlSecretName"]]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) is not installed")
def test_kustomize_renders_the_manifests_with_the_generated_secrets(tmp_path):
    """What `kubectl apply -k` would send, rendered offline from a copy with the example env files."""
    copy_dir = tmp_path / "kubernetes"
    shutil.copytree(DEPLOY, copy_dir)
    for example in (copy_dir / "secrets").glob("*.env.example"):
        example.rename(example.with_name(example.name.removesuffix(".example")))
    rendered = subprocess.run(["kubectl", "kustomize", str(copy_dir)], capture_output=True, text=True,
                              timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    docs = [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]
    assert {doc["metadata"].get("namespace") for doc in docs if doc["kind"] != "Namespace"} == {NAMESPACE}
    assert {doc["metadata"]["name"] for doc in docs if doc["kind"] == "Secret"} == set(_generated_secrets())
    images = {c["image"] for doc in docs if doc["kind"] in WORKLOADS
              for c in doc["spec"]["template"]["spec"]["containers"] + doc["spec"]["template"]["spec"].get(
                  "initContainers", [])}
    assert "registry.example.com/vbatch:0.1.0" in images and "registry.example.com/vbatch" not in images
    assert [f"{doc['kind']}/{doc['metadata']['name']}" for doc in docs if _k8s_error(doc, K8S_VERSIONS[0])] == []


# -- the engine --------------------------------------------------------------------------------------


def test_the_engine_runs_as_vbatch_runs_vllm(tmp_path):
    """The Deployment's command is ManagedVLLMServer's argv on a GPU (same model, batch middleware, LoRA
    flags, memory share), listening on the pod's address and without sleep mode; the image is vbatch's
    vLLM pin and the modules it loads (batch middleware, tool parser) exist and are copied from the vbatch
    image."""
    from resources.file_store import FileStore
    from vbatch_pipelines.engine.vllm_server import ManagedVLLMServer, VLLMServerConfig
    from vbatch_pipelines.models.registry import TINY_MODEL_ID, ModelSpec

    config = _config()
    container = _by_kind("Deployment")["vllm-vbatch-tiny-chat"]["spec"]["template"]["spec"]["containers"][0]
    model = ModelSpec(TINY_MODEL_ID, str(FileStore(root=config["VBATCH_HOME"]).tiny_model_path))
    server = ManagedVLLMServer(model, tmp_path, VLLMServerConfig(
        python="python3", gpus=1, max_lora_rank=int(config["VBATCH_MAX_LORA_RANK"]), gpu_memory_utilization=0.9))
    expected = [arg for arg in server.argv(8000) if arg != "--enable-sleep-mode"]
    expected[expected.index("--host") + 1] = "0.0.0.0"
    assert container["command"] + container["args"] == expected
    pin = next(line for line in (ROOT / "vbatch_pipelines/engine/vllm-cuda.txt").read_text().splitlines()
               if line.startswith("vllm=="))
    assert container["image"] == f"vllm/vllm-openai:v{pin.removeprefix('vllm==')}"
    middlewares = [expected[i + 1].rsplit(".", 1)[0] for i, arg in enumerate(expected) if arg == "--middleware"]
    tool_parser = expected[expected.index("--tool-parser-plugin") + 1]
    assert "vbatch_pipelines.engine.vllm_guard" in middlewares
    for module in (*middlewares, tool_parser):
        path = module.replace(".", "/") + ".py"
        assert (ROOT / path).exists() and f"/opt/vbatch/{path}" in str(_by_kind("Deployment")["vllm-vbatch-tiny-chat"])
    assert {"name": "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "value": "True"} in container["env"]
    from vbatch_pipelines.engine.vllm_guard import ADAPTER_ROOTS_ENV, KEY_ENV

    env = {item["name"]: item for item in container["env"]}
    # the engine's key, from the Secret vbatch reads VBATCH_ENGINES_API_KEY from; adapters only from the store
    assert env[KEY_ENV]["valueFrom"]["secretKeyRef"] == {"name": "vbatch-secrets", "key": "VBATCH_ENGINES_API_KEY"}
    store = FileStore(root=config["VBATCH_HOME"], store=config.get("VBATCH_STORE"))
    assert env[ADAPTER_ROOTS_ENV]["value"].split(":") == [str(store.fine_tunes_dir), str(store.models_dir)]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


# -- the Helm values ---------------------------------------------------------------------------------


def test_the_code_location_and_the_instance_config_are_what_vbatch_expects():
    """The user deployment serves vbatch's code location under the name vbatch launches runs in, and the
    extra instance config passes Dagster's own instance schema (a wrong key does not)."""
    from dagster._config import validate_config
    from dagster._core.instance.config import dagster_instance_config_schema

    from vbatch_pipelines.names import LOCATION_NAME

    values = yaml.safe_load(VALUES.read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["name"] == LOCATION_NAME
    assert deployment["dagsterApiGrpcArgs"] == ["-m", "vbatch_pipelines.definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher" and not values["dagsterDaemon"]["runRetries"]["enabled"]
    schema = dagster_instance_config_schema()
    extra = values["additionalInstanceConfig"]
    assert validate_config(schema, extra).success
    assert extra["concurrency"]["pools"]["granularity"] == yaml.safe_load(
        (ROOT / "dagster.yaml").read_text())["concurrency"]["pools"]["granularity"]
    assert not validate_config(schema, {**extra, "run_retries": {"enabled": True, "retry_on_op_failure": False}}).success


CHART_SCHEMA = os.environ.get("VBATCH_DAGSTER_CHART_SCHEMA")


def _chart_schema_errors(values: dict, schema: dict) -> list[str]:
    """The chart's values.schema.json against these values alone: `required` is dropped (Helm merges the
    chart's defaults first) and its references to Kubernetes types resolve to kubernetes-validate's copy."""
    from importlib.resources import files

    import jsonschema
    import referencing

    def drop_required(node):
        if isinstance(node, dict):
            return {k: drop_required(v) for k, v in node.items() if k != "required"}
        return [drop_required(v) for v in node] if isinstance(node, list) else node

    bundled = json.loads(files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{K8S_VERSIONS[0]}.0-local/_definitions.json").read_text())
    definitions = {**bundled, "definitions": bundled["$defs"]}  # the chart points into `definitions`

    def retrieve(uri: str):
        return referencing.Resource.from_contents(definitions)

    registry = referencing.Registry(retrieve=retrieve)
    validator = jsonschema.Draft7Validator(drop_required(schema), registry=registry)
    return [f"{'.'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(values)]


@pytest.mark.skipif(not CHART_SCHEMA, reason="set VBATCH_DAGSTER_CHART_SCHEMA to the values.schema.json of "
                                             "Dagster's chart (helm/dagster in dagster-io/dagster)")
def test_the_helm_values_fit_the_charts_schema():
    schema = json.loads(Path(CHART_SCHEMA).read_text())
    values = yaml.safe_load(VALUES.read_text())
    assert _chart_schema_errors(values, schema) == []
    broken = copy.deepcopy(values)
    broken["runLauncher"]["config"]["k8sRunLauncher"]["gpus"] = 1  # no such key
    broken["dagsterDaemon"]["runCoordinator"]["type"] = "FastRunCoordinator"
    assert len(_chart_schema_errors(broken, schema)) >= 2


# -- the Kubernetes Jobs of vbatch's runs ------------------------------------------------------------


def _chart_container_context(values: dict) -> dict:
    """The container context Dagster's chart gives the code server and so its runs
    (dagster-user-deployments' k8sContainerContext helper, includeConfigInLaunchedRuns), for the fields
    vbatch's values set."""
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return {"k8s": {
        "image_pull_policy": deployment["image"]["pullPolicy"],
        "env_config_maps": [f"{RELEASE}-{deployment['name']}-user-env",
                            *(c["name"] for c in deployment.get("envConfigMaps", []))],
        "env_secrets": [s["name"] for s in deployment.get("envSecrets", [])],
        "volume_mounts": deployment.get("volumeMounts", []),
        "volumes": deployment.get("volumes", []),
        "namespace": NAMESPACE,
        "run_k8s_config": {"pod_spec_config": {"automount_service_account_token": True}},
    }}


def _chart_launcher_config(values: dict) -> dict:
    """The K8sRunLauncher config Dagster's chart writes into the instance (its run-launcher helper)."""
    launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    run_k8s = launcher.get("runK8sConfig", {})
    keys = {"containerConfig": "container_config", "podSpecConfig": "pod_spec_config",
            "podTemplateSpecMetadata": "pod_template_spec_metadata", "jobSpecConfig": "job_spec_config",
            "jobMetadata": "job_metadata"}
    return {
        "load_incluster_config": launcher["loadInclusterConfig"],
        "job_namespace": launcher.get("jobNamespace") or NAMESPACE,
        "image_pull_policy": launcher["imagePullPolicy"],
        "service_account_name": RELEASE,
        "dagster_home": "/opt/dagster/dagster_home",
        "instance_config_map": CHART_INSTANCE_CONFIGMAP,
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "env_config_maps": [c["name"] for c in launcher.get("envConfigMaps", [])],
        "env_secrets": [s["name"] for s in launcher.get("envSecrets", [])],
        "resources": launcher.get("resources", {}),
        "run_k8s_config": {keys[k]: v for k, v in run_k8s.items()},
    }


class _JobsSent:
    """Where the launcher's BatchV1Api calls go: the Kubernetes API server this machine has none of. It
    keeps what would have been created."""

    def __init__(self):
        self.jobs = []

    def create_namespaced_job(self, body, namespace, **_):
        self.jobs.append((namespace, body))
        return body


KUBECONFIG = """apiVersion: v1
kind: Config
clusters: [{name: none, cluster: {server: "https://127.0.0.1:9"}}]
users: [{name: none, user: {token: none}}]
contexts: [{name: none, context: {cluster: none, user: none}}]
current-context: none
"""


def print_run_jobs() -> None:
    """Run in a subprocess (the code location reads its settings once, at import): for each of vbatch's jobs,
    a run as vbatch creates it, launched by a K8sRunLauncher configured as the chart configures it; prints
    the Kubernetes Job each launch creates."""
    import kubernetes
    from dagster import DagsterInstance
    from dagster._config import process_config
    from dagster._core.code_pointer import ModuleCodePointer
    from dagster._core.launcher import LaunchRunContext
    from dagster._core.origin import JobPythonOrigin, RepositoryPythonOrigin
    from dagster_k8s import K8sRunLauncher

    import vbatch_pipelines.definitions as location
    from vbatch_pipelines import names

    values = yaml.safe_load(VALUES.read_text())
    image = "{repository}:{tag}".format(**values["dagster-user-deployments"]["deployments"][0]["image"])
    tags_for = {names.FINE_TUNING_JOB: names.fine_tuning_run_tags("ftjob-k8s"),
                names.INSTALL_MODEL_JOB: names.install_run_tags("vbatch-tiny-chat"),
                names.BATCH_JOB: names.batch_run_tags(["batch_k8s"]),
                names.EVAL_SCORE_JOB: names.eval_run_tags("evalrun_k8s", "eval_k8s", "vbatch-tiny-chat")}
    sent, out = _JobsSent(), {}
    with tempfile.TemporaryDirectory() as tmp, DagsterInstance.local_temp(tmp) as instance:
        (Path(tmp) / "kubeconfig").write_text(KUBECONFIG)
        config = process_config(K8sRunLauncher.config_type(), _chart_launcher_config(values))
        assert config.success, config.errors
        launcher = K8sRunLauncher(**{**config.value, "load_incluster_config": False,
                                     "kubeconfig_file": str(Path(tmp) / "kubeconfig")}, k8s_client_batch_api=sent)
        launcher.register_instance(instance)
        repository = RepositoryPythonOrigin(
            executable_path="/usr/local/bin/python", code_pointer=ModuleCodePointer("vbatch_pipelines.definitions", "defs", None),
            container_image=image, container_context=_chart_container_context(values))
        for job in location.defs.get_repository_def().get_all_jobs():
            if job.name.startswith("__"):  # the implicit asset job: vbatch launches its named jobs
                continue
            run = instance.create_run_for_job(job, tags={**job.run_tags, **tags_for.get(job.name, {})},
                                              job_code_origin=JobPythonOrigin(job.name, repository))
            launcher.launch_run(LaunchRunContext(dagster_run=run, workspace=None))
            namespace, body = sent.jobs[-1]
            pools = {node.definition.pool for node in job.nodes_in_topological_order} - {None}
            out[job.name] = {"pools": sorted(pools), "tags": dict(job.tags), "run_tags": dict(job.run_tags),
                             "namespace": namespace,
                             "job": kubernetes.client.ApiClient().sanitize_for_serialization(body)}
    print(json.dumps(out))


@pytest.fixture(scope="module")
def run_jobs(tmp_path_factory) -> dict:
    """The Jobs for a code location loaded with the ConfigMap's settings, as in the cluster."""
    home = tmp_path_factory.mktemp("k8s-home")
    env = {**os.environ, **_config(), "VBATCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", "from tests.test_kubernetes import print_run_jobs; print_run_jobs()"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_gpu_bound_jobs_run_in_pods_with_gpus_the_vbatch_image_and_its_env(run_jobs):
    values = yaml.safe_load(VALUES.read_text())
    image = "{repository}:{tag}".format(**values["dagster-user-deployments"]["deployments"][0]["image"])
    gpus = int(_config()["VBATCH_K8S_RUN_GPUS"])
    assert {name for name, job in run_jobs.items() if "gpu" in job["pools"]} == GPU_JOBS
    assert set(run_jobs) >= GPU_JOBS | {"batch_job"}
    for name, launched in run_jobs.items():
        spec = launched["job"]["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        limits = container["resources"].get("limits", {})
        if name in GPU_JOBS:
            # Both launch paths carry the tag: the API's GraphQL launch takes the job's tags, sensors its run tags.
            assert launched["tags"] == launched["run_tags"] and "dagster-k8s/config" in launched["tags"]
            assert limits["nvidia.com/gpu"] == str(gpus), name  # a Kubernetes quantity
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        else:
            assert "nvidia.com/gpu" not in limits and "dagster-k8s/config" not in launched["tags"], name
        assert launched["namespace"] == NAMESPACE
        assert container["image"] == image
        assert container["args"][:5] == ["/usr/local/bin/python", "-m", "dagster", "api", "execute_run"]
        # The base resources of every run pod (the launcher's), merged with the tag's GPUs.
        assert container["resources"]["requests"] == {"cpu": "1", "memory": "4Gi"} and limits["memory"] == "48Gi"
        sources = {(next(iter(s)), s[next(iter(s))]["name"]) for s in container["envFrom"]}
        assert {("configMapRef", "vbatch-config"), ("secretRef", "vbatch-secrets")} <= sources
        assert ("secretRef", "vbatch-api-keys") not in sources  # runs never get the API keys
        env = {var["name"]: var for var in container["env"]}
        assert env["DAGSTER_PG_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == values["global"]["postgresqlSecretName"]
        assert env["DAGSTER_RUN_JOB_NAME"]["value"] == name
        assert {"name": "vbatch-home", "mountPath": "/var/lib/vbatch"} in container["volumeMounts"]
        assert spec["securityContext"]["fsGroup"] == 10001
        assert _k8s_error(launched["job"], K8S_VERSIONS[0]) is None


def test_a_gpu_tag_dagster_k8s_reads_and_none_on_one_machine(monkeypatch):
    """The tag is what dagster-k8s parses into the pod's GPU limit; the default settings give no tag, so a
    single machine's jobs are as they were."""
    from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY, get_user_defined_k8s_config

    from vbatch_pipelines.defs import fine_tuning, models
    from vbatch_pipelines.defs.gpu import K8S_CONFIG_TAG, gpu_run_tags
    from vbatch_pipelines.settings import SettingsError, load_settings

    assert K8S_CONFIG_TAG == USER_DEFINED_K8S_CONFIG_KEY
    parsed = get_user_defined_k8s_config(gpu_run_tags(2))
    assert parsed.container_config["resources"]["limits"] == {"nvidia.com/gpu": 2}
    assert gpu_run_tags(0) == {}
    monkeypatch.delenv("VBATCH_K8S_RUN_GPUS", raising=False)
    assert load_settings().cluster.k8s_run_gpus == 0
    for build in (fine_tuning.build_defs, models.build_defs):
        (job,) = build(run_gpus=0).jobs
        assert not job.tags
    monkeypatch.setenv("VBATCH_K8S_RUN_GPUS", "-1")
    with pytest.raises(SettingsError, match="VBATCH_K8S_RUN_GPUS"):
        load_settings()
