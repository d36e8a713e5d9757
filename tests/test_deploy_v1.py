"""`deploy aks --sdk v1` (azureml-core), offline. v1 and v2 cannot share one environment, so this runs in its own
virtualenv (`pip install -e '.[deploy-v1]' pytest`; .ci/run builds it) and is skipped where azureml-core is absent.
The real v1 configuration objects are built; only the calls that would reach Azure are replaced by recorders."""

from __future__ import annotations

import os
import warnings

import pytest

azureml_core = pytest.importorskip("azureml.core")

from deploy import azure_v1  # noqa: E402
from deploy.settings import DeployError, DeploySettings  # noqa: E402


@pytest.fixture
def settings(tmp_path):
    model = tmp_path / "colors" / "1"
    model.mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"")
    return DeploySettings(model_dir=str(tmp_path), model_name="colors", sdk="v1").named()  # endpoint "colors"


def test_v1_objects_are_the_original_flow_fixed(settings):
    objects = azure_v1.build(settings)
    config = objects["deployment_config"]
    assert (config.num_replicas, config.cpu_cores, config.memory_gb, config.gpu_cores) == (3, 2.0, 4.0, 1)
    assert config.autoscale_enabled is False and config.auth_enabled is True
    assert objects["provisioning"].vm_size == "Standard_NC4as_T4_v3" and objects["provisioning"].agent_count == 3
    inference = objects["inference_config"]
    assert os.path.basename(inference.entry_script) == "score.py"
    env = objects["environment"]
    assert "cuda" in env.docker.base_image
    pip = env.python.conda_dependencies.pip_packages
    assert any(p.startswith("tensorflow[and-cuda]==2.21.0") for p in pip)


class Service:
    scoring_uri = "http://v1.example/score"

    def wait_for_deployment(self, show_output=False):
        pass

    def get_keys(self):
        return "k1", "k2"


def test_v1_deploy_registers_and_deploys_with_a_deprecation_warning(settings, monkeypatch):
    from azureml.core.model import Model

    calls = []
    monkeypatch.setattr(Model, "register", staticmethod(lambda ws, model_path, model_name: calls.append(
        ("register", model_name)) or "model"))
    monkeypatch.setattr(Model, "deploy", staticmethod(lambda ws, name, models, inference, config, deployment_target,
                                                      overwrite: calls.append(("deploy", name, config.gpu_cores))
                                                      or Service()))
    monkeypatch.setattr("azureml.core.compute.AksCompute.__new__", lambda cls, ws, name: "target", raising=False)
    monkeypatch.setattr("azureml.core.compute.AksCompute.__init__", lambda self, *a, **k: None, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = azure_v1.deploy("workspace", settings, say=lambda m: None)
    assert any("2026-06-30" in str(w.message) for w in caught)
    assert ("register", "colors") in calls and ("deploy", "colors", 1) in calls
    assert result["scoring_uri"] == "http://v1.example/score" and result["key"] == "k1"


def test_v1_failure_says_what_to_delete(settings, monkeypatch):
    from azureml.core.model import Model

    def refuse(*args, **kwargs):
        raise RuntimeError("quota exceeded")

    monkeypatch.setattr(Model, "register", staticmethod(lambda *a, **k: "model"))
    monkeypatch.setattr(Model, "deploy", staticmethod(refuse))
    monkeypatch.setattr("azureml.core.compute.AksCompute.__new__", lambda cls, ws, name: "target", raising=False)
    monkeypatch.setattr("azureml.core.compute.AksCompute.__init__", lambda self, *a, **k: None, raising=False)
    with pytest.raises(DeployError) as e, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        azure_v1.deploy("workspace", settings, say=lambda m: None)
    assert "quota exceeded" in e.value.message and "model colors" in e.value.message
    assert "teardown --sdk v1" in e.value.message


@pytest.mark.parametrize("created,expected", [(False, "detach"), (True, "delete")])
def test_v1_teardown_detaches_an_attached_cluster_and_deletes_one_it_created(settings, monkeypatch, created,
                                                                             expected):
    """AksCompute.delete() raises for an attached cluster: attached ones are detached, never deleted."""
    calls = []
    monkeypatch.setattr("azureml.core.webservice.Webservice.__new__", lambda cls, ws, name: Service(), raising=False)
    monkeypatch.setattr(Service, "delete", lambda self: calls.append("service delete"), raising=False)
    monkeypatch.setattr("azureml.core.compute.AksCompute.__new__", lambda cls, ws, name: object.__new__(cls),
                        raising=False)
    monkeypatch.setattr("azureml.core.compute.AksCompute.__init__",  # as read from the workspace
                        lambda self, *a, **k: setattr(self, "is_attached", not created), raising=False)
    monkeypatch.setattr("azureml.core.compute.AksCompute.detach", lambda self: calls.append("detach"))
    monkeypatch.setattr("azureml.core.compute.AksCompute.delete", lambda self: calls.append("delete"))
    deleted = azure_v1.teardown("workspace", settings, with_compute=True, say=lambda m: None)
    assert calls == ["service delete", expected]
    assert deleted[-1] == "compute gpu-aks (" + ("deleted, with its cluster)" if created else "detached)")
