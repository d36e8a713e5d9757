"""The model process: the entry script's init() runs once per GPU, and its run_batch() is fed by every HTTP worker.

Used when the script has `run_batch` and batching is on (the default on a GPU machine). Who runs what:
- HTTP workers (front.py, app.py): accept, authorise, read, and call the script's optional `preprocess(request)`
  on their own cores; each item goes to a model process over a Unix socket (`ModelClient`), and the request's
  thread waits for its answer.
- A model process (`ModelWorker`): a gunicorn worker the master placed in a model slot, one per GPU (or one on a
  machine without GPU), so it is supervised like any worker: killed -> the master starts another. It loads the
  script, calls init(), warms every `--batch-sizes` size, and only then listens. One thread per HTTP worker reads
  items into one queue; the main thread takes what is queued as soon as the previous run_batch() returned (up to
  `--batch-max`; when the model was idle it waits up to `--batch-delay-ms` for more), pads to the next allowed
  size, calls run_batch(), and answers each item. The next batch forms while this one runs.
- What crosses: pickle protocol 5 with out-of-band buffers, so a numpy array is copied once into the socket and
  once out of it, and a script's Flask Response crosses as status, headers and body.
- A run_batch() past the scoring timeout: its requests get Azure ML's 500 at once (a late result is never sent);
  still running after `--hung-grace` seconds, the process logs it and exits, and the master starts a new one.
  Meanwhile HTTP workers answer 503 with Retry-After and `/ready` says not ready; nothing waits forever.
"""

from __future__ import annotations

import collections
import io
import itertools
import logging
import os
import pickle
import socket
import struct
import threading
import time
from typing import Any, Callable, NamedTuple, Optional

import flask
from gunicorn.workers.base import Worker

from . import errors
from .invoke import Timed

log = logging.getLogger("scorehost.model")

# The exit code of a process whose run() or run_batch() never returned: the master starts another. (Not 3 or 4:
# gunicorn halts the whole server on those, its "worker failed to boot" and "app failed to load".)
EXIT_HUNG = 12


# --- frames -----------------------------------------------------------------------------------------------------

