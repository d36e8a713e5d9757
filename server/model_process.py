"""The model process: the entry script's init() runs once per GPU, and its run_batch() is fed by every HTTP worker.

Used when the script has `run_batch` and batching is on (the default on a GPU machine). Who runs what:
- HTTP workers (front.py, app.py): accept, authorise, read, and call the script's optional `preprocess(request)`
  on their own cores; each item goes to a model process over a Unix socket (`ModelClient`), and the request's
  app thread waits for its answer until the request's scoring deadline.
- A model process (`ModelWorker`, a gunicorn worker class of its own that the master starts for each model slot,
  one per GPU or one on a machine without GPU): supervised like any worker (killed -> the master starts another).
  It loads the script, calls init(), warms every `--batch-sizes` size, and only then listens. One reader thread per
  HTTP worker puts items in one queue (`ModelServer.submit`); the main thread takes what is queued as soon as the
  previous run_batch() returned, or later when the batching policy (batching.py) expects others to join soon
  (never past `--batch-delay-ms`), pads to the next allowed size, calls run_batch(), and answers each item. The next
  batch forms while this one runs.
- What crosses: `wire`'s named, versioned frames; the request id and deadline travel outside the pickle, so a
  result that cannot be pickled here or unpickled there fails its own request (500), never the link or the process.
- A run_batch() past the scoring deadline: its requests get Azure ML's 500 at once (a late result is never sent);
  still running after `--hung-grace` seconds, the process logs it and exits, and the master starts a new one.
  Meanwhile HTTP workers answer 503 with Retry-After and `/ready` says not ready; nothing waits forever.
- Stopping (SIGTERM, or a reload's old generation): the process keeps serving while any HTTP worker is still linked
  to it (they drain their own requests first), for at most `--graceful-timeout`; what is still queued then is
  answered 503 + Retry-After before it exits.
"""

from __future__ import annotations

import collections
import copy
import io
import itertools
import logging
import os
import signal
import socket
import threading
import time
from typing import Any, Callable, Iterable, NamedTuple, Optional

import flask
from gunicorn.workers.base import Worker
from werkzeug.exceptions import HTTPException

from . import errors, wire
from .batching import BatchPolicy
from .body import WHOLE_BODY, WholeBodyRequest
from .invoke import Timed
from .settings import drain_plan
from .telemetry import Carried, start as start_tracing

log = logging.getLogger("scorehost.model")

# The exit code of a process whose run() or run_batch() never returned: the master starts another. (Not 3 or 4:
# gunicorn halts the whole server on those, its "worker failed to boot" and "app failed to load".)
EXIT_HUNG = 12
LINK_RETRY_S = 0.1  # how often an HTTP worker tries to (re)connect a link that is down


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

    def __reduce__(self) -> tuple:
        return _response_data, (self.status, self.headers, wire.big_bytes(self.body))


class RequestSnapshot(NamedTuple):
    """What run_batch() gets for a @rawhttp script without preprocess(): the request, rebuilt in the model process."""

    environ: dict[str, str]
    body: bytes

    @classmethod
    def of(cls, request: flask.Request) -> "RequestSnapshot":
        return cls({k: v for k, v in request.environ.items() if isinstance(v, str)}, request.get_data())

    def request(self) -> flask.Request:
        """A Flask request, as Azure ML's server gives run() (AMLRequest cannot be built from an environ); its
        get_data() is the body that crossed, not a copy."""
        return WholeBodyRequest({**self.environ, "wsgi.input": io.BytesIO(self.body), "wsgi.url_scheme": "http",
                                 WHOLE_BODY: True})

    def __reduce__(self) -> tuple:
        return _request_snapshot, (self.environ, wire.big_bytes(self.body))


def _response_data(status: int, headers: list, body: Any) -> ResponseData:
    return ResponseData(status, headers, wire.as_bytes(body))


def _request_snapshot(environ: dict, body: Any) -> RequestSnapshot:
    return RequestSnapshot(environ, wire.as_bytes(body))


# --- the model process ------------------------------------------------------------------------------------------

class Answer(NamedTuple):
    """One request's answer, as the model process sends it: RESULT with the output, or ERROR with a ServerError."""

    rid: int
    ok: bool
    payload: Any
    run_ms: float = 0.0
    size: int = 0


