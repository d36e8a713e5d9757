"""Issue 22's table: scorehost's batching beside the peers' own, on a proxy of a GPU script, closed-loop clients.

    python -m bench.batching_table [--servers scorehost litserve ...] [--clients 1 8 16 64 128] [--seconds 10]
        [--warmup 2] [--rounds 3] [--cost-ms 40] [--batch-max 64] [--peer-delay-ms 10] [--peers-dir DIR]
        [--images DIR]
    python -m bench.batching_table --servers scorehost scorehost-greedy --entry-script bench/gpu/score_torch.py
        [--clients 1 8 16 64 128 256] [--images DIR]       # the policy against greedy on a real model (a GPU)

The model is the same everywhere: a Pillow decode and resize of the request's JPEG on the request path, then a
batch call costing --cost-ms whatever its size (scorehost: tests/scripts/pipeline.py with CUDA_VISIBLE_DEVICES=0,
i.e. one model process and the GPU defaults; peers: bench/peers/*_peer.py on bench/peers/proxy.py, each with its
own batching, `--peer-delay-ms` as its delay bound and one model copy). Peers run from their own virtualenvs,
PEERS_DIR/NAME/bin/python (bench/peers/install.sh makes them); one that is not installed is skipped, said so.
scorehost's variants (and AIHS) stay up side by side and, in each round and concurrency, take turns (the order
alternates); then each peer runs its round alone, started for it and stopped after (idle, LitServe takes ~0.2 core
and Ray Serve ~0.15, which would be taken from whichever server is measured). Each cell follows `--warmup` seconds
of the same load, not counted, so that no server is measured while it adapts, and the table
gives the median of the rounds: answers a second, mean batch per run_batch() call, p99, and the fraction of the
ideal min(clients, batch max) / cost; for scorehost also how busy the model was (the share of the cell's time
inside run_batch(), from /metrics: the calls that ended in the cell, so up to one call over). `scorehost-greedy`
is scorehost with `--batch-delay-ms 0`: the policy never waits, it sends whatever is queued when the model frees
(the policy before issue 22). Before the load, each
server must answer 64 concurrent distinct images each with its own image's colour.
With `--entry-script` another script takes the proxy's place (scorehost's variants only: the peers serve the proxy):
on a GPU, `bash bench/gpu/run.sh` runs the policy against greedy on bench/gpu/score_torch.py. Its cost is not
fixed, so there is no ideal column: the model's busy share says how much of the GPU's time the batches used, and
the check before the load is that 64 concurrent distinct images are all answered 200."""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import re
import statistics
import sys
import tempfile
import urllib.request
from dataclasses import dataclass, field
from typing import Callable, Optional

from bench import loadgen, peers
from scorehost import processes

PIPELINE = peers.PROXY_SCRIPT
SCOREHOSTS = {  # scorehost's own policy, and the greedy one it replaced (dispatch whatever is queued, never wait)
    "scorehost": (),
    "scorehost-greedy": ("--batch-delay-ms", "0"),
}


@dataclass
class Server:
    name: str
    process: processes.ServerProcess
    base: str
    stats: Optional[str] = None  # the proxy's per-call log (peers); scorehost: /metrics
    proxy: bool = True  # serves the proxy script (its answers carry their image's mean colour)

    def body(self, jpeg: bytes) -> tuple[str, bytes]:
        return peers.body(self.name, jpeg)

    def post(self, jpeg: bytes, timeout: float = 30) -> tuple[int, dict]:
        status, data = peers.post(self.name, self.base, jpeg, timeout)
        if status != 200:
            return status, {}
        answer = json.loads(data)
        return status, answer[0] if isinstance(answer, list) else answer

    def batch_counts(self) -> tuple[float, float, Optional[float]]:
        """(items, calls, seconds inside run_batch()) so far: scorehost's /metrics, or the proxy's log in a peer
        (which times no calls: None)."""
        if self.stats is None:
            with urllib.request.urlopen(self.base + "/metrics", timeout=10) as r:
                text = r.read().decode()
            total = lambda name: sum(float(v) for v in re.findall(rf"^{name} (\S+)", text, re.M))  # noqa: E731
            return (total("scorehost_batch_size_sum"), total("scorehost_batch_size_count"),
                    total("scorehost_run_duration_seconds_sum"))
        with open(self.stats) as f:
            sizes = [int(line) for line in f if line.strip()]
        return float(sum(sizes)), float(len(sizes)), None


