"""The server core under faults, from outside (issue 18): real server processes on 127.0.0.1, attacked as an
operator's bad day would. Each test names the finding it covers; each failed on the main of 2026-12-01 (the closing
note of issue 18 says how). The state machines themselves are tested in process (test_connection.py,
test_model_server.py)."""

from __future__ import annotations

import concurrent.futures
import contextlib
import glob
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

import pytest

from conftest import script
from corpus import Case, send
from scorehost import processes
from test_model_process import colour, jpeg

ODD = script("odd_results.py")
FRAMING = script("framing.py")
BATCHED = {"env": {"CUDA_VISIBLE_DEVICES": "0"}, "workers": 1}


def post(server, body: bytes, timeout: float = 30, headers=()):
    return send(server.url, Case("x", "POST", "/score", body, tuple(headers)), timeout=timeout)


def answers_until_closed(port: int, data: bytes, *, shut_write: bool = False, timeout: float = 15) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        if shut_write:
            s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(1 << 20)
            except (socket.timeout, ConnectionResetError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def statuses(reply: bytes) -> list[int]:
    return [int(m) for m in re.findall(rb"HTTP/1\.1 (\d{3}) ", reply)]


# --- 1, 2: one odd result fails one request --------------------------------------------------------------------

@pytest.fixture(scope="module")
def odd(start_server):
    return start_server("scorehost", ODD, extra_args=("--batch-max", "8", "--batch-delay-ms", "20",
                                                      "--scoring-timeout-ms", "2000", "--hung-grace", "1"), **BATCHED)


def test_a_result_the_http_worker_cannot_unpickle_fails_that_request_only(odd):
    """Finding 1: the link's reader died; later requests waited for the scoring timeout and /ready stayed 200."""
    answer = post(odd, b"local")
    assert answer.status == 500 and b"cannot be read back" in answer.body and answer.header("x-request-id")
    started = time.monotonic()
    for i in range(20):
        assert post(odd, b"ok%d" % i).status == 200
    assert time.monotonic() - started < 5
    assert send(odd.url, Case("x", "GET", "/ready")).status == 200


def test_a_result_that_does_not_pickle_fails_that_request_only_and_the_model_process_lives(odd):
    """Finding 2: the model process died and 16 of 24 innocent requests got 503."""
    before = json.loads(post(odd, b"first").body)["pid"]
    bodies = [b"lock" if i == 5 else b"ok%d" % i for i in range(16)]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: post(odd, b), bodies))
    assert [a.status for a in answers] == [500 if b == b"lock" else 200 for b in bodies]
    assert b"cannot be sent back" in answers[5].body
    assert json.loads(post(odd, b"after").body)["pid"] == before


# --- 3: a hung call does not take its neighbours --------------------------------------------------------------

def test_an_http_error_run_batch_gives_one_item_is_that_items_status(odd):
    """As preprocess() may raise BadRequest for its status, run_batch() may give one as an item's result: it was 500."""
    answer = post(odd, b"refused")
    assert answer.status == 400 and b"This item is not for this model." in answer.body
    assert post(odd, b"fine").status == 200


def test_a_hung_run_answers_every_request_its_worker_holds_before_it_restarts(start_server):
    """Finding 3: past --hung-grace the worker os._exit()ed and closed the 10 requests it held unanswered."""
    stuck = start_server("scorehost", script("stuck.py"), extra_args=("--scoring-timeout-ms", "500",
                                                                       "--hung-grace", "1"))
    with concurrent.futures.ThreadPoolExecutor(11) as pool:
        hung = pool.submit(post, stuck, b"native")
        time.sleep(0.2)
        others = [pool.submit(post, stuck, b"fine%d" % i) for i in range(10)]
        answers = [f.result() for f in others]  # raises if a connection was closed unanswered
    assert hung.result().status == 500
    assert all(a.status in (200, 503) for a in answers), [a.status for a in answers]
    assert all(a.header("retry-after") == "1" and b"Retry shortly" in a.body for a in answers if a.status == 503)


