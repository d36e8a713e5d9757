"""`scorehost bench` end to end with a tiny budget, so the harness cannot rot: the report is written, its table has
every cell, the ratios and plots are there, and a script that fails shows its errors."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from PIL import Image

from bench.run import TRIVIAL
from conftest import script
from scorehost import processes


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    done = subprocess.run([processes._bin("scorehost"), "bench", "--scripts", "trivial",
                           f"broken={script('raises.py')}", "--concurrency", "1", "2", "--seconds", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    # every cell of `broken` failed: said, and the exit code says so (the report is written all the same)
    assert done.returncode == 1 and "broken: no cell had most of its answers succeed" in done.stderr, \
        done.stdout + done.stderr
    return out, done.stdout


def test_every_cell_is_in_the_table(report):
    out, stdout = report
    text = (out / "report.md").read_text()
    for server in ("scorehost", "aihs"):
        for name in ("trivial", "broken"):
            for clients in (1, 2):
                assert f"| {server} | {name} | {clients} |" in text
    ratios = text.split("## scorehost / each other server", 1)[1].split("## Plots")[0]
    assert "| aihs | trivial | 2 |" in ratios and "| scorehost |" not in ratios
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
    warning = (out / "report.md").read_text().split("**Warning**: more than 1% of the answers were errors in ")[1]
    assert "scorehost/broken/1" in warning.splitlines()[0] and "trivial" not in warning.splitlines()[0]


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


def test_batching_table_runs_a_users_script_policy_against_greedy(tmp_path):
    """`bench/gpu/run.sh` runs issue 22's table on the GPU script: any script with run_batch() in the proxy's place,
    the policy beside greedy, no ideal column, each cell's batch and the model's busy share from /metrics. Here a
    fixed 50 ms per call (batch_tagger.py) and 8 clients: the policy's batches are fuller than greedy's."""
    import re
    import sys

    for i in range(4):
        Image.new("RGB", (64, 48), (60 * i, 90, 30)).save(tmp_path / f"{i}.jpg", "JPEG")
    argv = [sys.executable, "-m", "bench.batching_table", "--servers", "scorehost", "scorehost-greedy",
            "--entry-script", script("batch_tagger.py"), "--clients", "8", "--seconds", "2", "--warmup", "1",
            "--rounds", "1", "--images", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "| clients | scorehost | scorehost-greedy |" in done.stdout, done.stdout  # no ideal: the cost is not fixed
    row = next(line for line in done.stdout.splitlines() if line.startswith("| 8 |"))
    batches = [float(b) for b in re.findall(r"batch ([\d.]+)", row)]
    busy = [int(b) for b in re.findall(r"model busy (\d+)%", row)]
    assert len(batches) == 2 and len(busy) == 2 and all(b > 30 for b in busy), row
    # the policy waits for the burst back (about 8 a batch), greedy sends what is queued (the clients split in two
    # groups: 4-6); greedy beside greedy differs by under 0.5
    assert batches[0] >= batches[1] + 1, row

    peers = subprocess.run(argv[:5] + ["torchserve"] + argv[5:], capture_output=True, text=True, timeout=60)
    assert peers.returncode == 2 and "drop torchserve" in peers.stderr  # the peers serve the proxy script only


@pytest.fixture(scope="module")
def peers_dir(tmp_path_factory):
    """A real peer, installed as a user installs one (bench/peers/install.sh): LitServe, the lightest (~15 s). One
    already installed under $SCOREHOST_PEERS_DIR is used as it is."""
    import os

    given = os.environ.get("SCOREHOST_PEERS_DIR")
    if given and os.path.exists(os.path.join(given, "litserve", "bin", "python")):
        return given
    where = tmp_path_factory.mktemp("peers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(["bash", os.path.join(root, "bench", "peers", "install.sh"), str(where), "litserve"],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return where


@pytest.fixture(scope="module")
def broken_peers_dir(peers_dir, tmp_path_factory):
    """LitServe as installed, and an "mlserver" whose Python fails at once (a peer that does not start)."""
    import os

    where = tmp_path_factory.mktemp("broken-peers")
    os.symlink(os.path.join(peers_dir, "litserve"), where / "litserve")
    (where / "mlserver" / "bin").mkdir(parents=True)
    fake = where / "mlserver" / "bin" / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named mlserver' >&2\nexit 1\n")
    fake.chmod(0o755)
    return where


def test_bench_runs_a_peer_beside_scorehost_on_the_proxy(broken_peers_dir, tmp_path):
    """`scorehost bench --servers scorehost litserve mlserver torchserve`: the proxy script by default; LitServe with
    its own batching (sent JSON, as it reads it); an MLServer that does not start and a TorchServe not installed are
    skipped, said so, and named in the report with why. Every cell measured is in the table with no errors, the
    report says what each server was, scorehost's ratio against LitServe is there, and no model time is claimed
    for a peer that does not say."""
    done = subprocess.run([processes._bin("scorehost"), "bench", "--servers", "scorehost", "litserve", "mlserver",
                           "torchserve", "--peers-dir", str(broken_peers_dir), "--concurrency", "4", "--seconds", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "torchserve: not installed" in done.stderr
    assert "mlserver: mlserver exited (1) (ModuleNotFoundError" in done.stderr
    assert sum(line.startswith("[") for line in done.stdout.splitlines()) == 2 and "Traceback" not in done.stderr
    text = (tmp_path / "report.md").read_text()
    results = {r["cell"]["server"]: r for r in json.loads((tmp_path / "results.json").read_text())}
    assert set(results) == {"scorehost", "litserve"}
    for server, r in results.items():
        assert r["cell"]["script"] == "proxy" and r["requests"] > 20 and r["failures"] == 0, r
        assert f"| {server} | proxy | 4 |" in text
    assert results["litserve"]["run_mean_ms"] is None and results["scorehost"]["run_mean_ms"] >= 40  # the proxy's
    servers = text.split("## Servers", 1)[1].split("## Results")[0]
    assert "--batch-max 64" in servers and "at most 64 a call, 10 ms delay bound" in servers, servers
    assert "- torchserve: skipped: not installed" in servers and "- mlserver: skipped: mlserver exited" in servers
    log = done.stderr.split("mlserver: ", 1)[1].split("its log: ", 1)[1].split(": skipped", 1)[0]
    assert "No module named mlserver" in open(log).read()  # the log it names is kept
    ratios = text.split("## scorehost / each other server", 1)[1]
    assert "| litserve | proxy | 4 |" in ratios


def test_bench_scenarios_run_a_peer(peers_dir, tmp_path):
    """The MLPerf-style scenarios load a peer as they load scorehost, with scorehost's ratio against it."""
    done = subprocess.run([processes._bin("scorehost"), "bench", "--scenario", "single-stream", "offline",
                           "--in-flight", "8", "--servers", "scorehost", "litserve", "--peers-dir", str(peers_dir),
                           "--seconds", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (tmp_path / "report.md").read_text()
    for server in ("scorehost", "litserve"):
        for scenario in ("single-stream", "offline"):
            row = next(line for line in text.splitlines() if line.startswith(f"| {server} | proxy | {scenario} |"))
            assert row.split("|")[-3].strip() == "none", row  # the errors column
    assert "litserve " in text.split("## Servers", 1)[1].split("## Results")[0]
    ratios = text.split("## scorehost / each other server", 1)[1]
    assert "| litserve | proxy | offline | req/s" in ratios


@pytest.mark.parametrize("scenario", [[], ["--scenario", "single-stream"]])
def test_bench_with_no_server_to_measure_says_why(scenario, tmp_path, capsys):
    from scorehost.cli import main

    assert main(["bench", *scenario, "--servers", "torchserve", "--peers-dir", str(tmp_path / "none"),
                 "--concurrency", "1", "--seconds", "1", "--out", str(tmp_path / "out")]) == 1
    assert "no server could be measured: torchserve: not installed" in capsys.readouterr().err


@pytest.mark.parametrize("flags, says", [
    (["--servers", "scorehost", "litserve", "--scripts", "trivial"], "serve the proxy script only"),
    (["--servers", "scorehost", "--scripts", "proxy", "--batch", "2"], "takes one JPEG a request"),
    (["--scripts", "proxy", "--scorehost-arg=--batch-max=8"], "use --proxy-batch-max"),
    (["--servers", "scorehost", "litserve", "--client", "locust"], "drop --client locust"),
    (["--url", "http://127.0.0.1:9"], "--url is for the scenarios"),
    (["--remote", "http://127.0.0.1:9", "--scenario", "offline"], "with --url, not --remote"),
    (["--requests", "/nonexistent"], "--requests: /nonexistent is not a directory of recorded requests"),
    # flags bench sets itself were overridden in silence, or made it wait for the wrong port (/nonexistent: a run
    # that is not refused ends at once all the same)
    (["--scripts", "/nonexistent/x.py", "--scorehost-arg=--workers=2"], "sets this itself: use bench's --workers"),
    (["--scripts", "/nonexistent/x.py", "--scorehost-arg=--worker_count", "--scorehost-arg=2"], "bench's --workers"),
    (["--scripts", "/nonexistent/x.py", "--scorehost-arg=--port=9"], "it gives each server a free port"),
    (["--scripts", "nosuch.py"], "scorehost bench: --scripts nosuch.py: no such file"),
    (["--scripts", "/nonexistent/x.py", "--seconds", "2.5"], "Locust runs whole seconds"),
])
def test_bench_refuses_what_the_proxy_or_a_peer_cannot_serve(flags, says, capsys):
    from scorehost.cli import main

    assert main(["bench", *flags]) == 1
    assert says in capsys.readouterr().err


@pytest.mark.parametrize("server_lives", [True, False])
def test_stop_ends_what_the_server_left_in_sessions_of_its_own(server_lives, tmp_path):
    """Ray Serve's actors leave the server's process group: stop() ends them too, also once the server's own
    process has exited and they were handed to init, and within its timeout."""
    import os
    import time

    argv = ["bash", "-c", f"setsid sleep 600 & echo $! > {tmp_path}/stray; sleep {600 if server_lives else 1}"]
    server = processes.ServerProcess("fake", argv, dict(os.environ), processes.free_port(), str(tmp_path))
    while not (tmp_path / "stray").exists() or not (tmp_path / "stray").read_text().strip():
        time.sleep(0.05)
    stray = int((tmp_path / "stray").read_text())
    time.sleep(0.2)
    server.note_strays()  # as when it first answers
    if not server_lives:
        server.proc.wait(10)
    began = time.monotonic()
    server.stop(timeout=5)
    assert time.monotonic() - began < 6
    assert processes._identity(stray) is None  # gone (or a zombie until init reaps it)


def test_stop_removes_the_log_unless_someone_was_told_where_it_is(tmp_path):
    """Every server a bench run or the test suite starts writes a log in /tmp: stop() removes it (its text stays
    readable), except a log whose path was given out (a peer skipped: "its log: ...")."""
    import os
    import time

    quiet, told = (processes.ServerProcess("fake", ["sh", "-c", "echo said; sleep 600"], dict(os.environ),
                                           processes.free_port(), str(tmp_path)) for _ in range(2))
    path = told.log_path
    while "said" not in quiet.output() + told.output() or quiet.output() != told.output():
        time.sleep(0.05)
    quiet.stop(timeout=5)
    told.stop(timeout=5)
    assert not os.path.exists(quiet.log.name) and quiet.output() == "said\n"
    assert os.path.exists(path) and told.output() == "said\n"
    os.unlink(path)


def test_batching_table_skips_a_peer_that_does_not_start_and_goes_on(broken_peers_dir, tmp_path):
    import sys

    for i in range(4):
        Image.new("RGB", (64, 48), (60 * i, 90, 30)).save(tmp_path / f"{i}.jpg", "JPEG")
    done = subprocess.run([sys.executable, "-m", "bench.batching_table", "--servers", "scorehost", "mlserver",
                           "litserve", "--clients", "4", "--seconds", "2", "--warmup", "1", "--rounds", "1",
                           "--images", str(tmp_path), "--peers-dir", str(broken_peers_dir)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mlserver: mlserver exited" in done.stderr and "skipped" in done.stderr
    assert "| clients | ideal | scorehost | litserve |" in done.stdout, done.stdout


JSON_SUM = os.path.join(os.path.dirname(TRIVIAL), "json_sum.py")  # takes {"data": [numbers]}, refuses images


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([processes._bin("scorehost"), "bench", "--servers", "scorehost", "--concurrency", "1",
                           "--seconds", "2", *args], capture_output=True, text=True, timeout=300)


def test_bench_says_loudly_when_a_script_refuses_what_it_is_sent(tmp_path):
    """A JSON script sent the default JPEGs answers 400 at once: a fast "result" of nothing but errors."""
    done = bench("--scripts", f"json={JSON_SUM}", "--client", "loadgen", "--out", str(tmp_path))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stdout + done.stderr
    assert "WARNING: scorehost/json/1: " in done.stderr and "answers were errors (most common 400: " in done.stderr
    assert "json: no cell had most of its answers succeed" in done.stderr and "--requests DIR" in done.stderr
    text = (tmp_path / "report.md").read_text()
    assert "**Warning**: more than 1% of the answers were errors in scorehost/json/1" in text


def write_recording(folder, exchanges: list) -> str:
    """`exchanges` (server.record.Exchange) in `folder` as `scorehost serve --record DIR` keeps them."""
    folder.mkdir()
    for i, exchange in enumerate(exchanges):
        (folder / f"{i:06d}.json").write_text(json.dumps(exchange.to_json()))
    return str(folder)


@pytest.fixture
def recorded(tmp_path):
    """Two requests as `scorehost serve --record DIR` keeps them."""
    from server.record import Exchange

    return write_recording(tmp_path / "recorded", [
        Exchange("", "POST", "/score", "", [("Content-Type", "application/json")], json.dumps({"data": data}).encode(),
                 200, [], b"") for data in ([1, 2], [3.5])])


@pytest.mark.parametrize("client", ["locust", "loadgen"])
def test_bench_sends_recorded_requests_to_a_script_given_by_its_path(recorded, client, tmp_path):
    done = bench("--scripts", JSON_SUM, "--requests", str(recorded), "--client", client, "--out", str(tmp_path))
    assert done.returncode == 0 and "WARNING" not in done.stderr, done.stdout + done.stderr
    (result,) = json.loads((tmp_path / "results.json").read_text())
    assert result["cell"]["script"] == "json_sum"  # a bare path is named after its file
    assert result["requests"] > 0 and result["failures"] == 0


def test_bench_says_in_one_line_which_server_did_not_start(tmp_path, capsys):
    from scorehost.cli import main

    needs_model = tmp_path / "needs_model.py"
    needs_model.write_text("import os\n\ndef init():\n    os.listdir(os.environ['AZUREML_MODEL_DIR'])\n\n"
                           "def run(raw):\n    return raw\n")
    assert main(["bench", "--servers", "scorehost", "--scripts", f"mine={needs_model}", "--concurrency", "1",
                 "--seconds", "1", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("scorehost bench: scorehost did not start with ") and len(err.strip().splitlines()) == 1
    assert "needs_model.py" in err and "scorehost: no model directory was given" in err, err


ECHO = os.path.join(os.path.dirname(TRIVIAL), "echo_request.py")  # answers (and logs) what it saw of each request
# What a client sent echo_request.py while `scorehost serve --record` kept it: a query string, a header the script
# reads, a User-Agent (urllib's on the POST) and a GET; urllib also sends `Connection: close`, which is recorded
# and must not be sent again (each request would close its connection).
SENT = (("POST", "lang=fr&n=1", {"Content-Type": "application/json", "X-Tenant": "acme"}, b'{"data": [1]}'),
        ("GET", "lang=de", {"X-Tenant": "globex", "User-Agent": "recorded-client/1.0"}, None))


def seen(log) -> set[tuple]:
    """What echo_request.py logged of each call, without repeats."""
    return {tuple(sorted(json.loads(line).items())) for line in log.read_text().splitlines()}


@pytest.fixture(scope="module")
def echo_recording(tmp_path_factory):
    """(the directory `scorehost serve --record` wrote while SENT was sent to echo_request.py, what the script saw
    of those requests)."""
    import urllib.request

    where = tmp_path_factory.mktemp("echo")
    with processes.running("scorehost", ECHO, extra_args=("--record", str(where / "recorded")),
                           env={"ECHO_LOG": str(where / "served.jsonl")}) as server:
        for method, query, headers, body in SENT:
            request = urllib.request.Request(f"{server.url}/score?{query}", body, headers, method=method)
            with urllib.request.urlopen(request, timeout=30) as answer:
                assert answer.status == 200
    served = seen(where / "served.jsonl")
    assert len(served) == len(SENT), served
    return str(where / "recorded"), served


@pytest.mark.parametrize("run", [["--client", "loadgen", "--concurrency", "1", "2"],
                                 # Locust's CSV is written once a second, not at its end: 3 s leaves it time
                                 ["--client", "locust", "--concurrency", "2", "--seconds", "3"],
                                 ["--scenario", "single-stream", "offline", "--in-flight", "2"]],
                         ids=["loadgen", "locust", "scenarios"])
def test_bench_sends_each_recorded_request_as_recorded_and_reads_them_once(echo_recording, run, tmp_path,
                                                                           monkeypatch, capsys):
    """A script that reads a header or `request.args` is sent what its clients sent: the recorded method, query
    string and headers with the body, by every client; and the directory is read once a run (here: Locust's cell
    processes each read it once more, for their own)."""
    from scorehost.cli import main
    from server import record

    recording, served = echo_recording
    reads = []
    monkeypatch.setattr(record, "load", lambda directory, load=record.load: reads.append(directory) or load(directory))
    monkeypatch.setenv("ECHO_LOG", str(tmp_path / "benched.jsonl"))  # the bench's servers inherit it
    status = main(["bench", "--servers", "scorehost", "--scripts", f"echo={ECHO}", "--requests", recording,
                   "--seconds", "1", "--out", str(tmp_path / "out"), *run])
    assert status == 0, capsys.readouterr()
    assert seen(tmp_path / "benched.jsonl") == served
    assert reads == [recording]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    for result in results if isinstance(results, list) else results["outcomes"]:
        assert result["requests"] > 0 and not result.get("failures") and not result.get("errors"), result


def test_a_recorded_request_keeps_its_headers_but_not_those_of_its_connection(tmp_path):
    """What the client sets itself (Host, Content-Length, the key), the connection's own headers (those that
    Connection names among them) and Expect (the body goes with the head: no 100 Continue is waited for) are not
    sent again; requests to other routes than /score (/swagger.json) are the server's, not the script's: left out."""
    from bench import peers
    from bench.loadgen import Bodies, Head, Request
    from server.record import Exchange

    headers = [("Host", "127.0.0.1:5001"), ("Content-Type", "text/csv"), ("Content-Length", "3"),
               ("Connection", "close, X-Hop"), ("X-Hop", "1"), ("Keep-Alive", "timeout=5"), ("Expect", "100-continue"),
               ("Transfer-Encoding", "chunked"), ("TE", "trailers"), ("X-Tenant", "acme"), ("User-Agent", "curl/8.5")]
    folder = write_recording(tmp_path / "recorded", [
        Exchange("", "GET", "/swagger.json", "version=3", [], b"", 200, [], b"{}"),
        Exchange("", "POST", "/score", "lang=fr", headers, b"1,2", 200, [], b"3"),
        Exchange("", "HEAD", "/score", "", [("X-Tenant", "acme")], b"", 200, [], b"")])
    bodies = Bodies.recorded(folder)
    sent = bodies.requests()
    assert sent() == Request("recorded", "text/csv", b"1,2", Head("POST", "lang=fr", (("X-Tenant", "acme"),
                                                                                     ("User-Agent", "curl/8.5"))))
    assert sent() == Request("recorded", "", b"", Head("HEAD", "", (("X-Tenant", "acme"),)))
    assert sent().head.method == "POST" and len(bodies.items) == 2
    assert peers.bodies("litserve", bodies).heads == bodies.heads  # a peer's re-shaping keeps them


def test_the_load_generator_sends_a_head_and_reads_its_answer_without_a_body():
    """HEAD (a recorded one): the answer's Content-Length announces a body that does not come; reading it would
    stall the connection, or take the next answer as its body."""
    from bench import loadgen

    bodies = loadgen.Bodies((("recorded", "", b""), ("recorded", "text/plain", b"hi")),
                            (loadgen.Head("HEAD"), loadgen.Head()))
    with loadgen.trivial_server() as url:
        result = loadgen.run(url, 1, 0.5, bodies.requests())
    assert result.answered > 4 and result.dropped == 0 and set(result.statuses) == {"recorded 200"}


def test_a_locust_cell_counts_every_request_the_server_answered(start_server):
    """Locust's --csv files are written once a second by a timer and never at exit: a cell missed up to the last
    second of its run (80 of 95 requests in 3 s; nothing in 1 s; about half in 2 s). The locustfile's summary is written at the end:
    its count is the server's own, less what was in flight when the users stopped (one a user at most)."""
    import re
    import urllib.request

    from bench.run import locust_cell

    server = start_server("scorehost", TRIVIAL)
    rows, error = locust_cell(server.url, 2, 2.0)
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        metrics = r.read().decode()
    answered = sum(float(n) for n in re.findall(r'^scorehost_requests_total\{[^}]*route="/score"[^}]*\} (\S+)$',
                                                metrics, re.M))
    assert error == "" and rows["/score"]["Failure Count"] == 0
    assert answered - 2 <= rows["/score"]["Request Count"] <= answered and answered > 20, (rows["/score"], answered)


def test_a_loadgen_cell_divides_by_the_time_measured(monkeypatch):
    """Requests in flight at the budget's end are answered after it: counted, so the time is the measured one."""
    from bench import loadgen, run

    measured = loadgen.LoadResult(2.5, [1.0] * 250, {"image 200": 250})
    monkeypatch.setattr(loadgen, "run", lambda *args, **kwargs: measured)
    result = run.loadgen_cell(run.Cell("scorehost", "trivial", 1), "http://x", 2.0, loadgen.Bodies((("x", "", b""),)))
    assert result.req_s == result.img_s == 100.0


def test_a_server_slow_to_be_ready_is_said_while_it_is_waited_for(tmp_path):
    server = processes.ServerProcess("fake", ["sleep", "600"], dict(os.environ), processes.free_port(), str(tmp_path))
    said = []
    with pytest.raises(RuntimeError, match="not healthy"):
        server.wait_healthy(0.5, progress=said.append, every_s=0.0)
    assert said and said == sorted(said)


def test_the_matrix_report_names_the_commit_and_versions():
    from bench import report
    from scorehost import __version__

    text = report.markdown([], "scorehost bench --seconds 1", 1.0)
    assert f"- commit: {report.commit()}\n" in text and f"scorehost {__version__}" in text


def test_sigterm_to_bench_stops_the_servers_it_started(tmp_path):
    """As Ctrl-C does: what bench started (in sessions of their own) is stopped on the way out, exit 143."""
    import signal
    import sys
    import time

    program = f"""
import os, sys
from scorehost import cli, processes
def fake_bench(args):
    server = processes.ServerProcess("fake", ["sleep", "600"], dict(os.environ), processes.free_port(), ".")
    try:
        open({str(tmp_path / "pid")!r}, "w").write(str(server.pid))
        server.proc.wait()
    finally:
        server.stop(timeout=5)
cli.cmd_bench = fake_bench
sys.exit(cli.main(["bench"]))
"""
    bench_process = subprocess.Popen([sys.executable, "-c", program], stderr=subprocess.PIPE, text=True)
    pid_file = tmp_path / "pid"
    while not pid_file.exists() or not pid_file.read_text():
        assert bench_process.poll() is None, bench_process.stderr.read()
        time.sleep(0.05)
    server = int(pid_file.read_text())
    bench_process.send_signal(signal.SIGTERM)
    assert bench_process.wait(30) == 143
    assert bench_process.stderr.read().strip() == "scorehost: terminated"
    assert processes._identity(server) is None  # gone (or a zombie until init reaps it)
