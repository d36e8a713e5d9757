"""Runs the app under gunicorn's master, with every gunicorn setting chosen on purpose.

- gunicorn is the process manager: it forks workers, replaces a dead one, drains on SIGTERM and runs the hooks that
  pin GPUs. HTTP inside a worker is scorehost's own front (`front.FrontWorker`): an event loop reads whole requests,
  app threads (`--threads`, default 1) run the app; chosen by measurement (bench/RESULTS.md, section 6).
- Each worker imports the entry script and calls init() itself, after the fork: TensorFlow and CUDA are not
  fork-safe, so nothing heavy is preloaded in the master. A worker that cannot load exits with gunicorn's boot-error
  code, which stops the master with that code instead of restarting the worker forever.
- Workers: by default one per visible GPU, each pinned to its card (`gpus.GpuPinning`).
- init() gets `init_timeout` seconds; the worker keeps telling the master it is alive meanwhile, so a slow model
  load is not mistaken for a hung worker, and a hung init() fails start-up with a clear message.
- Request line, header count and header size limits are gunicorn's defaults (4094 bytes, 100 fields, 8190 bytes),
  enforced by the front; the body limit is the app's (`max_body_bytes`).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, Iterable, NamedTuple, Optional

import gunicorn.app.base
import gunicorn.arbiter

from . import metrics, telemetry
from .front import ConnectionShares, FrontWorker
from .gpus import GpuPinning
from .model_process import ModelWorker
from .settings import Machine, Settings, fill_defaults

BOOT_ERROR = 3  # gunicorn's WORKER_BOOT_ERROR: the master halts with it
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt() parameters
MAX_BOOT_FAILURES = 5  # workers in a row that die before they are ready, before the server gives up


class BootWatch:
    """The master's view of workers that die before they are ready (killed during init(), usually out of memory, or
    init() failing in a replacement): each is followed by a longer pause before the next start (0.5, 1, 2, then 4 s),
    and after MAX_BOOT_FAILURES in a row with no worker serving, the server stops with exit code 3 instead of
    restarting them forever; while others serve, the replacement keeps being retried. A worker says it is ready with
    a file in the run directory, read by the master."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.failures = 0
        self.ever_ready = False

    def marker(self, pid: int) -> str:
        return os.path.join(self.run_dir, f"ready-{pid}")

    def mark_ready(self) -> None:
        """In a worker, once it can serve (a model process: once warm)."""
        if self.run_dir:
            open(self.marker(os.getpid()), "w").close()

    def is_ready(self, pid: int) -> bool:
        return os.path.exists(self.marker(pid))

    def before_fork(self, worker: Any) -> None:
        from gunicorn.errors import HaltServer

        serving = bool(self.run_dir) and any(name.startswith("ready-") for name in os.listdir(self.run_dir))
        self.ever_ready = self.ever_ready or serving
        worker.replacement = self.ever_ready  # a replacement that cannot boot is retried, not fatal
        if self.failures >= MAX_BOOT_FAILURES and not serving:  # no worker can start, none serves: give up
            raise HaltServer(f"{self.failures} workers in a row died before they were ready (each exit is logged "
                             "above): one 'sent SIGKILL' during init() is usually out of memory; one that 'exited with "
                             "code N' ended the process itself (os._exit, a native crash)",
                             BOOT_ERROR)
        if self.failures:
            time.sleep(min(0.5 * 2 ** (self.failures - 1), 4.0))

    def fail(self, why: str, details: str = "", replacement: bool = False) -> None:
        """In a worker that cannot boot: say why, leave `why` (one line) in the run directory for the master
        (`last_error`: the CLI's last line names the cause, not only exit code 3), and exit. At start-up with
        BOOT_ERROR, which stops the server (exit 3, as Azure ML's server); a replacement exits 1 and is retried by
        the master with back-off, since the others still serve."""
        print(f"scorehost: {why}" + (f"\n{details}" if details else ""), file=sys.stderr, flush=True)
        if self.run_dir:
            with open(os.path.join(self.run_dir, f"error-{os.getpid()}"), "w", encoding="utf-8") as f:
                f.write(why)
        if replacement:
            print("scorehost: this replacement worker will be retried", file=sys.stderr, flush=True)
        os._exit(1 if replacement else BOOT_ERROR)

    def last_error(self) -> str:
        """The newest boot failure's line (`fail`), "" when none."""
        try:
            files = [e for e in os.scandir(self.run_dir) if e.name.startswith("error-")] if self.run_dir else []
            if not files:
                return ""
            with open(max(files, key=lambda e: e.stat().st_mtime_ns).path, encoding="utf-8") as f:
                return f.read()
        except OSError:
            return ""

    def exited(self, worker: Any) -> None:
        if self.is_ready(worker.pid):
            os.unlink(self.marker(worker.pid))
            self.failures, self.ever_ready = 0, True
        else:
            self.failures += 1


