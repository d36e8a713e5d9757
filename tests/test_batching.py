"""Dynamic batching and /metrics, against real gunicorn processes."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import pytest

from conftest import script
from corpus import Case, send

TAGGER = script("batch_tagger.py")


def post(server, body: str) -> tuple[int, dict, dict]:
    answer = send(server.url, Case("batch_tagger.py", "POST", "/score", body.encode()))
    return answer.status, json.loads(answer.body), {k: v[0] for k, v in answer.headers.items()}


def concurrently(server, bodies: list[str], clients: int) -> list[tuple[int, dict, dict]]:
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda b: post(server, b), bodies))


@pytest.fixture(scope="module")
def batched(start_server):
    return start_server("scorehost", TAGGER, extra_args=("--batch-max", "8", "--batch-delay-ms", "20",
                                                         "--threads", "16"))


def test_each_caller_gets_its_own_answer(batched):
    bodies = [f"request-{i}" for i in range(64)]
    answers = concurrently(batched, bodies, 16)
    assert [a[1]["tag"] for a in answers] == bodies
    assert all(a[0] == 200 and "x-ms-run-fn-exec-ms" in a[2] for a in answers)
    assert max(a[1]["batch"] for a in answers) > 1  # requests really were grouped


def test_a_failing_item_fails_only_itself(batched):
    bodies = ["a", "fail", "b", "raise", "c", "d", "e", "f"]
    answers = concurrently(batched, bodies, 8)
    statuses = dict(zip(bodies, (a[0] for a in answers)))
    assert statuses == {"a": 200, "fail": 400, "b": 200, "raise": 500, "c": 200, "d": 200, "e": 200, "f": 200}
    assert answers[3][1]["message"].startswith("An unexpected error occurred in scoring script")
    assert post(batched, "after")[0] == 200


def test_a_raising_batch_fails_its_requests_and_the_server_goes_on(batched):
    status, body, headers = post(batched, "explode")
    assert status == 500 and headers["x-ms-run-function-failed"] == "True" and "Traceback" not in str(body)
    assert post(batched, "after")[0] == 200


def test_batching_multiplies_throughput(batched):
    """run_batch() costs 50 ms for 1 or 8 items: 8 concurrent clients must get several times 1 client's rate."""
    def rate(clients: int, n: int) -> tuple[float, float]:
        started = time.perf_counter()
        answers = concurrently(batched, [str(i) for i in range(n)], clients)
        return n / (time.perf_counter() - started), sum(a[1]["batch"] for a in answers) / n

    one, _ = rate(1, 12)
    eight, mean_batch = rate(8, 96)
    assert mean_batch >= 3 and eight >= 3 * one, (one, eight, mean_batch)


def test_full_queue_answers_503_with_retry_after(start_server):
    small = start_server("scorehost", TAGGER, extra_args=("--batch-max", "2", "--batch-queue", "2",
                                                          "--batch-delay-ms", "1", "--threads", "24"))
    answers = concurrently(small, [str(i) for i in range(48)], 24)
    overloaded = [a for a in answers if a[0] == 503]
    assert overloaded and all(a[2]["retry-after"] == "1" for a in overloaded)
    assert "busy" in overloaded[0][1]["message"] and overloaded[0][1]["request_id"]
    assert all(a[0] in (200, 503) for a in answers)
    assert post(small, "after")[0] == 200


def test_scripts_without_run_batch_are_unchanged(start_server):
    server = start_server("scorehost", script("undecorated.py"), extra_args=("--batch-max", "8"))
    answer = send(server.url, Case("undecorated.py", "POST", "/score", b"plain"))
    assert answer.status == 200 and json.loads(answer.body)["raw"] == "plain"


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            if re.match(rf"{name}(\{{|\s)", line):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_what_was_served_across_workers(start_server):
    server = start_server("scorehost", TAGGER, workers=2, extra_args=("--batch-max", "4", "--threads", "8"))
    concurrently(server, [str(i) for i in range(20)], 8)
    send(server.url, Case("batch_tagger.py", "GET", "/nowhere"))
    post(server, "fail")
    answer = send(server.url, Case("batch_tagger.py", "GET", "/metrics"))
    assert answer.status == 200 and answer.header("content-type").startswith("text/plain")
    text = answer.body.decode()
    assert _sample(text, "scorehost_requests_total", route="/score", status="200") == 20
    assert _sample(text, "scorehost_requests_total", route="/score", status="400") == 1
    assert _sample(text, "scorehost_requests_total", route="unmatched", status="404") == 1
    assert _sample(text, "scorehost_batch_size_count") >= 5  # 21 requests in batches of at most 4
    assert _sample(text, "scorehost_batch_size_sum") == 21
    assert _sample(text, "scorehost_request_duration_seconds_count", route="/score") == 21
    assert "scorehost_batch_queue_wait_seconds_bucket" in text and "scorehost_run_duration_seconds_bucket" in text
    # what the policy learned, from the model process: batch_tagger costs 50 ms a call whatever its size
    assert 0.045 <= _sample(text, "scorehost_batch_cost_fixed_seconds") <= 0.09, text
    assert _sample(text, "scorehost_batch_cost_per_item_seconds") <= 0.005
    assert 1 <= _sample(text, "scorehost_batch_clients") <= 21
    assert len(re.findall(r"^scorehost_batch_clients\{pid=", text, re.M)) == 1  # one model process


def test_metrics_behind_the_key_when_one_is_set(start_server):
    server = start_server("scorehost", TAGGER, extra_args=("--auth-key", "k1"))
    assert send(server.url, Case("x", "GET", "/metrics")).status == 401
    assert send(server.url, Case("x", "GET", "/metrics", None, (("Authorization", "Bearer k1"),))).status == 200


def _workers_seen(server, want: int, within_s: float = 60) -> dict[int, str]:
    """pid -> pinned GPU of the workers seen answering, until `want` are seen (one may still be booting)."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + within_s
    while len(seen) < want and time.monotonic() < deadline:
        body = json.loads(send(server.url, Case("which_gpu.py", "POST", "/score", b"x")).body)
        seen[body["pid"]] = body["gpu"]
        assert body["growth"] == "true"
    return seen


def test_one_worker_per_gpu_each_pinned(start_server):
    """GPUs are taken from CUDA_VISIBLE_DEVICES, so this runs on a CPU machine: two 'GPUs', two workers."""
    import os
    import signal

    server = start_server("scorehost", script("which_gpu.py"), env={"CUDA_VISIBLE_DEVICES": "3,5"},
                          workers=None, extra_args=("--threads", "1", "--keepalive", "0"))
    seen = _workers_seen(server, 2)
    assert sorted(seen.values()) == ["3", "5"]
    victim = next(pid for pid, gpu in seen.items() if gpu == "5")
    os.kill(victim, signal.SIGKILL)
    time.sleep(0.5)
    after = _workers_seen(server, 2)
    assert victim not in after and sorted(after.values()) == ["3", "5"]  # the replacement took over GPU 5
