"""The cluster side that azure-ai-ml cannot do: the AKS cluster with its GPU pool, the Azure ML extension on it,
and the GPU InstanceType (a custom resource of that extension) that deployments ask for.

Every step reads before it writes, so a second run changes nothing that exists: an existing cluster's node pools are
never touched, an installed extension keeps its settings, the InstanceType is replaced with its resourceVersion.
The clients are the real ones (azure-mgmt-containerservice, -kubernetesconfiguration, -resource, kubernetes),
handed in, so the tests can give them a recording transport or a local API server.
"""

from __future__ import annotations

import base64
import dataclasses
import socket
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
# The inference router the extension puts behind a LoadBalancer (namespace azureml): the IP an HTTPS name points at.
ROUTER = ("azureml-fe", "azureml")
# AKS's Entra ID server application: what `kubelogin get-token --server-id` asks tokens for (its default).
AKS_AAD_SERVER_APP = "6dae42f8-4368-4678-94ff-3960e28e3630"
GPU = "nvidia.com/gpu"

Say = Callable[[str], None]


# ARM's codes for a 404 whose cause is the container, not the resource read: a resource group or parent resource
# (the workspace) that does not exist. Taken for "absent", a typo would read as "nothing there to delete".
PARENT_NOT_FOUND = ("ResourceGroupNotFound", "ParentResourceNotFound")


