"""The HTTP front: how bytes on a socket become one complete request for the app, and its answer bytes again.

A gunicorn worker class: gunicorn's master still forks, supervises, pins and replaces workers (`runner`). Inside a
worker, one thread runs an epoll loop that accepts connections and parses requests with httptools (llhttp, Node.js's
parser, in C). Only a request whose head *and* body have fully arrived is handed to an app thread, which runs the
Flask app and writes the answer straight to the socket (no hop back to the loop when it fits in the socket buffer).
What that buys, measured in bench/RESULTS.md (section 6), against gunicorn's gthread worker and granian:
- a slow, silent or idle client holds a file descriptor, never a thread: it cannot stall the server. A request that
  stops arriving is answered 408 after `read_timeout`; an idle keep-alive connection is closed after `keepalive`;
  an answer the client does not read is finished by the loop and dropped after `send_timeout`;
- a request the app would refuse on its head alone (wrong key, body over the limit) is answered without reading its
  body, and `Expect: 100-continue` gets its 100 only when the app would take the body;
- errors at the protocol level (bad framing, line or headers too long, timeouts) are JSON with a request id;
- per request, one C parse and two queue operations instead of gunicorn's Python parser and its thread-pool futures.
Requests on one connection are answered in order (pipelining): the next is handed over once the previous is answered.
"""

from __future__ import annotations

import collections
import io
import logging
import os
import queue
import resource
import select
import socket
import threading
import time
from email.utils import formatdate
from typing import Any, Callable, Optional
from urllib.parse import unquote_to_bytes

import httptools
from gunicorn.workers.base import Worker

from . import errors
from .app import BODY_ERROR, TIMED_OUT
from .model_process import EXIT_HUNG

log = logging.getLogger("scorehost.front")
access_log = logging.getLogger("scorehost.access")

# Limits on a request's head: gunicorn's defaults, so that these answers are the ones AIHS's gunicorn gives.
MAX_REQUEST_LINE = 4094
MAX_HEADERS = 100
MAX_HEADER_FIELD = 8190
MAX_HEAD = MAX_REQUEST_LINE + MAX_HEADERS * (MAX_HEADER_FIELD + 2) + 4
RECV_SIZE = 256 * 1024
LINGER_S = 2.0
DRAIN_IDLE_S = 1.0  # on SIGTERM, how long a connection that sent nothing yet may still send its request  # after a closing answer, how long unread bytes from the client are drained before the socket closes
TICK_S = 0.25
# Answered by the loop thread itself, never queued behind a long run(): the probes and the metrics scrape.
CONTROL_ROUTES = {("GET", "/"), ("HEAD", "/"), ("GET", "/ready"), ("GET", "/metrics")}
MAX_PIPELINED = 32  # complete requests that may wait behind the one being answered, per connection  # how often deadlines are checked and the master is told this worker is alive

# Connection states. Only the loop thread moves a connection out of BUSY's neighbours; app threads move it from
# BUSY to IDLE, WRITING or CLOSING when an answer is done.
NEW, IDLE, READING, BUSY, WRITING, CLOSING = "new", "idle", "reading", "busy", "writing", "closing"


class _Reject(Exception):
    """Raised inside the parser to stop reading: the request is answered on its head alone."""


class _Protocol(Exception):
    def __init__(self, error: errors.ServerError):
        self.error = error


class Request:
    __slots__ = ("method", "url", "path", "query", "version", "headers", "body", "body_size", "keep_alive",
                 "body_error", "expect_continue", "content_length", "started", "finished", "timed_out")

    def __init__(self) -> None:
        self.method: Optional[str] = None
        self.version = "1.1"
        self.url = b""
        self.path = self.query = ""  # decoded once the head is complete
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.body_size = 0
        self.body_error: Optional[str] = None  # the body cannot be read as framed: the app answers 400
        self.expect_continue = False
        self.content_length: Optional[int] = None
        self.keep_alive = True
        self.started = time.perf_counter()
        self.finished = self.timed_out = False  # answered by its app thread, or by the loop at its deadline


