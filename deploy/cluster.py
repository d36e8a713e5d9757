"""The cluster side that azure-ai-ml cannot do: the AKS cluster with its GPU pool, the Azure ML extension on it,
and the GPU InstanceType (a custom resource of that extension) that deployments ask for.

Every step reads before it writes, so a second run changes nothing that exists: an existing cluster's node pools are
never touched, an installed extension keeps its settings, the InstanceType is replaced with its resourceVersion.
The clients are the real ones (azure-mgmt-containerservice, -kubernetesconfiguration, -resource, kubernetes),
handed in, so the tests can give them a recording transport or a local API server.
"""

from __future__ import annotations

import base64
import tempfile
import time
from typing import Any, Callable, Optional

from deploy.plan import SYSTEM_POOL_SIZE
from deploy.settings import DeployError, DeploySettings
EXTENSION_NAME = "azureml"
EXTENSION_TYPE = "Microsoft.AzureML.Kubernetes"
CREATED_BY = {"created-by": "scorehost"}  # the tag that lets teardown offer to delete a cluster scorehost made
PROVIDER = "Microsoft.KubernetesConfiguration"  # cluster extensions need it registered in the subscription
INSTANCE_TYPE_CRD = "instancetypes.amlarc.azureml.com"
INSTANCE_TYPE_API = ("amlarc.azureml.com", "v1alpha1", "instancetypes")

Say = Callable[[str], None]


