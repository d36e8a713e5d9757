"""`scorehost deploy aks | managed | traffic | teardown` with Azure ML SDK v2 (azure-ai-ml).

One flow for both targets: a Kubernetes online endpoint on AKS (the cluster side is cluster.py's), or a managed
online endpoint on a GPU instance type (nothing to create or tear down beside it). Steps, each reported:
  [AKS: cluster, provider, extension, InstanceType, compute attach] -> register the model -> endpoint (read first:
  an existing one keeps its traffic) -> deployment (the identical score.py, its sha256 printed) -> parity replay
  against that deployment alone (header azureml-model-deployment) -> traffic moved -> scoring URI.
Every read comes before its write, so a second run updates in place, except a deployment that takes traffic: that
one is never replaced before the parity check; blue and green alternate instead (Azure ML's safe rollout), and any
other live name is refused. An endpoint made for another project (its PROJECT_TAG) is not taken over under a derived
name. A failure says what this run created (an operation is named before it starts, so a failed one is too) and the
commands that remove exactly that, never what was there before. `build_entities` makes the real SDK objects offline;
`deploy` submits them through the clients.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
import time
from typing import Any, Callable, Iterator, Optional

from deploy import cluster, source
from deploy.plan import model_description, sha256
from deploy.settings import PROJECT_TAG, DeployError, DeploySettings

Say = Callable[[str], None]
ARM_SCOPE = "https://management.azure.com/.default"


@dataclasses.dataclass
class Clients:
    """The service clients one run uses, all on one credential. Only AKS runs use the cluster-side three."""
    ml: Any
    clusters: Any = None
    extensions: Any = None
    resources: Any = None
    credential: Any = None  # also for the cluster's own API, on Entra ID clusters


def connect(s: DeploySettings, credential: Any = None) -> Clients:
    """Real clients on one credential, checked once up front: a failed sign-in stops here, before anything is
    created, with Azure's own account of the credentials it tried."""
    from azure.ai.ml import MLClient
    from azure.core.exceptions import ClientAuthenticationError
    from azure.mgmt.containerservice import ContainerServiceClient
    from azure.mgmt.kubernetesconfiguration import SourceControlConfigurationClient
    from azure.mgmt.resource.resources import ResourceManagementClient

    if credential is None:
        from azure.identity import DefaultAzureCredential

        credential = DefaultAzureCredential()
    chain_log = logging.getLogger("azure.identity._credentials.chained")
    chain_log.disabled = True  # it logs the credentials it tried, which the message below says: once, not twice
    try:
        credential.get_token(ARM_SCOPE)
    except ClientAuthenticationError as ex:
        raise DeployError(f"scorehost deploy: {explain(ex)}\nNothing was created.") from ex
    finally:
        chain_log.disabled = False
    return Clients(MLClient(credential, s.subscription_id, s.resource_group, s.workspace),
                   ContainerServiceClient(credential, s.subscription_id),
                   SourceControlConfigurationClient(credential, s.subscription_id),
                   ResourceManagementClient(credential, s.subscription_id), credential)


@dataclasses.dataclass
class Entities:
    compute: Any
    model: Any
    environment: Any
    endpoint: Any
    deployment: Any
    code_dir: str
    script_sha256: str


