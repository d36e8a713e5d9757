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
import functools
import json
import math
import os
import sys
import time
from typing import Callable, Optional

from bench import loadgen, peers
from bench.report import ERROR_SHARE, MIN_REQUESTS_FOR_P99, OWN_REQUESTS, head, table

SCENARIOS = ("server", "offline", "single-stream")
CLIENT_BOUND_SHARE = 0.7  # a rate above this share of the client's own ceiling may be the client's limit
P99_CONFIDENCE = 0.7  # a step meets its bound only this sure of it (bound_held): 120 requests with no miss, about
# the 125 a p99 rested on before; 0.95 (299) made a search at low rates take minutes a step, for a local tool
MAX_STEP_MISSES = 2  # a step is lengthened until this many misses could still hold its bound, no further
CONFIDENCE_RULE = (f"a rate meets the bound only when its misses (answers over the bound, errors, requests never "
                   f"answered) are so few that a server missing it 1% of the time would show as few at most "
                   f"{1 - P99_CONFIDENCE:.0%} of the time: at least {{n}} requests with none missed, longer after "
                   f"one or {MAX_STEP_MISSES} (after MLPerf's early-stopping rule)")


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
    misses: int = 0  # requests over the bound, failed or never answered (bound_held)


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
    at_least: bool = False  # p99 search: every rate tried met the bound; the highest is a lower bound

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
    return Outcome(server, script, scenario, r.sent, None, r.successes / span,
                   *(_ms(r.percentile(q, with_errors=False)) for q in (50, 90, 99, 99.9)), r.errors(), r.top_error())


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


def bound_held(requests: int, misses: int) -> bool:
    """Whether p99 <= the bound holds with P99_CONFIDENCE: a server whose requests missed it 1% of the time would
    show `misses` or fewer of `requests` at most 1 - P99_CONFIDENCE of the time (a binomial tail). A p99 read off
    ~125 requests is their second slowest: a server with a 2% tail shows it under the bound about 1 time in 4, and
    a search that took one such pass reported a rate its server did not hold."""
    if misses >= requests:
        return False
    tail = sum(math.exp(math.lgamma(requests + 1) - math.lgamma(i + 1) - math.lgamma(requests - i + 1)
                        + i * math.log(0.01) + (requests - i) * math.log(0.99)) for i in range(misses + 1))
    return tail <= 1 - P99_CONFIDENCE


@functools.lru_cache(maxsize=None)
def requests_for(misses: int) -> int:
    """The fewest requests with which `misses` of them still hold the bound (bound_held): 120 for none."""
    n = misses + 1
    while not bound_held(n, misses):
        n += 1
    return n


