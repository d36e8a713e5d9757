"""A user's own script, all the way through the parity gate: served with --app-root, its requests recorded with
`serve --record`, and replayed with `scorehost parity --replay` against a second server (identical: exit 0), a
changed script (exit 1, the differing request named), and a fake managed endpoint in front of a real server that
answers as Azure's front end does (424 with ms-azureml-model-error-statuscode for a container's non-200, 413 for a
request body over 1.5 MB)."""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

from deploy import azure_v2, cli as deploy_cli
from deploy.settings import DeployError, fields_for
from fake_azure import SUBSCRIPTION, FakeML
from scorehost import REPO_ROOT, processes
from server.record import load

USER_SCRIPT = '''
import json
import time

from azureml.contrib.services.aml_response import AMLResponse


def init():
    pass


def run(data):
    try:
        values = json.loads(data)["values"]
    except (ValueError, KeyError, TypeError):
        return AMLResponse({"message": 'send {"values": [numbers]}'}, 400, json_str=True)
    mean = sum(values) / len(values)
    return {"mean": mean, "count": len(values), "served_at": time.time()}
'''
# The same script, except for lists of five: one recorded request must differ, the others match.
CHANGED = USER_SCRIPT.replace("mean = sum(values) / len(values)",
                              "mean = sum(values) / len(values) + (1 if len(values) == 5 else 0)")
KEY = "managed-key"
BIG = json.dumps({"values": [1] * 800_000}).encode()  # 2.4 MB: over a managed endpoint's 1.5 MB


def _app(tmp_path_factory, name: str, source: str) -> str:
    root = tmp_path_factory.mktemp(name)
    (root / "score.py").write_text(source)  # named score.py on purpose: not the reference model's script
    (root / "myenv.yml").write_text("name: app\ndependencies:\n  - python=3.11\n  - pip:\n"  # its own environment
                                    "    - azureml-inference-server-http\n    - numpy\n")
    return str(root)


def _serve(app_root: str, *args: str, env: dict | None = None) -> processes.ServerProcess:
    """`scorehost serve --entry-script score.py --app-root DIR`, from the repository root, where a relative
    score.py would otherwise be the reference script."""
    port = processes.free_port()
    argv = [processes._bin("scorehost"), "serve", "--port", str(port), "--workers", "1", *args]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("AZUREML_", "AML_"))}
    server = processes.ServerProcess("scorehost", argv, {**full_env, "PYTHONUNBUFFERED": "1", **(env or {})}, port,
                                     REPO_ROOT)
    return server.wait_healthy(60)