def build_entities(s: DeploySettings, managed: bool, code_dir: Optional[str] = None) -> Entities:
    from azure.ai.ml.constants import AssetTypes
    from azure.ai.ml.entities import (CodeConfiguration, DefaultScaleSettings, Environment, IdentityConfiguration,
                                      KubernetesCompute, KubernetesOnlineDeployment, KubernetesOnlineEndpoint,
                                      ManagedOnlineDeployment, ManagedOnlineEndpoint, Model, OnlineRequestSettings,
                                      ProbeSettings)

    # The code folder (deploy/source.py): the entry script, byte for byte, with the rest of its folder.
    copied = source.copy(s, code_dir)
    code_dir, script, digest = os.path.dirname(copied), os.path.basename(copied), sha256(copied)
    tags = {"scorehost": "1", "score_sha256": digest}
    model = Model(name=s.model_name, path=s.model_dir, type=AssetTypes.CUSTOM_MODEL,
                  description=model_description(s),
                  tags={**tags, "files_sha256": sha256(s.model_dir)} if os.path.isdir(s.model_dir) else tags)
    environment = Environment(name=f"scorehost-{s.model_name}", image=s.base_image, conda_file=s.conda_file,
                              description="myenv.yml on Azure ML's CUDA base image")
    common = dict(
        name=s.deployment, endpoint_name=s.endpoint, model=model, environment=environment, tags=tags,
        code_configuration=CodeConfiguration(code=code_dir, scoring_script=script),
        instance_count=s.instance_count, scale_settings=DefaultScaleSettings(),
        # Azure ML runs the script with its inference server: WORKER_COUNT workers take the requests in flight, each
        # loading the model on the instance's one GPU; with memory growth on, the first does not take all of it.
        environment_variables={"WORKER_COUNT": str(s.max_concurrent_requests), "TF_FORCE_GPU_ALLOW_GROWTH": "true"},
        request_settings=OnlineRequestSettings(request_timeout_ms=s.request_timeout_ms,
                                               max_concurrent_requests_per_instance=s.max_concurrent_requests,
                                               max_queue_wait_ms=s.max_queue_wait_ms),
        liveness_probe=ProbeSettings(initial_delay=s.liveness_initial_delay_s, period=10, timeout=2,
                                     failure_threshold=30),
        readiness_probe=ProbeSettings(initial_delay=s.readiness_initial_delay_s, period=10, timeout=2,
                                      failure_threshold=3))
    description = "scorehost: the same score.py as served locally"
    endpoint_tags = {**tags, PROJECT_TAG: s.project}  # whose endpoint it is: see check_owner
    if managed:
        compute = None
        endpoint = ManagedOnlineEndpoint(name=s.endpoint, auth_mode="key", tags=endpoint_tags,
                                         description=description)
        deployment = ManagedOnlineDeployment(instance_type=s.vm_size, **common)
    else:
        # A system-assigned identity: what the compute uses to reach Azure (the workspace's registry among others).
        compute = KubernetesCompute(name=s.compute, resource_id=s.aks_resource_id, namespace="azureml",
                                    identity=IdentityConfiguration(type="system_assigned"))
        endpoint = KubernetesOnlineEndpoint(name=s.endpoint, compute=s.compute, auth_mode="key", tags=endpoint_tags,
                                            description=description)
        deployment = KubernetesOnlineDeployment(instance_type=s.instance_type, **common)
    return Entities(compute, model, environment, endpoint, deployment, code_dir, digest)


def export(s: DeploySettings, out_dir: str) -> list[str]:
    """The endpoint and deployment as `az ml` YAML (`az ml online-endpoint create -f endpoint.yml`, then
    `az ml online-deployment create -f deployment.yml`): what the SDK would send, to review or apply by hand."""
    import logging

    from deploy.files import write_yaml

    # azure-ai-ml logs "This is an experimental class" for a schema class it uses inside _to_dict(): noise here.
    logging.getLogger("azure.ai.ml._utils._experimental").setLevel(logging.ERROR)
    source.mark_output(out_dir)
    entities = build_entities(s, managed=s.target == "managed", code_dir=os.path.join(out_dir, "code"))
    paths = []
    for name, entity in (("endpoint.yml", entities.endpoint), ("deployment.yml", entities.deployment)):
        data = _plain(entity._to_dict())
        if name == "deployment.yml":
            data["code_configuration"]["code"] = "./code"
        paths.append(write_yaml(os.path.join(out_dir, name), data))
    if s.target != "managed":
        paths.append(write_yaml(os.path.join(out_dir, "instance-type.yaml"), cluster.instance_type_manifest(s)))
    return paths


