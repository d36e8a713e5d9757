"""The whole GPU measurement in one command (run it on a machine with an NVIDIA GPU and PyTorch):

    bash bench/gpu/run.sh [--seconds 15]     # installs scorehost's small dependencies from .whl/ if present

Side by side, in one run, with bench/gpu/score_torch.py and the scorehost/corpus.py images:
1. In-process ceilings: the model alone (input already on the GPU, fp16 channels_last), and run_batch() on the
   corpus (nvJPEG decode + resize + model), at batch 64, 128 and 256.
2. AIHS (azmlinfsrv, if installed) on the same script, 1 worker.
3. scorehost with default flags (one model process per GPU, HTTP workers on every core, batching and padded batch
   sizes on) at 1-256 closed-loop keep-alive clients (bench/loadgen.py): img/s, p50, p99, GPU busy % (NVML), and
   the batch sizes actually formed (from /metrics).
Writes gpu_results.json and gpu_results.md to $OUT (or ./reports/gpu).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import sys
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench import loadgen  # noqa: E402
from scorehost import corpus  # noqa: E402
from scorehost import processes  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "score_torch.py")
CONCURRENCY = [1, 4, 16, 64, 128, 256]
BATCHES = [64, 128, 256]


class GpuSampler:
    def __init__(self) -> None:
        import pynvml

        pynvml.nvmlInit()
        self.nvml, self.handle = pynvml, pynvml.nvmlDeviceGetHandleByIndex(0)
        self.samples: list[int] = []
        self._stop = threading.Event()

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            self.samples.append(self.nvml.nvmlDeviceGetUtilizationRates(self.handle).gpu)

    def __enter__(self) -> "GpuSampler":
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0


def _rate(call, n: int) -> float:
    import torch

    call()
    torch.cuda.synchronize()
    reps = max(3, 1024 // n)
    started = time.perf_counter()
    for _ in range(reps):
        call()
    torch.cuda.synchronize()
    return n * reps / (time.perf_counter() - started)


def in_process() -> list[dict]:
    import numpy as np
    import torch

    spec = importlib.util.spec_from_file_location("score_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.init()
    encoded = [("jpeg", np.frombuffer(b, np.uint8)) for b in corpus.images()]
    rows = []
    for n in BATCHES:
        x = torch.rand(n, 3, 224, 224, device="cuda") * 255
        items = [encoded[i % len(encoded)] for i in range(n)]
        rows.append({"batch": n, "model_img_s": _rate(lambda: module.predict(x), n),
                     "decode_model_img_s": _rate(lambda: module.run_batch(items), n)})
        print("in-process", rows[-1], flush=True)
    return rows


def _batch_stats(url: str) -> tuple[float, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = sum(float(v) for v in re.findall(r"^scorehost_batch_size_sum (\S+)", text, re.M))
    count = sum(float(v) for v in re.findall(r"^scorehost_batch_size_count (\S+)", text, re.M))
    return total, count


def over_http(kind: str, seconds: float) -> list[dict]:
    rows = []
    workers = 1 if kind == "aihs" else None  # scorehost: its defaults
    with processes.running(kind, SCRIPT, workers=workers, timeout=600) as server:
        for c in CONCURRENCY:
            before = _batch_stats(server.url) if kind == "scorehost" else (0.0, 0.0)
            with GpuSampler() as gpu:
                result = loadgen.run(server.url, c, seconds, loadgen.image_requests())
            after = _batch_stats(server.url) if kind == "scorehost" else (0.0, 0.0)
            batches = after[1] - before[1]
            s = result.summary()
            ok = sum(n for label, n in s["statuses"].items() if label.endswith(" 200"))
            rows.append({"server": kind, "clients": c, "img_s": ok / seconds, "p50_ms": s["p50_ms"],
                         "p99_ms": s["p99_ms"], "gpu_util_pct": gpu.mean, "dropped": s["dropped"],
                         "mean_batch": (after[0] - before[0]) / batches if batches else None,
                         "statuses": s["statuses"]})
            print("http", rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15, help="per HTTP cell")
    args = parser.parse_args()
    out = os.environ.get("OUT") or os.path.join(ROOT, "reports", "gpu")
    os.makedirs(out, exist_ok=True)
    results = {"in_process": in_process(), "http": []}
    if shutil.which("azmlinfsrv") or os.path.exists(os.path.join(os.path.dirname(sys.executable), "azmlinfsrv")):
        results["http"] += over_http("aihs", args.seconds)
    else:
        print("AIHS (azmlinfsrv) is not installed here: its rows are left out", flush=True)
    results["http"] += over_http("scorehost", args.seconds)
    with open(os.path.join(out, "gpu_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| batch | model only img/s | decode + model img/s |", "|---|---|---|"]
    lines += [f"| {r['batch']} | {r['model_img_s']:.0f} | {r['decode_model_img_s']:.0f} |"
              for r in results["in_process"]]
    lines += ["", "| server | clients | img/s | p50 ms | p99 ms | GPU busy % | mean batch |", "|---|---|---|---|---|---|---|"]
    for r in results["http"]:
        batch = "-" if r["mean_batch"] is None else f"{r['mean_batch']:.1f}"
        lines.append(f"| {r['server']} | {r['clients']} | {r['img_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
                     f"{r['gpu_util_pct']:.0f} | {batch} |")
    with open(os.path.join(out, "gpu_results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