class Peer:
    """One HTTP worker's link, seen from the model process. Answers are sent whole, under a lock, with a send
    timeout; a link that cannot take them is closed (its HTTP worker then answers its requests 503)."""

    def __init__(self, sock: socket.socket, send_timeout_s: float = 30.0):
        self.sock = sock
        self.lock = threading.Lock()
        self.open = True
        wire.set_send_timeout(sock, send_timeout_s)

    def send(self, answers: Iterable[Answer]) -> None:
        parts: list[Any] = []
        for a in answers:
            parts += _encode(a)
        self._write(parts)

    def stalled(self, on: bool) -> None:
        """Tell the HTTP worker whether a run_batch() is past a scoring timeout (wire.Type.STALLED)."""
        self._write(wire.encode(wire.Type.STALLED, 0, None, 1.0 if on else 0.0))

    def _write(self, parts: list[Any]) -> None:
        with self.lock:
            if not self.open:
                return
            try:
                wire.send(self.sock, parts)
            except OSError as ex:
                log.warning("an HTTP worker's link does not take its answers (%s): closing it", ex)
                self._close()

    def close(self) -> None:
        with self.lock:
            self._close()

    def _close(self) -> None:
        if self.open:
            self.open = False
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.sock.close()


def _encode(answer: Answer) -> list[Any]:
    if answer.ok:
        try:
            return wire.encode(wire.Type.RESULT, answer.rid, answer.payload, answer.run_ms, answer.size)
        except wire.PayloadError as ex:
            log.error("run_batch()'s result for one request cannot be sent to its HTTP worker: %s", ex)
            error = errors.ResultUnusable(f"run_batch()'s result for this request cannot be sent back ({ex}).")
            return wire.encode(wire.Type.ERROR, answer.rid, error, answer.run_ms, answer.size)
    return wire.encode(wire.Type.ERROR, answer.rid, answer.payload, answer.run_ms, answer.size)


class _Item:
    __slots__ = ("peer", "rid", "value", "arrived", "deadline", "nbytes", "answered", "traceparent")

    def __init__(self, peer: Peer, rid: int, value: Any, arrived: float, deadline: float, nbytes: int):
        self.peer, self.rid, self.value, self.arrived, self.deadline = peer, rid, value, arrived, deadline
        self.nbytes = nbytes
        self.answered = False
        self.traceparent: Optional[str] = None  # the request span's, when its HTTP worker traces (telemetry)


def _padding(last: Any, count: int) -> list:
    """What fills a batch up to its padded size: one copy of the last item, repeated. Not the item itself: a
    run_batch() that changes its inputs in place (`x *= 2`, an in-place normalisation) would change that request's
    input once per padding entry. One copy a batch is enough, since the padding's results are dropped. An item that
    cannot be copied (a rebuilt request object) is repeated as it is."""
    if count <= 0:
        return []
    try:
        filler = copy.deepcopy(last)
    except Exception:  # noqa: BLE001 - whatever the object's __deepcopy__ or __reduce__ raises
        filler = last
    return [filler] * count


