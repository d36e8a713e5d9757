"""`deploy aks --sdk v1` (azureml-core), offline. v1 and v2 cannot share one environment, so this runs in its own
virtualenv (`pip install -e '.[deploy-v1]' pytest`; .ci/run builds it) and is skipped where azureml-core is absent.
The real v1 configuration objects are built; only the calls that would reach Azure are replaced by recorders."""

from __future__ import annotations

import dataclasses
import os
import shutil
import warnings

import pytest

azureml_core = pytest.importorskip("azureml.core")

from deploy import azure_v1, plan  # noqa: E402
from deploy.settings import DeployError, DeploySettings  # noqa: E402

WORKSPACE = dict(subscription_id="00000000-1111-2222-3333-444444444444", resource_group="rg-ml", workspace="ws-ml")


@pytest.fixture
def settings(tmp_path):
    model = tmp_path / "colors" / "1"
    model.mkdir(parents=True)
    (model / "saved_model.pb").write_bytes(b"")
    return DeploySettings(model_dir=str(tmp_path), model_name="colors", sdk="v1", **WORKSPACE).named()


@pytest.fixture
def users_own(tmp_path):
    """A user's script that imports a module beside it, in a folder that also holds what is not code."""
    my = tmp_path / "my"
    (my / "models" / "greeter" / "3").mkdir(parents=True)
    (my / "models" / "greeter" / "3" / "greeting.txt").write_text("bonjour\n")
    (my / "score.py").write_text("import mylib\n\n\ndef init():\n    pass\n\n\ndef run(data):\n"
                                 "    return mylib.ECHO(data)\n")
    (my / "mylib.py").write_text("ECHO = str\n")
    (my / "myenv.yml").write_text("name: my-env\ndependencies:\n  - python=3.11\n  - pip\n  - pip:\n"
                                  "      - azureml-inference-server-http==1.5.1\n")
    for junk in (".git/HEAD", "__pycache__/mylib.cpython-311.pyc", ".venv/bin/python"):
        (my / junk).parent.mkdir(parents=True, exist_ok=True)
        (my / junk).write_text("not code")
    return my


def fake_azure(monkeypatch, calls: list, deploy=None) -> None:
    """Model.register and Model.deploy record their arguments; the AKS compute is read as it is."""
    from azureml.core.model import Model

    monkeypatch.setattr(Model, "register", staticmethod(lambda ws, **kwargs: calls.append(("register", kwargs))
                                                        or "model"))
    monkeypatch.setattr(Model, "deploy", staticmethod(deploy or (
        lambda ws, name, models, inference, config, deployment_target, overwrite:
        calls.append(("deploy", name, config.gpu_cores)) or Service())))
    monkeypatch.setattr("azureml.core.compute.AksCompute.__new__", lambda cls, ws, name: "target", raising=False)
    monkeypatch.setattr("azureml.core.compute.AksCompute.__init__", lambda self, *a, **k: None, raising=False)


def test_v1_objects_are_the_original_flow_fixed(settings):
    objects = azure_v1.build(settings)
    config = objects["deployment_config"]
    assert (config.num_replicas, config.cpu_cores, config.memory_gb, config.gpu_cores) == (3, 2.0, 4.0, 1)
    assert config.autoscale_enabled is False and config.auth_enabled is True
    assert objects["provisioning"].vm_size == "Standard_NC4as_T4_v3" and objects["provisioning"].agent_count == 3
    inference = objects["inference_config"]
    assert inference.entry_script == "score.py" and os.listdir(inference.source_directory) == ["score.py"]
    shutil.rmtree(inference.source_directory)  # the reference score.py travels alone
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
    calls: list = []
    fake_azure(monkeypatch, calls)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = azure_v1.deploy("workspace", settings, say=lambda m: None)
    assert any("2026-06-30" in str(w.message) for w in caught)
    # The description says what was given, in v2's words (deploy/plan.py): here a SavedModel, as it holds one.
    assert calls[0] == ("register", {"model_path": settings.model_dir, "model_name": "colors",
                                     "description": "TensorFlow SavedModel colors/1, served by score.py"})
    assert calls[0][1]["description"] == plan.model_description(settings)
    assert calls[1] == ("deploy", settings.endpoint, 1) and settings.endpoint.startswith("colors-")
    assert result["scoring_uri"] == "http://v1.example/score" and result["key"] == "k1"


def test_v1_ships_the_scripts_folder_as_its_source_directory(users_own, monkeypatch):
    """As v2's code (deploy/source.py): the script's folder, less what is not code and the model, with the entry
    script named relative to it; the copy lasts as long as the deploy."""
    s = DeploySettings(entry_script=str(users_own / "score.py"), model_dir=str(users_own / "models"), sdk="v1",
                       **WORKSPACE).named()
    shipped = []

    def deploy(ws, name, models, inference, config, deployment_target, overwrite):
        shipped.append((inference.entry_script, inference.source_directory, sorted(os.listdir(
            inference.source_directory))))
        with open(os.path.join(inference.source_directory, inference.entry_script), "rb") as f:
            assert f.read() == (users_own / "score.py").read_bytes()
        return Service()

    fake_azure(monkeypatch, [], deploy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        azure_v1.deploy("workspace", s, say=lambda m: None)
    [(script, folder, names)] = shipped
    assert (script, names) == ("score.py", ["myenv.yml", "mylib.py", "score.py"])
    assert not os.path.exists(folder)  # removed once the deploy is done


def test_v1_failure_says_what_to_delete(settings, monkeypatch):
    def refuse(*args, **kwargs):
        raise RuntimeError("quota exceeded")

    fake_azure(monkeypatch, [], refuse)
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


def test_v1_reads_kubernetes_quantities(settings):
    objects = azure_v1.build(dataclasses.replace(settings, cpu="500m", memory="512Mi"))
    shutil.rmtree(objects["inference_config"].source_directory, ignore_errors=True)
    config = objects["deployment_config"]
    assert (config.cpu_cores, config.memory_gb) == (0.5, 0.5)


def test_v1_teardown_of_a_service_that_is_gone_goes_on(settings, monkeypatch):
    """Webservice(ws, name) reads the service; where the workspace has none, azureml-core raises WebserviceNotFound:
    said, and the compute is still detached."""
    calls = []
    monkeypatch.setattr("azureml.core.webservice.Webservice._get", staticmethod(lambda ws, name=None: None))
    monkeypatch.setattr("azureml.core.compute.AksCompute.__new__", lambda cls, ws, name: object.__new__(cls),
                        raising=False)
    monkeypatch.setattr("azureml.core.compute.AksCompute.__init__",
                        lambda self, *a, **k: setattr(self, "is_attached", True), raising=False)
    monkeypatch.setattr("azureml.core.compute.AksCompute.detach", lambda self: calls.append("detach"))
    said = []
    assert azure_v1.teardown("workspace", settings, with_compute=True, say=said.append) == [
        "compute gpu-aks (detached)"]
    assert said[0] == f"service {settings.endpoint} does not exist" and calls == ["detach"]
