"""`scorehost deploy k8s --image REGISTRY/NAME:TAG --out DIR`: plain Kubernetes manifests for users who run
Kubernetes without Azure ML: a Secret with the API key (written 0600), a Deployment with GPU limits, CPU/memory
requests and limits and probes, a Service, and a HorizontalPodAutoscaler.

The model travels inside the image, so any cluster can run it with no volume to provision or fill: DIR/Dockerfile
adds the model directory to the Dockerfile.gpu image, and the result is pushed to a registry the cluster pulls from.
"""

from __future__ import annotations

import base64
import os
import secrets
from typing import Any

from deploy.files import write_yaml
from deploy.settings import DeploySettings

PORT = 5001
MODEL_MOUNT = "/var/azureml-app/azureml-models"  # AZUREML_MODEL_DIR in Dockerfile.gpu
BASE_IMAGE = "scorehost:gpu"  # what the README's `docker build -f Dockerfile.gpu` tags

MODEL_DOCKERFILE = f"""\
# The scorehost GPU image with the model inside it, so the cluster needs no volume for it. Build the base image
# from the scorehost checkout first (docker build -f Dockerfile.gpu -t {BASE_IMAGE} .), then, with the model
# directory as the build context:
#   docker build -f {{dockerfile}} -t {{image}} {{model_dir}}
#   docker push {{image}}
# The cluster must be able to pull from that registry (AKS with ACR: az aks update --attach-acr REGISTRY).
FROM {BASE_IMAGE}
COPY --chown=1000 . {MODEL_MOUNT}/
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
                              "minReplicas": s.instance_count, "maxReplicas": 2 * s.instance_count,
                              "metrics": [{"type": "Resource", "resource": {
                                  "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}},
    }


def write(s: DeploySettings, out_dir: str, image: str, key: str = "") -> list[str]:
    """Write the manifests and the model image's Dockerfile; a new random key unless one is given (only the
    Secret holds it)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for filename, manifest in manifests(s, image, key or secrets.token_urlsafe(32)).items():
        paths.append(write_yaml(os.path.join(out_dir, filename), manifest,
                                mode=0o600 if manifest["kind"] == "Secret" else None))
    dockerfile = os.path.join(out_dir, "Dockerfile")
    with open(dockerfile, "w", encoding="utf-8") as f:
        f.write(MODEL_DOCKERFILE.format(dockerfile=dockerfile, image=image, model_dir=s.model_dir or "MODEL_DIR"))
    return [dockerfile, *paths]


def looks_pullable(image: str) -> bool:
    """A reference with a registry host (myregistry.azurecr.io/x:1, localhost:5000/x): a bare `scorehost:gpu`
    exists only on the machine that built it."""
    first = image.split("/", 1)[0]
    return "/" in image and ("." in first or ":" in first or first == "localhost")
