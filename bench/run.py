"""`scorehost bench`: the server x script x concurrency matrix, each cell a headless Locust run of a fixed budget.

scorehost and AIHS run side by side with the same script; within each concurrency their order alternates
(scorehost first, then AIHS first at the next level) so that drift on a noisy machine hits both alike; a peer runs
alone after them (`groups`), so drift between its block and theirs is not evened out. Each cell is a separate
`locust --headless` process on bench/locustfile.py (the same file that loads a remote endpoint), or a
bench/loadgen.py run; the server's memory (master plus workers) is sampled while the cell runs and its peak kept.
With the script `proxy` (issue 22's proxy of a GPU script), the peers (TorchServe, LitServe, MLServer, BentoML,
Ray Serve: bench/peers/) can be among the servers, each with its own batching, where they are installed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from bench import peers
from scorehost import processes
from scorehost.processes import process_tree

if TYPE_CHECKING:
    from bench import loadgen

HERE = os.path.dirname(os.path.abspath(__file__))
LOCUSTFILE = os.path.join(HERE, "locustfile.py")
TRIVIAL = os.path.join(HERE, "scripts", "trivial.py")
RUN_TIME_NAME = "run() [server]"  # the locustfile's name for x-ms-run-fn-exec-ms (never import the locustfile here:
#                                   it monkey-patches the process with gevent)


@dataclasses.dataclass(frozen=True)
class Proxy:
    """How `--scripts proxy` is served: scorehost batches (tests/scripts/pipeline.py, one model process, its default
    HTTP workers, `--batch-max batch_max`), each peer with its own batching (at most batch_max a call,
    `peer_delay_ms` its delay bound, one model copy); run_batch() costs cost_ms whatever its size. Works from a
    checkout (the proxy script and the peers' scripts are not installed with the package)."""
    cost_ms: float = 40.0
    batch_max: int = 64
    peer_delay_ms: float = 10.0
    peers_dir: str = peers.DEFAULT_DIR


@dataclasses.dataclass(frozen=True)
class Target:
    """A started server as the clients reach it: POST url + "/score"; pid, the root of its process tree."""
    url: str
    pid: int


@dataclasses.dataclass(frozen=True)
class Cell:
    server: str
    script: str
    concurrency: int


@dataclasses.dataclass
class Result:
    cell: Cell
    requests: int = 0
    failures: int = 0
    req_s: float = 0.0
    img_s: float = 0.0
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    p99_ms: float = 0.0
    mean_ms: float = 0.0
    run_mean_ms: Optional[float] = 0.0  # inside run(), from x-ms-run-fn-exec-ms (None: a server that does not say)
    rss_mb: Optional[float] = None
    cpu_ms_per_request: Optional[float] = None  # server CPU (all processes), independent of the client's speed
    top_error: str = ""  # the most common failure, e.g. "400: Expecting value..." (loadgen.LoadResult.top_error)

    @property
    def overhead_mean_ms(self) -> Optional[float]:
        return None if self.run_mean_ms is None else max(0.0, self.mean_ms - self.run_mean_ms)


def tree_rss_mb(pid: int) -> float:
    total_kb = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                total_kb += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total_kb / 1024


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds used so far by a process tree."""
    ticks = 0
    for p in process_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
        except (OSError, ValueError, IndexError):
            continue
    return ticks / os.sysconf("SC_CLK_TCK")


class ServerUsage:
    """While a cell runs: peak memory of the server tree (sampled every 0.5 s) and the CPU seconds it used."""

    def __init__(self, pid: Optional[int]):
        self.pid, self.peak, self.cpu_s = pid, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self._stop.wait(0.5)

    def __enter__(self) -> "ServerUsage":
        if self.pid:
            self._cpu_start = tree_cpu_s(self.pid)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self.pid:
            self._thread.join()
            self.peak = max(self.peak, tree_rss_mb(self.pid))
            self.cpu_s = tree_cpu_s(self.pid) - self._cpu_start


def locust_cell(url: str, concurrency: int, seconds: float, *, key: str = "", images: str = "",
                batch: int = 1, requests: str = "") -> tuple[dict[str, dict[str, float]], str]:
    """One headless Locust run: its final stats rows by name (the locustfile's --summary, in the words of Locust's
    CSV columns), and its most common failure (as the locustfile words it: "HTTP 400: message"; "" with none)."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = os.path.join(tmp, "summary.json")
        argv = [sys.executable, "-m", "locust", "-f", LOCUSTFILE, "--headless", "--only-summary",
                "-u", str(concurrency), "-r", str(concurrency), "-t", f"{max(1, round(seconds))}s",
                "--host", url, "--summary", summary, "--loglevel", "ERROR", "--batch", str(batch)]
        if key:
            argv += ["--key", key]
        if images:
            argv += ["--images", images]
        if requests:
            argv += ["--requests", requests]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120, cwd=tmp)
        if not os.path.exists(summary):
            raise RuntimeError(f"locust wrote no stats (exit {done.returncode}):\n{done.stderr[-3000:]}")
        with open(summary) as f:
            written = json.load(f)
        failures = written["failures"]
        return written["rows"], _locust_error(failures[0][0]) if failures else ""


