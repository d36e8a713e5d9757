"""`scorehost deploy aks` with Azure ML SDK v2 (azure-ai-ml): Kubernetes online endpoint on an AKS cluster.

Steps, each reported, and recorded so that a failure says what exists and how to remove it:
  [cluster: create AKS with a GPU pool + install the Azure ML extension, when asked (cluster.py)]
  attach the AKS cluster as Kubernetes compute -> GPU instance type on the cluster -> register the model
  -> endpoint (key auth) -> deployment (the identical score.py, its sha256 printed) -> 100% traffic
  -> scoring URI and key -> parity replay.
`build_entities` makes the real SDK objects offline; `deploy` submits them through an MLClient.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
from typing import Any, Callable

from deploy.plan import sha256
from deploy.settings import DeploySettings, DeployError


@dataclasses.dataclass
class Entities:
    compute: Any
    model: Any
    environment: Any
    endpoint: Any
    deployment: Any
    code_dir: str
    script_sha256: str


def instance_type_manifest(s: DeploySettings) -> dict:
    """The Azure ML extension's InstanceType custom resource: what one replica gets (and the GPU it needs)."""
    resources = {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": str(s.gpus)}
    return {"apiVersion": "amlarc.azureml.com/v1alpha1", "kind": "InstanceType",
            "metadata": {"name": s.instance_type},
            "spec": {"resources": {"requests": dict(resources), "limits": dict(resources)}}}


def build_entities(s: DeploySettings) -> Entities:
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import (CodeConfiguration, Environment, KubernetesCompute,
                                      KubernetesOnlineDeployment, KubernetesOnlineEndpoint, Model,
                                      OnlineRequestSettings, ProbeSettings)

    # The code folder holds only the entry script, byte for byte: what runs in the cloud is what ran locally.
    code_dir = tempfile.mkdtemp(prefix="scorehost-code-")
    shutil.copy2(s.entry_script, os.path.join(code_dir, os.path.basename(s.entry_script)))
    digest = sha256(os.path.join(code_dir, os.path.basename(s.entry_script)))
    tags = {"scorehost": "1", "score_sha256": digest}
    compute = KubernetesCompute(name=s.compute, resource_id=s.aks_resource_id, namespace="azureml")
    model = Model(name=s.model_name, path=s.model_dir, type=AssetTypes.CUSTOM_MODEL,
                  description="TensorFlow SavedModel served by score.py", tags=tags)
    environment = Environment(name=f"scorehost-{s.model_name}", image=s.base_image, conda_file=s.conda_file,
                              description="myenv.yml on Azure ML's CUDA base image")
    endpoint = KubernetesOnlineEndpoint(name=s.endpoint, compute=s.compute, auth_mode="key", tags=tags,
                                        description="scorehost: the same score.py as served locally")
    deployment = KubernetesOnlineDeployment(
        name=s.deployment, endpoint_name=s.endpoint, model=model, environment=environment,
        code_configuration=CodeConfiguration(code=code_dir, scoring_script=os.path.basename(s.entry_script)),
        instance_type=s.instance_type, instance_count=s.replicas, tags=tags,
        request_settings=OnlineRequestSettings(request_timeout_ms=s.request_timeout_ms,
                                               max_concurrent_requests_per_instance=s.max_concurrent_requests),
        liveness_probe=ProbeSettings(initial_delay=s.liveness_initial_delay_s, period=10, timeout=2,
                                     failure_threshold=30),
        readiness_probe=ProbeSettings(initial_delay=s.readiness_initial_delay_s, period=10, timeout=2,
                                      failure_threshold=3))
    return Entities(compute, model, environment, endpoint, deployment, code_dir, digest)


def ml_client(s: DeploySettings) -> Any:
    from azure.ai.ml import MLClient
    from azure.identity import DefaultAzureCredential

    return MLClient(DefaultAzureCredential(), s.subscription_id, s.resource_group, s.workspace)


def explain(error: BaseException) -> str:
    """Azure's failure, in words a user can act on."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

    text = str(error)
    if isinstance(error, ClientAuthenticationError):
        return f"Authentication failed: run `az login` (or set AZURE_CLIENT_ID/SECRET/TENANT_ID). Azure said: {text}"
    if isinstance(error, HttpResponseError) and any(k in text for k in ("QuotaExceeded", "quota", "Quota")):
        return f"Not enough GPU quota in this region for the VM size: request more, or pick another region. {text}"
    if isinstance(error, HttpResponseError) and "SkuNotAvailable" in text:
        return f"The VM size is not available in this region/subscription: pick another size or region. {text}"
    if isinstance(error, ResourceNotFoundError):
        return f"Not found (is the workspace, resource group or AKS cluster name right?): {text}"
    return text


def _wait(poller: Any, what: str, say: Callable[[str], None], timeout_s: float, poll_s: float = 10) -> Any:
    started = time.monotonic()
    while not poller.done():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what} not done after {timeout_s:.0f} s")
        say(f"  ... {what}: {poller.status()} ({time.monotonic() - started:.0f} s)")
        poller.wait(poll_s)
    return poller.result()


def deploy(client: Any, s: DeploySettings, say: Callable[[str], None] = print,
           instance_type_creator: Callable[[DeploySettings], None] = lambda s: None,
           timeout_s: float = 3600) -> dict:
    """Submit every resource in order; returns {"scoring_uri", "key", "script_sha256", "created"}."""
    entities = build_entities(s)
    say(f"score.py sha256 {entities.script_sha256} (the identical file goes to the cloud)")
    created: list[str] = []
    step = "start"

    def do(name: str, action: Callable[[], Any], record: str = "") -> Any:
        nonlocal step
        step = name
        say(name)
        result = action()
        if hasattr(result, "done") and hasattr(result, "result"):  # a long-running operation: wait, with progress
            result = _wait(result, name, say, timeout_s)
        if record:
            created.append(record)
        return result

    try:
        do(f"attach AKS cluster {s.aks_cluster} as compute {s.compute}",
           lambda: client.compute.begin_create_or_update(entities.compute), f"compute {s.compute} (attached)")
        do(f"instance type {s.instance_type}", lambda: instance_type_creator(s))
        model = do(f"register model {s.model_name}", lambda: client.models.create_or_update(entities.model))
        created.append(f"model {s.model_name}:{getattr(model, 'version', '?')}")
        entities.deployment.model = model
        do(f"endpoint {s.endpoint}", lambda: client.online_endpoints.begin_create_or_update(entities.endpoint),
           f"endpoint {s.endpoint}")
        do(f"deployment {s.endpoint}/{s.deployment} ({s.replicas} x {s.instance_type})",
           lambda: client.online_deployments.begin_create_or_update(entities.deployment),
           f"deployment {s.endpoint}/{s.deployment}")
        entities.endpoint.traffic = {s.deployment: 100}
        do("route 100% of traffic to the deployment",
           lambda: client.online_endpoints.begin_create_or_update(entities.endpoint))
        endpoint = client.online_endpoints.get(s.endpoint)
        keys = client.online_endpoints.get_keys(s.endpoint)
    except BaseException as ex:  # noqa: B036 - Ctrl-C too must say what is left billing
        hint = (f"\nCreated so far: {', '.join(created) or 'nothing'}."
                f"\nRemove it with: scorehost deploy teardown --endpoint {s.endpoint} --yes")
        if "deployment" in step:
            hint += (f"\nThe deployment did not become healthy; its logs: az ml online-deployment get-logs "
                     f"-e {s.endpoint} -n {s.deployment} -g {s.resource_group} -w {s.workspace}")
        message = explain(ex) if isinstance(ex, Exception) else "interrupted"
        raise DeployError(f"scorehost deploy aks: failed at '{step}': {message}{hint}") from ex
    finally:
        shutil.rmtree(entities.code_dir, ignore_errors=True)
    say(f"scoring URI: {endpoint.scoring_uri}")
    say(f"key: az ml online-endpoint get-credentials -n {s.endpoint} -g {s.resource_group} -w {s.workspace}")
    return {"scoring_uri": endpoint.scoring_uri, "key": keys.primary_key, "script_sha256": entities.script_sha256,
            "created": created}


def teardown(client: Any, s: DeploySettings, with_compute: bool, say: Callable[[str], None] = print) -> list[str]:
    """Delete the endpoint (and its deployments); with `with_compute`, detach the compute too."""
    from azure.core.exceptions import ResourceNotFoundError

    deleted = []
    try:
        say(f"deleting endpoint {s.endpoint} (and its deployments)")
        client.online_endpoints.begin_delete(name=s.endpoint).result()
        deleted.append(f"endpoint {s.endpoint}")
    except ResourceNotFoundError:
        say(f"endpoint {s.endpoint} does not exist")
    if with_compute:
        say(f"detaching compute {s.compute}")
        client.compute.begin_delete(name=s.compute, action="Detach").result()
        deleted.append(f"compute {s.compute} (detached)")
    return deleted