class ModelSlot(NamedTuple):
    """A model process's place: its index, the socket its HTTP workers link to, and its GPU (None on the CPU)."""

    index: int
    socket_path: str
    gpu: Optional[str]


class ScoreArbiter(gunicorn.arbiter.Arbiter):
    """gunicorn's master, with a reload (SIGHUP) that never leaves the server without ready workers: a new
    generation of workers starts beside the old one, which keeps serving; once every new worker is ready (model
    processes warm), the old ones stop gracefully. If a new worker dies before it is ready (the new script fails to
    load), the new generation is stopped and the old one goes on serving the old script. A stopped worker still
    alive --graceful-timeout later is killed, as gunicorn's own stop does: a model process hung in run_batch() would
    otherwise hold a second copy of the model beside the new one until its scoring timeout."""

    rolling: Optional[tuple[set[int], set[int]]] = None  # (old pids, new pids) while a reload is under way

    def __init__(self, app: Any):
        super().__init__(app)
        self.retiring: dict[int, float] = {}  # pid -> when it is killed, for the workers a reload stopped

    def handle_int(self) -> None:
        """Ctrl-C: workers stop as on SIGTERM (answering what they accepted), and the server exits 130."""
        self.app.interrupted = True
        super().handle_int()

    def spawn_worker(self) -> int:
        """gunicorn has one worker class; here each start picks its own: a model process (ModelWorker) while a
        model slot of this generation has none, else an HTTP worker (FrontWorker)."""
        self.worker_class = self.app.next_worker_class(self.WORKERS.values())
        return super().spawn_worker()

    def reload(self) -> None:
        if self.rolling is not None:
            self.log.warning("reload: one is already under way")
            return
        old = set(self.WORKERS)
        self.app.generation += 1
        self.app.boots.failures = 0
        self.log.info("reload: starting %d new workers beside the %d serving", self.num_workers, len(old))
        for _ in range(self.num_workers):
            self.spawn_worker()
        self.rolling = (old, set(self.WORKERS) - old)

    def retire(self, pids: Iterable[int]) -> None:
        """Stop these workers gracefully, and kill those still alive --graceful-timeout later (`manage_workers`)."""
        until = time.monotonic() + self.cfg.graceful_timeout
        for pid in pids:
            self.retiring[pid] = until
            self.kill_worker(pid, signal.SIGTERM)

    def manage_workers(self) -> None:
        now = time.monotonic()
        for pid, until in list(self.retiring.items()):
            if pid not in self.WORKERS:
                del self.retiring[pid]
            elif now >= until:
                self.log.warning("worker %d stopped by a reload is still alive after --graceful-timeout: killed", pid)
                del self.retiring[pid]
                self.kill_worker(pid, signal.SIGKILL)
        if self.rolling is None:
            super().manage_workers()
            return
        old, new = self.rolling
        live = set(self.WORKERS)
        if not new <= live:
            self.retire(new & live)
            self.app.generation -= 1
            self.app.boots.failures = 0
            self.rolling = None
            self.log.error("reload failed: a new worker died before it was ready (see above); the old workers go on "
                           "serving the old script")
        elif all(self.app.boots.is_ready(pid) for pid in new):
            self.retire(old & live)
            self.rolling = None
            self.log.info("reload: the new workers are ready; the old ones stop after their requests")


