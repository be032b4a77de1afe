"""No secret in the resource configuration the Dagster UI shows.

The UI lists every resource's configured values; a secret passed as plain config would be on that page for
anyone who can open it. So secrets from the environment are passed as ``EnvVar`` (the UI shows the variable's
name) and the managed Label Studio's are read from its credentials file at run time. These tests load the
code location in a subprocess, as the webserver does, and read it through Dagster's own GraphQL API.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# The code location, by path (importing it here would load the settings in the test process).
DEFINITIONS = str(Path(__file__).resolve().parents[1] / "vbatch_pipelines" / "definitions.py")

RESOURCES_QUERY = """
query Resources($selector: RepositorySelector!) {
  allTopLevelResourceDetailsOrError(repositorySelector: $selector) {
    __typename
    ... on ResourceDetailsList {
      results { name configuredValues { key value type } nestedResources { name type } }
    }
    ... on PythonError { message stack }
  }
}
"""


def shown_resources() -> tuple[str, dict[str, dict[str, dict]]]:
    """What the UI's resources page gets: the whole response as text, and name -> key -> configured value."""
    from dagster import instance_for_test
    from dagster_graphql.test.utils import (
        define_out_of_process_context,
        execute_dagster_graphql,
        infer_repository_selector,
    )

    with instance_for_test() as instance, define_out_of_process_context(DEFINITIONS, "defs", instance) as context:
        result = execute_dagster_graphql(context, RESOURCES_QUERY, {"selector": infer_repository_selector(context)})
    assert not result.errors, result.errors
    details = result.data["allTopLevelResourceDetailsOrError"]
    assert details["__typename"] == "ResourceDetailsList", details
    resources = {r["name"]: {v["key"]: v for v in r["configuredValues"]} for r in details["results"]}
    assert {"label_studio", "metadata_db"} <= resources.keys(), resources.keys()
    return json.dumps(result.data), resources


def test_external_label_studio_and_postgres_secrets_are_env_vars(vbatch_home, monkeypatch):
    token, webhook_secret, password = "tok-never-shown-1234", "hook-never-shown-5678", "pw-never-shown-9012"
    monkeypatch.setenv("VBATCH_CURATION", "on")
    monkeypatch.setenv("VBATCH_LABEL_STUDIO_URL", "http://127.0.0.1:9")  # nothing listens: loading doesn't connect
    monkeypatch.setenv("VBATCH_LABEL_STUDIO_TOKEN", token)
    monkeypatch.setenv("VBATCH_WEBHOOK_SECRET", webhook_secret)
    monkeypatch.setenv("VBATCH_DATABASE_URL", f"postgresql://vbatch:{password}@127.0.0.1:5432/nothing")

    text, resources = shown_resources()

    for secret in (token, webhook_secret, password):
        assert secret not in text
    assert "http://127.0.0.1:9" in text  # the query does return configured values
    label_studio = resources["label_studio"]
    assert label_studio["url"] == {"key": "url", "value": '"http://127.0.0.1:9"', "type": "VALUE"}  # JSON text
    assert label_studio["token"] == {"key": "token", "value": "VBATCH_LABEL_STUDIO_TOKEN", "type": "ENV_VAR"}
    assert label_studio["webhook_secret"] == {"key": "webhook_secret", "value": "VBATCH_WEBHOOK_SECRET",
                                              "type": "ENV_VAR"}
    assert resources["metadata_db"]["url"] == {"key": "url", "value": "VBATCH_DATABASE_URL", "type": "ENV_VAR"}


