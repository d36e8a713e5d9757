"""MLPerf Inference's scenarios for any entry script or running server: `scorehost bench --scenario ...`.

- server: open-loop arrivals (Poisson, or `--arrivals uniform`) at `--qps N` for `--seconds`, latency from each
  request's scheduled send time (bench/loadgen.py), so an overloaded server shows the queue it builds; or, with
  `--p99-ms B`, a search for the highest rate whose p99 stays under B (MLPerf's Server scenario: ResNet-50 at
  p99 <= 15 ms);
- offline: everything at once (`--in-flight` requests outstanding), throughput;
- single-stream: one request at a time, p90 latency.
Locally each runs on scorehost and AIHS (servers alternating) and, on the proxy script, each peer alone after them
(bench/peers/), with the same script and scorehost's ratios against each;
with `--url`, on that server alone. Every report states the most this client sent on this machine against a server
that answers at once, and marks a result that comes near it as limited by the client.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import time
from typing import Callable, Optional

from bench import loadgen, peers
from bench.report import ERROR_SHARE, MIN_REQUESTS_FOR_P99, OWN_REQUESTS, table

SCENARIOS = ("server", "offline", "single-stream")
CLIENT_BOUND_SHARE = 0.7  # a rate above this share of the client's own ceiling may be the client's limit


def add_arguments(bench) -> None:
    """The scenario flags of `scorehost bench` (the rest, --seconds, --scripts, --servers..., are the matrix's)."""
    bench.add_argument("--scenario", nargs="+", choices=SCENARIOS,
                       help="MLPerf-style scenarios instead of the concurrency matrix: server (open-loop Poisson, "
                            "--qps or --p99-ms), offline (throughput), single-stream (p90 latency)")
    bench.add_argument("--qps", type=float, help="server scenario: requests a second offered")
    add_arrivals(bench)
    bench.add_argument("--p99-ms", type=float, nargs="+", default=[],
                       help="server scenario: find the highest rate whose p99 stays under each bound (ms)")
    bench.add_argument("--precision", type=float, default=0.1,
                       help="p99 search: stop when the highest rate that met the bound is within this fraction of "
                            "the lowest that missed it")
    bench.add_argument("--in-flight", type=int, default=64, help="offline scenario: requests outstanding at once")
    bench.add_argument("--client-processes", type=int, default=1,
                       help="client processes sharing the load, when one core cannot carry the rate")
    bench.add_argument("--url", help="run the scenarios against this running server (base URL or .../score) alone")


def add_arrivals(parser) -> None:
    parser.add_argument("--arrivals", choices=loadgen.ARRIVALS, default="poisson",
                        help="server scenario: poisson (MLPerf's: independent arrivals, bursts and all; the "
                             "default) or uniform (one request every 1/rate, as wrk2; with a fixed run() time no "
                             "queue forms below capacity, so the rate found at a p99 bound is near capacity)")


def bodies_of(args, command: str) -> loadgen.Bodies:
    """What `scorehost bench` or `tune` sends, from its flags: --requests DIR, else --images and --batch; a flag
    that cannot work is one line, not a traceback. Made (a directory read) once a run: kept as args.bodies, which
    the later steps are handed."""
    if getattr(args, "bodies", None) is not None:
        return args.bodies
    if args.requests and (args.images or args.batch > 1):
        raise SystemExit(f"scorehost {command}: --requests sends the recorded requests as they are: drop --images "
                         "and --batch")
    try:
        args.bodies = loadgen.Bodies.chosen(args.images, args.batch, args.requests)
    except ValueError as ex:
        raise SystemExit(f"scorehost {command}: --requests: {ex}") from None
    return args.bodies


@dataclasses.dataclass
class Load:
    """How this client loads a server: bodies, key, client processes, and its own ceiling (req/s; 0 = unknown)."""
    bodies: loadgen.Bodies
    key: str = ""
    processes: int = 1
    ceiling: float = 0.0
    arrivals: str = "poisson"  # open loop: loadgen.ARRIVALS

    def closed(self, url: str, clients: int, seconds: float) -> loadgen.LoadResult:
        return loadgen.closed_loop(url, clients, seconds, self.bodies, self.key, self.processes)

    def open(self, url: str, rate: float, seconds: float, **kwargs) -> loadgen.LoadResult:
        return loadgen.open_loop(url, rate, seconds, self.bodies, self.key, self.processes, arrivals=self.arrivals,
                                 **kwargs)

    def bound_by_client(self, rate: float) -> bool:
        return bool(self.ceiling) and rate >= CLIENT_BOUND_SHARE * self.ceiling


@dataclasses.dataclass
class Step:
    """One rate tried by the p99 search."""
    rate: float
    requests: int
    p99_ms: Optional[float]  # None: more than 1% had no answer
    met: bool
    ended_early: bool  # stopped once more than 1% of its planned requests had missed the bound


@dataclasses.dataclass
class Outcome:
    server: str
    script: str
    scenario: str  # "server", "offline", "single-stream"
    requests: int = 0
    offered_qps: Optional[float] = None  # server scenario
    answered_qps: float = 0.0
    p50_ms: Optional[float] = None
    p90_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    p999_ms: Optional[float] = None
    errors: dict = dataclasses.field(default_factory=dict)  # status (or "no answer") -> count; any but a 2xx
    top_error: str = ""  # the most common of them, with an answer's message (loadgen.LoadResult.top_error)
    bound_ms: Optional[float] = None  # server scenario with --p99-ms: offered_qps is the rate found
    steps: list = dataclasses.field(default_factory=list)
    p99_by_second_ms: list = dataclasses.field(default_factory=list)  # server scenario at a fixed rate
    client_bound: bool = False
    beaten: float = 0.0  # a search told to beat this rate that could not (offered_qps 0: not measured further)

    @property
    def name(self) -> str:
        return f"server p99<={self.bound_ms:g}ms" if self.bound_ms is not None else self.scenario

    @property
    def enough_for_p99(self) -> bool:
        return self.requests >= MIN_REQUESTS_FOR_P99

    @property
    def erred(self) -> bool:
        """More than ERROR_SHARE of the requests failed (any answer but a 2xx, or none)."""
        return sum(self.errors.values()) > ERROR_SHARE * self.requests

    @property
    def queue_grows(self) -> bool:
        """Latency rising through a fixed-rate run: the server answers fewer than are offered, a queue builds."""
        s = [x for x in self.p99_by_second_ms if x is not None]
        return len(s) >= 3 and s[-1] > 2 * s[0] and s[-1] > 2 * (self.p50_ms or 0)


def _ms(x: Optional[float]) -> Optional[float]:
    return None if x is None or math.isinf(x) else x


def _outcome(server: str, script: str, scenario: str, r: loadgen.LoadResult, seconds: float) -> Outcome:
    ends = [s + ms / 1000 for s, ms in zip(r.scheduled_s, r.latencies_ms)]
    span = max([r.seconds] + ends)
    return Outcome(server, script, scenario, r.sent, None, r.answered / span, *(_ms(r.percentile(q))
                   for q in (50, 90, 99, 99.9)), r.errors(), r.top_error())


def _by_second(r: loadgen.LoadResult, seconds: float) -> list[Optional[float]]:
    """p99 of the answers by the second they were scheduled in: rising when a queue builds."""
    buckets: list[list[float]] = [[] for _ in range(max(1, math.ceil(seconds)))]
    for s, ms in zip(r.scheduled_s, r.latencies_ms):
        buckets[min(len(buckets) - 1, int(s))].append(ms)
    return [sorted(b)[min(len(b) - 1, int(0.99 * len(b)))] if b else None for b in buckets]


def fixed_rate(url: str, load: Load, rate: float, seconds: float, server: str = "", script: str = "") -> Outcome:
    """The server scenario at `rate`: every answer waited for (up to twice the run, at most 2 min), so an
    overloaded server's p99 is the queue it built."""
    r = load.open(url, rate, seconds, drain_s=min(120.0, max(10.0, 2 * seconds)))
    out = _outcome(server, script, "server", r, seconds)
    out.offered_qps, out.p99_by_second_ms = r.sent / seconds, _by_second(r, seconds)
    out.client_bound = load.bound_by_client(rate)
    return out


def offline(url: str, load: Load, in_flight: int, seconds: float, server: str = "", script: str = "") -> Outcome:
    out = _outcome(server, script, "offline", load.closed(url, in_flight, seconds), seconds)
    out.client_bound = load.bound_by_client(out.answered_qps)
    return out


def single_stream(url: str, load: Load, seconds: float, server: str = "", script: str = "") -> Outcome:
    return _outcome(server, script, "single-stream", load.closed(url, 1, seconds), seconds)


def _step(url: str, load: Load, rate: float, seconds: float, bound_ms: float, seed: int) -> Step:
    """One rate, long enough for its p99 to rest on MIN_REQUESTS_FOR_P99 requests."""
    length = max(seconds, 1.25 * MIN_REQUESTS_FOR_P99 / rate)  # 1.25: a Poisson count can fall short of its mean
    r = load.open(url, rate, length, drain_s=bound_ms / 1000 + 1, bound_ms=bound_ms, seed=seed)
    p99 = _ms(r.percentile(99))
    met = not r.stopped_early and p99 is not None and p99 <= bound_ms and r.failures() <= ERROR_SHARE * r.sent
    return Step(rate, r.sent, p99, met, r.stopped_early)


def search(url: str, load: Load, bound_ms: float, seconds: float, precision: float = 0.1,
           deadline: float = math.inf, server: str = "", script: str = "",
           on_step: Callable[[Step], None] = lambda s: None, beat: float = 0.0, ceiling: float = 0.0) -> Outcome:
    """The highest rate (the load's arrivals) whose p99 stays under `bound_ms`: bisection between 0 and a little
    above the offline throughput (doubled while it still meets the bound), until the rates that met and missed are
    within `precision` of each other, or `deadline` (time.monotonic()) passes. offered_qps is the highest rate that met
    the bound (0: none did); its p99 is that step's.

    `beat` (a tuner's best so far): only whether this server does better matters. If it misses the bound at
    `beat` x (1 + precision), the search ends there (offered_qps 0, `beaten` set): a loser costs one step (short:
    a missed bound ends it early) instead of a search down to its own rate. Its offline throughput is no reason to
    stop it: 64 in flight can be fewer than an open load keeps queued (a batching server at 64 in flight served
    564 req/s and met p99 <= 200 ms at 1,015 Poisson). `ceiling`: the offline throughput, when the caller measured
    it already."""
    alone = single_stream(url, load, min(seconds, 2.0))
    if alone.p50_ms is None or alone.p50_ms > bound_ms or alone.erred:  # misses with no load at all: no rate meets
        return Outcome(server, script, "server", alone.requests, 0.0, bound_ms=bound_ms, p50_ms=alone.p50_ms,
                       errors=alone.errors, top_error=alone.top_error)
    ceiling = ceiling or offline(url, load, 64, min(seconds, 3.0)).answered_qps
    lo, hi, best, steps = 0.0, max(1.0, 1.2 * ceiling), None, []
    beaten = Outcome(server, script, "server", 0, 0.0, bound_ms=bound_ms, steps=steps, beaten=beat)
    slowest = MIN_REQUESTS_FOR_P99 * 1.25 / 120  # no rate whose step would need more than 2 minutes

    def attempt(rate: float) -> bool:
        nonlocal best
        step = _step(url, load, rate, seconds, bound_ms, seed=len(steps))  # each its own arrivals
        steps.append(step)
        on_step(step)
        if step.met:
            best = step
        return step.met

    if beat and time.monotonic() < deadline:
        lo = beat * (1 + precision)
        if not attempt(lo):
            return beaten
        hi = max(hi, 2 * lo)
    doublings = len(steps) + 4
    while attempt(hi) and len(steps) < doublings and time.monotonic() < deadline:
        lo, hi = hi, 2 * hi
    if best is None or best.rate < hi:
        while hi - lo > precision * hi and hi > max(slowest, ceiling / 64) and time.monotonic() < deadline:
            mid = (lo + hi) / 2
            if attempt(mid):
                lo = mid
            else:
                hi = mid
    out = Outcome(server, script, "server", best.requests if best else 0, lo, bound_ms=bound_ms, steps=steps)
    out.p99_ms = best.p99_ms if best else None
    out.answered_qps = lo
    out.client_bound = load.bound_by_client(lo)
    return out


def _fmt_ms(x: Optional[float]) -> str:
    if x is None:
        return "no answer"
    return f"{x:,.1f} ms" if x < 10 else f"{x:,.0f} ms"


def line(o: Outcome) -> str:
    """One outcome as the console shows it, with units."""
    who = f"{o.server:9} {o.script:10} {o.name:18}"
    if o.bound_ms is not None:
        if not o.steps and o.erred:
            return f"{who} none: {refused(o)}"
        if not o.steps:
            return f"{who} none: one request alone takes {_fmt_ms(o.p50_ms)} (median), over the bound"
        if not o.offered_qps:
            return f"{who} no rate tried kept p99 under {o.bound_ms:g} ms ({len(o.steps)} tried)"
        text = f"{who} {o.offered_qps:,.1f} req/s with p99 {_fmt_ms(o.p99_ms)} (<= {o.bound_ms:g} ms; {len(o.steps)} rates tried)"
    else:
        offered = f"offered {o.offered_qps:,.1f} req/s, " if o.offered_qps is not None else ""
        text = (f"{who} {offered}answered {o.answered_qps:,.1f} req/s, {o.requests:,} requests; p50 {_fmt_ms(o.p50_ms)}"
                f"  p90 {_fmt_ms(o.p90_ms)}  p99 {_fmt_ms(o.p99_ms)}  p99.9 {_fmt_ms(o.p999_ms)}")
        errors = ", ".join(f"{k}: {v:,}" for k, v in sorted(o.errors.items()))
        text += f"; errors {errors or 'none'}" + (f" (most common {o.top_error})" if o.top_error else "")
        if o.queue_grows:
            text += "; latency grows through the run (a queue builds: more offered than answered)"
        if o.scenario != "single-stream" and not o.enough_for_p99:
            text += f"; p99 from fewer than {MIN_REQUESTS_FOR_P99} requests"
    return text + ("; near the client's own ceiling: may be client-bound" if o.client_bound else "")


def refused(o: Outcome) -> str:
    """Why a server's answers say nothing of its speed: they were failures (a script refusing what it is sent)."""
    return (f"{sum(o.errors.values()):,} of {o.requests:,} answers were errors, most commonly {o.top_error}; "
            f"{OWN_REQUESTS}")


def ratios(outcomes: list[Outcome]) -> list[list[str]]:
    """scorehost / each other server (AIHS, a peer) per (script, scenario), on the figure that scenario is about."""
    by = {(o.server, o.script, o.name): o for o in outcomes}
    rows = []
    for (server, script, name), theirs in by.items():
        ours = by.get(("scorehost", script, name))
        if server == "scorehost" or ours is None:
            continue
        if ours.scenario == "single-stream":
            what, a, b = "p90 latency (lower is better)", ours.p90_ms, theirs.p90_ms
        elif ours.bound_ms is None and ours.scenario == "server":
            what, a, b = "p99 latency (lower is better)", ours.p99_ms, theirs.p99_ms
        else:
            what, a, b = "req/s (higher is better)", ours.answered_qps, theirs.answered_qps
        rows.append([server, script, name, what, f"{a / b:.2f}x" if a and b else "-"])
    return rows


def markdown(outcomes: list[Outcome], command: str, load: Load, seconds: float, servers: str = "") -> str:
    machine = f"{platform.node()}: {os.cpu_count()} cores, {platform.system()} {platform.machine()}, " \
              f"Python {platform.python_version()}"
    ceiling = (f"{load.ceiling:,.0f} req/s with {load.processes} client process(es) against a server that answers "
               f"at once on this machine; results above {CLIENT_BOUND_SHARE:.0%} of it are marked client-bound"
               if load.ceiling else "not measured")
    rows = [[o.server, o.script, o.name, "-" if o.offered_qps is None else f"{o.offered_qps:,.1f}",
             f"{o.answered_qps:,.1f}", str(o.requests),
             *(_fmt_ms(x) if o.bound_ms is None or x is o.p99_ms else "-" for x in (o.p50_ms, o.p90_ms, o.p99_ms,
                                                                                   o.p999_ms)),
             ", ".join(f"{k}: {v}" for k, v in sorted(o.errors.items())) or "none",
             "; ".join(n for n, on in (("client-bound", o.client_bound), ("queue grows", o.queue_grows),
                                       (f"p99 from < {MIN_REQUESTS_FOR_P99}", o.scenario != "single-stream"
                                        and not o.enough_for_p99 and o.requests))
                       if on)]
            for o in outcomes]
    parts = [f"# scorehost bench: scenarios\n\n- command: `{command}`\n- commit: {_commit()}\n"
             f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}\n- machine: {machine}\n- client ceiling: {ceiling}\n"
             f"- arrivals (server scenario): {load.arrivals}\n"
             f"- {seconds:g} s a run (p99 search: each rate at least that long and {MIN_REQUESTS_FOR_P99} requests)\n",
             "## Results\n\nFor the p99 searches (`server p99<=B`), offered and answered are the highest rate found "
             "and its p99 is that run's; latencies are from each request's scheduled send time.\n\n"
             + table(["server", "script", "scenario", "offered req/s", "answered req/s", "requests", "p50", "p90",
                      "p99", "p99.9", "errors", "notes"], rows),
             "## Console summary\n\n```\n" + "\n".join(line(o) for o in outcomes) + "\n```"]
    if servers:
        parts.insert(1, servers)
    rs = ratios(outcomes)
    if rs:
        parts.append("## scorehost / each other server\n\n" + table(["against", "script", "scenario", "figure",
                                                                      "scorehost / it"], rs))
    steps = [o for o in outcomes if o.steps]
    if steps:
        parts.append("## p99 search steps\n\n" + table(
            ["server", "script", "bound", "rate req/s", "requests", "p99", "met"],
            [[o.server, o.script, f"{o.bound_ms:g} ms", f"{s.rate:,.1f}", str(s.requests), _fmt_ms(s.p99_ms),
              "yes" if s.met else ("no (ended early)" if s.ended_early else "no")] for o in steps for s in o.steps])
            + "\n\n![p99 against the offered rate](p99_vs_rate.png)")
    return "\n\n".join(parts) + "\n"


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "-"
    except OSError:
        return "-"


