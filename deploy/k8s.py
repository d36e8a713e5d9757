"""`scorehost deploy k8s --image REGISTRY/NAME:TAG --out DIR`: plain Kubernetes manifests for users who run
Kubernetes without Azure ML: a Secret with the API key (written 0600), a Deployment with GPU limits, CPU/memory
requests and limits and probes, a Service, and a HorizontalPodAutoscaler that asks for no more GPUs than the cluster
has (--cluster-gpus).

The entry script and the model travel inside the image, so any cluster can run them with no volume to provision or
fill: DIR is the build context of DIR/Dockerfile, which adds DIR/code/ (the code folder of deploy/source.py: the
script, byte for byte, with the rest of its folder) and DIR/model/ (a copy of the model directory) to the
Dockerfile.gpu image where Azure ML puts them, the model in a folder of its own name under AZUREML_MODEL_DIR, as Azure
ML keeps a registered folder's name (deploy/plan.py's lay_out_model): one script reads its model on every target. The
base image's Python environment is the reference score.py's (myenv.yml); a script with another conda file gets its
own environment built from it, with scorehost installed into it, as Azure ML builds the script's environment and adds
its inference server. DIR also holds the Secret with the API key, so its .dockerignore sends the build only what the
Dockerfile copies; a rerun keeps that key (existing_key). The result is pushed to a registry the cluster pulls from.
"""

from __future__ import annotations

import base64
import json
import math
import os
import shutil
import secrets
from typing import Any

import yaml

from deploy import plan, source
from deploy.files import write_yaml
from deploy.settings import DeployError, DeploySettings
from scorehost import REPO_ROOT
from server import settings as server_settings

PORT = 5001
APP_ROOT = "/var/azureml-app"  # AML_APP_ROOT in Dockerfile.gpu, as in Azure ML's containers
MODEL_MOUNT = f"{APP_ROOT}/azureml-models"  # AZUREML_MODEL_DIR in Dockerfile.gpu
BASE_IMAGE = "scorehost:gpu"  # what the README's `docker build -f Dockerfile.gpu` tags
# Where GPUs come from: nvidia.com/gpu exists on a node only once a device plugin advertises it.
DEVICE_PLUGIN = ("https://raw.githubusercontent.com/NVIDIA/k8s-device-plugin/v0.17.1/deployments/static/"
                 "nvidia-device-plugin.yml")
GPU_CHECK = "kubectl get nodes -o custom-columns=NODE:.metadata.name,GPUS:.status.allocatable.nvidia\\.com/gpu"

# The base image's environment: Dockerfile.gpu builds /opt/env from the repository's myenv.yml and installs scorehost
# (its checkout at /opt/scorehost) into it.
BASE_CONDA_FILE = os.path.join(REPO_ROOT, "myenv.yml")
SCOREHOST_SOURCE = "/opt/scorehost"
USER_ENV = "/opt/user-env"
# The script's conda file, in the build context: in a folder, since `kubectl apply -f DIR` reads every .yml, .yaml and
# .json at DIR's top as a manifest (and fails on one that is none).
CONDA_FILE = "env/conda.yml"
SECRET_FILE = "secret.yaml"

MODEL_DOCKERFILE = f"""\
# The scorehost GPU image with the entry script and the model inside it, so the cluster needs no volume. Build the
# base image from the scorehost checkout first (docker build -f Dockerfile.gpu -t {BASE_IMAGE} .), then, with this
# folder as the build context:
#   docker build -f {{dockerfile}} -t {{image}} {{context}}
#   docker push {{image}}
# The cluster must be able to pull from that registry (AKS with ACR: az aks update --attach-acr REGISTRY).
FROM {BASE_IMAGE}
{{environment}}COPY --chown=1000 {{model_copy}}
COPY --chown=1000 code/ {APP_ROOT}/code/
ENV AML_APP_ROOT={APP_ROOT}/code AZUREML_ENTRY_SCRIPT={{script}}
"""