def apply_by_hand(s: DeploySettings, paths: list[str]) -> list[str]:
    """The commands that apply what `export` wrote, in order, with what they need that the YAML cannot say: on AKS
    the instance type (kubectl) and the compute attach with its identity before the endpoint; and the traffic, which
    a new endpoint gives no deployment (endpoint.yml's `traffic: {}`): all of it to the first, as `deploy` does."""
    ws = f"-g {s.resource_group or '<resource-group>'} -w {s.workspace or '<workspace>'}"
    lines = []
    if s.target != "managed":
        lines += [f"az aks get-credentials -g {s.resource_group or '<resource-group>'} -n {s.aks_cluster}",
                  f"kubectl apply -f {paths[2]}",
                  f"az ml compute attach {ws} --type Kubernetes --name {s.compute} --resource-id {s.aks_resource_id}"
                  " --namespace azureml --identity-type SystemAssigned"]
    return lines + [f"az ml online-endpoint create {ws} -f {paths[0]}",
                    f"az ml online-deployment create {ws} -f {paths[1]} --all-traffic"]


def _plain(data: Any) -> Any:
    """The SDK's OrderedDicts as plain YAML-able data."""
    import json

    return json.loads(json.dumps(data))


def explain(error: BaseException) -> str:
    """Azure's failure, in words a user can act on."""
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError

    text = " ".join(str(error).split())  # azure-core's message spans lines (Code:, Message:): one line here
    if isinstance(error, ClientAuthenticationError):
        return f"Authentication failed: run `az login` (or set AZURE_CLIENT_ID/SECRET/TENANT_ID). Azure said: {text}"
    if isinstance(error, HttpResponseError) and any(k in text for k in ("QuotaExceeded", "quota", "Quota")):
        return f"Not enough GPU quota in this region for the VM size: request more, or pick another region. {text}"
    if isinstance(error, HttpResponseError) and "SkuNotAvailable" in text:
        return f"The VM size is not available in this region/subscription: pick another size or region. {text}"
    if isinstance(error, ResourceNotFoundError):
        return f"Not found (is the workspace, resource group or AKS cluster name right?): {text}"
    return text


def _wait(poller: Any, what: str, say: Say, timeout_s: float, poll_s: float = 10) -> Any:
    started = time.monotonic()
    while not poller.done():
        if time.monotonic() - started > timeout_s:
            raise TimeoutError(f"{what} not done after {timeout_s:.0f} s")
        say(f"  ... {what}: {poller.status()} ({time.monotonic() - started:.0f} s)")
        poller.wait(poll_s)
    return poller.result()


def registered_model(ml: Any, model: Any) -> Optional[Any]:
    """The registered version with the same files (tag files_sha256), so a second run uploads nothing again."""
    wanted = (model.tags or {}).get("files_sha256")
    versions = cluster.existing(lambda: list(ml.models.list(name=model.name))) or []
    return next((v for v in versions if wanted and (v.tags or {}).get("files_sha256") == wanted), None)


def shares(current: dict[str, int], requested: dict[str, int]) -> dict[str, int]:
    """The endpoint's traffic after `requested` (deployment -> percent): the deployments not named keep their
    proportions of what is left. Azure wants the shares to add up to 100."""
    bad = {k: v for k, v in requested.items() if not 0 <= v <= 100}
    if bad:
        raise DeployError(f"traffic must be 0-100 percent: {bad}")
    rest = {k: v for k, v in current.items() if k not in requested}
    left, total = 100 - sum(requested.values()), sum(rest.values())
    if left < 0:
        raise DeployError(f"traffic adds up to {100 - left}%, over 100%: {requested}")
    if total == 0:
        if left:
            raise DeployError(f"traffic {requested} leaves {left}% to no deployment: no other deployment of the "
                              f"endpoint takes traffic now ({current or 'it has none'})")
        return {**dict.fromkeys(rest, 0), **requested}
    exact = {k: v * left / total for k, v in rest.items()}
    scaled = {k: int(v) for k, v in exact.items()}
    for k in sorted(exact, key=lambda k: exact[k] - scaled[k], reverse=True)[:left - sum(scaled.values())]:
        scaled[k] += 1  # largest remainders first, so the shares add up exactly
    return {**scaled, **requested}