def _step(url: str, load: Load, rate: float, seconds: float, bound_ms: float, seed: int) -> Step:
    """One rate, at least `seconds` and until its bound holds with confidence (bound_held) or cannot: first for
    the requests that hold it with no miss, then, after a miss or MAX_STEP_MISSES, for the more that hold it with
    that many. More misses, or a run ended early (open_loop's bound_ms), miss the bound."""
    r: Optional[loadgen.LoadResult] = None
    part = 0
    while True:
        misses = r.missed(bound_ms) if r else 0
        if r is not None and (r.stopped_early or bound_held(r.sent, misses) or misses > MAX_STEP_MISSES):
            return Step(rate, r.sent, _ms(r.percentile(99)), not r.stopped_early and bound_held(r.sent, misses),
                        r.stopped_early, misses)
        more = max(requests_for(misses) - (r.sent if r else 0), requests_for(0) // 10)
        length = max(0.0 if r else seconds, 1.1 * more / rate)  # 1.1: a Poisson count may fall short (then: more)
        more_r = load.open(url, rate, length, drain_s=bound_ms / 1000 + 1, bound_ms=bound_ms, seed=16 * seed + part)
        r, part = more_r if r is None else r.merge(more_r), part + 1


def search(url: str, load: Load, bound_ms: float, seconds: float, precision: float = 0.1,
           deadline: float = math.inf, server: str = "", script: str = "",
           on_step: Callable[[Step], None] = lambda s: None, beat: float = 0.0, ceiling: float = 0.0) -> Outcome:
    """The highest rate (the load's arrivals) whose p99 stays under `bound_ms`: bisection between 0 and a little
    above the offline throughput (doubled while it still meets the bound), until the rates that met and missed are
    within `precision` of each other, or `deadline` (time.monotonic()) passes. A rate meets the bound only with
    confidence (_step, bound_held). offered_qps is the highest rate that met the bound (0: none did); its p99 is that
    step's; `at_least` when no higher rate was seen to miss (the doubling stopped at its step limit or the deadline).

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
    hi, best, steps = max(1.0, 1.2 * ceiling), None, []
    beaten = Outcome(server, script, "server", 0, 0.0, bound_ms=bound_ms, steps=steps, beaten=beat)
    slowest = 1.1 * requests_for(0) / 120  # no rate whose step would need more than 2 minutes

    def attempt(rate: float) -> bool:
        nonlocal best
        step = _step(url, load, rate, seconds, bound_ms, seed=len(steps))  # each its own arrivals
        steps.append(step)
        on_step(step)
        if step.met:
            best = step
        return step.met

    if beat and time.monotonic() < deadline:
        if not attempt(beat * (1 + precision)):
            return beaten
        hi = max(hi, 2 * beat * (1 + precision))
    doublings = len(steps) + 4
    while attempt(hi) and len(steps) < doublings and time.monotonic() < deadline:
        hi *= 2
    lo = best.rate if best else 0.0  # the last rate the doubling met (hi too, when it stopped at its step limit)
    if best is None or best.rate < hi:
        while hi - lo > precision * hi and hi > max(slowest, ceiling / 64) and time.monotonic() < deadline:
            mid = (lo + hi) / 2
            if attempt(mid):
                lo = mid
            else:
                hi = mid
    rate = best.rate if best else 0.0
    out = Outcome(server, script, "server", best.requests if best else 0, rate, rate, bound_ms=bound_ms, steps=steps,
                  at_least=bool(best) and not any(s.rate > rate for s in steps))
    out.p99_ms = best.p99_ms if best else None
    out.client_bound = load.bound_by_client(rate)
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
        text = (f"{who} {_rate(o)} req/s with p99 {_fmt_ms(o.p99_ms)} (<= {o.bound_ms:g} ms; {len(o.steps)} rates "
                "tried" + ("; every one met it" if o.at_least else "") + ")")
    else:
        offered = f"offered {o.offered_qps:,.1f} req/s, " if o.offered_qps is not None else ""
        text = (f"{who} {offered}succeeded {o.answered_qps:,.1f} req/s, {o.requests:,} requests; p50 {_fmt_ms(o.p50_ms)}"
                f"  p90 {_fmt_ms(o.p90_ms)}  p99 {_fmt_ms(o.p99_ms)}  p99.9 {_fmt_ms(o.p999_ms)}")
        errors = ", ".join(f"{k}: {v:,}" for k, v in sorted(o.errors.items()))
        text += f"; errors {errors or 'none'}" + (f" (most common {o.top_error})" if o.top_error else "")
        if o.queue_grows:
            text += "; latency grows through the run (a queue builds: more offered than answered)"
        if o.scenario != "single-stream" and not o.enough_for_p99:
            text += f"; p99 from fewer than {MIN_REQUESTS_FOR_P99} requests"
    return text + ("; near the client's own ceiling: may be client-bound" if o.client_bound else "")


def _rate(o: Outcome) -> str:
    """A p99 search's rate, "at least" where no rate above it was seen to miss."""
    return ("at least " if o.at_least else "") + f"{o.offered_qps:,.1f}"


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
        compared = a and b and not ours.erred and not theirs.erred  # errors make a figure nobody's speed
        rows.append([server, script, name, what, f"{a / b:.2f}x" if compared else "-"])
    return rows


def markdown(outcomes: list[Outcome], command: str, load: Load, seconds: float, servers: str = "") -> str:
    ceiling = (f"{load.ceiling:,.0f} req/s with {load.processes} client process(es) against a server that answers "
               f"at once on this machine; results above {CLIENT_BOUND_SHARE:.0%} of it are marked client-bound"
               if load.ceiling else "not measured")
    rows = [[o.server, o.script, o.name, "-" if o.offered_qps is None else _rate(o) if o.bound_ms is not None
             else f"{o.offered_qps:,.1f}", f"{o.answered_qps:,.1f}", str(o.requests),
             *(_fmt_ms(x) if o.bound_ms is None else "-" for x in (o.p50_ms, o.p90_ms)),
             "-" if o.bound_ms is not None and not o.offered_qps else _fmt_ms(o.p99_ms),
             _fmt_ms(o.p999_ms) if o.bound_ms is None else "-",
             ", ".join(f"{k}: {v}" for k, v in sorted(o.errors.items())) or "none",
             "; ".join(n for n, on in (("client-bound", o.client_bound), ("queue grows", o.queue_grows),
                                       (f"p99 from < {MIN_REQUESTS_FOR_P99}", o.scenario != "single-stream"
                                        and not o.enough_for_p99 and o.requests))
                       if on)]
            for o in outcomes]
    parts = [f"# scorehost bench: scenarios\n\n{head(command)}- client ceiling: {ceiling}\n"
             f"- arrivals (server scenario): {load.arrivals}\n- {seconds:g} s a run (p99 search: each rate at least "
             f"that long; {CONFIDENCE_RULE.format(n=requests_for(0))})\n",
             "## Results\n\nFor the p99 searches (`server p99<=B`), offered and succeeded are the highest rate found "
             "(\"at least\" where every rate tried met the bound) and its p99 is that run's; latencies are from each "
             "request's scheduled send time. Succeeded req/s and the percentiles count the answers with a 2xx (a "
             "request never answered as slower than any); errors are counted apart.\n\n"
             + table(["server", "script", "scenario", "offered req/s", "succeeded req/s", "requests", "p50", "p90",
                      "p99", "p99.9", "errors", "notes"], rows),
             "## Console summary\n\n```\n" + "\n".join(line(o) for o in outcomes) + "\n```"]
    if servers:
        parts.insert(1, servers)
    failing = [o for o in outcomes if o.erred]
    if failing:
        parts.insert(-1, f"**Warning**: more than {ERROR_SHARE:.0%} of the answers were errors in "
                     + "; ".join(map(warning, failing)) + ". Their figures count the successful answers alone.")
    rs = ratios(outcomes)
    if rs:
        parts.append("## scorehost / each other server\n\n" + table(["against", "script", "scenario", "figure",
                                                                      "scorehost / it"], rs))
    steps = [o for o in outcomes if o.steps]
    if steps:
        parts.append("## p99 search steps\n\n" + table(
            ["server", "script", "bound", "rate req/s", "requests", "p99", "met"],
            [[o.server, o.script, f"{o.bound_ms:g} ms", f"{s.rate:,.1f}", str(s.requests), _fmt_ms(s.p99_ms),
              _met(s)] for o in steps for s in o.steps])
            + "\n\n![p99 against the offered rate](p99_vs_rate.png)")
    return "\n\n".join(parts) + "\n"


def _met(s: Step) -> str:
    if s.met:
        return "yes"
    if s.ended_early:
        return "no (ended early)"
    return f"no ({s.misses} of {s.requests} missed: not sure of it)" if s.misses <= 0.01 * s.requests else "no"


def warning(o: Outcome) -> str:
    """An outcome whose answers were more than ERROR_SHARE errors, in one line (console and report alike)."""
    return f"{o.server}/{o.script}/{o.name}: {refused(o)}"


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
    for o in outcomes:
        if o.erred:
            print(f"WARNING: {warning(o)}", file=sys.stderr, flush=True)
    return outcomes


def cmd(args, scripts: dict[str, tuple[str, Optional[str]]], out: str) -> int:
    """`scorehost bench --scenario ...`: the scenarios on each local server (or on --url), then the report."""
    from bench import run

    if "server" in args.scenario and not (args.qps or args.p99_ms):
        raise SystemExit("scorehost bench: --scenario server needs --qps N (a fixed rate) or --p99-ms B (a search)")
    if args.client_processes < 1 or args.in_flight < 1 or (args.qps is not None and args.qps <= 0):
        raise SystemExit("scorehost bench: --client-processes, --in-flight and --qps must be above 0")
    if args.url and (why := loadgen.connect_error(args.url)):
        raise SystemExit(f"scorehost bench: cannot connect to {args.url}: {why}")
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
