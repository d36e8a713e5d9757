"""Azure, faked at its wire boundary (it cannot be reached from here), so the deploy tests run the real clients:

- `Arm`: an azure-core transport for the real azure-mgmt clients (ContainerService, KubernetesConfiguration,
  Resource). It records each HTTP request the SDK sends (method, path, api-version, JSON body) and keeps what was
  PUT, so a GET afterwards finds it, as Azure would: a second run meets the first run's resources.
- `KubeApi`: a Kubernetes API server on 127.0.0.1 for the real `kubernetes` client (reached through the kubeconfig
  that `Arm` hands out for listClusterUserCredential, or listClusterAdminCredential). It refuses a replace without
  the current resourceVersion (422), as the real API server does, and a bearer token it does not know (401), or an
  Entra ID token it is told to refuse (403). It has nodes, pods, DaemonSets and the inference router's Service.
- `plain_endpoint`: an HTTP endpoint (or proxy) that answers `{}` to anything and keeps each request's target and
  headers, for what `scorehost parity` sends on the wire.
- `FakeML`: MLClient's operations (azure-ai-ml uploads models and code to blob storage, which no fake can take),
  recording the real entities, each with the REST body the SDK would send for it (`_to_rest_*`). What is not there
  raises azure-core's ResourceNotFoundError from an ARM error body, as the SDK's generated client does (`.error.code`:
  ResourceNotFound, or ResourceGroupNotFound for every read in a resource group that does not exist).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import io
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator, Optional

import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
from azure.core.pipeline.transport import HttpRequest as LegacyHttpRequest
from azure.core.pipeline.transport import RequestsTransport, RequestsTransportResponse
from azure.core.rest._requests_basic import RestRequestsTransportResponse
from requests.structures import CaseInsensitiveDict
from urllib3 import HTTPResponse

SUBSCRIPTION = "00000000-1111-2222-3333-444444444444"
ARM_ID = "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.MachineLearningServices/workspaces/{ws}"


AKS_AAD_SCOPE = "6dae42f8-4368-4678-94ff-3960e28e3630/.default"
AAD_TOKEN = "entra-id-token-for-aks"  # what the credential gives for AKS's server application
USER_TOKEN, ADMIN_TOKEN = "cluster-user-token", "cluster-admin-token"


class Credential:
    """A token credential that counts its calls and records their scopes, or fails like DefaultAzureCredential
    without a login."""

    def __init__(self, fail: bool = False):
        self.calls, self.fail, self.scopes = 0, fail, []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.calls += 1
        self.scopes.extend(scopes)
        if self.fail:
            raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token from the included "
                                            "credentials. AzureCliCredential: Please run 'az login' to set up an "
                                            "account")
        return AccessToken(AAD_TOKEN if AKS_AAD_SCOPE in scopes else "token", int(time.time()) + 3600)


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    authorization: str = ""

    @property
    def api_version(self) -> str:
        return self.query.get("api-version", "")


class Arm(RequestsTransport):
    """Azure Resource Manager as a recording, stateful transport."""

    def __init__(self, kubeconfig: bytes = b"", admin_kubeconfig: bytes = b""):
        super().__init__()
        self.requests: list[Request] = []
        self.resources: dict[str, dict] = {}
        self.providers: dict[str, str] = {}
        self.kubeconfig, self.admin_kubeconfig = kubeconfig, admin_kubeconfig
        self.refuse: dict[str, tuple[int, str]] = {}  # lower-case path -> (status, ARM error code) it answers

    def writes(self, *methods: str) -> list[Request]:
        return [r for r in self.requests if r.method in (methods or ("PUT", "POST", "PATCH", "DELETE"))]

    def send(self, request: Any, **kwargs: Any) -> Any:
        url = urllib.parse.urlsplit(request.url)
        content = request.content if hasattr(request, "content") else request.body  # new-style, legacy request
        body = json.loads(content) if content else None
        recorded = Request(request.method, url.path, dict(urllib.parse.parse_qsl(url.query)), body)
        self.requests.append(recorded)
        status, answer = self.answer(recorded)
        return _response(request, status, answer)

    def answer(self, r: Request) -> tuple[int, Any]:
        path = r.path.lower()
        if path in self.refuse:
            status, code = self.refuse[path]
            return status, {"error": {"code": code, "message": f"{code} for {r.method} {r.path}"}}
        if "/providers/microsoft.kubernetesconfiguration" in path and "/managedclusters/" not in path:
            namespace = "Microsoft.KubernetesConfiguration"
            if path.endswith("/register"):
                self.providers[namespace] = "Registered"
            return 200, {"namespace": namespace, "registrationState": self.providers.get(namespace, "NotRegistered")}
        if path.endswith(("/listclusterusercredential", "/listclusteradmincredential")):
            kubeconfig = self.admin_kubeconfig if path.endswith("admincredential") else self.kubeconfig
            return 200, {"kubeconfigs": [{"name": "clusterUser", "value": base64.b64encode(kubeconfig).decode()}]}
        if r.method == "GET":
            found = self.resources.get(path)
            return (200, found) if found else (404, {"error": {"code": "ResourceNotFound",
                                                               "message": f"{r.path} not found"}})
        if r.method == "DELETE":
            self.resources.pop(path, None)
            return 204, None
        if r.method == "PUT":
            stored = copy.deepcopy(r.body)
            stored.setdefault("properties", {})["provisioningState"] = "Succeeded"
            stored["id"], stored["name"] = r.path, r.path.rsplit("/", 1)[-1]
            if "/managedclusters/" in path and "/extensions/" not in path:
                stored["properties"].setdefault("nodeResourceGroup", "MC_rg-ml_" + stored["name"])
            self.resources[path] = stored
            return 200, stored
        return 404, {"error": {"code": "NotFound", "message": f"no fake for {r.method} {r.path}"}}


def _response(request: Any, status: int, body: Any) -> Any:
    raw = json.dumps(body).encode() if body is not None else b""
    headers = CaseInsensitiveDict({"Content-Type": "application/json", "Content-Length": str(len(raw))})
    response = requests.Response()
    response.status_code, response.reason, response.url, response.headers = status, "fake", request.url, headers
    response.raw = HTTPResponse(body=io.BytesIO(raw), headers=headers, status=status, preload_content=False)
    if isinstance(request, LegacyHttpRequest):  # clients on azure-core's older pipeline types
        response._content = raw
        return RequestsTransportResponse(request, response)
    return RestRequestsTransportResponse(request=request, internal_response=response, block_size=4096)


class KubeApi:
    """The Kubernetes API for the InstanceType CRD and its objects, on 127.0.0.1."""

    CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/instancetypes.amlarc.azureml.com"
    OBJECTS = "/apis/amlarc.azureml.com/v1alpha1/instancetypes"
    ROUTER_PATH = "/api/v1/namespaces/azureml/services/azureml-fe"

    def __init__(self, crd_after_polls: int = 0, gpu_nodes: int = 3, gpus_advertised: bool = True,
                 router_ip: str = "203.0.113.7", router_after_polls: int = 0):
        self.requests: list[Request] = []
        self.objects: dict[str, dict] = {}
        self.crd_polls_left = crd_after_polls
        self.tokens = {USER_TOKEN, ADMIN_TOKEN, AAD_TOKEN}
        self.refuse_aad = False  # as a cluster where the Entra ID identity has no Kubernetes role
        self.nodes = [{"metadata": {"name": f"aks-gpupool-{i}", "labels": {"agentpool": "gpupool"}},
                       "status": {"allocatable": {"cpu": "4", "nvidia.com/gpu": "1"} if gpus_advertised
                                  else {"cpu": "4"}}} for i in range(gpu_nodes)]
        self.pods: list[dict] = []
        self.daemonsets: list[str] = ["nvidia-device-plugin-daemonset"] if gpus_advertised else []
        self.router_ip, self.router_polls_left = router_ip, router_after_polls
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _handle(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                request = Request(self.command, url.path, dict(urllib.parse.parse_qsl(url.query)), body,
                                  self.headers.get("Authorization", ""))
                api.requests.append(request)
                status, answer = api.answer(request)
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_PUT = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def kubeconfig(self, user: Optional[dict] = None) -> bytes:
        """A kubeconfig for this server: a token user by default; `exec_user()` for an Entra ID cluster's."""
        return json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "aks",
            "clusters": [{"name": "aks", "cluster": {"server": self.url}}],
            "users": [{"name": "user", "user": user or {"token": USER_TOKEN}}],
            "contexts": [{"name": "aks", "context": {"cluster": "aks", "user": "user"}}]}).encode()

    @staticmethod
    def exec_user() -> dict:
        """The user `listClusterUserCredential` returns for an Entra ID (AAD) cluster: kubelogin, run by kubectl."""
        return {"exec": {"apiVersion": "client.authentication.k8s.io/v1beta1", "command": "kubelogin",
                         "args": ["get-token", "--login", "devicecode", "--server-id",
                                  AKS_AAD_SCOPE.split("/")[0], "--client-id", "80faf920-1908-4b52-b5ef-a8e7bedfc67a",
                                  "--tenant-id", "72f988bf-0000-0000-0000-000000000000"],
                         "interactiveMode": "IfAvailable", "provideClusterInfo": False}}

    def used_by(self, deployment: str, count: int, gpus: int = 1) -> None:
        """Pods holding GPUs on the pool's nodes, as the extension runs a deployment's instances."""
        self.pods += [{"metadata": {"name": f"{deployment}-{i}", "namespace": "azureml"},
                       "spec": {"nodeName": self.nodes[i % len(self.nodes)]["metadata"]["name"],
                                "containers": [{"name": "inference-server",
                                                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}]},
                       "status": {"phase": "Running"}} for i in range(count)]

    def answer(self, r: Request) -> tuple[int, Any]:
        def status(code: int, reason: str) -> tuple[int, dict]:
            return code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
                          "message": reason}

        token = r.authorization.removeprefix("Bearer ")
        if token not in self.tokens:
            return status(401, "Unauthorized")
        if token == AAD_TOKEN and self.refuse_aad:
            return status(403, "Forbidden")
        if r.path == "/api/v1/nodes":
            wanted = dict([r.query["labelSelector"].split("=", 1)]) if r.query.get("labelSelector") else {}
            items = [n for n in self.nodes if wanted.items() <= n["metadata"]["labels"].items()]
            return 200, {"kind": "NodeList", "apiVersion": "v1", "metadata": {}, "items": items}
        if r.path == "/api/v1/pods":
            return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": self.pods}
        if r.path == "/apis/apps/v1/daemonsets":
            return 200, {"kind": "DaemonSetList", "apiVersion": "apps/v1", "metadata": {}, "items": [
                {"metadata": {"name": name, "namespace": "kube-system"},
                 "spec": {"selector": {}, "template": {}}} for name in self.daemonsets]}
        if r.path == self.ROUTER_PATH:
            ingress = []
            if self.router_polls_left > 0:
                self.router_polls_left -= 1
            elif self.router_ip:
                ingress = [{"ip": self.router_ip}]
            return 200, {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "azureml-fe"},
                         "status": {"loadBalancer": {"ingress": ingress}}}

        if r.path == self.CRD_PATH:
            if self.crd_polls_left > 0:
                self.crd_polls_left -= 1
                return status(404, "NotFound")
            return 200, {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                         "metadata": {"name": "instancetypes.amlarc.azureml.com"},
                         "spec": {"group": "amlarc.azureml.com", "scope": "Cluster",
                                  "names": {"plural": "instancetypes", "kind": "InstanceType"},
                                  "versions": [{"name": "v1alpha1", "served": True, "storage": True}]},
                         "status": {"conditions": [{"type": "Established", "status": "True"}]}}
        if r.path.startswith(self.OBJECTS):
            name = r.path[len(self.OBJECTS) + 1:]
            if r.method == "GET":
                return (200, self.objects[name]) if name in self.objects else status(404, "NotFound")
            if r.method == "POST":
                name = r.body["metadata"]["name"]
                if name in self.objects:
                    return status(409, "AlreadyExists")
                self.objects[name] = {**r.body, "metadata": {**r.body["metadata"], "resourceVersion": "1"}}
                return 201, self.objects[name]
            if r.method == "PUT":
                version = r.body.get("metadata", {}).get("resourceVersion")
                if not version:
                    return status(422, "metadata.resourceVersion: Invalid value: 0x0: must be specified for an "
                                       "update")
                if version != self.objects[name]["metadata"]["resourceVersion"]:
                    return status(409, "Conflict")
                next_version = str(int(version) + 1)
                self.objects[name] = {**r.body, "metadata": {**r.body["metadata"], "resourceVersion": next_version}}
                return 200, self.objects[name]
        return status(404, "NotFound")

    def close(self) -> None:
        self.server.shutdown()


