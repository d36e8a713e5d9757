"""Findings of the attack from outside (issue 14), each fixed and checked against a real server: run() one call at a
time, bounded metric labels, CORS preflight and origin matching, the key kept from the script, JSON too deep or too
long, TraceId bounded, temporary directories removed."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import tempfile
import time
import pytest

from conftest import script
from corpus import Case, send
from scorehost import processes
from test_reliability import raw, status_and_json

KEY = "hardening-key"
AUTH = (("Authorization", f"Bearer {KEY}"),)
GLOBAL = script("headers_in_global.py")


def test_run_is_called_one_at_a_time_by_default(start_server):
    server = start_server("scorehost", GLOBAL)
    bodies = [f"client-{i}" for i in range(200)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: json.loads(send(server.url, Case("g", "POST", "/score", b.encode())).body),
                                bodies))
    assert [a["echo"] for a in answers] == bodies  # nobody got another client's data


def test_the_key_never_reaches_the_script_and_can_come_from_a_file(start_server, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    server = start_server("scorehost", GLOBAL, extra_args=("--auth-key-file", str(key_file)))
    answer = send(server.url, Case("g", "POST", "/score", b"x", AUTH + (("X-Other", "1"),)))
    assert answer.status == 200
    headers = json.loads(answer.body)["headers"]
    assert "x-other" in headers and "authorization" not in headers
    assert send(server.url, Case("g", "POST", "/score", b"x")).status == 401
    assert KEY not in " ".join(open(f"/proc/{server.pid}/cmdline").read().split("\0"))


def test_metric_labels_from_requests_are_bounded(start_server):
    server = start_server("scorehost", script("undecorated.py"))
    for method in ("PURGE", "MKCOL", "PROPFIND", "LOCK", "SEARCH", "GET", "POST"):
        raw(server.port, f"{method} /score HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode())
    text = send(server.url, Case("u", "GET", "/metrics")).body.decode()
    methods = set(re.findall(r'scorehost_requests_total\{[^}]*method="([^"]+)"', text))
    assert methods and methods <= {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}
    assert "other" in methods


@pytest.fixture(scope="module")
def cors_keyed(start_server):
    return start_server("scorehost", script("undecorated.py"), extra_args=("--auth-key", KEY),
                        env={"AML_CORS_ORIGINS": "https://*.example.com, https://a.example"})


@pytest.mark.parametrize("origin,allowed", [
    ("https://app.example.com", True), ("https://deep.app.example.com", True), ("https://a.example", True),
    ("https://example.com", False), ("https://xexample.com.attacker.net", False), ("https://a.example.evil", False),
    ("http://app.example.com", False),
])
def test_cors_preflight_needs_no_key_and_origins_match_literally(cors_keyed, origin, allowed):
    preflight = send(cors_keyed.url, Case("u", "OPTIONS", "/score", None,
                                          (("Origin", origin), ("Access-Control-Request-Method", "POST"))))
    assert preflight.status == 200
    assert (preflight.header("access-control-allow-origin") == origin) is allowed
    assert send(cors_keyed.url, Case("u", "POST", "/score", b"x", (("Origin", origin),))).status == 401
    scored = send(cors_keyed.url, Case("u", "POST", "/score", b"x", AUTH + (("Origin", origin),)))
    assert scored.status == 200 and (scored.header("access-control-allow-origin") == origin) is allowed


@pytest.mark.parametrize("name,body,query", [
    ("nested 100,000 deep", b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", ""),
    ("an integer of 5,000 digits", b'{"a": ' + b"7" * 5000 + b"}", ""),
    ("not UTF-8 (AIHS: 500)", b'{"a": "\xff\xfe"}', ""),
    ("a query nested 1,900 deep", None, "?data=" + "[" * 1900 + "]" * 1900),  # within the 4094-byte request line
])
def test_json_too_deep_or_too_long_is_400_without_a_traceback(start_server, name, body, query):
    schema = start_server("scorehost", script("schema.py"))
    undecorated = start_server("scorehost", script("undecorated.py"))
    server = undecorated if query else schema
    headers = (("Content-Type", "application/json"),) if body else ()
    answer = send(server.url, Case("s", "POST" if body else "GET", "/score" + query, body, headers))
    assert answer.status == 400, answer.body[:300]
    assert "Traceback" not in server.output()
    assert send(schema.url, Case("s", "POST", "/score", b'{"a": 1}', (("Content-Type", "application/json"),))).status == 200


def test_trace_id_is_bounded_like_the_request_ids(start_server):
    server = start_server("scorehost", script("undecorated.py"))
    assert send(server.url, Case("u", "POST", "/score", b"x", (("TraceId", "t" * 100),))).header("TraceId") == "t" * 100
    answer = send(server.url, Case("u", "POST", "/score", b"x", (("TraceId", "t" * 101),)))
    assert answer.status == 431 and answer.header("TraceId") is None


def test_temporary_directories_are_removed_on_exit_and_stale_ones_at_start():
    root = tempfile.gettempdir()
    stale = tempfile.mkdtemp(prefix="scorehost-metrics-999999999-")  # a pid that cannot be alive
    server = processes.start("scorehost", script("undecorated.py"))
    server.wait_healthy(60)
    mine = [n for n in os.listdir(root) if re.fullmatch(rf"scorehost-(metrics|run)-{server.pid}-\w+", n)]
    assert len(mine) == 2 and not os.path.exists(stale)
    worker = int(open(f"/proc/{server.pid}/task/{server.pid}/children").read().split()[0])
    os.kill(worker, signal.SIGTERM)  # a worker that exits (here, gracefully) must leave the master's directories be
    time.sleep(2)
    server.wait_healthy(30)
    assert all(os.path.exists(os.path.join(root, n)) for n in mine)
    assert send(server.url, Case("u", "GET", "/metrics")).status == 200
    os.kill(server.pid, signal.SIGTERM)
    assert server.proc.wait(30) == 0
    assert not any(os.path.exists(os.path.join(root, n)) for n in mine)


def test_hostile_headers_still_get_json(start_server):
    server = start_server("scorehost", script("undecorated.py"))
    status, body = status_and_json(raw(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nTraceId: " + b"t" * 200 + b"\r\n\r\n"))
    assert status == 431 and body["message"]


@pytest.fixture(scope="module")
def stuck(start_server):
    return start_server("scorehost", script("stuck.py"), extra_args=("--scoring-timeout-ms", "500",
                                                                      "--hung-grace", "1.5"))


def _pid(server) -> int:
    answer = send(server.url, Case("s", "POST", "/score", b"fine"))
    assert answer.status == 200
    return json.loads(answer.body)["pid"]


def test_a_call_blocked_in_native_code_is_answered_at_the_deadline_then_its_worker_replaced(stuck):
    before = _pid(stuck)
    started = time.monotonic()
    answer = send(stuck.url, Case("s", "POST", "/score", b"native"))
    assert (answer.status, answer.body) == (500, b'{"message": "Scoring timeout after 500 ms"}')
    assert answer.header("x-ms-run-function-failed") == "True" and answer.header("x-request-id")
    assert time.monotonic() - started < 1.5  # at the deadline, not when the 4 s native call returns
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if _pid(stuck) != before:
                break
        except (OSError, AssertionError):
            pass
        time.sleep(0.2)
    assert _pid(stuck) != before, "the stuck worker was not replaced"
    assert "has not returned" in stuck.output()
    metrics = send(stuck.url, Case("s", "GET", "/metrics")).body.decode()
    assert re.search(r'scorehost_worker_restarts_total\{reason="hung run\(\)"\} 1\.0', metrics)


def test_a_call_that_swallows_the_timeout_is_still_a_timeout(stuck):
    answer = send(stuck.url, Case("s", "POST", "/score", b"swallow"))
    assert answer.status == 500 and b"Scoring timeout" in answer.body  # never a 200 with a silently empty item
    assert _pid(stuck)
