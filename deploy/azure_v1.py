"""`scorehost deploy aks --sdk v1`: the original flow with azureml-core (SDK v1), for users still on it.

What ships is what SDK v2 ships (deploy/source.py): the entry script's folder as InferenceConfig's
source_directory, the script named relative to it, and the model registered with the same description.

SDK v1 lost support on 2026-06-30; this prints a deprecation warning. The original used
`InferenceConfig(..., gpu_enabled=True)`, a keyword that never existed (v1's was `enable_gpu`, itself deprecated):
here the GPU comes from an Environment on Azure ML's CUDA base image, and `gpu_cores=1` on the AKS service.
Install with `pip install 'scorehost[deploy-v1]'` in its own virtualenv (v1 and v2 pin conflicting packages).
CPU and memory are Kubernetes quantities (`500m`, `512Mi`), read by settings.py's one parser into v1's cores and GB.
Teardown is idempotent: a service that is gone already is said, not raised.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Callable, Optional

from deploy import source
from deploy.plan import model_description, sha256
from deploy.settings import DeployError, DeploySettings, cpu_cores, memory_gib

DEPRECATION = ("Azure ML SDK v1 (azureml-core) lost support on 2026-06-30: prefer the default --sdk v2. "
               "NC6 sizes are retired; the default is Standard_NC4as_T4_v3.")


def build(s: DeploySettings, code_dir: Optional[str] = None) -> dict[str, Any]:
    """The v1 objects, offline: environment, inference config (on a copy of the code folder, in `code_dir` or a new
    temporary folder that the caller removes), AKS provisioning and deployment configs."""
    from azureml.core import Environment
    from azureml.core.compute import AksCompute
    from azureml.core.model import InferenceConfig
    from azureml.core.webservice import AksWebservice

    environment = Environment.from_conda_specification(f"scorehost-{s.model_name}", s.conda_file)
    environment.docker.base_image = s.base_image.split(":")[0] if s.base_image.endswith(":latest") else s.base_image
    environment.inferencing_stack_version = "latest"
    copied = source.copy(s, code_dir)
    return {
        "environment": environment,
        "inference_config": InferenceConfig(source_directory=os.path.dirname(copied),
                                            entry_script=os.path.basename(copied), environment=environment),
        "script_sha256": sha256(copied),
        "provisioning": AksCompute.provisioning_configuration(vm_size=s.vm_size, agent_count=s.node_count,
                                                              location=s.location),
        "deployment_config": AksWebservice.deploy_configuration(
            autoscale_enabled=False, num_replicas=s.instance_count, cpu_cores=cpu_cores(s.cpu),
            memory_gb=memory_gib(s.memory), gpu_cores=s.gpus, auth_enabled=True,
            scoring_timeout_ms=s.request_timeout_ms, replica_max_concurrent_requests=s.max_concurrent_requests),
    }


def deploy(workspace: Any, s: DeploySettings, say: Callable[[str], None] = print) -> dict:
    from azureml.core.compute import AksCompute, ComputeTarget
    from azureml.core.model import Model

    warnings.warn(DEPRECATION, DeprecationWarning, stacklevel=2)
    say(f"WARNING: {DEPRECATION}")
    objects = build(s)
    say(source.shipped_line(s, objects["script_sha256"]))
    created: list[str] = []
    try:
        if s.create_cluster:
            target = ComputeTarget.create(workspace, s.compute, objects["provisioning"])
            target.wait_for_completion(show_output=True)
            created.append(f"AKS compute {s.compute}")
        else:
            target = AksCompute(workspace, s.compute)
        model = Model.register(workspace, model_path=s.model_dir, model_name=s.model_name,
                               description=model_description(s))
        created.append(f"model {s.model_name}")
        service = Model.deploy(workspace, s.endpoint, [model], objects["inference_config"],
                               objects["deployment_config"], deployment_target=target, overwrite=True)
        created.append(f"service {s.endpoint}")
        service.wait_for_deployment(show_output=True)
        primary, _ = service.get_keys()
    except Exception as ex:
        raise DeployError(f"scorehost deploy aks --sdk v1 failed: {ex}\n"
                          f"Created so far: {', '.join(created) or 'nothing'}"
                          f"\nRemove it with: scorehost deploy teardown --sdk v1 --endpoint {s.endpoint} --yes") from ex
    finally:
        shutil.rmtree(objects["inference_config"].source_directory, ignore_errors=True)
    say(f"scoring URI: {service.scoring_uri}")
    return {"scoring_uri": service.scoring_uri, "key": primary, "created": created}


def teardown(workspace: Any, s: DeploySettings, with_compute: bool, say: Callable[[str], None] = print) -> list[str]:
    from azureml.core.compute import AksCompute
    from azureml.core.webservice import Webservice
    from azureml.exceptions import WebserviceException

    deleted = []
    try:
        service = Webservice(workspace, s.endpoint)  # reads it: raises WebserviceNotFound where it is gone
    except WebserviceException as ex:
        if "WebserviceNotFound" not in str(ex):
            raise
        say(f"service {s.endpoint} does not exist")
    else:
        say(f"deleting service {s.endpoint}")
        service.delete()
        deleted.append(f"service {s.endpoint}")
    if with_compute:
        target = AksCompute(workspace, s.compute)  # reads the compute: is_attached says who made the cluster
        if not target.is_attached:  # Azure ML created it (ComputeTarget.create): deleting it removes the nodes
            say(f"deleting compute {s.compute} and its AKS cluster")
            target.delete()
            deleted.append(f"compute {s.compute} (deleted, with its cluster)")
        else:  # attached: delete() raises for attached clusters; detach() leaves the cluster to its owner
            say(f"detaching compute {s.compute}")
            target.detach()
            deleted.append(f"compute {s.compute} (detached)")
    return deleted
