"""The HTTP front: a gunicorn worker class whose event loop owns every connection, and app threads that answer.

gunicorn's master still forks, supervises, pins and replaces workers (`runner`). Inside a worker:
- one loop thread (epoll) accepts connections, reads them, and owns each connection's state (`connection.Connection`:
  parser, buffers, deadlines); it alone changes them, so no connection state is shared between threads;
- a complete request goes to an app thread (`--threads`), which runs the Flask app and hands the finished answer
  back to the loop through one queue with a wake-up (gunicorn gthread's PollableMethodQueue, uvicorn's
  single-threaded protocol). The loop writes it;
- an answer the app streams (no Content-Length: a generator) goes to the loop part by part (`_stream`), each once
  the one before it is written, chunked, as gunicorn writes it for Azure ML's server. Its app thread is held until
  the stream ends, as Azure ML's sync worker is: a client that reads it slowly (each part within `send_timeout`)
  holds a thread, unlike any other answer;
- `GET /` and `GET /ready` are answered by the loop itself (readiness is a cached flag: nothing there can block);
  `/metrics` by a side thread of its own, so a scrape waits neither behind run() nor blocks the loop.
What that buys, measured in bench/RESULTS.md (section 6), against gunicorn's gthread worker and granian:
- a slow, silent or idle client holds a file descriptor, never a thread. A request that stops arriving is answered
  408 after `read_timeout`; an idle keep-alive connection is closed after `keepalive`; an answer the client does
  not read is dropped after `send_timeout`;
- back-pressure instead of buffering: a connection is not read while its request is answered, and the body bytes
  a worker holds are bounded (`--max-body-bytes-in-flight`: past it, 503 before the body is read);
- a request the app would refuse on its head alone (wrong key, body over the limit) is answered without reading its
  body, and `Expect: 100-continue` gets its 100 only when the app would take the body;
- nothing accepted is dropped: a worker that must exit (a hung call past `--hung-grace`, the end of a graceful
  stop) first stops accepting, answers every request it holds (503 + Retry-After where no answer is ready), and
  finishes writing them. On a stop it acts at once: what the kernel already accepted into the backlog is taken,
  a new connection's first request is waited for (up to DRAIN_IDLE_S) and a kept-alive one's next (until its
  keep-alive deadline, then answered with a close), so a client that sends in that moment gets an answer or a
  refusal, never a reset.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import queue
import re
import resource
import select
import socket
import threading
import time
import uuid
from email.utils import formatdate
from typing import Any, Callable, Optional

from . import errors
from .app import ANSWER_CLAIM, BODY_ERROR, DEADLINE, LATE, REQUEST_ID, TIMED_OUT
from .body import WHOLE_BODY
from .connection import BUSY, CLOSED, CLOSING, STREAMING, WRITING, Connection, Limits, Request, Stream
from .model_process import EXIT_HUNG, ScoreWorker
from .settings import drain_plan
from .telemetry import TRACE

log = logging.getLogger("scorehost.front")
access_log = logging.getLogger("scorehost.access")

RECV_SIZE = 256 * 1024
DRAIN_IDLE_S = 1.0  # on SIGTERM, how long a connection that sent nothing yet may still send its request
TICK_S = 0.25  # how often deadlines are checked and the master is told this worker is alive
EVACUATE_S = 5.0  # an exiting worker's last answers get this long to be written
HUNG_DRAIN_S = 5.0  # a worker with a stuck call lets its other requests finish this long before it exits
# What an app thread hands the loop through `done`: a whole answer, or a streamed one's first part (its head), a
# later part, or its end.
WHOLE, FIRST, PART, END = range(4)
ACCEPT_PAUSE_S = 0.5  # out of descriptors: accept() rests this long, instead of spinning on the failure
SHARE_RECHECK_S = 0.005  # a worker leaving new connections to a less loaded one looks again this often
# Answered by the loop thread itself: nothing they do can block. HEAD too: a probe may send it (it waited behind a
# hung run() for the scoring timeout, while GET answered at once).
LOOP_ROUTES = {("GET", "/"), ("HEAD", "/"), ("GET", "/ready"), ("HEAD", "/ready")}
# Answered by the side thread: never queued behind a long run(), never on the loop.
SIDE_ROUTES = {("GET", "/metrics"), ("HEAD", "/metrics")}


class SocketTransport:
    """A connection's socket, registered in its worker's epoll; used by the loop thread only."""

    __slots__ = ("worker", "sock", "fd", "events")

    def __init__(self, worker: "FrontWorker", sock: socket.socket):
        self.worker, self.sock, self.fd = worker, sock, sock.fileno()
        self.events = select.EPOLLIN | select.EPOLLRDHUP
        worker.epoll.register(self.fd, self.events)

    def send(self, data: memoryview) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    def _set(self, flag: int, on: bool) -> None:
        events = (self.events | flag) if on else (self.events & ~flag)
        if events != self.events:
            self.events = events
            self.worker.epoll.modify(self.fd, events)

    def reading(self, on: bool) -> None:
        self._set(select.EPOLLIN | select.EPOLLRDHUP, on)

    def writing(self, on: bool) -> None:
        self._set(select.EPOLLOUT, on)

    def shutdown_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.worker.forget(self.fd)
        try:
            self.worker.epoll.unregister(self.fd)
        except (OSError, ValueError):
            pass
        self.sock.close()


class FrontWorker(ScoreWorker):
    """gunicorn worker: one epoll loop thread that owns all sockets, `threads` app threads, one side thread."""

    # Set by the master before the fork (runner.ScoreServer._pre_fork).
    generation = 0
    share_slot = 0
    wait_for_models = False  # a reload's worker takes traffic once its generation's model processes answer
    replacement = False
    gpu: Optional[str] = None

    stop_asked: Optional[float] = None  # when SIGTERM (or SIGINT, SIGQUIT) came: the master's clock starts then

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.alive = False
        self.stop_asked = self.stop_asked or time.monotonic()

    def init_process(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # every idle keep-alive connection is one descriptor: allow as many as the system does
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        super().init_process()

    def run(self) -> None:
        settings = self.app.settings
        self.limits = Limits(read_timeout=float(settings.read_timeout), send_timeout=float(settings.send_timeout),
                             keepalive=float(settings.keepalive), max_body_bytes=int(settings.max_body_bytes))
        self.timeout_s = settings.scoring_timeout_ms / 1000
        scorehost = self.wsgi.extensions["scorehost"]
        self._admits_body: Callable[[str, Optional[str], Optional[int]], bool] = scorehost["admits_body"]
        self.log_access = bool(settings.access_log)
        self.hung_grace_s = float(settings.hung_grace)
        self.worker_timeout_s = float(settings.worker_timeout)
        self.body_budget = int(settings.max_body_bytes_in_flight)
        self.body_bytes = 0  # loop-owned: body bytes of the requests this worker holds
        self.metrics = scorehost["metrics"]
        self.tracing = scorehost["tracing"]  # telemetry.Tracing, or None: off
        self.shares: ConnectionShares = self.app.shares
        self.conns: dict[int, Connection] = {}
        self.overdue: set[Request] = set()  # answered at their deadline while their app thread is still out
        self.hung = ""  # why this worker must exit, once a call stays stuck past --hung-grace
        self.write_s = EVACUATE_S  # how long the last answers get to be written before the worker exits
        self.work: "queue.SimpleQueue[Optional[tuple[Connection, Request]]]" = queue.SimpleQueue()
        self.side: "queue.SimpleQueue[Optional[tuple[Connection, Request]]]" = queue.SimpleQueue()
        self.done: "queue.SimpleQueue[tuple[Connection, Request, bytes, bool]]" = queue.SimpleQueue()
        self.wake_pending = False  # a wake-up byte is on its way to the loop
        self.epoll = select.epoll()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.epoll.register(self.wake_r.fileno(), select.EPOLLIN)
        self.epoll.register(self.PIPE[0], select.EPOLLIN)  # gunicorn's signal wake-up pipe
        self.listeners = {}
        for listener in self.sockets:
            listener.setblocking(False)
            self.listeners[listener.fileno()] = listener
        self.accepting = False
        self.served = False  # it has accepted connections (see _stop_accepting)
        self.accept_paused_until = 0.0  # out of descriptors: accept() rests until then
        self.yielding = False  # more connections than the least loaded worker: accept() waits until it is not
        self.accept_failures = 0
        self.base_environ = {
            "SERVER_NAME": str(self.sockets[0].cfg_addr[0]) if self.sockets else "",
            "SERVER_PORT": str(self.sockets[0].cfg_addr[1]) if self.sockets else "",
            "SCRIPT_NAME": os.environ.get("SCRIPT_NAME", ""),
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": _LogStream(log),
            "wsgi.multithread": True, "wsgi.multiprocess": self.cfg.workers > 1, "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        threads = [threading.Thread(target=self._app_thread, args=(self.work,), name=f"app-{i}", daemon=True)
                   for i in range(max(1, self.cfg.threads))]
        threads.append(threading.Thread(target=self._app_thread, args=(self.side,), name="side", daemon=True))
        for thread in threads:
            thread.start()
        if self.wait_for_models:
            self._wait_until_ready(scorehost["ready"])
        if self.alive:  # a reload's worker stopped before its model processes answered never takes traffic
            self._accepting(True)
        self._loop()

    def _wait_until_ready(self, ready: Callable[[], bool]) -> None:
        """A reload's worker takes traffic only once its generation's model processes answer: meanwhile the old
        workers serve (runner.ScoreArbiter)."""
        while self.alive and not ready():
            self.notify()
            time.sleep(0.1)

    # --- hooks the connections call (loop thread) --------------------------------------------------------------
    def admits_body(self, path: str, authorization: Optional[str], content_length: Optional[int]) -> bool:
        return self._admits_body(path, authorization, content_length)

    def reserve_body(self, size: int, own: int) -> bool:
        if self.body_bytes - own and self.body_bytes + size > self.body_budget:
            return False  # a request alone always passes, whatever its size within --max-body-bytes
        self.body_bytes += size
        return True

    def release_body(self, size: int) -> None:
        self.body_bytes -= size

    def keep_alive(self) -> bool:
        return self.alive

    def dispatch(self, conn: Connection, request: Request) -> None:
        # The router merges repeated slashes (`//ready` is `/ready`): so do the probes' routes.
        route = (request.method, request.path if "//" not in request.path else re.sub("/{2,}", "/", request.path))
        if route in LOOP_ROUTES:
            head, body, close, _ = self._respond(conn, request)  # the probes' answers are never streamed
            conn.answer(request, head, body, close)
        else:
            request.dispatched = time.perf_counter()
            if route in SIDE_ROUTES:
                self.side.put((conn, request))
                return
            if self.tracing is not None:
                request.trace = self.tracing.begin(request.method, request.path, request.headers, request.started)
            self.work.put((conn, request))

    # --- the loop thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        next_tick = 0.0
        drain_until: Optional[float] = None
        while True:
            now = time.monotonic()
            if now >= next_tick or (not self.alive and drain_until is None):  # a stop acts at once, not next tick
                next_tick = now + TICK_S
                self.notify()
                for conn in list(self.conns.values()):
                    conn.tick(now)
                self._overdue(now)
                if self.ppid != os.getppid():
                    log.info("master %d is gone: worker %d exits", self.ppid, os.getpid())
                    self.alive = False
                if not self.accepting and self.listeners and now >= self.accept_paused_until and self.alive:
                    self._accepting(True)
                if not self.alive and drain_until is None:
                    # Stopping (SIGTERM, a reload, a hung call): take nothing new, finish what is held, then go:
                    # before the master's SIGKILL at --graceful-timeout, with time left to write the last answers.
                    if self.hung:
                        drain_until, self.write_s = now + min(self.cfg.graceful_timeout, HUNG_DRAIN_S), EVACUATE_S
                    else:
                        plan = drain_plan(self.cfg.graceful_timeout)
                        drain_until, self.write_s = (self.stop_asked or now) + plan.http_s, plan.write_s
                    self._stop_accepting()
                    for conn in self.conns.values():
                        conn.drain(DRAIN_IDLE_S)
            # Every turn, not every tick: at drain_until the exit's write window starts at once (a tick late, it
            # could end past the master's SIGKILL with a short --graceful-timeout).
            if drain_until is not None and (now >= drain_until or
                                            not any(c.busy or c.awaited(now) for c in self.conns.values())):
                self._evacuate(self.hung or "the server is stopping")
                if self.hung:
                    logging.shutdown()
                    os._exit(EXIT_HUNG)
                return
            if self.yielding and (not self.alive or self.shares.may_accept(self.share_slot, len(self.conns))):
                self.yielding = False
                if self.alive and self.listeners and now >= self.accept_paused_until:
                    self._accepting(True)
            timeout = SHARE_RECHECK_S if self.yielding else TICK_S
            self._poll(timeout if drain_until is None else max(0.0, min(timeout, drain_until - now)))

    def _poll(self, timeout: float) -> None:
        for fd, events in self.epoll.poll(timeout):
            conn = self.conns.get(fd)
            if conn is not None:
                try:
                    if events & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
                        self._read(conn, events)
                    if events & select.EPOLLOUT and conn.state != CLOSED:
                        conn.writable()
                except Exception:  # noqa: BLE001 - one connection's failure must never end the loop
                    log.exception("closing a connection after an unexpected error")
                    conn.close()
            elif fd in self.listeners:
                self._accept(self.listeners[fd])
            elif fd == self.wake_r.fileno():
                self._answers()
            else:  # gunicorn's signal pipe: the handler already ran and the tick acts on it; empty it, or it stays
                _drain(self.PIPE[0])  # readable and the loop spins

    def _accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        if on:
            self.served = True
            self.shares.publish(self.share_slot, len(self.conns))  # counted from now on (ConnectionShares)
        for fd in self.listeners:
            if on:  # every worker wakes; the least loaded accepts (ConnectionShares)
                self.epoll.register(fd, select.EPOLLIN)
            else:
                self.epoll.unregister(fd)

    def _accept(self, listener: socket.socket) -> None:
        """Take a new connection only while no worker holds fewer (`ConnectionShares`): keep-alive connections
        then spread evenly over the workers instead of piling onto whichever woke first."""
        if not self.alive:
            return
        if not self.shares.may_accept(self.share_slot, len(self.conns)):
            self._accepting(False)  # another worker takes this one; look again every SHARE_RECHECK_S, not spinning
            self.yielding = True
            return
        try:
            sock, peer = listener.accept()
        except BlockingIOError:
            return
        except OSError as ex:
            if ex.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # Out of descriptors: the connections wait in the backlog; accept() rests instead of spinning.
                self._accepting(False)
                self.accept_paused_until = time.monotonic() + ACCEPT_PAUSE_S
                self.accept_failures += 1
                if self.accept_failures == 1 or self.accept_failures % 100 == 0:
                    log.warning("accept failed (%s, %d times so far): pausing accept() for %.1f s; raise the "
                                "descriptor limit (ulimit -n) for more connections", ex.strerror,
                                self.accept_failures, ACCEPT_PAUSE_S)
            else:
                log.warning("accept failed: %s", ex)
            return
        self._adopt(sock, peer)

    def _adopt(self, sock: socket.socket, peer: Any) -> None:
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a Unix socket
        conn = Connection(SocketTransport(self, sock), self, self.limits, peer=peer)
        self.conns[sock.fileno()] = conn
        self.shares.publish(self.share_slot, len(self.conns))

    def _take_backlog(self) -> None:
        """Stopping: the connections the kernel completed before the listeners close are this worker's to answer
        (closed with the listener, they were reset unanswered: a client that connected in the moment after SIGTERM
        got a reset, neither an answer nor a refusal). Each is taken as a new connection, which the worker waits for
        until its request comes (`Connection.awaited`) and answers before it goes."""
        for listener in self.listeners.values():
            while True:
                try:
                    sock, peer = listener.accept()
                except OSError:  # BlockingIOError: the backlog is empty; anything else: take no more
                    break
                self._adopt(sock, peer)

    def forget(self, fd: int) -> None:
        """A connection closed (its transport calls this)."""
        if self.conns.pop(fd, None) is not None:
            self.shares.publish(self.share_slot, len(self.conns))

    def _read(self, conn: Connection, events: int) -> None:
        if not conn.reading:
            if events & (select.EPOLLHUP | select.EPOLLERR):
                conn.close()  # reset or gone both ways while its request is answered: no answer can reach it
            else:
                conn.pause_socket()  # input while its request is answered: leave it in the socket for now
            return
        try:
            data = conn.transport.sock.recv(RECV_SIZE)  # type: ignore[attr-defined]
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            conn.received(data)
        else:
            conn.ended()

    def _answers(self) -> None:
        """Finished answers from the app threads, handed over through `done`."""
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        # After the bytes are read and before the queue is: an answer queued from now on sends its own wake-up, and
        # one queued before (which saw the flag still set and sent none) is in the queue drained below.
        self.wake_pending = False
        while True:
            try:
                conn, request, head, data, close, kind = self.done.get_nowait()
            except queue.Empty:
                return
            if kind in (PART, END):
                if conn.state == CLOSED or not conn.part(request, data, kind == END, close):
                    request.stream.end()  # closed meanwhile, or evacuated: its producer stops
                continue
            request.returned = True
            if request.answered and request in self.overdue:
                log.warning("dropped the late answer of a call that passed the scoring timeout")
            if conn.state == CLOSED or not conn.answer(request, head, data, close, streamed=kind == FIRST):
                if kind == FIRST:
                    request.stream.end()
                continue
            self.metrics.stages["write"].observe(time.perf_counter() - request.responded)
            if request.trace is not None:
                request.trace.end(request.responded)

    def _overdue(self, now: float) -> None:
        """In the loop: a call past its scoring deadline is answered now (by the app, so the 500 is Azure ML's,
        with every contract header), whatever its thread is stuck in; still stuck `hung_grace` later, the worker
        answers everything it holds and exits, and the master starts another. Python code is interrupted at the
        deadline already (invoke.py): this is for calls blocked in native code or that ignore the interruption."""
        for conn in list(self.conns.values()):
            request = conn.current
            if conn.state == BUSY and request is not None and not request.answered and now >= request.deadline:
                head, body, close, _ = self._respond(conn, request, timed_out=True)
                conn.answer(request, head, body, close)  # the requests pipelined behind it are answered after it
                self.overdue.add(request)
                if request.trace is not None:  # its late answer will be dropped: the trace ends with this one
                    request.trace.end(time.perf_counter())
            elif conn.state == STREAMING and now - conn.streaming_since >= self.worker_timeout_s and not self.hung:
                self._hung(f"a streamed answer has made no part for {self.worker_timeout_s:.0f} s (--worker-timeout)",
                           "hung stream")
        for request in list(self.overdue):
            if request.returned:
                self.overdue.discard(request)
            elif now >= request.deadline + self.hung_grace_s and not self.hung:
                self._hung(f"a call has not returned {self.hung_grace_s:.0f} s after the scoring timeout "
                           "(--hung-grace)", "hung run()")

    def _hung(self, why: str, kind: str) -> None:
        """An app thread is stuck for good: the worker answers everything it holds and exits, and the master starts
        another (as gunicorn's --timeout would end a sync worker, but answering first)."""
        log.error("%s: worker %d finishes what it holds and exits; the master starts another", why, os.getpid())
        self.metrics.restarts.labels(kind).inc()
        self.hung = "a call in this worker is stuck and the worker is restarting"
        self.alive = False

    def _evacuate(self, why: str) -> None:
        """Answer every request still held here (503 + Retry-After where no answer is ready), and write the
        answers for up to EVACUATE_S."""
        self._stop_accepting()
        error = errors.ModelUnavailable(f"Not answered: {why}. Retry shortly.")
        for conn in list(self.conns.values()):
            conn.evacuate(lambda _request: errors.raw_error_response(error))
        # Write them, and read what the clients still send until they close (exiting with unread bytes would reset
        # the connection and could destroy answers not yet read), within the time left.
        until = time.monotonic() + self.write_s
        while any(conn.state in (WRITING, STREAMING, CLOSING) for conn in self.conns.values()) and \
                time.monotonic() < until:
            self._poll(0.05)

    def _stop_accepting(self) -> None:
        self._accepting(False)
        # The backlog is taken by a worker that has served: not one stopping alone with a stuck call, nor a reload's
        # worker stopped before it was ready (a failed reload): they leave it to their healthy siblings.
        if self.served and not self.hung:
            self._take_backlog()
        for listener in self.listeners.values():
            listener.close()
        self.listeners = {}

    def _wake(self) -> None:
        try:
            self.wake_w.send(b"x")
        except BlockingIOError:
            pass  # already awake

    # --- app threads -------------------------------------------------------------------------------------------
    def _app_thread(self, work: "queue.SimpleQueue[Optional[tuple[Connection, Request]]]") -> None:
        while True:
            item = work.get()
            if item is None:
                return
            conn, request = item
            if request.answered:
                continue  # answered meanwhile (evacuated)
            # what a timed-out answer (_overdue) shares with this run: the request's id and who answered first
            request.app_shared = (str(uuid.uuid4()), threading.Lock())
            request.deadline = time.monotonic() + self.timeout_s  # its one scoring deadline starts now
            self.metrics.stages["queue"].observe(time.perf_counter() - request.dispatched)
            if request.trace is not None:
                request.trace.stage("queue", request.dispatched)
            streamed = None
            try:
                head, body, close, streamed = self._respond(conn, request)
            except BaseException:  # noqa: B036 - nothing may kill an app thread
                log.exception("error while answering a request")
                (head, body), close = errors.raw_error_parts(errors.InternalError()), True
            if os.getpid() != self.pid:  # a child that run() forked, back here: not this worker (it held its port)
                os._exit(0)
            request.responded = time.perf_counter()
            if streamed is None:
                self._hand(conn, request, body, close, WHOLE, head)
                continue
            try:
                self._stream(conn, request, head, body, close, streamed)
            except BaseException:  # noqa: B036 - nothing may kill an app thread
                log.exception("error while streaming an answer")

    def _hand(self, conn: Connection, request: Request, data: bytes, close: bool, kind: int,
              head: bytes = b"") -> None:
        """From an app thread to the loop: an answer (its head, but Connection, and its body), or a part of one
        (`kind`)."""
        self.done.put((conn, request, head, data, close, kind))
        if not self.wake_pending:  # the loop drains every queued answer per wake-up: one byte is enough
            self.wake_pending = True
            self._wake()

    def _respond(self, conn: Connection, request: Request,
                 timed_out: bool = False) -> tuple[bytes, bytes, bool, Optional["_Streamed"]]:
        """The app's answer: (head but its Connection line, which the connection adds, body, close wanted, None),
        or for an answer the app streams (no Content-Length: a generator, as Flask's `Response(gen())`) its head,
        what it wrote so far, and the rest to stream (`_stream`), chunked (HTTP/1.0: until the close), as Azure ML's
        gunicorn sends it. A close is wanted by the client, the app or the settings; the connection adds the
        worker's stop."""
        environ = self._environ(conn, request)
        if timed_out:
            environ[TIMED_OUT] = True
        captured: list = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
            captured[:] = [status, headers]
            return written.append

        written: list[bytes] = []
        result = self.wsgi(environ, start_response)
        status, headers = captured or ("500 INTERNAL SERVER ERROR", [])  # Flask starts the answer before it returns
        code = int(status[:3])
        bodiless = request.method == "HEAD" or code < 200 or code in (204, 304)
        streamed = None if bodiless or not captured or any(n.lower() == "content-length" for n, _ in headers) \
            else _Streamed(result, request.version == "1.1", code)
        if streamed is None:
            try:
                chunks = written + [chunk for chunk in result if chunk]
            finally:
                if hasattr(result, "close"):
                    result.close()
            status, headers = captured
        close = not request.keep_alive or self.limits.keepalive <= 0 or (streamed is not None and not streamed.chunked)
        body = b"" if bodiless else b"".join(written if streamed else chunks)
        _check_head(status, headers)
        lines = [f"HTTP/1.1 {status}\r\n"]
        for name, value in headers:
            lname = name.lower()
            if lname == "connection":
                close = close or value.lower() == "close"
                continue
            if lname in ("transfer-encoding", "keep-alive") or (lname == "content-length" and not bodiless):
                continue  # framed below by the body's real length, whatever the app said
            lines.append(f"{name}: {value}\r\n")
        if streamed is not None:
            lines.append("Transfer-Encoding: chunked\r\n" if streamed.chunked else "")
            body = streamed.frame(body) if body else b""
        elif not bodiless:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append(f"Date: {_date()}\r\n")
        if self.log_access and streamed is None and not environ.get(LATE):
            self._log_access(conn, request, code, len(body))  # a streamed one's when it ends (_stream)
        return "".join(lines).encode("latin-1"), body, close, streamed  # latin-1 holds: _check_head refused the rest

    def _stream(self, conn: Connection, request: Request, head: bytes, first: bytes, close: bool,
                streamed: "_Streamed") -> None:
        """In the app thread: a streamed answer's parts, each handed to the loop once the one before it is written
        (back-pressure). A failure after the head is out cannot change the status: the connection is closed
        without the last chunk, which tells an HTTP/1.1 client the answer is incomplete (as gunicorn does)."""
        request.stream = handoff = Stream()
        self._hand(conn, request, first, close, FIRST, head)
        size, cut = len(first), True
        try:
            for chunk in streamed.iterable:
                if not chunk:
                    continue
                data = streamed.frame(chunk)  # before the wait's clear: a part that is no bytes ends the stream
                handoff.ready.wait()
                if handoff.gone:
                    break
                handoff.ready.clear()
                size += len(chunk)
                self._hand(conn, request, data, close, PART)
            else:
                cut = False
        except BaseException:  # noqa: B036 - nothing may kill an app thread
            log.exception("a streamed answer failed after its head was sent: its connection is closed")
        finally:
            try:
                if hasattr(streamed.iterable, "close"):
                    streamed.iterable.close()  # a generator's own finally, Flask's call_on_close: the script's code
            except BaseException:  # noqa: B036
                log.exception("closing a streamed answer failed: its connection is closed")
                cut = True
            handoff.ready.wait()  # set by the loop once the last part is written, or the connection is gone
            if not handoff.gone:
                self._hand(conn, request, b"" if cut else streamed.end(), close or cut, END)
        if self.log_access:
            self._log_access(conn, request, streamed.code, size)

    def _log_access(self, conn: Connection, request: Request, code: int, size: int) -> None:
        access_log.info('%s "%s %s HTTP/%s" %s %d %.1fms', conn.peer[0], request.method,
                        request.url.decode("latin-1"), request.version, code, size,
                        (time.perf_counter() - request.started) * 1000)

    def _environ(self, conn: Connection, request: Request) -> dict:
        environ = self.base_environ.copy()
        environ["REQUEST_METHOD"] = request.method
        environ["RAW_URI"] = request.url.decode("latin-1")
        environ["PATH_INFO"] = request.path
        environ["QUERY_STRING"] = request.query
        environ["SERVER_PROTOCOL"] = f"HTTP/{request.version}"
        environ["REMOTE_ADDR"], environ["REMOTE_PORT"] = str(conn.peer[0]), str(conn.peer[1])
        for name, value in request.headers:
            key = name.decode("latin-1").upper()
            if "_" in key:
                continue  # as gunicorn: an underscore could pose as a dash and smuggle a header past a proxy
            key = key.replace("-", "_")
            text = value.decode("latin-1")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            environ[key] = f"{environ[key]},{text}" if key in environ else text
        body = request.body
        environ["wsgi.input"] = io.BytesIO(body[0] if len(body) == 1 else b"".join(body))
        environ[WHOLE_BODY] = True
        environ[DEADLINE] = request.deadline
        if request.app_shared is not None:
            environ[REQUEST_ID], environ[ANSWER_CLAIM] = request.app_shared
        environ[TRACE] = request.trace
        if request.body_error:
            environ[BODY_ERROR] = request.body_error
        return environ


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")  # RFC 9110 field names, as gunicorn checks them
_FIELD_TEXT = re.compile(r"[\t\x20-\x7e\x80-\xff]*\Z")  # no CR, LF or other control: latin-1, as it is sent


def _check_head(status: str, headers: list) -> None:
    """The app's status line and fields go to the wire as they are: a CR or LF there (a reason or a header name the
    script built from the request) would split the answer and forge another (werkzeug checks header values only).
    Refused as gunicorn refuses them: the request gets a 500 instead."""
    if not (status[:3].isdigit() and status[3:4] in ("", " ") and _FIELD_TEXT.match(status)):
        raise ValueError(f"invalid status line from the app: {status!r}")
    for name, value in headers:
        if not (isinstance(name, str) and isinstance(value, str) and _TOKEN.match(name) and _FIELD_TEXT.match(value)):
            raise ValueError(f"invalid header field from the app: {name!r}: {value!r}")


class _Streamed:
    """The rest of a streamed answer: the app's iterable, and how its parts are framed on the wire."""

    __slots__ = ("iterable", "chunked", "code")

    def __init__(self, iterable: Any, chunked: bool, code: int):
        self.iterable, self.chunked, self.code = iterable, chunked, code

    def frame(self, data: bytes) -> bytes:
        if not isinstance(data, bytes):  # werkzeug encodes str; a dict yielded by mistake would reach the socket
            raise TypeError(f"a streamed answer's part must be bytes or str, not {type(data).__name__}")
        return b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data

    def end(self) -> bytes:
        return b"0\r\n\r\n" if self.chunked else b""


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


class ConnectionShares:
    """Open connections per worker, in memory shared by the master and its workers.

    The master gives each new worker a free slot before the fork (`assign`, gunicorn's pre_fork) and frees it when
    the worker exits (`release`); each worker publishes its own count, and accepts while it holds at most one more
    than the least loaded live worker. Without it, keep-alive clients that connect together land mostly on one
    worker (measured: 13 or all 16 of 16 connections on one of 4 workers) and stay there.
    """

    FREE = 1 << 30
    BOOTING = FREE - 1  # a slot taken by a worker that does not accept yet: not counted as the least loaded

    def __init__(self, slots: int = 256):
        import multiprocessing

        self.counts = multiprocessing.RawArray("i", [self.FREE] * slots)
        self.used = multiprocessing.RawValue("i", 0)  # slots handed out so far: the scan's bound

    def assign(self, arbiter: Any, worker: Any) -> None:
        slot = next(i for i, count in enumerate(self.counts) if count == self.FREE)
        self.counts[slot] = self.BOOTING  # until the worker accepts: the others must not wait for it
        self.used.value = max(self.used.value, slot + 1)
        worker.share_slot = slot

    def release(self, worker: Any) -> None:
        if isinstance(worker, FrontWorker):
            self.counts[worker.share_slot] = self.FREE

    def publish(self, slot: int, count: int) -> None:
        self.counts[slot] = count

    def may_accept(self, slot: int, count: int) -> bool:
        return count <= min(self.counts[: self.used.value]) + 1


class _LogStream:
    """wsgi.errors: what the app writes there goes to the log."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger

    def write(self, text: str) -> None:
        if text.strip():
            self.logger.error(text.rstrip())

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        pass


_date_cache = [0, ""]


def _date() -> str:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, formatdate(now, usegmt=True)]
    return _date_cache[1]
