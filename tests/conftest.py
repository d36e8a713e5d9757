"""Shared fixtures: real servers as child processes on 127.0.0.1, and the reference models, built once a session."""

from __future__ import annotations

import os
from typing import Callable, Iterator

import pytest

from scorehost import processes

SCRIPTS = os.path.join(os.path.dirname(__file__), "scripts")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


def script(name: str) -> str:
    return os.path.join(SCRIPTS, name)


@pytest.fixture(scope="session")
def start_server() -> Iterator[Callable[..., processes.ServerProcess]]:
    """start_server(kind, script_path, model_dir=None, **kwargs): a healthy server, stopped at the session's end."""
    started: list[processes.ServerProcess] = []

    def start(kind: str, entry_script: str, model_dir: str | None = None, timeout: float = 120,
              **kwargs) -> processes.ServerProcess:
        server = processes.start(kind, entry_script, model_dir, **kwargs)
        started.append(server)
        return server.wait_healthy(timeout)

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def colors_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The small colour classifier in Azure ML's layout; returns the model root (AZUREML_MODEL_DIR)."""
    from scorehost.models import build_colors

    root = tmp_path_factory.mktemp("colors-model")
    build_colors(str(root))
    return str(root)


@pytest.fixture(scope="session")
def resnet_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from scorehost.models import build_resnet50

    root = tmp_path_factory.mktemp("resnet-model")
    build_resnet50(str(root))
    return str(root)
