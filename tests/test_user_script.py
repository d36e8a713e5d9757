"""`scorehost serve` with a user's own script, the first hour: a script that needs a model directory it was not
given, the one "ready" line in batching mode, and Ctrl-C during the first model build."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from scorehost import models, processes

NEEDS_MODEL_DIR = '''
import os


def init():
    global path
    path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.bin")


def run(data):
    return path
'''

SLOW_BATCH = '''
import time


def init():
    time.sleep(3)  # the model process loads for a while after the HTTP workers are up


def run(data):
    return run_batch([data])[0]


def run_batch(items):
    return [len(items) for _ in items]
'''


def _scorehost(*args: str, env: dict | None = None) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AZUREML_", "AML_"))}
    return subprocess.Popen([processes._bin("scorehost"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})})


def test_a_script_reading_the_model_dir_without_one_is_told_how_to_give_it(tmp_path):
    (tmp_path / "score.py").write_text(NEEDS_MODEL_DIR)
    server = _scorehost("serve", "--entry-script", str(tmp_path / "score.py"), "--port", str(processes.free_port()))
    output, _ = server.communicate(timeout=60)
    assert server.returncode == 3
    assert output.strip().splitlines()[-1] == (
        "scorehost: no model directory was given, and score.py reads AZUREML_MODEL_DIR: pass --model-dir DIR (or "
        "set AZUREML_MODEL_DIR=DIR)")


def _ready(url: str) -> int:
    try:
        with urllib.request.urlopen(url + "/ready", timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def test_the_ready_line_waits_for_the_model_process(tmp_path):
    """With a model process, HTTP workers say 'ready for serving traffic' seconds before /ready turns 200; the
    one line that means ready comes only once it has."""
    (tmp_path / "score.py").write_text(SLOW_BATCH)
    port = processes.free_port()
    server = _scorehost("serve", "--entry-script", str(tmp_path / "score.py"), "--port", str(port), "--workers", "1",
                        "--batch-max", "4", "--access-log", "false")
    url = f"http://127.0.0.1:{port}"
    seen_not_ready = False
    try:
        for line in server.stdout:
            if "scorehost: ready on" in line:
                assert line == f"scorehost: ready on {url}\n"
                assert _ready(url) == 200
                break
            seen_not_ready = seen_not_ready or _ready(url) == 503
        else:
            pytest.fail("no ready line")
        assert seen_not_ready  # the server answered 503 before the line: it was not early
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        rest, _ = server.communicate(timeout=60)
    assert "scorehost: ready on" not in rest  # once


def test_ctrl_c_during_the_first_model_build_is_one_line_and_leaves_no_model(tmp_path):
    server = _scorehost("serve", "--port", str(processes.free_port()), env={"SCOREHOST_HOME": str(tmp_path)})
    assert "building the demo model" in server.stdout.readline()
    time.sleep(5)  # TensorFlow imported, the network being built
    os.killpg(server.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    output, _ = server.communicate(timeout=60)
    assert server.returncode == 130
    assert output.strip() == "scorehost: interrupted" and "Traceback" not in output
    assert os.listdir(tmp_path / "models") == []  # neither resnet50/1 nor the temporary directory


def test_a_model_build_that_fails_half_way_leaves_nothing(tmp_path, monkeypatch):
    def half_built(out_dir: str) -> str:
        os.makedirs(os.path.join(out_dir, "half", "1"))
        raise KeyboardInterrupt

    monkeypatch.setitem(models.BUILDERS, "half", half_built)
    with pytest.raises(KeyboardInterrupt):
        models.build("half", str(tmp_path))
    assert os.listdir(tmp_path) == []
