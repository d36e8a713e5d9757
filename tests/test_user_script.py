"""`scorehost serve` with a user's own script, the first hour: a script that needs a model directory it was not
given, the one "ready" line in batching mode, and Ctrl-C during the first model build."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any

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


def _scorehost(*args: str, env: dict | None = None, **popen: Any) -> subprocess.Popen:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AZUREML_", "AML_"))}
    return subprocess.Popen([processes._bin("scorehost"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**clean, "PYTHONUNBUFFERED": "1", **(env or {})},
                            **popen)


def _served(*args: str, cwd: str, env: dict | None = None, body: bytes = b"{}") -> tuple[bytes, str]:
    """`scorehost serve ARGS` in `cwd`, once ready, answers a POST of `body` (text/plain: urllib's default type is a
    form's) to /score: the answer's body, and what the server printed until ready."""
    port = processes.free_port()
    server = _scorehost("serve", *args, "--port", str(port), cwd=cwd, env=env)
    said = []
    try:
        for line in server.stdout:
            said.append(line)
            if "scorehost: ready on" in line:
                break
        else:
            pytest.fail("no ready line:\n" + "".join(said))
        request = urllib.request.Request(f"http://127.0.0.1:{port}/score", data=body, method="POST",
                                         headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.read(), "".join(said)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.communicate(timeout=60)


def test_a_script_reading_the_model_dir_without_one_is_told_how_to_give_it(tmp_path):
    (tmp_path / "score.py").write_text(NEEDS_MODEL_DIR)
    server = _scorehost("serve", "--entry-script", str(tmp_path / "score.py"), "--port", str(processes.free_port()))
    output, _ = server.communicate(timeout=60)
    assert server.returncode == 3
    assert output.strip().splitlines()[-1] == (
        "scorehost: no model directory was given, and score.py needs one: pass --model-dir DIR (or "
        "set AZUREML_MODEL_DIR=DIR)")


def test_serve_without_an_entry_script_serves_the_score_py_of_the_folder_it_runs_in(tmp_path):
    """A user in their project's folder typing `scorehost serve` means their score.py: the demo was served
    instead, and nothing said so (a first-hour review)."""
    (tmp_path / "score.py").write_text("def init():\n    pass\n\n\ndef run(data):\n    return {'mine': data}\n")
    answer, said = _served(cwd=str(tmp_path), body=b"hi")
    assert answer == b'{"mine": "hi"}'
    assert f"serving {tmp_path / 'score.py'}, the score.py in the app root" in said


def test_a_script_that_does_not_load_ends_with_scorehosts_line_not_gunicorns(tmp_path):
    (tmp_path / "score.py").write_text("def init():\n    raise RuntimeError('no feature store')\n\n\n"
                                       "def run(data):\n    return data\n")
    server = _scorehost("serve", "--entry-script", str(tmp_path / "score.py"), "--port", str(processes.free_port()))
    output, _ = server.communicate(timeout=60)
    assert server.returncode == 3 and "RuntimeError: no feature store" in output
    assert output.strip().splitlines()[-1] == (f"scorehost: The entry script {tmp_path / 'score.py'} failed to load "
                                               "or init() raised: RuntimeError: no feature store")


def test_a_module_beside_a_script_in_a_subfolder_is_not_on_sys_path_as_under_azure_ml(tmp_path):
    """Azure ML's server puts the app root on sys.path, not the script's folder: scorehost added it, so a script
    importing a module beside it in a subfolder served here and failed there (an outside review). It fails here too,
    saying what to do; served with that folder as the app root, it loads."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "helper.py").write_text("VALUE = 42\n")
    (tmp_path / "sub" / "score.py").write_text("import helper\n\n\ndef init():\n    pass\n\n\n"
                                               "def run(data):\n    return helper.VALUE\n")
    script = str(tmp_path / "sub" / "score.py")
    server = _scorehost("serve", "--entry-script", script, "--port", str(processes.free_port()), cwd=str(tmp_path))
    output, _ = server.communicate(timeout=60)
    assert server.returncode == 3 and "No module named 'helper'" in output
    assert f"serve with --app-root {tmp_path / 'sub'}" in output
    assert _served("--entry-script", "score.py", "--app-root", str(tmp_path / "sub"), cwd=str(tmp_path / "sub"))[0] \
        == b"42"


def test_the_current_directory_is_on_sys_path_as_under_azmlinfsrv(tmp_path):
    """gunicorn's chdir puts the current directory first on sys.path under azmlinfsrv: a script in it imports a
    module beside it whatever AML_APP_ROOT is (a review found scorehost refusing it, with a wrong hint)."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "proj" / "helper.py").write_text("VALUE = 42\n")
    (tmp_path / "proj" / "score.py").write_text("import helper\n\n\ndef init():\n    pass\n\n\n"
                                                "def run(data):\n    return helper.VALUE\n")
    assert _served("--entry-script", "score.py", cwd=str(tmp_path / "proj"),
                   env={"AML_APP_ROOT": str(tmp_path / "root")})[0] == b"42"


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
    # As from a terminal: a run started in the background by a shell without job control ignores SIGINT, and its
    # children inherit that (Python then installs no KeyboardInterrupt handler): the interrupt would never arrive.
    server = _scorehost("serve", "--port", str(processes.free_port()), env={"SCOREHOST_HOME": str(tmp_path)},
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert "building the demo model" in server.stdout.readline()
        time.sleep(5)  # TensorFlow imported, the network being built
        os.killpg(server.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
        output, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:  # it missed the interrupt: no server left behind for the tests after this one
            os.killpg(server.pid, signal.SIGKILL)
            server.communicate()
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


# --- messages of the first hour ---------------------------------------------------------------------------------

def test_a_form_upload_is_told_to_send_the_bytes():
    """`curl -F image=@x.jpg` sends multipart/form-data: the reference script says how to send the image instead
    (preprocess() answers it in an HTTP worker, without the model)."""
    import importlib.util
    import json

    from werkzeug.test import EnvironBuilder
    from werkzeug.wrappers import Request

    from scorehost import REFERENCE_SCRIPT

    spec = importlib.util.spec_from_file_location("score_form_upload", REFERENCE_SCRIPT)
    score = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(score)
    form = EnvironBuilder(method="POST", data={"image": (open(os.path.join(os.path.dirname(REFERENCE_SCRIPT),
                                                                           "samples", "gradient.jpg"), "rb"),
                                                         "gradient.jpg")})
    answer = score.preprocess(Request(form.get_environ()))
    assert answer.status_code == 415
    assert "--data-binary @image.jpg" in json.loads(answer.get_data())["message"]


def test_a_key_without_its_scheme_is_told_the_scheme_is_missing(start_server, tmp_path):
    (tmp_path / "echo.py").write_text("def init():\n    pass\n\n\ndef run(data):\n    return data\n")
    server = start_server("scorehost", str(tmp_path / "echo.py"), extra_args=("--auth-key", "k3y"))
    for given in ("k3y", "wrong"):  # the same words either way: nothing about the key itself
        request = urllib.request.Request(server.url + "/score", b"x", {"Authorization": given})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=10)
        assert e.value.code == 401
        assert "has no scheme: send 'Authorization: Bearer <key>'" in e.value.read().decode()


def test_a_failed_sign_in_lists_the_credentials_tried_once(monkeypatch, caplog):
    from azure.identity import ChainedTokenCredential, EnvironmentCredential

    from deploy import azure_v2
    from deploy.settings import DeployError, DeploySettings

    for name in ("AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID", "AZURE_USERNAME"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DeployError) as e:
        azure_v2.connect(DeploySettings(subscription_id="s", resource_group="r", workspace="w"),
                         ChainedTokenCredential(EnvironmentCredential()))
    assert e.value.message.count("EnvironmentCredential:") == 1 and "az login" in e.value.message
    assert not [r for r in caplog.records if r.name.startswith("azure.identity")]