def existing(read: Callable[[], Any]) -> Optional[Any]:
    """What `read()` returns, or None where Azure (or the cluster's API) answers 404 for the resource itself: the
    read before a write. A 404 for its resource group or parent (PARENT_NOT_FOUND) is raised."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        return read()
    except Exception as ex:
        if getattr(getattr(ex, "error", None), "code", None) in PARENT_NOT_FOUND:
            raise
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


@dataclasses.dataclass
class GpuAddOns:
    """What the cluster runs already: a device plugin (its GPU nodes advertise nvidia.com/gpu) and a DCGM exporter."""
    device_plugin: bool
    dcgm_exporter: bool


def gpu_add_ons(api_client: Any, s: DeploySettings) -> GpuAddOns:
    """Read from the cluster: the extension installs either only where the cluster lacks it (two device plugins
    fight over the GPUs; the extension's docs say to reuse an existing DCGM exporter)."""
    import kubernetes

    core, apps = kubernetes.client.CoreV1Api(api_client), kubernetes.client.AppsV1Api(api_client)
    daemonsets = [d.metadata.name for d in apps.list_daemon_set_for_all_namespaces().items]
    nodes = core.list_node(label_selector=f"agentpool={s.gpu_pool}").items
    advertised = any(int((n.status.allocatable or {}).get(GPU, 0)) for n in nodes)
    return GpuAddOns(advertised or any("nvidia-device-plugin" in d for d in daemonsets),
                     any("dcgm-exporter" in d for d in daemonsets))


def extension_settings(s: DeploySettings, cluster: Any, add_ons: GpuAddOns) -> tuple[dict[str, str], dict[str, str]]:
    """(configuration settings, protected settings) as `az k8s-extension create` sends them for an AKS cluster
    (azure-cli-extensions, AzureMLKubernetes.py: cluster_name, then clusterId and the Prometheus label derived from
    it), with inference on, the HTTPS choice the caller made, and the GPU add-ons the cluster lacks."""
    location = (cluster.location or s.location).lower()
    nodes = sum(p.count or 0 for p in cluster.agent_pool_profiles or [])
    settings = {
        "enableTraining": "False", "enableInference": "True", "inferenceRouterServiceType": "LoadBalancer",
        "installNvidiaDevicePlugin": str(not add_ons.device_plugin),
        "installDcgmExporter": str(not add_ons.dcgm_exporter),
        "allowInsecureConnections": str(s.allow_insecure), "cluster_name": s.aks_resource_id,
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


def ensure_extension(extensions: Any, s: DeploySettings, cluster: Any, add_ons: GpuAddOns, say: Say,
                     created: Callable[[str], None]) -> str:
    """The Azure ML extension: left as it is when installed, else installed (10-20 min). Returns the HTTPS name
    its inference router answers to ("" for plain HTTP)."""
    from azure.mgmt.kubernetesconfiguration.models import Extension, Scope, ScopeCluster

    where = (s.resource_group, "Microsoft.ContainerService", "managedClusters", s.aks_cluster, EXTENSION_NAME)
    found = existing(lambda: extensions.extensions.get(*where))
    if found is not None:
        say(f"Azure ML extension on {s.aks_cluster} exists ({found.provisioning_state}): its settings are left as "
            "they are")
        return (found.configuration_settings or {}).get("sslCname", "")
    if not (s.allow_insecure or s.ssl_cname):
        raise DeployError(f"AKS cluster {s.aks_cluster} has no Azure ML extension, and installing it needs a choice: "
                          "--ssl-cname NAME --ssl-cert CERT.pem --ssl-key KEY.pem for HTTPS, or --allow-insecure")
    settings, protected = extension_settings(s, cluster, add_ons)
    say(f"installing the Azure ML extension ({EXTENSION_TYPE}) on {s.aks_cluster}, "
        f"{'HTTPS for ' + s.ssl_cname if not s.allow_insecure else 'plain HTTP (--allow-insecure)'} (10-20 min); "
        f"NVIDIA device plugin: {'the cluster has one' if add_ons.device_plugin else 'installed with it'}, DCGM "
        f"exporter: {'the cluster has one' if add_ons.dcgm_exporter else 'installed with it'}")
    extension = Extension(extension_type=EXTENSION_TYPE, auto_upgrade_minor_version=True, release_train="stable",
                          scope=Scope(cluster=ScopeCluster(release_namespace="azureml")),
                          configuration_settings=settings, configuration_protected_settings=protected)
    poller = extensions.extensions.begin_create(*where, extension)
    created(f"Azure ML extension on {s.aks_cluster}")
    poller.result()
    return "" if s.allow_insecure else s.ssl_cname


def _client_from(kubeconfig: dict) -> Any:
    import kubernetes
    import yaml

    with tempfile.NamedTemporaryFile("w", suffix=".kubeconfig") as f:
        yaml.safe_dump(kubeconfig, f)
        f.flush()
        return kubernetes.config.new_client_from_config(f.name)


def _kubeconfig(credentials: Any) -> dict:
    import yaml

    return yaml.safe_load(credentials.kubeconfigs[0].value)


def kubernetes_client(clusters: Any, s: DeploySettings, credential: Any, found: Any, say: Say) -> Any:
    """An API client for the cluster itself, from its user credentials (what `az aks get-credentials` fetches).

    On an Entra ID cluster those hold an `exec` user that runs kubelogin, which is not here to run: the same Azure
    credential then gets a token for AKS's server application (the scope kubelogin asks for), sent as a bearer
    token. Where the cluster refuses it (the signed-in identity has no Kubernetes role there) and local accounts
    are enabled, the admin credential is used instead (`az aks get-credentials --admin`)."""
    import kubernetes

    config = _kubeconfig(clusters.managed_clusters.list_cluster_user_credentials(s.resource_group, s.aks_cluster))
    context = next(c["context"] for c in config["contexts"] if c["name"] == config.get("current-context"))
    user = next(u for u in config["users"] if u["name"] == context["user"])
    exec_ = (user.get("user") or {}).get("exec")
    if not exec_:
        return _client_from(config)
    args = exec_.get("args") or []
    server_app = args[args.index("--server-id") + 1] if "--server-id" in args[:-1] else AKS_AAD_SERVER_APP
    user["user"] = {"token": credential.get_token(f"{server_app}/.default").token}
    api_client = _client_from(config)
    try:
        kubernetes.client.CoreV1Api(api_client).list_node(limit=1)
        say(f"AKS cluster {s.aks_cluster} uses Entra ID: signed in to it with your Azure credential")
        return api_client
    except kubernetes.client.ApiException as ex:
        if ex.status not in (401, 403):
            raise
        if getattr(found, "disable_local_accounts", False):
            raise DeployError(
                f"AKS cluster {s.aks_cluster} uses Entra ID and refused your Azure identity ({ex.status}), and its "
                f"local accounts are disabled (which Azure ML's extension does not support): give your identity "
                f"the 'Azure Kubernetes Service RBAC Cluster Admin' role on the cluster, or enable local accounts "
                f"(az aks update -g {s.resource_group} -n {s.aks_cluster} --enable-local-accounts)") from ex
    say(f"AKS cluster {s.aks_cluster} uses Entra ID and refused your identity: using its admin credential (local "
        "accounts are enabled)")
    return _client_from(_kubeconfig(clusters.managed_clusters.list_cluster_admin_credentials(s.resource_group,
                                                                                             s.aks_cluster)))


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


def router_ip(api_client: Any, say: Say, timeout_s: float = 600, poll_s: float = 10) -> str:
    """The public IP of the extension's inference router, once its LoadBalancer has one."""
    import kubernetes

    api = kubernetes.client.CoreV1Api(api_client)
    deadline, said = time.monotonic() + timeout_s, False
    while True:
        service = existing(lambda: api.read_namespaced_service(*ROUTER))
        ingress = (service.status.load_balancer.ingress or []) if service is not None else []
        if ingress and ingress[0].ip:
            return ingress[0].ip
        if time.monotonic() > deadline:
            raise DeployError(f"the inference router ({ROUTER[0]} in namespace {ROUTER[1]}) has no public IP after "
                              f"{timeout_s:.0f} s: kubectl get service -n {ROUTER[1]} {ROUTER[0]}")
        if not said:
            say(f"  ... waiting for the inference router's public IP ({ROUTER[0]})")
            said = True
        time.sleep(poll_s)


def resolves_to(name: str, ip: str) -> bool:
    try:
        return ip in {a[4][0] for a in socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)}
    except OSError:
        return False


def wait_for_dns(name: str, ip: str, say: Say, timeout_s: float, poll_s: float = 10) -> None:
    """HTTPS endpoints answer at the certificate's name: nothing reaches them until it resolves to the router."""
    if resolves_to(name, ip):
        return
    say(f"waiting up to {timeout_s:.0f} s for {name} to resolve to {ip} (the DNS A record above)")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        if resolves_to(name, ip):
            return
    raise DeployError(f"{name} does not resolve to the inference router's IP {ip} after {timeout_s:.0f} s: create "
                      f"the DNS A record {name} -> {ip} (or wait for it to spread), then run this command again")


@dataclasses.dataclass
class ClusterSide:
    """What the deployment steps need from the cluster: its API, and where HTTPS requests must arrive."""
    api_client: Any
    https_name: str = ""
    router_ip: str = ""


def prepare(clients: Any, s: DeploySettings, say: Say, created: Callable[[str], None],
            poll_s: float = 10) -> ClusterSide:
    """Cluster, provider, extension, InstanceType: everything a Kubernetes deployment needs on the cluster side.
    `created` hears of each thing made, so a failure later can say what exists. With HTTPS, it prints the DNS
    record the user must create, as early as it is known."""
    cluster = ensure_cluster(clients.clusters, s, say, created)
    refuse_foreign_taints(cluster, s)
    ensure_provider(clients.resources, say, poll_s=poll_s)
    api_client = kubernetes_client(clients.clusters, s, clients.credential, cluster, say)
    https_name = ensure_extension(clients.extensions, s, cluster, gpu_add_ons(api_client, s), say, created)
    wait_for_instance_types(api_client, say, poll_s=poll_s)
    upsert_instance_type(api_client, s, say)
    if not https_name:
        return ClusterSide(api_client)
    ip = router_ip(api_client, say, poll_s=poll_s)
    if not resolves_to(https_name, ip):
        say(f"DNS: create an A record {https_name} -> {ip} (the inference router's public IP) now; the parity "
            "replay waits for it")
    return ClusterSide(api_client, https_name, ip)


def refuse_foreign_taints(cluster: Any, s: DeploySettings) -> None:
    """Azure ML's pods tolerate only its own `ml.azure.com` taints: on a pool with another NoSchedule taint (AKS's
    GPU guide suggests sku=gpu:NoSchedule) no instance would ever be scheduled."""
    pool = next(p for p in cluster.agent_pool_profiles if p.name == s.gpu_pool)
    foreign = [t for t in pool.node_taints or [] if not t.startswith("ml.azure.com/")]
    if foreign:
        raise DeployError(f"GPU pool {s.gpu_pool} is tainted {', '.join(foreign)}, which Azure ML's pods do not "
                          f"tolerate (only ml.azure.com/ taints): az aks nodepool update -g {s.resource_group} "
                          f"--cluster-name {s.aks_cluster} -n {s.gpu_pool} --node-taints \"\"")


def free_gpus(api_client: Any, s: DeploySettings) -> tuple[int, int]:
    """(free, allocatable) nvidia.com/gpu on the GPU pool's nodes: what the running pods there do not hold."""
    import kubernetes

    core = kubernetes.client.CoreV1Api(api_client)
    nodes = {n.metadata.name: int((n.status.allocatable or {}).get(GPU, 0))
             for n in core.list_node(label_selector=f"agentpool={s.gpu_pool}").items}
    used = 0
    for pod in core.list_pod_for_all_namespaces(field_selector="status.phase!=Succeeded,status.phase!=Failed").items:
        if pod.spec.node_name in nodes:
            for c in pod.spec.containers:
                limits = (c.resources.limits or {}) if c.resources else {}
                used += int(limits.get(GPU, 0))
    return sum(nodes.values()) - used, sum(nodes.values())


def check_gpu_capacity(api_client: Any, s: DeploySettings) -> None:
    """A new deployment beside a live one needs GPUs of its own: say before creating it what is free and needed."""
    free, allocatable = free_gpus(api_client, s)
    needed = s.instance_count * s.gpus
    if free >= needed:
        return
    fits = free // s.gpus
    fix = (f"Pass --instance-count {fits}, or add nodes: " if fits else "Add nodes: ") + (
        f"az aks nodepool scale -g {s.resource_group} --cluster-name {s.aks_cluster} -n {s.gpu_pool} --node-count N")
    raise DeployError(f"GPU pool {s.gpu_pool} has {free} of {allocatable} {GPU} free; deployment {s.deployment} "
                      f"needs {needed} ({s.instance_count} instances x {s.gpus} GPU). {fix}"
                      + ("" if allocatable else f" (no node of the pool advertises {GPU}: is NVIDIA's device plugin "
                                                "running?)"))


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
