"""The messages between HTTP workers and model processes: their names, their version, and how their bytes cross.

Every frame is a fixed header, then the sizes of its parts, then the parts:

    header  (HEADER): version, message type, part count, request id, deadline or run time, batch size
    sizes   (part count x u64; the top bit marks a read-only buffer: bytes stay bytes, arrays stay read-only)
    part 0  the pickle (protocol 5) of the payload
    part 1+ the payload's large buffers, out of band: numpy arrays, bytearrays, and the bodies of requests and
            responses (or a bytes payload) of BIG_BYTES or more

The request id and the deadline travel in the header, outside the pickle: a payload that cannot be unpickled on the
other side fails its own request (the reader still knows whose it was) and the link goes on. A payload that cannot
be pickled fails before a byte is sent. Frames go out with one `sendmsg` (no joined copy of header and buffers) and
come in through a buffered reader, each part into its final buffer.

Message types:
    SCORE   HTTP worker -> model process: one item for run_batch(); `value` is the request's scoring deadline
            (time.monotonic(), shared by the processes of one machine).
    RESULT  model process -> HTTP worker: run_batch()'s output for that request; `value` is the run_batch() time in
            ms, `size` the batch size it ran in.
    ERROR   model process -> HTTP worker: the request failed; the payload is (error type name, message), plain
            strings that always pickle.
    STALLED model process -> HTTP worker (version 2): `value` 1.0 once a run_batch() has run past a request's
            scoring timeout, 0.0 when it returns; no request, no payload. The worker's /ready says not ready
            meanwhile, so a load balancer sends its traffic elsewhere.
"""

from __future__ import annotations

import enum
import functools
import pickle
import socket
import struct
from typing import Any, BinaryIO, NamedTuple

VERSION = 2
HEADER = struct.Struct("<BBHQdI")  # version, type, parts, request id, deadline or run ms, batch size
BIG_BYTES = 4096  # bytes this long or longer cross out of band (one copy fewer each way)
MAX_PARTS = 1024
READ_ONLY = 1 << 63
# The buffered reader's own buffer: small frames come several to one read; a large part (over this) is read
# straight from the socket into its final buffer, not through this one (a 256 KB buffer cost a copy per image).
READ_BUFFER = 16 * 1024
IOV_MAX = 512  # buffers per sendmsg call (Linux allows 1024)


class Type(enum.IntEnum):
    SCORE = 1
    RESULT = 2
    ERROR = 3
    STALLED = 4


class WireError(Exception):
    """The byte stream itself is broken (wrong version, impossible sizes): the link must be dropped."""


class PayloadError(Exception):
    """This payload could not be pickled or unpickled: only its own request fails."""


class Frame(NamedTuple):
    type: Type
    rid: int
    value: float
    size: int
    payload: Any  # the object, or a PayloadError when it could not be unpickled
    nbytes: int  # the payload's bytes on the wire


@functools.lru_cache(maxsize=64)
def _sizes(count: int) -> struct.Struct:
    return struct.Struct(f"<{count}Q")


def big_bytes(data: bytes) -> Any:
    """`data` as it should be pickled: out of band when it is large. For a type's `__reduce__` (RequestSnapshot,
    ResponseData) whose bytes would otherwise be copied into the pickle and out of it again."""
    return pickle.PickleBuffer(data) if len(data) >= BIG_BYTES else data


def as_bytes(data: Any) -> bytes:
    """The other end of big_bytes: bytes as read off the socket (the only copy on the way in), or, from a stream
    that did not mark them read-only, a copy."""
    if isinstance(data, pickle.PickleBuffer):
        data = data.raw().obj
    return data if type(data) is bytes else bytes(data)


class _Bytes(NamedTuple):
    """A payload that is itself large bytes (preprocess() returned the body, say): crosses out of band."""

    data: bytes

    def __reduce__(self) -> tuple:
        return as_bytes, (big_bytes(self.data),)