class ModelServer:
    """The batching queue and loop of one model process (see the module docstring). Built without a socket:
    tests drive `submit` and `step` directly with Peer-like objects."""

    def __init__(self, run_batch: Callable[[list], list], *, batch_max: int, delay_ms: float,
                 sizes: tuple[int, ...], queue_max: int, timeout_ms: int, grace_s: float,
                 queue_bytes: int = 1 << 62, send_timeout_s: float = 30.0, graceful_s: float = 30.0,
                 observe: Optional[Callable[[int, float, list[float], float, BatchPolicy], None]] = None,
                 on_hung: Callable[[], None] = lambda: None):
        self.run_batch = run_batch
        self.batch_max = max(1, batch_max)
        if sizes and max(sizes) < self.batch_max:  # a batch between them could not be padded to an allowed size
            log.warning("--batch-max %d is above the largest of --batch-sizes (%d): batches are capped at %d, so "
                        "that each is padded to an allowed (warmed) size", self.batch_max, max(sizes), max(sizes))
            self.batch_max = max(sizes)
        self.delay_s = delay_ms / 1000
        self.sizes = tuple(sorted(s for s in sizes if s <= self.batch_max))
        self.queue_max = queue_max
        self.queue_bytes = queue_bytes
        self.timeout_ms = timeout_ms
        self.grace_s = grace_s
        self.send_timeout_s = send_timeout_s
        self.graceful_s = graceful_s
        self.observe = observe  # (batch size, run_batch seconds, queue waits, policy's wait, policy) -> None
        self.on_hung = on_hung
        self.queue: collections.deque[_Item] = collections.deque()
        self.queued_bytes = 0
        self.ready = threading.Condition()
        self.current: list[_Item] = []  # the batch inside run_batch() now (the watchdog's view)
        self.batch_s = 0.0  # recent run_batch() time (moving average): how long the queue ahead will take
        self.answer_lock = threading.Lock()  # an item is answered once: by its result or by its deadline
        self.peers: set[Peer] = set()
        # Whether the run in progress is past a request's scoring timeout: its HTTP workers are told (STALLED) and
        # say not ready until it returns. One lock orders the watchdog's "stalled" after the run's "returned".
        self.stalled = False
        self.stall_lock = threading.Lock()
        self.policy = BatchPolicy(self.batch_max, self.sizes, self.delay_s)
        self.policy_wait_s = 0.0  # how long the last batch was held for others to join (for /metrics)
        self.tracing: Any = None  # telemetry.Tracing when tracing is on: the run_batch span

    def padded(self, n: int) -> int:
        return next((s for s in self.sizes if s >= n), n)

    def warm(self, item: Any) -> None:
        """One run_batch() call per allowed size, before the process listens: kernels are tuned before traffic."""
        for size in self.sizes:
            started = time.perf_counter()
            self.run_batch([item] * size)
            log.info("warmed batch size %d in %.0f ms", size, (time.perf_counter() - started) * 1000)

    # --- queueing ---------------------------------------------------------------------------------------------
    def submit(self, peer: Peer, rid: int, value: Any, deadline: float, nbytes: int = 0) -> Optional[errors.ServerError]:
        """Queue one item; or the error it gets at once (queue full, or it would wait past its deadline)."""
        if isinstance(value, wire.PayloadError):
            log.error("an item from an HTTP worker cannot be read here: %s", value)
            return errors.ResultUnusable("The item made for run_batch() cannot be read in the model process "
                                         f"({value}).")
        traceparent = None
        if isinstance(value, Carried):
            value, traceparent = value
        try:
            if isinstance(value, RequestSnapshot):
                value = value.request()
        except Exception:  # noqa: BLE001 - this item fails alone
            log.exception("could not rebuild a request for run_batch()")
            return errors.InternalError()
        with self.ready:
            if len(self.queue) >= self.queue_max or self.queued_bytes + nbytes > self.queue_bytes:
                return errors.Overloaded(f"The server is busy: {len(self.queue)} requests "
                                         f"({self.queued_bytes >> 20} MiB) already wait for the model. "
                                         "Retry after a short pause.")
            now = time.monotonic()
            batches_until_done = len(self.queue) // self.batch_max + (2 if self.current else 1)
            if now + batches_until_done * self.batch_s > deadline:
                return errors.Overloaded("The server is busy: this request would wait past its scoring timeout. "
                                         "Retry after a short pause.")
            self.queue.append(item := _Item(peer, rid, value, now, deadline, nbytes))
            self.policy.arrived(now)
            item.traceparent = traceparent
            self.queued_bytes += nbytes
            self.ready.notify()
        return None

    def take_batch(self, wait_s: float = 0.5) -> list[_Item]:
        """The next batch: waiting up to `wait_s` for a first item, then as long as the batching policy says
        others are about to join (server/batching.py). Items whose deadline already passed are answered 503."""
        called = time.monotonic()  # the model is idle from now
        with self.ready:
            if not self.queue:
                if wait_s > 0:
                    self.ready.wait(wait_s)
                if not self.queue:
                    return []
            free = max(self.queue[0].arrived, called)
            while not (decision := self.policy.decide(self.queue)).take:
                self.ready.wait(decision.until - time.monotonic())
            queued = len(self.queue)
            batch = [self.queue.popleft() for _ in range(decision.take)]
            self.queued_bytes -= sum(item.nbytes for item in batch)
            self.policy.dispatched(batch, queued)
            self.policy_wait_s = max(0.0, time.monotonic() - free)
        now = time.monotonic()
        late = [item for item in batch if item.deadline <= now]
        if late:  # its deadline passed while it queued: the server was too busy, the model never saw it
            self._answer([(item, False, errors.Overloaded(
                "The server is busy: this request waited past its scoring timeout. Retry after a short pause."))
                for item in late], 0.0, 0)
        return [item for item in batch if item.deadline > now]

    def step(self, wait_s: float = 0.5) -> int:
        """Form one batch and score it; returns how many requests it held."""
        batch = self.take_batch(wait_s)
        if batch:
            self._score(batch)
        return len(batch)

    def _score(self, batch: list[_Item]) -> None:
        n = len(batch)
        values = [item.value for item in batch]
        values += _padding(values[-1], self.padded(n) - n)
        self.current = batch
        started = time.monotonic()
        span = self.tracing.batch([item.traceparent for item in batch], [item.arrived for item in batch], n,
                                  len(values)) if self.tracing is not None else None
        try:
            returned = self.run_batch(values)
            if isinstance(returned, (str, bytes, dict, set, frozenset)) or not hasattr(returned, "__iter__"):
                raise TypeError(f"run_batch() returned a {type(returned).__name__}, not a list of results in the "
                                "order of its inputs")
            outputs = list(returned)
            if len(outputs) != len(values):  # too many is as wrong as too few: the results may not be the inputs'
                raise ValueError(f"run_batch() returned {len(outputs)} results for {len(values)} inputs")
            outputs = outputs[:n]  # the padding's results are dropped
        except BaseException as ex:  # noqa: B036 - a failing script must not end the model process
            log.exception("run_batch() raised; failing the %d requests of this batch", n)
            outputs = [ex] * n
        finally:
            with self.stall_lock:
                self.current = []
                if self.stalled:
                    self._stall(False)
            if span is not None:
                span.end()
        elapsed = time.monotonic() - started
        self.batch_s = elapsed if not self.batch_s else 0.8 * self.batch_s + 0.2 * elapsed
        results = []
        for item, output in zip(batch, outputs):
            if isinstance(output, BaseException):
                if isinstance(output, (errors.ServerError, HTTPException)):  # its status, as from preprocess()
                    results.append((item, False, output))
                    continue
                log.error("run_batch() failed one item: %r", output)
                results.append((item, False, errors.script_error(output)))
            elif isinstance(output, flask.Response):
                try:  # its body is read here: a stream that fails, or a file in passthrough mode, fails alone
                    results.append((item, True, ResponseData.of(output)))
                except Exception as ex:  # noqa: BLE001 - whatever reading the script's Response raises
                    log.error("run_batch()'s Response for one request cannot be read: %r", ex)
                    results.append((item, False, errors.ResultUnusable(
                        f"run_batch()'s Response for this request cannot be read ({type(ex).__name__}: {ex}).")))
            else:
                results.append((item, True, output))
        with self.ready:  # before the answers: a client back at once is the first return of this batch's burst
            self.policy.finished(len(values), elapsed, n + len(self.queue))
        self._answer(results, elapsed * 1000, len(values))
        with self.ready:
            self.policy.learn()
        if self.observe:  # after the answers: they do not wait for the metrics
            self.observe(len(values), elapsed, [started - item.arrived for item in batch], self.policy_wait_s,
                         self.policy)

    def _answer(self, results: list[tuple[_Item, bool, Any]], run_ms: float, size: int) -> None:
        """Send each item's answer once (by its result, or by its deadline: a late result is never sent), the
        answers for one HTTP worker together in one write."""
        by_peer: dict[Peer, list[Answer]] = {}
        with self.answer_lock:
            for item, ok, payload in results:
                if not item.answered:
                    item.answered = True
                    by_peer.setdefault(item.peer, []).append(Answer(item.rid, ok, payload, run_ms, size))
        for peer, answers in by_peer.items():
            try:
                peer.send(answers)
            except Exception:  # noqa: BLE001 - never out of the batching loop: the link goes, its worker answers 503
                log.exception("could not send answers to an HTTP worker: closing its link")
                peer.close()

    def stop_queue(self, error: errors.ServerError) -> None:
        """Answer everything still queued with `error` (a process that must exit answers what it holds)."""
        with self.ready:
            items, self.queue = list(self.queue), collections.deque()
            self.queued_bytes = 0
        self._answer([(item, False, error) for item in items], 0.0, 0)

    # --- the process ------------------------------------------------------------------------------------------
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
        stop_at: Optional[float] = None
        while True:
            if stop_at is None and not alive():
                serve_s = drain_plan(self.graceful_s).model_s
                stop_at = time.monotonic() + serve_s
                listener.close()
                log.info("model process %d stopping: serving its %d linked HTTP workers until they are done (at "
                         "most %.1f s, within --graceful-timeout)", os.getpid(), len(self.peers), serve_s)
            if stop_at is not None and (time.monotonic() >= stop_at or not (self.peers or self.queue)):
                break
            self.step(wait_s=0.1 if stop_at is not None else 0.5)
        self.stop_queue(errors.ModelUnavailable("The model process is stopping: retry shortly."))
        for peer in list(self.peers):
            peer.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                sock, _ = listener.accept()
            except OSError:
                return  # closed: stopping
            peer = Peer(sock, self.send_timeout_s)
            self.peers.add(peer)
            with self.stall_lock:
                if self.stalled:  # a worker linking during a stall (one restarted) is told too
                    peer.stalled(True)
            threading.Thread(target=self._read, args=(peer,), name="model-peer", daemon=True).start()

    def _read(self, peer: Peer) -> None:
        try:
            stream = peer.sock.makefile("rb", buffering=wire.READ_BUFFER)
            while True:
                frame = wire.receive(stream, self.queue_bytes)
                if frame.type != wire.Type.SCORE:
                    raise wire.WireError(f"an HTTP worker sent {frame.type.name}")
                error = self.submit(peer, frame.rid, frame.payload, frame.value, frame.nbytes)
                if error is not None:
                    peer.send([Answer(frame.rid, False, error)])
        except (EOFError, OSError):
            pass  # the HTTP worker exited, or its link was closed
        except BaseException:  # noqa: B036 - a broken stream ends this link only; its worker sees it and reconnects
            log.exception("unreadable frames from an HTTP worker: closing its link")
        finally:
            peer.close()
            self.peers.discard(peer)

    def _watch(self, heartbeat: Callable[[], None]) -> None:
        """Answers the items of a run_batch() that overran their deadline, and ends a process that stays stuck."""
        while True:
            time.sleep(0.05)
            try:
                heartbeat()
            except (OSError, ValueError):  # the worker is exiting: gunicorn closed the file it beats on
                return
            batch, now = self.current, time.monotonic()
            overdue = [item for item in batch if now >= item.deadline and not item.answered]
            if overdue:
                log.error("run_batch() passed the scoring timeout of %d ms", self.timeout_ms)
                self._answer([(item, False, errors.ScoringTimeout(self.timeout_ms)) for item in overdue], 0.0, 0)
                with self.stall_lock:
                    if self.current is batch and not self.stalled:
                        self._stall(True)
            if batch and now >= min(item.deadline for item in batch) + self.grace_s and self.current is batch:
                log.error("run_batch() has not returned %.0f s after the scoring timeout (--hung-grace): the model "
                          "process %d exits and the master starts another", self.grace_s, os.getpid())
                self.on_hung()
                self.stop_queue(errors.ModelUnavailable("The model process is restarting: retry shortly."))
                logging.shutdown()
                os._exit(EXIT_HUNG)

    def _stall(self, on: bool) -> None:
        """Under stall_lock."""
        self.stalled = on
        for peer in list(self.peers):
            peer.stalled(on)