def test_a_slow_preprocess_is_answered_at_the_deadline_and_its_neighbours_are_served(odd):
    """Finding 3, batching: preprocess() had no deadline; past --hung-grace its worker died with 8 in flight.
    Here one preprocess() takes 3.5 s (deadline 2 s, grace 1 s: the worker must go at 3 s) while 8 others, started
    at 1.8 s, take 1.5 s each: they finish after the worker knows it must exit, and are still answered."""
    with concurrent.futures.ThreadPoolExecutor(9) as pool:
        slow = pool.submit(post, odd, b"nap:3.5")
        time.sleep(1.8)
        others = [pool.submit(post, odd, b"nap:1.5") for _ in range(8)]
        answers = [f.result() for f in others]
    assert slow.result().status == 500 and b"Scoring timeout after 2000 ms" in slow.result().body
    assert [a.status for a in answers] == [200] * 8


# --- 4: shutdown and reload in batching mode lose nothing -----------------------------------------------------

def _napping(**kwargs) -> processes.ServerProcess:
    """Two HTTP workers of two threads each feed one model process; preprocess('nap:S') takes S seconds, so a
    request spends its time in an HTTP worker and the model process's queue is often empty for a moment, as when
    decoding dominates."""
    server = processes.start("scorehost", ODD, workers=2, env={"CUDA_VISIBLE_DEVICES": "0"},
                             extra_args=("--batch-max", "4", "--threads", "2"), **kwargs)
    return server.wait_healthy(60)


def test_sigterm_in_batching_mode_answers_every_request_in_flight():
    """Finding 4: the model process left as soon as its queue was empty for a moment while its HTTP workers still
    drained: 15 of 16 got 503."""
    server = _napping()
    try:
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(post, server, b"nap:0.8") for _ in range(12)]
            time.sleep(0.3)
            os.kill(server.pid, signal.SIGTERM)
            answers = [f.result() for f in futures]
        assert [a.status for a in answers] == [200] * 12, [a.body[:200] for a in answers if a.status != 200]
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # 0A: LISTEN
                    inodes.add(fields[9])
    return inodes


def _holds(pid: int, inodes: set[str]) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{inode}]" for inode in inodes}:
                return True
    return False


def test_the_model_process_holds_no_http_listener():
    """Attacked from outside: the model process kept the HTTP listeners it inherited from the fork, so during a
    graceful stop, once the HTTP workers had closed theirs, new connections were still taken into the backlog,
    then reset unanswered when the model process exited. Only the HTTP workers (and the master) hold them."""
    server = _napping()
    try:
        inodes = _listening_inodes(server.port)
        assert inodes
        deadline = time.monotonic() + 30
        while len(_children(server.pid)) < 3 and time.monotonic() < deadline:  # the second HTTP worker may boot later
            time.sleep(0.1)
        holders = [pid for pid in _children(server.pid) if _holds(pid, inodes)]
        assert len(holders) == 2, holders  # the two HTTP workers; not the model process
    finally:
        server.stop()


def _answer_or_refusal(port: int, sock: Optional[socket.socket] = None, wait_s: float = 0.0) -> str:
    """A POST on a new connection (or on `sock`, connected earlier, after `wait_s`): its status line, or "refused";
    a reset (accepted, then dropped) fails."""
    try:
        sock = sock or socket.create_connection(("127.0.0.1", port), timeout=15)
    except ConnectionRefusedError:
        return "refused"
    with sock:
        time.sleep(wait_s)
        sock.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 7\r\n\r\nnap:0.1")
        reply = b""
        while chunk := sock.recv(65536):  # ConnectionResetError: the failure these tests are about
            reply += chunk
    return reply.split(b"\r\n", 1)[0].decode()


ANSWERED = ("HTTP/1.1 200 OK", "HTTP/1.1 503 Service Unavailable")


