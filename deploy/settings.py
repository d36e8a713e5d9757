"""What a deployment is made of, declared once: each setting's default, its help, and the commands it applies to
(so `deploy k8s --help` lists only what `deploy k8s` reads). Values come from a small YAML file, then flags on top.

Defaults fit the mission: the reference score.py and myenv.yml, a current GPU size, 3 instances of 2 CPU / 4 GiB /
1 GPU, key auth, one request at a time per instance (Azure ML's default, matched by the container's WORKER_COUNT).
Names follow Azure's rules, checked by `deploy plan`; unless given, the model's name comes from its directory and the
endpoint's from the entry script's folder and the model's, with a suffix from the workspace (endpoint names are unique
per region), decided in one place (DeploySettings.named) for plan, deploy, traffic and teardown alike. Two projects can
still meet on one derived name (two `src/` folders with a `models/` model): the endpoint is tagged with the project
(DeploySettings.project) and an endpoint of another project is never taken over under a derived name.

Values Azure would refuse only after the model and endpoint exist are refused here, in one line: a managed request
timeout over Azure's limit, CPU and memory that are no Kubernetes quantities, an SDK v1 service name with capitals.

The workspace comes from Azure ML studio's config.json when not given. The same file name is azmlinfsrv's server
settings file (AZUREML_ENTRY_SCRIPT, SCORING_TIMEOUT_MS, ... in the app root, read by `scorehost serve` too), and both
are found in the project's folder by default: a config.json is taken as the workspace's only when it holds the
workspace's keys, and named in one line otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any, Optional

from scorehost import REFERENCE_SCRIPT

# Azure ML's GPU base image for conda environments, pinned to the newest tag in Azure/AzureML-Containers'
# images/openmpi5.0-cuda12.5-ubuntu22.04/release-notes.md. CUDA 12.5 because TensorFlow 2.21's [and-cuda] wheels bring
# CUDA 12.5+ runtime libraries; not SDK v1's default openmpi4.1.0-cuda11.8-cudnn8 image, whose release notes end with
# 20241202.v1 and which has no CUDA 12. The one place it is named.
GPU_BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi5.0-cuda12.5-ubuntu22.04:20250619.v1"

# The commands a setting can apply to.
PLAN, AKS, MANAGED, TRAFFIC, TEARDOWN, K8S = "plan", "aks", "managed", "traffic", "teardown", "k8s"
CLOUD = (PLAN, AKS, MANAGED, TRAFFIC, TEARDOWN)
DEPLOYS = (PLAN, AKS, MANAGED)
ON_AKS = (PLAN, AKS)

# Azure ML studio's config.json ('Download config file'): what the SDKs read from it for the workspace.
WORKSPACE_KEYS = ("subscription_id", "resource_group", "workspace_name")
WORKSPACE_CONFIG = "config.json"
# Where the SDKs look for it when given none (v2's MLClient.from_config, v1's Workspace.from_config): in these
# folders by priority, each in the current directory, then in each of its parents up to this many levels.
WORKSPACE_CONFIG_FOLDERS, WORKSPACE_CONFIG_LEVELS = (".azureml", "aml_config", ""), 20
# The endpoint name's 6 characters from the workspace, while no workspace is known (`deploy plan` without one): a
# glob that the name `deploy` creates matches, so a plan shows the name's shape, never another name.
UNKNOWN_SUFFIX = "??????"
# Azure ML's limit for request_settings.request_timeout_ms on managed online deployments ("Endpoint limits"): above it
# the deployment is refused, after the model and the endpoint were created.
MANAGED_MAX_REQUEST_TIMEOUT_MS = 180_000
# The endpoint tag that says which project (DeploySettings.project) an endpoint was created for.
PROJECT_TAG = "scorehost_project"


def setting(default: Any, doc: str, *commands: str) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc, "commands": commands})


@dataclasses.dataclass
class DeploySettings:
    # The workspace (from config.json when not given, as the Azure ML SDKs do)
    subscription_id: str = setting("", "Azure subscription (default: config.json's)", *CLOUD)
    resource_group: str = setting("", "resource group of the workspace and the cluster (default: config.json's)",
                                  *CLOUD)
    workspace: str = setting("", "Azure ML workspace (default: config.json's)", *CLOUD)
    config_file: str = setting(WORKSPACE_CONFIG, "the workspace's config.json (Azure ML studio: 'Download config "
                               "file'; default: found as the Azure ML SDKs find it, from the current directory up)",
                               *CLOUD)
    # What is deployed
    # traffic and teardown take what names the endpoint too, so they find the one deploy made (see named())
    entry_script: str = setting(REFERENCE_SCRIPT, "the entry script, sent byte for byte with the rest of its folder",
                                *DEPLOYS, K8S, TRAFFIC, TEARDOWN)
    conda_file: str = setting("", "conda environment of the deployment (default: the myenv.yml beside the entry "
                              "script)", *DEPLOYS, K8S)
    model_dir: str = setting("", "model directory (default, for the reference score.py only: the demo model, built on "
                             "first use)", *DEPLOYS, K8S, TRAFFIC, TEARDOWN)
    model_name: str = setting("", "name the model is registered under (default: from the model directory, "
                              "<dir>/<name>/<version>/ as Azure ML lays it out, else the directory's own name)",
                              *DEPLOYS, TRAFFIC, TEARDOWN)
    base_image: str = setting(GPU_BASE_IMAGE, "Azure ML base image the conda environment is built on", *DEPLOYS)
    # Where, on AKS: a cluster attached to the workspace as Kubernetes compute
    compute: str = setting("gpu-aks", "name of the cluster as Kubernetes compute in the workspace", *ON_AKS, TEARDOWN)
    aks_cluster: str = setting("scorehost-gpu", "the AKS cluster (attached, or created with --create-cluster)",
                               *ON_AKS, TEARDOWN)
    create_cluster: bool = setting(False, "create the AKS cluster and install the Azure ML extension if absent",
                                   *ON_AKS)
    location: str = setting("eastus", "region of a cluster created with --create-cluster", *ON_AKS)
    vm_size: str = setting("Standard_NC4as_T4_v3", "GPU VM size: the AKS GPU pool's, or the managed instance type",
                           *DEPLOYS)
    node_count: int = setting(3, "GPU nodes of a cluster created with --create-cluster", *ON_AKS)
    gpu_pool: str = setting("gpupool", "the cluster's GPU node pool (instances are scheduled on it)", *ON_AKS)
    instance_type: str = setting("gpu-t4", "the cluster's InstanceType resource the deployment asks for", *ON_AKS)
    # How the Azure ML extension's inference router is reached (Azure ML refuses to install it without a choice)
    ssl_cname: str = setting("", "HTTPS: the endpoint's DNS name (the certificate's CN), with --ssl-cert/--ssl-key",
                             *ON_AKS)
    ssl_cert: str = setting("", "HTTPS: PEM certificate file for --ssl-cname", *ON_AKS)
    ssl_key: str = setting("", "HTTPS: PEM private key file for --ssl-cert", *ON_AKS)
    allow_insecure: bool = setting(False, "plain HTTP to the inference router (development only)", *ON_AKS)
    # The endpoint and its deployment
    endpoint: str = setting("", "the online endpoint (default: the model's name and a suffix from the workspace, as "
                                "endpoint names are unique per region)", *CLOUD, K8S)
    deployment: str = setting("blue", "the deployment (a new name creates it beside the live one)", *DEPLOYS)
    traffic: Optional[int] = setting(None, "percent of traffic for the deployment (default: 100 for an endpoint's "
                                     "first deployment, unchanged for a live one, 0 for a new one beside it)",
                                     AKS, MANAGED)
    instance_count: int = setting(3, "instances (replicas) of the deployment", *DEPLOYS, K8S)
    cpu: str = setting("2", "CPU per instance", *ON_AKS, K8S)
    memory: str = setting("4Gi", "memory per instance", *ON_AKS, K8S)
    gpus: int = setting(1, "GPUs per instance", *ON_AKS, K8S)
    request_timeout_ms: int = setting(5000, "scoring timeout per request", *DEPLOYS, K8S)
    max_concurrent_requests: int = setting(1, "requests in flight per instance; the container runs as many workers "
                                           "(WORKER_COUNT), each with the model on the instance's GPU", *DEPLOYS)
    max_queue_wait_ms: int = setting(500, "how long a request may wait in the instance's queue", *DEPLOYS)
    cluster_gpus: int = setting(0, "GPUs the cluster can give this deployment: its autoscaler adds instances up to "
                                "that many GPUs (default: instance_count x gpus, no more than asked for)", K8S)
    dns_wait_s: int = setting(900, "HTTPS: how long to wait for --ssl-cname to resolve to the inference router before "
                              "the parity replay", *ON_AKS)
    liveness_initial_delay_s: int = setting(30, "seconds before the first liveness probe", *DEPLOYS, K8S)
    readiness_initial_delay_s: int = setting(10, "seconds before the first readiness probe", *DEPLOYS, K8S)
    sdk: str = setting("v2", "Azure ML SDK: v2 (azure-ai-ml) or v1 (azureml-core, deprecated)", PLAN, AKS, TEARDOWN)
    target: str = setting("aks", "what `plan` describes: aks or managed", PLAN)
    # No flag: set by named() when it derived the endpoint's name, so an endpoint of another project met under that
    # name is refused, while one the user named is theirs to update.
    endpoint_derived: bool = setting(False, "the endpoint's name was derived, not given")

    def __post_init__(self) -> None:
        # The environment a script was written for sits beside it (the reference score.py's myenv.yml is the repo's,
        # TensorFlow's): never another script's. None there and none given stays "", which `deploy plan` reports.
        if not self.conda_file:
            beside = os.path.join(os.path.dirname(self.entry_script), "myenv.yml")
            self.conda_file = beside if os.path.isfile(beside) else ""
        if self.target == MANAGED and self.request_timeout_ms > MANAGED_MAX_REQUEST_TIMEOUT_MS:
            raise DeployError(f"request_timeout_ms {self.request_timeout_ms} is over the {MANAGED_MAX_REQUEST_TIMEOUT_MS}"
                              " ms Azure ML allows on a managed online endpoint: pass --request-timeout-ms "
                              f"{MANAGED_MAX_REQUEST_TIMEOUT_MS} or less")
        cpu_cores(self.cpu), memory_gib(self.memory)  # each raises DeployError, in one line, on a bad quantity
        if self.sdk == "v1" and self.endpoint != self.endpoint.lower():
            raise DeployError(f"SDK v1 service names are lowercase: --endpoint {self.endpoint.lower()}, not "
                              f"{self.endpoint}")

    @classmethod
    def load(cls, path: Optional[str] = None, **overrides: Any) -> "DeploySettings":
        values: dict[str, Any] = {}
        if path:
            import yaml

            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
            unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise DeployError(f"{path}: unknown settings {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def named(self, azure_ml: bool = True) -> "DeploySettings":
        """The model's and the endpoint's names, where not given: derived from the model directory and, on Azure ML,
        the workspace (see the module docstring). The one place they are decided."""
        model_name = self.model_name or model_name_of(self.model_dir)
        workspace = self.workspace_id if azure_ml else None
        if self.endpoint and not self.endpoint_derived:
            return dataclasses.replace(self, model_name=model_name)
        folder = "" if is_reference(self.entry_script) else os.path.basename(os.path.dirname(
            os.path.realpath(self.entry_script)))
        return dataclasses.replace(self, model_name=model_name, endpoint_derived=True,
                                   endpoint=endpoint_name(model_name, workspace, folder))

    @property
    def project(self) -> str:
        """What the endpoint is tagged with (PROJECT_TAG): the entry script (its folder's name and, hashed, where that
        folder is) and the model's name. Two projects that derive the same endpoint name differ here."""
        folder = os.path.dirname(os.path.realpath(self.entry_script))
        where = hashlib.sha256(f"{folder}\n{self.model_name}".encode()).hexdigest()[:12]
        return f"{os.path.basename(folder)}/{os.path.basename(self.entry_script)}, model {self.model_name}, {where}"

    def with_workspace(self) -> "DeploySettings":
        """Fill subscription, resource group and workspace from config.json (as the Azure ML SDKs do), then the
        names that derive from them."""
        if self.has_workspace:
            return self.named()
        given = {"subscription_id": self.subscription_id, "resource_group": self.resource_group,
                 "workspace_name": self.workspace}
        path = find_workspace_config(self.config_file)
        config = workspace_config(path, [key for key in WORKSPACE_KEYS if not given[key]])
        values = {key: given[key] or config[key] for key in WORKSPACE_KEYS}
        return dataclasses.replace(self, config_file=path, subscription_id=values["subscription_id"],
                                   resource_group=values["resource_group"],
                                   workspace=values["workspace_name"]).named()

    @property
    def endpoint_pending(self) -> bool:
        """The derived endpoint name waits for the workspace: UNKNOWN_SUFFIX stands for its 6 characters."""
        return self.endpoint.endswith("-" + UNKNOWN_SUFFIX)

    @property
    def has_workspace(self) -> bool:
        return bool(self.subscription_id and self.resource_group and self.workspace)

    @property
    def workspace_id(self) -> str:
        """The workspace's ARM id, or "" while no workspace is known."""
        if not self.has_workspace:
            return ""
        return (f"/subscriptions/{self.subscription_id}/resourceGroups/{self.resource_group}"
                f"/providers/Microsoft.MachineLearningServices/workspaces/{self.workspace}")

    @property
    def aks_resource_id(self) -> str:
        return (f"/subscriptions/{self.subscription_id or '<subscription-id>'}"
                f"/resourceGroups/{self.resource_group or '<resource-group>'}"
                f"/providers/Microsoft.ContainerService/managedClusters/{self.aks_cluster}")