# The script's own environment, where its conda file is not the base image's.
USER_ENV_DOCKERFILE = f"""\
# The script's environment, built from its conda file as Azure ML builds it, with scorehost installed into it (as Azure
# ML adds its inference server) and first on PATH: the base image's own environment is the reference score.py's.
USER 0
COPY {CONDA_FILE} /tmp/conda.yml
RUN micromamba create --yes --prefix {USER_ENV} --file /tmp/conda.yml \\
    && {USER_ENV}/bin/python -m pip install --no-cache-dir '{SCOREHOST_SOURCE}[gpu]' \\
    && micromamba clean --all --yes \\
    && rm /tmp/conda.yml
ENV PATH={USER_ENV}/bin:$PATH
USER 1000
"""

# The build context holds the manifests, secret.yaml (the API key) among them: only what the Dockerfile copies goes.
DOCKERIGNORE = """\
# This folder is the image's build context and holds secret.yaml (the API key): send only what the Dockerfile copies.
*
!code
!model
!{conda_folder}
"""

# Liveness and readiness wait for the first answer to GET /: a worker runs init() before it answers, for as long as the
# server allows it (--init-timeout), and a liveness probe meanwhile would restart a slow model load forever.
PROBE_PERIOD_S = 10
STARTUP_FAILURES = math.ceil(server_settings.BY_NAME["init_timeout"].default / PROBE_PERIOD_S)


