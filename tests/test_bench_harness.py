"""`scorehost bench` end to end with a tiny budget, so the harness cannot rot: the report is written, its table has
every cell, the ratios and plots are there, and a script that fails shows its errors."""

from __future__ import annotations

import json
import subprocess

import pytest
from PIL import Image

from conftest import script
from scorehost import processes


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([processes._bin("scorehost"), "bench", "--scripts", "trivial",
                           f"broken={script('raises.py')}", "--concurrency", "1", "2", "--seconds", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return out, done.stdout


def test_every_cell_is_in_the_table(report):
    out, stdout = report
    text = (out / "report.md").read_text()
    for server in ("scorehost", "aihs"):
        for name in ("trivial", "broken"):
            for clients in (1, 2):
                assert f"| {server} | {name} | {clients} |" in text
    assert "## Each server / AIHS" in text and "| scorehost | trivial | 2 |" in text
    assert "8/8" in stdout  # the progress bar reached the end


def test_results_measure_something(report):
    out, _ = report
    results = json.loads((out / "results.json").read_text())
    trivial = [r for r in results if r["cell"]["script"] == "trivial"]
    assert all(r["requests"] > 0 and r["failures"] == 0 and r["req_s"] > 0 for r in trivial)
    assert all(r["rss_mb"] > 10 and r["cpu_ms_per_request"] > 0 and r["p99_ms"] >= r["p50_ms"] for r in trivial)


def test_errors_show_in_the_table(report):
    out, _ = report
    results = json.loads((out / "results.json").read_text())
    broken = [r for r in results if r["cell"]["script"] == "broken"]
    assert broken and all(r["failures"] == r["requests"] > 0 and r["img_s"] == 0 for r in broken)


@pytest.mark.parametrize("name", ["throughput.png", "latency.png", "time_split.png"])
def test_plots_are_valid_pngs(report, name):
    out, _ = report
    with Image.open(out / name) as image:
        assert image.format == "PNG" and image.size[0] > 300
        image.verify()


def test_report_warns_where_p99_rests_on_too_few_requests():
    from bench.report import markdown
    from bench.run import Cell, Result

    few, many = Result(Cell("scorehost", "resnet50", 1), requests=40), Result(Cell("aihs", "resnet50", 1), requests=900)
    text = markdown([few, many], "scorehost bench", 1)
    assert "fewer than 100 requests in scorehost/resnet50/1 (40)" in text and "aihs/resnet50/1" not in text
    assert "Warning" not in markdown([many], "scorehost bench", 1)
