"""`scorehost deploy k8s --out DIR`: plain Kubernetes manifests for the Dockerfile.gpu image, for users who run
Kubernetes without Azure ML: a Secret with the API key, a PersistentVolumeClaim for the model, a Deployment with
GPU limits, CPU/memory requests and limits and probes, a Service, and a HorizontalPodAutoscaler."""

from __future__ import annotations

import base64
import os
import secrets
from typing import Any

import yaml

from deploy.settings import DeploySettings

PORT = 5001
MODEL_MOUNT = "/var/azureml-app/azureml-models"


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
        "volumeMounts": [{"name": "models", "mountPath": MODEL_MOUNT, "readOnly": True}],
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "allowPrivilegeEscalation": False},
    }
    return {
        "secret.yaml": {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-key", "labels": labels},
                        "type": "Opaque", "data": {"key": base64.b64encode(key.encode()).decode()}},
        "pvc.yaml": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                     "metadata": {"name": f"{name}-models", "labels": labels},
                     "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": "2Gi"}}}},
        "deployment.yaml": {
            "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": name, "labels": labels},
            "spec": {"replicas": s.replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels},
                                  "spec": {"containers": [container],
                                           "terminationGracePeriodSeconds": 40,
                                           "volumes": [{"name": "models", "persistentVolumeClaim": {
                                               "claimName": f"{name}-models", "readOnly": True}}]}}}},
        "service.yaml": {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "labels": labels},
                         "spec": {"selector": labels, "type": "ClusterIP",
                                  "ports": [{"name": "http", "port": 80, "targetPort": PORT}]}},
        "hpa.yaml": {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
                     "metadata": {"name": name, "labels": labels},
                     "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
                              "minReplicas": s.replicas, "maxReplicas": max(s.replicas, s.node_count * 2),
                              "metrics": [{"type": "Resource", "resource": {
                                  "name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}}]}},
    }


def write(s: DeploySettings, out_dir: str, image: str = "scorehost:gpu", key: str = "") -> list[str]:
    """Write the manifests; a new random key unless one is given (it is printed once, never logged)."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for filename, manifest in manifests(s, image, key or secrets.token_urlsafe(32)).items():
        path = os.path.join(out_dir, filename)
        with open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(manifest, f, sort_keys=False)
        paths.append(path)
    return paths