@pytest.mark.parametrize("after_s", [0.0, 0.05, 0.15])
def test_a_connection_made_just_after_sigterm_is_answered_or_refused_never_reset(after_s):
    """Attacked from outside: a client that connected in the quarter second after SIGTERM was reset (4 runs of
    4): the worker stopped accepting at once but closed its listener only at its next tick, and the kernel reset
    what waited in the backlog then. Now the stop acts at once, and what the backlog holds is taken and answered."""
    server = _napping()
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            busy = pool.submit(post, server, b"nap:0.6")  # a request in flight: the workers drain, not just exit
            time.sleep(0.2)
            os.kill(server.pid, signal.SIGTERM)
            time.sleep(after_s)
            assert _answer_or_refusal(server.port) in ("refused", *ANSWERED)
            assert busy.result().status == 200
    finally:
        server.stop()


def test_a_connection_whose_request_comes_after_sigterm_is_answered_not_reset():
    """A client connected, then SIGTERM came before its request (a moment behind on busy cores: the cause of resets
    in the CI runs of an earlier attempt at the test above). With nothing else busy the worker closed it at once,
    unanswered, and the request that came next was reset. A new connection is waited for (up to a second)."""
    server = _napping()
    try:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=15)
        time.sleep(0.2)  # accepted by a worker
        os.kill(server.pid, signal.SIGTERM)
        assert _answer_or_refusal(server.port, sock, wait_s=0.4) in ANSWERED
        assert server.proc.wait(30) == 0
    finally:
        server.stop()


@pytest.mark.parametrize("to", ["master", "group"])
def test_sighup_reload_in_batching_mode_answers_every_request(to):
    """Finding 4: 6-7 of ~450 requests got 503 across a reload. A SIGHUP to the whole process group (a closed
    terminal, `kill -HUP -PGID`) ended every worker at once, and what they held got no answer at all."""
    server = _napping()
    got: list[int] = []
    try:
        def load(seconds: float) -> None:
            until = time.monotonic() + seconds
            while time.monotonic() < until:
                got.append(post(server, b"nap:0.6").status)

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            clients = [pool.submit(load, 7) for _ in range(6)]
            time.sleep(1)
            (os.kill if to == "master" else os.killpg)(server.pid, signal.SIGHUP)
            for c in clients:
                c.result()
        assert len(got) > 30 and set(got) == {200}, {s: got.count(s) for s in set(got)}
        assert "reload: the new workers are ready" in server.output()
    finally:
        server.stop()


def test_a_model_process_hung_when_a_reload_stops_it_is_killed_after_the_graceful_timeout(start_server):
    """It lived until its scoring timeout and --hung-grace (up to an hour by default), holding a second copy of the
    model beside the new generation's. Its hung request is answered 503 by its HTTP worker at the graceful end."""
    server = start_server("scorehost", script("pipeline.py"), env={"CUDA_VISIBLE_DEVICES": "0"}, workers=1,
                          extra_args=("--graceful-timeout", "2", "--scoring-timeout-ms", "120000",
                                      "--hung-grace", "120"))
    old = set(_children(server.pid))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        hung = pool.submit(send, server.url, Case("x", "POST", "/score?hang=1", jpeg(colour(1)), ()), 60)
        time.sleep(1)
        os.kill(server.pid, signal.SIGHUP)
        deadline = time.monotonic() + 60
        while "reload: the new workers are ready" not in server.output() and time.monotonic() < deadline:
            time.sleep(0.2)
        retired = time.monotonic()
        assert hung.result().status == 503
    while any(os.path.exists(f"/proc/{pid}") for pid in old) and time.monotonic() < retired + 10:
        time.sleep(0.2)
    assert not any(os.path.exists(f"/proc/{pid}") for pid in old), server.output()[-2000:]
    assert time.monotonic() - retired < 6
    assert "still alive after --graceful-timeout: killed" in server.output()
    assert post(server, jpeg(colour(2))).status == 200


# --- 5, 12, 13, 14, 15: HTTP as a mature server does it --------------------------------------------------------

@pytest.fixture(scope="module")
def framing(start_server):
    return start_server("scorehost", FRAMING, extra_args=("--read-timeout", "1", "--threads", "4"))


def test_a_big_answer_to_a_run_slower_than_the_read_timeout_arrives_whole(framing):
    """Finding 5: the stale read deadline cut 8 MiB answers at ~3.9 MB."""
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: post(framing, b"big:1.3", 60), range(4)))
    assert [(a.status, len(a.body)) for a in answers] == [(200, 8 << 20)] * 4


