"""One client connection's HTTP/1.1 state machine: bytes in, complete requests out, their answers back in order.

No sockets and no threads here. The worker's loop thread (`front.FrontWorker`) owns every Connection and is the
only caller of its methods: it feeds what the socket received (`received`), the client's end of input (`ended`),
the answers app threads finished (`answer`), writability (`writable`) and the time (`tick`). The connection acts
through its `transport` (send, pause or resume reading, shut down, close) and asks its `hooks` whether to take a
body, for body memory, and where a complete request goes. tests/test_connection.py drives it with a fake transport
and a fake clock, as uvicorn tests its protocol.

States:
  IDLE     between requests; closed after `keepalive` seconds.
  READING  a request is arriving; answered 408 after `read_timeout` seconds of silence.
  BUSY     a request is with the app. Reading is paused (back-pressure: nothing more is read from a client while its
           request is answered); requests that came in the same read wait in `pending`, at most MAX_PIPELINED.
  WRITING  its answer is being written; dropped after `send_timeout` seconds without progress.
  STREAMING  a streamed answer's head and parts so far are written; the app is making the next (`part`). No
           deadline: as in Azure ML's server, the scoring timeout ends when run() returns, not its stream.
  CLOSING  the last answer is out and our side shut; the client's unread bytes are drained for LINGER_S.
  CLOSED
Rules a mature server keeps (gunicorn, nginx): only HTTP/1.0 and 1.1; one Host; no chunked body on HTTP/1.0;
trailer fields never become headers; an answer is framed by its real length, whatever the app said; a client that
half-closes gets every answer to what it sent, then the close.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any, Callable, Optional, Protocol
from urllib.parse import unquote_to_bytes

import httptools

from . import errors

# Limits on a request's head: gunicorn's defaults, so that these answers are the ones AIHS's gunicorn gives.
MAX_REQUEST_LINE = 4094
MAX_HEADERS = 100
MAX_HEADER_FIELD = 8190
MAX_HEAD = MAX_REQUEST_LINE + MAX_HEADERS * (MAX_HEADER_FIELD + 2) + 4
MAX_PIPELINED = 32  # complete requests that may wait behind the one being answered
CHUNK_FRAMING = 32  # bytes a chunk's size line and line ends may take (a 16-hex-digit size is 20)
LINGER_S = 2.0  # after a closing answer, how long unread bytes from the client are drained before the socket closes

CLOSE, KEEP_ALIVE = b"Connection: close\r\n\r\n", b"Connection: keep-alive\r\n\r\n"  # an answer's last header
IDLE, READING, BUSY, WRITING, STREAMING, CLOSING, CLOSED = ("idle", "reading", "busy", "writing", "streaming",
                                                             "closing", "closed")


class Transport(Protocol):
    """What a connection does to its socket (front.SocketTransport; a list in tests)."""

    def send(self, data: memoryview) -> int: ...  # bytes taken now (0: the socket is full); raises OSError
    def reading(self, on: bool) -> None: ...
    def writing(self, on: bool) -> None: ...
    def shutdown_write(self) -> None: ...
    def close(self) -> None: ...


class Hooks(Protocol):
    """What a connection asks of its worker."""

    def admits_body(self, path: str, authorization: Optional[str], content_length: Optional[int]) -> bool: ...
    def reserve_body(self, size: int, own: int) -> bool: ...  # body bytes in flight per worker; `own`: this
    # request's reservation so far (a request alone always passes)
    def release_body(self, size: int) -> None: ...
    def dispatch(self, conn: "Connection", request: "Request") -> None: ...  # to the app; answered via answer()
    def keep_alive(self) -> bool: ...  # False while the worker drains


@dataclasses.dataclass(frozen=True)
class Limits:
    read_timeout: float = 30.0
    send_timeout: float = 30.0
    keepalive: float = 5.0
    max_body_bytes: int = 16 << 20


class Request:
    __slots__ = ("method", "url", "path", "query", "version", "headers", "body", "body_size", "keep_alive",
                 "body_error", "expect_continue", "content_length", "started", "deadline", "reserved",
                 "head_done", "answered", "returned", "error", "dispatched", "responded", "trace", "continued",
                 "stream", "app_shared")

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
        self.continued = False  # its 100 Continue was sent
        self.content_length: Optional[int] = None
        self.keep_alive = True
        self.started = time.perf_counter()
        # The scoring deadline (time.monotonic()): set once, by the app thread that takes the request, as Azure ML's
        # timer starts when its worker takes a request (a request waiting for a busy thread is not yet timed).
        self.deadline = float("inf")
        self.reserved = 0  # body bytes counted against the worker's budget
        self.head_done = False
        self.answered = False  # loop-owned: its answer was handed to the connection (once, whoever made it)
        self.returned = False  # loop-owned: its app thread came back (a late answer is dropped, the thread is free)
        self.error: Optional[errors.ServerError] = None  # answered by the connection itself, not the app
        # Stage times (perf_counter) for /metrics and traces: handed to an app thread; its answer made.
        self.dispatched = self.responded = 0.0
        self.trace: Any = None  # telemetry.RequestTrace when tracing is on
        self.stream: Optional[Stream] = None  # set by the app thread before the first part of a streamed answer
        self.app_shared: Any = None  # set by the app thread that takes it (front.FrontWorker._app_thread)


class Stream:
    """A streamed answer's hand-off between the app thread that makes its parts and the loop that writes them: one
    part in flight at a time, so a client that reads slowly slows the producer and nothing piles up in memory.
    The loop sets `ready` when a part is written, and `gone` (then `ready`) when no more will be: the connection
    closed or the answer was given otherwise; the producer then stops and closes its iterable."""

    __slots__ = ("ready", "gone")

    def __init__(self) -> None:
        self.ready = threading.Event()
        self.gone = False

    def end(self) -> None:
        self.gone = True
        self.ready.set()


class _Reject(Exception):
    """Raised inside the parser to stop reading: the request is answered on its head alone."""


class _Discard(Exception):
    """Raised inside the parser when a request begins after the connection's last one: the rest of the bytes read
    are dropped unparsed (a closing answer was already given, maybe inside this same read)."""


class _Protocol(Exception):
    def __init__(self, error: errors.ServerError):
        self.error = error


class Connection:
    def __init__(self, transport: Transport, hooks: Hooks, limits: Limits,
                 clock: Callable[[], float] = time.monotonic, peer: Any = None):
        self.transport, self.hooks, self.limits, self.clock = transport, hooks, limits, clock
        self.peer = peer if isinstance(peer, tuple) else ("", 0)
        self.parser: Optional[httptools.HttpRequestParser] = httptools.HttpRequestParser(self)
        self.state = IDLE
        self.deadline = clock() + limits.read_timeout  # a new connection has that long to send its first request
        self.request: Optional[Request] = None  # the one being parsed
        self.upgrade_head: Optional[Request] = None  # a head asking to switch protocols (`_not_upgraded`)
        self.current: Optional[Request] = None  # the one being answered (BUSY, WRITING, STREAMING)
        self.pending: collections.deque[Request] = collections.deque()  # complete, waiting their turn
        self.in_head = True  # between requests too: bytes before a request line count towards its head
        self.head_bytes = 0
        self.chunks = 0  # of the chunked body being read
        self.stop_reading = False  # the last request closes the connection: what follows it is discarded
        self.out: Optional[memoryview] = None
        self.unsent = b""  # the part of a 100 Continue the socket did not take: it precedes the answer
        self.close_after = False
        self.streaming = False  # the answer being written is a streamed one's part, and more are to come
        self.streaming_since = 0.0  # when its last part was written: the producer owes the next since then
        self.after_stream = b""  # answers to pipelined requests, held on an evacuation until the stream ends
        self.eof = False
        self.fresh = True  # nothing received yet: a client that connected has its first request on the way
        self.reading = True  # whether bytes are taken now (not while a request is answered: back-pressure)
        self.socket_paused = False  # whether the transport was told to stop reading (lazily, see pause_socket)

    # --- fed by the loop ---------------------------------------------------------------------------------------
    def received(self, data: bytes) -> None:
        if self.state in (CLOSING, CLOSED) or self.stop_reading:
            return  # lingering close, or past the last request: discard
        self.fresh = False
        if self.state == IDLE:
            self.state = READING
        if self.state == READING:
            self.deadline = self.clock() + self.limits.read_timeout
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                self._protocol_error(errors.HeaderFieldsTooLarge(f"request head over {MAX_HEAD} bytes"))
                return
        elif self.request is not None and self.request.head_done:
            # A chunked body's framing (chunk size lines, extensions, trailer fields) is bounded too: an outside
            # attack sent 12 GB of trailer fields on one request, never refused. A chunk's own framing is a few
            # bytes (1-byte chunks take 5 each); extensions and trailer fields share the head's limit.
            self.head_bytes += len(data)
            if self.head_bytes - self.request.body_size > MAX_HEAD + CHUNK_FRAMING * self.chunks:
                self._protocol_error(errors.HeaderFieldsTooLarge(
                    "the chunked body's framing (chunk extensions, trailer fields) is too large"))
                return
        rest: Optional[bytes] = None
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserUpgrade as ex:
            rest = data[ex.args[0]:]  # parsed again below, outside this handler: an error there keeps its own cause
        except httptools.HttpParserCallbackError as ex:
            cause = ex.__context__
            if isinstance(cause, _Discard):
                return
            if isinstance(cause, _Reject):
                self._head_only()
            elif isinstance(cause, _Protocol):
                self._protocol_error(cause.error)
            else:
                raise
        except httptools.HttpParserError as ex:
            self._protocol_error(errors.MalformedRequest(str(ex)))
        if rest is not None:
            self._not_upgraded(rest)

    def ended(self) -> None:
        """The client closed (or half-closed) its side: answer what it sent, then close."""
        self.eof = True
        self.reading = False
        self.pause_socket()  # at EOF the socket stays readable: stop watching it
        request = self.request
        if request is not None and request.head_done and not self.stop_reading:
            self.request = None  # cut short: answered if it can be (a short body is the app's 400)
            if request.content_length is None:
                request.body_error = "the client closed the connection before the chunked body ended"
            request.keep_alive = False
            self._complete(request)
            return
        if self.state in (IDLE, READING, CLOSING):
            self.close()
        # BUSY or WRITING: the answers are on their way; the connection closes after the last

    def answer(self, request: Request, head: bytes, body: bytes, close: bool, streamed: bool = False) -> bool:
        """The app's answer to the request being answered: written now, or as the socket takes it. `head` is its
        status line and header lines but Connection, which is decided here: close when `close` (the client's or
        the app's wish), and when the worker stops (or the client half-closed), but not while requests wait behind
        this one: they were accepted, so they are answered first (a close was sent on this answer, and the
        pipelined ones behind it went unanswered). `streamed`: only its head and first part, the rest to come
        through `part` (request.stream is set). False: not taken."""
        behind = self.pending or (self.request is not None and self.request.head_done)  # accepted, to answer next
        close = close or not request.keep_alive or ((self.eof or not self.hooks.keep_alive()) and not behind)
        return self._give(request, head + (CLOSE if close else KEEP_ALIVE) + body, close, streamed)

    def _give(self, request: Request, data: bytes, close: bool, streamed: bool = False) -> bool:
        """An answer, whole bytes, to the request being answered."""
        if request.answered or request is not self.current or self.state != BUSY:
            return False  # answered already (at its deadline, or on an evacuation): a late answer is dropped
        request.answered = True
        self._release(request)
        self.streaming = streamed
        data, self.unsent = (self.unsent + data if self.unsent else data), b""  # before the write: writing it may
        self._write(data, close or not request.keep_alive)  # start the next request, whose 100 Continue goes here
        return True

    def part(self, request: Request, data: bytes, last: bool, close: bool = False) -> bool:
        """The next part of a streamed answer (`last`: its end; with `close`, cut short: the connection closes
        after it, and a chunked answer without its last chunk tells the client so). False: not taken."""
        if request is not self.current or self.state != STREAMING:
            return False
        self.streaming = not last
        # A stream cut short (close) ends without its last chunk: answers after it would be read as its body.
        self._write(data + self.after_stream if last and not close else data, self.close_after or close)
        return True

    def _write(self, data: bytes, close_after: bool) -> None:
        self.state = WRITING
        self.out = memoryview(data)
        self.close_after = close_after
        self.deadline = self.clock() + self.limits.send_timeout  # a write deadline, never a stale read one
        self.writable()

    def writable(self) -> None:
        if self.state != WRITING or self.out is None:
            return
        try:
            sent = self.transport.send(self.out)
        except OSError:
            self.close()
            return
        if sent:
            self.out = self.out[sent:]
            self.deadline = self.clock() + self.limits.send_timeout
        if len(self.out):
            self.transport.writing(True)
            return
        self.out = None
        self.transport.writing(False)
        self._written()

    def tick(self, now: float) -> None:
        if self.state in (BUSY, STREAMING, CLOSED) or now < self.deadline:
            return
        if self.state == READING and self.request is not None:
            self._protocol_error(errors.RequestTimeout(
                f"the request did not arrive within {self.limits.read_timeout:g} s (--read-timeout)"))
        else:
            self.close()

    def drain(self, within_s: float) -> None:
        """The worker stops: a new connection that has sent nothing yet has `within_s` to send its request; an idle
        keep-alive one keeps its keep-alive deadline, and its next request is answered with a close, so its client
        moves to a worker that serves (as Envoy drains HTTP/1.1). Closed at once instead, a request its client sent
        at that moment was reset: an outside attack counted 7-16 a reload with 16 clients."""
        if self.state == IDLE and self.fresh:
            self.deadline = min(self.deadline, self.clock() + within_s)

    def awaited(self, now: float) -> bool:
        """Whether a stopping worker must wait for this connection: an idle one, until its deadline (a new one's
        first request, or a keep-alive one's next, may be on its way, more so on busy cores)."""
        return self.state == IDLE and now < self.deadline

    def evacuate(self, answer: Callable[[Request], bytes]) -> None:
        """The worker must exit now: every request this connection holds and has not answered gets `answer` (503
        + Retry-After), in order, and the connection closes after them. An answer being written is finished."""
        held = ([self.current] if self.state == BUSY and self.current is not None else []) + list(self.pending)
        if self.request is not None and self.request.head_done:
            held.append(self.request)  # its body is still arriving: it was accepted, it gets its answer
        self.pending.clear()
        self.request = None
        self.stop_reading = True
        if self.state in (WRITING, STREAMING):
            for r in held:
                r.answered = True
                self._release(r)
            tail = b"".join(answer(r) for r in held)
            if self.close_after:
                pass  # the answer being written closes the connection (or ends with it): nothing can follow it
            elif self.streaming:  # after the stream's end, which the app is still making
                self.after_stream += tail
            elif self.out is not None and tail:
                self.out = memoryview(bytes(self.out) + tail)
            self.close_after = True
            return
        if not held:
            self.close()
            return
        for r in held[1:]:
            r.answered = True
            self._release(r)
        tail = b"".join(answer(r) for r in held[1:])
        first = held[0]
        self.current = first
        self.state = BUSY
        self._give(first, answer(first) + tail, True)

    @property
    def busy(self) -> bool:
        """Holds a request it has not finished answering (or one on its way in)."""
        return self.state in (BUSY, WRITING, STREAMING) or (self.state == READING and self.request is not None)

    def close(self) -> None:
        if self.state == CLOSED:
            return
        self.state = CLOSED
        for request in (self.request, self.current, *self.pending):
            if request is not None:
                self._release(request)
        if self.current is not None and self.current.stream is not None:
            self.current.stream.end()  # its producer stops
        # Break the parser <-> connection cycle and drop buffers now, not at the next garbage collection.
        self.parser = None
        self.request = self.current = None
        self.pending.clear()
        self.out = None
        self.transport.close()

    # --- httptools callbacks -----------------------------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.stop_reading or self.state in (CLOSING, CLOSED):
            raise _Discard()
        if self.state == IDLE:  # a request after one the loop answered within this same read
            self.state = READING
            self.deadline = self.clock() + self.limits.read_timeout
        self.request = Request()
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        request = self.request
        assert request is not None
        request.url += url
        if len(request.url) > MAX_REQUEST_LINE:
            raise _Protocol(errors.RequestLineTooLong(f"request line over {MAX_REQUEST_LINE} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.request
        assert request is not None
        if request.head_done:
            return  # a chunked body's trailer field: never a header
        headers = request.headers
        if len(headers) >= MAX_HEADERS:
            raise _Protocol(errors.HeaderFieldsTooLarge(f"more than {MAX_HEADERS} header fields"))
        if len(name) + len(value) + 2 > MAX_HEADER_FIELD:
            raise _Protocol(errors.HeaderFieldsTooLarge(f"header field over {MAX_HEADER_FIELD} bytes"))
        headers.append((name, value.strip()))

    def on_headers_complete(self) -> None:
        request = self.request
        assert request is not None and self.parser is not None
        self.in_head, self.head_bytes, self.chunks = False, 0, 0  # from now on: the bytes received after the head
        request.head_done = True
        parser = self.parser
        request.method = parser.get_method().decode("latin-1")
        request.version = parser.get_http_version()
        if parser.should_upgrade():  # the parser stops after this head and leaves the body unparsed: _not_upgraded
            self.upgrade_head = request
            return
        if request.version not in ("1.0", "1.1"):
            raise _Protocol(errors.MalformedRequest(f"HTTP/{request.version} is not supported: send HTTP/1.1"))
        request.keep_alive = parser.should_keep_alive()
        authorization = None
        hosts = 0
        chunked = False
        for name, value in request.headers:
            lname = name.lower()
            if lname == b"content-length":
                request.content_length = int(value) if value.isdigit() else None
            elif lname == b"expect":
                request.expect_continue = value.lower() == b"100-continue"
            elif lname == b"authorization":
                authorization = value.decode("latin-1")
            elif lname == b"host":
                hosts += 1
            elif lname == b"transfer-encoding":
                chunked = True
                codings = [c.strip().lower() for c in value.split(b",")]
                if codings != [b"chunked"]:  # gunicorn: 501 (the body reached run() still gzipped)
                    raise _Protocol(errors.UnsupportedTransferCoding(
                        f"Transfer-Encoding {value.decode('latin-1')!r} is not supported: send the body as is, "
                        "or chunked"))
        if hosts > 1:
            raise _Protocol(errors.MalformedRequest("more than one Host header"))
        if chunked and request.version == "1.0":
            raise _Protocol(errors.MalformedRequest("Transfer-Encoding is not allowed in an HTTP/1.0 request"))
        try:
            url = httptools.parse_url(request.url)
        except httptools.HttpParserInvalidURLError:
            raise _Protocol(errors.MalformedRequest("the request target is not a valid URL")) from None
        request.path = unquote_to_bytes(url.path or b"/").decode("latin-1")
        request.query = (url.query or b"").decode("latin-1")
        if not self.hooks.admits_body(request.path, authorization, request.content_length):
            raise _Reject()  # answered on its head; the body is never read
        if request.content_length:
            # Refused on its head when the bytes held now leave no room for it. Only bytes that arrived are held
            # (on_body): counting announced sizes let 4 clients that announced 16 MiB and then sent a byte a
            # second have every other body refused 503, for as long as they kept sending.
            if not self._reserve(request, request.content_length):
                raise _Reject()
            self._release(request)
        if self.state == READING:  # never inside an answer being written: else when that answer is (_written)
            self._continue(request)

    def on_chunk_header(self) -> None:
        self.chunks += 1

    def on_body(self, data: bytes) -> None:
        request = self.request
        assert request is not None
        request.body_size += len(data)
        limit = self.limits.max_body_bytes
        if request.body_size > limit:  # chunked past the limit: the app answers 413
            request.body.append(data[: max(0, limit + 1 - (request.body_size - len(data)))])
            raise _Reject()
        if request.body_size > request.reserved and not self._reserve(request, request.body_size - request.reserved):
            raise _Reject()  # bytes arriving past the worker's budget: 503
        request.body.append(data)

    def on_message_complete(self) -> None:
        request = self.request
        assert request is not None
        self.request = None
        self.head_bytes = 0
        if request is not self.upgrade_head:
            self._complete(request)

    def _not_upgraded(self, rest: bytes) -> None:
        """A request asked to switch protocols (`Connection: Upgrade` with `Upgrade: h2c`, as `curl --http2` sends,
        or `websocket`). No upgrade is made here, so it is served as the HTTP/1.1 request it also is, as gunicorn
        and Azure ML's server do: its head again without `Upgrade`, to a new parser, then its body and what follows.
        (Taken as an upgrade, its body was lost, a 400, and the next request on the connection never answered.)"""
        request, self.upgrade_head = self.upgrade_head, None
        if request is None:
            self.stop_reading = True
            return
        if request.method == "CONNECT":  # every CONNECT is an upgrade to the parser: answered as it came, then closed
            request.keep_alive = False
            self.stop_reading = True
            self._complete(request)
            return
        head = b"%s %s HTTP/%s\r\n" % (request.method.encode("latin-1"), request.url, request.version.encode())
        head += b"".join(b"%s: %s\r\n" % field for field in request.headers if field[0].lower() != b"upgrade")
        self.parser = httptools.HttpRequestParser(self)
        self.received(head + b"\r\n" + rest)

    # --- inside ------------------------------------------------------------------------------------------------
    def _reserve(self, request: Request, size: int) -> bool:
        if self.hooks.reserve_body(size, request.reserved):
            request.reserved += size
            return True
        request.error = errors.Overloaded("The server is busy: too many request bodies are being received. Retry "
                                          "after a short pause.")
        return False

    def _release(self, request: Request) -> None:
        if request.reserved:
            self.hooks.release_body(request.reserved)
            request.reserved = 0

    def _complete(self, request: Request) -> None:
        if not request.keep_alive or not self.hooks.keep_alive():
            request.keep_alive = False
            self.stop_reading = True
        if self.state in (BUSY, WRITING, STREAMING) or self.pending:
            if len(self.pending) >= MAX_PIPELINED:  # a client that sends and never reads: stop taking more
                request.error = errors.Overloaded(f"more than {MAX_PIPELINED} pipelined requests wait for their "
                                                  "answers")
                request.keep_alive = False
                self.stop_reading = True
            self.pending.append(request)
            return
        self._start(request)

    def _start(self, request: Request) -> None:
        self.current = request
        self.state = BUSY
        self._stop_reading_socket()
        if request.error is not None:
            self._give(request, errors.raw_error_response(request.error), True)
        else:
            self.hooks.dispatch(self, request)

    def _written(self) -> None:
        """An answer is fully written: the next pipelined request goes, or the connection idles or closes. A
        streamed answer's part: its producer is told to make the next."""
        if self.streaming:
            self.state = STREAMING
            self.deadline = float("inf")  # a producer that never makes its next part is the worker's (front._overdue)
            self.streaming_since = self.clock()
            assert self.current is not None and self.current.stream is not None
            self.current.stream.ready.set()
            return
        self.current = None
        if self.close_after or (self.eof and not self.pending):
            self._linger()
            return
        if self.pending:
            self._start(self.pending.popleft())
            return
        self.state = READING if self.request is not None else IDLE
        if self.request is not None and self.request.head_done:
            self._continue(self.request)  # a pipelined head that came while the answer before it was written
        if self.state == IDLE and self.limits.keepalive <= 0:
            self._linger()
            return
        self.deadline = self.clock() + (self.limits.read_timeout if self.request else self.limits.keepalive)
        if not self.eof:
            self._resume_reading()

    def _head_only(self) -> None:
        """Answer a request on its head alone (the app refuses it before reading a body: wrong key, too large;
        or the worker's body budget is spent: 503), then close."""
        request = self.request
        assert request is not None
        self.request = None
        request.keep_alive = False
        self.stop_reading = True
        self._complete(request)

    def _protocol_error(self, error: errors.ServerError) -> None:
        """A request that cannot be read as HTTP: answered by the connection itself (in turn, after any answer in
        flight), then the connection closes."""
        request = self.request or Request()
        self.request = None
        request.error = error
        request.keep_alive = False
        self.stop_reading = True
        if self.state in (BUSY, WRITING, STREAMING) or self.pending:
            self.pending.append(request)
            return
        self._start(request)

    def _stop_reading_socket(self) -> None:
        """Back-pressure, lazily: the transport is told only if bytes come while a request is answered
        (`pause_socket`), so a plain request-then-answer client costs no epoll change per request."""
        self.reading = False

    def pause_socket(self) -> None:
        """The loop saw input while this connection takes none: stop watching the socket until it does."""
        if not self.socket_paused:
            self.socket_paused = True
            self.transport.reading(False)

    def _resume_reading(self) -> None:
        self.reading = True
        if self.socket_paused:
            self.socket_paused = False
            self.transport.reading(True)

    def _linger(self) -> None:
        if self.eof:
            self.close()
            return
        self.state = CLOSING
        self.deadline = self.clock() + LINGER_S
        self.stop_reading = True
        try:
            self.transport.shutdown_write()
        except OSError:
            self.close()
            return
        self._resume_reading()  # drain what the client still sends, until its EOF or LINGER_S

    def _continue(self, request: Request) -> None:
        """`100 Continue`, once, to an HTTP/1.1 head that asks for it before its body comes: what the socket does
        not take now goes out before the answer (never half of it alone)."""
        if not request.expect_continue or request.version != "1.1" or request.continued or request.body_size:
            return
        request.continued = True
        data = b"HTTP/1.1 100 Continue\r\n\r\n"
        try:
            sent = self.transport.send(memoryview(data))
        except OSError:
            return
        self.unsent = data[sent:]
