"""Dynamic batching: concurrent requests in one worker are scored together by the script's run_batch().

Opt-in (`--batch-max N`, N > 1) and only for scripts that define `run_batch(items)`, where items[i] is what run()
would have been given for request i (for @input_schema scripts, the dict of run()'s keyword arguments) and the
result is a list of the same length, each entry exactly what run() would have returned for that request (an
exception instance fails only its own request). run() itself stays as it was, so the script still works unchanged
under Azure ML, which never batches.

One thread per worker collects requests: it takes the first waiting request, waits up to `batch_delay_ms` for more
(up to `batch_max`), and makes one run_batch() call. The queue is bounded: when it is full a request is answered 503
with Retry-After at once instead of piling up. The scoring timeout counts from arrival, per request.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Any, Callable, Optional

from .errors import Overloaded, ScoringTimeout, ServerError, script_error
from .invoke import Timed

log = logging.getLogger("scorehost.batching")


class _Item:
    __slots__ = ("value", "arrived", "done", "result", "error", "abandoned")

    def __init__(self, value: Any):
        self.value = value
        self.arrived = time.perf_counter()
        self.done = threading.Event()
        self.result: Optional[Timed] = None
        self.error: Optional[BaseException] = None
        self.abandoned = False


class Batcher:
    def __init__(self, run_batch: Callable[[list], list], max_size: int, delay_ms: float, queue_size: int,
                 timeout_ms: int, observe: Optional[Callable[[int, float], None]] = None):
        self.run_batch = run_batch
        self.max_size = max_size
        self.delay_s = delay_ms / 1000
        self.timeout_ms = timeout_ms
        self.observe = observe  # (batch size, run_batch seconds) -> None, for metrics
        self._queue: "queue.Queue[_Item]" = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._loop, name="batcher", daemon=True)
        self._thread.start()

    def submit(self, value: Any) -> Timed:
        """Queue one request's input and wait for its own answer (or its deadline)."""
        item = _Item(value)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            raise Overloaded(f"The server is busy: {self._queue.maxsize} requests are already waiting. "
                             "Retry after a short pause.") from None
        if not item.done.wait(self.timeout_ms / 1000):
            item.abandoned = True
            raise ScoringTimeout(self.timeout_ms)
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _collect(self) -> list[_Item]:
        first = self._queue.get()
        batch = [first]
        deadline = first.arrived + self.delay_s
        while len(batch) < self.max_size:
            remaining = deadline - time.perf_counter()
            try:
                batch.append(self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
        return [item for item in batch if not item.abandoned]

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch:
                self._score(batch)

    def _score(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        try:
            outputs = list(self.run_batch([item.value for item in batch]))
            if len(outputs) != len(batch):
                raise ValueError(f"run_batch() returned {len(outputs)} results for {len(batch)} inputs")
        except BaseException as ex:  # noqa: B036 - a failing script must not kill the batcher thread
            log.exception("run_batch() raised; failing the %d requests of this batch", len(batch))
            outputs = [script_error(ex) for _ in batch]
        elapsed_s = time.perf_counter() - started
        if self.observe:
            self.observe(len(batch), elapsed_s)
        for item, output in zip(batch, outputs):
            if isinstance(output, ServerError):
                item.error = output
            elif isinstance(output, BaseException):
                log.error("run_batch() failed one item: %r", output)
                item.error = script_error(output)
            else:
                item.result = Timed(output, elapsed_s * 1000, started - item.arrived)
            item.done.set()
