"""Property-based fuzzing against running servers: whatever the method, path, headers and body, the server itself
never answers 5xx (the scripts here never fail on their own), always answers before closing, and never shows a
traceback; JSON answers parse."""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import script

TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20)
METHODS = st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE"]),
                    TOKEN.map(str.upper))
PATHS = st.one_of(st.sampled_from(["/", "/score", "/swagger.json", "/metrics", "/score/", "//score"]),
                  st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._~%-", max_size=40).map(lambda p: "/" + p))
QUERY = st.one_of(st.just(""), st.lists(st.tuples(TOKEN, st.text(alphabet="abc123[]{}\":,%+", max_size=12)),
                                        max_size=4).map(lambda kv: "?" + "&".join(f"{k}={v}" for k, v in kv)))
HEADER_VALUE = st.binary(max_size=60).map(lambda b: bytes(c for c in b if c not in b"\r\n\x00"))
HEADERS = st.lists(st.tuples(st.one_of(TOKEN, st.sampled_from(
    ["Content-Type", "x-request-id", "x-ms-client-request-id", "x-ms-request-id", "Authorization", "TraceId",
     "Accept", "Expect", "Connection", "Origin"])), HEADER_VALUE), max_size=8)
BODY = st.one_of(st.binary(max_size=2048), st.sampled_from([b"", b"{}", b'{"a": 1, "b": "x"}', b"[1,2]", b"null"]))


def exchange(port: int, method: str, target: str, headers: list[tuple[str, bytes]], body: bytes) -> bytes:
    head = f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()
    for name, value in headers:
        if name.lower() not in ("content-length", "transfer-encoding", "host", "connection", "expect"):
            head += name.encode() + b": " + value + b"\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(head + body)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def check(reply: bytes, method: str) -> None:
    assert reply.startswith(b"HTTP/1.1 "), f"no answer before the connection closed: {reply[:100]!r}"
    head, _, body = reply.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    assert status < 500, reply[:600]
    assert b"Traceback" not in body
    if b"content-type: application/json" in head.lower() and method != "HEAD":
        json.loads(body)


@pytest.fixture(scope="module")
def servers(start_server):
    return {"undecorated": start_server("scorehost", script("undecorated.py"), extra_args=("--auth-key", "k")),
            "schema": start_server("scorehost", script("schema.py"))}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=METHODS, path=PATHS, query=QUERY, headers=HEADERS, body=BODY, which=st.sampled_from(["undecorated",
                                                                                                  "schema"]))
def test_server_never_fails_on_any_request(servers, method, path, query, headers, body, which):
    check(exchange(servers[which].port, method, path + query, headers, body), method)


def test_schemathesis_against_the_served_openapi_document(servers, tmp_path):
    """Run schemathesis against /swagger.json of the @input_schema script, /score only: `GET /` answers text/html
    while Azure ML's own template documents text/plain, an inconsistency of Azure ML's kept for parity. Server
    errors are left to the test above: inference-schema's decorator is part of the script, and a value of the wrong
    type makes it raise (500 with x-ms-run-function-failed: True, as in Azure ML), which is the script's failure."""
    import shutil
    import subprocess
    import sys

    binary = shutil.which("schemathesis", path=os.path.dirname(sys.executable)) or shutil.which("schemathesis")
    if binary is None:
        pytest.fail("schemathesis is not installed (it is in the test extra)")
    server = servers["schema"]
    done = subprocess.run([binary, "run", f"{server.url}/swagger.json?version=3", "--url", server.url, "--include-path", "/score",
                           "--checks", "response_schema_conformance,content_type_conformance,status_code_conformance",
                           "--max-examples", "50", "--no-color"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]


