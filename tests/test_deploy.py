"""Cloud promotion, offline: Azure cannot be reached from here, so the real SDK objects are built and checked
(and written to YAML and loaded back, which runs azure-ai-ml's own schema validation), and only the client
boundary (MLClient operations, the AKS and extension clients, the cluster's API) is faked, recording each call."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess

import pytest
import yaml

from deploy import azure_v2, cluster, k8s, parity, plan
from deploy.settings import DeployError, DeploySettings
from scorehost import REFERENCE_SCRIPT, processes


@pytest.fixture(scope="module")
def settings(colors_model, tmp_path_factory):
    cfg = tmp_path_factory.mktemp("ws") / "config.json"
    cfg.write_text(json.dumps({"subscription_id": "00000000-1111-2222-3333-444444444444",
                               "resource_group": "rg-ml", "workspace_name": "ws-ml"}))
    return DeploySettings(model_dir=colors_model, model_name="colors", config_file=str(cfg)).with_workspace()


def plain(data):
    """The SDK's OrderedDicts as plain YAML-able data."""
    return json.loads(json.dumps(data))


def scorehost_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([processes._bin("scorehost"), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


# --- plan ---------------------------------------------------------------------------------------------------

def test_plan_prints_every_resource_and_passes(colors_model):
    done = scorehost_cli("deploy", "plan", "--model-dir", colors_model)
    assert done.returncode == 0, done.stdout + done.stderr
    for kind in ("Kubernetes compute", "instance type", "model", "environment", "online endpoint",
                 "online deployment", "sha256=", "Standard_NC4as_T4_v3", "instance_count: 3", "All local checks"):
        assert kind in done.stdout


@pytest.mark.parametrize("flags,problem", [
    (("--vm-size", "Standard_NC6"), "retired"),
    (("--vm-size", "Standard_D4s_v5"), "not a GPU size"),
    (("--endpoint", "1_bad name"), "not a legal Azure name"),
    (("--model-dir", "/nonexistent"), "is not a directory"),
    (("--conda-file", REFERENCE_SCRIPT), "conda file"),
])
def test_plan_refuses_bad_settings(colors_model, flags, problem):
    args = ["deploy", "plan", "--no-load-check", "--model-dir", colors_model, *flags]
    done = scorehost_cli(*args)
    assert done.returncode == 1 and problem in done.stdout


def test_plan_catches_a_script_that_does_not_load(colors_model, tmp_path):
    broken = tmp_path / "score.py"
    broken.write_text("def init():\n    raise RuntimeError('CANNOT-LOAD')\n\ndef run(x):\n    return x\n")
    found = plan.problems(DeploySettings(entry_script=str(broken), model_dir=colors_model))
    assert len(found) == 1 and "CANNOT-LOAD" in found[0]


def test_plan_leaves_what_a_model_dir_holds_to_the_script(colors_model, tmp_path):
    """The model directory's layout is the script's business: two SavedModels fail in score.py's own words."""
    import shutil

    shutil.copytree(os.path.join(colors_model, "colors"), tmp_path / "colors")
    shutil.copytree(os.path.join(colors_model, "colors"), tmp_path / "copy")
    found = plan.problems(DeploySettings(model_dir=str(tmp_path)))
    assert len(found) == 1 and "Several SavedModels" in found[0]
    assert plan.problems(DeploySettings(model_dir=str(tmp_path / "copy" / "1" / "variables" / "none"))) == [
        f"model_dir {str(tmp_path / 'copy' / '1' / 'variables' / 'none')!r} is not a directory (build one: "
        "scorehost model resnet50 --out DIR)"]


# --- SDK v2 entities ------------------------------------------------------------------------------------------

def test_v2_entities_validate_with_the_sdk(settings, tmp_path):
    from azure.ai.ml import load_online_deployment, load_online_endpoint

    e = azure_v2.build_entities(settings)
    assert e.script_sha256 == plan.sha256(REFERENCE_SCRIPT)
    with open(os.path.join(e.code_dir, "score.py"), "rb") as f, open(REFERENCE_SCRIPT, "rb") as g:
        assert f.read() == g.read()  # byte for byte the local score.py
    endpoint = plain(e.endpoint._to_dict())
    assert (endpoint["name"], endpoint["compute"], endpoint["auth_mode"]) == ("scorehost-resnet50", "azureml:gpu-aks",
                                                                             "key")
    (tmp_path / "endpoint.yml").write_text(yaml.safe_dump(endpoint))
    assert load_online_endpoint(str(tmp_path / "endpoint.yml")).name == "scorehost-resnet50"

    deployment = plain(e.deployment._to_dict())
    assert deployment["instance_type"] == "gpu-t4" and deployment["instance_count"] == 3
    assert deployment["code_configuration"]["scoring_script"] == "score.py"
    assert deployment["request_settings"]["request_timeout_ms"] == 5000
    assert deployment["tags"]["score_sha256"] == e.script_sha256
    assert deployment["environment"]["image"].startswith("mcr.microsoft.com/azureml/") and "cuda" in \
        deployment["environment"]["image"]
    assert "tensorflow[and-cuda]==2.21.0" in yaml.safe_dump(deployment["environment"]["conda_file"])
    (tmp_path / "deployment.yml").write_text(yaml.safe_dump(deployment))
    loaded = load_online_deployment(str(tmp_path / "deployment.yml"))
    assert loaded.instance_type == "gpu-t4" and loaded.liveness_probe.initial_delay == 30
    assert e.compute.resource_id.endswith("/resourceGroups/rg-ml/providers/Microsoft.ContainerService/"
                                          "managedClusters/scorehost-gpu")


def test_instance_type_asks_for_cpu_memory_and_a_gpu(settings):
    body = azure_v2.instance_type_manifest(settings)
    assert (body["apiVersion"], body["kind"], body["metadata"]["name"]) == ("amlarc.azureml.com/v1alpha1",
                                                                          "InstanceType", "gpu-t4")
    assert body["spec"]["resources"]["limits"] == {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": "1"}


# --- fakes at the client boundary -----------------------------------------------------------------------------

class Poller:
    def __init__(self, result=None, error=None, done_after=0):
        self._result, self._error, self._polls = result, error, done_after

    def done(self):
        self._polls -= 1
        return self._polls < 0

    def status(self):
        return "Running"

    def wait(self, timeout=None):
        pass

    def result(self, timeout=None):
        if self._error:
            raise self._error
        return self._result


class Operations:
    def __init__(self, log, name, fail=None):
        self.log, self.name, self.fail = log, name, fail or {}

    def __getattr__(self, method):
        def call(*args, **kwargs):
            self.log.append((self.name, method, args, kwargs))
            failure = self.fail.get(method)
            if isinstance(failure, Exception):
                raise failure
            if isinstance(failure, Poller):
                return failure
            if method.startswith("begin_"):
                return Poller(done_after=10**9 if failure == "never" else 1)
            if method == "create_or_update":
                return dataclasses.make_dataclass("M", [("version", str)])("1")
            if method == "get":
                return dataclasses.make_dataclass("E", [("scoring_uri", str)])("https://x.example/score")
            if method == "get_keys":
                return dataclasses.make_dataclass("K", [("primary_key", str)])("primary-key")
        return call


class FakeMLClient:
    def __init__(self, fail=None):
        self.log = []
        fail = fail or {}
        for name in ("compute", "models", "online_endpoints", "online_deployments"):
            setattr(self, name, Operations(self.log, name, fail.get(name)))


def test_v2_deploy_submits_everything_in_order(settings):
    client, made = FakeMLClient(), []
    result = azure_v2.deploy(client, settings, say=lambda m: None, instance_type_creator=made.append)
    calls = [(n, m) for n, m, _, _ in client.log]
    assert calls == [("compute", "begin_create_or_update"), ("models", "create_or_update"),
                     ("online_endpoints", "begin_create_or_update"), ("online_deployments", "begin_create_or_update"),
                     ("online_endpoints", "begin_create_or_update"), ("online_endpoints", "get"),
                     ("online_endpoints", "get_keys")]
    assert made == [settings]
    deployment = client.log[3][2][0]
    assert deployment.name == "blue" and deployment.instance_count == 3 and deployment.model.version == "1"
    assert client.log[4][2][0].traffic == {"blue": 100}
    assert result["scoring_uri"] == "https://x.example/score" and result["key"] == "primary-key"


def test_authentication_failure_is_explained(settings):
    from azure.core.exceptions import ClientAuthenticationError

    client = FakeMLClient({"compute": {"begin_create_or_update": ClientAuthenticationError("no token")}})
    with pytest.raises(DeployError) as e:
        azure_v2.deploy(client, settings, say=lambda m: None)
    assert "az login" in e.value.message and "Created so far: nothing" in e.value.message


def test_quota_failure_says_what_was_created_and_how_to_delete_it(settings):
    from azure.core.exceptions import HttpResponseError

    client = FakeMLClient({"online_deployments": {"begin_create_or_update": Poller(
        error=HttpResponseError("(QuotaExceeded) not enough NCASv3_T4 cores"))}})
    with pytest.raises(DeployError) as e:
        azure_v2.deploy(client, settings, say=lambda m: None)
    message = e.value.message
    assert "GPU quota" in message and "endpoint scorehost-resnet50" in message and "model colors:1" in message
    assert "scorehost deploy teardown --endpoint scorehost-resnet50" in message and "get-logs" in message


def test_deployment_that_never_becomes_healthy_times_out_clearly(settings):
    client = FakeMLClient({"online_deployments": {"begin_create_or_update": "never"}})
    with pytest.raises(DeployError) as e:
        azure_v2.deploy(client, settings, say=lambda m: None, timeout_s=0.05)
    assert "not done after" in e.value.message and "get-logs" in e.value.message


def test_sku_not_available_is_explained():
    from azure.core.exceptions import HttpResponseError

    assert "not available in this region" in azure_v2.explain(HttpResponseError("SkuNotAvailable: NC4as_T4_v3"))


def test_missing_config_json_is_a_clear_error(colors_model, tmp_path):
    done = subprocess.run([processes._bin("scorehost"), "deploy", "aks", "--yes", "--model-dir", colors_model,
                           "--config-file", str(tmp_path / "config.json")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 1 and "Download config file" in done.stderr and "Traceback" not in done.stderr


def test_teardown_deletes_the_endpoint_and_detaches_the_compute(settings):
    client = FakeMLClient()
    assert azure_v2.teardown(client, settings, with_compute=True, say=lambda m: None) == [
        "endpoint scorehost-resnet50", "compute gpu-aks (detached)"]
    assert client.log[0][1:] == ("begin_delete", (), {"name": "scorehost-resnet50"})
    assert client.log[1][1:] == ("begin_delete", (), {"name": "gpu-aks", "action": "Detach"})


@pytest.mark.parametrize("answer,deletes", [("n", False), ("", False), ("y", True)])
def test_teardown_asks_before_deleting(settings, monkeypatch, capsys, answer, deletes):
    import argparse

    from deploy import cli as deploy_cli

    monkeypatch.setattr("builtins.input", lambda prompt: answer)
    args = argparse.Namespace(config=None, yes=False, cluster=False, config_file=settings.config_file,
                              **{f.name: None for f in dataclasses.fields(DeploySettings) if f.name != "config_file"})
    client = FakeMLClient()
    assert deploy_cli.cmd_teardown(args, client) == (0 if deletes else 1)
    assert bool(client.log) == deletes
    if deletes:
        assert "Still billing: the AKS cluster scorehost-gpu" in capsys.readouterr().out


def test_cluster_creation_with_gpu_pool_extension_and_instance_type(settings):
    log = []
    aks, ext = Operations(log, "aks"), Operations(log, "ext")
    aks.managed_clusters, ext.extensions = Operations(log, "managed_clusters"), Operations(log, "extensions")
    s = dataclasses.replace(settings, create_cluster=True)
    cluster.create_cluster(aks, ext, s, say=lambda m: None)
    (_, _, (rg, name, managed), _), (_, _, ext_args, _) = log
    assert (rg, name) == ("rg-ml", "scorehost-gpu")
    pools = {p.name: p for p in managed.agent_pool_profiles}
    assert pools["gpupool"].vm_size == "Standard_NC4as_T4_v3" and pools["gpupool"].count == 3
    assert ext_args[:5] == ("rg-ml", "Microsoft.ContainerService", "managedClusters", "scorehost-gpu", "azureml")
    assert ext_args[5].extension_type == "Microsoft.AzureML.Kubernetes"

    class Exists(Exception):
        status = 409

    objects = Operations(log, "k8s", {"create_cluster_custom_object": Exists()})
    cluster.create_instance_type(aks, s, custom_objects=objects)
    assert log[-1][1] == "replace_cluster_custom_object" and log[-1][2][3] == "gpu-t4"


# --- plain Kubernetes ---------------------------------------------------------------------------------------

def test_k8s_manifests_validate_offline(tmp_path):
    import kubernetes_validate

    done = scorehost_cli("deploy", "k8s", "--out", str(tmp_path), "--replicas", "2")
    assert done.returncode == 0, done.stderr
    kinds = {}
    for name in sorted(os.listdir(tmp_path)):
        with open(tmp_path / name) as f:
            manifest = yaml.safe_load(f)
        kubernetes_validate.validate(manifest, "1.32.0", strict=True)
        kinds[manifest["kind"]] = manifest
    assert set(kinds) == {"Deployment", "Service", "Secret", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}
    container = kinds["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["cpu"] == "2" and container["livenessProbe"]["httpGet"]["port"] == 5001
    assert container["livenessProbe"]["httpGet"]["path"] == "/" and container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    assert kinds["Deployment"]["spec"]["replicas"] == 2
    assert container["volumeMounts"][0]["mountPath"] == k8s.MODEL_MOUNT


# --- parity ---------------------------------------------------------------------------------------------------

def test_parity_passes_against_a_second_local_server(start_server, colors_model):
    first = start_server("scorehost", REFERENCE_SCRIPT, colors_model)
    second = start_server("aihs", REFERENCE_SCRIPT, colors_model)
    done = scorehost_cli("parity", second.url, "--local", first.url)
    assert done.returncode == 0, done.stdout
    assert "all answers match" in done.stdout and "DIFF" not in done.stdout


def test_parity_fails_on_a_different_model(start_server, colors_model, tmp_path):
    from scorehost.models import build_colors
    import keras

    other = tmp_path / "other"
    keras.utils.set_random_seed(7)
    build_colors(str(other), version="2")
    first = start_server("scorehost", REFERENCE_SCRIPT, colors_model)
    second = start_server("scorehost", REFERENCE_SCRIPT, str(other))
    done = scorehost_cli("parity", second.url, "--local", first.url)
    assert done.returncode == 1 and "DIFF" in done.stdout and ".version" in done.stdout


def test_parity_diff_tolerates_last_digits():
    assert parity.diff({"p": 0.51234, "request_id": "a"}, {"p": 0.5125, "request_id": "b"}) == []
    assert parity.diff({"p": 0.5}, {"p": 0.6}) == ["body.p: 0.5 != 0.6 (tolerance 0.001)".replace("body", "")]
