"""Faults and hostile HTTP against real gunicorn processes: worker kills, graceful drain, out-of-memory, malformed
and slow requests. Each bad request gets its status with a JSON body, and the server goes on serving."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import os
import signal
import socket
import time

import pytest

from conftest import script
from corpus import Case, send
from scorehost import processes

FAULTY = script("faulty.py")


def raw(port: int, data: bytes, *, read_timeout: float = 10, shut_write: bool = False) -> bytes:
    """Send raw bytes and return everything the server answers before it closes (or the timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except socket.timeout:
            pass
    return b"".join(chunks)


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def status_and_json(reply: bytes) -> tuple[int, dict]:
    head, _, body = reply.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), reply[:500]
    return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("scorehost", FAULTY, extra_args=("--threads", "4", "--max-body-bytes", "100000"))


def ok(server) -> None:
    answer = send(server.url, Case("faulty.py", "POST", "/score", b"fine"))
    assert answer.status == 200 and json.loads(answer.body) == {"ok": "fine"}


# --- the model fails ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("body,status,words", [
    (b"oom", 503, "ran out of memory"),
    (b"tf-oom", 503, "ran out of memory"),
    (b"boom", 500, "An unexpected error occurred in scoring script"),
])
def test_model_failures_then_the_next_request_succeeds(server, body, status, words):
    answer = send(server.url, Case("faulty.py", "POST", "/score", body))
    message = json.loads(answer.body)
    assert answer.status == status and words in message["message"]
    assert answer.header("x-ms-run-function-failed") == "True" and "Traceback" not in answer.body.decode()
    if status == 503:
        assert answer.header("retry-after") == "1" and message["request_id"] == answer.header("x-request-id")
    ok(server)


# --- hostile HTTP -------------------------------------------------------------------------------------------