def _locust_error(text: str) -> str:
    """Locust's failure text, CatchResponseError('HTTP 400: message') (or "...", as repr quotes it), as loadgen
    words it: `400: message`."""
    inner = text.split("HTTP ", 1)[1] if "HTTP " in text else text
    return inner[:-2] if inner[-2:] in ("')", '")') else inner


def to_result(cell: Cell, rows: dict[str, dict[str, float]], batch: int, top_error: str = "") -> Result:
    score, run = rows.get("/score", {}), rows.get(RUN_TIME_NAME, {})
    f = lambda row, key: float(row.get(key) or 0)  # noqa: E731
    requests, failures = int(f(score, "Request Count")), int(f(score, "Failure Count"))
    req_s = f(score, "Requests/s")
    ok_share = (requests - failures) / requests if requests else 0.0
    return Result(cell, requests, failures, req_s, req_s * ok_share * batch, f(score, "50%"), f(score, "95%"),
                  f(score, "99%"), f(score, "Average Response Time"), f(run, "Average Response Time"),
                  top_error=top_error)


def loadgen_cell(cell: Cell, url: str, seconds: float, bodies: "loadgen.Bodies", *, key: str = "",
                 batch: int = 1) -> Result:
    """One cell with bench/loadgen.py (asyncio, one process), sending `bodies` (read once a run, not once a cell)."""
    from bench import loadgen

    r = loadgen.run(url, cell.concurrency, seconds, peers.bodies(cell.server, bodies).requests(), key)
    errors = r.failures()
    total = r.answered + r.dropped
    mean = sum(r.latencies_ms) / len(r.latencies_ms) if r.latencies_ms else 0.0
    run_mean = sum(r.run_ms) / len(r.run_ms) if r.run_ms else (None if cell.server in peers.NAMES else 0.0)
    ok = total - errors
    # r.seconds: until the last answer, which counts the requests still in flight at the budget's end
    return Result(cell, total, errors, total / r.seconds, ok / r.seconds * batch, r.percentile(50), r.percentile(95),
                  r.percentile(99), mean, run_mean, top_error=r.top_error())


def measure(cell: Cell, url: str, seconds: float, client: str, bodies: "loadgen.Bodies", *, key: str = "",
            images: str = "", batch: int = 1, requests: str = "") -> Result:
    """One cell with the chosen client: bench/loadgen.py (lighter, for high rates) sends `bodies`; Locust (the
    default), a process of its own, is given the flags they were made from (`images`, `requests`) and makes its
    own, once."""
    if client == "loadgen":
        return loadgen_cell(cell, url, seconds, bodies, key=key, batch=batch)
    rows, top_error = locust_cell(url, cell.concurrency, seconds, key=key, images=images, batch=batch,
                                  requests=requests)
    return to_result(cell, rows, batch, top_error)


def _with_usage(result: Result, usage: "ServerUsage") -> Result:
    result.rss_mb = usage.peak
    result.cpu_ms_per_request = usage.cpu_s * 1000 / result.requests if result.requests else None
    return result


READY_S = 300  # how long a local server may take to answer (the demo model's first build, a large init())
# `scorehost serve` flags bench sets itself (processes.start, started): given again with --scorehost-arg they were
# silently overridden, or made bench wait for the wrong port; by setting name, the bench flag to use instead.
SET_BY_BENCH = {"entry_script": "--scripts", "model_dir": "--model-dir", "workers": "--workers", "port": "",
                "auth_key": "--key", "auth_key_file": "--key"}


