"""`scorehost tune`: the `scorehost serve` flags that carry the most requests a second under a p99 bound, for one
entry script on this machine (CPU or GPU), found within a time budget.

Each configuration tried is a real `scorehost serve` on 127.0.0.1, measured with the server scenario's p99 search
(bench/scenarios.py: open-loop Poisson load, or --arrivals uniform; the highest rate whose p99 stays under
--p99-ms). The search is coordinate ascent from scorehost's defaults: one flag at a time (--batch-max, --workers,
--batch-delay-ms, --threads, --batch-sizes) over a few values each, keeping the best, until a full pass improves
nothing or the budget is spent. Each candidate's offline throughput is measured first and the most promising is
searched first; the others only as far as they beat the best so far: one that misses the bound just above the
best's rate is stopped there (a loser costs one step, not a search down to its own rate). --threads > 1 without
batching lets run() calls overlap, so it is tried only with --thread-safe. Configurations are compared by what
serve would run (effective(): --workers 2 where 2 is the default is the defaults).
Everything goes to one folder: trials.jsonl (one line per configuration, read back on the next run, so a run
stopped half-way resumes where it was), frontier.md (the table), frontier.png (rate against p99 for every
configuration) and best.txt (the winning serve line).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Iterator, Optional

from bench import loadgen, scenarios
from bench.report import ERROR_SHARE, head, table

PASS_ORDER = ("batch_max", "workers", "batch_delay_ms", "threads", "batch_sizes")


def register(sub) -> None:
    tune = sub.add_parser("tune", help="find the serve flags with the most requests a second under a p99 bound")
    tune.add_argument("--entry-script", required=True, help="the entry script to tune for")
    tune.add_argument("--model-dir", help="AZUREML_MODEL_DIR for the script")
    tune.add_argument("--p99-ms", type=float, default=100, help="the latency bound (default 100 ms)")
    tune.add_argument("--budget", type=float, default=10, help="minutes to spend (default 10)")
    tune.add_argument("--seconds", type=float, default=5, help="least length of each rate tried")
    tune.add_argument("--precision", type=float, default=0.1, help="p99 search precision (see scorehost bench)")
    tune.add_argument("--thread-safe", action="store_true",
                      help="run() may be called on several threads at once: also try --threads > 1 without batching")
    scenarios.add_arrivals(tune)
    tune.add_argument("--client-processes", type=int, default=1, help="client processes sharing the load")
    tune.add_argument("--images", help="directory of JPEG/PNG files to send (default: the generated corpus)")
    tune.add_argument("--batch", type=int, default=1, help="images per request (>1: JSON batch form)")
    tune.add_argument("--requests", metavar="DIR",
                      help="send these requests in turn instead of images: those `scorehost serve --record DIR` kept "
                           "(a script that takes JSON, or anything but images, needs its own)")
    tune.add_argument("--out", help="results folder (default: reports/tune-<script>); an existing one is resumed")
    tune.set_defaults(func=cmd)


def candidates(flag: str, config: dict, cores: int, has_batch: bool, thread_safe: bool) -> list:
    """Values to try for `flag` from `config` (None: scorehost's default, the flag left out)."""
    batched = (config.get("batch_max") or 0) > 1
    powers = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= cores] + ([cores] if cores not in (1, 2, 4, 8, 16, 32, 64) else [])
    if flag == "batch_max":
        return [4, 16, 64, 0] if has_batch else []  # 0 (off) last: on a CPU it is the default again
    if flag == "workers":
        return powers
    if flag == "threads":
        if batched:
            return [config["batch_max"], 2 * config["batch_max"], 4 * config["batch_max"]]
        return [1, 2, 4, 8] if thread_safe else []
    if flag == "batch_delay_ms":  # around the default (100): 0 never waits, and a wait must outlast a run to pay
        return [0, 25, 50, 200] if batched else []
    if flag == "batch_sizes":
        return ["any", "powers"] if batched else []
    raise ValueError(flag)


