"""`scorehost deploy k8s --image REGISTRY/NAME:TAG --out DIR`: plain Kubernetes manifests for users who run
Kubernetes without Azure ML: a Secret with the API key (written 0600), a Deployment with GPU limits, CPU/memory
requests and limits and probes, a Service, and a HorizontalPodAutoscaler that asks for no more GPUs than the cluster
has (--cluster-gpus).

The entry script and the model travel inside the image, so any cluster can run them with no volume to provision or
fill: DIR is the build context of DIR/Dockerfile, which adds DIR/code/ (the code folder of deploy/source.py: the
script, byte for byte, with the rest of its folder) and DIR/model/ (a copy of the model directory) to the
Dockerfile.gpu image where Azure ML puts them; the result is pushed to a registry the cluster pulls from.
"""

from __future__ import annotations

import base64
import os
import shutil
import secrets
from typing import Any

from deploy import source
from deploy.files import write_yaml
from deploy.settings import DeploySettings

PORT = 5001
APP_ROOT = "/var/azureml-app"  # AML_APP_ROOT in Dockerfile.gpu, as in Azure ML's containers
MODEL_MOUNT = f"{APP_ROOT}/azureml-models"  # AZUREML_MODEL_DIR in Dockerfile.gpu
BASE_IMAGE = "scorehost:gpu"  # what the README's `docker build -f Dockerfile.gpu` tags
# Where GPUs come from: nvidia.com/gpu exists on a node only once a device plugin advertises it.
DEVICE_PLUGIN = ("https://raw.githubusercontent.com/NVIDIA/k8s-device-plugin/v0.17.1/deployments/static/"
                 "nvidia-device-plugin.yml")
GPU_CHECK = "kubectl get nodes -o custom-columns=NODE:.metadata.name,GPUS:.status.allocatable.nvidia\\.com/gpu"

MODEL_DOCKERFILE = f"""\
# The scorehost GPU image with the entry script and the model inside it, so the cluster needs no volume. Build the
# base image from the scorehost checkout first (docker build -f Dockerfile.gpu -t {BASE_IMAGE} .), then, with this
# folder as the build context:
#   docker build -f {{dockerfile}} -t {{image}} {{context}}
#   docker push {{image}}
# The cluster must be able to pull from that registry (AKS with ACR: az aks update --attach-acr REGISTRY).
FROM {BASE_IMAGE}
COPY --chown=1000 model/ {MODEL_MOUNT}/
COPY --chown=1000 code/ {APP_ROOT}/code/
ENV AML_APP_ROOT={APP_ROOT}/code AZUREML_ENTRY_SCRIPT={{script}}
"""


def manifests(s: DeploySettings, image: str, key: str) -> dict[str, dict[str, Any]]:
    name = s.endpoint
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "scorehost"}
    resources = {"requests": {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": str(s.gpus)},
                 "limits": {"cpu": s.cpu, "memory": s.memory, "nvidia.com/gpu": str(s.gpus)}}

    def probe(path: str, initial_delay: int, failures: int) -> dict:
        return {"httpGet": {"path": path, "port": PORT}, "initialDelaySeconds": initial_delay, "periodSeconds": 10,
                "timeoutSeconds": 2, "failureThreshold": failures}

    container = {
        "name": "scorehost", "image": image, "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": PORT}],
        "env": [{"name": "SCOREHOST_AUTH_KEY",
                 "valueFrom": {"secretKeyRef": {"name": f"{name}-key", "key": "key"}}},
                {"name": "SCORING_TIMEOUT_MS", "value": str(s.request_timeout_ms)}],
        "resources": resources,
        # Liveness is Azure ML's GET /; readiness is scorehost's /ready: traffic only once every model process is warm.
        "livenessProbe": probe("/", s.liveness_initial_delay_s, 6),
        "readinessProbe": probe("/ready", s.readiness_initial_delay_s, 3),
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False},
    }
    return {
        "secret.yaml": {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-key", "labels": labels},
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


def problems(s: DeploySettings, out_dir: str) -> list[str]:
    found = [] if os.path.isfile(s.entry_script) else [f"entry script {s.entry_script} is not a file"]
    too_big = source.problem(s)
    if too_big:
        found.append(too_big)
    # out/code and out/model are replaced, and out is the image's build context: it must hold neither the originals
    # nor be the script's folder (whose code/ copy would take the Secret into the image).
    if os.path.realpath(out_dir) == os.path.realpath(source.root(s.entry_script)) or any(
            _within(original, os.path.join(out_dir, folder)) for original in (s.entry_script, s.model_dir)
            for folder in ("code", "model")):
        found.append(f"--out {out_dir} holds the entry script or the model: write into a folder of its own")
    if not os.path.isdir(s.model_dir):
        found.append(f"model directory {s.model_dir} is not a directory")
    if s.gpus < 1 or s.instance_count < 1:
        found.append("--gpus and --instance-count must be at least 1")
    elif s.cluster_gpus and s.cluster_gpus < s.instance_count * s.gpus:
        found.append(f"--cluster-gpus {s.cluster_gpus} cannot hold {s.instance_count} instances of {s.gpus} GPU each")
    return found


def bake(s: DeploySettings, out_dir: str) -> None:
    """The build context: code/ with the code folder, and model/ with a copy of the model directory: a snapshot of
    what was checked, which no later edit of the originals changes (nor an edit of the context the originals)."""
    source.copy(s, os.path.join(out_dir, "code"))
    shutil.rmtree(os.path.join(out_dir, "model"), ignore_errors=True)
    shutil.copytree(s.model_dir, os.path.join(out_dir, "model"))


def write(s: DeploySettings, out_dir: str, image: str, key: str = "") -> list[str]:
    """Write the manifests, the build context and its Dockerfile; a new random key unless one is given (only the
    Secret holds it)."""
    source.mark_output(out_dir)
    paths = []
    for filename, manifest in manifests(s, image, key or secrets.token_urlsafe(32)).items():
        paths.append(write_yaml(os.path.join(out_dir, filename), manifest,
                                mode=0o600 if manifest["kind"] == "Secret" else None))
    bake(s, out_dir)
    dockerfile = os.path.join(out_dir, "Dockerfile")
    with open(dockerfile, "w", encoding="utf-8") as f:
        f.write(MODEL_DOCKERFILE.format(dockerfile=dockerfile, image=image, context=out_dir,
                                        script=os.path.basename(s.entry_script)))
    return [dockerfile, *paths]


def looks_pullable(image: str) -> bool:
    """A reference with a registry host (myregistry.azurecr.io/x:1, localhost:5000/x): a bare `scorehost:gpu`
    exists only on the machine that built it."""
    first = image.split("/", 1)[0]
    return "/" in image and ("." in first or ":" in first or first == "localhost")
