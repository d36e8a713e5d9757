"""Calls run() on the request's own thread, with a deadline.

Azure ML's server enforces SCORING_TIMEOUT_MS with SIGALRM, which works only on a process's main thread and so not
under threaded workers. Here one watchdog thread per worker watches the calls in flight; when one passes its
deadline the watchdog raises `_Overran` inside it, and the client gets Azure ML's 500 "Scoring timeout after N ms".
Python code stops at its next instruction; a call blocked in native code (a sleep, a model kernel) stops when that
call returns, so its answer can come late but never leaves the thread stuck in the script's Python code.
Handing run() to another thread instead would answer precisely on time, but costs a thread switch per request
(measured: +150 us on a 140 us request, bench/RESULTS.md), so it is not done.
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

from .errors import ScoringTimeout, script_error

log = logging.getLogger("scorehost.invoke")


class Timed(NamedTuple):
    output: Any
    elapsed_ms: float  # inside run() (or the run_batch() call this request was part of)


class _Overran(BaseException):
    """Raised inside a run() that passed its deadline; BaseException so `except Exception` in scripts lets it pass."""


class _Call:
    __slots__ = ("thread_id", "deadline", "finished", "interrupted")

    def __init__(self, thread_id: int, deadline: float):
        self.thread_id, self.deadline = thread_id, deadline
        self.finished = self.interrupted = False


class Invoker:
    def __init__(self, timeout_ms: int):
        self.timeout_ms = timeout_ms
        self._lock = threading.Lock()  # makes "interrupt" and "finish" exclusive: no interrupt lands after run()
        self._calls: set[_Call] = set()
        self._tick_s = min(1.0, max(0.01, timeout_ms / 10_000))
        threading.Thread(target=self._watch, name="scoring-deadlines", daemon=True).start()

    def invoke(self, call: Callable[[], Any], deadline: Optional[float] = None,
               passthrough: tuple[type[BaseException], ...] = (), name: str = "run()") -> Timed:
        """Run `call` (run() with its arguments bound, or what `name` says) until `deadline` (time.monotonic(); the
        request's scoring deadline) and time it; every failure becomes a ServerError, except the `passthrough`
        types."""
        started = time.perf_counter()
        if deadline is None:
            deadline = time.monotonic() + self.timeout_ms / 1000
        entry = _Call(threading.get_ident(), deadline)
        with self._lock:
            self._calls.add(entry)
        try:
            try:
                output = call()
            finally:
                with self._lock:
                    entry.finished = True
                    self._calls.discard(entry)
            if entry.interrupted:  # the script swallowed the interruption and returned: still a timeout
                raise _Overran()
        except _Overran:
            log.error("%s passed the scoring timeout of %d ms", name, self.timeout_ms)
            raise ScoringTimeout(self.timeout_ms) from None
        except passthrough:
            if entry.interrupted:
                raise ScoringTimeout(self.timeout_ms) from None
            raise
        except BaseException as ex:  # noqa: B036 - SystemExit from a script must not end the worker
            if entry.interrupted:  # the interrupt landed inside the script's own exception handling
                raise ScoringTimeout(self.timeout_ms) from None
            log.exception("%s raised", name)
            raise script_error(ex) from None
        return Timed(output, (time.perf_counter() - started) * 1000)

    def _watch(self) -> None:
        while True:
            time.sleep(self._tick_s)
            now = time.monotonic()
            with self._lock:
                for entry in self._calls:
                    if not entry.finished and not entry.interrupted and now >= entry.deadline:
                        entry.interrupted = True
                        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(entry.thread_id),
                                                                   ctypes.py_object(_Overran))