def serve_args(config: dict) -> list[str]:
    """The `scorehost serve` flags of a configuration (only those set)."""
    argv = []
    for flag in PASS_ORDER:
        value = config.get(flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", _sizes_arg(config) if flag == "batch_sizes" else str(value)]
    return argv


def _flags(config: dict) -> str:
    """A configuration as its serve flags, for the reports."""
    return " ".join(serve_args(config)) or "(defaults)"


def _sizes_arg(config: dict) -> str:
    """--batch-sizes for tune's "any" or "powers" (of two, up to --batch-max)."""
    if config["batch_sizes"] == "any":
        return "any"
    top = int(config["batch_max"])
    return ",".join(str(2 ** i) for i in range(top.bit_length()) if 2 ** i < top) + f",{top}"


def effective(config: dict, has_batch: bool, gpus: tuple[str, ...] = ()) -> dict:
    """The configuration as `scorehost serve` would run it on this machine (each flag left out filled with its
    computed default, server/settings.py), so two spellings of one configuration (--workers 2 where 2 is the
    default) are one trial, and the default's own value is not tried again as if it were a change."""
    from server import settings

    given = {s.name: s.default for s in settings.SETTINGS}
    given.update({k: v for k, v in config.items() if v is not None})
    if config.get("batch_sizes") is not None:
        given["batch_sizes"] = settings.BY_NAME["batch_sizes"].type(_sizes_arg(config))
    filled = settings.fill_defaults(settings.Settings(given), settings.Machine(gpus, has_batch))
    batched = has_batch and filled.batch_max > 1
    return {"workers": filled.workers, "threads": filled.threads, "batch_max": filled.batch_max if batched else 0,
            **({"batch_delay_ms": filled.batch_delay_ms, "batch_sizes": filled.batch_sizes} if batched else {})}


@dataclasses.dataclass
class Trial:
    config: dict
    rate: float = 0.0  # the highest rate that kept p99 under the bound (0: none)
    p99_ms: Optional[float] = None
    steps: list = dataclasses.field(default_factory=list)
    complete: bool = True  # False: the budget ran out during its search (rate is a lower bound)
    error: str = ""
    beaten: float = 0.0  # measured only far enough to see it does not beat this rate (the best then)
    ceiling: float = 0.0  # offline throughput, req/s (the probe)
    effective: Optional[dict] = None  # what serve ran (effective()): a resumed row counts only if it still is
    at_least: bool = False  # every rate its search tried met the bound (rate is a lower bound)


@contextlib.contextmanager
def serving(config: dict, args) -> Iterator[str]:
    """A `scorehost serve` of this configuration, healthy; its URL. RuntimeError: it would not start."""
    from scorehost import processes

    server = processes.start("scorehost", args.entry_script, args.model_dir, workers=None,
                             extra_args=tuple(serve_args(config)))
    try:
        server.wait_healthy(300)
        yield server.url
    finally:
        server.stop()


def probe(config: dict, args, load: scenarios.Load) -> float:
    """The configuration's offline throughput (64 in flight, 3 s; 0: it would not start): orders the searches, the
    most promising first, so the others are measured against a high bar and stopped early."""
    try:
        with serving(config, args) as url:
            return scenarios.offline(url, load, 64, min(args.seconds, 3.0)).answered_qps
    except RuntimeError:
        return 0.0


def measure(config: dict, args, load: scenarios.Load, deadline: float, beat: float = 0.0,
            ceiling: float = 0.0) -> Trial:
    try:
        with serving(config, args) as url:
            out = scenarios.search(url, load, args.p99_ms, args.seconds, args.precision, deadline, beat=beat,
                                   ceiling=ceiling)
    except RuntimeError as ex:  # the server would not start with these flags
        return Trial(config, error=str(ex).splitlines()[0])
    if not out.steps and out.erred:  # its answers were failures: no rate is worth anything
        return Trial(config, error=scenarios.refused(out), ceiling=ceiling)
    return Trial(config, out.offered_qps or 0.0, out.p99_ms, [dataclasses.asdict(s) for s in out.steps],
                 time.monotonic() < deadline, beaten=out.beaten, ceiling=ceiling, at_least=out.at_least)


def report(trials: list[Trial], args, best: Trial, out: str) -> str:
    """frontier.md, frontier.png and best.txt; returns the winning serve line ("" where no configuration met the
    bound with at most ERROR_SHARE of failures: then nothing is recommended, and best.txt is not written)."""
    line = " ".join(["scorehost serve", "--entry-script", args.entry_script]
                    + (["--model-dir", args.model_dir] if args.model_dir else []) + serve_args(best.config)) \
        if best.rate else ""
    winner = (f"Winner:\n\n    {line}" if line else
              f"No configuration met the bound with at most {ERROR_SHARE:.0%} errors: nothing is recommended.")
    rows = [[_flags(t.config), _rate(t), scenarios._fmt_ms(t.p99_ms) if t.rate else "-",
             str(len(t.steps)), t.error or ("best" if t is best else "")] for t in trials]
    with open(os.path.join(out, "frontier.md"), "w") as f:
        f.write(f"# scorehost tune: {args.entry_script}, p99 <= {args.p99_ms:g} ms\n\n"
                f"{head(' '.join(['scorehost tune', *getattr(args, 'argv', [])]))}- client ceiling: "
                f"{load_ceiling(out):,.0f} req/s\n\n"
                + table(["serve flags", "req/s at p99 bound", "p99", "rates tried", "note"], rows)
                + f"\n\n{winner}\n\n![frontier](frontier.png)\n")
    if line:
        with open(os.path.join(out, "best.txt"), "w") as f:
            f.write(line + "\n")
    else:
        with contextlib.suppress(FileNotFoundError):  # a resumed folder's older winner is no longer one
            os.remove(os.path.join(out, "best.txt"))
    scenarios.p99_plot({_flags(t.config): [scenarios.Step(**s) for s in t.steps]
                        for t in trials if t.steps}, [args.p99_ms], os.path.join(out, "frontier.png"),
                       f"scorehost tune: p99 against rate, each configuration ({os.path.basename(args.entry_script)})",
                       args.arrivals)
    return line


def _rate(t: Trial) -> str:
    if t.beaten and not t.rate:
        return f"not above {t.beaten:,.1f} (stopped there)"
    return f"{t.rate:,.1f}" + ("" if t.complete and not t.at_least else " (at least)")


def load_ceiling(out: str) -> float:
    try:
        with open(os.path.join(out, "ceiling.json")) as f:
            return json.load(f)["req_s"]
    except (OSError, ValueError, KeyError):
        return 0.0


def cmd(args) -> int:
    from server.entry_script import defines
    from server.gpus import visible_gpus

    if not os.path.isfile(args.entry_script):
        raise SystemExit(f"scorehost tune: --entry-script {args.entry_script}: no such file")
    if args.p99_ms <= 0 or args.budget < 0 or args.seconds <= 0:
        raise SystemExit("scorehost tune: --p99-ms and --seconds must be above 0, --budget at least 0")
    args.entry_script = os.path.abspath(args.entry_script)
    out = args.out or os.path.join("reports", "tune-" + os.path.splitext(os.path.basename(args.entry_script))[0])
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "trials.jsonl")
    has_batch, cores, gpus = defines(args.entry_script, "run_batch"), os.cpu_count() or 1, tuple(visible_gpus())

    def _key(config: dict) -> str:
        return json.dumps(effective(config, has_batch, gpus), sort_keys=True)

    trials: dict[str, Trial] = {}
    if os.path.exists(path):
        with open(path) as f:
            for row in f:
                t = Trial(**json.loads(row))
                # one cut short by the budget is measured again, and so is one measured under other defaults
                if t.complete and t.effective and (key := _key(t.config)) == json.dumps(t.effective, sort_keys=True):
                    trials[key] = t
        print(f"scorehost tune: resuming {out}: {len(trials)} configuration(s) already measured", flush=True)
    deadline = time.monotonic() + args.budget * 60
    bodies = scenarios.bodies_of(args, "tune")
    load = scenarios.Load(bodies, processes=args.client_processes, ceiling=load_ceiling(out), arrivals=args.arrivals)
    if not load.ceiling and args.budget:
        load.ceiling = loadgen.client_ceiling(bodies, args.client_processes)
        with open(os.path.join(out, "ceiling.json"), "w") as f:
            json.dump({"req_s": load.ceiling, "client_processes": args.client_processes}, f)

    def tried(config: dict, beat: float, ceiling: float) -> Trial:
        key = _key(config)
        if key not in trials and time.monotonic() < deadline:
            print(f"searching {_flags(config)} (offline {ceiling:,.1f} req/s) ...",
                  flush=True)
            t = measure(config, args, load, deadline, beat, ceiling)
            t.effective = json.loads(key)
            print(f"  {t.error or _rate(t)}" + ("" if t.error or t.beaten else
                                                  f" req/s with p99 {scenarios._fmt_ms(t.p99_ms)}"), flush=True)
            with open(path, "a") as f:
                f.write(json.dumps(dataclasses.asdict(t)) + "\n")
            trials[key] = t
        return trials.get(key, Trial(config, complete=False))

    def ranked(configs: list[dict]) -> list[tuple[dict, float]]:
        """The configurations not measured yet, each with its offline throughput, the most promising first."""
        fresh: dict[str, dict] = {}
        for config in configs:  # one per effective configuration, in its first spelling (the defaults: {})
            if (key := _key(config)) not in trials:
                fresh.setdefault(key, config)
        probed = []
        for config in fresh.values():
            if time.monotonic() < deadline:
                probed.append((config, probe(config, args, load)))
                print(f"probed {_flags(config)}: offline {probed[-1][1]:,.1f} req/s",
                      flush=True)
        return sorted(probed, key=lambda pc: -pc[1])

    best = max(trials.values(), key=lambda t: t.rate, default=Trial({}, complete=False))
    pending = [{}]  # the defaults are judged beside the first flag's values
    improved = True
    while improved and time.monotonic() < deadline:
        improved = False
        for flag in PASS_ORDER:
            # batch_max spelled out: the defaults may batch (a GPU), and the batching flags are tried on them too
            basis = {**best.config, "batch_max": effective(best.config, has_batch, gpus)["batch_max"]}
            configs = pending + [{**basis, flag: v}
                                 for v in candidates(flag, basis, cores, has_batch, args.thread_safe)]
            pending = []
            for config, ceiling in ranked(configs):
                t = tried(config, best.rate, ceiling)
                if t.rate > best.rate * 1.03:  # past the noise of one measurement
                    best, improved = t, True
    if not trials:
        raise SystemExit(f"scorehost tune: nothing measured (budget {args.budget:g} min)")
    best = max(trials.values(), key=lambda t: (t.rate, t.config == {}))  # on a tie, the defaults
    ordered = sorted(trials.values(), key=lambda t: -t.rate)
    line = report(ordered, args, best, out)
    print(f"\nfrontier: {os.path.join(out, 'frontier.md')}\n"
          + table(["serve flags", "req/s", "p99"], [[_flags(t.config), _rate(t),
                                                    scenarios._fmt_ms(t.p99_ms)] for t in ordered]))
    if not line:
        errors = next((t.error for t in ordered if t.error), "")
        print(f"scorehost tune: no configuration kept p99 <= {args.p99_ms:g} ms with at most {ERROR_SHARE:.0%} "
              f"errors: nothing to recommend" + (f" ({errors})" if errors else ""), file=sys.stderr, flush=True)
        return 1
    print(f"\nbest under p99 <= {args.p99_ms:g} ms ({best.rate:,.1f} req/s):\n{line}", flush=True)
    return 0
