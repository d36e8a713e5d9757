"""Soak: mixed traffic for a long while against the reference score.py on the small colour model, watching for
failures, latency drift and memory growth.

    python -m bench.soak --seconds 600 --out reports/soak      # the 10-minute soak
    python -m bench.soak --seconds 30                          # the smoke version CI runs (tests/)

Traffic, at 8 concurrent keep-alive clients (bench/loadgen.py): valid JPEGs and PNGs, JSON batches, and every bad
input score.py refuses, interleaved. Every 10 s window records p99 and each worker's RSS. It fails (exit 1) on any
answer other than the expected one for its kind (so any 5xx), on a dropped connection, or when a worker's memory
grew 10% or more from the end of the warm-up (the first minute, or the first third of a shorter run) to the end;
memory is judged only on runs of 2 minutes or more (TensorFlow's allocator is still growing in the first tens of
seconds).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from typing import Optional

from bench import loadgen
from bench.run import tree_rss_mb
from scorehost.processes import process_tree
from scorehost import REFERENCE_SCRIPT, corpus, processes
from scorehost.models import demo_model_dir

WINDOW_S = 10


def requests() -> tuple[list[tuple[str, str, bytes]], dict[str, int]]:
    """The labelled corpus's POSTs as (label, content type, body), valid ones three times as often as each bad kind;
    and the status each label must get."""
    probes = [p for p in corpus.labelled() if p.method == "POST"]
    mix = [(p.name, p.content_type, p.body) for p in probes for _ in range(3 if p.status == 200 else 1)]
    return mix, {p.name: p.status for p in probes}


def worker_rss(master_pid: int) -> dict[int, float]:
    return {pid: tree_rss_mb(pid) for pid in process_tree(master_pid) if pid != master_pid}


def soak(seconds: float, clients: int = 8, model_dir: Optional[str] = None, workers: int = 2,
         say=print) -> dict:
    mix, expected = requests()
    cycle = itertools.cycle(mix)
    windows = []
    totals: dict[str, int] = {}
    dropped = 0
    with processes.running("scorehost", REFERENCE_SCRIPT, model_dir or demo_model_dir("colors"), workers=workers,
                           extra_args=("--threads", "4"), timeout=300) as server:
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            window = min(WINDOW_S, seconds - (time.monotonic() - started))
            r = loadgen.run(server.url, clients, max(1.0, window), lambda: next(cycle))
            for key, n in r.statuses.items():
                totals[key] = totals.get(key, 0) + n
            dropped += r.dropped
            windows.append({"t_s": round(time.monotonic() - started), "requests": r.answered,
                            "p99_ms": round(r.percentile(99), 1), "rss_mb": worker_rss(server.pid)})
            say(f"t={windows[-1]['t_s']:4d}s  {r.answered:5d} answers  p99 {windows[-1]['p99_ms']:7.1f} ms  "
                f"worker RSS {sorted(round(v) for v in windows[-1]['rss_mb'].values())} MB")
    unexpected = {k: n for k, n in totals.items() if int(k.rsplit(" ", 1)[1]) != expected[k.rsplit(" ", 1)[0]]}
    warmup_s = min(60.0, seconds / 3)
    after_warmup = [w for w in windows if w["t_s"] >= warmup_s] or windows[-1:]
    first, last = after_warmup[0]["rss_mb"], windows[-1]["rss_mb"]
    growth = {pid: (last[pid] - first[pid]) / first[pid] for pid in first if pid in last}
    memory_ok = seconds < 120 or all(g < 0.10 for g in growth.values())
    return {"seconds": seconds, "clients": clients, "totals": totals, "unexpected": unexpected, "dropped": dropped,
            "windows": windows, "warmup_s": warmup_s, "rss_growth_after_warmup": growth,
            "ok": not unexpected and not dropped and memory_ok}


def worker_restart_seconds(model_dir: Optional[str] = None) -> float:
    """kill -9 one of two workers serving the reference score.py: seconds until its replacement is ready to serve
    (it logs "worker N ready" once the script is imported and init() is done)."""
    import signal

    with processes.running("scorehost", REFERENCE_SCRIPT, model_dir or demo_model_dir("colors"), workers=2,
                           timeout=300) as server:
        before = set(worker_rss(server.pid))
        os.kill(min(before), signal.SIGKILL)
        killed = time.monotonic()
        while time.monotonic() - killed < 120:
            fresh = set(worker_rss(server.pid)) - before
            if any(f"worker {pid} ready for serving traffic" in server.output() for pid in fresh):
                return time.monotonic() - killed
            time.sleep(0.05)
        raise RuntimeError("the killed worker was not replaced within 120 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--out", help="folder for soak.json")
    parser.add_argument("--restart-only", action="store_true",
                        help="only measure how long a killed worker takes to serve again")
    args = parser.parse_args()
    if args.restart_only:
        print(f"worker back {worker_restart_seconds():.1f} s after kill -9")
        return 0
    result = soak(args.seconds, args.clients)
    print(json.dumps({k: v for k, v in result.items() if k != "windows"}, indent=1))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "soak.json"), "w") as f:
            json.dump(result, f, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