class Connection:
    """One client socket and its parser; the parser's callbacks (`on_*`) run in the loop thread."""

    def __init__(self, front: "FrontWorker", sock: socket.socket, peer: Any):
        self.front, self.sock, self.fd = front, sock, sock.fileno()
        self.peer = peer if isinstance(peer, tuple) else ("", 0)
        self.parser = httptools.HttpRequestParser(self)
        self.lock = threading.Lock()
        self.state = NEW
        self.deadline = time.monotonic() + front.read_timeout
        self.pending: collections.deque[Request] = collections.deque()  # complete requests waiting their turn
        self.request: Optional[Request] = None  # the one being parsed
        self.in_head = True  # between requests too: bytes before a request line count towards its head
        self.head_bytes = 0
        self.watched = True  # registered in the loop's epoll
        self.stop_reading = False  # the last request closes the connection: what follows it is discarded
        self.out: Optional[memoryview] = None  # what the loop still has to write
        self.close_after_write = False
        self.eof = False

    # --- httptools callbacks ----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        self.request = Request()
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        assert self.request is not None
        self.request.url += url
        if len(self.request.url) > MAX_REQUEST_LINE:
            raise _Protocol(errors.RequestLineTooLong(f"request line over {MAX_REQUEST_LINE} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.request is not None
        headers = self.request.headers
        if len(headers) >= MAX_HEADERS:
            raise _Protocol(errors.HeaderFieldsTooLarge(f"more than {MAX_HEADERS} header fields"))
        if len(name) + len(value) + 2 > MAX_HEADER_FIELD:
            raise _Protocol(errors.HeaderFieldsTooLarge(f"header field over {MAX_HEADER_FIELD} bytes"))
        headers.append((name, value.strip()))

    def on_headers_complete(self) -> None:
        request = self.request
        assert request is not None
        self.in_head, self.head_bytes = False, 0
        parser = self.parser
        request.method = parser.get_method().decode("latin-1")
        request.version = parser.get_http_version()
        request.keep_alive = parser.should_keep_alive()
        authorization = None
        for name, value in request.headers:
            lname = name.lower()
            if lname == b"content-length":
                request.content_length = int(value) if value.isdigit() else None
            elif lname == b"expect":
                request.expect_continue = value.lower() == b"100-continue"
            elif lname == b"authorization":
                authorization = value.decode("latin-1")
        try:
            url = httptools.parse_url(request.url)
        except httptools.HttpParserInvalidURLError:
            raise _Protocol(errors.MalformedRequest("the request target is not a valid URL")) from None
        request.path = unquote_to_bytes(url.path or b"/").decode("latin-1")
        request.query = (url.query or b"").decode("latin-1")
        if not self.front.admits_body(request.path, authorization, request.content_length):
            raise _Reject()  # answered on its head; the body is never read
        if request.expect_continue and self.state not in (BUSY, WRITING):  # never inside an answer being written
            _send_quietly(self.sock, b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, data: bytes) -> None:
        request = self.request
        assert request is not None
        request.body_size += len(data)
        if request.body_size > self.front.max_body_bytes:  # chunked past the limit: the app answers 413
            request.body.append(data[: max(0, self.front.max_body_bytes + 1 - (request.body_size - len(data)))])
            raise _Reject()
        request.body.append(data)

    def on_message_complete(self) -> None:
        assert self.request is not None
        self.front.complete(self, self.request)
        self.request = None


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.send(data)
    except OSError:
        pass


class FrontWorker(Worker):
    """gunicorn worker: one epoll loop thread for all sockets, `threads` app threads for complete requests."""

    def init_process(self) -> None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < hard:  # every idle keep-alive connection is one descriptor: allow as many as the system does
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        super().init_process()

    def run(self) -> None:
        settings = self.app.settings
        self.read_timeout = float(settings.read_timeout)
        self.send_timeout = float(settings.send_timeout)
        self.keepalive = float(settings.keepalive)
        self.max_body_bytes = int(settings.max_body_bytes)
        scorehost = self.wsgi.extensions["scorehost"]
        self.admits_body: Callable[[str, Optional[str], Optional[int]], bool] = scorehost["admits_body"]
        self.log_access = bool(settings.access_log)
        self.timeout_s = settings.scoring_timeout_ms / 1000
        self.hung_grace_s = float(settings.hung_grace)
        self.metrics = scorehost["metrics"]
        self.in_flight: dict[int, tuple[Connection, Request, float]] = {}  # app thread -> what it is answering
        self.shares: ConnectionShares = self.app.shares
        self.slot: int = self.shares.slot_of(self)
        self.conns: dict[int, Connection] = {}
        self.work: "queue.SimpleQueue[Optional[tuple[Connection, Request]]]" = queue.SimpleQueue()
        self.commands: "queue.SimpleQueue[tuple[str, Connection]]" = queue.SimpleQueue()
        self.epoll = select.epoll()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        self.epoll.register(self.wake_r.fileno(), select.EPOLLIN)
        self.epoll.register(self.PIPE[0], select.EPOLLIN)  # gunicorn's signal wake-up pipe
        self.listeners = {}
        for listener in self.sockets:
            listener.setblocking(False)
            self.epoll.register(listener.fileno(), select.EPOLLIN)  # every worker wakes; the least loaded accepts
            self.listeners[listener.fileno()] = listener
        self.base_environ = {
            "SERVER_NAME": str(self.sockets[0].cfg_addr[0]) if self.sockets else "",
            "SERVER_PORT": str(self.sockets[0].cfg_addr[1]) if self.sockets else "",
            "SCRIPT_NAME": os.environ.get("SCRIPT_NAME", ""),
            "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.errors": _LogStream(log),
            "wsgi.multithread": True, "wsgi.multiprocess": self.cfg.workers > 1, "wsgi.run_once": False,
            "wsgi.input_terminated": True,
        }
        self.threads = [threading.Thread(target=self._app_thread, name=f"app-{i}", daemon=True)
                        for i in range(max(1, self.cfg.threads))]
        for thread in self.threads:
            thread.start()
        if getattr(self, "wait_for_models", False):
            self._wait_until_ready(scorehost["ready"])
        self._loop()

    def _wait_until_ready(self, ready: Callable[[], bool]) -> None:
        """A reload's worker takes traffic only once its generation's model processes answer: meanwhile the old
        workers serve (runner.ScoreArbiter)."""
        while self.alive and not ready():
            self.notify()
            time.sleep(0.1)

    # --- the loop thread --------------------------------------------------------------------------------------
    def _loop(self) -> None:
        next_tick = 0.0
        drain_until: Optional[float] = None
        while True:
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK_S
                self.notify()
                self._expire(now)
                self._overdue(now)
                if self.ppid != os.getppid():
                    log.info("master %d is gone: worker %d exits", self.ppid, os.getpid())
                    return
                if not self.alive and drain_until is None:
                    drain_until = now + self.cfg.graceful_timeout
                    self._stop_accepting()
                if drain_until is not None and (now >= drain_until or not self._in_flight()):
                    return
            for fd, events in self.epoll.poll(TICK_S):
                conn = self.conns.get(fd)
                if conn is not None:
                    if events & select.EPOLLIN or events & (select.EPOLLHUP | select.EPOLLERR):
                        self._read(conn)
                    if events & select.EPOLLOUT and conn.state == WRITING:
                        self._write(conn)
                elif fd in self.listeners:
                    self._accept(self.listeners[fd])
                elif fd == self.wake_r.fileno():
                    self._commands()
                # else: the signal pipe; the handler already ran, the tick above acts on it

    def _accept(self, listener: socket.socket) -> None:
        """Take a new connection only while no worker holds fewer (`ConnectionShares`): keep-alive connections
        then spread evenly over the workers instead of piling onto whichever woke first."""
        if not self.alive or not self.shares.may_accept(self.slot, len(self.conns)):
            return
        try:
            sock, peer = listener.accept()
        except BlockingIOError:
            return
        except OSError as ex:  # out of descriptors, say: leave the rest in the backlog for now
            log.warning("accept failed: %s", ex)
            return
        sock.setblocking(False)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # a Unix socket
        conn = Connection(self, sock, peer)
        self.conns[conn.fd] = conn
        self.epoll.register(conn.fd, select.EPOLLIN | select.EPOLLRDHUP)
        self.shares.publish(self.slot, len(self.conns))

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._end_of_input(conn)
            return
        if conn.state == CLOSING or conn.stop_reading:
            return  # lingering close: drain and discard
        if conn.state in (NEW, IDLE):
            conn.state = READING
        if conn.state == READING:
            conn.deadline = time.monotonic() + self.read_timeout
        if conn.in_head:
            conn.head_bytes += len(data)
            if conn.head_bytes > MAX_HEAD:
                self._protocol_error(conn, errors.HeaderFieldsTooLarge(f"request head over {MAX_HEAD} bytes"))
                return
        try:
            conn.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            conn.stop_reading = True  # no upgrades here: answer what came, then close
        except httptools.HttpParserCallbackError as ex:
            cause = ex.__context__
            if isinstance(cause, _Reject):
                self._reject(conn)
            elif isinstance(cause, _Protocol):
                self._protocol_error(conn, cause.error)
            else:
                log.exception("error while parsing a request")
                self._protocol_error(conn, errors.MalformedRequest("the request could not be parsed"))
        except httptools.HttpParserError as ex:
            self._protocol_error(conn, errors.MalformedRequest(str(ex)))

    def _end_of_input(self, conn: Connection) -> None:
        """The client closed (or half-closed) its side. A request cut short is answered if it can be."""
        self._unwatch(conn)
        conn.eof = True
        request = conn.request
        if request is not None and request.method is not None and conn.state == READING:
            conn.request = None
            received = request.body_size
            if request.content_length is None:
                request.body_error = "the client closed the connection before the chunked body ended"
            request.keep_alive = False
            conn.stop_reading = True
            self.complete(conn, request)
            log.debug("client closed mid-body after %d bytes", received)
            return
        if conn.state in (NEW, IDLE, READING, CLOSING):
            self._close(conn)
        # BUSY or WRITING: the answer is still on its way; the connection closes after it

    def complete(self, conn: Connection, request: Request) -> None:
        """A whole request has arrived: hand it to an app thread, or queue it behind the one in flight."""
        if not request.keep_alive or not self.alive:
            request.keep_alive = False
            conn.stop_reading = True
        with conn.lock:
            if conn.state in (BUSY, WRITING):
                if len(conn.pending) >= MAX_PIPELINED:  # a client that sends and never reads: stop taking more
                    conn.stop_reading = True
                    conn.pending.append(_ErrorAnswer(errors.Overloaded(  # type: ignore[arg-type]
                        f"more than {MAX_PIPELINED} pipelined requests wait for their answers")))
                else:
                    conn.pending.append(request)
                return
            conn.state = BUSY
        if (request.method, request.path) in CONTROL_ROUTES:
            self._answer(conn, request, watched=False)
        else:
            self.work.put((conn, request))

    def _reject(self, conn: Connection) -> None:
        """Answer a request on its head alone (the app refuses it before reading a body), then close."""
        request = conn.request
        assert request is not None
        conn.request = None
        request.keep_alive = False
        conn.stop_reading = True
        self.complete(conn, request)

    def _protocol_error(self, conn: Connection, error: errors.ServerError) -> None:
        conn.request = None
        conn.stop_reading = True
        if conn.state in (BUSY, WRITING):  # an answer is on its way: the error closes the connection after it
            with conn.lock:
                conn.pending.append(_ErrorAnswer(error))  # type: ignore[arg-type]
            return
        _send_quietly(conn.sock, errors.raw_error_response(error))
        self._linger(conn)

    def _linger(self, conn: Connection) -> None:
        conn.state = CLOSING
        conn.deadline = time.monotonic() + LINGER_S
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)

    def _write(self, conn: Connection) -> None:
        assert conn.out is not None
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        conn.deadline = time.monotonic() + self.send_timeout
        if not len(conn.out):
            conn.out = None
            if conn.eof:
                self._unwatch(conn)
            else:
                self.epoll.modify(conn.fd, select.EPOLLIN | select.EPOLLRDHUP)
            self._answered(conn, conn.close_after_write)

    def _commands(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                command, conn = self.commands.get_nowait()
            except queue.Empty:
                return
            if self.conns.get(conn.fd) is not conn:  # closed meanwhile, its descriptor maybe reused: stale
                continue
            if command == "write":
                conn.deadline = time.monotonic() + self.send_timeout
                events = select.EPOLLOUT | (0 if conn.eof else select.EPOLLIN | select.EPOLLRDHUP)
                if conn.watched:
                    self.epoll.modify(conn.fd, events)
                else:
                    self.epoll.register(conn.fd, events)
                    conn.watched = True
                self._write(conn)
            elif command == "close":
                self._close(conn)

    def _expire(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if conn.state in (BUSY,) or now < conn.deadline:
                continue
            if conn.state == READING and conn.request is not None:
                self._protocol_error(conn, errors.RequestTimeout(
                    f"the request did not arrive within {self.read_timeout:g} s (--read-timeout)"))
            elif conn.state != BUSY:
                self._close(conn)

    def _in_flight(self) -> bool:
        """While draining: a request is being answered, is arriving, or may still arrive on a new connection."""
        return any(c.state in (NEW, READING, BUSY, WRITING) for c in self.conns.values())

    def _stop_accepting(self) -> None:
        for fd, listener in self.listeners.items():
            self.epoll.unregister(fd)
            listener.close()
        self.listeners = {}
        soon = time.monotonic() + DRAIN_IDLE_S
        for conn in list(self.conns.values()):  # a request may be on its way on these: let it come, then close
            if conn.state in (NEW, IDLE):
                conn.deadline = min(conn.deadline, soon)

    def _unwatch(self, conn: Connection) -> None:
        if conn.watched:
            conn.watched = False
            self.epoll.unregister(conn.fd)

    def _close(self, conn: Connection) -> None:
        if self.conns.get(conn.fd) is not conn:  # already closed: its descriptor may now be another connection's
            return
        del self.conns[conn.fd]
        self._unwatch(conn)
        conn.sock.close()
        self.shares.publish(self.slot, len(self.conns))

    def _wake(self, command: str, conn: Connection) -> None:
        self.commands.put((command, conn))
        try:
            self.wake_w.send(b"x")
        except BlockingIOError:
            pass  # already awake

    # --- app threads ------------------------------------------------------------------------------------------
    def _app_thread(self) -> None:
        while True:
            item = self.work.get()
            if item is None:
                return
            self._answer(*item)

    def _answer(self, conn: Connection, request: Request, watched: bool = True) -> None:
        me = threading.get_ident()
        if watched and not isinstance(request, _ErrorAnswer):
            self.in_flight[me] = (conn, request, time.monotonic())
        try:
            if isinstance(request, _ErrorAnswer):
                data, close = errors.raw_error_response(request.error), True
            else:
                data, close = self._respond(conn, request)
        except BaseException:  # noqa: B036 - nothing may kill an app thread
            log.exception("error while answering a request")
            data, close = errors.raw_error_response(errors.InternalError()), True
        finally:
            self.in_flight.pop(me, None)
        if not isinstance(request, _ErrorAnswer):
            with conn.lock:
                if request.timed_out:
                    log.warning("dropped the late answer of a call that passed the scoring timeout")
                    return
                request.finished = True
        self._send(conn, data, close)

    def _overdue(self, now: float) -> None:
        """In the loop: a call past the scoring timeout is answered now (by the app, so the 500 is Azure ML's, with
        every contract header), whatever its thread is stuck in; still stuck `hung_grace` later, the worker exits
        and the master starts another. Python code is interrupted at the deadline already (invoke.py): this is
        for calls blocked in native code or that ignore the interruption."""
        for conn, request, started in list(self.in_flight.values()):
            if now < started + self.timeout_s:
                continue
            with conn.lock:
                answer_now = not request.finished and not request.timed_out
                request.timed_out = request.timed_out or answer_now
            if answer_now:
                data, _ = self._respond(conn, request, timed_out=True)
                self._send(conn, data, close=True)
            if now >= started + self.timeout_s + self.hung_grace_s:
                log.error("a call has not returned %.0f s after the scoring timeout (--hung-grace): worker %d exits "
                          "and the master starts another", self.hung_grace_s, os.getpid())
                self.metrics.restarts.labels("hung run()").inc()
                logging.shutdown()
                os._exit(EXIT_HUNG)

    def _respond(self, conn: Connection, request: Request, timed_out: bool = False) -> tuple[bytes, bool]:
        environ = self._environ(conn, request)
        if timed_out:
            environ[TIMED_OUT] = True
        captured: list = []

        def start_response(status: str, headers: list, exc_info: Any = None) -> Callable[[bytes], None]:
            captured[:] = [status, headers]
            return written.append

        written: list[bytes] = []
        result = self.wsgi(environ, start_response)
        try:
            chunks = written + [chunk for chunk in result if chunk]
        finally:
            if hasattr(result, "close"):
                result.close()
        status, headers = captured
        close = not request.keep_alive or not self.alive or self.keepalive <= 0
        lines = [f"HTTP/1.1 {status}\r\n"]
        has_length = False
        for name, value in headers:
            lname = name.lower()
            if lname == "connection":
                close = close or value.lower() == "close"
                continue
            if lname in ("transfer-encoding", "keep-alive"):
                continue
            has_length = has_length or lname == "content-length"
            lines.append(f"{name}: {value}\r\n")
        body = b"".join(chunks)
        code = int(status[:3])
        bodiless = request.method == "HEAD" or code < 200 or code in (204, 304)
        if bodiless:
            body = b""
        elif not has_length:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append(f"Date: {_date()}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n")
        if self.log_access:
            access_log.info('%s "%s %s HTTP/%s" %s %d %.1fms', conn.peer[0], request.method,
                            request.url.decode("latin-1"), request.version, code, len(body),
                            (time.perf_counter() - request.started) * 1000)
        return "".join(lines).encode("latin-1") + body, close

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
        environ["wsgi.input"] = io.BytesIO(b"".join(request.body))
        if request.body_error:
            environ[BODY_ERROR] = request.body_error
        return environ

    def _send(self, conn: Connection, data: bytes, close: bool) -> None:
        """In an app thread: write the answer; what the socket cannot take now, the loop writes later."""
        view = memoryview(data)
        try:
            while view:
                view = view[conn.sock.send(view):]
        except BlockingIOError:
            with conn.lock:
                conn.state = WRITING
            conn.out, conn.close_after_write = view, close
            self._wake("write", conn)
            return
        except OSError:
            close = True
        self._answered(conn, close)

    def _answered(self, conn: Connection, close: bool) -> None:
        """An answer is fully written (any thread): the next pipelined request goes, or the connection idles/closes."""
        if close or conn.eof:
            with conn.lock:
                conn.state = CLOSING
                conn.pending.clear()
            conn.deadline = time.monotonic() + LINGER_S
            try:
                conn.sock.shutdown(socket.SHUT_WR)  # the loop closes it on the client's EOF, or after LINGER_S
            except OSError:
                pass
            if conn.eof:
                self._wake("close", conn)
            return
        with conn.lock:
            if conn.pending:
                self.work.put((conn, conn.pending.popleft()))
                conn.state = BUSY
                return
            reading = conn.request is not None
            conn.deadline = time.monotonic() + (self.read_timeout if reading else self.keepalive)
            conn.state = READING if reading else IDLE


class ConnectionShares:
    """Open connections per worker, in memory shared by the master and its workers.

    The master gives each new worker a free slot before the fork (`assign`, gunicorn's pre_fork) and frees it when
    the worker exits (`release`); each worker publishes its own count, and accepts while it holds at most one more
    than the least loaded live worker. Without it, keep-alive clients that connect together land mostly on one
    worker (measured: 13 or all 16 of 16 connections on one of 4 workers) and stay there.
    """

    FREE = 1 << 30

    def __init__(self, slots: int = 256):
        import multiprocessing

        self.counts = multiprocessing.RawArray("i", [self.FREE] * slots)
        self.used = multiprocessing.RawValue("i", 0)  # slots handed out so far: the scan's bound

    def assign(self, arbiter: Any, worker: Any) -> None:
        slot = next(i for i, count in enumerate(self.counts) if count == self.FREE)
        self.counts[slot] = 0
        self.used.value = max(self.used.value, slot + 1)
        worker.connection_slot = slot

    def release(self, worker: Any) -> None:
        slot = getattr(worker, "connection_slot", None)
        if slot is not None:
            self.counts[slot] = self.FREE

    @staticmethod
    def slot_of(worker: Any) -> int:
        return worker.connection_slot

    def publish(self, slot: int, count: int) -> None:
        self.counts[slot] = count

    def may_accept(self, slot: int, count: int) -> bool:
        return count <= min(self.counts[: self.used.value]) + 1


class _ErrorAnswer:
    """A protocol error met while an earlier request's answer was in flight: sent in turn, then the connection closes."""

    keep_alive = False

    def __init__(self, error: errors.ServerError):
        self.error = error


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
