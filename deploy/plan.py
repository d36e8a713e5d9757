"""`scorehost deploy plan`: validate everything that can be checked without Azure, and print every resource
`deploy aks` would create, with its settings. No Azure call, no credentials."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Optional

from deploy import source
from deploy.settings import UNKNOWN_SUFFIX, DeploySettings

SYSTEM_POOL_SIZE = "Standard_D4s_v5"  # the system pool of a cluster scorehost creates

# GPU VM families for AKS node pools and managed instances (N-series) that Azure still offers.
GPU_SIZE = re.compile(r"^Standard_N(C\d+as_T4_v3|C\d+ads_A10_v4|C\d+ads_H100_v5|C\d+ads_A100_v4|"
                      r"D\d+s_v2|D\d+s_v3|D\d+asr_v4|D\d+amsr_A100_v4|D\d+isr_H100_v5|V\d+ads_A10_v5|V\d+s_v3)$")
# Retired: NC (K80), NCv2 (P100), ND; NCv3 (V100: NC6s/12s/24s/24rs_v3) on 2025-09-30.
RETIRED = re.compile(r"^Standard_N(C\d+|C\d+s_v2|C\d+r?s_v3|C\d+_Promo|V\d+|V\d+_Promo|D\d+|D\d+s)$")
# Endpoints and deployments alike: 3-32 characters, a letter first, letters, digits and '-' (azure-ai-ml's
# validate_endpoint_or_deployment_name; Azure ML's "Endpoint limits"). On Kubernetes both names together are 6-62.
ENDPOINT_NAME = DEPLOYMENT_NAME = re.compile(r"^(?=.{3,32}$)[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$")
KUBERNETES_NAMES_TOTAL = (6, 62)
INSTANCE_TYPE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")  # a Kubernetes object's name
COMPUTE_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{1,14}[a-zA-Z0-9]$")  # 3-16 characters
ASSET_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$")
# Why --gpus 0 is refused (plan, aks, k8s): every target is built for GPUs, and a CPU one would change each of them.
NO_GPU = ("gpus must be at least 1: scorehost deploys to GPUs only (GPU VM sizes and node pool, a CUDA image, an "
          "nvidia.com/gpu limit per instance); a CPU-only deployment is out of its scope")


def sha256(path: str) -> str:
    """Of a file; of a directory, its files' relative paths and bytes (what registering it would upload)."""
    digest = hashlib.sha256()
    if not os.path.isdir(path):
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            digest.update(os.path.relpath(full, path).encode() + b"\0")
            with open(full, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def model_description(s: DeploySettings) -> str:
    """The registered model's description (SDK v1 and v2): what was given, a TensorFlow SavedModel only where its
    saved_model.pb is, else the folder or file by name, since the model is the entry script's business."""
    script, name = os.path.basename(s.entry_script), os.path.basename(os.path.abspath(s.model_dir))
    if not os.path.isdir(s.model_dir):
        return f"model file {name}, served by {script}"
    saved, files = [], 0
    for folder, _, names in sorted(os.walk(s.model_dir)):
        files += len(names)
        if "saved_model.pb" in names or "saved_model.pbtxt" in names:
            where = os.path.relpath(folder, s.model_dir)  # as the script finds it under AZUREML_MODEL_DIR
            saved.append(name if where == "." else where)
    if saved:
        what = f"TensorFlow SavedModel {saved[0]}" if len(saved) == 1 else f"TensorFlow SavedModels {', '.join(saved)}"
        return f"{what}, served by {script}"
    return f"model folder {name} ({files} file{'' if files == 1 else 's'}), served by {script}"


def problems(s: DeploySettings, load_check: bool = True) -> list[str]:
    """Everything wrong with the settings that can be known without Azure, all of it at once."""
    s = s.named()
    found = []
    # Without a workspace yet, the endpoint's name ends in UNKNOWN_SUFFIX: the workspace's 6 hex characters go there.
    endpoint = s.endpoint[:-len(UNKNOWN_SUFFIX)] + "0" * len(UNKNOWN_SUFFIX) if s.endpoint_pending else s.endpoint
    for name, value, rule in (("endpoint", endpoint, ENDPOINT_NAME), ("deployment", s.deployment, DEPLOYMENT_NAME),
                              ("compute", s.compute, COMPUTE_NAME), ("model_name", s.model_name, ASSET_NAME),
                              ("instance_type", s.instance_type, INSTANCE_TYPE_NAME)):
        if not rule.match(value):
            found.append(f"{name} {value!r} is not a legal Azure name ({rule.pattern})")
    low, high = KUBERNETES_NAMES_TOTAL
    if s.target == "aks" and not low <= len(s.endpoint) + len(s.deployment) <= high:
        found.append(f"endpoint {s.endpoint!r} and deployment {s.deployment!r} are "
                     f"{len(s.endpoint) + len(s.deployment)} characters together; on Kubernetes they must be "
                     f"{low}-{high}")
    if RETIRED.match(s.vm_size):
        found.append(f"vm_size {s.vm_size} is retired (NC, NCv2, NCv3 and ND are): use Standard_NC4as_T4_v3")
    elif not GPU_SIZE.match(s.vm_size):
        where = "a managed online endpoint" if s.target == "managed" else "an AKS GPU node pool"
        found.append(f"vm_size {s.vm_size} is not a GPU size for {where} (e.g. Standard_NC4as_T4_v3)")
    if s.gpus < 1:
        found.append(NO_GPU)
    if s.instance_count < 1 or s.max_concurrent_requests < 1:
        found.append("instance_count and max_concurrent_requests must be at least 1")
    if s.target == "aks" and s.create_cluster and s.node_count < s.instance_count * s.gpus:
        found.append(f"{s.node_count} GPU nodes cannot hold {s.instance_count} instances of {s.gpus} GPU each")
    if s.target == "aks" and s.sdk == "v2":  # v1 provisions its own AKS, without the extension
        found += https_problems(s)
    return found + code_and_model_problems(s, load_check)


def code_and_model_problems(s: DeploySettings, load_check: bool = True, azure_ml: bool = True) -> list[str]:
    """The entry script, its conda file, its code folder and the model, loaded together (script_load_error) as the
    endpoint loads them: shared by `deploy plan` and `deploy k8s` (not `azure_ml`), whose image lays the model out
    as Azure ML does, so a script that would crash-loop there is refused before anything is built."""
    found = [] if os.path.isfile(s.entry_script) else [f"entry script {s.entry_script} does not exist"]
    found += conda_file_problems(s, azure_ml)
    too_big = source.problem(s)
    if too_big:
        found.append(too_big)
    # What the model directory must hold is the entry script's business: the load check below runs its init() on it.
    loadable = os.path.isfile(s.entry_script) and not too_big
    if not s.model_dir or not os.path.isdir(s.model_dir):
        found.append(f"model_dir {s.model_dir!r} is not a directory (build one: scorehost model resnet50 --out DIR)")
        loadable = False
    elif not any(files for _, _, files in os.walk(s.model_dir)):
        found.append(f"model_dir {s.model_dir} holds no files")
        loadable = False
    if loadable and load_check:  # also beside other problems: every problem is reported in one run
        error = script_load_error(s)
        if error:
            found.append(error)
    return found


def warnings(s: DeploySettings) -> list[str]:
    """What works but deserves a second look."""
    out = []
    if s.target == "aks" and s.max_concurrent_requests > 1:
        out.append(f"max_concurrent_requests {s.max_concurrent_requests}: Azure ML's server then runs that many "
                   "workers, each with its own model on the one GPU (TF_FORCE_GPU_ALLOW_GROWTH is set so they share "
                   "it), and the Kubernetes online deployment reference says to leave this at its default, 1")
    return out


def https_problems(s: DeploySettings) -> list[str]:
    """Azure ML's extension is installed only with HTTPS (a CNAME with its certificate and key) or with insecure
    connections allowed explicitly: the choice is checked here, before any call."""
    https = any((s.ssl_cname, s.ssl_cert, s.ssl_key))
    if s.allow_insecure and https:
        return ["--allow-insecure and --ssl-cname/--ssl-cert/--ssl-key exclude each other"]
    if https:
        missing = [flag for flag, value in (("--ssl-cname", s.ssl_cname), ("--ssl-cert", s.ssl_cert),
                                            ("--ssl-key", s.ssl_key)) if not value]
        unreadable = [path for path in (s.ssl_cert, s.ssl_key) if path and not os.path.isfile(path)]
        return ([f"HTTPS needs {', '.join(missing)} too"] if missing else []) + [
            f"{path} is not a file" for path in unreadable]
    if s.create_cluster and not s.allow_insecure:
        return ["--create-cluster installs the Azure ML extension, which needs HTTPS (--ssl-cname NAME --ssl-cert "
                "CERT.pem --ssl-key KEY.pem) or, for development, --allow-insecure"]
    return []


def conda_file_problems(s: DeploySettings, azure_ml: bool = True) -> list[str]:
    """The conda file's problems, or that there is none (`deploy k8s` too builds the script's environment from it)."""
    if s.conda_file:
        return conda_problems(s.conda_file, azure_ml)
    return [f"no conda file: {s.entry_script} has no myenv.yml beside it; pass --conda-file FILE (the environment "
            f"your script needs{', with azureml-inference-server-http' if azure_ml else ''})"]


def conda_problems(path: str, azure_ml: bool = True) -> list[str]:
    """What an image built from the conda file would lack: on Azure ML (`azure_ml`), Azure ML's server; for `deploy
    k8s`, which installs scorehost into it, a python scorehost supports (setup.cfg's python_requires), where the
    file pins one (unpinned, conda takes the newest). pip needs no line: conda and micromamba add it to python
    (add_pip_as_python_dependency)."""
    import yaml
    from importlib.metadata import PackageNotFoundError, metadata

    from packaging.specifiers import SpecifierSet

    try:
        with open(path, encoding="utf-8") as f:
            env = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as ex:
        return [f"conda file {path}: {ex}"]
    deps = env.get("dependencies", []) if isinstance(env, dict) else []
    deps = deps if isinstance(deps, list) else []
    pip = next((d["pip"] for d in deps if isinstance(d, dict) and "pip" in d), None) or []
    out = []
    python = next((m.group(1) for m in (re.match(r"python\s*==?\s*(\d+(?:\.\d+)*)", d) for d in deps
                                         if isinstance(d, str)) if m), None)
    try:
        supported = SpecifierSet(metadata("scorehost")["Requires-Python"] or "")
    except PackageNotFoundError:  # running from a checkout that is not installed: no metadata to read
        supported = SpecifierSet()
    if not azure_ml and python is not None and not supported.contains(python):
        out.append(f"conda file {path}: python={python}, but scorehost needs python{supported}")
    if azure_ml and not any(isinstance(p, str) and p.startswith("azureml-inference-server-http") for p in pip):
        out.append(f"conda file {path}: azureml-inference-server-http is missing (Azure ML serves with it)")
    return out


def lay_out_model(model_dir: str, azureml_model_dir: str) -> str:
    """Lay the model out under `azureml_model_dir` as Azure ML does: registering a folder (SDK v2's Model(path=DIR),
    SDK v1's Model.register) keeps its name, so the endpoint's files are at $AZUREML_MODEL_DIR/<folder's name>/...
    Real folders with links to the files (no bytes copied), so a script that walks the tree (os.walk follows no
    linked folder) finds what it would find there. Returns the folder's path in it."""
    placed = os.path.join(azureml_model_dir, os.path.basename(os.path.abspath(model_dir)))
    shutil.copytree(os.path.abspath(model_dir), placed, copy_function=os.symlink)
    return placed


def script_load_error(s: DeploySettings, timeout_s: int = 300) -> Optional[str]:
    """Load the script and run init() on the model, in a child process, exactly as a scorehost worker does, from a
    copy of the code folder that ships, that folder the app root (AML_APP_ROOT), as Azure ML mounts the code in the
    container, and the model laid out as Azure ML lays it out (lay_out_model): a module, file or model path the script
    needs that would not be there fails here, not in the cloud after the image build. When only the layout is wrong
    (init() passes with the model folder itself as AZUREML_MODEL_DIR, as `scorehost serve --model-dir` gives it), the
    one line says so and how to read it."""
    code = ("import os, sys; from server.entry_script import EntryScript; "
            "script = EntryScript.load(sys.argv[1], '.'); script.init(); print('loaded', script.input_mode.name)")
    with tempfile.TemporaryDirectory(prefix="scorehost-plan-") as scratch:
        script = source.copy(s, os.path.join(scratch, "code"))
        azure_layout = os.path.join(scratch, "azureml-models")
        placed = lay_out_model(s.model_dir, azure_layout)

        def init_with(model_dir: str) -> subprocess.CompletedProcess:
            env = {**os.environ, "AZUREML_MODEL_DIR": model_dir, "TF_CPP_MIN_LOG_LEVEL": "3"}
            return subprocess.run([sys.executable, "-c", code, os.path.basename(script)], capture_output=True,
                                  text=True, env=env, timeout=timeout_s, cwd=os.path.dirname(script))

        done = init_with(azure_layout)
        if done.returncode != 0 and init_with(os.path.abspath(s.model_dir)).returncode == 0:
            name = os.path.basename(placed)
            parent = os.path.dirname(os.path.abspath(s.model_dir))
            return (f"init() reads the model at AZUREML_MODEL_DIR={os.path.abspath(s.model_dir)}, but Azure ML keeps "
                    f"the registered folder's name: its files are at $AZUREML_MODEL_DIR/{name}/...: read "
                    f"os.path.join(os.environ['AZUREML_MODEL_DIR'], '{name}', ...), or serve locally with "
                    f"--model-dir {parent} to see Azure ML's layout")
    if done.returncode != 0:
        left_out = source.left_out_line(s)
        return (f"the entry script does not load with the model:\n{done.stderr[-3000:]}"
                + (f"\n({left_out})" if left_out else ""))
    return None


def resources(s: DeploySettings) -> list[tuple[str, str, dict]]:
    """(kind, name, settings) of everything `deploy aks` (or, with target managed, `deploy managed`) creates or
    updates, in order. What exists already is read and left as it is (cluster, extension, compute, endpoint)."""
    out = []
    if s.target == "aks":
        https = "plain HTTP (--allow-insecure)" if s.allow_insecure else f"HTTPS as {s.ssl_cname or '?'}"
        if s.create_cluster:
            out += [("AKS cluster (if absent)", s.aks_cluster, {"location": s.location,
                                                                "resource group": s.resource_group,
                                                                "system pool": f"1 x {SYSTEM_POOL_SIZE}"}),
                    ("AKS GPU node pool", s.gpu_pool, {"vm_size": s.vm_size, "nodes": s.node_count}),
                    ("resource provider (if unregistered)", "Microsoft.KubernetesConfiguration", {}),
                    ("Azure ML extension (if absent)", "azureml", {"cluster": s.aks_cluster,
                                                                   "inference router": f"LoadBalancer, {https}"})]
        out += [("instance type", s.instance_type, {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": s.gpus,
                                                    "nodes": f"pool {s.gpu_pool}"}),
                ("Kubernetes compute (attach, if absent)", s.compute, {"aks": s.aks_resource_id,
                                                                       "namespace": "azureml",
                                                                       "identity": "system-assigned"})]
    kind = "managed online" if s.target == "managed" else "Kubernetes online"
    out += [("model (a new version, unless one holds these files)", s.model_name,
             {"path": s.model_dir, "type": "custom_model", "description": model_description(s)}),
            ("environment", "scorehost-" + s.model_name,
             {"image": s.base_image, "conda_file": s.conda_file or "(none)"}),
            (f"{kind} endpoint (if absent)", s.endpoint,
             {"auth_mode": "key", **({"compute": s.compute} if s.target == "aks" else {})}),
            (f"{kind} deployment", f"{s.endpoint}/{s.deployment}",
             {"code": source.root(s.entry_script),
              "scoring_script": f"{os.path.basename(s.entry_script)} " + (  # a missing one is among the problems
                  f"sha256={sha256(s.entry_script)[:16]}..." if os.path.isfile(s.entry_script) else "(missing)"),
              "instance_type": s.vm_size if s.target == "managed" else s.instance_type,
              "instance_count": s.instance_count, "scale_settings": "default",
              "request_timeout_ms": s.request_timeout_ms, "max_queue_wait_ms": s.max_queue_wait_ms,
              "max_concurrent_requests_per_instance": f"{s.max_concurrent_requests} (WORKER_COUNT="
                                                      f"{s.max_concurrent_requests}, TF_FORCE_GPU_ALLOW_GROWTH=true)",
              "probes": f"liveness after {s.liveness_initial_delay_s}s, readiness after {s.readiness_initial_delay_s}s",
              "traffic": f"{s.traffic}%" if s.traffic is not None else
                         "100% on a new endpoint; unchanged if live; 0% beside a live deployment"})]
    return out


def workspace_line(s: DeploySettings, no_workspace: str = "") -> str:
    """The workspace, or why none is known yet (`no_workspace`: WorkspaceNotFound's reason)."""
    if s.has_workspace:
        return f"workspace {s.workspace} (resource group {s.resource_group}, subscription {s.subscription_id})"
    return f"no workspace yet ({no_workspace or 'none given'})"


def print_plan(s: DeploySettings, no_workspace: str = "") -> None:
    print(f"Plan for {workspace_line(s, no_workspace)}: SDK {s.sdk}, target {s.target}")
    if not s.has_workspace:
        print("  give one with --subscription-id, --resource-group and --workspace, or --config-file with its "
              "config.json from the Azure ML studio" + (
                  f"; until then the endpoint's name ends in {UNKNOWN_SUFFIX}, for 6 characters of its id"
                  if s.endpoint_pending else ""))
    for kind, name, settings in resources(s):
        print(f"  + {kind}: {name}")
        for k, v in settings.items():
            print(f"      {k}: {v}")
    left_out = source.left_out_line(s)
    if left_out:
        print(f"note: {left_out}")
    if s.target == "managed":
        bills = f"{s.instance_count} x {s.vm_size} instances while the endpoint exists"
    else:
        bills = (f"the cluster's nodes ({f'{s.node_count} x {s.vm_size} GPU + 1 system' if s.create_cluster else 'all'}"
                 "), their disks, its load balancer and public IP, for as long as the cluster exists")
    print(f"Bills: {bills}. Remove with: scorehost deploy teardown --endpoint {s.endpoint}"
          + (" --cluster" if s.target == "aks" else ""))
    for warning in warnings(s):
        print(f"warning: {warning}")