class ScoreServer(gunicorn.app.base.BaseApplication):
    """gunicorn's master with scorehost's workers. With `model_slots` (one per GPU, or one `None` on the CPU), the
    first workers are model processes (`model_process.ModelWorker`) and the rest HTTP workers that preprocess;
    a model slot whose process dies is given to the next worker the master starts, so it is replaced like any."""

    def __init__(self, settings: Settings, model_slots: tuple[Optional[str], ...] = (), run_dir: str = ""):
        self.settings = settings
        self.model_slots = model_slots
        self.run_dir = run_dir
        self.generation = 0  # a reload (SIGHUP) starts a new one, with model sockets of its own
        self.boots = BootWatch(run_dir)
        self._worker: Any = None
        self._gpus = GpuPinning()
        self.shares = ConnectionShares()
        self.interrupted = False
        super().__init__()

    @property
    def model_sockets(self) -> tuple[str, ...]:
        return tuple(os.path.join(self.run_dir, f"model-{self.generation}-{i}.sock")
                     for i in range(len(self.model_slots)))

    def run(self) -> None:
        ScoreArbiter(self).run()

    def load_config(self) -> None:
        s = self.settings
        options = {
            # azmlinfsrv's separate health endpoint is a second bind of the same app too: each worker's loop
            # answers GET / on it without any app thread, and its accept queue is its own.
            "bind": [f"{s.host}:{s.port}"] + ([f"{s.host}:{s.health_port}"] if s.separate_health_endpoint else []),
            "workers": s.workers + len(self.model_slots),
            "worker_class": FrontWorker,
            "threads": s.threads,
            "timeout": s.worker_timeout,
            "graceful_timeout": s.graceful_timeout,
            "keepalive": s.keepalive,
            "errorlog": "-",
            "loglevel": s.log_level.lower(),
            "pre_fork": self._pre_fork,
            "post_fork": self._post_fork,
            "child_exit": self._child_exit,
            "proc_name": "scorehost",
            "control_socket_disable": True,  # gunicorn 24+'s control socket is one per user: servers side by side clash
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def _free_model_slot(self, workers: Iterable[Any]) -> Optional[int]:
        held = {w.slot.index for w in workers if isinstance(w, ModelWorker) and w.generation == self.generation}
        return next((i for i in range(len(self.model_slots)) if i not in held), None)

    def next_worker_class(self, workers: Iterable[Any]) -> type:
        return FrontWorker if self._free_model_slot(workers) is None else ModelWorker

    def _pre_fork(self, arbiter: Any, worker: Any) -> None:
        self.boots.before_fork(worker)
        worker.generation = self.generation
        if isinstance(worker, ModelWorker):
            index = self._free_model_slot(w for w in arbiter.WORKERS.values() if w is not worker)
            assert index is not None
            worker.slot = ModelSlot(index, self.model_sockets[index], self.model_slots[index])
            worker.gpu = worker.slot.gpu
            return
        worker.wait_for_models = self.generation > 0  # a reload's HTTP workers take traffic once its models are warm
        if self.model_slots:
            worker.gpu = "-1"  # HTTP workers of a model-process server never touch a GPU (no CUDA context each)
        else:
            self._gpus.assign(arbiter, worker)
        self.shares.assign(arbiter, worker)

    def _child_exit(self, arbiter: Any, worker: Any) -> None:
        self.boots.exited(worker)
        metrics.worker_exited(worker.pid)
        self.shares.release(worker)

    def _post_fork(self, arbiter: Any, worker: Any) -> None:
        tune_memory()
        self._gpus.pin(worker)
        self._worker = worker  # so boot() can keep telling the master this worker is alive during init()

    def load(self) -> Any:
        """In an HTTP worker: the app (with init() unless model processes run it), or exit with a boot error."""
        from .app import create_app

        if not self.model_sockets:
            listen_for_debugger(self.settings)
        return self.boot(lambda: create_app(self.settings, model_sockets=self.model_sockets))

    def load_model_script(self) -> Any:
        """In a model process: the entry script, loaded and initialised."""
        from .entry_script import EntryScript

        listen_for_debugger(self.settings)
        script = EntryScript.load(self.settings.entry_script, self.settings.app_root, self.settings.source_dir)
        script.init()
        return script

    def boot(self, build: Callable[[], Any], mark_ready: bool = True) -> Any:
        """Run `build` (import the script, init()) within init_timeout, or exit with a boot error."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        telemetry.send_logs(self.settings)  # before the script loads: init()'s prints and logs go too
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["value"] = build()
            except BaseException:  # noqa: B036 - report anything, SystemExit from a script included
                result["error"] = traceback.format_exc()

        thread = threading.Thread(target=run, name="init", daemon=True)
        # A worker stopped while it loads has accepted nothing: it exits at once, instead of unwinding Python while
        # the init thread is inside TensorFlow (which aborts: "terminate called without an active exception").
        stopping = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, _exit_at_once) for sig in stopping}
        thread.start()
        waited = 0.0
        try:
            while thread.is_alive() and waited < self.settings.init_timeout:
                thread.join(timeout=1.0)
                waited += 1.0
                if self._worker is not None:
                    self._worker.notify()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        replacement = self._worker.replacement if self._worker is not None else False
        if thread.is_alive():
            self.boots.fail(f"init() did not finish within {self.settings.init_timeout} s (--init-timeout); the "
                            f"entry script {self.settings.entry_script} is hung or too slow to load.",
                            replacement=replacement)
        if "error" in result:
            first = result["error"].strip().splitlines()[-1]
            self.boots.fail(f"The entry script {self.settings.entry_script} failed to load or init() raised: {first}",
                            result["error"], replacement)
        if mark_ready:
            self.boots.mark_ready()
        logging.getLogger("scorehost.runner").info("worker %d ready for serving traffic", os.getpid())
        return result["value"]


DEBUG_TIMEOUT_S = 7 * 24 * 3600  # while debugging: a request may sit at a breakpoint for a week


def listen_for_debugger(settings: Settings) -> None:
    """In the process that runs init() and run(), with --debug-port (AZUREML_DEBUG_PORT): debugpy listens there
    before the script loads, so breakpoints in it bind. azmlinfsrv instead connects out to a listening debugger;
    listening lets the user attach (and re-attach) whenever they like."""
    if not settings.debug_port:
        return
    import debugpy

    debugpy.listen((settings.host, settings.debug_port))
    print(f"scorehost: debugger listening on {settings.host}:{settings.debug_port} in process {os.getpid()} "
          "(debugpy): attach VS Code with the README's launch.json", file=sys.stderr, flush=True)


def tune_memory(every_s: float = 10.0) -> None:
    """glibc's malloc, set for a server of large buffers (bodies, items, answers of 100 KB and more):

    - buffers up to 64 MiB come from the heap and are reused, instead of a fresh mmap() per buffer that the kernel
      zero-fills page by page (measured: 126 -> 49 us of model-process CPU per 150 KB item, bench/RESULTS.md);
    - freed heap memory is given back every few seconds (malloc_trim), not at every free: glibc otherwise keeps
      memory freed by a thread in that thread's arena, and with TensorFlow's varying buffer sizes and several
      request threads a worker's RSS creeps up in steps over a long run (the soak, bench/RESULTS.md).
    Not glibc: nothing to do.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        trim, mallopt = libc.malloc_trim, libc.mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 64 << 20)
    mallopt(M_TRIM_THRESHOLD, 512 << 20)

    def loop() -> None:
        while True:
            time.sleep(every_s)
            trim(0)

    threading.Thread(target=loop, name="malloc-trim", daemon=True).start()