def planned_traffic(current: dict[str, int], s: DeploySettings) -> dict[str, int]:
    """What the endpoint's traffic becomes after deploying s.deployment (see the --traffic setting)."""
    if s.traffic is not None:
        return shares(current, {s.deployment: s.traffic})
    if s.deployment in current:
        return dict(current)
    return shares(current, {s.deployment: 0 if any(current.values()) else 100})


def deploy(clients: Clients, s: DeploySettings, managed: bool, say: Say = print,
           check: Optional[Callable[[str, str, str], bool]] = None, timeout_s: float = 3600,
           poll_s: float = 10) -> dict:
    """Create or update every resource in order; `check(scoring_uri, key, deployment)` runs against the new
    deployment alone before it takes traffic. Returns {"scoring_uri", "key", "traffic", "created"}."""
    ml = clients.ml
    entities = build_entities(s, managed)
    say(source.shipped_line(s, entities.script_sha256))
    created: list[str] = []  # what this run made or began to make: a failed operation may leave its resource
    step, endpoint_new, new_deployment = "start", True, True

    def do(name: str, action: Callable[[], Any], record: str = "") -> Any:
        nonlocal step
        step = name
        say(name)
        if record:
            created.append(record)  # before it starts: what Azure began to create stays when the wait fails
        try:
            result = action()
        except BaseException:
            if record:
                created.remove(record)  # the request itself was refused: Azure began nothing
            raise
        if hasattr(result, "done") and hasattr(result, "result"):  # a long-running operation: wait, with progress
            result = _wait(result, name, say, timeout_s, poll_s)
        return result

    side = None
    try:
        # Reads, and what they refuse, before anything is written.
        step = f"endpoint {s.endpoint}"
        endpoint = read_endpoint(ml, s)
        endpoint_new = endpoint is None
        if endpoint is not None:
            check_owner(endpoint, s)
        current = dict(endpoint.traffic or {}) if endpoint is not None else {}
        s = free_deployment(s, current, say)
        entities.deployment.name = s.deployment
        traffic = planned_traffic(current, s)
        new_deployment = endpoint is None or cluster.existing(lambda: ml.online_deployments.get(
            name=s.deployment, endpoint_name=s.endpoint)) is None
        if not managed:
            step = f"cluster {s.aks_cluster}"
            side = cluster.prepare(clients, s, say, created.append, poll_s=poll_s)
            step = f"compute {s.compute}"
            compute = cluster.existing(lambda: ml.compute.get(s.compute))
            if compute is None:
                compute = do(f"attach AKS cluster {s.aks_cluster} as compute {s.compute}",
                             lambda: ml.compute.begin_create_or_update(entities.compute),
                             f"compute {s.compute} (attached)")
                say(registry_role_line(ml, s, compute))
            elif (getattr(compute, "resource_id", "") or "").lower() != s.aks_resource_id.lower():
                raise DeployError(f"compute {s.compute} exists but is {compute.resource_id}, not {s.aks_resource_id}:"
                                  " pass --compute with another name")
            else:
                say(f"compute {s.compute} is attached already")
        if new_deployment and side is not None:
            step = f"GPUs for deployment {s.deployment}"
            cluster.check_gpu_capacity(side.api_client, s)
        elif new_deployment and managed:
            step = f"quota for deployment {s.deployment}"
            check_managed_quota(ml, s)
        step = f"model {s.model_name}"
        model = registered_model(ml, entities.model)
        if model is not None:
            say(f"model {s.model_name}:{model.version} holds these files already: used as it is")
        else:
            model = do(f"register model {s.model_name}", lambda: ml.models.create_or_update(entities.model),
                       f"model {s.model_name} (a new version)")
            created[-1] = f"model {s.model_name}:{getattr(model, 'version', '?')}"
        entities.deployment.model = model
        if endpoint is None:
            endpoint = do(f"endpoint {s.endpoint}", lambda: ml.online_endpoints.begin_create_or_update(
                entities.endpoint), f"endpoint {s.endpoint}")
        else:
            say(f"endpoint {s.endpoint} exists (traffic {current or 'none'}): kept as it is")
        do(f"deployment {s.endpoint}/{s.deployment} ({s.instance_count} x "
           f"{s.vm_size if managed else s.instance_type})",
           lambda: ml.online_deployments.begin_create_or_update(entities.deployment),
           f"deployment {s.endpoint}/{s.deployment}" if new_deployment else "")
        step = "keys"
        endpoint = ml.online_endpoints.get(s.endpoint)
        key = ml.online_endpoints.get_keys(s.endpoint).primary_key
        passed = True
        if check is not None and side is not None and side.https_name:
            step = f"DNS for {side.https_name}"
            cluster.wait_for_dns(side.https_name, side.router_ip, say, s.dns_wait_s, poll_s)
        if check is not None:
            step = "parity"
            say(f"\nParity replay against deployment {s.deployment} alone, before it takes traffic")
            passed = check(endpoint.scoring_uri, key, s.deployment)
        if passed and live(traffic) != live(current):  # a new deployment at 0% needs no endpoint write
            endpoint.traffic = traffic
            do(f"traffic {traffic}", lambda: ml.online_endpoints.begin_create_or_update(endpoint))
    except BaseException as ex:  # noqa: B036 - Ctrl-C too must say what is left billing
        if isinstance(ex, DeployError) and not created:  # refused before anything was written: its reason alone
            raise DeployError(f"scorehost deploy: {ex.message}") from ex
        message = (ex.message if isinstance(ex, DeployError) else explain(ex) if isinstance(ex, Exception)
                   else "interrupted")
        hint = f"\nCreated so far: {', '.join(created) or 'nothing'}."
        undo = removal(s, created, endpoint_new)
        if undo:
            hint += "\nRemove what this run created (and nothing that was there before) with:\n" + "\n".join(
                f"  {line}" for line in undo)
        if "deployment" in step:
            hint += (f"\nThe deployment did not become healthy; its logs: az ml online-deployment get-logs "
                     f"-e {s.endpoint} -n {s.deployment} -g {s.resource_group} -w {s.workspace}")
        raise DeployError(f"scorehost deploy: failed at '{step}': {message}{hint}") from ex
    finally:
        shutil.rmtree(entities.code_dir, ignore_errors=True)
    if not passed:
        raise DeployError(
            f"scorehost deploy: deployment {s.deployment} answers differently from the local server (above); it "
            f"takes no new traffic, the endpoint's stays {current or 'none'}." + (
                f"\nDelete it with: scorehost deploy teardown --endpoint {s.endpoint} --only-deployment "
                f"{s.deployment} --yes" if new_deployment else
                f"\nIt was there before with no traffic, and now runs this code."))
    say(f"scoring URI: {endpoint.scoring_uri}  traffic: {traffic}")
    say(f"key: az ml online-endpoint get-credentials -n {s.endpoint} -g {s.resource_group} -w {s.workspace}")
    return {"scoring_uri": endpoint.scoring_uri, "key": key, "traffic": traffic, "created": created,
            "script_sha256": entities.script_sha256, "deployment": s.deployment}