def manifests(s: DeploySettings, image: str, key: str) -> dict[str, dict[str, Any]]:
    name = s.endpoint
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "scorehost"}
    resources = {"requests": {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": str(s.gpus)},
                 "limits": {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": str(s.gpus)}}

    def probe(path: str, initial_delay: int, failures: int) -> dict:
        return {"httpGet": {"path": path, "port": PORT}, "initialDelaySeconds": initial_delay,
                "periodSeconds": PROBE_PERIOD_S, "timeoutSeconds": 2, "failureThreshold": failures}

    container = {
        "name": "scorehost", "image": image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": [{"name": "SCOREHOST_AUTH_KEY",
                 "valueFrom": {"secretKeyRef": {"name": f"{name}-key", "key": "key"}}},
                {"name": "SCORING_TIMEOUT_MS", "value": str(s.request_timeout_ms)}],
        "resources": resources,
        # Liveness is Azure ML's GET /, checked only once it has answered (the startup probe: init() runs first, for
        # up to --init-timeout); readiness is scorehost's /ready: traffic only once every model process is warm.
        "startupProbe": probe("/", s.liveness_initial_delay_s, STARTUP_FAILURES),
        "livenessProbe": probe("/", 0, 6),
        "readinessProbe": probe("/ready", s.readiness_initial_delay_s, 3),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False},
    }
    return {
        SECRET_FILE: {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-key", "labels": labels},
                      "type": "Opaque", "data": {"key": base64.b64encode(key.encode()).decode()}},
        "deployment.yaml": {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": s.instance_count, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [container], "terminationGracePeriodSeconds": 40}}}},
        "service.yaml": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
                         "spec": {"selector": labels, "type": "ClusterIP",
                                  "ports": [{"name": "http", "port": 80, "targetPort": PORT}]}},
        "hpa.yaml": {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                     "metadata": {"name": name, "labels": labels},
                     "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                              "minReplicas": s.instance_count, "maxReplicas": max_replicas(s),
                              "metrics": [{"type": "Resource", "resource": {
                                  "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}},
    }


def max_replicas(s: DeploySettings) -> int:
    """As many instances as the cluster's GPUs hold (--cluster-gpus), never fewer than asked for."""
    return max(s.instance_count, (s.cluster_gpus or s.instance_count * s.gpus) // s.gpus)


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def problems(s: DeploySettings, out_dir: str, load_check: bool = True) -> list[str]:
    """What `deploy plan` checks of the code and the model (the image lays the model out as Azure ML does), and what
    the output folder must be."""
    found = plan.code_and_model_problems(s, load_check, azure_ml=False)
    # out/code, out/model and out/env are replaced, and out is the image's build context: it must hold neither the
    # originals nor be the script's folder (whose code/ copy would take the Secret into the image).
    if os.path.realpath(out_dir) == os.path.realpath(source.root(s.entry_script)) or any(
            _within(original, os.path.join(out_dir, folder)) for original in (s.entry_script, s.model_dir)
            for folder in ("code", "model", os.path.dirname(CONDA_FILE))):
        found.append(f"--out {out_dir} holds the entry script or the model: write into a folder of its own")
    elif occupied := source.output_problem(out_dir):
        found.append(occupied)
    if s.gpus < 1:
        found.append(plan.NO_GPU)
    elif s.instance_count < 1:
        found.append("--instance-count must be at least 1")
    elif s.cluster_gpus and s.cluster_gpus < s.instance_count * s.gpus:
        found.append(f"--cluster-gpus {s.cluster_gpus} cannot hold {s.instance_count} instances of {s.gpus} GPU each")
    return found


def needs_own_env(s: DeploySettings) -> bool:
    """The base image's environment serves a script whose conda file is the one it was built from, byte for byte."""
    with open(s.conda_file, "rb") as f, open(BASE_CONDA_FILE, "rb") as base:
        return f.read() != base.read()


def dockerfile(s: DeploySettings, path: str, image: str, context: str) -> str:
    model = json.dumps(["model/", f"{MODEL_MOUNT}/{os.path.basename(os.path.abspath(s.model_dir))}/"])
    return MODEL_DOCKERFILE.format(dockerfile=path, image=image, context=context, model_copy=model,
                                   environment=USER_ENV_DOCKERFILE if needs_own_env(s) else "",
                                   script=os.path.basename(s.entry_script))


def bake(s: DeploySettings, out_dir: str) -> None:
    """The build context: code/ with the code folder, model/ with a copy of the model directory and, for an
    environment of the script's own, its conda file: a snapshot of what was checked, which no later edit of the
    originals changes (nor an edit of the context the originals)."""
    source.copy(s, os.path.join(out_dir, "code"))
    shutil.rmtree(os.path.join(out_dir, "model"), ignore_errors=True)
    shutil.copytree(s.model_dir, os.path.join(out_dir, "model"))
    conda = os.path.join(out_dir, CONDA_FILE)
    shutil.rmtree(os.path.dirname(conda), ignore_errors=True)
    if needs_own_env(s):
        os.makedirs(os.path.dirname(conda))
        shutil.copyfile(s.conda_file, conda)
    with open(os.path.join(out_dir, ".dockerignore"), "w", encoding="utf-8") as f:
        f.write(DOCKERIGNORE.format(conda_folder=os.path.dirname(CONDA_FILE)))


def existing_key(out_dir: str) -> str:
    """The API key of the Secret an earlier run wrote into `out_dir`, "" where there is none. A rerun keeps it:
    `kubectl apply` leaves the pods whose template did not change running with the key they started with, so a new
    one would lock their clients out of some replicas and not others."""
    path = os.path.join(out_dir, SECRET_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return base64.b64decode(yaml.safe_load(f)["data"]["key"], validate=True).decode()
    except FileNotFoundError:
        return ""
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as ex:
        raise DeployError(f"scorehost deploy k8s: {path} holds no API key to keep ({type(ex).__name__}: {ex}): "
                          "delete it for a new key") from ex


def write(s: DeploySettings, out_dir: str, image: str, key: str = "") -> list[str]:
    """Write the manifests, the build context and its Dockerfile; the key given, else the one of the Secret already
    in `out_dir` (existing_key), else a new random one (only the Secret holds it)."""
    source.mark_output(out_dir)
    if not key:
        key = existing_key(out_dir)
        if key:
            print(f"API key: kept from {os.path.join(out_dir, SECRET_FILE)} (delete that file for a new one)")
    paths = []
    for filename, manifest in manifests(s, image, key or secrets.token_urlsafe(32)).items():
        paths.append(write_yaml(os.path.join(out_dir, filename), manifest,
                                mode=0o600 if manifest["kind"] == "Secret" else None))
    bake(s, out_dir)
    path = os.path.join(out_dir, "Dockerfile")
    with open(path, "w", encoding="utf-8") as f:
        f.write(dockerfile(s, path, image, out_dir))
    left_out = source.left_out_line(s)
    if left_out:
        print(left_out)
    return [path, os.path.join(out_dir, ".dockerignore"), *paths]


def looks_pullable(image: str) -> bool:
    """A reference with a registry host (myregistry.azurecr.io/x:1, localhost:5000/x): a bare `scorehost:gpu`
    exists only on the machine that built it."""
    first = image.split("/", 1)[0]
    return "/" in image and ("." in first or ":" in first or first == "localhost")