def _ignore(sig: int, frame: Any) -> None:
    """A handler that does nothing (not SIG_IGN, which a process the script starts would inherit)."""


class ScoreWorker(Worker):
    """What both of scorehost's worker kinds (`front.FrontWorker`, `ModelWorker`) do with signals: SIGINT and
    SIGQUIT (Ctrl-C) stop them as SIGTERM does, answering what they accepted first. SIGHUP is the master's (a
    reload): gunicorn leaves it at its default in a worker, which ended the worker and every request it held when
    the whole process group got it (a closed terminal, a dropped ssh session, `kill -HUP -PGID`)."""

    def init_signals(self) -> None:
        super().init_signals()
        signal.signal(signal.SIGHUP, _ignore)

    def handle_quit(self, sig: int, frame: Any) -> None:
        self.handle_exit(sig, frame)


class ModelWorker(ScoreWorker):
    """The gunicorn worker class of a model slot: no HTTP, just the script's init() and the batching loop. The
    master (runner.ScoreArbiter) starts this class for a free model slot and fills in `slot` before the fork."""

    slot: Any = None  # runner.ModelSlot: index, socket path, GPU
    generation = 0
    replacement = False
    gpu: Optional[str] = None

    def load_wsgi(self) -> None:
        # The fork gave this process the HTTP listeners, which it never accepts on: held open, connections made
        # while the HTTP workers had stopped (a graceful stop) sat in the backlog until this process exited, and
        # were then reset unanswered. Closed at once, they are refused when no HTTP worker listens.
        for listener in self.sockets:
            listener.close()
        self.sockets = []
        self.wsgi = None
        self.script = self.app.boot(self.app.load_model_script, mark_ready=False)  # ready once warm, in serve()

    def run(self) -> None:
        from .metrics import Metrics

        s = self.app.settings
        metrics = Metrics()
        server = ModelServer(self.script.run_batch, batch_max=s.batch_max, delay_ms=s.batch_delay_ms,
                             sizes=s.batch_sizes, queue_max=s.batch_queue, queue_bytes=s.batch_queue_bytes,
                             timeout_ms=s.scoring_timeout_ms, grace_s=s.hung_grace, send_timeout_s=s.send_timeout,
                             graceful_s=s.graceful_timeout, observe=metrics.observe_batch,
                             on_hung=metrics.restarts.labels("hung run_batch()").inc)
        server.tracing = start_tracing(s)
        warmup = getattr(self.script.module, "warmup_item", None)
        if server.sizes and callable(warmup):
            server.warm(warmup())
        elif server.sizes:
            log.warning("batches are padded to the sizes %s (--batch-sizes, or its GPU default), but %s has no "
                        "warmup_item(): each size is tuned on its first use", ",".join(map(str, server.sizes)),
                        self.script.path)
        server.serve(self.slot.socket_path, self.notify, lambda: self.alive and self.ppid == os.getppid(),
                     on_listening=self.app.boots.mark_ready)


