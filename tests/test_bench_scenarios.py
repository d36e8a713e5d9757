"""`scorehost bench --scenario server` on a script of known capacity: bench/scripts/fixed_cost.py, whose run() takes
40 ms, one worker, one run() at a time (about 25 requests a second).

Open loop with latency from each request's scheduled send time must show the queue an overloaded server builds,
and the p99 search must land where queueing theory puts it. For Poisson arrivals and a fixed 40 ms service (M/D/1)
the steady-state p99 is 98 ms at 5 req/s, 141 ms at 10 and 444 ms at 20 (bench/RESULTS.md), so p99 <= 100 ms holds
up to about 5.5 req/s; a search step rests on 125 requests, which puts its p99 a little lower than the steady
state's; on a machine shared with other work (these 2 cores, during the test suite) latency tails grow and the
rate found falls. The bounds below hold for either, and fail for a closed-loop measurement (which reports p99
under 100 ms up to the full 25 requests a second) or for a search that ignores the bound.

The issue asked for a rate between 15 and 25 at p99 <= 100 ms: that is what evenly spaced arrivals give (D/D/1: no
queue until capacity), `--arrivals uniform` (wrk2's constant throughput), tested last."""

from __future__ import annotations

import json
import subprocess

import pytest

from scorehost import processes


@pytest.fixture(scope="module")
def forty_ms(start_server):
    return start_server("scorehost", "bench/scripts/fixed_cost.py", env={"FIXED_COST_MS": "40"})


def bench(url: str, tmp_path, *args: str) -> tuple[dict, str]:
    done = subprocess.run([processes._bin("scorehost"), "bench", "--url", url, "--scenario", "server", *args,
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads((tmp_path / "results.json").read_text())["outcomes"][0], done.stdout


def test_overload_shows_the_queue_it_builds(forty_ms, tmp_path):
    out, stdout = bench(forty_ms.url, tmp_path, "--qps", "50", "--seconds", "6")
    assert out["p99_ms"] > 1000 and out["answered_qps"] < 30
    first, *_, last = out["p99_by_second_ms"]
    assert last > first + 2000  # each second sent adds about 1 s of queue (25 more than the server answers)
    assert "latency grows through the run" in stdout and " ms" in stdout and "p99 " in stdout


def test_under_capacity_latency_stays_near_run_time(forty_ms, tmp_path):
    out, _ = bench(forty_ms.url, tmp_path, "--qps", "10", "--seconds", "6")
    assert 38 < out["p50_ms"] < 60 and out["p99_ms"] < 300
    assert max(x for x in out["p99_by_second_ms"] if x) < 300 and not out["errors"]


def test_p99_search_finds_the_rate_queueing_theory_predicts(forty_ms, tmp_path):
    out, stdout = bench(forty_ms.url, tmp_path, "--p99-ms", "100", "--seconds", "2", "--precision", "0.5")
    assert 1.5 <= out["offered_qps"] <= 12, out["steps"]
    assert out["p99_ms"] <= 100 and any(not s["met"] for s in out["steps"])
    assert "req/s with p99" in stdout


def test_p99_search_with_uniform_arrivals_finds_near_capacity(forty_ms, tmp_path):
    """One request every 1/rate: below capacity nothing queues, so p99 stays near 40 ms up to about 25 a second."""
    out, stdout = bench(forty_ms.url, tmp_path, "--p99-ms", "100", "--seconds", "2", "--arrivals", "uniform")
    assert 15 <= out["offered_qps"] <= 25, out["steps"]
    assert out["p99_ms"] < 80 and any(not s["met"] and s["rate"] < 30 for s in out["steps"])
    assert "arrivals (server scenario): uniform" in (tmp_path / "report.md").read_text()


@pytest.fixture(scope="module")
def json_sum(start_server):
    return start_server("scorehost", "bench/scripts/json_sum.py")


def test_p99_search_counts_refused_requests_as_failures(json_sum, tmp_path):
    """A script that answers 400 to every JPEG answers fast: no rate "meets" the bound with nothing but errors."""
    out, stdout = bench(json_sum.url, tmp_path, "--p99-ms", "100", "--seconds", "1")
    assert out["offered_qps"] == 0 and out["errors"].get("400") == out["requests"] > 0, out
    assert "answers were errors, most commonly 400" in stdout
