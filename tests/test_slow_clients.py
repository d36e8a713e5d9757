"""Slow, silent and idle clients against the HTTP front (server/front.py), with default settings unless a test
says otherwise: they hold a socket each, never a thread, so a normal request is still answered within a second;
a request that stops arriving is answered 408 and closed; an answer nobody reads is dropped."""

from __future__ import annotations

import json
import resource
import socket
import time

import pytest

from corpus import Case, send
from test_reliability import FAULTY, ok, status_and_json

KEY = "slow-client-key"


def timed_ok(server) -> float:
    started = time.monotonic()
    ok(server)
    return time.monotonic() - started


def connect(port: int, data: bytes = b"") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if data:
        s.sendall(data)
    return s


@pytest.fixture(scope="module")
def default_server(start_server):
    return start_server("scorehost", FAULTY)


@pytest.fixture(scope="module")
def strict_server(start_server):
    """Short timeouts, a key and a small body limit: what the 408, 100-continue and send-timeout tests need."""
    return start_server("scorehost", FAULTY, extra_args=("--read-timeout", "1", "--send-timeout", "2",
                                                          "--auth-key", KEY, "--max-body-bytes", "1000"))


@pytest.fixture(autouse=True, scope="module")
def enough_descriptors():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("count,first_bytes,settle_s", [
    (64, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\npart", 0.3),  # stalled uploads
    (500, b"", 0.3),  # silent connections
    (4, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nbig16", 1.0),  # never read a 16 MiB answer
], ids=["64 stalled uploads", "500 silent connections", "4 clients that never read"])
def test_bad_clients_do_not_delay_others(default_server, count, first_bytes, settle_s):
    held = [connect(default_server.port, first_bytes) for _ in range(count)]
    try:
        time.sleep(settle_s)
        assert timed_ok(default_server) < 1.0
    finally:
        for s in held:
            s.close()


def test_idle_keep_alive_connections_hold_no_thread(default_server):
    workers = _children(default_server.pid)
    before = {p: _threads(p) for p in workers}
    idle = []
    try:
        for _ in range(1000):
            s = connect(default_server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            idle.append(s)
        assert timed_ok(default_server) < 1.0
        assert {p: _threads(p) for p in workers} == before  # a thousand idle connections, no new thread
    finally:
        for s in idle:
            s.close()


def test_stalled_upload_is_answered_408_and_closed(strict_server):
    s = connect(strict_server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                + b"\r\nContent-Length: 100\r\n\r\nonly part")
    reply = _read_until_closed(s, 5)
    status, body = status_and_json(reply)
    assert status == 408 and "--read-timeout" in body["message"] and body["request_id"]
    assert b"connection: close" in reply.lower()
    ok_keyed(strict_server)


def test_stalled_header_block_is_answered_408(strict_server):
    reply = _read_until_closed(connect(strict_server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nX-Half"), 5)
    status, body = status_and_json(reply)
    assert status == 408 and body["request_id"]


def test_unread_answer_is_dropped_after_the_send_timeout(strict_server):
    s = connect(strict_server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                + b"\r\nContent-Length: 5\r\n\r\nbig32")
    time.sleep(4)  # send timeout 2 s: the server gives up on this client
    got = _read_until_closed(s, 10)
    assert got.startswith(b"HTTP/1.1 200") and len(got) < 32 * 1024 * 1024  # cut short: the connection was dropped
    ok_keyed(strict_server)


def test_expect_100_continue_only_after_auth_and_size_checks(strict_server):
    head = "POST /score HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: {n}\r\n{auth}\r\n"
    good = f"Authorization: Bearer {KEY}\r\n"
    for auth, n, status in (("", 4, 401), ("Authorization: Bearer wrong\r\n", 4, 401), (good, 5000, 413)):
        s = connect(strict_server.port, head.format(n=n, auth=auth).encode())
        reply = _read_until_closed(s, 5)  # answered on the head alone: no 100, body never sent
        assert b"100 Continue" not in reply and status_and_json(reply)[0] == status
    s = connect(strict_server.port, head.format(n=4, auth=good).encode())
    assert s.recv(4096) == b"HTTP/1.1 100 Continue\r\n\r\n"
    s.sendall(b"fine")
    status, body = status_and_json(_read_response(s.makefile("rb")))
    assert status == 200 and body == {"ok": "fine"}


def test_pipelined_requests_are_answered_in_order(default_server):
    requests = b"".join(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(b), b)
                        for b in (b"one", b"sleep0.2", b"three"))
    s = connect(default_server.port, requests)
    replies = s.makefile("rb")
    answers = [json.loads(_read_response(replies).partition(b"\r\n\r\n")[2]) for _ in range(3)]
    assert answers == [{"ok": "one"}, {"ok": "sleep0.2"}, {"ok": "three"}]


def ok_keyed(server) -> None:
    answer = send(server.url, Case("faulty.py", "POST", "/score", b"fine", (("Authorization", f"Bearer {KEY}"),)))
    assert answer.status == 200


def _read_until_closed(s: socket.socket, timeout: float) -> bytes:
    s.settimeout(timeout)
    chunks = []
    try:
        while chunk := s.recv(1 << 20):
            chunks.append(chunk)
    except (socket.timeout, ConnectionResetError):
        pass
    s.close()
    return b"".join(chunks)


def _read_response(replies) -> bytes:
    """One answer from a buffered reader of the socket (what follows it stays in the buffer)."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += replies.readline()
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    return head + replies.read(length)


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))


def test_chunked_body_cut_short_never_reaches_run(default_server):
    s = connect(default_server.port, b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfine\r\n")
    s.shutdown(socket.SHUT_WR)  # the client stops before the last chunk
    status, body = status_and_json(_read_until_closed(s, 5))
    assert status == 400 and "before the chunked body ended" in body["message"] and body["request_id"]
    ok(default_server)