def send_frame(sock: socket.socket, message: Any) -> None:
    """One message: a count, the sizes, the pickle, then its out-of-band buffers (numpy arrays, bytes) as they are."""
    buffers: list[pickle.PickleBuffer] = []
    head = pickle.dumps(message, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    sizes = [len(head)] + [r.nbytes for r in raws]
    sock.sendall(struct.pack(f"<I{len(sizes)}Q", len(sizes), *sizes) + head)
    for raw in raws:
        sock.sendall(raw)


def recv_frame(sock: socket.socket) -> Any:
    """The next message, or EOFError when the peer closed. Buffers are read into place: no copy after the socket."""
    (count,) = struct.unpack("<I", _recv_exact(sock, 4))
    sizes = struct.unpack(f"<{count}Q", _recv_exact(sock, 8 * count))
    head = _recv_exact(sock, sizes[0])
    return pickle.loads(head, buffers=[_recv_exact(sock, size) for size in sizes[1:]])


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError("the other side closed the connection")
        got += n
    return buffer


class ResponseData(NamedTuple):
    """A Flask Response returned by the script (AMLResponse included), as it crosses processes."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes

    @classmethod
    def of(cls, response: flask.Response) -> "ResponseData":
        return cls(response.status_code, list(response.headers.items()), response.get_data())

    def response(self) -> flask.Response:
        return flask.Response(self.body, self.status, headers=self.headers)


class RequestSnapshot(NamedTuple):
    """What run_batch() gets for a @rawhttp script without preprocess(): the request, rebuilt in the model process."""

    environ: dict[str, str]
    body: bytes

    @classmethod
    def of(cls, request: flask.Request) -> "RequestSnapshot":
        return cls({k: v for k, v in request.environ.items() if isinstance(v, str)}, request.get_data())

    def request(self) -> flask.Request:
        """A Flask request, as Azure ML's server gives run() (AMLRequest cannot be built from an environ)."""
        return flask.Request({**self.environ, "wsgi.input": io.BytesIO(self.body), "wsgi.url_scheme": "http"})


# Errors cross as (type name, message) and are rebuilt here: ServerError types do not all pickle.
def _error_data(error: errors.ServerError) -> tuple[str, str]:
    return type(error).__name__, error.message


def _error(data: tuple[str, str], timeout_ms: int) -> errors.ServerError:
    name, message = data
    rebuild: dict[str, Callable[[], errors.ServerError]] = {
        "ScoringTimeout": lambda: errors.ScoringTimeout(timeout_ms),
        "ModelOutOfMemory": errors.ModelOutOfMemory,
        "Overloaded": lambda: errors.Overloaded(message),
        "ScriptFailed": errors.ScriptFailed,
    }
    return rebuild.get(name, errors.InternalError)()


# --- the model process ------------------------------------------------------------------------------------------

class _Item:
    __slots__ = ("link", "rid", "value", "arrived", "deadline", "answered")

    def __init__(self, link: "_Peer", rid: int, value: Any, arrived: float, deadline: float):
        self.link, self.rid, self.value, self.arrived, self.deadline = link, rid, value, arrived, deadline
        self.answered = False


class _Peer:
    """One HTTP worker's connection, seen from the model process."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, message: Any) -> None:
        try:
            with self.lock:
                send_frame(self.sock, message)
        except OSError:
            pass  # that HTTP worker is gone; its requests went with it


class ModelServer:
    """The batching loop of one model process (see the module docstring)."""

    def __init__(self, run_batch: Callable[[list], list], *, batch_max: int, delay_ms: float,
                 sizes: tuple[int, ...], queue_max: int, timeout_ms: int, grace_s: float,
                 observe: Optional[Callable[[int, float, list[float]], None]] = None,
                 on_hung: Callable[[], None] = lambda: None):
        self.run_batch = run_batch
        self.batch_max = max(1, batch_max)
        self.delay_s = delay_ms / 1000
        self.sizes = tuple(sorted(s for s in sizes if s <= self.batch_max))
        self.queue_max = queue_max
        self.timeout_ms = timeout_ms
        self.grace_s = grace_s
        self.observe = observe  # (batch size, run_batch seconds, queue waits) -> None, for metrics
        self.on_hung = on_hung
        self.queue: collections.deque[_Item] = collections.deque()
        self.ready = threading.Condition()
        self.current: list[_Item] = []  # the batch inside run_batch() now (the watchdog's view)
        self.batch_s = 0.0  # recent run_batch() time (moving average): how long the queue ahead will take
        self.answer_lock = threading.Lock()  # an item is answered once: by its result or by its deadline

    def padded(self, n: int) -> int:
        return next((s for s in self.sizes if s >= n), n)

    def warm(self, item: Any) -> None:
        """One run_batch() call per allowed size, before the process listens: kernels are tuned before traffic."""
        for size in self.sizes:
            started = time.perf_counter()
            self.run_batch([item] * size)
            log.info("warmed batch size %d in %.0f ms", size, (time.perf_counter() - started) * 1000)

    def serve(self, path: str, heartbeat: Callable[[], None], alive: Callable[[], bool],
              on_listening: Callable[[], None] = lambda: None) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)  # a predecessor's socket
        listener.bind(path)
        listener.listen(1024)
        on_listening()
        threading.Thread(target=self._accept, args=(listener,), name="model-accept", daemon=True).start()
        threading.Thread(target=self._watch, args=(heartbeat,), name="model-watchdog", daemon=True).start()
        log.info("model process %d ready: batches of up to %d%s", os.getpid(), self.batch_max,
                 f", padded to {list(self.sizes)}" if self.sizes else "")
        while alive() or self.queue:  # on SIGTERM, what HTTP workers already sent is still answered
            batch = self._next_batch()
            if batch:
                self._score(batch)
        listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            sock, _ = listener.accept()
            threading.Thread(target=self._read, args=(_Peer(sock),), name="model-peer", daemon=True).start()

    def _read(self, peer: _Peer) -> None:
        try:
            while True:
                rid, value, deadline = recv_frame(peer.sock)
                error = self._enqueue(peer, rid, value, deadline)
                if error is not None:
                    peer.send((rid, "error", _error_data(error), 0.0, 0.0, 0))
        except (EOFError, OSError):
            peer.sock.close()
        except BaseException:  # noqa: B036 - a broken frame ends this peer's link, which its worker sees as a restart
            log.exception("unreadable message from an HTTP worker: closing its link")
            peer.sock.close()

    def _enqueue(self, peer: _Peer, rid: int, value: Any, deadline: float) -> Optional[errors.ServerError]:
        try:
            if isinstance(value, RequestSnapshot):
                value = value.request()
        except Exception:  # noqa: BLE001 - this item fails alone
            log.exception("could not rebuild a request for run_batch()")
            return errors.InternalError()
        with self.ready:
            if len(self.queue) >= self.queue_max:
                return errors.Overloaded(f"The server is busy: {self.queue_max} requests are already waiting. "
                                         "Retry after a short pause.")
            now = time.monotonic()
            batches_until_done = len(self.queue) // self.batch_max + (2 if self.current else 1)
            if now + batches_until_done * self.batch_s > deadline:
                return errors.Overloaded("The server is busy: this request would wait past its scoring timeout. "
                                         "Retry after a short pause.")
            self.queue.append(_Item(peer, rid, value, now, deadline))
            self.ready.notify()
        return None

    def _next_batch(self) -> list[_Item]:
        with self.ready:
            if not self.queue:
                self.ready.wait(0.5)
                if not self.queue:
                    return []
                # The model was idle: give others a moment to join this one.
                until = self.queue[0].arrived + self.delay_s
                while len(self.queue) < self.batch_max and (left := until - time.monotonic()) > 0:
                    self.ready.wait(left)
            batch = [self.queue.popleft() for _ in range(min(self.batch_max, len(self.queue)))]
        now = time.monotonic()
        late = [item for item in batch if item.deadline <= now]
        for item in late:  # its deadline passed while it queued: the server was too busy, the model never saw it
            self._answer(item, "error", _error_data(errors.Overloaded(
                "The server is busy: this request waited past its scoring timeout. Retry after a short pause.")),
                0.0, now - item.arrived)
        return [item for item in batch if item.deadline > now]

    def _score(self, batch: list[_Item]) -> None:
        n = len(batch)
        values = [item.value for item in batch]
        values += [values[-1]] * (self.padded(n) - n)
        self.current = batch
        started = time.monotonic()
        try:
            outputs = list(self.run_batch(values))[:n]
            if len(outputs) != n:
                raise ValueError(f"run_batch() returned {len(outputs)} results for {len(values)} inputs")
        except BaseException as ex:  # noqa: B036 - a failing script must not end the model process
            log.exception("run_batch() raised; failing the %d requests of this batch", n)
            outputs = [ex] * n
        finally:
            self.current = []
        elapsed = time.monotonic() - started
        self.batch_s = elapsed if not self.batch_s else 0.8 * self.batch_s + 0.2 * elapsed
        if self.observe:
            self.observe(len(values), elapsed, [started - item.arrived for item in batch])
        for item, output in zip(batch, outputs):
            if isinstance(output, BaseException):
                if not isinstance(output, errors.ServerError):
                    log.error("run_batch() failed one item: %r", output)
                error = output if isinstance(output, errors.ServerError) else errors.script_error(output)
                self._answer(item, "error", _error_data(error), elapsed, started - item.arrived, len(values))
            elif isinstance(output, flask.Response):
                self._answer(item, "ok", ResponseData.of(output), elapsed, started - item.arrived, len(values))
            else:
                self._answer(item, "ok", output, elapsed, started - item.arrived, len(values))

    def _answer(self, item: _Item, kind: str, payload: Any, run_s: float, wait_s: float, size: int = 0) -> None:
        with self.answer_lock:
            if item.answered:
                return  # answered at its deadline already: a late result is never sent
            item.answered = True
        item.link.send((item.rid, kind, payload, run_s * 1000, wait_s, size))

    def _watch(self, heartbeat: Callable[[], None]) -> None:
        """Answers the items of a run_batch() that overran their deadline, and ends a process that stays stuck."""
        while True:
            time.sleep(0.05)
            heartbeat()
            batch, now = self.current, time.monotonic()
            for item in batch:
                if now >= item.deadline and not item.answered:
                    log.error("run_batch() passed the scoring timeout of %d ms", self.timeout_ms)
                    self._answer(item, "error", _error_data(errors.ScoringTimeout(self.timeout_ms)), 0.0, 0.0)
            if batch and now >= min(item.deadline for item in batch) + self.grace_s and self.current is batch:
                log.error("run_batch() has not returned %.0f s after the scoring timeout (--hung-grace): the model "
                          "process %d exits and the master starts another", self.grace_s, os.getpid())
                self.on_hung()
                logging.shutdown()
                os._exit(EXIT_HUNG)


class ModelWorker(Worker):
    """The gunicorn worker in a model slot: no HTTP, just the script's init() and the batching loop."""

    def load_wsgi(self) -> None:
        self.wsgi = None
        self.script = self.app.boot(self.app.load_model_script, mark_ready=False)  # ready once warm, in serve()

    def run(self) -> None:
        from .metrics import Metrics

        s = self.app.settings
        metrics = Metrics()
        server = ModelServer(self.script.run_batch, batch_max=s.batch_max, delay_ms=s.batch_delay_ms,
                             sizes=s.batch_sizes, queue_max=s.batch_queue, timeout_ms=s.scoring_timeout_ms,
                             grace_s=s.hung_grace, observe=metrics.observe_batch,
                             on_hung=metrics.restarts.labels("hung run_batch()").inc)
        warmup = getattr(self.script.module, "warmup_item", None)
        if server.sizes and callable(warmup):
            server.warm(warmup())
        elif server.sizes:
            log.warning("--batch-sizes is set but %s has no warmup_item(): sizes are tuned on first use",
                        self.script.path)
        server.serve(self.model_socket, self.notify, lambda: self.alive and self.ppid == os.getppid(),
                     on_listening=self.app.boots.mark_ready)


# --- the HTTP worker's side -------------------------------------------------------------------------------------

class _Pending:
    __slots__ = ("done", "answer")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: Any = None


class _Link:
    """This HTTP worker's connection to one model process; connects on first use and after a restart."""

    def __init__(self, path: str):
        self.path = path
        self.sock: Optional[socket.socket] = None
        self.lock = threading.Lock()  # connecting and sending
        self.pending: dict[int, _Pending] = {}

    def connected(self) -> bool:
        with self.lock:
            return self._connect()

    def _connect(self) -> bool:
        if self.sock is not None:
            return True
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            return False
        self.sock = sock
        threading.Thread(target=self._receive, args=(sock,), name="model-link", daemon=True).start()
        return True

    def send(self, rid: int, value: Any, deadline: float, pending: _Pending) -> None:
        with self.lock:
            if not self._connect():
                raise errors.ModelUnavailable()
            self.pending[rid] = pending
            try:
                send_frame(self.sock, (rid, value, deadline))  # type: ignore[arg-type]
            except OSError:
                self.pending.pop(rid, None)
                self._drop(self.sock)
                raise errors.ModelUnavailable() from None

    def _receive(self, sock: socket.socket) -> None:
        try:
            while True:
                answer = recv_frame(sock)
                pending = self.pending.pop(answer[0], None)
                if pending is not None:
                    pending.answer = answer
                    pending.done.set()
        except (EOFError, OSError):
            with self.lock:
                self._drop(sock)

    def _drop(self, sock: Optional[socket.socket]) -> None:
        """The model process went away: every request waiting on it is answered 503 now."""
        if sock is None or sock is not self.sock:
            return
        self.sock = None
        sock.close()
        waiting, self.pending = self.pending, {}
        for pending in waiting.values():
            pending.done.set()  # answer None: unavailable


class ModelClient:
    """How an HTTP worker scores an item: send it to the least busy model process and wait for its answer."""

    def __init__(self, paths: list[str], timeout_ms: int):
        self.links = [_Link(path) for path in paths]
        self.timeout_ms = timeout_ms
        self._ids = itertools.count()

    def ready(self) -> bool:
        return all(link.connected() for link in self.links)

    def submit(self, value: Any) -> Timed:
        link = min(self.links, key=lambda candidate: (candidate.sock is None, len(candidate.pending)))
        pending, rid = _Pending(), next(self._ids)
        deadline = time.monotonic() + self.timeout_ms / 1000
        link.send(rid, value, deadline, pending)
        if not pending.done.wait(self.timeout_ms / 1000 + 5):  # the model process answers at the deadline itself
            link.pending.pop(rid, None)
            raise errors.ScoringTimeout(self.timeout_ms)
        if pending.answer is None:
            raise errors.ModelUnavailable()
        _, kind, payload, run_ms, _wait_s, _size = pending.answer  # queue waits are observed by the model process
        if kind == "error":
            raise _error(payload, self.timeout_ms)
        output = payload.response() if isinstance(payload, ResponseData) else payload
        return Timed(output, run_ms)
