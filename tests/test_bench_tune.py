"""`scorehost tune` on the CPU pipeline script (tests/scripts/pipeline.py: Pillow decode in preprocess(), run_batch()
a fixed 20 ms per call whatever its size) with a small budget: batching is off by default on a machine without a
GPU, so one run() at a time carries about 40 requests a second, and any --batch-max > 1 carries several times
that. The tuner must find it (searching the most promising configuration first and stopping the others once they
cannot beat it), print its serve line, write the frontier, and resume from its folder."""

from __future__ import annotations

import json
import os
import subprocess

from PIL import Image

from conftest import script
from scorehost import processes


def tune(out, budget: str) -> subprocess.CompletedProcess:
    return subprocess.run([processes._bin("scorehost"), "tune", "--entry-script", script("pipeline.py"),
                           "--p99-ms", "200", "--budget", budget, "--seconds", "2", "--precision", "0.3",
                           "--out", str(out)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PIPELINE_COST_S": "0.02"})


def test_tune_finds_batching_beats_the_defaults_and_resumes(tmp_path):
    done = tune(tmp_path, "2")  # minutes: 1 ran out before the defaults under a loaded CI (a CI of d3c193a)
    assert done.returncode == 0, done.stdout + done.stderr
    trials = [json.loads(row) for row in (tmp_path / "trials.jsonl").read_text().splitlines()]
    defaults = next((t for t in trials if t["config"] == {}), None)
    best = max(trials, key=lambda t: t["rate"])
    assert defaults is not None, trials
    assert trials[0]["config"] != {} and trials[0]["ceiling"] > defaults["ceiling"]  # the most promising first
    assert best["config"]["batch_max"] > 1 and best["rate"] >= 2 * defaults["rate"], trials
    stopped = [t for t in trials if t["beaten"]]  # each stopped by one step just above the best's rate, missed
    assert stopped and all(t["rate"] == 0 and len(t["steps"]) == 1 and not t["steps"][0]["met"] for t in stopped)
    assert all(t["effective"] for t in trials)  # each row says what serve ran, so a resume can trust it
    serve_line = done.stdout.strip().splitlines()[-1]
    assert serve_line.startswith("scorehost serve --entry-script") and "--batch-max" in serve_line
    assert (tmp_path / "best.txt").read_text().strip() == serve_line
    frontier = (tmp_path / "frontier.md").read_text()
    assert frontier.count("\n| ") == len(trials) + 1  # a row per configuration, under the header
    with Image.open(tmp_path / "frontier.png") as image:
        assert image.format == "PNG"
        image.verify()

    again = tune(tmp_path, "0")  # no budget: what the folder holds, nothing measured again
    assert again.returncode == 0, again.stdout + again.stderr
    complete = sum(t["complete"] for t in trials)  # one cut short by the budget would be measured again
    assert f"{complete} configuration(s) already measured" in again.stdout
    assert "probed" not in again.stdout and "searching" not in again.stdout
    assert again.stdout.strip().splitlines()[-1] == serve_line
    assert len((tmp_path / "trials.jsonl").read_text().splitlines()) == len(trials)


def test_two_spellings_of_one_configuration_are_one_trial():
    """A flag at its computed default is no change: tune neither measures it twice nor calls it a winner."""
    from bench.tune import effective

    assert effective({}, True) == effective({"batch_max": 0}, True)  # no GPU: batching is off by default
    cores = os.cpu_count() or 1
    assert effective({"batch_max": 64}, True) == effective({"batch_max": 64, "workers": cores}, True)
    assert effective({"batch_max": 64}, True) == effective({"batch_max": 64, "batch_sizes": "any"}, True)
    assert effective({"batch_max": 64}, True, ("0",)) == effective({"batch_max": 64, "batch_sizes": "powers"}, True,
                                                                  ("0",))  # a GPU: powers of two by default
    assert effective({"batch_max": 64}, True) != effective({"batch_max": 64, "batch_delay_ms": 0}, True)
    assert effective({"batch_max": 64}, False) == effective({}, False)  # no run_batch(): --batch-max does nothing
    assert effective({}, True, ("0",)) == effective({"batch_max": 64}, True, ("0",))  # a GPU batches by default


def test_tune_recommends_nothing_when_every_answer_is_an_error(tmp_path):
    """bench/scripts/json_sum.py takes JSON: sent JPEGs, it answers 400 fast, which is no configuration's merit."""
    done = subprocess.run([processes._bin("scorehost"), "tune", "--entry-script", "bench/scripts/json_sum.py",
                           "--budget", "0.15", "--seconds", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert "no configuration kept p99 <= 100 ms with at most 1% errors: nothing to recommend" in done.stderr
    assert "400" in done.stderr.splitlines()[-1] and "best under" not in done.stdout
    assert not (tmp_path / "best.txt").exists()
    frontier = (tmp_path / "frontier.md").read_text()  # traceable to what ran it, as bench's reports
    assert "- command: `scorehost tune --entry-script" in frontier and "- commit: " in frontier, frontier