def p99_plot(series: dict[str, list[Step]], bounds: list[float], path: str, title: str,
             arrivals: str = "poisson") -> str:
    """p99 against the offered rate, one line per series; a rate that ended early (bound already missed) or lacks
    an answer for its p99 is drawn as an x at the top, not as a measured p99."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top = max([b * 3 for b in bounds] + [1.0])
    for label, steps in series.items():
        steps = sorted(steps, key=lambda s: s.rate)
        measured = [s for s in steps if s.p99_ms is not None and not s.ended_early]
        line_, = ax.plot([s.rate for s in measured], [min(s.p99_ms, top) for s in measured], marker="o", label=label)
        missed = [s for s in steps if s not in measured]
        if missed:
            ax.plot([s.rate for s in missed], [top] * len(missed), "x", color=line_.get_color(), markersize=9)
    for b in bounds:
        ax.axhline(b, color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"p99 bound {b:g} ms", (0, b), xycoords=("axes fraction", "data"), fontsize=7,
                    va="bottom", color="grey")
    ax.set(title=title + "\n(x at the top: more than 1% of requests had already missed the bound)",
           xlabel=f"offered rate (requests/s, {arrivals})", ylabel="p99 latency, ms", ylim=(0, top * 1.05))
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    if series:  # none: every configuration's answers were errors (tune), an empty frame says so
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(outcomes: list[Outcome], out_dir: str, command: str, load: Load, seconds: float, servers: str = "") -> str:
    """report.md (with `servers`, the run's roster: run.Roster.markdown), results.json and the p99 plot."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump({"client_ceiling_req_s": load.ceiling, "client_processes": load.processes,
                   "outcomes": [dataclasses.asdict(o) for o in outcomes]}, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(outcomes, command, load, seconds, servers))
    searched = [o for o in outcomes if o.steps]
    if searched:
        p99_plot({f"{o.server} {o.script} (<= {o.bound_ms:g} ms)": o.steps for o in searched},
                 sorted({o.bound_ms for o in searched}), os.path.join(out_dir, "p99_vs_rate.png"),
                 "p99 search: each rate tried", load.arrivals)
    return os.path.join(out_dir, "report.md")