def existing(read: Callable[[], Any]) -> Optional[Any]:
    """What `read()` returns, or None where Azure (or the cluster's API) answers 404: the read before a write."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return read()
    except Exception as ex:
        if isinstance(ex, ResourceNotFoundError) or getattr(ex, "status", None) == 404:  # azure-core, kubernetes
            return None
        raise


def managed_cluster(s: DeploySettings) -> Any:
    from azure.mgmt.containerservice.models import (ManagedCluster, ManagedClusterAgentPoolProfile,
                                                    ManagedClusterIdentity)

    return ManagedCluster(
        location=s.location, dns_prefix=s.aks_cluster, identity=ManagedClusterIdentity(type="SystemAssigned"),
        tags=dict(CREATED_BY),
        agent_pool_profiles=[
            ManagedClusterAgentPoolProfile(name="system", mode="System", count=1, vm_size=SYSTEM_POOL_SIZE,
                                           os_type="Linux"),
            ManagedClusterAgentPoolProfile(name=s.gpu_pool, mode="User", count=s.node_count, vm_size=s.vm_size,
                                           os_type="Linux"),
        ])


def ensure_cluster(clusters: Any, s: DeploySettings, say: Say, created: Callable[[str], None]) -> Any:
    """The AKS cluster: read it; create it only when absent and --create-cluster was given."""
    found = existing(lambda: clusters.managed_clusters.get(s.resource_group, s.aks_cluster))
    if found is not None:
        pools = {p.name: p for p in found.agent_pool_profiles or []}
        say(f"AKS cluster {s.aks_cluster} exists ({', '.join(f'{p.name}: {p.count} x {p.vm_size}' for p in pools.values())}"
            "): its node pools are left as they are")
        if s.gpu_pool not in pools:
            raise DeployError(f"AKS cluster {s.aks_cluster} has no node pool {s.gpu_pool!r} (it has "
                              f"{', '.join(pools) or 'none'}): pass --gpu-pool with the name of its GPU pool")
        return found
    if not s.create_cluster:
        raise DeployError(f"AKS cluster {s.aks_cluster} does not exist in resource group {s.resource_group}: pass "
                          "--create-cluster to create it, or --aks-cluster with the name of yours")
    say(f"creating AKS cluster {s.aks_cluster} in {s.location}: 1 x {SYSTEM_POOL_SIZE} system node, "
        f"{s.node_count} x {s.vm_size} in pool {s.gpu_pool} (10-15 min)")
    poller = clusters.managed_clusters.begin_create_or_update(s.resource_group, s.aks_cluster, managed_cluster(s))
    created(f"AKS cluster {s.aks_cluster}")  # from the first byte on: it may exist even if the wait fails
    return poller.result()


def ensure_provider(resources: Any, say: Say, timeout_s: float = 900, poll_s: float = 10) -> None:
    """Cluster extensions need Microsoft.KubernetesConfiguration registered in the subscription (once)."""
    state = resources.providers.get(PROVIDER).registration_state
    if state == "Registered":
        return
    say(f"registering resource provider {PROVIDER} in the subscription (was {state}; once per subscription; "
        f"by hand: az provider register --namespace {PROVIDER})")
    resources.providers.register(PROVIDER)
    deadline = time.monotonic() + timeout_s
    while resources.providers.get(PROVIDER).registration_state != "Registered":
        if time.monotonic() > deadline:
            raise DeployError(f"resource provider {PROVIDER} still not registered after {timeout_s:.0f} s: "
                              f"see `az provider show --namespace {PROVIDER}`")
        time.sleep(poll_s)


def extension_settings(s: DeploySettings, cluster: Any) -> tuple[dict[str, str], dict[str, str]]:
    """(configuration settings, protected settings) as `az k8s-extension create` sends them for an AKS cluster
    (azure-cli-extensions, AzureMLKubernetes.py), with inference on and the HTTPS choice the caller made."""
    location = (cluster.location or s.location).lower()
    nodes = sum(p.count or 0 for p in cluster.agent_pool_profiles or [])
    settings = {
        "enableTraining": "False", "enableInference": "True", "inferenceRouterServiceType": "LoadBalancer",
        "installNvidiaDevicePlugin": "True", "installDcgmExporter": "True",
        "allowInsecureConnections": str(s.allow_insecure),
        "clusterId": s.aks_resource_id, "prometheus.prometheusSpec.externalLabels.cluster_name": s.aks_resource_id,
        "domain": f"{location}.cloudapp.azure.com", "location": location, "jobSchedulerLocation": location,
        "cluster_name_friendly": s.aks_cluster,
        "servicebus.enabled": "false", "relayserver.enabled": "false", "nginxIngress.enabled": "true",
    }
    if nodes < 3:  # as the CLI does for small clusters
        settings.update({"clusterPurpose": "DevTest", "inferenceRouterHA": "false"})
    protected: dict[str, str] = {}
    if not s.allow_insecure:
        settings["sslCname"] = s.ssl_cname
        for key, path in (("scoringFe.sslCert", s.ssl_cert), ("scoringFe.sslKey", s.ssl_key)):
            with open(path, "rb") as f:
                protected[key] = base64.b64encode(f.read()).decode()
    return settings, protected


def ensure_extension(extensions: Any, s: DeploySettings, cluster: Any, say: Say,
                     created: Callable[[str], None]) -> None:
    """The Azure ML extension: left as it is when installed, else installed (10-20 min)."""
    from azure.mgmt.kubernetesconfiguration.models import Extension, Scope, ScopeCluster

    where = (s.resource_group, "Microsoft.ContainerService", "managedClusters", s.aks_cluster, EXTENSION_NAME)
    found = existing(lambda: extensions.extensions.get(*where))
    if found is not None:
        say(f"Azure ML extension on {s.aks_cluster} exists ({found.provisioning_state}): its settings are left as "
            "they are")
        return
    if not (s.allow_insecure or s.ssl_cname):
        raise DeployError(f"AKS cluster {s.aks_cluster} has no Azure ML extension, and installing it needs a choice: "
                          "--ssl-cname NAME --ssl-cert CERT.pem --ssl-key KEY.pem for HTTPS, or --allow-insecure")
    settings, protected = extension_settings(s, cluster)
    say(f"installing the Azure ML extension ({EXTENSION_TYPE}) on {s.aks_cluster}, "
        f"{'HTTPS for ' + s.ssl_cname if not s.allow_insecure else 'plain HTTP (--allow-insecure)'} (10-20 min)")
    extension = Extension(extension_type=EXTENSION_TYPE, auto_upgrade_minor_version=True, release_train="stable",
                          scope=Scope(cluster=ScopeCluster(release_namespace="azureml")),
                          configuration_settings=settings, configuration_protected_settings=protected)
    poller = extensions.extensions.begin_create(*where, extension)
    created(f"Azure ML extension on {s.aks_cluster}")
    poller.result()


def kubernetes_client(clusters: Any, s: DeploySettings) -> Any:
    """An API client for the cluster itself, from its user credentials (what `az aks get-credentials` fetches)."""
    import kubernetes

    credentials = clusters.managed_clusters.list_cluster_user_credentials(s.resource_group, s.aks_cluster)
    with tempfile.NamedTemporaryFile("wb", suffix=".kubeconfig") as f:
        f.write(credentials.kubeconfigs[0].value)
        f.flush()
        return kubernetes.config.new_client_from_config(f.name)


def instance_type_manifest(s: DeploySettings, resource_version: Optional[str] = None) -> dict:
    """What one instance gets: CPU and memory requested and capped, the GPUs as an integer under limits only (as
    the extension's docs require), on the GPU pool's nodes (AKS labels every node with its pool's name)."""
    metadata: dict[str, Any] = {"name": s.instance_type}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": "/".join(INSTANCE_TYPE_API[:2]), "kind": "InstanceType", "metadata": metadata,
            "spec": {"nodeSelector": {"agentpool": s.gpu_pool},
                     "resources": {"requests": {"cpu": s.cpu, "memory": s.memory},
                                   "limits": {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": s.gpus}}}}


def wait_for_instance_types(api_client: Any, say: Say, timeout_s: float = 900, poll_s: float = 10) -> None:
    """The extension registers the InstanceType CRD some minutes after its install reports success."""
    import kubernetes

    api = kubernetes.client.ApiextensionsV1Api(api_client)
    deadline, said = time.monotonic() + timeout_s, False
    while True:
        try:
            crd = api.read_custom_resource_definition(INSTANCE_TYPE_CRD)
            if any(c.type == "Established" and c.status == "True" for c in (crd.status.conditions or [])):
                return
        except kubernetes.client.ApiException as ex:
            if ex.status != 404:
                raise
        if time.monotonic() > deadline:
            raise DeployError(f"the cluster has no established {INSTANCE_TYPE_CRD} after {timeout_s:.0f} s: is the "
                              "Azure ML extension healthy? kubectl get pods -n azureml")
        if not said:
            say(f"  ... waiting for the extension's {INSTANCE_TYPE_CRD}")
            said = True
        time.sleep(poll_s)


def upsert_instance_type(api_client: Any, s: DeploySettings, say: Say) -> None:
    """Create the InstanceType, or replace it with the resourceVersion it has (the API server refuses a replace
    without one)."""
    import kubernetes

    api = kubernetes.client.CustomObjectsApi(api_client)
    found = existing(lambda: api.get_cluster_custom_object(*INSTANCE_TYPE_API, s.instance_type))
    if found is None:
        say(f"creating instance type {s.instance_type}")
        api.create_cluster_custom_object(*INSTANCE_TYPE_API, instance_type_manifest(s))
        return
    say(f"updating instance type {s.instance_type}")
    api.replace_cluster_custom_object(*INSTANCE_TYPE_API, s.instance_type,
                                      instance_type_manifest(s, found["metadata"]["resourceVersion"]))


def prepare(clients: Any, s: DeploySettings, say: Say, created: Callable[[str], None], poll_s: float = 10) -> None:
    """Cluster, provider, extension, InstanceType: everything a Kubernetes deployment needs on the cluster side.
    `created` hears of each thing made, so a failure later can say what exists."""
    cluster = ensure_cluster(clients.clusters, s, say, created)
    ensure_provider(clients.resources, say, poll_s=poll_s)
    ensure_extension(clients.extensions, s, cluster, say, created)
    api_client = kubernetes_client(clients.clusters, s)
    wait_for_instance_types(api_client, say, poll_s=poll_s)
    upsert_instance_type(api_client, s, say)


def still_billing(clusters: Any, s: DeploySettings) -> tuple[list[str], bool]:
    """(what the cluster still bills for, whether scorehost created it): read from the cluster itself."""
    cluster = existing(lambda: clusters.managed_clusters.get(s.resource_group, s.aks_cluster))
    if cluster is None:
        return [], False
    lines = [f"AKS cluster {s.aks_cluster} ({cluster.location}), in node resource group {cluster.node_resource_group}:"]
    lines += [f"  node pool {p.name}: {p.count} x {p.vm_size} VMs and their OS disks ({p.os_disk_size_gb or '?'} GB "
              "each)" for p in cluster.agent_pool_profiles or []]
    lines += ["  the inference router's load balancer and its public IP address (the extension's LoadBalancer "
              "service)",
              f"  the Azure ML extension ({EXTENSION_NAME}), whose pods run on those nodes"]
    return lines, (cluster.tags or {}).get("created-by") == CREATED_BY["created-by"]


def delete_cluster(clusters: Any, s: DeploySettings, say: Say) -> None:
    say(f"deleting AKS cluster {s.aks_cluster} with its nodes, disks, load balancer and IP (5-10 min)")
    clusters.managed_clusters.begin_delete(s.resource_group, s.aks_cluster).result()