def _exit_at_once(signum: int, frame: Any) -> None:
    os._exit(0)


def plan(settings: Settings, gpus: list[str]) -> tuple[Settings, tuple[Optional[str], ...], str]:
    """Fill the settings left to defaults (each setting's computed default, server/settings.py), and say why:
    (settings, model slots, one line for the banner).

    With run_batch() and batching on (the default when a GPU is visible), one model process per GPU (one on the
    CPU) batches for HTTP workers on every core; otherwise each worker calls run() itself, as Azure ML does."""
    from .entry_script import defines

    has_batch = defines(settings.entry_script, "run_batch")
    if settings.batch_max is not None and settings.batch_max > 1 and not has_batch:
        print(f"scorehost: --batch-max is set but {settings.entry_script} has no run_batch(): batching is off",
              file=sys.stderr)
    settings = fill_defaults(settings, Machine(tuple(gpus), has_batch, sys.stdout.isatty()))
    if settings.batch_max > 1 and has_batch:
        slots = tuple(gpus) or (None,)
        where = f"one per GPU ({', '.join(gpus)})" if gpus else "one, on the CPU (no GPU visible)"
        mode = (f"batched: {len(slots)} model process(es), {where}, run init() and run_batch() (up to "
                f"{settings.batch_max} requests a call); {settings.workers} HTTP workers preprocess and feed them. "
                f"Why: the script has run_batch() and batching is on. Batches: the policy learns run_batch()'s cost "
                f"per size and when clients come back, and holds a batch only while a fuller one pays (at most "
                f"{settings.batch_delay_ms:g} ms after its first request, never past a deadline)")
        return settings, slots, mode
    if not has_batch:
        why = "the script has no run_batch()"
    elif gpus:
        why = "batching is off (--batch-max 0)"
    else:
        why = "no GPU is visible, so batching is off by default (--batch-max N turns it on)"
    mode = (f"per worker: {settings.workers} worker(s) each run init() and call run() "
            f"({settings.threads} at a time), as Azure ML does. Why: {why}")
    return settings, (), mode