# --- the HTTP worker's side -------------------------------------------------------------------------------------

class _Pending:
    __slots__ = ("done", "frame")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.frame: Optional[wire.Frame] = None  # None once done: the link went down


class _Link:
    """This HTTP worker's connection to one model process. A keeper thread connects it, and reconnects it after a
    restart; `up` is read without a lock (readiness is answered on the event loop, which must never wait)."""

    def __init__(self, path: str, send_timeout_s: float):
        self.path = path
        self.send_timeout_s = send_timeout_s
        self.sock: Optional[socket.socket] = None
        self.send_lock = threading.Lock()  # one frame at a time on the socket
        self.connect_lock = threading.Lock()
        self.pending_lock = threading.Lock()
        self.pending: dict[int, _Pending] = {}
        self.stalled = False  # its model process says a run_batch() is past a scoring timeout (wire.Type.STALLED)
        self.wake = threading.Event()
        threading.Thread(target=self._keep, name="model-link", daemon=True).start()

    @property
    def up(self) -> bool:
        return self.sock is not None

    def _keep(self) -> None:
        while True:
            self._connect()
            self.wake.wait(LINK_RETRY_S)
            self.wake.clear()

    def _connect(self) -> Optional[socket.socket]:
        """The link's socket, connected now if it is down and the model process listens (None if not)."""
        with self.connect_lock:
            if self.sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(1.0)  # a model process whose backlog is full must not hold this thread
                try:
                    sock.connect(self.path)
                except OSError:
                    sock.close()
                    return None
                sock.settimeout(None)
                wire.set_send_timeout(sock, self.send_timeout_s)
                self.sock = sock
                threading.Thread(target=self._receive, args=(sock,), name="model-link-reader", daemon=True).start()
            return self.sock

    def send(self, rid: int, parts: list[Any], pending: _Pending, deadline: float) -> bool:
        """Send one item; False when the deadline passed while other sends held the link."""
        sock = self.sock or self._connect()  # a request never fails for a link that could be up
        if sock is None:
            raise errors.ModelUnavailable()
        if not self.send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            with self.pending_lock:
                if sock is not self.sock:
                    raise errors.ModelUnavailable()
                self.pending[rid] = pending
            wire.send(sock, parts)
            return True
        except OSError as ex:
            log.warning("the link to model process %s failed a send (%s): dropping it", self.path, ex)
            self._drop(sock)
            raise errors.ModelUnavailable() from None
        finally:
            self.send_lock.release()

    def forget(self, rid: int) -> None:
        with self.pending_lock:
            self.pending.pop(rid, None)

    def _receive(self, sock: socket.socket) -> None:
        try:
            stream = sock.makefile("rb", buffering=wire.READ_BUFFER)
            while True:
                frame = wire.receive(stream, 1 << 40)
                if frame.type == wire.Type.STALLED:
                    with self.pending_lock:
                        if sock is self.sock:  # not a frame of a link already dropped: it would outlive it
                            self.stalled = frame.value > 0
                    continue
                with self.pending_lock:
                    pending = self.pending.pop(frame.rid, None)
                if pending is not None:
                    pending.frame = frame
                    pending.done.set()
        except (EOFError, OSError, wire.WireError) as ex:
            log.info("the link to model process %s is down (%s)", self.path, ex or type(ex).__name__)
        except BaseException:  # noqa: B036 - whatever happens, the link is dropped below and its requests answered
            log.exception("the link to model process %s failed", self.path)
        finally:
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        """The model process went away (or the link broke): every request waiting on it is answered 503 now, and
        the keeper reconnects."""
        with self.pending_lock:
            if sock is not self.sock:
                return
            self.sock = None
            self.stalled = False  # a new model process is not stalled
            waiting, self.pending = self.pending, {}
        try:
            sock.shutdown(socket.SHUT_RDWR)  # a send blocked on it fails now
        except OSError:
            pass
        sock.close()
        for pending in waiting.values():
            pending.done.set()  # frame None: unavailable
        self.wake.set()


