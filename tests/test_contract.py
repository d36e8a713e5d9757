"""Differential tests: every request of the corpus goes to scorehost and to Azure ML's own server (AIHS 1.5.1),
both running the same script as real processes; the answers must agree (see corpus.py for what is compared)."""

from __future__ import annotations

import http.client

import pytest

from conftest import script
from corpus import CORPUS, VARIANTS, Case, differences, is_routing_error, script_of, send

SCRIPTS_IN_CORPUS = sorted({c.script for c in CORPUS})


@pytest.fixture(scope="module")
def pairs(start_server):
    """script name -> (scorehost, aihs), started on first use."""
    cache = {}

    def get(name: str):
        if name not in cache:
            env, args = VARIANTS.get(name, ({}, ()))
            cache[name] = (start_server("scorehost", script(script_of(name)), env=env, extra_args=args),
                           start_server("aihs", script(script_of(name)), env=env, extra_args=args))
        return cache[name]

    return get


def test_corpus_is_broad_enough():
    assert len(CORPUS) >= 40
    assert len({script_of(name) for name in SCRIPTS_IN_CORPUS}) >= 5
    methods = {c.method for c in CORPUS}
    assert {"GET", "POST", "OPTIONS", "HEAD", "PUT", "DELETE", "PATCH"} <= methods


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_same_answer_as_azure_ml(pairs, case: Case):
    ours, theirs = pairs(case.script)
    a, b = send(ours.url, case), send(theirs.url, case)
    assert differences(case, a, b) == []


def test_routing_errors_carry_request_ids_on_purpose(pairs):
    """Deliberate difference: Azure ML's router answers 404/405 without contract headers; scorehost adds them, so
    every answer (a client's mistake included) can be traced by its request id."""
    ours, theirs = pairs("undecorated.py")
    for case in (Case("undecorated.py", "GET", "/nowhere"), Case("undecorated.py", "DELETE", "/score")):
        a, b = send(ours.url, case), send(theirs.url, case)
        assert is_routing_error(b) and b.header("x-request-id") is None
        assert a.status == b.status and a.body == b.body
        assert a.header("x-request-id") and a.header("x-ms-request-id") == a.header("x-request-id")


def test_keep_alive_on_purpose(pairs):
    """Deliberate difference: Azure ML answers `Connection: close` to everything; scorehost keeps connections."""
    ours, theirs = pairs("undecorated.py")
    assert send(theirs.url, Case("undecorated.py", "POST", "/score", b"x")).header("connection") == "close"
    conn = http.client.HTTPConnection("127.0.0.1", ours.port, timeout=10)
    try:
        for i in range(5):  # five requests, one connection
            conn.request("POST", "/score", body=f"n{i}".encode())
            r = conn.getresponse()
            assert r.status == 200 and r.getheader("Connection") == "keep-alive"
            assert f'"raw": "n{i}"' in r.read().decode()
        assert conn.sock is not None
    finally:
        conn.close()


def test_timeout_then_the_worker_keeps_serving(pairs):
    ours, _ = pairs("sleeper.py")
    for body in (b"2", b"0", b"1.5", b"0"):
        answer = send(ours.url, Case("sleeper.py", "POST", "/score", body))
        if body == b"0":
            assert answer.status == 200
        else:
            assert (answer.status, answer.body) == (500, b'{"message": "Scoring timeout after 500 ms"}')
            assert answer.header("x-ms-run-function-failed") == "True"


def test_script_failure_never_leaks_the_traceback(pairs):
    ours, _ = pairs("raises.py")
    for body in (b"boom", b"set"):
        answer = send(ours.url, Case("raises.py", "POST", "/score", body))
        assert answer.status == 500 and b"SECRET-TRACEBACK-TEXT" not in answer.body and b"Traceback" not in answer.body
    assert send(ours.url, Case("raises.py", "POST", "/score", b"ok")).status == 200