def live(traffic: dict[str, int]) -> dict[str, int]:
    return {name: share for name, share in traffic.items() if share}


def removal(s: DeploySettings, created: list[str], endpoint_new: bool) -> list[str]:
    """The commands that remove exactly what a failed run created. `teardown --endpoint` deletes the endpoint with
    every deployment, so it is given only for an endpoint this run made; beside an endpoint that was there (with
    its live deployments), the new deployment alone."""
    def made(kind: str) -> bool:
        return any(c.startswith(kind) for c in created)

    ws = f"-g {s.resource_group} -w {s.workspace}"
    lines = []
    if endpoint_new and any(made(k) for k in ("endpoint", "deployment", "compute", "AKS cluster")):
        lines.append(f"scorehost deploy teardown --endpoint {s.endpoint} --yes"
                     + (" --cluster" if made("compute") or made("AKS cluster") else "")
                     + (" --delete-cluster" if made("AKS cluster") else ""))
    elif made("deployment"):
        lines.append(f"scorehost deploy teardown --endpoint {s.endpoint} --only-deployment {s.deployment} --yes")
    if not endpoint_new and made("compute"):
        lines.append(f"az ml compute detach -n {s.compute} {ws}")
    if not endpoint_new and made("AKS cluster"):
        lines.append(f"az aks delete -g {s.resource_group} -n {s.aks_cluster}")
    lines += [f"az ml model archive -n {name} --version {version} {ws}" for name, _, version in
              (c.removeprefix("model ").partition(":") for c in created if c.startswith("model ") and ":" in c)]
    return lines