def test_managed_label_studio_secrets_stay_in_its_credentials_file(vbatch_home, monkeypatch):
    from resources import FileStore
    from vbatch_pipelines.curation.server import ManagedLabelStudio, credentials
    from vbatch_pipelines.settings import load_settings

    monkeypatch.setenv("VBATCH_CURATION", "on")
    for name in ("VBATCH_LABEL_STUDIO_URL", "VBATCH_LABEL_STUDIO_TOKEN", "VBATCH_WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    state_dir = FileStore(root=str(vbatch_home)).label_studio_dir
    if not ManagedLabelStudio(state_dir, load_settings().storage.envs_dir, 4115).installed():
        pytest.fail("Label Studio is not installed: run `vbatch label-studio install` (make test does)")
    created = credentials(state_dir)  # not started: only its credentials file, as its first start writes it

    text, resources = shown_resources()

    for key in ("token", "password", "webhook_secret"):
        assert created[key] not in text, key
    assert json.loads(resources["label_studio"]["managed_dir"]["value"]) == str(state_dir)  # the managed variant


def test_secrets_passed_as_env_vars_resolve_inside_a_run(vbatch_home, monkeypatch, tmp_path):
    """The EnvVar a resource holds (also one nested in another resource) is the real value inside a run."""
    from dagster import DagsterInstance, asset, materialize

    from resources.factory import build_resources
    from vbatch_pipelines.settings import load_settings
    from vbatch_pipelines.store.db import Database

    url = f"sqlite:///{tmp_path / 'metadata.db'}"
    monkeypatch.setenv("VBATCH_DATABASE_URL", url)
    Database(url).upgrade()
    resources = build_resources(load_settings())
    with pytest.raises(RuntimeError, match="EnvVar"):  # outside a run it is a name, not a value
        str(resources.metadata_db.url)

    @asset(required_resource_keys={"metadata_db", "model_registry", "inference_engine"})
    def probe(context):
        metadata_db, model_registry = context.resources.metadata_db, context.resources.model_registry
        inference_engine = context.resources.inference_engine
        return [metadata_db.url, model_registry.metadata_db.url, inference_engine.model_registry.metadata_db.url,
                sorted(model_registry.served_models())]

    with DagsterInstance.ephemeral() as instance:
        result = materialize([probe], resources=resources, instance=instance)
    assert result.output_for_node("probe") == [url, url, url, ["vbatch-tiny-chat"]]


def test_the_engine_trainer_and_label_studio_get_no_broker_url_nor_any_url_with_a_password(monkeypatch):
    """Cluster mode's VBATCH_BROKER_URL carries the broker's password: the services that only compute on files get
    none of it, nor any other URL with credentials in it, whatever its variable is called."""
    from vbatch_pipelines.child_env import without_secrets

    monkeypatch.setenv("VBATCH_BROKER_URL", "redis://:s3cret@10.0.0.5:6379/0")
    monkeypatch.setenv("MY_QUEUE", "amqp://guest:hunter2@rabbit:5672//")
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.example.com")  # a URL without credentials stays
    monkeypatch.setenv("VBATCH_ENGINE_HOST", "127.0.0.1")
    env = without_secrets(LABEL_STUDIO_PASSWORD="its own")
    assert "VBATCH_BROKER_URL" not in env and "MY_QUEUE" not in env
    assert not any("s3cret" in value or "hunter2" in value for value in env.values())
    assert env["HF_ENDPOINT"] == "https://hub.example.com" and env["VBATCH_ENGINE_HOST"] == "127.0.0.1"
    assert env["LABEL_STUDIO_PASSWORD"] == "its own"  # a child's own secret, given explicitly


@pytest.mark.postgres
def test_no_cli_command_prints_a_secret(vbatch_home, postgres_url, tmp_path):
    """What the CLI prints lands in terminals, CI logs and (the Kubernetes setup job runs `vbatch db upgrade`) pod
    logs: none of it may carry the database's password, the broker's, an API key or Label Studio's token, on
    success or on failure (issue 30)."""
    import os
    import subprocess

    from tests.conftest import CLI

    secrets = {"database": "db-pass-7f3a", "broker": "broker-pass-91c2", "api": "sk-admin-key-55d0",
               "label_studio": "ls-token-0b8e"}
    database = postgres_url.replace("postgresql://postgres@", f"postgresql://postgres:{secrets['database']}@")
    env = dict(os.environ, VBATCH_DATABASE_URL=database, VBATCH_ADMIN_KEYS=secrets["api"],
               VBATCH_BROKER_URL=f"redis://:{secrets['broker']}@127.0.0.1:9/0", VBATCH_CURATION="off",
               VBATCH_LABEL_STUDIO_TOKEN=secrets["label_studio"])
    commands = [["db", "upgrade"], ["status"], ["projects", "list"], ["keys", "list"], ["models", "list"],
                ["engine", "status"], ["trainer", "status"], ["label-studio", "status"], ["doctor", "--no-smoke"],
                ["backup", "create", str(tmp_path / "backup.tar")], ["batch", "show", "batch_missing"]]
    for command in commands:
        run = subprocess.run([*CLI, *command], env=env, capture_output=True, text=True, timeout=300)
        shown = run.stdout + run.stderr
        leaked = [name for name, secret in secrets.items() if secret in shown]
        assert not leaked, (command, leaked, shown[-2000:])
    bad = env | {"VBATCH_DATABASE_URL": f"postgresql://postgres:{secrets['database']}@127.0.0.1:1/x"}  # nobody
    refused = subprocess.run([*CLI, "db", "upgrade"], env=bad, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and secrets["database"] not in refused.stdout + refused.stderr, refused.stderr
