"""myenv.yml (the cloud and Docker environment) and setup.cfg (the local install) pin the same versions."""

from __future__ import annotations

import configparser
import os
import re
from importlib import metadata

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIN = re.compile(r"^\s*-\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s#]+)")
# The same package under another name: the GPU build in the cloud, the CPU build locally.
SAME = {"tensorflow": "tensorflow-cpu"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def conda_pins() -> dict[str, str]:
    with open(os.path.join(ROOT, "myenv.yml"), encoding="utf-8") as f:
        return {_norm(m[1]): m[2] for line in f if (m := PIN.match(line))}


def setup_pins() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    pins = {}
    sections = [cfg["options"]["install_requires"]] + [cfg["options.extras_require"][e] for e in ("tf", "test")]
    for lines in sections:
        for line in lines.splitlines():
            if "==" in line and not line.strip().startswith("#"):
                name, version = line.strip().split("==")
                pins[_norm(name)] = version
    return pins


def test_the_servers_own_pinned_runtime_reaches_the_conda_file():
    """What scorehost serve pins (the HTTP front's parser) is in myenv.yml too, so Docker and Azure ML get it."""
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    runtime = [line.strip() for line in cfg["options"]["install_requires"].splitlines() if "==" in line]
    assert runtime, "the HTTP front's parser is pinned in install_requires"
    conda = conda_pins()
    for line in runtime:
        name, version = line.split("==")
        assert conda.get(_norm(name)) == version, f"{name}=={version} missing from myenv.yml"


def test_conda_file_pins_python_and_tensorflow_with_cuda():
    with open(os.path.join(ROOT, "myenv.yml"), encoding="utf-8") as f:
        text = f.read()
    assert re.search(r"^\s*-\s*python=3\.11\s*$", text, re.M)
    assert "tensorflow[and-cuda]==" in text
    assert {"numpy", "ujson", "azureml-inference-server-http", "azureml-contrib-services"} <= set(conda_pins())


def test_local_install_uses_the_same_pins():
    local = setup_pins()
    for name, version in conda_pins().items():
        local_name = SAME.get(name, name)
        if local_name in local:
            assert local[local_name] == version, f"{name}: myenv.yml {version}, setup.cfg {local[local_name]}"
    assert "tensorflow-cpu" in local and "azureml-inference-server-http" in local


def test_installed_versions_are_the_pinned_ones():
    for name, version in conda_pins().items():
        try:
            installed = metadata.version(SAME.get(name, name))
        except metadata.PackageNotFoundError:
            continue
        assert installed == version, f"{name}: installed {installed}, pinned {version}"