@dataclass
class Cell:
    rates: list[float] = field(default_factory=list)
    batches: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    busy: list[float] = field(default_factory=list)  # share of the cell's time inside run_batch() (scorehost)
    errors: int = 0


def start(name: str, args: argparse.Namespace, scratch: str) -> Optional[Server]:
    env = {"PIPELINE_COST_S": str(args.cost_ms / 1000)}
    if name in SCOREHOSTS:
        setup_env, flags = peers.scorehost_setup(args.cost_ms / 1000, args.batch_max)
        process = processes.start("scorehost", args.entry_script, env=setup_env, workers=None,
                                  extra_args=(*flags, *args.scorehost_arg, *SCOREHOSTS[name]))  # the variant's win
        return Server(name, process, process.url, proxy=args.entry_script == PIPELINE)
    if name == "aihs":
        process = processes.start("aihs", PIPELINE, env=env, workers=1)
        return Server(name, process, process.url)
    try:
        peer = peers.start(name, args.peers_dir, scratch, cost_s=args.cost_ms / 1000, max_batch=args.batch_max,
                           delay_ms=args.peer_delay_ms)
    except peers.Unavailable as ex:
        print(f"{name}: {ex}: skipped", file=sys.stderr)
        return None
    return Server(name, peer.process, peer.url, peer.stats)


def ready(server: Server, jpeg: bytes) -> None:
    """Answering, and each of 64 concurrent distinct images gets its own answer."""
    peers.wait_answering(server.name, server.process, server.base, 300, jpeg)
    if not own_answers(server):
        raise RuntimeError(f"{server.name}: some answers were not their own image's")


