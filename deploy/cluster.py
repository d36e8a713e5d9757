"""The cluster side that azure-ai-ml cannot do: create an AKS cluster with a GPU node pool, install the Azure ML
extension on it, and create the GPU instance type that deployments ask for (a custom resource of that extension).

Uses azure-mgmt-containerservice, azure-mgmt-kubernetesconfiguration and the cluster's own API (kubernetes
client). Each function takes its clients as arguments, so the tests hand in fakes that record the calls.
"""

from __future__ import annotations

import tempfile
from typing import Any, Callable

from deploy.azure_v2 import instance_type_manifest
from deploy.settings import DeploySettings

SYSTEM_POOL_SIZE = "Standard_D4s_v5"


def managed_cluster(s: DeploySettings) -> Any:
    from azure.mgmt.containerservice.models import (ManagedCluster, ManagedClusterAgentPoolProfile,
                                                    ManagedClusterIdentity)

    return ManagedCluster(
        location=s.location, dns_prefix=s.aks_cluster, identity=ManagedClusterIdentity(type="SystemAssigned"),
        agent_pool_profiles=[
            ManagedClusterAgentPoolProfile(name="system", mode="System", count=1, vm_size=SYSTEM_POOL_SIZE,
                                           os_type="Linux"),
            ManagedClusterAgentPoolProfile(name="gpupool", mode="User", count=s.node_count, vm_size=s.vm_size,
                                           os_type="Linux", node_labels={"scorehost/gpu": "true"}),
        ])


def azureml_extension() -> Any:
    from azure.mgmt.kubernetesconfiguration.models import Extension, Scope, ScopeCluster

    return Extension(extension_type="Microsoft.AzureML.Kubernetes", auto_upgrade_minor_version=True,
                     release_train="stable", scope=Scope(cluster=ScopeCluster(release_namespace="azureml")),
                     configuration_settings={"enableInference": "True", "inferenceRouterServiceType": "LoadBalancer",
                                             "allowInsecureConnections": "False", "installNvidiaDevicePlugin": "True",
                                             "installDcgmExporter": "True"})


def create_cluster(aks_client: Any, extensions_client: Any, s: DeploySettings, say: Callable[[str], None]) -> None:
    say(f"creating AKS cluster {s.aks_cluster} in {s.location}: 1 system node, {s.node_count} x {s.vm_size}")
    aks_client.managed_clusters.begin_create_or_update(s.resource_group, s.aks_cluster, managed_cluster(s)).result()
    say("installing the Azure ML extension (Microsoft.AzureML.Kubernetes)")
    extensions_client.extensions.begin_create(s.resource_group, "Microsoft.ContainerService", "managedClusters",
                                              s.aks_cluster, "azureml", azureml_extension()).result()


def create_instance_type(aks_client: Any, s: DeploySettings, custom_objects: Any = None) -> None:
    """Create (or replace) the InstanceType custom resource, with the cluster's user credentials."""
    if custom_objects is None:
        import kubernetes

        credentials = aks_client.managed_clusters.list_cluster_user_credentials(s.resource_group, s.aks_cluster)
        with tempfile.NamedTemporaryFile("wb", suffix=".kubeconfig") as f:
            f.write(credentials.kubeconfigs[0].value)
            f.flush()
            api_client = kubernetes.config.new_client_from_config(f.name)
        custom_objects = kubernetes.client.CustomObjectsApi(api_client)
    body = instance_type_manifest(s)
    args = ("amlarc.azureml.com", "v1alpha1", "instancetypes")
    try:
        custom_objects.create_cluster_custom_object(*args, body)
    except Exception as ex:  # kubernetes.client.ApiException, 409: it exists -> replace it
        if getattr(ex, "status", None) != 409:
            raise
        custom_objects.replace_cluster_custom_object(*args, s.instance_type, body)


def clients(s: DeploySettings, credential: Any) -> tuple[Any, Any]:
    from azure.mgmt.containerservice import ContainerServiceClient
    from azure.mgmt.kubernetesconfiguration import SourceControlConfigurationClient

    return (ContainerServiceClient(credential, s.subscription_id),
            SourceControlConfigurationClient(credential, s.subscription_id))
