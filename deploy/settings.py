"""What a deployment is made of, declared once with its defaults: from a small YAML file, then flags on top.

Defaults fit the mission: the reference score.py and myenv.yml, a current GPU size (the NC6 family is retired),
3 replicas of 2 CPU / 4 GB / 1 GPU, key auth. Names follow Azure's rules, checked by `deploy plan`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

from scorehost import REFERENCE_SCRIPT, REPO_ROOT

# Azure ML's GPU base image for conda environments (the one SDK v1's enable_gpu picked, now chosen explicitly).
GPU_BASE_IMAGE = "mcr.microsoft.com/azureml/openmpi4.1.0-cuda11.8-cudnn8-ubuntu22.04:latest"


@dataclasses.dataclass
class DeploySettings:
    # Workspace (from config.json when not given)
    subscription_id: str = ""
    resource_group: str = ""
    workspace: str = ""
    config_file: str = "config.json"
    # What is deployed
    entry_script: str = REFERENCE_SCRIPT
    conda_file: str = os.path.join(REPO_ROOT, "myenv.yml")
    model_dir: str = ""
    model_name: str = "resnet50"
    base_image: str = GPU_BASE_IMAGE
    # Where: an AKS cluster attached to the workspace as Kubernetes compute
    compute: str = "gpu-aks"
    aks_cluster: str = "scorehost-gpu"  # the AKS resource (attached, or created with create_cluster)
    create_cluster: bool = False
    location: str = "eastus"
    vm_size: str = "Standard_NC4as_T4_v3"
    node_count: int = 3
    instance_type: str = "gpu-t4"
    # The endpoint and its deployment
    endpoint: str = "scorehost-resnet50"
    deployment: str = "blue"
    replicas: int = 3
    cpu: str = "2"
    memory: str = "4Gi"
    gpus: int = 1
    request_timeout_ms: int = 5000
    max_concurrent_requests: int = 4
    liveness_initial_delay_s: int = 30
    readiness_initial_delay_s: int = 10
    # SDK v1 only
    sdk: str = "v2"

    @classmethod
    def load(cls, path: Optional[str] = None, **overrides: Any) -> "DeploySettings":
        values: dict[str, Any] = {}
        if path:
            import yaml

            with open(path, encoding="utf-8") as f:
                values = yaml.safe_load(f) or {}
            unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise SystemExit(f"{path}: unknown settings {sorted(unknown)}")
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_workspace(self) -> "DeploySettings":
        """Fill subscription, resource group and workspace from config.json (as the Azure ML SDKs do)."""
        if self.subscription_id and self.resource_group and self.workspace:
            return self
        if not os.path.exists(self.config_file):
            raise WorkspaceNotFound(
                f"No workspace given and no {self.config_file}: download config.json from the Azure ML studio "
                "(workspace page -> 'Download config file'), or pass --subscription-id, --resource-group and "
                "--workspace.")
        with open(self.config_file, encoding="utf-8") as f:
            config = json.load(f)
        return dataclasses.replace(self, subscription_id=self.subscription_id or config["subscription_id"],
                                   resource_group=self.resource_group or config["resource_group"],
                                   workspace=self.workspace or config["workspace_name"])

    @property
    def aks_resource_id(self) -> str:
        return (f"/subscriptions/{self.subscription_id or '<subscription-id>'}"
                f"/resourceGroups/{self.resource_group or '<resource-group>'}"
                f"/providers/Microsoft.ContainerService/managedClusters/{self.aks_cluster}")


class DeployError(SystemExit):
    """A deployment step failed: the message says what, what was created, and how to delete it. Exit code 1."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class WorkspaceNotFound(DeployError):
    pass