def refused_serve_arg(scorehost_args: list[str]) -> str:
    """The first of `scorehost_args` that sets what bench sets itself, as one line ("" when none does). argparse
    takes a unique prefix of a flag (--work=2) as the flag: so does this."""
    from server.settings import SETTINGS

    spellings = {flag: s.name for s in SETTINGS for flag in (s.flag, s.aihs_flag) if flag}
    for arg in scorehost_args:
        given = arg.split("=", 1)[0]
        names = {spellings[given]} if given in spellings else {name for flag, name in spellings.items()
                                                                if given.startswith("--") and flag.startswith(given)}
        if len(names) == 1 and (name := names.pop()) in SET_BY_BENCH:
            instead = SET_BY_BENCH[name]
            return (f"scorehost bench: --scorehost-arg={arg}: bench sets this itself: "
                    + (f"use bench's {instead}" if instead else "it gives each server a free port"))
    return ""


WARM_UP_S = 2.0  # each server's load before it is measured: a JIT compiler, caches, a batching policy's learning


def warm_up(server: str, url: str, bodies: "loadgen.Bodies", key: str, clients: int) -> None:
    """The same load as the cells (as `server` reads it), WARM_UP_S, not counted: every server alike, so that
    none is measured while it warms up (TorchServe's Java front end did, in its first cell, without it)."""
    from bench import loadgen

    loadgen.closed_loop(url, clients, WARM_UP_S, peers.bodies(server, bodies), key)


class Roster:
    """What a run measured, for its report: a line per server (version, how it served, what it was sent), and
    the servers that could not be measured here, with why."""

    def __init__(self) -> None:
        self.about: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def require(self, measured: list) -> None:
        """Nothing measured: one line that says why, not an empty report."""
        if not measured:
            raise SystemExit("scorehost bench: no server could be measured: "
                             + "; ".join(f"{name}: {why}" for name, why in self.skipped.items()))

    def markdown(self) -> str:
        lines = [f"- {text}" for text in self.about.values()]
        lines += [f"- {name}: skipped: {why}" for name, why in self.skipped.items()]
        return "## Servers\n\n" + "\n".join(lines) if lines else ""


def groups(servers: list[str]) -> list[list[str]]:
    """How the servers share the machine: scorehost and AIHS side by side (idle, each takes ~0.01 core; their
    cells alternate), then each peer alone, started for its cells and stopped after: idle, LitServe takes ~0.2
    core and Ray Serve ~0.15, which would be taken from whichever server is measured."""
    residents = [server for server in servers if server not in peers.NAMES]
    return ([residents] if residents else []) + [[server] for server in servers if server in peers.NAMES]


def _about(server: str, workers: Optional[int], proxy: Optional[Proxy], scorehost_args: tuple[str, ...]) -> str:
    from importlib import metadata

    from scorehost import __version__

    if server == "aihs":
        try:
            version = metadata.version("azureml-inference-server-http")
        except metadata.PackageNotFoundError:  # azmlinfsrv from another environment
            version = "version unknown"
        return f"aihs (azmlinfsrv {version}): {workers} worker(s)"
    how = (f"batching the proxy (tests/scripts/pipeline.py, run_batch() {proxy.cost_ms:g} ms a call), one model "
           f"process, --batch-max {proxy.batch_max}, its default HTTP workers") if proxy else f"{workers} worker(s)"
    return f"scorehost {__version__}: {how}" + (f"; {' '.join(scorehost_args)}" if scorehost_args else "")