class Poller:
    def __init__(self, result: Any = None, error: Optional[BaseException] = None, polls: int = 1):
        self._result, self._error, self._polls = result, error, polls

    def done(self) -> bool:
        self._polls -= 1
        return self._polls < 0

    def status(self) -> str:
        return "Running"

    def wait(self, timeout: Optional[float] = None) -> None:
        pass

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._error:
            raise self._error
        return self._result


@dataclasses.dataclass
class Call:
    operation: str
    method: str
    args: tuple
    kwargs: dict
    body: Any = None  # the REST body the SDK sends for the entity, where it sends one


class _Operations:
    def __init__(self, ml: "FakeML", name: str):
        self.ml, self.name = ml, name

    def __getattr__(self, method: str) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            failure = self.ml.fail.get((self.name, method))
            record = Call(self.name, method, args, kwargs)
            self.ml.calls.append(record)
            if isinstance(failure, BaseException):
                raise failure
            if failure == "never":
                return Poller(polls=10**9)
            if isinstance(failure, Poller):  # a long-running operation that fails while Azure works on it
                return failure
            return getattr(self.ml, f"_{self.name}_{method}")(record, *args, **kwargs)
        return call


class FakeML:
    """MLClient's compute, models, online_endpoints and online_deployments, with a workspace's state."""

    location = "eastus"

    def __init__(self, fail: Optional[dict] = None, workspace: tuple[str, str, str] = (SUBSCRIPTION, "rg-ml",
                                                                                         "ws-ml")):
        self.fail = fail or {}
        self.calls: list[Call] = []
        self.compute_state: dict[str, Any] = {}
        self.model_versions: dict[str, list] = {}
        self.endpoint_state: dict[str, Any] = {}
        self.deployment_state: dict[tuple[str, str], Any] = {}
        self.vcpus_used = {"standardNCASv3_T4Family": 0}  # the workspace region's quota in use, per VM family
        self.vcpus_limit = {"standardNCASv3_T4Family": 24}
        self.arm = ARM_ID.format(sub=workspace[0], rg=workspace[1], ws=workspace[2])
        self.missing = ""  # "workspace" or "resource group": the workspace the client names does not exist
        for name in ("compute", "models", "online_endpoints", "online_deployments", "workspaces"):
            setattr(self, name, _Operations(self, name))

    def writes(self) -> list[tuple[str, str]]:
        return [(c.operation, c.method) for c in self.calls if c.method not in ("get", "list", "get_keys", "list_usage",
                                                                                "list_sizes")]

    def _missing(self, what: str) -> ResourceNotFoundError:
        from azure.core.rest import HttpRequest

        code, message = "ResourceNotFound", f"{what} not found"
        if self.missing == "resource group":
            code, message = "ResourceGroupNotFound", f"Resource group '{self.arm.split('/')[4]}' could not be found."
        elif self.missing == "workspace":
            message = f"The Resource '{self.arm.split('/providers/')[1]}' was not found."
        request = HttpRequest("GET", f"https://management.azure.com{self.arm}")
        response = _response(request, 404, {"error": {"code": code, "message": message}})
        response.read()
        return ResourceNotFoundError(response=response)

    def _compute_get(self, call: Call, name: str) -> Any:
        if name not in self.compute_state:
            raise self._missing(f"compute {name}")
        return self.compute_state[name]

    def _compute_begin_create_or_update(self, call: Call, compute: Any) -> Poller:
        call.body = compute._to_rest_object().as_dict()
        attached = copy.deepcopy(compute)
        if attached.identity is not None:  # Azure gives a system-assigned identity its principal
            attached.identity.principal_id = "11111111-2222-3333-4444-555555555555"
        self.compute_state[compute.name] = attached
        return Poller(attached)

    def _compute_list_sizes(self, call: Call, location: Optional[str] = None) -> list:
        from azure.ai.ml.entities import VmSize

        return [VmSize(name="Standard_NC4as_T4_v3", family="standardNCASv3_T4Family", v_cp_us=4, gpus=1),
                VmSize(name="Standard_NC64as_T4_v3", family="standardNCASv3_T4Family", v_cp_us=64, gpus=4),
                VmSize(name="Standard_D4s_v5", family="standardDSv5Family", v_cp_us=4, gpus=0)]

    def _compute_list_usage(self, call: Call, location: Optional[str] = None) -> list:
        from azure.ai.ml.entities import Usage, UsageName

        return [Usage(name=UsageName(value=family, localized_value=family), current_value=self.vcpus_used[family],
                      limit=limit, unit="Count") for family, limit in self.vcpus_limit.items()]

    def _workspaces_get(self, call: Call, name: str) -> Any:
        if self.missing:
            raise self._missing(f"workspace {name}")
        return dataclasses.make_dataclass("Workspace", [("name", str), ("container_registry", str)])(
            name, self.arm.split("/providers/")[0] + "/providers/Microsoft.ContainerRegistry/registries/wsacr")

    def _compute_begin_delete(self, call: Call, name: str, action: str = "Delete") -> Poller:
        self.compute_state.pop(name, None)
        return Poller()

    def _models_create_or_update(self, call: Call, model: Any) -> Any:
        call.body = model._to_rest_object().as_dict()
        versions = self.model_versions.setdefault(model.name, [])
        registered = copy.copy(model)
        registered.version = str(len(versions) + 1)
        registered._id = f"{self.arm}/models/{model.name}/versions/{registered.version}"
        versions.append(registered)
        return registered

    def _models_list(self, call: Call, name: str) -> list:
        if name not in self.model_versions:
            raise self._missing(f"model {name}")
        return list(self.model_versions[name])

    def _online_endpoints_list(self, call: Call) -> list:
        return [copy.deepcopy(e) for e in self.endpoint_state.values()]

    def _online_endpoints_get(self, call: Call, name: str) -> Any:
        if name not in self.endpoint_state or self.missing:
            raise self._missing(f"endpoint {name}")
        endpoint = copy.deepcopy(self.endpoint_state[name])
        endpoint._scoring_uri = f"https://{name}.{self.location}.inference.ml.azure.com/score"
        return endpoint

    def _online_endpoints_begin_create_or_update(self, call: Call, endpoint: Any) -> Poller:
        call.body = endpoint._to_rest_online_endpoint(self.location).as_dict()
        self.endpoint_state[endpoint.name] = copy.deepcopy(endpoint)
        return Poller(endpoint)

    def _online_endpoints_get_keys(self, call: Call, name: str) -> Any:
        return dataclasses.make_dataclass("Keys", [("primary_key", str)])(f"{name}-primary-key")

    def _online_endpoints_begin_delete(self, call: Call, name: str) -> Poller:
        self.endpoint_state.pop(name, None)
        for key in [k for k in self.deployment_state if k[0] == name]:
            del self.deployment_state[key]
        return Poller()

    def _online_deployments_begin_create_or_update(self, call: Call, deployment: Any) -> Poller:
        # What the SDK sends once it has uploaded the code and registered the environment: their ARM ids.
        sent = copy.copy(deployment)
        sent.model = deployment.model.id
        sent.environment = f"{self.arm}/environments/{deployment.environment.name}/versions/1"
        sent.code_configuration = copy.copy(deployment.code_configuration)
        sent.code_configuration.code = f"{self.arm}/codes/score/versions/1"
        call.body = sent._to_rest_object(self.location).as_dict()
        self.deployment_state[(deployment.endpoint_name, deployment.name)] = deployment
        return Poller(deployment)

    def _online_deployments_get(self, call: Call, name: str, endpoint_name: str) -> Any:
        if (endpoint_name, name) not in self.deployment_state:
            raise self._missing(f"deployment {endpoint_name}/{name}")
        return self.deployment_state[(endpoint_name, name)]

    def _online_deployments_list(self, call: Call, endpoint_name: str) -> list:
        return [d for (e, _), d in self.deployment_state.items() if e == endpoint_name]

    def _online_deployments_begin_delete(self, call: Call, name: str, endpoint_name: str) -> Poller:
        self.deployment_state.pop((endpoint_name, name), None)
        return Poller()


@contextlib.contextmanager
def plain_endpoint() -> Iterator[tuple[str, list]]:
    """(base URL, seen): a server on 127.0.0.1 that answers every GET and POST 200 `{}`; `seen` gets (target of the
    request line, headers) of each request, in order."""
    seen: list = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append((self.path, self.headers))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