COLOURS = {"blue": "green", "green": "blue"}


def free_deployment(s: DeploySettings, current: dict[str, int], say: Say) -> DeploySettings:
    """The deployment to create or update: never one that takes traffic, which would serve the new code before the
    parity check (and a failed check could not take it back). Blue and green alternate, as in Azure ML's safe
    rollout: with blue live, `--deployment blue` (the default) deploys green beside it, and says so. A live
    deployment of any other name, or both colours live, is refused."""
    if not current.get(s.deployment):
        return s
    other = COLOURS.get(s.deployment)
    if other is None or current.get(other):
        raise DeployError(
            f"deployment {s.deployment} takes {current[s.deployment]}% of endpoint {s.endpoint}'s traffic "
            f"({current}): updating it in place would serve the new code before the parity check; pass "
            "--deployment with a name that takes no traffic" + (
                f", or move all traffic to one colour first (scorehost deploy traffic {s.deployment}=100)"
                if other else ""))
    say(f"deployment {s.deployment} takes {current[s.deployment]}% of the traffic: deploying {other} beside it "
        "(blue/green; --deployment NAME for another name)")
    return dataclasses.replace(s, deployment=other)


def read_endpoint(ml: Any, s: DeploySettings) -> Optional[Any]:
    """The endpoint, or None where it does not exist. Azure answers 404 as well for a workspace or resource group
    that does not exist: that is said in one line, never taken for an absent endpoint (teardown would report
    "deleted: nothing" and exit 0)."""
    from azure.core.exceptions import ResourceNotFoundError

    try:
        endpoint = cluster.existing(lambda: ml.online_endpoints.get(s.endpoint))
        if endpoint is None:
            ml.workspaces.get(s.workspace)
    except ResourceNotFoundError as ex:  # the resource group (existing() lets it through) or the workspace
        raise DeployError(f"workspace {s.workspace} was not found in resource group {s.resource_group} of "
                          f"subscription {s.subscription_id}: check --workspace, --resource-group and "
                          f"--subscription-id (or {s.config_file})") from ex
    return endpoint


def check_owner(endpoint: Any, s: DeploySettings) -> None:
    """Under a derived name, an endpoint is this project's only when its PROJECT_TAG says so: two projects can derive
    one name, and the second must not replace the first one's deployments, move its traffic or delete it. A name the
    user gave is theirs to use."""
    owner = (getattr(endpoint, "tags", None) or {}).get(PROJECT_TAG)
    if s.endpoint_derived and owner != s.project:
        raise DeployError(
            f"endpoint {s.endpoint} exists but was not made by scorehost for this project ("
            + (f"it was made for {owner}" if owner else f"it has no {PROJECT_TAG} tag")
            + f"; this is {s.project}): pass --endpoint {s.endpoint} to use it all the same, or --endpoint with a new "
            "name")


