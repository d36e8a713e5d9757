"""`scorehost deploy plan`: validate everything that can be checked without Azure, and print every resource
`deploy aks` would create, with its settings. No Azure call, no credentials."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from typing import Optional

from deploy.settings import DeploySettings

# GPU VM families for AKS node pools (N-series); the retired NC (K80) and NCv2 sizes are refused.
GPU_SIZE = re.compile(r"^Standard_N(C\d+as_T4_v3|C\d+ads_A10_v4|C\d+s_v3|C\d+ads_H100_v5|C\d+ads_A100_v4|"
                      r"D\d+s_v2|D\d+s_v3|D\d+asr_v4|D\d+amsr_A100_v4|D\d+isr_H100_v5|V\d+ads_A10_v5|V\d+s_v3)$")
RETIRED = re.compile(r"^Standard_N(C\d+|C\d+s_v2|C\d+_Promo|V\d+|V\d+_Promo|D\d+|D\d+s)$")
ENDPOINT_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{1,30}[a-zA-Z0-9]$")  # 3-32, letters/digits/-, starts w/ letter
DEPLOYMENT_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{1,30}[a-z0-9]$")
COMPUTE_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9-]{1,14}[a-zA-Z0-9]$")  # 3-16 characters
ASSET_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,254}$")


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def problems(s: DeploySettings, load_check: bool = True) -> list[str]:
    """Everything wrong with the settings that can be known without Azure."""
    found = []
    for name, value, rule in (("endpoint", s.endpoint, ENDPOINT_NAME), ("deployment", s.deployment, DEPLOYMENT_NAME),
                              ("compute", s.compute, COMPUTE_NAME), ("model_name", s.model_name, ASSET_NAME),
                              ("instance_type", s.instance_type, DEPLOYMENT_NAME)):
        if not rule.match(value):
            found.append(f"{name} {value!r} is not a legal Azure name ({rule.pattern})")
    if RETIRED.match(s.vm_size):
        found.append(f"vm_size {s.vm_size} is retired (the NC, NCv2 and ND sizes are): use Standard_NC4as_T4_v3")
    elif not GPU_SIZE.match(s.vm_size):
        found.append(f"vm_size {s.vm_size} is not a GPU size for AKS (e.g. Standard_NC4as_T4_v3)")
    if s.replicas < 1 or s.gpus < 1:
        found.append("replicas and gpus must be at least 1")
    if s.create_cluster and s.node_count * 1 < s.replicas * s.gpus:
        found.append(f"{s.node_count} GPU nodes cannot hold {s.replicas} replicas of {s.gpus} GPU each")
    if not os.path.isfile(s.entry_script):
        found.append(f"entry script {s.entry_script} does not exist")
    found += conda_problems(s.conda_file)
    # What the model directory must hold is the entry script's business: the load check below runs its init() on it.
    if not s.model_dir or not os.path.isdir(s.model_dir):
        found.append(f"model_dir {s.model_dir!r} is not a directory (build one: scorehost model resnet50 --out DIR)")
    elif not any(files for _, _, files in os.walk(s.model_dir)):
        found.append(f"model_dir {s.model_dir} holds no files")
    if not found and load_check:
        error = script_load_error(s)
        if error:
            found.append(error)
    return found


def conda_problems(path: str) -> list[str]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            env = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as ex:
        return [f"conda file {path}: {ex}"]
    deps = env.get("dependencies", []) if isinstance(env, dict) else []
    pip = next((d["pip"] for d in deps if isinstance(d, dict) and "pip" in d), [])
    out = []
    if not any(isinstance(d, str) and d.startswith("python=") for d in deps):
        out.append(f"conda file {path}: no python=X.Y pin")
    if not any(p.startswith("azureml-inference-server-http") for p in pip):
        out.append(f"conda file {path}: azureml-inference-server-http is missing (Azure ML serves with it)")
    return out


def script_load_error(s: DeploySettings, timeout_s: int = 300) -> Optional[str]:
    """Load the script and run init() on the model, in a child process, exactly as a scorehost worker does."""
    code = ("import os, sys; from server.entry_script import EntryScript; "
            "script = EntryScript.load(sys.argv[1]); script.init(); print('loaded', script.input_mode.name)")
    env = {**os.environ, "AZUREML_MODEL_DIR": os.path.abspath(s.model_dir), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", code, s.entry_script], capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    if done.returncode != 0:
        return f"the entry script does not load with the model:\n{done.stderr[-3000:]}"
    return None


def resources(s: DeploySettings) -> list[tuple[str, str, dict]]:
    """(kind, name, settings) of everything `deploy aks` creates, in order."""
    out = []
    if s.create_cluster:
        out += [("AKS cluster", s.aks_cluster, {"location": s.location, "resource group": s.resource_group,
                                                 "system pool": "1 x Standard_D4s_v5"}),
                ("AKS GPU node pool", "gpupool", {"vm_size": s.vm_size, "nodes": s.node_count}),
                ("Azure ML extension", "azureml", {"cluster": s.aks_cluster, "inference router": "LoadBalancer"})]
    out += [("Kubernetes compute (attach)", s.compute, {"aks": s.aks_resource_id, "namespace": "azureml"}),
            ("instance type", s.instance_type, {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": s.gpus}),
            ("model", s.model_name, {"path": s.model_dir, "type": "custom_model"}),
            ("environment", "scorehost-" + s.model_name, {"image": s.base_image, "conda_file": s.conda_file}),
            ("online endpoint", s.endpoint, {"compute": s.compute, "auth_mode": "key"}),
            ("online deployment", f"{s.endpoint}/{s.deployment}",
             {"scoring_script": f"{os.path.basename(s.entry_script)} sha256={sha256(s.entry_script)[:16]}...",
              "instance_type": s.instance_type, "instance_count": s.replicas,
              "request_timeout_ms": s.request_timeout_ms, "max_concurrent_requests": s.max_concurrent_requests,
              "probes": f"liveness after {s.liveness_initial_delay_s}s, readiness after {s.readiness_initial_delay_s}s",
              "traffic": "100%"})]
    return out


def print_plan(s: DeploySettings) -> None:
    print(f"Plan for {s.workspace or '(workspace from config.json)'}: SDK {s.sdk}")
    for kind, name, settings in resources(s):
        print(f"  + {kind}: {name}")
        for k, v in settings.items():
            print(f"      {k}: {v}")
    print(f"Bills while it exists: {s.node_count if s.create_cluster else 'the attached cluster'}'s GPU nodes "
          f"({s.vm_size}); remove with: scorehost deploy teardown --endpoint {s.endpoint}"
          + (" --cluster" if s.create_cluster else ""))