def run_all(url: str, server: str, script: str, args, load: Load, deadline: float = math.inf) -> list[Outcome]:
    """Every scenario asked for, on one server, in the order given."""
    outcomes = []
    for scenario in args.scenario:
        if scenario == "server":
            if args.qps:
                outcomes.append(fixed_rate(url, load, args.qps, args.seconds, server, script))
                print(line(outcomes[-1]), flush=True)
            for bound in args.p99_ms:
                outcomes.append(search(url, load, bound, args.seconds, args.precision, deadline, server, script))
                print(line(outcomes[-1]), flush=True)
        else:
            outcomes.append(offline(url, load, args.in_flight, args.seconds, server, script) if scenario == "offline"
                            else single_stream(url, load, args.seconds, server, script))
            print(line(outcomes[-1]), flush=True)
    return outcomes


def cmd(args, scripts: dict[str, tuple[str, Optional[str]]], out: str) -> int:
    """`scorehost bench --scenario ...`: the scenarios on each local server (or on --url), then the report."""
    from bench import run

    if "server" in args.scenario and not (args.qps or args.p99_ms):
        raise SystemExit("scorehost bench: --scenario server needs --qps N (a fixed rate) or --p99-ms B (a search)")
    if args.client_processes < 1 or args.in_flight < 1 or (args.qps is not None and args.qps <= 0):
        raise SystemExit("scorehost bench: --client-processes, --in-flight and --qps must be above 0")
    bodies = bodies_of(args, "bench")
    load = Load(bodies, args.key or "", args.client_processes, arrivals=args.arrivals)
    print("scorehost bench: the client's own ceiling (2 s against a server that answers at once)...", flush=True)
    load.ceiling = loadgen.client_ceiling(bodies, args.client_processes)
    print(f"client ceiling: {load.ceiling:,.0f} req/s with {args.client_processes} client process(es)", flush=True)
    outcomes: list[Outcome] = []
    roster = run.Roster()
    if args.url:
        outcomes = run_all(args.url, "remote", "remote", args, load)
    else:
        for i, (name, (entry_script, model_dir)) in enumerate(scripts.items()):
            for group in run.groups(args.servers):
                with run.started(group, entry_script, model_dir, load.bodies, min(args.in_flight, 64),
                                 tuple(args.scorehost_arg), args.key or "", args.workers,
                                 args.proxy if entry_script == peers.PROXY_SCRIPT else None, roster) as running:
                    present = [server for server in group if server in running]  # a peer may be skipped
                    order = present if i % 2 == 0 else present[::-1]  # drift hits scorehost and AIHS alike
                    for server in order:  # one after the other: they never share the cores
                        theirs = dataclasses.replace(load, bodies=peers.bodies(server, load.bodies))
                        outcomes += run_all(running[server].url, server, name, args, theirs)
        roster.require(outcomes)
    path = write(outcomes, out, "scorehost bench " + " ".join(args.argv), load, args.seconds, roster.markdown())
    print(f"report: {path}")
    return 0