def scorehost_endpoints(ml: Any) -> list[str]:
    """The workspace's endpoints that scorehost made (tag scorehost), each with its project and traffic: what may
    still bill when the one asked for is not there."""
    return [f"{e.name} ({(e.tags or {}).get(PROJECT_TAG, 'no project tag')}; traffic {e.traffic or 'none'})"
            for e in ml.online_endpoints.list() if (e.tags or {}).get("scorehost")]


def absent(ml: Any, s: DeploySettings) -> str:
    """An endpoint that does not exist, with the scorehost endpoints that do (a wrong name leaves them billing)."""
    others = scorehost_endpoints(ml)
    return (f"endpoint {s.endpoint} does not exist; " + (
        f"scorehost's endpoints in workspace {s.workspace}: {', '.join(others)} (pass --endpoint NAME)" if others
        else f"workspace {s.workspace} has no endpoint made by scorehost"))


@contextlib.contextmanager
def one_line(command: str) -> Iterator[None]:
    """Azure's errors out of `command` as one line (explain), never a traceback: main prints a DeployError's
    message alone."""
    from azure.core.exceptions import AzureError

    try:
        yield
    except AzureError as ex:
        raise DeployError(f"scorehost {command}: {explain(ex)}") from ex


MANAGED_RESERVE = 1.2  # Azure ML reserves 20% more than a managed deployment's instances, for upgrades


def check_managed_quota(ml: Any, s: DeploySettings) -> None:
    """A managed deployment takes vCPU quota of its VM family: ceil(1.2 x instances) x the size's vCPUs (Azure ML's
    20% reserve, "Manage and increase quotas", managed online endpoints). Say before creating it what is free and
    needed, instead of a failed deployment minutes later."""
    size = next((v for v in ml.compute.list_sizes() if (v.name or "").lower() == s.vm_size.lower()), None)
    if size is None or not size.family or not size.v_cp_us:
        raise DeployError(f"VM size {s.vm_size} is not offered in the workspace's region: pass --vm-size with one "
                          "that is (az ml compute list-sizes)")
    usage = next((u for u in ml.compute.list_usage() if u.name is not None and
                  (u.name.value or "").lower() == size.family.lower()), None)
    needed = math.ceil(MANAGED_RESERVE * s.instance_count) * size.v_cp_us
    if usage is None or usage.limit is None:
        return  # no quota row for the family: nothing to check against
    free = usage.limit - (usage.current_value or 0)
    if free >= needed:
        return
    fits = next((n for n in range(s.instance_count - 1, 0, -1)
                 if math.ceil(MANAGED_RESERVE * n) * size.v_cp_us <= free), 0)
    raise DeployError(
        f"{size.family} has {free} of {usage.limit} vCPUs free; deployment {s.deployment} needs {needed} "
        f"(ceil(1.2 x {s.instance_count} instances) x {size.v_cp_us} vCPUs of {s.vm_size}: Azure ML reserves 20% "
        "for upgrades). " + (f"Pass --instance-count {fits}, or request" if fits else "Request")
        + " more quota: Azure portal > Quotas > Machine learning, or free it by deleting another deployment.")


def registry_role_line(ml: Any, s: DeploySettings, compute: Any) -> str:
    """The role the attached compute's system-assigned identity needs to pull the deployment's image: AcrPull on the
    workspace's container registry (where Azure ML builds the environment's image)."""
    principal = getattr(getattr(compute, "identity", None), "principal_id", None) or "<the compute's principal id>"
    registry = getattr(ml.workspaces.get(s.workspace), "container_registry", None) or "<the workspace's registry id>"
    return (f"compute {s.compute} has a system-assigned identity ({principal}); it pulls the deployment's image with "
            f"AcrPull on the workspace's registry: az role assignment create --assignee-object-id {principal} "
            f"--assignee-principal-type ServicePrincipal --role AcrPull --scope {registry}")


