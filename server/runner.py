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
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

import gunicorn.app.base

from . import metrics
from .front import ConnectionShares, FrontWorker
from .gpus import GpuPinning
from .model_process import ModelWorker
from .settings import Settings

BOOT_ERROR = 3  # gunicorn's WORKER_BOOT_ERROR: the master halts with it


class ScoreServer(gunicorn.app.base.BaseApplication):
    """gunicorn's master with scorehost's workers. With `model_slots` (one per GPU, or one `None` on the CPU), the
    first workers are model processes (`model_process.ModelWorker`) and the rest HTTP workers that preprocess;
    a model slot whose process dies is given to the next worker the master starts, so it is replaced like any."""

    def __init__(self, settings: Settings, model_slots: tuple[Optional[str], ...] = (), run_dir: str = ""):
        self.settings = settings
        self.model_slots = model_slots
        self.model_sockets = tuple(os.path.join(run_dir, f"model-{i}.sock") for i in range(len(model_slots)))
        self._worker: Any = None
        self._gpus = GpuPinning()
        self.shares = ConnectionShares()
        super().__init__()

    def load_config(self) -> None:
        s = self.settings
        options = {
            "bind": [f"{s.host}:{s.port}"],
            "workers": s.workers + len(self.model_slots),
            "worker_class": FrontWorker,
            "threads": s.threads,
            "timeout": s.worker_timeout,
            "graceful_timeout": s.graceful_timeout,
            "keepalive": s.keepalive,
            "errorlog": "-",
            "loglevel": os.environ.get("AZUREML_LOG_LEVEL", "info").lower(),
            "pre_fork": self._pre_fork,
            "post_fork": self._post_fork,
            "child_exit": self._child_exit,
            "proc_name": "scorehost",
            "control_socket_disable": True,  # gunicorn 24+'s control socket is one per user: servers side by side clash
        }
        for name, value in options.items():
            self.cfg.set(name, value)

    def _pre_fork(self, arbiter: Any, worker: Any) -> None:
        held = {getattr(w, "model_slot", None) for w in arbiter.WORKERS.values()}
        slot = next((i for i in range(len(self.model_slots)) if i not in held), None)
        if slot is not None:
            worker.__class__ = ModelWorker  # gunicorn has one worker class: a model slot's worker becomes this one
            worker.model_slot, worker.model_socket, worker.gpu = slot, self.model_sockets[slot], self.model_slots[slot]
            return
        if self.model_slots:
            worker.gpu = "-1"  # HTTP workers of a model-process server never touch a GPU (no CUDA context each)
        else:
            self._gpus.assign(arbiter, worker)
        self.shares.assign(arbiter, worker)

    def _child_exit(self, arbiter: Any, worker: Any) -> None:
        metrics.worker_exited(worker.pid)
        self.shares.release(worker)

    def _post_fork(self, arbiter: Any, worker: Any) -> None:
        start_memory_trimmer()
        self._gpus.pin(worker)
        self._worker = worker  # so boot() can keep telling the master this worker is alive during init()

    def load(self) -> Any:
        """In an HTTP worker: the app (with init() unless model processes run it), or exit with a boot error."""
        from .app import create_app

        return self.boot(lambda: create_app(self.settings, model_sockets=self.model_sockets))

    def load_model_script(self) -> Any:
        """In a model process: the entry script, loaded and initialised."""
        from .entry_script import EntryScript

        script = EntryScript.load(self.settings.entry_script, self.settings.app_root)
        script.init()
        return script

    def boot(self, build: Callable[[], Any]) -> Any:
        """Run `build` (import the script, init()) within init_timeout, or exit with a boot error."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                result["value"] = build()
            except BaseException:  # noqa: B036 - report anything, SystemExit from a script included
                result["error"] = traceback.format_exc()

        thread = threading.Thread(target=run, name="init", daemon=True)
        thread.start()
        waited = 0.0
        while thread.is_alive() and waited < self.settings.init_timeout:
            thread.join(timeout=1.0)
            waited += 1.0
            if self._worker is not None:
                self._worker.notify()
        if thread.is_alive():
            _fail(f"init() did not finish within {self.settings.init_timeout} s (--init-timeout); "
                  f"the entry script {self.settings.entry_script} is hung or too slow to load.")
        if "error" in result:
            _fail(f"The entry script {self.settings.entry_script} failed to load or init() raised:\n"
                  f"{result['error']}")
        logging.getLogger("scorehost.runner").info("worker %d ready for serving traffic", os.getpid())
        return result["value"]


def start_memory_trimmer(every_s: float = 10.0) -> None:
    """Give freed heap memory back to the system every few seconds (glibc's malloc_trim).

    glibc keeps memory freed by a thread in that thread's malloc arena; with TensorFlow's varying buffer sizes and
    several request threads, a worker's RSS otherwise creeps up in steps over a long run (the soak,
    bench/RESULTS.md). A trim takes milliseconds; not glibc: nothing to do.
    """
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return

    def loop() -> None:
        while True:
            time.sleep(every_s)
            trim(0)

    threading.Thread(target=loop, name="malloc-trim", daemon=True).start()


def _fail(message: str) -> None:
    print(f"scorehost: {message}", file=sys.stderr, flush=True)
    os._exit(BOOT_ERROR)


def serve(settings: Settings, model_slots: tuple[Optional[str], ...] = ()) -> Optional[int]:
    """Run until stopped; returns the master's exit code (3 when a worker could not boot)."""
    import shutil

    own_dirs = [metrics.own_temp_dir("run")]  # the model processes' sockets
    own_dirs.append(metrics.prepare_multiprocess_dir())
    try:
        ScoreServer(settings, model_slots, own_dirs[0]).run()
    except SystemExit as ex:
        return ex.code if isinstance(ex.code, int) else 1
    finally:
        for path in own_dirs:
            if path:
                shutil.rmtree(path, ignore_errors=True)
    return 0