class ModelClient:
    """How an HTTP worker scores an item: send it to the least busy model process and wait for its answer, until
    the request's scoring deadline."""

    def __init__(self, paths: list[str], timeout_ms: int, item_max_bytes: int = 1 << 62,
                 send_timeout_s: float = 30.0):
        self.links = [_Link(path, send_timeout_s) for path in paths]
        self.timeout_ms = timeout_ms
        self.item_max_bytes = item_max_bytes
        self._ids = itertools.count()

    def ready(self) -> bool:
        """Every model process linked, and none with a run_batch() past a scoring timeout; never blocks."""
        return all(link.up and not link.stalled for link in self.links)

    def submit(self, value: Any, deadline: Optional[float] = None) -> Timed:
        if deadline is None:
            deadline = time.monotonic() + self.timeout_ms / 1000
        rid = next(self._ids)
        try:
            parts = wire.encode(wire.Type.SCORE, rid, value, deadline)
        except wire.PayloadError as ex:
            log.error("the item made for run_batch() cannot be sent to the model process: %s", ex)
            raise errors.ResultUnusable(f"The item made for run_batch() cannot be sent to the model process ({ex}).")
        size = wire.frame_bytes(parts)
        if size > self.item_max_bytes:
            raise errors.ItemTooLarge(f"The item made for run_batch() from this request is {size} bytes; a model "
                                      f"process takes at most {self.item_max_bytes} (--batch-queue-bytes).")
        link = min(self.links, key=lambda candidate: (not candidate.up, len(candidate.pending)))
        pending = _Pending()
        if not link.send(rid, parts, pending, deadline) or not pending.done.wait(max(0.0, deadline - time.monotonic())):
            link.forget(rid)  # the worker's loop answered it at the deadline already
            raise errors.ScoringTimeout(self.timeout_ms)
        frame = pending.frame
        if frame is None:
            raise errors.ModelUnavailable()
        if isinstance(frame.payload, wire.PayloadError):
            log.error("run_batch()'s result for one request cannot be read in this HTTP worker: %s", frame.payload)
            raise errors.ResultUnusable("run_batch()'s result for this request cannot be read back "
                                        f"({frame.payload}).")
        if frame.type == wire.Type.ERROR:
            raise frame.payload if isinstance(frame.payload, (errors.ServerError, HTTPException)) \
                else errors.InternalError()
        output = frame.payload.response() if isinstance(frame.payload, ResponseData) else frame.payload
        return Timed(output, frame.value)