def is_reference(entry_script: str) -> bool:
    """The repo's score.py, which alone goes with the demo model and the shipped parity corpus."""
    return os.path.realpath(entry_script) == os.path.realpath(REFERENCE_SCRIPT)


DEMO_MODEL_NAME = "resnet50"  # what a model is called when no directory is given: the demo's


def model_name_of(model_dir: str) -> str:
    """<dir>/<name>/<version>/ (Azure ML's layout, the demo's too) gives <name>; any other directory its own name.
    Made a legal asset name: letters, digits, '-', '_' and '.'."""
    if not model_dir or not os.path.isdir(model_dir):
        return DEMO_MODEL_NAME
    entries = os.listdir(model_dir)
    folder = os.path.basename(os.path.abspath(model_dir))
    if len(entries) == 1 and os.path.isdir(os.path.join(model_dir, entries[0])):
        folder = entries[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", folder).strip("-_.") or DEMO_MODEL_NAME


def endpoint_name(model_name: str, workspace_id: Optional[str], folder: str = "") -> str:
    """A legal endpoint name (a letter first, then letters, digits and single '-', 3-32 characters) from the entry
    script's folder (none for the reference score.py, whose folder is the checkout's) and the model's name, so that
    every project with a `models/` folder does not get one name. On Azure ML, with 6 hex characters of the
    workspace's id, so that two workspaces in one region do not collide; while the workspace is not known yet
    (workspace_id ""), UNKNOWN_SUFFIX stands for them. Without Azure ML (None: plain Kubernetes, where names are the
    cluster's own), the names alone."""
    base = re.sub(r"[^a-z0-9]+", "-", f"{folder}-{model_name}".lower()).strip("-")
    if not base[:1].isalpha():
        base = "model-" + base
    suffix = "" if workspace_id is None else "-" + (
        hashlib.sha256(workspace_id.lower().encode()).hexdigest()[:6] if workspace_id else UNKNOWN_SUFFIX)
    base = base[:32 - len(suffix)].rstrip("-")
    return (base + suffix) if len(base + suffix) >= 3 else (base + "-ep")[:32]


def find_workspace_config(path: str) -> str:
    """The default config.json where the Azure ML SDKs find it: .azureml/config.json, then aml_config/config.json,
    then config.json, each first in the current directory, then in its parents; a user who runs `deploy` from a
    subfolder of the project gets the workspace that `MLClient.from_config()` gets there. A path given is taken as it
    is, and so is the default where none is found (the caller says so)."""
    if path != WORKSPACE_CONFIG:
        return path
    folders = [os.getcwd()]
    while len(folders) <= WORKSPACE_CONFIG_LEVELS and os.path.dirname(folders[-1]) != folders[-1]:
        folders.append(os.path.dirname(folders[-1]))
    return next((found for sub in WORKSPACE_CONFIG_FOLDERS for folder in folders
                 if os.path.isfile(found := os.path.join(folder, sub, path))), path)


def workspace_config(path: str, needed: list[str]) -> dict[str, str]:
    """The workspace keys `needed` from Azure ML studio's config.json at `path`. A config.json without them, such as
    azmlinfsrv's server settings (the same file name, in the same folder by default), is no workspace: said in one
    line naming the file, never read as one (nor a KeyError)."""
    if not os.path.exists(path):
        raise WorkspaceNotFound(f"no {os.path.abspath(path)}" + (
            ", nor one in a parent folder or an .azureml/ folder" if path == WORKSPACE_CONFIG else ""))
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as ex:
        raise WorkspaceNotFound(f"{os.path.abspath(path)} is not an Azure ML workspace config: {ex}") from None
    missing = [key for key in needed if not (isinstance(config, dict) and isinstance(config.get(key), str)
                                             and config[key])]
    if missing:
        raise WorkspaceNotFound(f"{os.path.abspath(path)} is not an Azure ML workspace config, with no "
                                f"{', '.join(missing)}; config.json is also azmlinfsrv's server settings file")
    return config


_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?")
_SCALE = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
          "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}


def quantity(value: str, what: str) -> float:
    """A Kubernetes quantity (`500m`, `2`, `512Mi`, `4Gi`, `1G`) as a number, as the cluster reads it; anything else
    is refused in one line, here, rather than by Azure after the model and endpoint exist. Not the kubernetes
    client's parse_quantity: SDK v1's environment (`.[deploy-v1]`) has no kubernetes package."""
    match = _QUANTITY.fullmatch(str(value).strip())
    if not match:
        raise DeployError(f"{what} {value!r} is not a Kubernetes quantity (e.g. 500m or 2 CPUs, 512Mi or 4Gi memory)")
    return float(match[1]) * _SCALE[match[2]]


def cpu_cores(value: str) -> float:
    return quantity(value, "cpu")


def memory_gib(value: str) -> float:
    return quantity(value, "memory") / 2**30


def fields_for(command: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(DeploySettings) if command in f.metadata["commands"]]


class DeployError(SystemExit):
    """A deployment step failed: the message says what, what was created, and how to delete it. Exit code 1."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class WorkspaceNotFound(DeployError):
    """No workspace given and none in a config.json; `reason` says why in a few words (`deploy plan` goes on without a
    workspace and prints it)."""

    def __init__(self, reason: str):
        super().__init__(f"No workspace given and {reason}: pass --config-file with the workspace's config.json (Azure "
                         "ML studio: workspace page -> 'Download config file'), or --subscription-id, --resource-group "
                         "and --workspace.")
        self.reason = reason
