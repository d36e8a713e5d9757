"""What scorehost does beyond Azure ML's server (auth, body limit, start-up failures), and its settings."""

from __future__ import annotations

import json
import re
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import script
from corpus import Case, differences, send
from scorehost import processes
from server.settings import resolve

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def keyed(start_server):
    return start_server("scorehost", script("undecorated.py"),
                        extra_args=("--auth-key", KEY, "--max-body-bytes", "1000"))


def _ok_after(server) -> None:
    """The next request on the same server succeeds: no bad input leaves a worker broken."""
    assert send(server.url, Case("undecorated.py", "POST", "/score", b"next",
                                 (("Authorization", f"Bearer {KEY}"),))).status == 200


@pytest.mark.parametrize("authorization,message", [
    (None, "Missing Authorization header"),
    ("Bearer wrong", "Invalid key"),
    (f"Basic {KEY}", "Invalid key"),
    (f"Bearer {KEY}x", "Invalid key"),
    ("Bearer", "Invalid key"),
])
def test_key_is_required(keyed, authorization, message):
    headers = (("Authorization", authorization),) if authorization else ()
    for path in ("/score", "/swagger.json"):
        answer = send(keyed.url, Case("undecorated.py", "POST" if path == "/score" else "GET", path, b"x", headers))
        body = json.loads(answer.body)
        assert answer.status == 401 and message in body["message"]
        assert body["request_id"] == answer.header("x-request-id")
        assert answer.header("www-authenticate") == "Bearer"
    _ok_after(keyed)


def test_right_key_and_open_health_probe(keyed):
    assert send(keyed.url, Case("undecorated.py", "GET", "/")).status == 200
    answer = send(keyed.url, Case("undecorated.py", "GET", "/swagger.json", None,
                                  (("Authorization", f"bearer {KEY}"),)))
    assert answer.status == 200


def test_key_never_logged(keyed):
    send(keyed.url, Case("undecorated.py", "POST", "/score", b"x", (("Authorization", "Bearer guess"),)))
    _ok_after(keyed)
    assert KEY not in keyed.output() and "guess" not in keyed.output()


@pytest.mark.parametrize("body,headers", [
    (b"x" * 1001, ()),
    (b"x" * 5000, ()),
    (b"", (("Content-Length", "99999999"),)),
])
def test_body_over_the_limit_is_413(keyed, body, headers):
    auth = (("Authorization", f"Bearer {KEY}"),)
    if headers:  # a Content-Length that announces too much: refused on the header, before reading
        answer = send(keyed.url, Case("undecorated.py", "POST", "/score", None, auth + headers))
    else:
        answer = send(keyed.url, Case("undecorated.py", "POST", "/score", body, auth))
    assert answer.status == 413
    assert "limit is 1000 bytes" in json.loads(answer.body)["message"]
    _ok_after(keyed)


def test_chunked_body_over_the_limit_is_413(keyed):
    with socket.create_connection(("127.0.0.1", keyed.port), timeout=10) as s:
        chunk = b"x" * 600
        s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                  + f"Authorization: Bearer {KEY}\r\n\r\n".encode()
                  + (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 3 + b"0\r\n\r\n")
        reply = ""
        while "exceeds the limit" not in reply and (chunk := s.recv(65536)):  # headers and body may come apart
            reply += chunk.decode(errors="replace")
    assert reply.startswith("HTTP/1.1 413") and "exceeds the limit of 1000 bytes" in reply
    _ok_after(keyed)


def test_body_at_the_limit_is_served(keyed):
    answer = send(keyed.url, Case("undecorated.py", "POST", "/score", b"y" * 1000,
                                  (("Authorization", f"Bearer {KEY}"),)))
    assert answer.status == 200


def test_cors_same_as_azure_ml(start_server):
    env = {"AML_CORS_ORIGINS": "https://a.example, https://b.example"}
    ours = start_server("scorehost", script("undecorated.py"), env=env)
    theirs = start_server("aihs", script("undecorated.py"), env=env)
    cases = [Case("undecorated.py", "POST", "/score", b"x", (("Origin", "https://a.example"),)),
             Case("undecorated.py", "POST", "/score", b"x", (("Origin", "https://evil.example"),)),
             Case("undecorated.py", "OPTIONS", "/score", None, (("Origin", "https://b.example"),
                                                                ("Access-Control-Request-Method", "POST")))]
    for case in cases:
        assert differences(case, send(ours.url, case), send(theirs.url, case)) == []
    assert send(ours.url, cases[0]).header("access-control-allow-origin") == "https://a.example"