def encode(kind: Type, rid: int, payload: Any, value: float = 0.0, size: int = 0) -> list[Any]:
    """The frame as a list of buffers for sendmsg; raises PayloadError when the payload does not pickle."""
    buffers: list[pickle.PickleBuffer] = []

    def out_of_band(buffer: pickle.PickleBuffer) -> bool:
        """True keeps a buffer in the pickle: small ones (numpy sends every array out of band), and any past the
        part limit (a list of thousands of arrays still crosses)."""
        if buffer.raw().nbytes < BIG_BYTES or len(buffers) >= MAX_PARTS - 1:
            return True
        buffers.append(buffer)
        return False

    if type(payload) is bytes and len(payload) >= BIG_BYTES:
        payload = _Bytes(payload)
    try:
        head = pickle.dumps(payload, protocol=5, buffer_callback=out_of_band)
    except Exception as ex:  # noqa: BLE001 - whatever the object's own pickling raises
        raise PayloadError(f"{type(ex).__name__}: {ex}") from None
    raws = [b.raw() for b in buffers]
    sizes = [len(head)] + [r.nbytes | (READ_ONLY if r.readonly else 0) for r in raws]
    prefix = HEADER.pack(VERSION, kind, len(sizes), rid, value, size) + _sizes(len(sizes)).pack(*sizes)
    return [prefix, head, *raws]


def frame_bytes(parts: list[Any]) -> int:
    return sum(memoryview(p).nbytes for p in parts)


def set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """A send timeout that leaves receiving blocking (socket.settimeout would bound both)."""
    whole = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", whole, int((seconds - whole) * 1e6)))


def send(sock: socket.socket, parts: list[Any]) -> None:
    """Write whole frames (the parts of one or several): sendmsg until every part is out. The socket is blocking,
    with a kernel send timeout (SO_SNDTIMEO): a peer that stops reading fails the send instead of hanging it."""
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        sent = sock.sendmsg(views[:IOV_MAX])
        while sent and views:
            if sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def receive(stream: BinaryIO, max_bytes: int) -> Frame:
    """The next frame from a buffered reader over the socket (`sock.makefile("rb")`: small frames come several to
    a read, large buffers are read straight into place). EOFError when the peer closed between frames; WireError when the stream is broken (the
    link is then dropped); a payload that fails to unpickle comes back as a PayloadError in `payload`."""
    header = _recv_exact(stream, HEADER.size, eof_ok=True)
    version, kind, parts, rid, value, size = HEADER.unpack(header)
    if version != VERSION:
        raise WireError(f"wire version {version}, expected {VERSION}: the processes come from different installs")
    if not 1 <= parts <= MAX_PARTS:
        raise WireError(f"a frame of {parts} parts")
    marked = _sizes(parts).unpack(_recv_exact(stream, 8 * parts))
    sizes = [n & ~READ_ONLY for n in marked]
    if sum(sizes) > max_bytes:
        raise WireError(f"a frame of {sum(sizes)} bytes, over the {max_bytes} allowed")
    try:
        kind = Type(kind)
    except ValueError:
        raise WireError(f"unknown message type {kind}") from None
    head = _recv_exact(stream, sizes[0])
    # A read-only buffer (bytes) is read as bytes: no copy after the socket's; a writable one (an array) into a
    # bytearray, so that the array the script gets is writable as it was on the other side.
    buffers = [_read_bytes(stream, n) if m & READ_ONLY else _recv_exact(stream, n) for n, m in zip(sizes[1:], marked[1:])]
    try:
        payload = pickle.loads(head, buffers=buffers)
    except BaseException as ex:  # noqa: B036 - a class missing on this side, a __setstate__ raising SystemExit...
        payload = PayloadError(f"{type(ex).__name__}: {ex}")
    return Frame(kind, rid, value, size, payload, sum(sizes))


def _read_bytes(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise WireError("the other side closed the connection inside a frame")
    return data


def _recv_exact(stream: BinaryIO, size: int, eof_ok: bool = False) -> bytearray:
    buffer = bytearray(size)
    view, got = memoryview(buffer), 0
    while got < size:
        n = stream.readinto(view[got:])
        if not n:
            if eof_ok and got == 0:
                raise EOFError("the other side closed the connection")
            raise WireError("the other side closed the connection inside a frame")
        got += n
    return buffer
