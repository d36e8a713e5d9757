"""The model process's own CPU per item: a real ModelServer in a child process, fed over its Unix socket by a real
ModelClient, with a run_batch() that does no work, so that what is measured is scorehost's (reading, queueing,
batching, answering). bench/RESULTS.md section 11 keeps the figures.

    python -m bench.model_cpu --item bytes-150k --seconds 5
    python -m bench.model_cpu --item array-150k --seconds 5

CPU is the child's utime + stime from /proc/<pid>/stat, before and after the timed run. To compare with an older
checkout, run this file from that checkout's root (PYTHONPATH=that root), minus the tune_memory() line if it has none.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ITEMS = {
    "bytes-150k": lambda: os.urandom(150_528),
    "bytes-9k": lambda: os.urandom(9_216),
    "array-150k": lambda: __import__("numpy").zeros((224, 224, 3), "uint8"),
}


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def serve(path: str, delay_ms: float, batch_cost_ms: float) -> None:
    from server.model_process import ModelServer
    from server.runner import tune_memory

    tune_memory()  # as a model process does after its fork

    def run_batch(items: list) -> list:
        if batch_cost_ms:
            time.sleep(batch_cost_ms / 1000)  # a GPU's batch: the GIL is free meanwhile, the next batch forms
        return [0] * len(items)

    server = ModelServer(run_batch, batch_max=64, delay_ms=delay_ms, sizes=(), queue_max=4096,
                         timeout_ms=60_000, grace_s=10)
    server.serve(path, heartbeat=lambda: None, alive=lambda: True)


def submit(client: Any, item: Any) -> None:
    client.submit(item)


def measure(item_name: str, seconds: float, threads: int, delay_ms: float, batch_cost_ms: float) -> dict:
    from server.model_process import ModelClient

    path = os.path.join(tempfile.mkdtemp(prefix="model-cpu-"), "model.sock")
    child = subprocess.Popen([sys.executable, "-m", "bench.model_cpu", "--serve", path, "--delay-ms", str(delay_ms),
                              "--batch-cost-ms", str(batch_cost_ms)])
    try:
        while not os.path.exists(path):
            time.sleep(0.05)
        client = ModelClient([path], 60_000)
        while not client.ready():
            time.sleep(0.05)
        item = ITEMS[item_name]()
        for _ in range(200):  # warm: threads started, buffers sized
            submit(client, item)
        done = [0] * threads
        stop = time.monotonic() + seconds

        def loop(i: int) -> None:
            while time.monotonic() < stop:
                submit(client, item)
                done[i] += 1

        before = _cpu_s(child.pid)
        workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        used = _cpu_s(child.pid) - before
        n = sum(done)
        return {"item": item_name, "items": n, "items_per_s": n / seconds, "model_cpu_us_per_item": used / n * 1e6}
    finally:
        child.kill()
        child.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--item", choices=sorted(ITEMS), default="bytes-150k")
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="the model process's --batch-delay-ms (0: every item that finds it idle wakes it)")
    parser.add_argument("--batch-cost-ms", type=float, default=0.0,
                        help="what each run_batch() call takes, GIL free (a GPU's batch); 0: nothing")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.delay_ms, args.batch_cost_ms)
        return
    result = measure(args.item, args.seconds, args.threads, args.delay_ms, args.batch_cost_ms)
    print(f"{result['item']}: {result['items']} items, {result['items_per_s']:.0f} items/s, "
          f"model process CPU {result['model_cpu_us_per_item']:.1f} us per item")


if __name__ == "__main__":
    main()
