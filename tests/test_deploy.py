"""Cloud promotion, offline. Azure cannot be reached from here, so the real clients run against fakes at the wire
(tests/fake_azure.py): the azure-mgmt clients send real HTTP requests into a recording transport, the kubernetes
client talks to a Kubernetes API server on 127.0.0.1, and MLClient's operations record the real azure-ai-ml
entities with the REST body the SDK sends for each. The tests assert on those requests."""

from __future__ import annotations

import argparse
import base64
import dataclasses
import fnmatch
import json
import os
import re
import stat
import subprocess

import pytest
import yaml

from deploy import azure_v2, cli as deploy_cli, k8s, parity, plan
from deploy.settings import (GPU_BASE_IMAGE, PROJECT_TAG, DeployError, DeploySettings, endpoint_name,
                             fields_for)
from fake_azure import (AAD_TOKEN, ADMIN_TOKEN, AKS_AAD_SCOPE, SUBSCRIPTION, Arm, Credential, FakeML,
                        KubeApi, Poller)
from scorehost import REFERENCE_SCRIPT, processes

CLUSTER_PATH = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-ml/providers/Microsoft.ContainerService/"
                "managedClusters/scorehost-gpu")
EXTENSION_PATH = CLUSTER_PATH + "/providers/Microsoft.KubernetesConfiguration/extensions/azureml"
WORKSPACE_ID = (f"/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-ml/providers/Microsoft.MachineLearningServices/"
                "workspaces/ws-ml")
ENDPOINT = endpoint_name("colors", WORKSPACE_ID)  # the colour model's endpoint in the test workspace