def _serve_until_exit(entry_script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([processes._bin("scorehost"), "serve", "--entry-script", entry_script,
                           "--port", str(processes.free_port()), *args],
                          capture_output=True, text=True, timeout=timeout)


def test_init_failure_exits_nonzero_with_the_traceback():
    done = _serve_until_exit(script("bad_init.py"))
    assert done.returncode == 3
    assert "INIT-FAILED-MARKER" in done.stderr + done.stdout and "Traceback" in done.stderr + done.stdout


def test_hung_init_fails_startup_in_bounded_time():
    started = time.monotonic()
    done = _serve_until_exit(script("hang_init.py"), "--init-timeout", "3")
    assert done.returncode == 3
    assert "did not finish within 3 s" in done.stderr + done.stdout
    assert time.monotonic() - started < 30


def test_missing_script_exits_nonzero():
    done = _serve_until_exit(script("does_not_exist.py"))
    assert done.returncode == 3 and "does_not_exist.py" in done.stderr + done.stdout


@pytest.mark.parametrize("args,env,words,code", [
    (("--workers", "0"), {}, "--workers / WORKER_COUNT: must be at least 1", 2),
    ((), {"WORKER_COUNT": "0"}, "--workers / WORKER_COUNT: must be at least 1", 2),
    (("--threads", "0"), {}, "--threads / SCOREHOST_THREADS: must be at least 1", 2),
    (("--port", "99999"), {}, "--port / SCOREHOST_PORT: must be between 1 and 65535", 2),
    (("--read-timeout", "0"), {}, "must be greater than 0", 2),
    (("--access-log", "maybe"), {}, "argument --access-log: 'maybe' is not valid", 2),
])
def test_bad_settings_fail_in_one_line_before_start_up(args, env, words, code):
    done = subprocess.run([processes._bin("scorehost"), "serve", "--entry-script", script("undecorated.py"), *args],
                          capture_output=True, text=True, timeout=30, env={**os.environ, **env})
    assert done.returncode == code and words in done.stderr
    assert "Traceback" not in done.stderr + done.stdout and "Listening" not in done.stderr + done.stdout


def test_a_taken_port_is_named_before_start_up():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # _serve_until_exit passes a free --port first: the last one given counts
        done = _serve_until_exit(script("undecorated.py"), "--port", str(port), timeout=30)
    assert done.returncode == 2 and f"127.0.0.1:{port}" in done.stderr and "choose another with --port" in done.stderr


def test_settings_precedence_flag_env_default():
    s = resolve({"port": 7000}, {"SCOREHOST_PORT": "6000", "WORKER_COUNT": "3", "SCORING_TIMEOUT_MS": "250"})
    assert (s.port, s.workers, s.scoring_timeout_ms, s.host) == (7000, 3, 250, "127.0.0.1")
    with pytest.raises(SystemExit, match="WORKER_COUNT"):
        resolve({}, {"WORKER_COUNT": "many"})


def test_readme_settings_table_is_the_one_in_settings_py():
    from server.settings import markdown_table

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        assert markdown_table() in f.read(), "regenerate: python -c 'import server.settings as s; print(s.markdown_table())'"


def test_cli_help_lists_every_setting():
    from server.settings import SETTINGS

    out = subprocess.run([sys.executable, "-m", "scorehost.cli", "serve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for s in SETTINGS:
        assert s.flag in out and (s.env is None or s.env in out)
    # azmlinfsrv's settings first, apart from scorehost's own; a usage line of one line, not 30
    usage, azure_ml, own = out.split("\n")[0], out.index("Azure ML's settings"), out.index("scorehost's own settings")
    assert usage.startswith("usage: ") and len(usage) < 120 and azure_ml < out.index("--entry-script ENTRY") < own
    assert own < out.index("--batch-max") and out.index("--worker_count") < own


def test_access_line_per_request_when_asked(start_server):
    server = start_server("scorehost", script("undecorated.py"), extra_args=("--access-log", "true"))
    assert send(server.url, Case("undecorated.py", "POST", "/score?x=1", b"hi")).status == 200
    time.sleep(0.3)
    assert re.search(r'scorehost\.access: 127\.0\.0\.1 "POST /score\?x=1 HTTP/1\.1" 200 \d+ [\d.]+ms', server.output())
    quiet = start_server("scorehost", script("undecorated.py"))  # not a terminal: off
    send(quiet.url, Case("undecorated.py", "POST", "/score", b"hi"))
    time.sleep(0.3)
    assert "scorehost.access" not in quiet.output()


TF_INIT = '''
def init():
    import tensorflow  # seconds of C++ start-up: a Ctrl-C lands inside it


def run(data):
    return data
'''


@pytest.mark.parametrize("at_s", [2.0, None], ids=["during-init", "while-serving"])
def test_ctrl_c_is_one_line_and_exit_130(tmp_path, at_s):
    """Ctrl-C at any moment: exit 130 and one line, no traceback and no C++ abort (issue 19.4)."""
    entry = tmp_path / "tf_init.py"
    entry.write_text(TF_INIT)
    server = processes.start("scorehost", str(entry), workers=2)
    try:
        if at_s is None:
            server.wait_healthy(90)
        else:
            time.sleep(at_s)
        os.killpg(server.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends: the whole process group
        assert server.proc.wait(60) == 130
    finally:
        server.stop()
    output = server.output()
    assert output.rstrip().endswith("scorehost: interrupted")
    assert "Traceback" not in output and "terminate called" not in output and "SIGABRT" not in output


def test_the_server_version_is_azmlinfsrvs_rule():
    """On (the default), azmlinfsrv sends its own name and version, replacing a HTTP_X_MS_SERVER_VERSION already set
    (and exports that to the script); off, the variable's value if set. A review found a set value kept while on."""
    from server import __version__
    from server.settings import resolve, script_environment, server_version

    on, off = resolve({}, {"AML_APP_ROOT": "/nonexistent"}), resolve({"server_version_header": False}, {})
    assert server_version(on, {"HTTP_X_MS_SERVER_VERSION": "mine/1"}) == f"scorehost/{__version__}"
    assert script_environment(on, {}, {"HTTP_X_MS_SERVER_VERSION": "mine/1"})["HTTP_X_MS_SERVER_VERSION"] == \
        f"scorehost/{__version__}"
    assert server_version(off, {"HTTP_X_MS_SERVER_VERSION": "mine/1"}) == "mine/1"
    assert server_version(off, {}) == "" and "HTTP_X_MS_SERVER_VERSION" not in script_environment(off, {}, {})


def test_a_streamed_answer_comes_part_by_part_and_a_failure_mid_stream_cuts_it_not_the_server(start_server):
    """Azure ML's gunicorn writes a Response(generator) as it is made (an outside review: scorehost buffered it,
    and a stream longer than the scoring timeout became a 500). Its first part comes while the script still makes
    the rest; a stream that fails after its head ends without the last chunk (the client learns it is cut short),
    and the worker serves on."""
    import http.client

    server = start_server("scorehost", script("streamed.py"), env={"SCORING_TIMEOUT_MS": "500"})
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(b"GET /score?parts=3&gap_ms=700 HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while b"part 0 of 3" not in received:
            received += sock.recv(65536)
        assert b"Transfer-Encoding: chunked" in received and b"part 2" not in received  # 1.4 s of it still to come
        while not received.endswith(b"\r\n0\r\n\r\n"):
            received += sock.recv(65536)
        assert received.startswith(b"HTTP/1.1 200 ") and b"part 2 of 3" in received
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/score?parts=3&fail_at=2")
    answer = conn.getresponse()
    assert answer.status == 200
    with pytest.raises(http.client.IncompleteRead) as cut:
        answer.read()
    assert cut.value.partial == b"part 0 of 3\npart 1 of 3\n"
    conn.close()
    assert send(server.url, Case("streamed.py", "GET", "/score?parts=2")).body == b"part 0 of 2\npart 1 of 2\n"
    assert "a streamed answer failed after its head was sent" in server.output()
    # A close callback that raises (the script's code, run after the last part) cuts that stream, and its app
    # thread (the worker's only one) lives on: it killed the thread, and the worker then answered nothing more.
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", "/score?parts=2&close_fails=1")
    with pytest.raises(http.client.IncompleteRead):
        conn.getresponse().read()
    conn.close()
    assert send(server.url, Case("streamed.py", "GET", "/score?parts=1"), timeout=10).body == b"part 0 of 1\n"
    assert "closing a streamed answer failed" in server.output()