def set_traffic(ml: Any, s: DeploySettings, requested: dict[str, int], say: Say = print) -> dict[str, int]:
    """`deploy traffic green=10`: shift (or roll back) the endpoint's traffic among its deployments."""
    endpoint = read_endpoint(ml, s)
    if endpoint is None:
        raise DeployError(f"scorehost deploy traffic: {absent(ml, s)}")
    check_owner(endpoint, s)
    deployments = {d.name for d in ml.online_deployments.list(endpoint_name=s.endpoint)}
    unknown = set(requested) - deployments
    if unknown:
        raise DeployError(f"endpoint {s.endpoint} has no deployment {', '.join(sorted(unknown))} "
                          f"(it has {', '.join(sorted(deployments)) or 'none'})")
    current = {name: (endpoint.traffic or {}).get(name, 0) for name in deployments}
    traffic = shares(current, requested)
    say(f"traffic of {s.endpoint}: {current} -> {traffic}")
    endpoint.traffic = traffic
    _wait(ml.online_endpoints.begin_create_or_update(endpoint), "traffic", say, 1800)
    return traffic


def teardown(clients: Clients, s: DeploySettings, detach: bool, only_deployment: str = "",
             delete_cluster: Callable[[], bool] = lambda: False, say: Say = print) -> list[str]:
    """Delete the endpoint (or one deployment of it); with `detach`, detach the compute; then say exactly what still
    bills, and delete the cluster where scorehost created it and `delete_cluster()` says yes."""
    ml = clients.ml
    deleted: list[str] = []
    endpoint = read_endpoint(ml, s)
    if endpoint is not None:
        check_owner(endpoint, s)
    if only_deployment:
        if endpoint is None:
            raise DeployError(absent(ml, s))
        if (endpoint.traffic or {}).get(only_deployment):
            raise DeployError(f"deployment {only_deployment} takes {endpoint.traffic[only_deployment]}% of the "
                              f"traffic: move it first (scorehost deploy traffic {only_deployment}=0)")
        say(f"deleting deployment {s.endpoint}/{only_deployment}")
        ml.online_deployments.begin_delete(name=only_deployment, endpoint_name=s.endpoint).result()
        return [f"deployment {s.endpoint}/{only_deployment}"]
    if endpoint is None:
        say(absent(ml, s))
        # Nothing says which target it was: the cluster side is read only where there is one to read (a managed
        # user has none, and may have no right to read one).
        on_aks = detach or cluster.existing(lambda: ml.compute.get(s.compute)) is not None
    else:
        on_aks = getattr(endpoint, "compute", None) is not None
        say(f"deleting endpoint {s.endpoint} and its deployments")
        ml.online_endpoints.begin_delete(name=s.endpoint).result()
        deleted.append(f"endpoint {s.endpoint}")
    billing: list[str] = []
    if on_aks:
        if detach and cluster.existing(lambda: ml.compute.get(s.compute)) is not None:
            say(f"detaching compute {s.compute}")
            ml.compute.begin_delete(name=s.compute, action="Detach").result()
            deleted.append(f"compute {s.compute} (detached)")
        billing, ours = cluster.still_billing(clients.clusters, s)
        if billing and ours and delete_cluster():
            cluster.delete_cluster(clients.clusters, s, say)
            deleted.append(f"AKS cluster {s.aks_cluster}")
            billing = []
        elif billing and ours:
            billing.append(f"  scorehost created this cluster: `scorehost deploy teardown --delete-cluster` deletes "
                           f"it (or az aks delete -g {s.resource_group} -n {s.aks_cluster})")
        elif billing:
            billing.append(f"  scorehost did not create this cluster, so it leaves it to you: az aks delete -g "
                           f"{s.resource_group} -n {s.aks_cluster}")
    billing.append(f"Registered in workspace {s.workspace}: model {s.model_name} and environment "
                   f"scorehost-{s.model_name} (storage, cents a month): az ml model archive -n {s.model_name}")
    say("Still billing:\n" + "\n".join(billing))
    return deleted
