"""The whole GPU measurement in one command (run it on a machine with an NVIDIA GPU and PyTorch):

    bash bench/gpu/run.sh            # installs scorehost's small dependencies from .whl/ if present, then this

1. In-process: ResNet50 (fp16) forward throughput at batch sizes 1..256, the GPU's ceiling.
2. Over HTTP: scorehost serving bench/gpu/score_torch.py, batching off, then on (--batch-max 64), at concurrency
   1..256 with bench/loadgen.py (closed loop, keep-alive): img/s, p50, p99, and GPU utilisation sampled by NVML.
Writes gpu_results.json and gpu_results.md to $OUT (or ./reports/gpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from bench import loadgen  # noqa: E402
from scorehost import processes  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "score_torch.py")
CONCURRENCY = [1, 4, 16, 64, 128, 256]
BATCHES = [1, 8, 32, 64, 128, 256]


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


def in_process() -> list[dict]:
    import torch

    spec = importlib.util.spec_from_file_location("score_torch", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.init()
    rows = []
    for n in BATCHES:
        x = torch.randn(n, 3, 224, 224)
        module.predict(x)
        torch.cuda.synchronize()
        started, reps = time.perf_counter(), max(3, 512 // n)
        for _ in range(reps):
            module.predict(x)
        torch.cuda.synchronize()
        rows.append({"batch": n, "img_s": n * reps / (time.perf_counter() - started)})
        print("in-process", rows[-1], flush=True)
    return rows


def over_http(seconds: float) -> list[dict]:
    rows = []
    for label, extra in (("off", ("--threads", "16")), ("on", ("--batch-max", "64", "--batch-delay-ms", "2",
                                                                 "--threads", "300", "--batch-queue", "1024"))):
        with processes.running("scorehost", SCRIPT, extra_args=extra, timeout=300) as server:
            for c in CONCURRENCY:
                with GpuSampler() as gpu:
                    result = loadgen.run(server.url, c, seconds, loadgen.image_requests())
                s = result.summary()
                rows.append({"batching": label, "clients": c, "img_s": s["req_s"], "p50_ms": s["p50_ms"],
                             "p99_ms": s["p99_ms"], "gpu_util_pct": gpu.mean, "dropped": s["dropped"],
                             "statuses": s["statuses"]})
                print("http", rows[-1], flush=True)
    return rows


def main() -> None:
    out = os.environ.get("OUT") or os.path.join(ROOT, "reports", "gpu")
    os.makedirs(out, exist_ok=True)
    results = {"in_process": in_process(), "http": over_http(float(os.environ.get("SECONDS", "15")))}
    with open(os.path.join(out, "gpu_results.json"), "w") as f:
        json.dump(results, f, indent=1)
    lines = ["| batch | in-process img/s |", "|---|---|"]
    lines += [f"| {r['batch']} | {r['img_s']:.0f} |" for r in results["in_process"]]
    lines += ["", "| batching | clients | img/s | p50 ms | p99 ms | GPU util % |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batching']} | {r['clients']} | {r['img_s']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['gpu_util_pct']:.0f} |" for r in results["http"]]
    with open(os.path.join(out, "gpu_results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
