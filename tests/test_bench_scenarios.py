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


# In-process, with fakes in place of a server: what the search and the reports make of given answers.

from bench import loadgen, scenarios  # noqa: E402

BODIES = loadgen.Bodies((("x", "", b""),))


class FakeLoad(scenarios.Load):
    """`rate * seconds` answers an open-loop run, `answer(rate, i)` the i-th one's (latency ms, status); a closed
    loop's are `closed_answers`."""

    def __init__(self, answer, closed_answers=((5.0, 200),) * 100):
        super().__init__(BODIES)
        self.answer, self.closed_answers, self.rates = answer, list(closed_answers), []

    def _result(self, seconds: float, answers: list, scheduled: list) -> loadgen.LoadResult:
        statuses: dict[str, int] = {}
        for _, status in answers:
            statuses[f"x {status}"] = statuses.get(f"x {status}", 0) + 1
        result = loadgen.LoadResult(seconds, [ms for ms, _ in answers], statuses, scheduled_s=scheduled)
        result.ok = [loadgen.succeeded(status) for _, status in answers]
        return result

    def open(self, url, rate, seconds, **kwargs):
        self.rates.append(rate)
        n = int(rate * seconds)
        return self._result(seconds, [self.answer(rate, i) for i in range(n)], [i / rate for i in range(n)])

    def closed(self, url, clients, seconds):
        return self._result(seconds, self.closed_answers, [])


def test_a_rate_meets_its_p99_bound_only_with_confidence():
    """A 2% tail of 50 ms (every 50th request, the first at the 111th): 125 requests hold one, so their p99 (the
    second slowest) is under 30 ms, which one pass took for a met bound; the rate does not hold it."""
    load = FakeLoad(lambda rate, i: (50.0 if i % 50 == 10 and i > 100 else 1.0, 200))
    step = scenarios._step("http://x", load, 62.5, 2.0, 30.0, seed=0)
    assert not step.met and step.requests >= scenarios.requests_for(0), step
    assert scenarios.requests_for(0) == 120 and not scenarios.bound_held(125, 1) and scenarios.bound_held(244, 1)
    clean = scenarios._step("http://x", FakeLoad(lambda rate, i: (1.0, 200)), 62.5, 2.0, 30.0, seed=0)
    assert clean.met and clean.requests >= 120 and clean.misses == 0


def test_a_search_stopped_while_every_rate_met_reports_the_highest_as_a_lower_bound():
    """Each rate's p99 is rate / 100 ms, so a rate paired with another step's p99 shows. Doubling stopped at its
    step limit: the highest rate (480 from 60), not the one before it with the highest's p99; stopped by the
    deadline after one step: that step's rate, not 0."""
    load = FakeLoad(lambda rate, i: (rate / 100, 200), closed_answers=[(1.0, 200)] * 100)  # offline: 50 req/s
    out = scenarios.search("http://x", load, 30, 2.0)
    assert out.offered_qps == max(load.rates) == 480 and out.p99_ms == 4.8 and out.at_least, out
    assert "at least 480.0 req/s with p99 4.8 ms" in scenarios.line(out)
    load.rates.clear()
    cut = scenarios.search("http://x", load, 30, 2.0, deadline=0.0)
    assert cut.offered_qps == load.rates[0] == 60 and cut.p99_ms == 0.6 and cut.at_least, cut


def test_error_answers_are_no_work_done():
    """Every second answer a fast 500: throughput and percentiles are the successes', a warning says so, and no
    ratio is made of it."""
    half = [(1.0, 500), (50.0, 200)] * 100
    out = scenarios.offline("http://x", FakeLoad(None, half), 64, 2.0, "scorehost", "s")
    assert out.answered_qps == 50 and out.p50_ms == 50 and out.erred, out
    fine = scenarios.offline("http://x", FakeLoad(None, [(40.0, 200)] * 200), 64, 2.0, "aihs", "s")
    assert scenarios.ratios([out, fine]) == [["aihs", "s", "offline", "req/s (higher is better)", "-"]]
    text = scenarios.markdown([out, fine], "scorehost bench", scenarios.Load(BODIES), 2.0)
    assert "**Warning**: more than 1% of the answers were errors in scorehost/s/offline: 100 of 200" in text


def test_a_search_that_found_no_rate_shows_dashes_not_no_answer():
    none = scenarios.Outcome("remote", "remote", "server", 0, 0.0, bound_ms=15.0, steps=[
        scenarios.Step(10.0, 40, None, False, True)])
    row = next(line for line in scenarios.markdown([none], "c", scenarios.Load(BODIES), 2.0).splitlines()
               if line.startswith("| remote |"))
    assert "no answer" not in row and row.split(" | ")[6:10] == ["-"] * 4, row


def test_bench_refuses_a_url_it_cannot_connect_to(tmp_path, capsys):
    from scorehost.cli import main

    url = f"http://127.0.0.1:{processes.free_port()}"
    assert main(["bench", "--url", url, "--scenario", "single-stream", "--seconds", "1",
                 "--out", str(tmp_path)]) == 1
    assert f"scorehost bench: cannot connect to {url}: Connection refused" in capsys.readouterr().err
