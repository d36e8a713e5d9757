"""Prometheus metrics for /metrics, correct across gunicorn's worker processes.

prometheus-client's multiprocess mode keeps each worker's samples in files under PROMETHEUS_MULTIPROC_DIR; the
master creates that directory before forking (`prepare_multiprocess_dir`) and removes a dead worker's live gauges
(`worker_exited`). A scrape, in whichever worker answers it, merges every worker's files. GPU utilisation and memory
are read from NVML at scrape time, when a GPU is there.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from typing import Any, Iterator, Optional

ENV = "PROMETHEUS_MULTIPROC_DIR"
LATENCY_BUCKETS = (.001, .0025, .005, .01, .025, .05, .075, .1, .15, .25, .5, .75, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("preprocess", "queue", "write")
LEARNED = {  # scorehost_batch_<name>: the batching policy's estimates
    "cost_fixed_seconds": "run_batch()'s learned cost per call whatever its size (the fixed part): what waiting for a "
                          "fuller batch can save",
    "cost_per_item_seconds": "run_batch()'s learned cost per (padded) item; a cost all per item: batching gains "
                             "nothing and the policy never waits",
    "return_seconds": "How long after a batch's answers the next requests of all its clients are back (learned, "
                      "for the clients it serves now): how long a wait for them lasts",
    "clients": "Requests the model process serves at once, as the policy sees them: the batch it waits for",
}
# Label values fed from a request are bounded: any other method is counted as "other", so a client cannot grow
# the label set (and every worker's memory and every scrape) by inventing methods.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})


def prepare_multiprocess_dir() -> Optional[str]:
    """In the master, before workers exist: a fresh directory for this server's samples. Returns it when scorehost
    made it (the caller removes it on exit), None when the environment named one."""
    path = os.environ.get(ENV)
    if path:
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return None
    path = own_temp_dir("metrics")
    os.environ[ENV] = path
    return path


def own_temp_dir(kind: str) -> str:
    """A temporary directory named after this process (scorehost-KIND-PID-...); those left by servers that died
    without cleaning up (SIGKILL) are removed first."""
    root = tempfile.gettempdir()
    for name in os.listdir(root):
        match = re.fullmatch(r"scorehost-(?:metrics|run)-(\d+)-\w+", name)
        if match and not _alive(int(match[1])):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"scorehost-{kind}-{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def worker_exited(pid: int) -> None:
    """In the master, when a worker has exited: its live gauges go, and its counters and histograms are added into
    one archive file per kind, so a scrape reads a bounded number of files however often workers restart (each
    restart used to leave its files: 40 restarts took a scrape from 4-5 ms to 14-20 ms)."""
    from prometheus_client import multiprocess

    path = os.environ.get(ENV)
    if not path:
        return
    multiprocess.mark_process_dead(pid)
    with _files_locked(path, exclusive=True):  # a scrape sees the dead worker's samples once, never twice or none
        for kind in ("counter", "histogram"):
            dead = os.path.join(path, f"{kind}_{pid}.db")
            if os.path.exists(dead):
                _archive(dead, os.path.join(path, f"{kind}_archive.db"))


@contextlib.contextmanager
def _files_locked(path: str, exclusive: bool) -> Iterator[None]:
    """The samples directory, locked: a scrape (shared) against the master folding a dead worker's files into the
    archive (exclusive)."""
    import fcntl

    with open(os.path.join(path, ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


def _archive(dead: str, archive: str) -> None:
    """Add a dead process's samples to the archive: a new archive is written beside it and renamed over it, then
    the dead file is removed (under the directory's lock)."""
    from prometheus_client.mmap_dict import MmapedDict

    totals: dict[str, float] = {}
    for source in (archive, dead):
        if os.path.exists(source):
            for key, value, _timestamp, _pos in MmapedDict.read_all_values_from_file(source):
                totals[key] = totals.get(key, 0.0) + value
    staging = archive + ".new"
    merged = MmapedDict(staging)
    try:
        for key, value in totals.items():
            merged.write_value(key, value, 0.0)
    finally:
        merged.close()
    os.replace(staging, archive)
    os.unlink(dead)


class Metrics:
    """The server's instruments. Created in each worker (after the fork), so the multiprocess files are per pid."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        # Own registry: several apps in one process (tests, benchmarks) must not collide in the global one. Under
        # gunicorn the samples also go to the multiprocess files, which is what a scrape reads.
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("scorehost_requests", "HTTP requests answered", ["route", "method", "status"],
                                registry=r)
        self.latency = Histogram("scorehost_request_duration_seconds", "Time from request to response, by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.run_time = Histogram("scorehost_run_duration_seconds",
                                  "Time inside the entry script's run() or run_batch() call (model time)",
                                  buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("scorehost_batch_queue_wait_seconds",
                                    "Time a request waited for its batch to start", buckets=LATENCY_BUCKETS,
                                    registry=r)
        self.restarts = Counter("scorehost_worker_restarts", "Workers and model processes that exited to be "
                                "replaced, by reason", ["reason"], registry=r)
        self._children: dict[tuple[str, str, int], tuple] = {}
        self.batch_size = Histogram("scorehost_batch_size", "Requests per run_batch() call", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.policy_wait = Histogram("scorehost_batch_policy_wait_seconds",
                                     "Time the batching policy held a batch, with the model idle, for more requests "
                                     "to join it", buckets=LATENCY_BUCKETS, registry=r)
        self.learned: Optional[dict] = None  # the batching policy's estimates: made by the first batch (see below)
        # The stages that had no histogram of their own; the model's time and the batch queue's keep theirs
        # (run_time, queue_wait above), so no sample is written twice.
        stage = Histogram("scorehost_stage_duration_seconds", "Time of each stage of a request: preprocess(), "
                          "queue (waiting for an app thread), write (the answer handed to the socket); the model's "
                          "time is scorehost_run_duration_seconds, the batch queue's "
                          "scorehost_batch_queue_wait_seconds", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.stages = {name: stage.labels(name) for name in STAGES}  # labels() once, not per request

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """`route` is a rule of the app or "unmatched", `status` one the server sent: both bounded already."""
        method = method if method in METHODS else "other"
        key = (route, method, status)
        children = self._children.get(key)
        if children is None:  # labels() takes a lock and builds a tuple: once per label set, not per request
            children = self._children[key] = (self.requests.labels(route, method, str(status)),
                                               self.latency.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def observe_batch(self, size: int, seconds: float, queue_waits: list[float], policy_wait: float = 0.0,
                      policy: Any = None) -> None:
        """One run_batch() call; `policy` (batching.BatchPolicy), what it has learned so far."""
        self.batch_size.observe(size)
        self.policy_wait.observe(policy_wait)
        self.run_time.observe(seconds)
        for wait in queue_waits:
            self.queue_wait.observe(wait)
        if policy is not None:
            if self.learned is None:
                # What the batching policy has learned (server/batching.py), per model process: why its batches are
                # the size they are. Made here, in model processes only (a gauge has a sample from its creation on);
                # "liveall": one sample per live model process (label pid), gone when it exits.
                from prometheus_client import Gauge

                self.learned = {name: Gauge(f"scorehost_batch_{name}", text, registry=self.registry,
                                            multiprocess_mode="liveall") for name, text in LEARNED.items()}
            learned = self.learned
            learned["cost_fixed_seconds"].set(policy.cost.fixed)
            learned["cost_per_item_seconds"].set(policy.cost.per_item)
            learned["return_seconds"].set(policy.return_s)
            learned["clients"].set(policy.population)

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

        path = os.environ.get(ENV)
        if path:
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry, path)
            with _files_locked(path, exclusive=False):
                text = generate_latest(registry)
        else:
            text = generate_latest(self.registry)
        return text + generate_latest(_gpu_registry()), CONTENT_TYPE_LATEST


def _gpu_registry():
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(GpuCollector())
    return registry


class GpuCollector:
    """scorehost_gpu_utilization_ratio and scorehost_gpu_memory_used_bytes per visible GPU, from NVML."""

    def collect(self) -> Iterator:
        from prometheus_client.core import GaugeMetricFamily

        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # no nvidia-ml-py or no driver: a CPU server has no GPU metrics
            return
        try:
            util = GaugeMetricFamily("scorehost_gpu_utilization_ratio", "GPU busy fraction (NVML)", labels=["gpu"])
            memory = GaugeMetricFamily("scorehost_gpu_memory_used_bytes", "GPU memory in use (NVML)", labels=["gpu"])
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                util.add_metric([str(i)], pynvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100)
                memory.add_metric([str(i)], pynvml.nvmlDeviceGetMemoryInfo(handle).used)
            yield util
            yield memory
        finally:
            pynvml.nvmlShutdown()
