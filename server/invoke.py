"""Calls run() with a deadline.

Azure ML's server enforces SCORING_TIMEOUT_MS with SIGALRM, which works only on a process's main thread and so not
under threaded workers. Here run() executes on a small pool beside the request threads; the request thread waits
for it up to the deadline and then answers 500 on time. A run() that overran also gets a ScoringTimeout raised inside
it (at its next Python instruction) so that a looping script gives its thread back; one stuck in native code
finishes its call and its result is dropped.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import ctypes
import logging
import threading
import time
from typing import Any, Callable, NamedTuple

from .errors import ScoringTimeout, ScriptFailed

log = logging.getLogger("scorehost.invoke")


class Timed(NamedTuple):
    output: Any
    elapsed_ms: float  # inside run() (or the run_batch() call this request was part of)
    queue_wait_s: float = 0.0  # waiting for a batch to start (batching only)


class _Overran(BaseException):
    """Raised inside a run() that passed its deadline; BaseException so `except Exception` in scripts lets it pass."""


def _interrupt(thread_id: int) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(_Overran))


class Invoker:
    def __init__(self, threads: int, timeout_ms: int):
        self.timeout_ms = timeout_ms
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="run")

    def invoke(self, call: Callable[[], Any]) -> Timed:
        """Run `call` (run() with its arguments bound) and time it; every failure becomes a ServerError."""
        # The lock makes "interrupt" and "finish" exclusive: an interrupt can only land while run() is still inside
        # `timed`, never later in the pool's own loop, where it would kill the pool thread.
        lock = threading.Lock()
        state: dict[str, Any] = {"thread": None, "done": False}

        def timed() -> Timed:
            state["thread"] = threading.get_ident()
            start = time.perf_counter()
            try:
                output = call()
            finally:
                with lock:
                    state["done"] = True
            return Timed(output, (time.perf_counter() - start) * 1000)

        future = self._pool.submit(contextvars.copy_context().run, timed)
        try:
            return future.result(timeout=self.timeout_ms / 1000)
        except concurrent.futures.TimeoutError:
            with lock:
                if state["thread"] is not None and not state["done"]:
                    _interrupt(state["thread"])
                elif state["thread"] is None:
                    future.cancel()
            log.error("run() passed the scoring timeout of %d ms", self.timeout_ms)
            raise ScoringTimeout(self.timeout_ms) from None
        except _Overran:
            raise ScoringTimeout(self.timeout_ms) from None
        except BaseException:
            log.exception("run() raised")
            raise ScriptFailed() from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