@contextlib.contextmanager
def started(servers: list[str], entry_script: str, model_dir: Optional[str], bodies: "loadgen.Bodies",
            warm_clients: int, scorehost_args: tuple[str, ...] = (), key: str = "", workers: Optional[int] = 1,
            proxy: Optional[Proxy] = None, roster: Optional[Roster] = None) -> Iterator[dict[str, Target]]:
    """Each server in `servers` on the script, answering and warmed up (`warm_up`: `bodies` from `warm_clients`
    clients; scorehost with `scorehost_args` and the key), by name; all stopped on the way out. With `proxy`, the
    script is the proxy and peers may be among the servers: a peer not installed, or that does not start, is
    skipped (said, and kept in `roster` with why)."""
    roster = roster if roster is not None else Roster()
    running: dict[str, processes.ServerProcess] = {}
    targets: dict[str, Target] = {}

    def skip(server: str, why: str) -> None:
        print(f"{server}: {why}: skipped", file=sys.stderr, flush=True)
        roster.skipped[server] = why

    with tempfile.TemporaryDirectory(prefix="bench-servers-") as scratch:
        try:
            for server in servers:
                if server in peers.NAMES:
                    if proxy is None:
                        raise SystemExit(f"scorehost bench: {server} serves the proxy script only")
                    try:
                        peer = peers.start(server, proxy.peers_dir, scratch, cost_s=proxy.cost_ms / 1000,
                                           max_batch=proxy.batch_max, delay_ms=proxy.peer_delay_ms)
                    except peers.Unavailable as ex:
                        skip(server, str(ex))
                        continue
                    running[server], targets[server] = peer.process, Target(peer.url, peer.process.pid)
                    roster.about[server] = peers.about(server, proxy.peers_dir, proxy.batch_max, proxy.peer_delay_ms)
                    continue
                env, extra, count = {}, (), workers
                if proxy is not None:  # one model copy each: AIHS one worker, scorehost one model process
                    env, count = {"PIPELINE_COST_S": str(proxy.cost_ms / 1000)}, 1
                    if server == "scorehost":
                        env, extra = peers.scorehost_setup(proxy.cost_ms / 1000, proxy.batch_max)
                        count = None
                if server == "scorehost":
                    extra += scorehost_args + (("--auth-key", key) if key else ())
                process = running[server] = processes.start(server, entry_script, model_dir, extra_args=extra,
                                                            workers=count, env=env)
                targets[server] = Target(process.url, process.pid)
                roster.about[server] = _about(server, count, proxy if server == "scorehost" else None,
                                              scorehost_args if server == "scorehost" else ())
            for server, process in list(running.items()):
                if server in peers.NAMES:
                    try:
                        peers.wait_answering(server, process, targets[server].url, 300)
                    except RuntimeError as ex:
                        why = peers.skip_reason(process, ex)
                        process.stop()
                        del running[server], targets[server], roster.about[server]
                        skip(server, why)
                else:
                    try:
                        process.wait_healthy(READY_S, progress=lambda waited, server=server, process=process: print(
                            f"scorehost bench: {server} not ready after {waited:.0f} s; waiting up to {READY_S} s "
                            f"(its log: {process.log_path})", file=sys.stderr, flush=True))
                    except RuntimeError as ex:  # the user's script or flags: their words, not our traceback
                        why = peers.skip_reason(process, ex)
                        raise SystemExit(f"scorehost bench: {server} did not start with "
                                         f"{os.path.relpath(entry_script)}: {why}") from None
            for server, target in targets.items():
                warm_up(server, target.url, bodies, key, warm_clients)
            yield targets
        finally:
            processes.stop_all(running.values())


def run_matrix(scripts: dict[str, tuple[str, Optional[str]]], servers: list[str], concurrencies: list[int],
               seconds: float, bodies: "loadgen.Bodies", *, key: str = "", images: str = "", batch: int = 1,
               requests: str = "", remote: str = "", progress: Callable[[int, int, Result], None] = lambda i, n, r: None,
               scorehost_args: tuple[str, ...] = (), client: str = "locust", workers: int = 1,
               proxy: Optional[Proxy] = None, roster: Optional[Roster] = None) -> list[Result]:
    """Run every cell; `scripts` maps a name to (entry script, model dir). With `remote`, only that endpoint.
    `roster` gets what each server was (and those skipped). `bodies` is what bench/loadgen.py sends, made once a run
    by the caller; Locust's processes make theirs from the flags it was made from (`images`, `batch`, `requests`)."""
    roster = roster if roster is not None else Roster()
    results: list[Result] = []
    load = {"key": key, "images": images, "batch": batch, "requests": requests}
    total = len(concurrencies) * (1 if remote else len(scripts) * len(servers))
    if remote:
        for c in concurrencies:
            results.append(measure(Cell("remote", "remote", c), remote, seconds, client, bodies, **load))
            progress(len(results), total, results[-1])
        return results
    for name, (entry_script, model_dir) in scripts.items():
        for group in groups(servers):
            with started(group, entry_script, model_dir, bodies, max(concurrencies), scorehost_args, key, workers,
                         proxy if entry_script == peers.PROXY_SCRIPT else None, roster) as running:
                present = [server for server in group if server in running]
                total -= len(concurrencies) * (len(group) - len(present))  # skipped
                for i, c in enumerate(concurrencies):
                    order = present if i % 2 == 0 else present[::-1]
                    for server in order:
                        target = running[server]
                        with ServerUsage(target.pid) as usage:
                            result = measure(Cell(server, name, c), target.url, seconds, client, bodies, **load)
                        results.append(_with_usage(result, usage))
                        progress(len(results), total, results[-1])
    roster.require(results)
    return results