def colour_jpeg(i: int) -> tuple[tuple[int, int, int], bytes]:
    from PIL import Image

    rgb = (12 * (i % 20) + 8, 12 * ((i // 20) % 20) + 8, 128)
    out = io.BytesIO()
    Image.new("RGB", (64, 48), rgb).save(out, "JPEG", quality=95)
    return rgb, out.getvalue()


def own_answers(server: Server, n: int = 64) -> bool:
    """n concurrent requests, each a different solid colour: does each get its own image's mean back? (Another
    script than the proxy: is each answered 200?)"""
    images = [colour_jpeg(i) for i in range(n)]
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda image: server.post(image[1]), images))
    return all(status == 200 and (not server.proxy or all(abs(m - c) <= 3 for m, c in zip(body["mean"], rgb)))
               for (rgb, _), (status, body) in zip(images, answers))


def measure(server: Server, clients: int, seconds: float, corpus: list[bytes], cell: Cell, processes: int,
            warmup: float = 0.0) -> None:
    bodies = loadgen.Bodies(tuple(("image", *server.body(jpeg)) for jpeg in corpus))
    if warmup > 0:  # the same load first, not counted: each server settles at this concurrency
        loadgen.closed_loop(server.base, clients, warmup, bodies, processes=processes)
    items0, calls0, run0 = server.batch_counts()
    r = loadgen.closed_loop(server.base, clients, seconds, bodies, processes=processes)
    items1, calls1, run1 = server.batch_counts()
    ok = sum(n for label, n in r.statuses.items() if label.endswith(" 200"))
    cell.rates.append(ok / seconds)
    cell.batches.append((items1 - items0) / (calls1 - calls0) if calls1 > calls0 else 0.0)
    if run0 is not None and run1 is not None:
        cell.busy.append((run1 - run0) / seconds)
    cell.p99s.append(r.percentile(99))
    cell.errors += r.answered - ok + r.dropped


def table(results: dict[tuple[str, int], Cell], names: list[str], clients: list[int],
          ideal: Optional[Callable[[int], float]], command: str) -> str:
    """The median of the rounds per cell; `ideal` None: a script of no fixed cost (no ideal column)."""
    head = ["clients", *(["ideal"] if ideal else []), *names]
    rows = [f"`{command}`", "", "| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for c in clients:
        cells = [str(c)] + ([f"{ideal(c):,.0f}/s"] if ideal else [])
        for name in names:
            cell = results[(name, c)]
            rate = statistics.median(cell.rates)
            parts = ([f"{rate / ideal(c):.2f} of ideal"] if ideal else []) + [
                f"batch {statistics.median(cell.batches):.1f}"]
            if cell.busy:
                parts.append(f"model busy {statistics.median(cell.busy):.0%}")
            parts.append(f"p99 {statistics.median(cell.p99s):.0f} ms")
            if cell.errors:
                parts.append(f"{cell.errors} errors")
            cells.append(f"{rate:,.0f}/s ({'; '.join(parts)})")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", nargs="+", default=["scorehost", *peers.NAMES],
                        choices=[*SCOREHOSTS, "aihs", *peers.NAMES])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 16, 64, 128])
    parser.add_argument("--seconds", type=float, default=10.0, help="per cell")
    parser.add_argument("--warmup", type=float, default=2.0,
                        help="seconds of the same load before each cell, not counted (every server alike)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--entry-script", default=PIPELINE,
                        help="scorehost's script (default: the proxy, tests/scripts/pipeline.py); another one is "
                             "served by scorehost's variants only, and has no ideal column")
    parser.add_argument("--cost-ms", type=float, default=40.0, help="the proxy's run_batch() cost, whatever the "
                                                                     "batch size")
    parser.add_argument("--batch-max", type=int, default=64)
    parser.add_argument("--peer-delay-ms", type=float, default=10.0, help="the peers' batching delay bound")
    parser.add_argument("--scorehost-arg", action="append", default=[], help="extra scorehost serve flag (repeat)")
    parser.add_argument("--peers-dir", default=peers.DEFAULT_DIR)
    parser.add_argument("--images", help="JPEG directory (default: the bench corpus)")
    parser.add_argument("--client-processes", type=int, default=1, help="load generator processes (bench/loadgen.py)")
    args = parser.parse_args(argv)
    args.entry_script = os.path.abspath(args.entry_script)
    proxy = args.entry_script == PIPELINE
    others = sorted(set(args.servers) - set(SCOREHOSTS))
    if not proxy and others:
        parser.error(f"--entry-script: only {' and '.join(SCOREHOSTS)} serve another script than the proxy "
                     f"(the others run bench/peers/proxy.py): drop {', '.join(others)}")
    from scorehost import corpus as bench_corpus

    corpus = bench_corpus.load(args.images)
    results: dict[tuple[str, int], Cell] = {}
    residents = [name for name in args.servers if name not in peers.NAMES]
    others = [name for name in args.servers if name in peers.NAMES]

    def cells(server: Server, round_: int, clients: list[int]) -> None:
        for c in clients:
            measure(server, c, args.seconds, corpus, results.setdefault((server.name, c), Cell()),
                    args.client_processes, args.warmup)
            cell = results[(server.name, c)]
            print(f"round {round_ + 1} {server.name} {c} clients: {cell.rates[-1]:.0f}/s batch "
                  f"{cell.batches[-1]:.1f} p99 {cell.p99s[-1]:.0f} ms", file=sys.stderr, flush=True)

    # scorehost's variants stay up (idle, ~0.01 core each) and take turns at each concurrency; each peer runs alone
    # (bench/run.py, groups), started for its round and stopped after.
    with tempfile.TemporaryDirectory(prefix="batching-table-") as scratch:
        servers: list[Server] = []
        try:
            for name in residents:
                server = start(name, args, scratch)
                if server is not None:
                    servers.append(server)
                    ready(server, corpus[0])
            for round_ in range(args.rounds):
                for i, c in enumerate(args.clients):
                    for server in servers if (round_ + i) % 2 == 0 else servers[::-1]:
                        cells(server, round_, [c])
                for name in list(others if round_ % 2 == 0 else others[::-1]):
                    peer = start(name, args, scratch)
                    if peer is None:
                        others.remove(name)
                        continue
                    try:
                        try:
                            ready(peer, corpus[0])
                        except RuntimeError as ex:  # it did not start, or answered wrong: skipped, the table goes on
                            print(f"{name}: {peers.skip_reason(peer.process, ex)}: skipped", file=sys.stderr,
                                  flush=True)
                            others.remove(name)
                            continue
                        cells(peer, round_, args.clients)
                    finally:
                        peer.process.stop()
        finally:
            processes.stop_all(server.process for server in servers)
    names = [name for name in args.servers if any(key[0] == name for key in results)]
    command = "python -m bench.batching_table " + " ".join(argv if argv is not None else sys.argv[1:])
    ideal = (lambda c: min(c, args.batch_max) / (args.cost_ms / 1000)) if proxy else None
    print(table(results, names, args.clients, ideal, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