def test_trailer_fields_never_become_headers(framing):
    """Finding 12."""
    reply = answers_until_closed(framing.port, b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                 b"Connection: close\r\n\r\n2\r\nhi\r\n0\r\nX-Forwarded-For: 6.6.6.6\r\n"
                                 b"x-request-id: evil\r\n\r\n")
    body = json.loads(reply.partition(b"\r\n\r\n")[2])
    assert body["echo"] == "hi" and body["forwarded"] is None and body["x-request-id"] != "evil"


def test_an_answer_is_framed_by_its_real_length(framing):
    """Finding 13: the app's Content-Length: 5 went out with 30 bytes; the next answer was then misread."""
    reply = answers_until_closed(framing.port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nliar"
                                 b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    first, _, rest = reply.partition(b"\r\n\r\n")
    assert first.lower().count(b"content-length") == 1 and b"Content-Length: 30" in first
    assert rest.startswith(b"x" * 30 + b"HTTP/1.1 200 ")
    assert statuses(reply) == [200, 200]


def test_pipelined_requests_then_a_half_close_are_all_answered(framing):
    """Finding 14: one of three was answered."""
    requests = b"".join(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nnap:0.%d00" % i for i in (3, 2, 1))
    reply = answers_until_closed(framing.port, requests, shut_write=True)
    assert statuses(reply) == [200, 200, 200] and reply.count(b'"echo": "nap:') == 3


def _naps(*seconds: float) -> bytes:
    return b"".join(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 9\r\n\r\nnap:%.3f" % s for s in seconds)


def test_requests_pipelined_behind_a_timed_out_one_are_answered(start_server):
    """Attacked from outside: the timeout's 500 said `Connection: close`, and the requests pipelined behind it
    (accepted) got nothing. They are answered after it, on the same connection."""
    server = start_server("scorehost", FRAMING, extra_args=("--scoring-timeout-ms", "500"))
    reply = answers_until_closed(server.port, _naps(0.9, 0, 0), shut_write=True)
    assert statuses(reply) == [500, 200, 200], reply
    assert reply.count(b"Connection: keep-alive") >= 2 and b"Connection: close" not in reply.partition(b"nap:0.000")[0]


def test_a_call_past_the_scoring_timeout_is_one_request_counted_logged_and_recorded_once(start_server, tmp_path):
    """Attacked from outside: the timeout's 500 and the call's late return (dropped) were each counted in /metrics
    and logged, and --record kept the dropped late answer, under a request id the client never saw."""
    record = tmp_path / "rec"
    server = start_server("scorehost", script("sleeper.py"), workers=1,
                          extra_args=("--scoring-timeout-ms", "500", "--access-log", "true", "--record", str(record)))
    answer = post(server, b"1.2")  # time.sleep in C: the call returns 0.7 s after its timeout's answer
    assert answer.status == 500 and b"Scoring timeout" in answer.body
    time.sleep(1.5)  # the late return comes and is dropped
    metrics = send(server.url, Case("x", "GET", "/metrics")).body.decode()
    assert re.findall(r'scorehost_requests_total\{[^}]*route="/score"[^}]*\} (\S+)', metrics) == ["1.0"], metrics
    assert len(re.findall(r'"POST /score HTTP/1.1" ', server.output())) == 1, server.output()[-3000:]
    recorded, = (json.loads(f.read_text()) for f in record.glob("*.json"))
    assert recorded["response"]["status"] == 500
    assert ["x-request-id", answer.header("x-request-id")] in [[k.lower(), v] for k, v in
                                                               recorded["response"]["headers"]]


def test_requests_pipelined_on_a_connection_when_sigterm_comes_are_all_answered():
    """Attacked from outside: 10 pipelined requests, then SIGTERM: the answer being made said close, and the 9
    behind it got nothing (1-3 of 10 answered, 7 runs of 7). They are served within the graceful stop."""
    server = processes.start("scorehost", FRAMING, workers=1).wait_healthy(60)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(_naps(*[0.2] * 6))
            assert sock.recv(12) == b"HTTP/1.1 200"  # the first is answered: the rest are parsed and waiting
            os.killpg(server.pid, signal.SIGTERM)
            reply = b"HTTP/1.1 200"
            while chunk := sock.recv(1 << 20):
                reply += chunk
        assert statuses(reply) == [200] * 6 and reply.count(b"Connection: close") == 1, reply
    finally:
        server.stop()


def test_chunked_framing_past_the_heads_limit_is_431_json_and_the_server_serves_on(framing):
    """Attacked from outside: trailer fields after a 5-byte chunked body were read for as long as they came (12 GB)."""
    flood = b"T: " + b"a" * 8000 + b"\r\n"
    reply = answers_until_closed(framing.port, b"POST /score HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                                 b"\r\n5\r\nhello\r\n0\r\n" + flood * 130)
    assert statuses(reply) == [431] and b'"request_id"' in reply and b"chunked body's framing" in reply
    assert send(framing.url, Case("x", "POST", "/score", b"next")).status == 200


@pytest.mark.parametrize("request_bytes", [
    b"GET /\r\n\r\n",
    b"GET / HTTP/2.0\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    b"POST /score HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
], ids=["http-0.9", "http-2.0", "two-hosts", "chunked-http-1.0"])
def test_what_gunicorn_and_aihs_refuse_is_400(framing, request_bytes):
    """Finding 15: these got 200."""
    reply = answers_until_closed(framing.port, request_bytes)
    assert statuses(reply) == [400] and b'"request_id"' in reply


@pytest.mark.parametrize("query", [
    "reason=OK%0d%0aSet-Cookie:%20session=attacker%0d%0aContent-Length:%200%0d%0a%0d%0aHTTP/1.1%20200%20OK",
    "header=Y%0d%0aSet-Cookie:%20session=attacker",
])
def test_a_line_break_the_script_puts_in_its_status_or_a_header_name_is_a_500_not_a_forged_answer(framing, query):
    """Attacked from outside: werkzeug checks header values, not a status reason or a header name, and the front
    wrote them as they were: the client got an injected Set-Cookie (and a whole forged second answer). gunicorn
    (AIHS) refuses both with a 500."""
    reply = answers_until_closed(framing.port, f"GET /score?{query} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                 "\r\n".encode())
    assert statuses(reply) == [500] and b"Set-Cookie" not in reply, reply
    assert post(framing, b"fine").status == 200


def test_a_child_that_run_forks_and_that_returns_exits_instead_of_serving(framing):
    """Attacked from outside: the child went back to the app thread's loop and lived on, holding the worker's
    listening sockets after the server stopped (the port stayed taken). AIHS's child exits."""
    assert json.loads(post(framing, b"fork").body) == {"child": False}
    def live(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    workers = _children(framing.pid)
    deadline = time.monotonic() + 10
    while any(live(c) for w in workers for c in _children(w)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(live(c) for w in workers for c in _children(w))


@pytest.fixture(scope="module")
def streaming(start_server):
    return start_server("scorehost", script("streamed.py"), workers=1, extra_args=("--worker-timeout", "3"))


@pytest.mark.parametrize("version", ["1.1", "1.0"])
def test_a_streamed_part_that_is_not_bytes_cuts_that_answer_and_the_worker_serves_on(streaming, version):
    """Attacked from outside: a generator that yielded a dict after its first part left the app thread waiting
    for good (HTTP/1.1: every later request to the worker hung) or killed the loop thread (HTTP/1.0: the worker
    died with what it held). AIHS cuts that answer short and serves the next."""
    worker, = _children(streaming.pid)
    reply = answers_until_closed(streaming.port, f"GET /score?parts=3&odd_at=1 HTTP/{version}\r\nHost: x\r\n"
                                 "Connection: close\r\n\r\n".encode())
    assert statuses(reply) == [200] and b"part 0 of 3" in reply and not reply.endswith(b"0\r\n\r\n"), reply
    assert send(streaming.url, Case("x", "GET", "/score?parts=1"), timeout=10).body == b"part 0 of 1\n"
    assert _children(streaming.pid) == [worker]
    assert "must be bytes or str, not dict" in streaming.output()


def test_a_stream_that_makes_no_part_for_the_worker_timeout_restarts_the_worker(streaming):
    """Attacked from outside: a generator stuck after its first part held the worker's only app thread for good,
    and every later request hung (the scoring timeout covers run() and the first part; the loop kept gunicorn's
    --worker-timeout from firing). As AIHS's sync worker after --worker-timeout, the worker is replaced; scorehost
    answers what it holds first."""
    worker, = _children(streaming.pid)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        stuck = pool.submit(answers_until_closed, streaming.port, b"GET /score?parts=2&gap_ms=600000 HTTP/1.1\r\n"
                            b"Host: x\r\n\r\n", timeout=30)
        time.sleep(0.5)
        behind = pool.submit(send, streaming.url, Case("x", "GET", "/score?parts=1"), 30)
        assert b"part 0 of 2" in stuck.result() and b"part 1" not in stuck.result()
        assert behind.result().status in (200, 503)  # answered: by the stuck worker's evacuation or its successor
        assert behind.result().status == 200 or behind.result().header("retry-after")
    assert send(streaming.url, Case("x", "GET", "/score?parts=1"), timeout=20).body == b"part 0 of 1\n"
    assert _children(streaming.pid) != [worker]
    assert "a streamed answer has made no part for 3 s (--worker-timeout)" in streaming.output()


def test_no_100_continue_for_http_1_0(framing):
    reply = answers_until_closed(framing.port, b"POST /score HTTP/1.0\r\nContent-Length: 2\r\nExpect: 100-continue"
                                 b"\r\n\r\nok")
    assert statuses(reply) == [200]


# --- 6: bodies in flight are bounded --------------------------------------------------------------------------

def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read())[1]) / 1024


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_bodies_in_flight_are_bounded_per_worker(start_server):
    """Finding 6: 32 clients x 16 MiB took one worker to 591 MiB (AIHS 92-98 MiB)."""
    server = start_server("scorehost", script("sleeper.py"), workers=1)
    worker, = _children(server.pid)
    body = b"0.5" + b" " * ((16 << 20) - 3)  # run() sleeps 0.5 s: the bodies pile up
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda _: post(server, body, 60), range(32)))
    codes = [a.status for a in answers]
    assert set(codes) <= {200, 503} and codes.count(200) >= 4, codes
    assert all(a.header("retry-after") for a in answers if a.status == 503)
    assert _rss_mb(worker) < 400, _rss_mb(worker)


def test_an_unauthenticated_body_on_a_doubled_slash_is_refused_on_its_head(start_server):
    """Finding 6: with --auth-key, `POST //score` was read in full before its 401."""
    server = start_server("scorehost", FRAMING, extra_args=("--auth-key", "k1"))
    started = time.monotonic()
    reply = answers_until_closed(server.port, b"POST //score HTTP/1.1\r\nHost: x\r\nContent-Length: 16000000\r\n\r\n"
                                 + b"z" * 1000, timeout=10)
    assert statuses(reply) == [401] and time.monotonic() - started < 3


# --- 7: out of descriptors ------------------------------------------------------------------------------------

def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_accept_rests_instead_of_spinning(tmp_path):
    """Finding 7: at the descriptor limit the loop spun on accept(): 95-99% CPU, ~60,000 log lines a second."""
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (96, 96))

    port = processes.free_port()
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([processes._bin("scorehost"), "serve", "--entry-script", script("undecorated.py"),
                                 "--port", str(port), "--workers", "1"], preexec_fn=low_limit,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    socks = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        worker, = _children(proc.pid)
        for _ in range(150):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)
        before = _cpu_s(worker)
        time.sleep(2)
        assert _cpu_s(worker) - before < 0.5  # resting, not spinning
    finally:
        for s in socks:
            s.close()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    output = log.read_text(errors="replace")
    assert 1 <= output.count("accept failed") <= 5, output.count("accept failed")


# --- 8: a preflight never reaches the script ------------------------------------------------------------------

def test_a_cors_preflight_without_a_key_never_reaches_the_script(start_server):
    """Finding 8: with --auth-key and --cors-origins, an OPTIONS preflight reached run() with the caller's query."""
    server = start_server("scorehost", FRAMING, extra_args=("--auth-key", "k1", "--cors-origins", "https://a.example"))
    answer = send(server.url, Case("x", "OPTIONS", "/score?secret=1", b"", (
        ("Origin", "https://a.example"), ("Access-Control-Request-Method", "POST"))))
    assert answer.status == 200 and answer.body == b""  # run() would have echoed
    assert answer.header("access-control-allow-origin") == "https://a.example"


# --- 10, 11: restarts and idle scrapers ----------------------------------------------------------------------

def test_a_restart_on_the_same_port_right_after_traffic_starts_at_once():
    """Finding 10: exit 2 ("another server may hold it") for up to 60 s while TIME_WAIT sockets remained."""
    port = processes.free_port()
    first = processes.start("scorehost", FRAMING, port=port).wait_healthy(60)
    try:
        for i in range(20):  # the server closes first: TIME_WAIT on its port
            answers_until_closed(port, b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                       b"Content-Length: 1\r\n\r\n%d" % (i % 10))
    finally:
        first.stop()
    second = processes.start("scorehost", FRAMING, port=port)
    try:
        second.wait_healthy(60)
    finally:
        second.stop()


def test_an_idle_scraper_is_closed_after_the_keepalive(start_server):
    """Finding 11: after GET /, /ready or /metrics the connection stayed in the reading state (30 s)."""
    server = start_server("scorehost", FRAMING, extra_args=("--keepalive", "1"))
    for path in (b"/", b"/ready", b"/metrics"):
        started = time.monotonic()
        reply = answers_until_closed(server.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n", timeout=20)
        assert statuses(reply) == [200] and time.monotonic() - started < 4, path


# --- 16, 17: the key and the metrics files --------------------------------------------------------------------

@pytest.mark.parametrize("how", ["flag", "environment"])
def test_the_entry_script_cannot_read_the_key(start_server, how):
    """Finding 16: SCOREHOST_AUTH_KEY stayed in os.environ and --auth-key in every worker's argv."""
    key = f"key-{how}-0123456789"
    if how == "flag":
        server = start_server("scorehost", script("key_probe.py"), extra_args=("--auth-key", key))
    else:
        server = start_server("scorehost", script("key_probe.py"), env={"SCOREHOST_AUTH_KEY": key})
    answer = send(server.url, Case("x", "POST", "/score", key.encode(), (("Authorization", f"Bearer {key}"),)))
    assert answer.status == 200 and json.loads(answer.body) == []


def test_worker_restarts_leave_a_bounded_number_of_metrics_files(start_server):
    """Finding 17: each restart left its files; after 40 a scrape took 14-20 ms instead of 4-5."""
    server = start_server("scorehost", FRAMING, workers=1)
    metrics_dir, = glob.glob(f"/tmp/scorehost-metrics-{server.pid}-*")
    for i in range(6):
        post(server, b"count")
        worker, = _children(server.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            children = _children(server.pid)
            if children and children != [worker] and send(server.url, Case("x", "GET", "/ready")).status == 200:
                break
            time.sleep(0.2)
    post(server, b"count")
    files = glob.glob(os.path.join(metrics_dir, "*.db"))
    assert len(files) <= 4, files  # the live worker's two, and one archive per kind
    text = send(server.url, Case("x", "GET", "/metrics")).body.decode()
    served = re.search(r'scorehost_requests_total\{method="POST",route="/score",status="200"\} (\d+)', text)
    assert served and int(served[1]) >= 7  # nothing counted was lost with the dead workers' files


# --- found by the review of this change ----------------------------------------------------------------------

def _idle_cpu_s(pid: int, seconds: float = 2.0) -> float:
    before = _cpu_s(pid)
    time.sleep(seconds)
    return _cpu_s(pid) - before


def test_probes_in_any_spelling_answer_at_once_while_run_is_busy(start_server):
    """Attacked from outside: GET /, /ready and /metrics answered at once behind a long run(), but HEAD /ready,
    HEAD /metrics and GET //ready queued behind it (up to the scoring timeout, an hour by default, for a hung
    run()): the fast routes matched the exact method and path."""
    server = start_server("scorehost", script("sleeper.py"), extra_args=("--threads", "1"))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = pool.submit(post, server, b"3")
        time.sleep(0.5)
        for method, path in (("HEAD", "/ready"), ("HEAD", "/metrics"), ("GET", "//ready"), ("HEAD", "/"),
                             ("GET", "//")):
            began = time.monotonic()
            answer = send(server.url, Case("probe", method, path, b""), timeout=10)
            assert answer.status == 200 and time.monotonic() - began < 1.0, (method, path, answer.status)
            assert answer.body == b"" or method == "GET"
        assert not busy.done()  # every probe above was answered while run() still ran
        assert busy.result().status == 200


def test_pipelined_probes_with_keepalive_0_do_not_kill_the_worker(start_server):
    """Three pipelined GET / in one packet, the first answered with a close: the third crashed the loop."""
    server = start_server("scorehost", FRAMING, workers=1, extra_args=("--keepalive", "0"))
    worker, = _children(server.pid)
    reply = answers_until_closed(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
    assert statuses(reply) == [200]
    assert post(server, b"still").status == 200 and _children(server.pid) == [worker]


def test_signals_and_reset_clients_do_not_make_the_loop_spin(start_server):
    """gunicorn's signal pipe was never read (SIGUSR1, SIGWINCH: the loop spun for ever), and a client reset while
    its request ran kept reporting EPOLLHUP (the loop spun until run() returned)."""
    server = start_server("scorehost", FRAMING, workers=1)
    worker, = _children(server.pid)
    os.kill(server.pid, signal.SIGUSR1)  # log reopening: the master passes it on to its workers
    os.kill(worker, signal.SIGWINCH)  # a terminal resize reaches the whole process group
    assert _idle_cpu_s(worker) < 0.3
    s = socket.create_connection(("127.0.0.1", server.port))
    s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nnap:4")
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # close with a reset
    s.close()
    assert _idle_cpu_s(worker) < 0.3
    assert post(server, b"after").status == 200


def test_sigterm_answers_what_outlasts_the_graceful_timeout_503_before_the_master_kills():
    """On SIGTERM the master SIGKILLs at --graceful-timeout: the worker's own clock started later and lost the race
    (the client saw a dropped connection, not a 503)."""
    server = processes.start("scorehost", FRAMING, workers=1, extra_args=("--graceful-timeout", "3")).wait_healthy(60)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post, server, b"nap:10")
            time.sleep(0.5)
            os.kill(server.pid, signal.SIGTERM)
            answer = slow.result()
        assert answer.status == 503 and answer.header("retry-after") == "1"
    finally:
        server.stop()


SLOW_INIT = '''
import os, time

def init():
    time.sleep(float(os.environ.get("INIT_S", "0")))

def run(data):
    return {"pid": os.getpid()}
'''


def test_a_worker_booting_does_not_stop_the_others_from_accepting(tmp_path):
    """A booting worker counted as holding 0 connections: every live worker with 2 or more refused new ones (and
    spun) until it had booted."""
    entry = tmp_path / "slow_init.py"
    entry.write_text(SLOW_INIT)
    server = processes.start("scorehost", str(entry), workers=2).wait_healthy(60)
    held, pids = [], set()
    try:
        deadline = time.monotonic() + 30
        while (len(held) < 4 or len(pids) < 2) and time.monotonic() < deadline:  # keep-alive on both workers
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
            pids.add(json.loads(s.recv(4096).partition(b"\r\n\r\n")[2])["pid"])
            held.append(s)
        assert len(pids) == 2
        entry.write_text(SLOW_INIT.replace('"0"', '"6"'))
        os.kill(min(pids), signal.SIGKILL)  # its replacement re-imports the script: a 6 s init()
        time.sleep(0.5)
        started = time.monotonic()
        assert post(server, b"new", timeout=10).status == 200
        assert time.monotonic() - started < 2
    finally:
        for s in held:
            s.close()
        server.stop()
