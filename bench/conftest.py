"""Fixtures for the in-process micro-benchmarks (`pytest bench/ --benchmark-only`); not part of the test run."""

from __future__ import annotations

import importlib.util
import os

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


@pytest.fixture(scope="session")
def images() -> list[bytes]:
    from scorehost import corpus

    return corpus.images()  # 224x224, 640x480, 1280x720 JPEGs


@pytest.fixture(scope="session")
def score():
    """The reference score.py, initialised in this process on the demo ResNet50 (built once, then cached)."""
    from scorehost import REFERENCE_SCRIPT
    from scorehost.models import demo_model_dir

    os.environ["AZUREML_MODEL_DIR"] = demo_model_dir()
    spec = importlib.util.spec_from_file_location("score_bench", REFERENCE_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.init()
    return module