HOSTILE = [
    ("request line over 4094 bytes", b"GET /score?" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    ("101 header fields", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(101))
     + b"\r\n", 431),
    ("a header over 8190 bytes", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431),
    ("not HTTP at all", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400),
    ("invalid method", b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("bad HTTP version", b"GET / HTTP/9.9\r\nHost: x\r\n\r\n", 400),
    ("request target that is not a URL", b"GET http://[/x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    ("bad chunk size", b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
     400),
    ("unknown transfer coding", b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
     501),  # as gunicorn answers
    ("an Upgrade head with two Hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\nConnection: Upgrade\r\n"
     b"Upgrade: websocket\r\n\r\n", 400),
    ("an Upgrade head with a gzip coding", b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
     b"Upgrade: h2c\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    ("two Content-Lengths", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
     400),
    ("body over the limit (announced)", b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n", 413),
]


@pytest.mark.parametrize("what,data,status", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_request_gets_its_status_as_json(server, what, data, status):
    got_status, body = status_and_json(raw(server.port, data))
    assert got_status == status and body["message"] and body.get("request_id")
    ok(server)


def test_an_upgrade_request_is_served_and_so_is_the_next_on_its_connection(server):
    """`curl --http2` on http:// asks to switch to h2c: no switch, the POST served with its body, then the next."""
    upgrade = (b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
               b"HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 4\r\n\r\nfine")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(upgrade + b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 4\r\n\r\nfine")
        reply = b""
        while chunk := s.recv(65536):  # until the server closes, after the second answer
            reply += chunk
    assert reply.count(b"HTTP/1.1 200 OK") == 2 and reply.count(b'{"ok": "fine"}') == 2, reply[:500]
    ok(server)


def test_invalid_utf8_in_headers_is_served(server):
    reply = raw(server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nX-Custom: \xff\xfe\xc3\x28\r\n"
                             b"x-request-id: id-\xe9\r\nContent-Length: 4\r\n\r\nfine")
    status, body = status_and_json(reply)
    assert status == 200 and body == {"ok": "fine"}
    ok(server)


def test_body_shorter_than_its_content_length(server):
    reply = raw(server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly ten..",
                shut_write=True)
    status, body = status_and_json(reply)  # never handed to run() truncated
    assert status == 400 and "ended after 10 of the 100 bytes" in body["message"]
    ok(server)


def test_body_longer_than_its_content_length(server):
    reply = raw(server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nfineEXTRA-BYTES\r\n\r\n",
                read_timeout=3)
    first = reply.split(b"HTTP/1.1 ")
    assert reply.startswith(b"HTTP/1.1 200") and b'{"ok": "fine"}' in reply
    assert all(int(r.split()[0]) == 400 for r in first[2:])  # the extra bytes, read as a next request: 400
    ok(server)


def test_slow_clients_do_not_take_every_thread(start_server):
    """One worker, 4 threads: 3 clients sending a byte a second leave a thread for everyone else."""
    slow_server = start_server("scorehost", FAULTY, extra_args=("--threads", "4"))
    sockets = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", slow_server.port))
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
            sockets.append(s)
        for i in range(3):
            for s in sockets:
                s.sendall(b"x")
            started = time.monotonic()
            ok(slow_server)
            assert time.monotonic() - started < 1.0
            time.sleep(0.5)
    finally:
        for s in sockets:
            s.close()


# --- process faults -------------------------------------------------------------------------------------------

def _pids(server, want: int, within_s: float = 60) -> set[int]:
    """The worker pids seen answering, until `want` are seen (a worker still booting answers later)."""
    seen: set[int] = set()
    deadline = time.monotonic() + within_s
    while len(seen) < want and time.monotonic() < deadline:
        seen.add(json.loads(send(server.url, Case("which_gpu.py", "POST", "/score", b"x")).body)["pid"])
    return seen


def test_kill_9_a_worker_under_load(start_server):
    server = start_server("scorehost", script("which_gpu.py"), workers=2, extra_args=("--threads", "2"))
    pids = _pids(server, 2)
    assert len(pids) == 2
    victim = min(pids)
    stop = time.monotonic() + 4
    results: list[int] = []

    def client() -> None:
        while time.monotonic() < stop:
            try:
                results.append(send(server.url, Case("x", "POST", "/score", b"x"), timeout=5).status)
            except (OSError, http.client.HTTPException):
                results.append(-1)  # a request in flight on the worker that was killed

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client) for _ in range(4)]
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        for f in futures:
            f.result()
    assert results.count(200) > 100 and set(results) <= {200, -1}
    assert results.count(-1) <= 4  # at most the requests in flight on the killed worker
    after = _pids(server, 2)
    back_in = time.monotonic() - killed_at
    assert victim not in after and len(after) == 2 and back_in < 30


def test_sigterm_drains_in_flight_requests(tmp_path):
    server = processes.start("scorehost", FAULTY, extra_args=("--threads", "4", "--graceful-timeout", "10"))
    server.wait_healthy(60)
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(send, server.url, Case("x", "POST", "/score", b"sleep1.5")) for _ in range(4)]
            time.sleep(0.5)
            os.kill(server.pid, signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [a.status for a in answers] == [200] * 4  # accepted requests completed
        assert server.proc.wait(15) == 0  # and the master exited 0 within the graceful timeout
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2).close()  # new connections refused
    finally:
        server.stop()


def test_init_killed_again_and_again_stops_the_server_in_bounded_time():
    started = time.monotonic()
    server = processes.start("scorehost", script("oom_init.py"), workers=1)
    code = server.proc.wait(90)
    output = server.output()
    assert code == 3 and "died before they were ready" in output and "out of memory" in output
    assert output.count("Booting worker") <= 6 and time.monotonic() - started < 60


def test_a_replacement_whose_init_fails_is_retried_while_the_others_serve(start_server, tmp_path):
    marker = tmp_path / "unavailable"
    server = start_server("scorehost", script("flaky_init.py"), workers=2, env={"FLAKY_MARKER": str(marker)})
    pids = _pids(server, 2)
    marker.touch()
    os.kill(min(pids), signal.SIGKILL)
    until = time.monotonic() + 3
    while time.monotonic() < until:  # the healthy worker keeps serving while the replacement fails
        assert send(server.url, Case("flaky_init.py", "POST", "/score", b"x")).status == 200
    assert server.proc.poll() is None and "will be retried" in server.output()
    marker.unlink()
    after = _pids(server, 2, within_s=60)
    assert len(after) == 2 and min(pids) not in after


VERSIONED = '''
import os, time

def init():
    time.sleep({init_s})
    if {fail}:
        raise RuntimeError("the new model does not load")

def run(data):
    return {{"version": {version}, "pid": os.getpid()}}
'''


def test_sighup_reload_keeps_serving_and_keeps_the_old_script_if_the_new_one_fails(tmp_path):
    path = tmp_path / "versioned.py"
    path.write_text(VERSIONED.format(version=1, init_s=0, fail=False))
    server = processes.start("scorehost", str(path), workers=2)
    server.wait_healthy(60)
    statuses: list[int] = []
    versions: list[int] = []

    def load_for(seconds: float) -> None:
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            answer = send(server.url, Case("versioned.py", "POST", "/score", b"x"), timeout=10)
            statuses.append(answer.status)
            if answer.status == 200:
                versions.append(json.loads(answer.body)["version"])

    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            path.write_text(VERSIONED.format(version=2, init_s=1.5, fail=False))  # slow to load: old ones serve
            clients = [pool.submit(load_for, 6) for _ in range(2)]
            time.sleep(0.5)
            os.kill(server.pid, signal.SIGHUP)
            for c in clients:
                c.result()
        assert set(statuses) == {200}  # no request lost or refused while the new workers loaded
        assert versions[0] == 1 and set(versions[-20:]) == {2}  # both serve for a moment at the hand-over, then 2

        path.write_text(VERSIONED.format(version=3, init_s=0, fail=True))
        os.kill(server.pid, signal.SIGHUP)
        statuses.clear(), versions.clear()
        load_for(4)
        assert set(statuses) == {200} and set(versions) == {2}  # the old script goes on
        assert server.proc.poll() is None and "reload failed" in server.output()
    finally:
        server.stop()