def _post(url: str, body: bytes, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, body, headers, method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> Iterator[tuple[str, str, processes.ServerProcess]]:
    """(app root, recording, the recording server) after five requests of each kind were sent to it."""
    app_root = _app(tmp_path_factory, "user-app", USER_SCRIPT)
    recording = str(tmp_path_factory.mktemp("recording"))
    server = _serve(app_root, "--entry-script", os.path.join(app_root, "score.py"), "--app-root", app_root, "--record", recording)
    try:
        json_headers = {"Content-Type": "application/json", "Authorization": "Bearer not-for-the-disk"}
        statuses = [_post(server.url + "/score", json.dumps({"values": [1, 2, 3]}).encode(), json_headers),
                    _post(server.url + "/score", json.dumps({"values": [0.1, 0.2, 0.3, 0.4, 0.5]}).encode(),
                          json_headers),
                    _post(server.url + "/score", b"{nope", json_headers),
                    _post(server.url + "/score?values=%5B1%5D", None, {}),
                    _post(server.url + "/score", BIG, json_headers),
                    _post(server.url + "/ready", None, {})]  # a probe: not recorded
        assert statuses == [200, 200, 400, 200, 200, 200]
        # the server goes on recording (the replays below reach it too): they replay a copy of these five
        snapshot = str(tmp_path_factory.mktemp("snapshot") / "requests")
        shutil.copytree(recording, snapshot)
        yield app_root, snapshot, server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def changed(tmp_path_factory) -> Iterator[processes.ServerProcess]:
    app_root = _app(tmp_path_factory, "changed-app", CHANGED)
    server = _serve(app_root, "--entry-script", os.path.join(app_root, "score.py"), "--app-root", app_root)
    yield server
    server.stop()


def parity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([processes._bin("scorehost"), "parity", *args], capture_output=True, text=True,
                          timeout=120)


class ManagedFront(http.server.ThreadingHTTPServer):
    """A managed online endpoint's front end, as Azure documents it, before a real server: the key is checked, a
    request body over 1.5 MB gets 413 without reaching the container, and a container's non-200 becomes 424 with
    the container's status in ms-azureml-model-error-statuscode and its body passed through."""

    def __init__(self, upstream: str, key: str = KEY):
        self.upstream, self.key = upstream, key
        super().__init__(("127.0.0.1", 0), ManagedHandler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class ManagedHandler(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.headers.get("Authorization") != f"Bearer {self.server.key}":
            return self._send(401, [], b'{"message": "unauthorized"}')
        if len(body) > 1_500_000:
            return self._send(413, [], b"Payload Too Large")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "authorization")}
        request = urllib.request.Request(self.server.upstream + self.path, body if self.command == "POST" else None,
                                         headers, method=self.command)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                status, answer_headers, answer = r.status, list(r.headers.items()), r.read()
        except urllib.error.HTTPError as e:
            status, answer_headers, answer = e.code, list(e.headers.items()), e.read()
        if status != 200:
            answer_headers += [("ms-azureml-model-error-reason", "model_error"),
                               ("ms-azureml-model-error-statuscode", str(status))]
            status = 424
        self._send(status, answer_headers, answer)

    do_GET = do_POST = _answer

    def _send(self, status: int, headers: list, body: bytes) -> None:
        self.send_response(status)
        for name, value in headers:
            if name.lower() not in ("content-length", "connection", "date", "server", "transfer-encoding"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_serve_records_each_answered_request_without_the_key(recorded):
    app_root, recording, server = recorded
    exchanges = load(recording)
    assert [e.name for e in exchanges] == ["000000", "000001", "000002", "000003", "000004"]
    assert [(e.method, e.path, e.query, e.status) for e in exchanges] == [
        ("POST", "/score", "", 200), ("POST", "/score", "", 200), ("POST", "/score", "", 400),
        ("GET", "/score", "values=%5B1%5D", 200), ("POST", "/score", "", 200)]
    assert json.loads(exchanges[0].response_body)["mean"] == 2.0  # the user's script, not the reference model
    assert exchanges[4].request_body == BIG
    assert exchanges[0].header("x-request-id") and exchanges[0].header("Content-Type") == "application/json"
    for name in os.listdir(recording):
        with open(os.path.join(recording, name), "rb") as f:
            assert b"not-for-the-disk" not in f.read()
    assert all("authorization" not in (k.lower() for k, _ in e.request_headers) for e in exchanges)


def test_the_ready_line_comes_once_when_ready_answers_200(recorded):
    server = recorded[2]
    deadline = time.monotonic() + 5
    while "scorehost: ready on" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.output().count(f"scorehost: ready on {server.url}\n") == 1


def test_replay_against_the_same_script_matches(recorded, tmp_path):
    app_root, recording, _ = recorded
    # the environment form this time (AZUREML_ENTRY_SCRIPT + AML_APP_ROOT), recording again within bounds
    again = str(tmp_path / "again")
    second = _serve(app_root, "--record", again, "--record-max-count", "2",
                    env={"AZUREML_ENTRY_SCRIPT": "score.py", "AML_APP_ROOT": app_root})
    try:
        result = parity(second.url + "/score", "--replay", recording, "--ignore", "served_at")
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 6 and all(line.startswith("ok") for line in lines[:5])
        assert "local 200 | endpoint 200" in lines[0]
        assert lines[-1] == "parity (kubernetes): all answers match (5 of 5)"
        assert len(load(again)) == 2  # --record-max-count: the oldest two kept
        assert "recording stopped" in second.output()
    finally:
        second.stop()


def test_a_request_is_replayed_with_its_own_headers_alone(recorded, tmp_path):
    """An outside review: urllib added a form Content-Type to a recorded POST that had none (so run() got "", as
    Azure ML's server gives a form) and its own User-Agent; and a HEAD's recorded body, never on the wire, differed
    from every endpoint's empty one. Sent with http.client, as a client without those headers sends them."""
    import http.client

    app_root = recorded[0]
    recording = str(tmp_path / "raw")
    server = _serve(app_root, "--entry-script", os.path.join(app_root, "score.py"), "--app-root", app_root,
                    "--record", recording)
    try:
        for method, body in (("POST", json.dumps({"values": [4, 6]}).encode()), ("HEAD", None)):
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request(method, "/score", body)  # no Content-Type, no User-Agent
            answer = conn.getresponse()
            assert (answer.status, answer.read() == b"") == ((405, True) if method == "HEAD" else (200, False))
            conn.close()
        exchanges = load(recording)
        assert json.loads(exchanges[0].response_body)["mean"] == 5.0 and exchanges[1].response_body == b""
        assert not {"content-type", "user-agent"} & {k.lower() for k, _ in exchanges[0].request_headers}
        result = parity(server.url, "--replay", recording, "--ignore", "served_at")
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        server.stop()


def test_requests_go_through_the_proxy_the_environment_names(recorded, monkeypatch):
    """As urllib did: HTTP_PROXY is used (the request line carries the absolute URL), NO_PROXY is honoured."""
    from deploy import parity as parity_module
    from fake_azure import plain_endpoint

    with plain_endpoint() as (proxy, seen):
        monkeypatch.setenv("HTTP_PROXY", proxy)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        assert parity_module._http("http://far.example:81/score?a=1", "GET", [], b"", 10)[0] == 200
        assert [target for target, _ in seen] == ["http://far.example:81/score?a=1"]
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        assert parity_module._http(recorded[2].url + "/", "GET", [], b"", 10)[2] == b"Healthy" and len(seen) == 1


def test_a_field_that_changes_every_call_needs_ignore(recorded):
    result = parity(recorded[2].url, "--replay", recorded[1])
    assert result.returncode == 1 and ".served_at:" in result.stdout


def test_replay_against_a_changed_script_names_the_request_that_differs(recorded, changed):
    result = parity(changed.url, "--replay", recorded[1], "--ignore", "served_at", "--tolerance", "1e-6")
    assert result.returncode == 1, result.stdout
    diff_lines = [line for line in result.stdout.splitlines() if line.startswith("DIFF")]
    assert len(diff_lines) == 1 and diff_lines[0].startswith("DIFF 000001 POST /score")
    assert "local:    {\"mean\": 0.3" in result.stdout and "endpoint: {\"mean\": 1.3" in result.stdout
    assert ".mean: 0.3 != 1.3" in result.stdout
    assert result.stdout.splitlines()[-1] == \
        "parity (kubernetes): 4 of 5 answers match; differ: 000001 POST /score"


def test_replay_against_a_managed_endpoint_by_its_rules(recorded, changed):
    app_root, recording, server = recorded
    front = ManagedFront(server.url)  # the recording server itself serves as the identical deployment
    try:
        result = parity(front.url, "--replay", recording, "--ignore", "served_at", "--target", "managed",
                        "--key", KEY)
        assert result.returncode == 0, result.stdout + result.stderr
        lines = result.stdout.splitlines()
        assert "local 400 | endpoint 424 (container 400)" in lines[2]
        assert "local 200 | endpoint 413 (request of" in lines[4]
        # the same endpoint judged as Kubernetes: its 424s and 413 differ
        result = parity(front.url, "--replay", recording, "--ignore", "served_at", "--key", KEY)
        assert result.returncode == 1
        assert "differ: 000002 POST /score; 000004 POST /score" in result.stdout
        # without the key: said in one line, before anything is compared
        result = parity(front.url, "--replay", recording, "--target", "managed")
        assert result.returncode == 1 and "needs a key: pass --key K" in result.stderr
    finally:
        front.shutdown()
    front = ManagedFront(changed.url)
    try:
        result = parity(front.url, "--replay", recording, "--ignore", "served_at", "--target", "managed",
                        "--key", KEY)
        assert result.returncode == 1 and "differ: 000001 POST /score" in result.stdout
    finally:
        front.shutdown()


def test_a_recording_that_is_not_one_is_said_in_one_line(tmp_path, recorded):
    (tmp_path / "000000.json").write_text("{}")
    result = parity(recorded[2].url, "--replay", str(tmp_path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "scorehost-record/1" in result.stderr
    result = parity(recorded[2].url, "--replay", str(tmp_path / "none"))
    assert result.returncode == 1 and "is not a directory of recorded requests" in result.stderr


# --- the gate of `deploy aks|managed` ---------------------------------------------------------------------------

class EndpointAt(FakeML):
    """Azure ML's client, whose endpoint's scoring URI is a local front end."""

    def __init__(self, front: ManagedFront):
        super().__init__()
        self.front = front

    def _online_endpoints_get(self, call, name):
        endpoint = super()._online_endpoints_get(call, name)
        endpoint._scoring_uri = self.front.url + "/score"
        return endpoint


def deploy_managed(app_root: str, front_to: str, recording: str):
    front = ManagedFront(front_to, key="scorehost-endpoint-primary-key")
    ml = EndpointAt(front)
    args = argparse.Namespace(**{"config": None, **{f.name: None for f in fields_for("managed")},
                                 "yes": True, "skip_parity": False, "parity_requests": recording, "parity_ignore": ["served_at"],
                                 "entry_script": os.path.join(app_root, "score.py"), "model_dir": app_root,
                                 "endpoint": "scorehost-endpoint", "subscription_id": SUBSCRIPTION,
                                 "resource_group": "rg", "workspace": "ws"})
    try:
        return deploy_cli.cmd_managed(args, azure_v2.Clients(ml, None, None, None)), ml
    finally:
        front.shutdown()


def test_deploy_managed_gates_on_the_recorded_requests_by_managed_rules(recorded, changed):
    app_root, recording, server = recorded
    code, ml = deploy_managed(app_root, server.url, recording)
    assert code == 0
    assert ml.endpoint_state["scorehost-endpoint"].traffic == {"blue": 100}
    with pytest.raises(DeployError) as e:
        deploy_managed(app_root, changed.url, recording)
    assert "answers differently" in e.value.message and "takes no new traffic" in e.value.message


def test_deploy_refuses_a_users_script_without_recorded_requests(recorded):
    app_root = recorded[0]
    done = subprocess.run([processes._bin("scorehost"), "deploy", "aks", "--entry-script",
                           os.path.join(app_root, "score.py"), "--model-dir", app_root, "--yes"],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "the parity gate needs requests for" in done.stderr and "--record requests/" in done.stderr
    assert "--parity-requests requests/" in done.stderr and "--skip-parity" in done.stderr


def test_the_reference_corpus_passes_a_managed_endpoint_by_its_rules(start_server, colors_model):
    """The shipped corpus's error probes and its 2.2 MB batch: 424 and 413 on a managed endpoint, which match."""
    from scorehost import REFERENCE_SCRIPT

    local = start_server("scorehost", REFERENCE_SCRIPT, colors_model)
    front = ManagedFront(local.url)
    try:
        result = parity(front.url, "--local", local.url, "--target", "managed", "--key", KEY)
    finally:
        front.shutdown()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("endpoint 424 (container 4") == 8 and "endpoint 413 (request of" in result.stdout