@pytest.fixture(scope="module")
def workspace_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("ws") / "config.json"
    path.write_text(json.dumps({"subscription_id": SUBSCRIPTION, "resource_group": "rg-ml",
                                "workspace_name": "ws-ml"}))
    return str(path)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    (folder / "cert.pem").write_text("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
    (folder / "key.pem").write_text("-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n")
    return str(folder / "cert.pem"), str(folder / "key.pem")


@pytest.fixture
def settings(colors_model, workspace_config):
    return DeploySettings(model_dir=colors_model, model_name="colors", config_file=workspace_config).with_workspace()


@pytest.fixture
def https(settings, certificate):
    # The certificate's name resolves to the inference router's IP the fake cluster gives (127.0.0.1), as it does
    # once the user has created the DNS record.
    return dataclasses.replace(settings, create_cluster=True, ssl_cname="localhost",
                               ssl_cert=certificate[0], ssl_key=certificate[1])


@dataclasses.dataclass
class Azure:
    """Real azure-mgmt clients on a recording transport, a Kubernetes API server, and MLClient's operations."""
    arm: Arm
    kube: KubeApi
    ml: FakeML
    credential: Credential
    clients: azure_v2.Clients

    def cluster_writes(self) -> list[tuple[str, str]]:
        return [(r.method, r.path) for r in self.arm.writes() if not r.path.endswith(("/listClusterUserCredential",
                                                                                      "/listClusterAdminCredential"))]


@pytest.fixture
def azure():
    from azure.mgmt.containerservice import ContainerServiceClient
    from azure.mgmt.kubernetesconfiguration import SourceControlConfigurationClient
    from azure.mgmt.resource.resources import ResourceManagementClient

    kube = KubeApi(crd_after_polls=2, router_ip="127.0.0.1")
    arm = Arm(kube.kubeconfig(), admin_kubeconfig=kube.kubeconfig({"token": ADMIN_TOKEN}))
    credential, ml = Credential(), FakeML()
    clients = azure_v2.Clients(ml, ContainerServiceClient(credential, SUBSCRIPTION, transport=arm),
                               SourceControlConfigurationClient(credential, SUBSCRIPTION, transport=arm),
                               ResourceManagementClient(credential, SUBSCRIPTION, transport=arm), credential)
    yield Azure(arm, kube, ml, credential, clients)
    kube.close()


def quiet(message: str) -> None:
    pass


def run_deploy(azure: Azure, s: DeploySettings, managed: bool = False, check=None) -> dict:
    return azure_v2.deploy(azure.clients, s, managed=managed, say=quiet, check=check, poll_s=0)


def scorehost_cli(*args: str, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([processes._bin("scorehost"), *args], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **kwargs)


def namespace(command: str, **values) -> argparse.Namespace:
    """What argparse hands a deploy command: every flag of `command` unset unless given."""
    return argparse.Namespace(**{"config": None, **{f.name: None for f in fields_for(command)}, **values})


# --- plan ---------------------------------------------------------------------------------------------------

def test_plan_prints_every_resource_and_passes(colors_model):
    done = scorehost_cli("deploy", "plan", "--model-dir", colors_model, "--config-file", "/nonexistent.json")
    assert done.returncode == 0, done.stdout + done.stderr
    for kind in ("Kubernetes compute", "instance type", "model", "environment", "online endpoint",
                 "online deployment", "sha256=", "instance_count: 3", "max_concurrent_requests_per_instance: 1",
                 "scale_settings: default", GPU_BASE_IMAGE, "All local checks"):
        assert kind in done.stdout
    assert "(workspace from config.json)" not in done.stdout and "no workspace yet (no /nonexistent.json" in \
        done.stdout


@pytest.mark.parametrize("flags,problem", [
    (("--vm-size", "Standard_NC6"), "retired"),
    (("--vm-size", "Standard_NC6s_v3"), "retired"),
    (("--vm-size", "Standard_NC24rs_v3"), "retired"),
    (("--vm-size", "Standard_D4s_v5"), "not a GPU size"),
    (("--endpoint", "1_bad name"), "not a legal Azure name"),
    (("--model-dir", "/nonexistent"), "is not a directory"),
    (("--conda-file", REFERENCE_SCRIPT), "conda file"),
    (("--create-cluster",), "needs HTTPS (--ssl-cname NAME --ssl-cert CERT.pem --ssl-key KEY.pem) or"),
    (("--ssl-cname", "x.example.com"), "HTTPS needs --ssl-cert"),
    (("--ssl-cname", "x.example.com", "--ssl-cert", "/no/cert.pem", "--ssl-key", "/no/key.pem"), "is not a file"),
    (("--allow-insecure", "--ssl-cname", "x.example.com"), "exclude each other"),
    (("--gpus", "0"), "gpus must be at least 1: scorehost deploys to GPUs only"),
])
def test_plan_refuses_bad_settings(colors_model, flags, problem):
    done = scorehost_cli("deploy", "plan", "--no-load-check", "--model-dir", colors_model, *flags)
    assert done.returncode == 1 and problem in done.stdout, done.stdout


def test_plan_of_a_missing_entry_script_is_its_problem_line_not_a_traceback(tmp_path):
    done = scorehost_cli("deploy", "plan", "--entry-script", "missing.py", "--model-dir", "X", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "  - entry script missing.py does not exist" in done.stdout and "missing.py (missing)" in done.stdout


def test_plan_catches_a_script_that_does_not_load(colors_model, tmp_path):
    broken = tmp_path / "score.py"
    broken.write_text("def init():\n    raise RuntimeError('CANNOT-LOAD')\n\ndef run(x):\n    return x\n")
    (tmp_path / "myenv.yml").write_text(USER_ENV)
    found = plan.problems(DeploySettings(entry_script=str(broken), model_dir=colors_model))
    assert len(found) == 1 and "CANNOT-LOAD" in found[0]
    # Reported together with any other problem, in one run (a name Azure refuses: it starts with a digit).
    found = plan.problems(DeploySettings(entry_script=str(broken), model_dir=colors_model, deployment="1blue"))
    assert len(found) == 2 and "deployment '1blue' is not a legal Azure name" in found[0] and "CANNOT-LOAD" in found[1]


def test_plan_leaves_what_a_model_dir_holds_to_the_script(colors_model, tmp_path):
    """The model directory's layout is the script's business: two SavedModels fail in score.py's own words."""
    import shutil

    shutil.copytree(os.path.join(colors_model, "colors"), tmp_path / "colors")
    shutil.copytree(os.path.join(colors_model, "colors"), tmp_path / "copy")
    found = plan.problems(DeploySettings(model_dir=str(tmp_path)))
    assert len(found) == 1 and "Several SavedModels" in found[0]
    missing = str(tmp_path / "copy" / "1" / "variables" / "none")
    assert plan.problems(DeploySettings(model_dir=missing)) == [
        f"model_dir {missing!r} is not a directory (build one: scorehost model resnet50 --out DIR)"]


# Finds its file anywhere under AZUREML_MODEL_DIR, as the reference score.py does: the model folder itself (`serve
# --model-dir my/models`) or the folder Azure ML puts it in, by its name ($AZUREML_MODEL_DIR/models/...).
def test_plan_loads_the_model_where_azure_ml_puts_it_in_a_folder_of_its_name(users_own, tmp_path):
    """Azure ML keeps a registered folder's name ($AZUREML_MODEL_DIR/models/... for --model-dir my/models): a script
    that reads the model folder itself as AZUREML_MODEL_DIR is told so in one line, with both ways out."""
    flat = users_own / "score.py"
    flat.write_text(USER_SCRIPT.replace('"**", "greeter"', '"greeter"').replace(", recursive=True", ""))
    s = DeploySettings(entry_script=str(flat), model_dir=str(users_own / "models"))
    assert plan.problems(s) == [
        f"init() reads the model at AZUREML_MODEL_DIR={users_own / 'models'}, but Azure ML keeps the registered "
        "folder's name: its files are at $AZUREML_MODEL_DIR/models/...: read os.path.join(os.environ["
        f"'AZUREML_MODEL_DIR'], 'models', ...), or serve locally with --model-dir {users_own} to see Azure ML's layout"]
    flat.write_text(USER_SCRIPT.replace('"**", "greeter"', '"models", "greeter"').replace(", recursive=True", ""))
    assert plan.problems(s) == []
    # The same script runs from the image `deploy k8s` writes: the model in a folder of its name, as on Azure ML.
    k8s.write(s, str(tmp_path / "k8s"), "r.io/g:1")
    assert f'COPY --chown=1000 ["model/", "{k8s.MODEL_MOUNT}/models/"]' in (tmp_path / "k8s" / "Dockerfile").read_text()
    # A script that fails both ways is shown its own error.
    flat.write_text(USER_SCRIPT.replace('"**", "greeter"', '"nowhere"').replace(", recursive=True", ""))
    found = plan.problems(s)
    assert len(found) == 1 and found[0].startswith("the entry script does not load") and "IndexError" in found[0]


USER_SCRIPT = """\
import glob, json, os

def init():
    global greeting
    found = glob.glob(os.path.join(os.environ["AZUREML_MODEL_DIR"], "**", "greeter", "3", "greeting.txt"),
                      recursive=True)
    with open(found[0]) as f:
        greeting = f.read().strip()

def run(data):
    return {"greeting": greeting, "name": json.loads(data)["name"]}
"""


# A user's own environment: no TensorFlow, nothing of the reference score.py's.
USER_ENV = """\
name: my-env
dependencies:
  - python=3.11
  - pip
  - pip:
      - azureml-inference-server-http==1.5.1
"""


@pytest.fixture
def users_own(tmp_path):
    """A user's own JSON script, model and environment, as in `--entry-script my/score.py --model-dir my/models`."""
    my = tmp_path / "my"
    (my / "models" / "greeter" / "3").mkdir(parents=True)
    (my / "models" / "greeter" / "3" / "greeting.txt").write_text("bonjour\n")
    (my / "score.py").write_text(USER_SCRIPT)
    (my / "myenv.yml").write_text(USER_ENV)
    return my


@pytest.mark.parametrize("target", ["aks", "managed"])
def test_plan_out_writes_az_ml_yaml_that_the_sdk_loads(users_own, workspace_config, tmp_path, target):
    """The user's own script and model: the script byte for byte, the names from the model's (greeter)."""
    from azure.ai.ml import load_online_deployment, load_online_endpoint

    out = tmp_path / "plan"
    done = scorehost_cli("deploy", "plan", "--entry-script", str(users_own / "score.py"), "--model-dir",
                         str(users_own / "models"), "--config-file", workspace_config, "--target", target,
                         "--out", str(out))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "experimental" not in done.stdout + done.stderr
    endpoint = load_online_endpoint(str(out / "endpoint.yml"))
    deployment = load_online_deployment(str(out / "deployment.yml"))
    assert endpoint.name == endpoint_name("greeter", WORKSPACE_ID, "my") and endpoint.auth_mode == "key"
    assert re.fullmatch(r"my-greeter-[0-9a-f]{6}", endpoint.name) and deployment.endpoint_name == endpoint.name
    assert deployment.model.name == "greeter" and deployment.environment.name == "scorehost-greeter"
    assert deployment.instance_count == 3 and deployment.request_settings.max_concurrent_requests_per_instance == 1
    assert deployment.request_settings.max_queue_wait_ms == 500  # explicit, not whatever the service defaults to
    assert deployment.environment_variables == {"WORKER_COUNT": "1", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert deployment.environment.image == GPU_BASE_IMAGE
    assert (out / "code" / "score.py").read_bytes() == (users_own / "score.py").read_bytes()
    apply = done.stdout.split("Apply by hand, in this order:\n")[1].splitlines()
    if target == "aks":
        assert deployment.instance_type == "gpu-t4" and endpoint.compute == "gpu-aks"
        assert yaml.safe_load((out / "instance-type.yaml").read_text())["kind"] == "InstanceType"
        assert apply[1].strip() == f"kubectl apply -f {out / 'instance-type.yaml'}"
        assert apply[2].strip() == (f"az ml compute attach -g rg-ml -w ws-ml --type Kubernetes --name gpu-aks "
                                    f"--resource-id {CLUSTER_PATH} --namespace azureml --identity-type SystemAssigned")
    else:
        assert deployment.instance_type == "Standard_NC4as_T4_v3" and not (out / "instance-type.yaml").exists()
        assert "compute attach" not in done.stdout
    # The new endpoint routes nothing (traffic: {}) until its first deployment takes it all, as `deploy` does.
    assert yaml.safe_load((out / "endpoint.yml").read_text()).get("traffic", {}) == {}
    assert apply[-2:] == [f"  az ml online-endpoint create -g rg-ml -w ws-ml -f {out / 'endpoint.yml'}",
                          f"  az ml online-deployment create -g rg-ml -w ws-ml -f {out / 'deployment.yml'} "
                          "--all-traffic"]
    for name in os.listdir(out):
        if name.endswith((".yml", ".yaml")):
            assert "&id" not in (out / name).read_text()


def test_a_users_script_without_a_model_dir_is_refused_not_given_the_demo_model(users_own, tmp_path):
    """The demo model is the reference score.py's alone (as in `scorehost serve`): a user's script without
    --model-dir is refused in one line, before anything is checked or written."""
    script = str(users_own / "score.py")
    out = tmp_path / "k8s"
    for command in (("plan",), ("k8s", "--image", "r.io/g:1", "--out", str(out))):
        done = scorehost_cli("deploy", *command, "--entry-script", script)
        assert done.returncode == 1 and "pass --model-dir DIR" in done.stderr, done.stdout + done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr
        assert "resnet50" not in done.stdout
    assert not out.exists()
    args = namespace("managed", entry_script=script, skip_parity=True, parity_requests=None, parity_ignore=None,
                     yes=True)
    with pytest.raises(DeployError) as e:
        deploy_cli.cmd_managed(args)
    assert e.value.message == (f"scorehost deploy managed: no model directory for {script} (the demo model is the "
                               "reference score.py's): pass --model-dir DIR")


def test_the_conda_file_is_the_myenv_yml_beside_the_entry_script(users_own, tmp_path):
    """A user's script deploys with its own myenv.yml, not the repo's TensorFlow one (the reference score.py's, beside
    it); a script with none beside it is told to name one."""
    assert DeploySettings(entry_script=str(users_own / "score.py")).conda_file == str(users_own / "myenv.yml")
    assert DeploySettings().conda_file == os.path.join(os.path.dirname(REFERENCE_SCRIPT), "myenv.yml")
    assert DeploySettings(entry_script=str(users_own / "score.py"), conda_file="x.yml").conda_file == "x.yml"
    done = scorehost_cli("deploy", "plan", "--no-load-check", "--entry-script", str(users_own / "score.py"),
                         "--model-dir", str(users_own / "models"))
    assert done.returncode == 0 and f"conda_file: {users_own / 'myenv.yml'}" in done.stdout, done.stdout
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "score.py").write_text(USER_SCRIPT)
    found = plan.problems(DeploySettings(entry_script=str(alone / "score.py"), model_dir=str(users_own / "models")),
                          load_check=False)
    assert len(found) == 1 and "no myenv.yml beside it; pass --conda-file FILE" in found[0], found


@pytest.fixture
def with_a_module(users_own):
    """The user's script imports a module of its own, beside it; the folder also holds what is not code."""
    (users_own / "score.py").write_text("import mylib  # noqa: F401\n" + USER_SCRIPT)
    (users_own / "mylib.py").write_text("SCALE = 2\n")
    for junk in (".git/HEAD", "__pycache__/mylib.cpython-311.pyc", ".venv/bin/python", "venv/pyvenv.cfg", "old.pyc"):
        (users_own / junk).parent.mkdir(parents=True, exist_ok=True)
        (users_own / junk).write_text("not code")
    return users_own


def test_plan_ships_the_scripts_folder_and_loads_the_script_from_it(with_a_module, workspace_config, tmp_path):
    """Azure ML's code is a folder: the script's own modules go with it, less what is not code (the model is
    registered on its own; an output folder inside the project is left out, as its own code/ copy)."""
    my = with_a_module
    for out in (tmp_path / "plan", my / "plan"):
        done = scorehost_cli("deploy", "plan", "--entry-script", str(my / "score.py"), "--model-dir",
                             str(my / "models"), "--config-file", workspace_config, "--out", str(out))
        assert done.returncode == 0, done.stdout + done.stderr
        assert sorted(os.listdir(out / "code")) == ["myenv.yml", "mylib.py", "score.py"]
        assert f"code: {my}" in done.stdout
        assert yaml.safe_load((out / "deployment.yml").read_text())["code_configuration"] == {
            "code": "./code", "scoring_script": "score.py"}


def test_plan_load_check_catches_a_module_that_would_not_ship(users_own, tmp_path, monkeypatch, colors_model):
    """The load check runs the copy that ships, from elsewhere: a module found only through the current directory
    (here the project above the script's folder) fails in the check, as it would in the cloud."""
    app = users_own / "app"
    app.mkdir()
    (app / "score.py").write_text("import projectlib  # noqa: F401\n" + USER_SCRIPT)
    (app / "myenv.yml").write_text(USER_ENV)
    (users_own / "projectlib.py").write_text("")
    monkeypatch.chdir(users_own)
    found = plan.problems(DeploySettings(entry_script="app/score.py", model_dir="models"))
    assert len(found) == 1 and "No module named 'projectlib'" in found[0], found
    (app / "projectlib.py").write_text("")
    assert plan.problems(DeploySettings(entry_script="app/score.py", model_dir="models")) == []


def test_the_code_folder_is_what_azure_ml_uploads_less_its_ignore_file(users_own, tmp_path, monkeypatch):
    """azure-ai-ml leaves out of the code upload what the folder's .amlignore (else .gitignore) matches: the staged
    copy, which the load check runs, leaves out the same files (the SDK's own listing of the upload is the reference),
    and `plan` names them in one line; a file the script needs that Azure would drop fails the check."""
    from azure.ai.ml._utils._asset_utils import get_ignore_file, get_upload_files_from_folder

    from deploy import source

    my = users_own
    (my / "data").mkdir()
    (my / "data" / "labels.json").write_text('{"hello": "bonjour"}')
    (my / "notes").mkdir()
    (my / "notes" / "run.log").write_text("log")
    (my / "helper.py").write_text("")
    (my / ".gitignore").write_text("*.log\ndata/\n")
    s = DeploySettings(entry_script=str(my / "score.py"), model_dir=str(my / "models"))
    staged = tmp_path / "code"
    source.copy(s, str(staged))
    uploaded = sorted(dest for _, dest in get_upload_files_from_folder(my, ignore_file=get_ignore_file(my))
                      if not dest.startswith("models/"))  # the model is registered on its own
    assert sorted(os.path.relpath(os.path.join(folder, name), staged)
                  for folder, _, names in os.walk(staged) for name in names) == uploaded == [
        ".gitignore", "helper.py", "myenv.yml", "score.py"]
    assert source.left_out_line(s) == ("left out of the code folder by its .gitignore, as Azure ML's upload leaves "
                                       "them out: data/labels.json, notes/run.log")
    done = scorehost_cli("deploy", "plan", "--entry-script", str(my / "score.py"), "--model-dir", str(my / "models"))
    assert done.returncode == 0 and f"note: {source.left_out_line(s)}\n" in done.stdout, done.stdout
    # A script that reads a file the upload leaves out fails the load check, which says what was left out.
    (my / "score.py").write_text("import json, os\n\nLABELS = json.load(open(os.path.join(os.path.dirname("
                                 "__file__), 'data', 'labels.json')))\n" + USER_SCRIPT)
    found = plan.problems(s)
    assert len(found) == 1 and "No such file or directory" in found[0] and "data/labels.json'" in found[0], found
    assert found[0].endswith(f"({source.left_out_line(s)})")
    # .amlignore comes first, as in the SDK: it keeps data/ here.
    (my / ".amlignore").write_text("*.log\n")
    assert plan.problems(s) == []
    assert source.left_out_line(s).endswith("by its .amlignore, as Azure ML's upload leaves them out: notes/run.log")


def test_a_code_folder_over_100_mb_is_refused(users_own, monkeypatch):
    from deploy import source

    monkeypatch.setattr(source, "MAX_BYTES", 1000)
    (users_own / "data.bin").write_bytes(b"x" * 2000)
    s = DeploySettings(entry_script=str(users_own / "score.py"), model_dir=str(users_own / "models"))
    found = plan.problems(s)
    assert len(found) == 1 and f"the code folder {users_own}" in found[0] and "over 0 MB" in found[0], found
    assert k8s.problems(s, str(users_own.parent / "k8s")) == found
    (users_own / "data.bin").unlink()
    (users_own / "models" / "big.bin").write_bytes(b"x" * 2000)  # the model is no part of the code folder
    assert plan.problems(s) == []


@pytest.mark.parametrize("target,where", [("aks", "an AKS GPU node pool"), ("managed", "a managed online endpoint")])
def test_a_vm_size_that_is_no_gpu_size_names_the_target(colors_model, target, where):
    found = plan.problems(DeploySettings(model_dir=colors_model, target=target, vm_size="Standard_D2s_v3"),
                          load_check=False)
    assert found == [f"vm_size Standard_D2s_v3 is not a GPU size for {where} (e.g. Standard_NC4as_T4_v3)"]


def test_names_follow_azures_rules(colors_model):
    """Endpoint and deployment names: a letter first, 3-32 characters (azure-ai-ml's own check); on Kubernetes both
    together 6-62. Derived names are legal whatever the model is called."""
    for model_name in ("colors", "9lives", "My Model!", "x" * 40, "a"):
        name = endpoint_name(model_name, WORKSPACE_ID)
        assert plan.ENDPOINT_NAME.match(name) and name.endswith("-" + name.rsplit("-", 1)[1]), name
    assert endpoint_name("colors", WORKSPACE_ID) != endpoint_name("colors", WORKSPACE_ID.replace("ws-ml", "ws-2"))
    s = DeploySettings(model_dir=colors_model, target="aks")
    long = plan.problems(dataclasses.replace(s, endpoint="e" * 32, deployment="d" * 31), load_check=False)
    assert long == [f"endpoint '{'e' * 32}' and deployment '{'d' * 31}' are 63 "
                    "characters together; on Kubernetes they must be 6-62"]
    assert plan.problems(dataclasses.replace(s, endpoint="e" * 32, deployment="d" * 31, target="managed"),
                         load_check=False) == []


def test_plan_without_a_workspace_shows_the_endpoint_name_deploy_creates(azure, colors_model, workspace_config,
                                                                          tmp_path):
    """The endpoint's name ends in 6 characters of the workspace's id: a plan without a workspace shows them as '?'
    (a glob that the created name matches), never a name no deploy creates; with the workspace, the very name."""
    def planned(*flags: str) -> str:
        done = scorehost_cli("deploy", "plan", "--no-load-check", "--target", "managed", "--model-dir", colors_model,
                             *flags)
        assert done.returncode == 0, done.stdout + done.stderr
        return re.search(r"online endpoint \(if absent\): (\S+)", done.stdout)[1]

    offline, online = planned("--config-file", "/nonexistent.json"), planned("--config-file", workspace_config)
    args = namespace("managed", model_dir=colors_model, config_file=workspace_config, yes=True, skip_parity=True,
                     parity_requests=None, parity_ignore=None)
    assert deploy_cli.cmd_managed(args, azure.clients) == 0
    assert list(azure.ml.endpoint_state) == [online] == [ENDPOINT]
    assert fnmatch.fnmatchcase(ENDPOINT, offline) and offline == "colors-??????", offline
    # YAML written without a workspace would name another endpoint than `deploy` creates: refused, nothing written.
    done = scorehost_cli("deploy", "plan", "--no-load-check", "--model-dir", colors_model, "--config-file",
                         "/nonexistent.json", "--out", str(tmp_path / "plan"))
    assert done.returncode == 1 and "--out writes the endpoint's name" in done.stdout
    assert not (tmp_path / "plan").exists()

def test_base_image_is_a_pinned_cuda12_image_named_once():
    assert GPU_BASE_IMAGE.startswith("mcr.microsoft.com/azureml/") and "cuda12" in GPU_BASE_IMAGE
    tag = GPU_BASE_IMAGE.rsplit(":", 1)[1]
    assert tag != "latest" and tag[:8].isdigit()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for folder in ("deploy", "scorehost", "server"):
        for name in os.listdir(os.path.join(root, folder)):
            if name.endswith(".py") and name != "settings.py":
                with open(os.path.join(root, folder, name), encoding="utf-8") as f:
                    assert "mcr.microsoft.com/azureml/" not in f.read(), name


# --- the cluster side, as the requests Azure and the Kubernetes API receive -----------------------------------

def test_create_cluster_sends_the_cluster_provider_extension_and_instance_type(azure, https, certificate):
    run_deploy(azure, https)
    writes = azure.cluster_writes()
    assert writes[0] == ("PUT", CLUSTER_PATH)
    assert writes[1] == ("POST", f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.KubernetesConfiguration/register")
    assert writes[2] == ("PUT", EXTENSION_PATH)
    created = azure.arm.writes("PUT")[0].body
    assert created["tags"] == {"created-by": "scorehost"}
    pools = {p["name"]: p for p in created["properties"]["agentPoolProfiles"]}
    assert (pools["gpupool"]["vmSize"], pools["gpupool"]["count"], pools["gpupool"]["mode"]) == (
        "Standard_NC4as_T4_v3", 3, "User")

    extension = azure.arm.writes("PUT")[1].body["properties"]
    settings = extension["configurationSettings"]
    assert extension["extensionType"] == "Microsoft.AzureML.Kubernetes"
    assert extension["scope"] == {"cluster": {"releaseNamespace": "azureml"}}
    # What `az k8s-extension create` adds for an AKS cluster (azure-cli-extensions, AzureMLKubernetes.py):
    assert settings["clusterId"] == CLUSTER_PATH == settings["prometheus.prometheusSpec.externalLabels.cluster_name"]
    assert (settings["location"], settings["jobSchedulerLocation"], settings["domain"]) == (
        "eastus", "eastus", "eastus.cloudapp.azure.com")
    assert (settings["relayserver.enabled"], settings["servicebus.enabled"], settings["nginxIngress.enabled"]) == (
        "false", "false", "true")
    assert (settings["enableInference"], settings["allowInsecureConnections"], settings["sslCname"]) == (
        "True", "False", "localhost")
    assert settings["cluster_name"] == CLUSTER_PATH  # az k8s-extension create keeps it beside what it derives
    # The fake cluster's GPU nodes advertise nvidia.com/gpu (a device plugin runs); it has no DCGM exporter.
    assert (settings["installNvidiaDevicePlugin"], settings["installDcgmExporter"]) == ("False", "True")
    assert settings["cluster_name_friendly"] == "scorehost-gpu" and "clusterPurpose" not in settings  # 4 nodes
    protected = extension["configurationProtectedSettings"]
    with open(certificate[0], "rb") as f:
        assert base64.b64decode(protected["scoringFe.sslCert"]) == f.read()
    assert "scoringFe.sslKey" in protected and "sslKey" not in json.dumps(settings)

    # The InstanceType only once the extension's CRD is established (the fake answers 404 twice first).
    kube = [(r.method, r.path) for r in azure.kube.requests]
    assert kube.count(("GET", KubeApi.CRD_PATH)) == 3
    created = kube.index(("POST", KubeApi.OBJECTS))
    assert max(i for i, r in enumerate(kube) if r == ("GET", KubeApi.CRD_PATH)) < created
    body = azure.kube.requests[created].body
    assert body["spec"]["resources"] == {"requests": {"cpu": "2", "memory": "4Gi"},
                                         "limits": {"cpu": "2", "memory": "4Gi", "nvidia.com/gpu": 1}}
    assert body["spec"]["nodeSelector"] == {"agentpool": "gpupool"}


def test_a_cluster_without_a_device_plugin_gets_the_extensions(azure, https):
    azure.kube.nodes = [{**n, "status": {"allocatable": {"cpu": "4"}}} for n in azure.kube.nodes]
    azure.kube.daemonsets = ["dcgm-exporter"]
    with pytest.raises(DeployError) as e:  # the fake runs no device plugin: its nodes never advertise a GPU
        run_deploy(azure, https)
    settings = azure.arm.writes("PUT")[1].body["properties"]["configurationSettings"]
    assert (settings["installNvidiaDevicePlugin"], settings["installDcgmExporter"]) == ("True", "False")
    assert "0 of 0 nvidia.com/gpu free" in e.value.message and "device plugin running?" in e.value.message


def entra_id_cluster(azure: Azure, local_accounts: bool = True) -> None:
    """As listClusterUserCredential answers for an Entra ID cluster: an exec user that runs kubelogin."""
    azure.arm.kubeconfig = azure.kube.kubeconfig(KubeApi.exec_user())
    azure.arm.resources[CLUSTER_PATH.lower()]["properties"].update(
        {"aadProfile": {"managed": True, "enableAzureRbac": True}, "disableLocalAccounts": not local_accounts})


def test_an_entra_id_cluster_is_reached_with_a_token_from_the_same_credential(azure, https):
    run_deploy(azure, https)
    entra_id_cluster(azure)
    azure.kube.requests.clear(), azure.arm.requests.clear()
    run_deploy(azure, https)
    assert AKS_AAD_SCOPE in azure.credential.scopes  # the scope kubelogin --server-id asks for
    assert {r.authorization for r in azure.kube.requests} == {f"Bearer {AAD_TOKEN}"}
    assert not any(r.path.endswith("/listClusterAdminCredential") for r in azure.arm.requests)


def test_an_entra_id_cluster_that_refuses_the_identity_is_reached_with_its_admin_credential(azure, https):
    run_deploy(azure, https)
    entra_id_cluster(azure)
    azure.kube.refuse_aad = True
    azure.kube.requests.clear(), azure.arm.requests.clear()
    run_deploy(azure, https)
    assert [r.method for r in azure.arm.requests if r.path.endswith("/listClusterAdminCredential")] == ["POST"]
    refused = [r for r in azure.kube.requests if r.authorization == f"Bearer {AAD_TOKEN}"]
    assert len(refused) == 1 and refused[0].path == "/api/v1/nodes"  # one probe, then the admin credential
    assert {r.authorization for r in azure.kube.requests[1:]} == {f"Bearer {ADMIN_TOKEN}"}


def test_an_entra_id_cluster_without_local_accounts_that_refuses_the_identity_says_which_role(azure, https):
    run_deploy(azure, https)
    entra_id_cluster(azure, local_accounts=False)
    azure.kube.refuse_aad = True
    azure.ml.calls.clear()
    with pytest.raises(DeployError) as e:
        run_deploy(azure, https)
    assert "Azure Kubernetes Service RBAC Cluster Admin" in e.value.message and "--enable-local-accounts" in \
        e.value.message
    assert azure.ml.writes() == [] and not any(r.path.endswith("/listClusterAdminCredential")
                                               for r in azure.arm.requests)


def test_https_waits_for_the_name_to_resolve_to_the_router_before_the_replay(azure, https):
    said, checked = [], []
    s = dataclasses.replace(https, ssl_cname="scoring.invalid", dns_wait_s=0)  # .invalid never resolves (RFC 6761)
    azure.kube.router_polls_left = 2  # the LoadBalancer gets its IP after a while
    azure.kube.router_ip = "203.0.113.7"
    with pytest.raises(DeployError) as e:
        azure_v2.deploy(azure.clients, s, managed=False, say=said.append, poll_s=0,
                        check=lambda *a: checked.append(a) or True)
    assert any(line.startswith("DNS: create an A record scoring.invalid -> 203.0.113.7") for line in said)
    assert "create the DNS A record scoring.invalid -> 203.0.113.7" in e.value.message and checked == []
    assert [r.path for r in azure.kube.requests].count(KubeApi.ROUTER_PATH) == 3
    assert ("online_endpoints", "begin_create_or_update") in azure.ml.writes()  # created, but no traffic moved
    assert azure.ml.endpoint_state[ENDPOINT].traffic in ({}, None)


def test_a_second_deployment_needs_free_gpus_on_the_pool(azure, https):
    run_deploy(azure, https)
    azure.kube.used_by("blue", 3)  # blue's 3 instances hold the pool's 3 GPUs
    azure.ml.calls.clear()
    with pytest.raises(DeployError) as e:
        run_deploy(azure, dataclasses.replace(https, deployment="green", traffic=10))
    assert "GPU pool gpupool has 0 of 3 nvidia.com/gpu free; deployment green needs 3 (3 instances x 1 GPU)" in \
        e.value.message and "az aks nodepool scale" in e.value.message
    assert ("online_deployments", "begin_create_or_update") not in azure.ml.writes()
    azure.kube.pods = azure.kube.pods[:2]  # one GPU free: one instance fits
    with pytest.raises(DeployError) as e:
        run_deploy(azure, dataclasses.replace(https, deployment="green", traffic=10))
    assert "1 of 3 nvidia.com/gpu free" in e.value.message and "--instance-count 1" in e.value.message
    run_deploy(azure, dataclasses.replace(https, deployment="green", traffic=10, instance_count=1))
    azure.ml.calls.clear()
    with pytest.raises(DeployError) as e:  # blue and green both live: neither is replaced in place
        run_deploy(azure, https)
    assert "deployment blue takes 90%" in e.value.message and "--deployment" in e.value.message
    assert azure.ml.writes() == []


def test_a_gpu_pool_with_a_foreign_taint_is_refused(azure, https):
    run_deploy(azure, https)
    pools = azure.arm.resources[CLUSTER_PATH.lower()]["properties"]["agentPoolProfiles"]
    next(p for p in pools if p["name"] == "gpupool")["nodeTaints"] = ["sku=gpu:NoSchedule"]
    azure.ml.calls.clear()
    with pytest.raises(DeployError) as e:
        run_deploy(azure, https)
    assert "tainted sku=gpu:NoSchedule" in e.value.message and "--node-taints" in e.value.message
    assert azure.ml.writes() == []


def test_the_compute_is_attached_with_a_system_assigned_identity_and_its_registry_role_is_printed(azure, https):
    said = []
    azure_v2.deploy(azure.clients, https, managed=False, say=said.append, poll_s=0)
    attach = next(c for c in azure.ml.calls if (c.operation, c.method) == ("compute", "begin_create_or_update"))
    assert attach.body["identity"]["type"] == "SystemAssigned"
    line = next(x for x in said if "AcrPull" in x)
    assert "--assignee-object-id 11111111-2222-3333-4444-555555555555" in line and \
        "/providers/Microsoft.ContainerRegistry/registries/wsacr" in line


def test_insecure_extension_sends_no_certificate_and_small_clusters_are_devtest(azure, settings):
    s = dataclasses.replace(settings, create_cluster=True, allow_insecure=True, node_count=1)
    run_deploy(azure, s)
    extension = azure.arm.writes("PUT")[1].body["properties"]
    assert extension["configurationSettings"]["allowInsecureConnections"] == "True"
    assert "sslCname" not in extension["configurationSettings"]
    assert not extension.get("configurationProtectedSettings")
    assert (extension["configurationSettings"]["clusterPurpose"],
            extension["configurationSettings"]["inferenceRouterHA"]) == ("DevTest", "false")


def test_without_an_https_choice_nothing_is_sent(azure, settings):
    args = namespace("aks", yes=True, skip_parity=True, create_cluster=True, model_dir=settings.model_dir,
                     config_file=settings.config_file)
    with pytest.raises(DeployError) as e:
        deploy_cli.cmd_aks(args, azure.clients)
    assert "--ssl-cname NAME --ssl-cert CERT.pem --ssl-key KEY.pem" in e.value.message and "--allow-insecure" in \
        e.value.message
    assert azure.arm.requests == [] and azure.ml.calls == [] and azure.kube.requests == []


def test_a_missing_cluster_is_not_created_without_create_cluster(azure, settings):
    with pytest.raises(DeployError) as e:
        run_deploy(azure, settings)
    assert "does not exist" in e.value.message and "--create-cluster" in e.value.message
    assert azure.arm.writes() == [] and azure.ml.writes() == []


def test_second_run_rewrites_nothing_that_exists(azure, https):
    first = run_deploy(azure, https)
    azure.arm.requests.clear(), azure.kube.requests.clear(), azure.ml.calls.clear()
    second = run_deploy(azure, https)
    assert azure.cluster_writes() == []  # the cluster (its node pools), the provider, the extension: read only
    kube = [(r.method, r.path) for r in azure.kube.requests if r.path.startswith(KubeApi.OBJECTS)]
    assert kube == [("GET", KubeApi.OBJECTS + "/gpu-t4"), ("PUT", KubeApi.OBJECTS + "/gpu-t4")]
    replaced = next(r for r in azure.kube.requests if r.method == "PUT")
    assert replaced.body["metadata"]["resourceVersion"] == "1"  # else the API server says 422
    # The model's files are registered already (same files_sha256): nothing is uploaded again. Live blue is not
    # replaced in place: the new code goes to green beside it, at 0% until checked and asked for.
    assert azure.ml.writes() == [("online_deployments", "begin_create_or_update")]
    assert [c.args[0].name for c in azure.ml.calls if c.operation == "online_deployments" and c.body] == ["green"]
    assert first["traffic"] == {"blue": 100} and second["traffic"] == {"blue": 100, "green": 0}
    assert azure.kube.objects["gpu-t4"]["metadata"]["resourceVersion"] == "2"


def test_a_model_with_other_files_is_registered_as_a_new_version(azure, https, tmp_path):
    import shutil

    run_deploy(azure, https)
    changed = tmp_path / "model"
    shutil.copytree(https.model_dir, changed)
    (changed / "colors" / "1" / "labels.txt").write_text("other\n")
    second = run_deploy(azure, dataclasses.replace(https, model_dir=str(changed)))
    versions = azure.ml.model_versions["colors"]
    assert [v.version for v in versions] == ["1", "2"]
    assert versions[0].tags["files_sha256"] == plan.sha256(https.model_dir) != versions[1].tags["files_sha256"]
    deployed = azure.ml.deployment_state[(ENDPOINT, second["deployment"])]
    assert deployed.model.version == "2"


def test_an_existing_cluster_without_the_gpu_pool_is_refused(azure, https):
    run_deploy(azure, https)
    with pytest.raises(DeployError) as e:
        run_deploy(azure, dataclasses.replace(https, gpu_pool="gpu2"))
    assert "no node pool 'gpu2'" in e.value.message and "system, gpupool" in e.value.message


def test_deployment_request_asks_for_exact_replicas_and_one_request_each(azure, https):
    run_deploy(azure, dataclasses.replace(https, instance_count=3))
    body = next(c.body for c in azure.ml.calls if c.operation == "online_deployments" and c.body)
    assert body["sku"] == {"name": "Default", "capacity": 3}
    properties = body["properties"]
    assert properties["scaleSettings"] == {"scaleType": "Default"}
    assert properties["requestSettings"] == {"maxConcurrentRequestsPerInstance": 1, "requestTimeout": "PT5S",
                                             "maxQueueWait": "PT0.5S"}
    # Azure ML's server in the container: one worker per request in flight, sharing the GPU with memory growth on.
    assert properties["environmentVariables"] == {"WORKER_COUNT": "1", "TF_FORCE_GPU_ALLOW_GROWTH": "true"}
    assert (properties["instanceType"], properties["endpointComputeType"]) == ("gpu-t4", "Kubernetes")
    assert properties["codeConfiguration"]["scoringScript"] == "score.py"
    assert properties["model"].endswith("/models/colors/versions/1")
    assert body["tags"]["score_sha256"] == plan.sha256(REFERENCE_SCRIPT)


def test_a_second_deployment_is_checked_alone_then_takes_its_share(azure, https):
    run_deploy(azure, https)
    azure.ml.calls.clear()
    checked = []

    def check(uri, key, deployment):
        # At the time of the check, the endpoint still sends everything to blue.
        checked.append((uri, key, deployment, dict(azure.ml.endpoint_state[ENDPOINT].traffic)))
        return True

    result = run_deploy(azure, dataclasses.replace(https, deployment="green", traffic=10), check=check)
    assert checked == [(f"https://{ENDPOINT}.eastus.inference.ml.azure.com/score",
                        f"{ENDPOINT}-primary-key", "green", {"blue": 100})]
    assert result["traffic"] == {"blue": 90, "green": 10}
    endpoint_writes = [c for c in azure.ml.calls if (c.operation, c.method) == ("online_endpoints",
                                                                                "begin_create_or_update")]
    assert len(endpoint_writes) == 1 and endpoint_writes[0].body["properties"]["traffic"] == {"blue": 90, "green": 10}
    assert (ENDPOINT, "blue") in azure.ml.deployment_state  # blue stays beside green


def test_a_deployment_that_fails_parity_takes_no_traffic(azure, https):
    run_deploy(azure, https)
    azure.ml.calls.clear()
    with pytest.raises(DeployError) as e:
        run_deploy(azure, dataclasses.replace(https, deployment="green", traffic=50), check=lambda *a: False)
    assert "takes no new traffic" in e.value.message and "--only-deployment green" in e.value.message
    assert azure.ml.endpoint_state[ENDPOINT].traffic == {"blue": 100}
    assert ("online_endpoints", "begin_create_or_update") not in azure.ml.writes()


def test_a_rerun_never_replaces_the_live_deployment_before_parity(azure, https):
    """The default --deployment blue, run again while blue takes the traffic: green gets the new code and the check;
    blue keeps serving the old one. A live deployment of another name is refused before anything is written."""
    run_deploy(azure, https)
    live_blue = azure.ml.deployment_state[(ENDPOINT, "blue")]
    azure.ml.calls.clear()
    said = []
    with pytest.raises(DeployError) as e:
        azure_v2.deploy(azure.clients, https, managed=False, say=said.append, check=lambda *a: False, poll_s=0)
    assert any("deploying green beside it" in line for line in said)
    assert azure.ml.deployment_state[(ENDPOINT, "blue")] is live_blue
    assert azure.ml.endpoint_state[ENDPOINT].traffic == {"blue": 100}
    assert f"teardown --endpoint {ENDPOINT} --only-deployment green" in e.value.message
    azure_v2.teardown(azure.clients, https, detach=False, only_deployment="green", say=quiet)  # not refused

    prod = dataclasses.replace(https, deployment="prod")
    run_deploy(azure, dataclasses.replace(https, deployment="prod", traffic=100))
    azure.ml.calls.clear()
    with pytest.raises(DeployError) as e:
        run_deploy(azure, prod)
    assert "deployment prod takes 100%" in e.value.message and "--deployment" in e.value.message
    assert "\n" not in e.value.message and azure.ml.writes() == []


def test_a_new_deployment_beside_a_live_one_takes_no_traffic_unless_asked(azure, https):
    run_deploy(azure, https)
    result = run_deploy(azure, dataclasses.replace(https, deployment="green"))
    assert result["traffic"] == {"blue": 100, "green": 0}


def test_a_first_deployment_cannot_take_part_of_the_traffic(azure, https):
    with pytest.raises(DeployError) as e:
        run_deploy(azure, dataclasses.replace(https, traffic=30))
    assert "leaves 70% to no deployment" in e.value.message
    assert ("online_deployments", "begin_create_or_update") not in azure.ml.writes()  # refused before writing


@pytest.mark.parametrize("current,requested,expected", [
    ({"blue": 100}, {"green": 10}, {"blue": 90, "green": 10}),
    ({"blue": 90, "green": 10}, {"green": 0}, {"blue": 100, "green": 0}),
    ({"blue": 90, "green": 10}, {"blue": 100, "green": 0}, {"blue": 100, "green": 0}),
    ({"a": 50, "b": 25, "c": 25}, {"c": 40}, {"a": 40, "b": 20, "c": 40}),
    ({"a": 1, "b": 1, "c": 1}, {"d": 1}, {"a": 33, "b": 33, "c": 33, "d": 1}),
])
def test_traffic_shares_add_up_to_100(current, requested, expected):
    result = azure_v2.shares(current, requested)
    assert result == expected and sum(result.values()) == 100


def test_deploy_traffic_shifts_and_rolls_back(azure, https):
    run_deploy(azure, https)
    run_deploy(azure, dataclasses.replace(https, deployment="green"))
    args = namespace("traffic", endpoint=ENDPOINT, shares=["green=25"], config_file=https.config_file)
    assert deploy_cli.cmd_traffic(args, azure.clients) == 0
    assert azure.ml.endpoint_state[ENDPOINT].traffic == {"blue": 75, "green": 25}
    assert deploy_cli.cmd_traffic(namespace("traffic", endpoint=ENDPOINT, shares=["blue=100", "green=0"],
                                            config_file=https.config_file), azure.clients) == 0
    assert azure.ml.endpoint_state[ENDPOINT].traffic == {"blue": 100, "green": 0}
    for shares, message in ((["red=10"], "has no deployment red"), (["green=110"], "0-100"),
                            (["green"], "is not DEPLOYMENT=PERCENT")):
        with pytest.raises(DeployError) as e:
            deploy_cli.cmd_traffic(namespace("traffic", endpoint=ENDPOINT, shares=shares,
                                             config_file=https.config_file), azure.clients)
        assert message in e.value.message


def test_managed_endpoint_needs_no_cluster(azure, settings):
    result = run_deploy(azure, settings, managed=True, check=lambda *a: True)
    assert azure.arm.requests == [] and azure.kube.requests == []  # no cluster, extension or instance type
    endpoint = next(c for c in azure.ml.calls if c.operation == "online_endpoints" and c.body)
    assert "compute" not in endpoint.body["properties"] and endpoint.body["properties"]["authMode"] == "Key"
    body = next(c.body for c in azure.ml.calls if c.operation == "online_deployments" and c.body)
    assert (body["properties"]["instanceType"], body["properties"]["endpointComputeType"]) == (
        "Standard_NC4as_T4_v3", "Managed")
    assert body["sku"]["capacity"] == 3 and result["traffic"] == {"blue": 100}
    assert ("compute", "begin_create_or_update") not in azure.ml.writes()


def test_the_registered_model_is_described_as_what_was_given(azure, settings, users_own, workspace_config):
    """A SavedModel is called one only where its saved_model.pb is; any other model by its folder, not a format."""
    run_deploy(azure, settings, managed=True)
    greeter = DeploySettings(entry_script=str(users_own / "score.py"), model_dir=str(users_own / "models"),
                             config_file=workspace_config).with_workspace()
    run_deploy(azure, greeter, managed=True)
    sent = [c.body["properties"] for c in azure.ml.calls if (c.operation, c.method) == ("models", "create_or_update")]
    assert [p["description"] for p in sent] == ["TensorFlow SavedModel colors/1, served by score.py",
                                                 "model folder models (1 file), served by score.py"]
    assert [p["description"] for p in sent] == [plan.model_description(s) for s in (settings, greeter)]

# --- failures, as a user meets them ---------------------------------------------------------------------------

def test_authentication_failure_tries_the_credential_once_and_creates_nothing(settings):
    credential = Credential(fail=True)
    with pytest.raises(DeployError) as e:
        azure_v2.connect(settings, credential)
    assert credential.calls == 1
    assert "az login" in e.value.message and "Nothing was created." in e.value.message
    assert "teardown" not in e.value.message


def test_a_failure_with_nothing_created_gives_no_teardown_hint(azure, settings):
    from azure.core.exceptions import HttpResponseError

    azure.ml.fail[("models", "create_or_update")] = HttpResponseError("(AuthorizationFailed) no access")
    with pytest.raises(DeployError) as e:
        run_deploy(azure, settings, managed=True)
    assert "Created so far: nothing." in e.value.message and "teardown" not in e.value.message


def test_quota_failure_says_what_was_created_and_how_to_delete_it(azure, https):
    from azure.core.exceptions import HttpResponseError

    azure.ml.fail[("online_deployments", "begin_create_or_update")] = Poller(
        error=HttpResponseError("(QuotaExceeded) not enough NCASv3_T4 cores"))
    with pytest.raises(DeployError) as e:
        run_deploy(azure, https)
    message = e.value.message
    assert "GPU quota" in message and f"endpoint {ENDPOINT}" in message and "model colors:1" in message
    assert "AKS cluster scorehost-gpu" in message and "--cluster --delete-cluster" in message
    assert "get-logs" in message


def test_a_failed_deployment_beside_a_live_one_is_named_and_the_endpoint_never_offered(azure, https, tmp_path):
    """What a failed run created is named before it started (the failed deployment exists in Azure), and its removal
    is that deployment alone: the endpoint with live blue was there before."""
    import shutil

    from azure.core.exceptions import HttpResponseError

    run_deploy(azure, https)
    azure.ml.fail[("online_deployments", "begin_create_or_update")] = Poller(
        error=HttpResponseError("(ImagePullFailed) the image could not be pulled"))
    with pytest.raises(DeployError) as e:  # the model exists: the deployment is all this run made
        run_deploy(azure, dataclasses.replace(https, deployment="green"))
    message = e.value.message
    assert f"Created so far: deployment {ENDPOINT}/green." in message
    assert f"scorehost deploy teardown --endpoint {ENDPOINT} --only-deployment green --yes" in message
    assert f"--endpoint {ENDPOINT} --yes" not in message
    changed = tmp_path / "model"
    shutil.copytree(https.model_dir, changed)
    (changed / "colors" / "1" / "labels.txt").write_text("other\n")
    with pytest.raises(DeployError) as e:  # a new model version too: archived, never the endpoint
        run_deploy(azure, dataclasses.replace(https, deployment="green", model_dir=str(changed)))
    message = e.value.message
    assert f"Created so far: model colors:2, deployment {ENDPOINT}/green." in message  # green was there: failed
    assert "az ml model archive -n colors --version 2 -g rg-ml -w ws-ml" in message
    assert f"--endpoint {ENDPOINT} --yes" not in message and azure.ml.endpoint_state[ENDPOINT].traffic == {"blue": 100}


def test_two_projects_with_a_models_folder_get_their_own_endpoints(azure, users_own, workspace_config, tmp_path):
    """The default name comes from the script's folder and the model; an endpoint made for another project that
    derives the same name is refused, in one line, unless named with --endpoint."""
    import shutil

    def project(folder):
        if not folder.exists():
            shutil.copytree(users_own, folder)
        return DeploySettings(entry_script=str(folder / "score.py"), model_dir=str(folder / "models"),
                              config_file=workspace_config).with_workspace()

    mine, shop, twin = project(users_own), project(tmp_path / "shop"), project(tmp_path / "elsewhere" / "my")
    assert mine.endpoint.startswith("my-") and shop.endpoint.startswith("shop-") and mine.endpoint != shop.endpoint
    run_deploy(azure, mine, managed=True)
    assert azure.ml.endpoint_state[mine.endpoint].tags[PROJECT_TAG] == mine.project
    assert twin.endpoint == mine.endpoint and twin.project != mine.project
    azure.ml.calls.clear()
    for attempt in (lambda: run_deploy(azure, twin, managed=True),
                    lambda: azure_v2.teardown(azure.clients, twin, detach=False, say=quiet)):
        with pytest.raises(DeployError) as e:
            attempt()
        assert "was not made by scorehost for this project" in e.value.message and "\n" not in e.value.message
        assert f"--endpoint {mine.endpoint}" in e.value.message
    assert azure.ml.writes() == []
    explicit = DeploySettings(entry_script=twin.entry_script, model_dir=twin.model_dir, endpoint=mine.endpoint,
                              config_file=workspace_config).with_workspace()
    assert run_deploy(azure, explicit, managed=True)["deployment"] == "green"  # the user's choice: taken


def test_teardown_and_traffic_find_the_endpoint_deploy_named(azure, users_own, workspace_config):
    """They take the flags that name it (entry script, model directory); a missing endpoint lists what does exist,
    and Azure's errors are one line."""
    from azure.core.exceptions import HttpResponseError

    mine = DeploySettings(entry_script=str(users_own / "score.py"), model_dir=str(users_own / "models"),
                          config_file=workspace_config).with_workspace()
    run_deploy(azure, mine, managed=True)
    run_deploy(azure, dataclasses.replace(mine, deployment="green"), managed=True)
    names = dict(entry_script=mine.entry_script, model_dir=mine.model_dir, config_file=workspace_config)
    azure.ml.fail[("online_endpoints", "begin_create_or_update")] = HttpResponseError(
        "(Conflict) Operation on endpoint is in progress.\nCode: Conflict\nMessage: Operation is in progress.")
    with pytest.raises(DeployError) as e:
        deploy_cli.cmd_traffic(namespace("traffic", shares=["green=10"], **names), azure.clients)
    assert "Operation on endpoint is in progress" in e.value.message and "\n" not in e.value.message
    del azure.ml.fail[("online_endpoints", "begin_create_or_update")]
    assert deploy_cli.cmd_traffic(namespace("traffic", shares=["green=10"], **names), azure.clients) == 0
    with pytest.raises(DeployError) as e:  # the demo's endpoint is not there: what is, is said
        deploy_cli.cmd_traffic(namespace("traffic", shares=["green=10"], config_file=workspace_config), azure.clients)
    assert f"endpoint {endpoint_name('resnet50', WORKSPACE_ID)} does not exist" in e.value.message
    assert f"{mine.endpoint} ({mine.project}; traffic" in e.value.message
    with pytest.raises(DeployError) as e:  # a user's script alone names nothing
        deploy_cli.cmd_teardown(namespace("teardown", entry_script=mine.entry_script, config_file=workspace_config,
                                          yes=True, cluster=False, only_deployment=None, delete_cluster=False))
    assert "--model-dir" in e.value.message
    args = namespace("teardown", yes=True, cluster=False, only_deployment=None, delete_cluster=False, **names)
    assert deploy_cli.cmd_teardown(args, azure.clients) == 0
    assert azure.ml.endpoint_state == {}


@pytest.mark.parametrize("missing", ["workspace", "resource group"])
def test_teardown_in_a_workspace_that_does_not_exist_fails_in_one_line(azure, settings, missing):
    azure.ml.missing = missing
    args = namespace("teardown", model_name="colors", yes=True, cluster=False, only_deployment=None,
                     delete_cluster=False, config_file=settings.config_file)
    with pytest.raises(DeployError) as e:
        deploy_cli.cmd_teardown(args, azure.clients)
    assert e.value.message.startswith("workspace ws-ml was not found in resource group rg-ml")
    assert "\n" not in e.value.message and azure.ml.writes() == [] and azure.arm.requests == []


def test_teardown_of_a_managed_endpoint_that_is_gone_reads_no_cluster(azure, settings, capsys):
    args = namespace("teardown", model_name="colors", yes=True, cluster=False, only_deployment=None,
                     delete_cluster=False, config_file=settings.config_file)
    assert deploy_cli.cmd_teardown(args, azure.clients) == 0
    assert azure.arm.requests == [] and "has no endpoint made by scorehost" in capsys.readouterr().out
    azure.arm.refuse[CLUSTER_PATH.lower()] = (403, "AuthorizationFailed")  # --cluster reads it: refused in one line
    with pytest.raises(DeployError) as e:
        deploy_cli.cmd_teardown(argparse.Namespace(**{**vars(args), "cluster": True}), azure.clients)
    assert "AuthorizationFailed" in e.value.message and "\n" not in e.value.message


@pytest.mark.parametrize("flags,said", [
    (("managed", "--request-timeout-ms", "180001"), "over the 180000 ms Azure ML allows on a managed online endpoint"),
    (("aks", "--sdk", "v1", "--endpoint", "MyService"), "SDK v1 service names are lowercase: --endpoint myservice"),
    (("aks", "--cpu", "half"), "cpu 'half' is not a Kubernetes quantity"),
    (("aks", "--memory", "4GB"), "memory '4GB' is not a Kubernetes quantity"),
])
def test_settings_azure_would_refuse_late_are_refused_first(azure, colors_model, workspace_config, flags, said):
    """Refused in one line when the settings are read, before anything is created (not after the model and the
    endpoint exist)."""
    command, *rest = flags
    done = scorehost_cli("deploy", command, "--yes", "--skip-parity", "--model-dir", colors_model, "--config-file",
                         workspace_config, *rest, *(("--allow-insecure",) if command == "aks" else ()))
    assert done.returncode == 1 and said in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert DeploySettings(cpu="500m", memory="512Mi", target="managed", request_timeout_ms=180000).memory == "512Mi"


def test_deployment_that_never_becomes_healthy_times_out_clearly(azure, settings):
    azure.ml.fail[("online_deployments", "begin_create_or_update")] = "never"
    with pytest.raises(DeployError) as e:
        azure_v2.deploy(azure.clients, settings, managed=True, say=quiet, timeout_s=0.05, poll_s=0)
    assert "not done after" in e.value.message and "get-logs" in e.value.message


def test_sku_not_available_is_explained():
    from azure.core.exceptions import HttpResponseError

    assert "not available in this region" in azure_v2.explain(HttpResponseError("SkuNotAvailable: NC4as_T4_v3"))


def test_the_workspace_config_json_is_found_as_the_sdk_finds_it(tmp_path, monkeypatch):
    """As MLClient.from_config: from the current directory up, .azureml/config.json before a plain config.json (a
    server settings file of the same name, say, in the project's folder); a path given is taken as it is."""
    project = tmp_path / "project"
    (project / "src" / "deep").mkdir(parents=True)
    (project / ".azureml").mkdir()
    workspace = project / ".azureml" / "config.json"
    workspace.write_text(json.dumps({"subscription_id": SUBSCRIPTION, "resource_group": "rg-ml",
                                     "workspace_name": "ws-ml"}))
    (project / "config.json").write_text(json.dumps({"SCORING_TIMEOUT_MS": 5000}))
    monkeypatch.chdir(project / "src" / "deep")
    s = DeploySettings().with_workspace()
    assert s.workspace_id == WORKSPACE_ID and s.config_file == str(workspace)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(DeployError, match="nor one in a parent folder or an .azureml/ folder"):
        DeploySettings().with_workspace()
    with pytest.raises(DeployError, match="is not an Azure ML workspace config"):  # a path given is that file alone
        DeploySettings(config_file=str(project / "config.json")).with_workspace()


def test_missing_config_json_is_a_clear_error(colors_model, tmp_path):
    done = scorehost_cli("deploy", "aks", "--yes", "--allow-insecure", "--model-dir", colors_model,
                         "--config-file", str(tmp_path / "config.json"), cwd=tmp_path)
    assert done.returncode == 1 and "Download config file" in done.stderr and "Traceback" not in done.stderr


def test_a_config_json_of_server_settings_is_not_read_as_the_workspace(colors_model, tmp_path):
    """config.json is two files: Azure ML's workspace config (read by deploy, from the current directory) and
    azmlinfsrv's server settings (read by `serve` and by azmlinfsrv, from the app root, by default the same directory).
    deploy reads one only for the workspace's keys, and says in one line what another is; serve ignores the workspace's
    keys, as azmlinfsrv does (it reads its own upper-case names alone)."""
    from server import settings as server_settings

    server_config = tmp_path / "config.json"
    server_config.write_text(json.dumps({"AZUREML_ENTRY_SCRIPT": "score.py", "SCORING_TIMEOUT_MS": 5000}))
    done = scorehost_cli("deploy", "teardown", "--yes", cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == (
        f"No workspace given and {server_config} is not an Azure ML workspace config, with no subscription_id, "
        "resource_group, workspace_name; config.json is also azmlinfsrv's server settings file: pass --config-file "
        "with the workspace's config.json (Azure ML studio: workspace page -> 'Download config file'), or "
        "--subscription-id, --resource-group and --workspace.")
    done = scorehost_cli("deploy", "plan", "--no-load-check", "--model-dir", colors_model, cwd=tmp_path)
    assert done.returncode == 0 and f"no workspace yet ({server_config} is not an Azure ML workspace config" in \
        done.stdout, done.stdout + done.stderr
    # The flags complete what the file lacks: a config.json with only the workspace's name is enough beside them.
    server_config.write_text(json.dumps({"workspace_name": "ws-ml", "SCORING_TIMEOUT_MS": 5000}))
    s = DeploySettings(config_file=str(server_config), subscription_id=SUBSCRIPTION, resource_group="rg-ml")
    assert s.with_workspace().workspace_id == WORKSPACE_ID
    # The other way round: serve (as azmlinfsrv) finds the workspace's config.json and takes nothing from it.
    server_config.write_text(json.dumps({"subscription_id": SUBSCRIPTION, "resource_group": "rg-ml",
                                         "workspace_name": "ws-ml"}))
    assert server_settings.config_file(None, str(tmp_path), "score.py") == (str(server_config), {})

def test_deploy_without_its_packages_says_what_to_install(tmp_path):
    """As in an environment with only the `tf` extra: the Azure SDK and kubernetes cannot be imported."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nfor name in ('azure', 'kubernetes', 'yaml', 'locust', 'matplotlib'):\n"
                       "    sys.modules[name] = None\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for command, extra in ((("deploy", "aks", "--yes"), "deploy"), (("deploy", "teardown", "--yes"), "deploy"),
                           (("deploy", "k8s", "--out", str(tmp_path / "k"), "--image", "r.io/x:1"), "deploy"),
                           (("deploy", "plan",), "deploy"), (("bench",), "bench")):
        done = scorehost_cli(*command, env=env)
        lines = done.stderr.strip().splitlines()
        assert done.returncode in (1, 2) and len(lines) == 1, done.stderr
        assert f"pip install -e '.[{extra}]'" in lines[0] and "Traceback" not in done.stderr
        if command[:2] == ("deploy", "aks"):
            assert "needs azure-ai-ml, azure-identity, azure-mgmt-containerservice, " \
                   "azure-mgmt-kubernetesconfiguration, azure-mgmt-resource, kubernetes, pyyaml:" in lines[0]


# --- teardown -------------------------------------------------------------------------------------------------

def test_teardown_says_what_still_bills_and_deletes_a_cluster_scorehost_made(azure, https):
    run_deploy(azure, https)
    said = []
    deleted = azure_v2.teardown(azure.clients, https, detach=True, delete_cluster=lambda: False, say=said.append)
    assert deleted == [f"endpoint {ENDPOINT}", "compute gpu-aks (detached)"]
    billing = said[-1]
    for item in ("node pool system: 1 x Standard_D4s_v5", "node pool gpupool: 3 x Standard_NC4as_T4_v3",
                 "OS disks", "load balancer and its public IP", "Azure ML extension", "MC_rg-ml_scorehost-gpu",
                 "scorehost created this cluster", "--delete-cluster", "model colors"):
        assert item in billing, billing
    assert [c.kwargs for c in azure.ml.calls if c.method == "begin_delete"] == [
        {"name": ENDPOINT}, {"name": "gpu-aks", "action": "Detach"}]
    assert azure.arm.writes("DELETE") == []

    deleted = azure_v2.teardown(azure.clients, https, detach=True, delete_cluster=lambda: True, say=said.append)
    assert deleted == ["AKS cluster scorehost-gpu"]
    assert [(r.method, r.path) for r in azure.arm.writes("DELETE")] == [("DELETE", CLUSTER_PATH)]
    assert "node pool" not in said[-1]


def test_teardown_of_a_managed_endpoint_touches_no_cluster(azure, settings):
    run_deploy(azure, settings, managed=True)
    said = []
    assert azure_v2.teardown(azure.clients, settings, detach=True, say=said.append) == [f"endpoint {ENDPOINT}"]
    assert azure.arm.requests == [] and "node pool" not in said[-1] and "model colors" in said[-1]


def test_teardown_leaves_a_cluster_it_did_not_create(azure, https):
    run_deploy(azure, https)
    azure.arm.resources[CLUSTER_PATH.lower()]["tags"] = {}  # as if it was there before scorehost
    said = []
    azure_v2.teardown(azure.clients, https, detach=False, delete_cluster=lambda: True, say=said.append)
    assert azure.arm.writes("DELETE") == [] and "scorehost did not create this cluster" in said[-1]


def test_teardown_of_one_deployment_refuses_while_it_takes_traffic(azure, https):
    run_deploy(azure, https)
    run_deploy(azure, dataclasses.replace(https, deployment="green"))
    with pytest.raises(DeployError):
        azure_v2.teardown(azure.clients, https, detach=False, only_deployment="blue", say=quiet)
    assert azure_v2.teardown(azure.clients, https, detach=False, only_deployment="green", say=quiet) == [
        f"deployment {ENDPOINT}/green"]
    assert (ENDPOINT, "blue") in azure.ml.deployment_state


@pytest.mark.parametrize("answer,deletes", [("n", False), ("", False), ("y", True)])
def test_teardown_asks_before_deleting(azure, https, monkeypatch, capsys, answer, deletes):
    run_deploy(azure, https)
    azure.ml.calls.clear()
    monkeypatch.setattr("builtins.input", lambda prompt: answer)
    args = namespace("teardown", model_name="colors", yes=False, cluster=False, only_deployment=None,
                     delete_cluster=False, config_file=https.config_file)
    assert deploy_cli.cmd_teardown(args, azure.clients) == (0 if deletes else 1)
    assert bool(azure.ml.writes()) == deletes
    if deletes:  # the second question, about the cluster, got the same answer: yes
        assert "AKS cluster scorehost-gpu" in capsys.readouterr().out
        assert [r.method for r in azure.arm.writes("DELETE")] == ["DELETE"]


# --- plain Kubernetes ---------------------------------------------------------------------------------------

def test_k8s_manifests_validate_offline_with_the_model_in_the_image(tmp_path, colors_model):
    import kubernetes_validate

    from test_dockerfile import hadolint

    done = scorehost_cli("deploy", "k8s", "--out", str(tmp_path), "--instance-count", "2", "--model-dir",
                         colors_model, "--image", "myregistry.azurecr.io/scorehost-colors:1")
    assert done.returncode == 0, done.stderr
    assert "names no registry" not in done.stdout
    kinds = {}
    for name in sorted(os.listdir(tmp_path)):
        if not name.endswith(".yaml"):  # Dockerfile, and the image's build context: code/, model/
            continue
        text = (tmp_path / name).read_text()
        assert "&id" not in text and "*id" not in text  # no YAML anchors
        manifest = yaml.safe_load(text)
        kubernetes_validate.validate(manifest, "1.32.0", strict=True)
        kinds[manifest["kind"]] = manifest
    assert set(kinds) == {"Deployment", "Service", "Secret", "HorizontalPodAutoscaler"}  # no volume to provision
    assert stat.S_IMODE(os.stat(tmp_path / "secret.yaml").st_mode) == 0o600
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == "myregistry.azurecr.io/scorehost-colors:1" and "volumes" not in pod
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert container["resources"]["requests"]["cpu"] == "2" and container["livenessProbe"]["httpGet"]["port"] == 5001
    assert container["livenessProbe"]["httpGet"]["path"] == "/"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["env"][0]["valueFrom"]["secretKeyRef"]["name"] == kinds["Secret"]["metadata"]["name"]
    assert kinds["Deployment"]["spec"]["replicas"] == 2

    dockerfile = (tmp_path / "Dockerfile").read_text()
    assert f'COPY --chown=1000 ["model/", "{k8s.MODEL_MOUNT}/{os.path.basename(colors_model)}/"]' in dockerfile
    assert "FROM scorehost:gpu" in dockerfile
    assert f"docker build -f {tmp_path / 'Dockerfile'} -t myregistry.azurecr.io/scorehost-colors:1 {tmp_path}" \
        in dockerfile and "docker push myregistry.azurecr.io/scorehost-colors:1" in dockerfile
    lint = subprocess.run([hadolint(), str(tmp_path / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout


def test_k8s_bakes_the_users_own_script_and_model_and_asks_for_no_more_gpus_than_there_are(tmp_path, users_own):
    out = tmp_path / "k8s"
    done = scorehost_cli("deploy", "k8s", "--entry-script", str(users_own / "score.py"), "--model-dir",
                         str(users_own / "models"), "--image", "myregistry.azurecr.io/greeter:1", "--out", str(out),
                         "--instance-count", "3", "--cluster-gpus", "4")
    assert done.returncode == 0, done.stderr
    assert f"entry script: {users_own / 'score.py'}" in done.stdout
    assert f"model directory: {users_own / 'models'}" in done.stdout
    assert (out / "code" / "score.py").read_bytes() == (users_own / "score.py").read_bytes()
    assert (out / "model" / "greeter" / "3" / "greeting.txt").read_text() == "bonjour\n"
    dockerfile = (out / "Dockerfile").read_text()
    assert f"ENV AML_APP_ROOT={k8s.APP_ROOT}/code AZUREML_ENTRY_SCRIPT=score.py" in dockerfile
    assert f"COPY --chown=1000 code/ {k8s.APP_ROOT}/code/" in dockerfile
    hpa = yaml.safe_load((out / "hpa.yaml").read_text())["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 4)  # 4 GPUs hold 4 instances of 1 GPU, not 6
    name = yaml.safe_load((out / "deployment.yaml").read_text())["metadata"]["name"]
    assert name == "my-greeter"  # its folder's name, then its model's
    assert "nvidia.com/gpu" in done.stdout and k8s.DEVICE_PLUGIN in done.stdout
    # Without --cluster-gpus it asks for exactly what it was given; fewer GPUs than instances is refused.
    scorehost_cli("deploy", "k8s", "--model-dir", str(users_own / "models"), "--entry-script",
                  str(users_own / "score.py"), "--image", "r.io/g:1", "--out", str(out))
    hpa = yaml.safe_load((out / "hpa.yaml").read_text())["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (3, 3)
    done = scorehost_cli("deploy", "k8s", "--model-dir", str(users_own / "models"), "--entry-script",
                         str(users_own / "score.py"), "--image", "r.io/g:1", "--out", str(out), "--cluster-gpus", "2")
    assert done.returncode == 1 and "--cluster-gpus 2 cannot hold 3 instances" in done.stderr


def test_k8s_bakes_the_scripts_folder_and_a_copy_of_the_model(with_a_module, tmp_path):
    """The build context is a snapshot: the script's folder (less what is not code, the model and the output folder
    itself with its Secret), and the model's files copied, not linked to the originals."""
    my = with_a_module
    for out in (tmp_path / "k8s", my / "k8s"):
        done = scorehost_cli("deploy", "k8s", "--entry-script", str(my / "score.py"), "--model-dir", str(my / "models"),
                             "--image", "r.io/g:1", "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert sorted(os.listdir(out / "code")) == ["myenv.yml", "mylib.py", "score.py"]
        assert f"code folder: {my}" in done.stdout
        baked = out / "model" / "greeter" / "3" / "greeting.txt"
        original = my / "models" / "greeter" / "3" / "greeting.txt"
        assert os.stat(baked).st_ino != os.stat(original).st_ino and os.stat(original).st_nlink == 1
        baked.write_text("edited in the build context\n")
        assert original.read_text() == "bonjour\n"
    for out in (my, tmp_path):  # the script's folder itself; a folder whose model/ would be replaced
        if out == tmp_path:
            os.rename(my / "models", tmp_path / "model")
        done = scorehost_cli("deploy", "k8s", "--entry-script", str(my / "score.py"), "--model-dir",
                             str(tmp_path / "model" if out == tmp_path else my / "models"), "--image", "r.io/g:1",
                             "--out", str(out))
        assert done.returncode == 1 and "holds the entry script or the model" in done.stderr, done.stderr
    assert (tmp_path / "model" / "greeter" / "3" / "greeting.txt").read_text() == "bonjour\n"


def test_k8s_ships_the_reference_score_py_alone(tmp_path, colors_model):
    done = scorehost_cli("deploy", "k8s", "--out", str(tmp_path), "--image", "r.io/g:1", "--model-dir", colors_model)
    assert done.returncode == 0, done.stderr
    assert os.listdir(tmp_path / "code") == ["score.py"]


# A user's own stack, which the base image's environment (the reference score.py's TensorFlow) does not have.
SKLEARN_ENV = """\
name: my-sklearn
channels:
  - conda-forge
dependencies:
  - python=3.11
  - pip
  - pip:
      - scikit-learn==1.5.2
      - pandas==2.2.3
      - joblib==1.4.2
"""


def test_k8s_builds_the_scripts_own_environment_from_its_conda_file(users_own, tmp_path, colors_model):
    """The base image's environment is myenv.yml's: a script with another conda file gets an environment built from
    it, with scorehost installed into it and first on PATH (as Azure ML builds the script's environment and adds its
    inference server); the reference score.py keeps the base image's. A conda file Azure ML could not build from, or
    with a python scorehost does not support, is refused in one line."""
    from test_dockerfile import hadolint

    (users_own / "myenv.yml").write_text(SKLEARN_ENV)
    out = tmp_path / "k8s"
    done = scorehost_cli("deploy", "k8s", "--entry-script", str(users_own / "score.py"), "--model-dir",
                         str(users_own / "models"), "--image", "r.io/g:1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert (out / k8s.CONDA_FILE).read_text() == SKLEARN_ENV
    dockerfile = (out / "Dockerfile").read_text()
    build = ("RUN micromamba create --yes --prefix /opt/user-env --file /tmp/conda.yml \\\n"
             "    && /opt/user-env/bin/python -m pip install --no-cache-dir '/opt/scorehost[gpu]' \\\n")
    assert f"USER 0\nCOPY {k8s.CONDA_FILE} /tmp/conda.yml\n{build}" in dockerfile
    assert "ENV PATH=/opt/user-env/bin:$PATH\nUSER 1000\n" in dockerfile
    assert dockerfile.index("ENV PATH=/opt/user-env") < dockerfile.index("COPY --chown=1000 code/")
    lint = subprocess.run([hadolint(), str(out / "Dockerfile")], capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout
    # The reference score.py with the repository's myenv.yml: the base image's environment as it is.
    done = scorehost_cli("deploy", "k8s", "--out", str(out), "--image", "r.io/g:1", "--model-dir", colors_model)
    assert done.returncode == 0, done.stderr
    assert "micromamba" not in (out / "Dockerfile").read_text() and not (out / k8s.CONDA_FILE).exists()
    # A conda file with a python scorehost does not run on; none at all.
    (users_own / "myenv.yml").write_text("dependencies:\n  - python=3.10\n  - scikit-learn\n")
    done = scorehost_cli("deploy", "k8s", "--entry-script", str(users_own / "score.py"), "--model-dir",
                         str(users_own / "models"), "--image", "r.io/g:1", "--out", str(out))
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert f"conda file {users_own / 'myenv.yml'}: python=3.10, but scorehost needs python>=3.11" in done.stderr
    assert "azureml-inference-server-http" not in done.stderr
    (users_own / "myenv.yml").unlink()
    done = scorehost_cli("deploy", "k8s", "--entry-script", str(users_own / "score.py"), "--model-dir",
                         str(users_own / "models"), "--image", "r.io/g:1", "--out", str(out))
    assert done.returncode == 1 and "has no myenv.yml beside it; pass --conda-file FILE" in done.stderr


def test_k8s_waits_for_init_before_liveness_and_sends_no_key_to_the_build(users_own, tmp_path):
    """A worker answers GET / only once init() has run, for up to --init-timeout: the startup probe waits that long,
    and liveness starts only after it. The build context holds secret.yaml: its .dockerignore sends what the
    Dockerfile copies and nothing else (Docker's rule: the last pattern that matches a path, or a folder above it,
    decides)."""
    from server.settings import BY_NAME

    out = tmp_path / "k8s"
    (users_own / "myenv.yml").write_text(SKLEARN_ENV)
    done = scorehost_cli("deploy", "k8s", "--entry-script", str(users_own / "score.py"), "--model-dir",
                         str(users_own / "models"), "--image", "r.io/g:1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    container = yaml.safe_load((out / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"][0]
    startup, liveness = container["startupProbe"], container["livenessProbe"]
    assert startup["httpGet"] == liveness["httpGet"] == {"path": "/", "port": 5001}
    assert startup["initialDelaySeconds"] == DeploySettings().liveness_initial_delay_s
    assert startup["periodSeconds"] * startup["failureThreshold"] >= BY_NAME["init_timeout"].default
    assert liveness["initialDelaySeconds"] == 0  # counted once the startup probe has passed

    patterns = [line for line in (out / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]

    def sent(path: str) -> bool:
        parts, decision = path.split("/"), True
        for pattern in patterns:
            negated, glob = pattern.startswith("!"), pattern.lstrip("!")
            if any(fnmatch.fnmatch("/".join(parts[:i]), glob) for i in range(1, len(parts) + 1)):
                decision = negated
        return decision

    files = sorted(os.path.relpath(os.path.join(folder, name), out) for folder, _, names in os.walk(out)
                   for name in names)
    copied = {re.split(r'[ "/\]]+', line.split("COPY ", 1)[1].replace("--chown=1000 ", "").lstrip('["'))[0]
              for line in (out / "Dockerfile").read_text().splitlines() if line.startswith("COPY")}
    assert copied == {"code", "model", os.path.dirname(k8s.CONDA_FILE)}
    assert [f for f in files if sent(f)] == [f for f in files if f.split("/")[0] in copied]
    assert "secret.yaml" in files and not sent("secret.yaml")


def test_deploy_out_never_overwrites_a_folder_of_the_users_own(users_own, tmp_path):
    """`--out .` at a project's root would replace its model/ and code/ folders and its Dockerfile: a folder that is
    not empty is refused in one line unless scorehost wrote it (its marker file), which a rerun may rewrite."""
    import shutil

    repo = tmp_path / "repo"
    shutil.copytree(users_own, repo / "src")
    for name, text in (("model/train.py", "train"), ("code/README", "readme"), ("Dockerfile", "FROM mine"),
                       ("deployment.yaml", "mine: true")):
        (repo / name).parent.mkdir(exist_ok=True)
        (repo / name).write_text(text)
    before = {p: p.read_text() for p in repo.rglob("*") if p.is_file()}
    flags = ("--entry-script", "src/score.py", "--model-dir", "src/models", "--out", ".")
    done = scorehost_cli("deploy", "k8s", "--image", "r.io/g:1", *flags, cwd=repo)
    assert done.returncode == 1 and done.stderr.strip() == (
        "scorehost deploy k8s: --out . is not empty and was not written by scorehost (it has no .scorehost-output); "
        "what is there would be overwritten: give a new or empty folder")
    done = scorehost_cli("deploy", "plan", "--no-load-check", "--endpoint", "my-greeter", *flags, cwd=repo)
    assert done.returncode == 1 and "  - --out . is not empty and was not written by scorehost" in done.stdout
    assert "Written" not in done.stdout and "Traceback" not in done.stderr
    assert {p: p.read_text() for p in repo.rglob("*") if p.is_file()} == before
    with pytest.raises(DeployError, match="not empty"):
        k8s.write(DeploySettings(entry_script=str(repo / "src" / "score.py"), model_dir=str(repo / "src" / "models"),
                                 endpoint="my-greeter"), str(repo), "r.io/g:1")
    # A new or empty folder, then the same folder again.
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "empty", tmp_path / "empty", tmp_path / "new"):
        done = scorehost_cli("deploy", "k8s", "--image", "r.io/g:1", "--entry-script", str(users_own / "score.py"),
                             "--model-dir", str(users_own / "models"), "--out", str(out), "--no-load-check")
        assert done.returncode == 0, done.stderr


def test_kubectl_apply_of_the_k8s_folder_reads_manifests_alone(users_own, tmp_path):
    """Step 3, `kubectl apply -f OUT`, reads every .json, .yaml and .yml at OUT's top as a manifest (not below it):
    the build context's conda file must not be one of them."""
    import kubernetes_validate

    (users_own / "myenv.yml").write_text(SKLEARN_ENV)
    out = tmp_path / "k8s"
    done = scorehost_cli("deploy", "k8s", "--entry-script", str(users_own / "score.py"), "--model-dir",
                         str(users_own / "models"), "--image", "r.io/g:1", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"kubectl apply -f {out} " in done.stdout and (out / k8s.CONDA_FILE).read_text() == SKLEARN_ENV
    read_by_kubectl = [name for name in os.listdir(out) if name.endswith((".json", ".yaml", ".yml"))]
    assert sorted(read_by_kubectl) == ["deployment.yaml", "hpa.yaml", "secret.yaml", "service.yaml"]
    for name in read_by_kubectl:
        kubernetes_validate.validate(yaml.safe_load((out / name).read_text()), "1.32.0", strict=True)


def test_k8s_checks_that_the_script_loads_its_model_where_the_image_puts_it(users_own, tmp_path):
    """The image lays the model out as Azure ML does ($AZUREML_MODEL_DIR/<folder's name>/): a script that reads the
    folder itself would crash-loop there, so `deploy k8s` refuses it with `deploy plan`'s own line."""
    flat = users_own / "score.py"
    flat.write_text(USER_SCRIPT.replace('"**", "greeter"', '"greeter"').replace(", recursive=True", ""))
    s = DeploySettings(entry_script=str(flat), model_dir=str(users_own / "models"))
    out = tmp_path / "k8s"
    done = scorehost_cli("deploy", "k8s", "--entry-script", str(flat), "--model-dir", str(users_own / "models"),
                         "--image", "r.io/g:1", "--out", str(out))
    assert done.returncode == 1 and done.stderr.strip() == "scorehost deploy k8s: " + plan.problems(s)[0]
    assert "Azure ML keeps the registered folder's name" in done.stderr and not out.exists()
    assert scorehost_cli("deploy", "k8s", "--entry-script", str(flat), "--model-dir", str(users_own / "models"),
                         "--image", "r.io/g:1", "--out", str(out), "--no-load-check").returncode == 0


def test_k8s_keeps_the_key_of_the_secret_it_wrote_before(users_own, tmp_path, capsys):
    """Pods whose template did not change keep the key they started with after a re-apply: a rerun keeps it."""
    s = DeploySettings(entry_script=str(users_own / "score.py"), model_dir=str(users_own / "models")).named(False)
    out = tmp_path / "k8s"

    def key() -> str:
        return base64.b64decode(yaml.safe_load((out / "secret.yaml").read_text())["data"]["key"]).decode()

    k8s.write(s, str(out), "r.io/g:1")
    first = key()
    assert "API key" not in capsys.readouterr().out
    k8s.write(s, str(out), "r.io/g:2")
    assert key() == first and f"API key: kept from {out / 'secret.yaml'}" in capsys.readouterr().out
    (out / "secret.yaml").unlink()
    k8s.write(s, str(out), "r.io/g:2")
    assert key() != first
    (out / "secret.yaml").write_text("not: a secret\n")
    with pytest.raises(DeployError, match="holds no API key to keep"):
        k8s.write(s, str(out), "r.io/g:2")


def test_k8s_refuses_zero_gpus_saying_why(users_own, tmp_path):
    done = scorehost_cli("deploy", "k8s", "--entry-script", str(users_own / "score.py"), "--model-dir",
                         str(users_own / "models"), "--image", "r.io/g:1", "--out", str(tmp_path / "k8s"), "--gpus",
                         "0")
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1
    assert done.stderr.startswith("scorehost deploy k8s: gpus must be at least 1: scorehost deploys to GPUs only")


def test_k8s_says_when_the_image_names_no_registry(tmp_path, colors_model):
    done = scorehost_cli("deploy", "k8s", "--out", str(tmp_path), "--image", "scorehost:gpu", "--model-dir",
                         colors_model)
    assert done.returncode == 0 and "names no registry" in done.stdout
    assert scorehost_cli("deploy", "k8s", "--out", str(tmp_path)).returncode == 2  # --image is required


@pytest.mark.parametrize("command,absent,present", [
    ("k8s", ("--vm-size", "--create-cluster", "--subscription-id", "--ssl-cname", "--traffic"), ("--image", "--gpus")),
    ("managed", ("--create-cluster", "--instance-type", "--ssl-cname", "--gpus", "--image"),
     ("--vm-size", "--traffic", "--deployment")),
    ("aks", ("--image", "--target"), ("--create-cluster", "--ssl-cname", "--allow-insecure", "--traffic")),
    ("traffic", ("--vm-size", "--create-cluster", "--deployment"), ("--endpoint", "--model-dir", "--entry-script")),
    ("teardown", ("--vm-size", "--create-cluster"), ("--endpoint", "--model-dir", "--entry-script")),
])
def test_help_lists_only_the_flags_that_apply(command, absent, present):
    done = scorehost_cli("deploy", command, "--help")
    assert done.returncode == 0
    for flag in absent:
        assert flag not in done.stdout, (command, flag)
    for flag in present:
        assert flag in done.stdout, (command, flag)


# --- parity ---------------------------------------------------------------------------------------------------

def test_parity_passes_against_a_second_local_server(start_server, colors_model):
    first = start_server("scorehost", REFERENCE_SCRIPT, colors_model)
    second = start_server("aihs", REFERENCE_SCRIPT, colors_model)
    done = scorehost_cli("parity", second.url, "--local", first.url)
    assert done.returncode == 0, done.stdout
    assert "all answers match" in done.stdout and "DIFF" not in done.stdout


def test_parity_fails_on_a_different_model(start_server, colors_model, tmp_path):
    from scorehost.models import build_colors
    import keras

    other = tmp_path / "other"
    keras.utils.set_random_seed(7)
    build_colors(str(other), version="2")
    first = start_server("scorehost", REFERENCE_SCRIPT, colors_model)
    second = start_server("scorehost", REFERENCE_SCRIPT, str(other))
    done = scorehost_cli("parity", second.url, "--local", first.url)
    assert done.returncode == 1 and "DIFF" in done.stdout and ".version" in done.stdout


def test_parity_against_a_keyed_endpoint_without_the_key_is_one_line(start_server, colors_model):
    keyed = start_server("scorehost", REFERENCE_SCRIPT, colors_model, env={"SCOREHOST_AUTH_KEY": "sekrit"})
    local = start_server("scorehost", REFERENCE_SCRIPT, colors_model)
    for flags, words in (((), "it needs a key: pass --key"), (("--key", "wrong"), "the key was refused")):
        done = scorehost_cli("parity", keyed.url, "--local", local.url, *flags)
        assert done.returncode == 1 and "answered 401" in done.stderr and words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1 and "DIFF" not in done.stdout
    done = scorehost_cli("parity", keyed.url, "--local", local.url, "--key", "sekrit", "--deployment", "green")
    assert done.returncode == 0 and "all answers match" in done.stdout  # the deployment header is harmless here


def test_parity_against_an_unreachable_url_is_one_line(start_server, colors_model):
    local = start_server("scorehost", REFERENCE_SCRIPT, colors_model)
    done = scorehost_cli("parity", f"http://127.0.0.1:{processes.free_port()}", "--local", local.url)
    assert done.returncode == 1 and "cannot reach http://127.0.0.1:" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr


def test_parity_sends_the_deployment_header():
    from fake_azure import plain_endpoint

    with plain_endpoint() as (url, seen):
        assert parity.send(url + "/score", parity.labelled()[0], "k", deployment="green") == (200, {})
    headers = seen[0][1]
    assert headers["Azureml-model-deployment"] == "green" and headers["Authorization"] == "Bearer k"


def test_parity_diff_tolerates_last_digits():
    assert parity.diff({"p": 0.51234, "request_id": "a"}, {"p": 0.5125, "request_id": "b"}) == []
    assert parity.diff({"p": 0.5}, {"p": 0.6}) == [".p: 0.5 != 0.6 (tolerance 0.001)"]


def test_parity_checks_the_endpoint_before_starting_a_local_server(monkeypatch, start_server, colors_model):
    """Unreachable, or keyed without a key: said at once, without waiting for a local server to start."""
    keyed = start_server("scorehost", REFERENCE_SCRIPT, colors_model, env={"SCOREHOST_AUTH_KEY": "sekrit"})

    def no_server(*args, **kwargs):
        raise AssertionError("a local server was started")

    monkeypatch.setattr(processes, "running", no_server)
    for url, words in ((f"http://127.0.0.1:{processes.free_port()}", "cannot reach"), (keyed.url, "needs a key")):
        with pytest.raises(DeployError) as e:
            parity.run(url)
        assert words in e.value.message


def test_parity_without_replay_against_a_users_script_says_to_record_its_requests(start_server, colors_model,
                                                                                 users_own):
    """The corpus is the reference score.py's: a server with another script gets none of its answers right, and
    is told how to replay its own requests instead (here the local side as well as the endpoint)."""
    hint = "these requests are for the reference score.py; for your own script, record its requests with " \
           "`scorehost serve --record DIR` and pass --replay DIR"
    users = start_server("scorehost", str(users_own / "score.py"), str(users_own / "models"))
    reference = start_server("scorehost", REFERENCE_SCRIPT, colors_model)
    done = scorehost_cli("parity", users.url, "--local", reference.url)
    assert done.returncode == 1 and "DIFF" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == f"scorehost parity: {hint}"
    done = scorehost_cli("parity", reference.url, "--local", users.url)
    assert done.returncode == 1 and "is it serving the reference script?" in done.stderr and hint in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_connect_builds_every_client_on_the_one_credential(settings):
    credential = Credential()
    clients = azure_v2.connect(settings, credential)
    assert credential.calls == 1  # the check; the clients ask again only when they send
    assert (clients.ml.subscription_id, clients.ml.resource_group_name, clients.ml.workspace_name) == (
        SUBSCRIPTION, "rg-ml", "ws-ml")
    for client in (clients.clusters, clients.extensions, clients.resources):
        assert client._config.credential is credential and client._config.subscription_id == SUBSCRIPTION


def test_a_managed_deployment_needs_vcpu_quota_with_azures_20_percent_reserve(azure, settings):
    """Issue 19.12: ceil(1.2 x instances) x vCPUs of the VM family must be free ("Manage and increase quotas",
    managed online endpoints); checked before anything is created, with what would fit."""
    azure.ml.vcpus_used["standardNCASv3_T4Family"] = 12  # another deployment holds 12 of the 24
    with pytest.raises(DeployError) as e:
        run_deploy(azure, settings, managed=True)  # 3 instances x 4 vCPUs: ceil(3.6) x 4 = 16 needed, 12 free
    message = e.value.message
    assert "standardNCASv3_T4Family has 12 of 24 vCPUs free" in message and "needs 16" in message
    assert "ceil(1.2 x 3 instances) x 4 vCPUs" in message and "--instance-count 2" in message  # ceil(2.4) x 4 = 12
    assert azure.ml.writes() == []  # refused before anything was created
    azure.ml.vcpus_used["standardNCASv3_T4Family"] = 8  # 16 free: exactly enough
    assert run_deploy(azure, settings, managed=True, check=lambda *a: True)["traffic"] == {"blue": 100}