def debugging(settings: Settings) -> tuple[Settings, str]:
    """With a debug port: one worker (one process to attach to) and no scoring, worker or init timeout, since a
    request held at a breakpoint would otherwise be answered 500 or its worker restarted; and the banner's line that
    says so ("" without one). Called before `plan`, so the mode it describes counts the one worker that runs."""
    if not settings.debug_port:
        return settings, ""
    settings = settings.replace(workers=1, scoring_timeout_ms=DEBUG_TIMEOUT_S * 1000, worker_timeout=DEBUG_TIMEOUT_S,
                                init_timeout=DEBUG_TIMEOUT_S, hung_grace=float(DEBUG_TIMEOUT_S))
    return settings, (f"Debugging (AZUREML_DEBUG_PORT / --debug-port {settings.debug_port}): one worker, "
                      "no scoring timeout, worker timeout or init timeout. Not for production.")


def serve(settings: Settings, model_slots: tuple[Optional[str], ...] = ()) -> tuple[int, str]:
    """Run until stopped; returns the master's exit code (3 when a worker could not boot) and, with 3, the line
    that says why (BootWatch.fail)."""
    import shutil

    own_dirs = [metrics.own_temp_dir("run")]  # the model processes' sockets
    own_dirs.append(metrics.prepare_multiprocess_dir())
    master = os.getpid()
    server = ScoreServer(settings, model_slots, own_dirs[0])
    try:
        server.run()
    except SystemExit as ex:
        if server.interrupted and os.getpid() == master:
            print("scorehost: interrupted", file=sys.stderr, flush=True)
            return 130, ""
        code = ex.code if isinstance(ex.code, int) else 1
        return code, server.boots.last_error() if code == BOOT_ERROR else ""
    finally:
        # Workers are forked inside run(): an exiting worker unwinds through here too, and must leave them alone.
        if os.getpid() == master:
            for path in own_dirs:
                if path:
                    shutil.rmtree(path, ignore_errors=True)
    return 0, ""
