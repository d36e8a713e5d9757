"""The model process's queue and batching (server/model_process.ModelServer) and the wire between processes
(server/wire.py), in process: a ModelServer needs no socket to build, and fake peers collect its answers."""

from __future__ import annotations

import io
import socket
import threading
import time

import flask
import numpy as np
import pytest

from server import errors, wire
from server.model_process import Answer, ModelClient, ModelServer, Peer, RequestSnapshot


class FakePeer(Peer):
    """Collects the answers a ModelServer sends, instead of writing them to an HTTP worker's socket."""

    def __init__(self):  # no socket: nothing of Peer's own state is used
        self.answers: list[Answer] = []

    def send(self, answers) -> None:
        self.answers += list(answers)


def server(run_batch, **kwargs) -> ModelServer:
    options = dict(batch_max=4, delay_ms=0, sizes=(), queue_max=8, timeout_ms=60_000, grace_s=10)
    return ModelServer(run_batch, **{**options, **kwargs})


def far() -> float:
    return time.monotonic() + 60


def test_queued_items_are_batched_up_to_batch_max_and_each_answered_its_own():
    sizes = []
    model = server(lambda items: sizes.append(len(items)) or [x * 10 for x in items])
    peer = FakePeer()
    for i in range(6):
        assert model.submit(peer, i, i, far()) is None
    assert model.step(wait_s=0) == 4 and model.step(wait_s=0) == 2
    assert sizes == [4, 2]
    assert [(a.rid, a.ok, a.payload, a.size) for a in peer.answers] == [(i, True, i * 10, 4 if i < 4 else 2)
                                                                       for i in range(6)]


def test_padding_to_the_allowed_sizes():
    seen = []
    model = server(lambda items: seen.append(len(items)) or items, sizes=(1, 2, 4))
    peer = FakePeer()
    for i in range(3):
        model.submit(peer, i, i, far())
    model.step(wait_s=0)
    assert seen == [4] and [a.payload for a in peer.answers] == [0, 1, 2]


def test_padding_is_a_copy_so_a_run_batch_that_changes_its_inputs_in_place_changes_each_once():
    """A batch of 3 padded to 4 (or 5 to 8) used to repeat the last request's own array: `x *= 2` doubled it once
    per padding entry, and that client got 4x (or 16x) its answer, with no error anywhere."""
    def double_in_place(items):
        for x in items:
            x *= 2
        return [float(x[0]) for x in items]

    model = server(double_in_place, sizes=(1, 2, 4, 8), batch_max=8)
    peer = FakePeer()
    for i in range(1, 6):
        model.submit(peer, i, np.array([float(i)]), far())
    model.step(wait_s=0)
    assert [a.payload for a in peer.answers] == [2.0, 4.0, 6.0, 8.0, 10.0]


def test_a_full_queue_or_a_hopeless_deadline_is_refused_at_once():
    model = server(lambda items: items, queue_max=2, queue_bytes=100)
    peer = FakePeer()
    assert model.submit(peer, 1, "a", far()) is None and model.submit(peer, 2, "b", far()) is None
    assert isinstance(model.submit(peer, 3, "c", far()), errors.Overloaded)  # count
    model.queue.clear()
    model.queued_bytes = 0
    assert model.submit(peer, 4, "d", far(), nbytes=60) is None
    assert isinstance(model.submit(peer, 5, "e", far(), nbytes=60), errors.Overloaded)  # bytes
    model.batch_s = 10.0
    assert isinstance(model.submit(peer, 6, "f", time.monotonic() + 1), errors.Overloaded)  # would miss its deadline


def test_an_item_whose_deadline_passed_in_the_queue_gets_503_and_never_reaches_the_model():
    called = []
    model = server(lambda items: called.append(items) or items)
    peer = FakePeer()
    model.submit(peer, 1, "late", time.monotonic() + 0.001)
    model.submit(peer, 2, "fine", far())
    time.sleep(0.002)
    model.step(wait_s=0)
    assert called == [["fine"]]
    late = next(a for a in peer.answers if a.rid == 1)
    assert not late.ok and isinstance(late.payload, errors.Overloaded)


def test_a_raising_batch_and_a_failing_item_fail_only_their_own_requests():
    def run_batch(items):
        if "boom" in items:
            raise RuntimeError("whole batch")
        return [ValueError("this one") if x == "bad" else x for x in items]

    model = server(run_batch)
    peer = FakePeer()
    for rid, value in enumerate(["ok", "bad", "ok2"]):
        model.submit(peer, rid, value, far())
    model.step(wait_s=0)
    assert [(a.ok, type(a.payload).__name__) for a in peer.answers] == [(True, "str"), (False, "ScriptFailed"),
                                                                      (True, "str")]
    model.submit(peer, 9, "boom", far())
    model.step(wait_s=0)
    assert isinstance(peer.answers[-1].payload, errors.ScriptFailed)


@pytest.mark.parametrize("returned, said", [
    (lambda items: items + ["extra"], "returned 4 results for 3 inputs"),  # padded to 3: one too many
    (lambda items: {str(i): x for i, x in enumerate(items)}, "returned a dict, not a list"),
    (lambda items: "abc", "returned a str, not a list"),
    (lambda items: None, "returned a NoneType, not a list"),
    (lambda items: set(items), "returned a set, not a list"),  # no order: results would go to the wrong requests
])
def test_a_run_batch_that_returns_other_than_one_result_an_input_fails_its_batch(returned, said, caplog):
    """Attacked from outside: n + 3 results were cut to n and answered 200, and a dict or a string was served as
    if it were the list (a dict gave each request a key). Too many results, or no list, fails the batch (500)."""
    model = server(returned, sizes=(1, 3))
    peer = FakePeer()
    for rid, value in enumerate(["a", "b", "c"]):
        model.submit(peer, rid, value, far())
    model.step(wait_s=0)
    assert [(a.ok, type(a.payload).__name__) for a in peer.answers] == [(False, "ScriptFailed")] * 3
    assert said in caplog.text


def test_stop_queue_answers_everything_still_waiting():
    model = server(lambda items: items)
    peer = FakePeer()
    for i in range(3):
        model.submit(peer, i, i, far())
    model.stop_queue(errors.ModelUnavailable("stopping"))
    assert [a.rid for a in peer.answers] == [0, 1, 2] and all(isinstance(a.payload, errors.ModelUnavailable)
                                                               for a in peer.answers)
    assert not model.queue and model.queued_bytes == 0


# --- the wire --------------------------------------------------------------------------------------------------

def _roundtrip(payload, kind=wire.Type.RESULT):
    parts = wire.encode(kind, 7, payload, 1.5, 3)
    a, b = socket.socketpair()
    with a, b:
        threading.Thread(target=wire.send, args=(a, parts)).start()
        return wire.receive(b.makefile("rb"), 1 << 30)


def test_large_bytes_and_arrays_cross_out_of_band_and_come_back_equal():
    body = bytes(range(256)) * 600
    parts = wire.encode(wire.Type.SCORE, 1, RequestSnapshot({"PATH_INFO": "/score"}, body), 0.0)
    assert len(parts) == 3 and memoryview(parts[2]).nbytes == len(body)  # header, pickle, the body itself
    assert len(memoryview(parts[1])) < 200  # the body is not copied into the pickle
    frame = _roundtrip(RequestSnapshot({"PATH_INFO": "/score"}, body), wire.Type.SCORE)
    assert type(frame.payload.body) is bytes and frame.payload.body == body
    array = np.arange(224 * 224 * 3, dtype=np.uint8).reshape(224, 224, 3)
    assert np.array_equal(_roundtrip(array).payload, array)
    assert _roundtrip(body).payload == body and type(_roundtrip(body).payload) is bytes


def test_what_cannot_be_pickled_fails_before_sending_and_what_cannot_be_unpickled_fails_alone():
    with pytest.raises(wire.PayloadError, match="lock"):
        wire.encode(wire.Type.RESULT, 1, {"lock": threading.Lock()})
    parts = wire.encode(wire.Type.RESULT, 1, _Local()) + wire.encode(wire.Type.RESULT, 2, "next")
    a, b = socket.socketpair()
    with a, b:
        wire.send(a, parts)
        stream = b.makefile("rb")
        first, second = wire.receive(stream, 1 << 30), wire.receive(stream, 1 << 30)
    assert first.rid == 1 and isinstance(first.payload, wire.PayloadError)  # the request id is outside the pickle
    assert second.rid == 2 and second.payload == "next"  # and the stream goes on


def test_a_frame_of_another_version_or_an_impossible_size_breaks_the_link():
    for corrupt in (bytes([9]) + b"\0" * (wire.HEADER.size - 1),
                    wire.HEADER.pack(wire.VERSION, 2, 1, 1, 0.0, 0) + (1 << 40).to_bytes(8, "little")):
        with pytest.raises(wire.WireError):
            wire.receive(io.BytesIO(corrupt), 1 << 30)


class _Local:
    """Pickles by reference to a class the receiving side cannot import."""

    def __reduce__(self):
        return (_missing_module_factory, ())


def _missing_module_factory():  # pragma: no cover - replaced below so that unpickling fails
    raise ImportError("no module named only_in_init")


def test_readiness_never_waits_for_a_send_in_progress():
    """Finding 9: /ready is answered on the event loop; it read the link under the lock held while an item was
    sent."""
    client = ModelClient(["/nonexistent/model.sock"], 1000)
    link = client.links[0]
    with link.send_lock:
        started = time.perf_counter()
        assert client.ready() is False
        assert time.perf_counter() - started < 0.01


def test_an_item_over_the_limit_is_refused_before_it_is_sent():
    client = ModelClient(["/nonexistent/model.sock"], 1000, item_max_bytes=10_000)
    with pytest.raises(errors.ItemTooLarge, match="10000"):
        client.submit(b"x" * 20_000)


def test_thousands_of_small_arrays_cross_in_the_pickle():
    """Review: numpy puts every array out of band; 1,024 or more made the payload fail."""
    arrays = [np.full(3, i, dtype=np.float32) for i in range(1100)]
    frame = _roundtrip(arrays)
    assert len(frame.payload) == 1100 and float(frame.payload[-1][0]) == 1099.0
    assert len(wire.encode(wire.Type.RESULT, 1, arrays)) == 2  # header and pickle: nothing out of band


def test_a_response_whose_body_cannot_be_read_fails_only_its_own_request():
    """run_batch() may return what run() would: a Response, whose body is read in the model process. One that
    fails when read (a stream that breaks, a file in passthrough mode as send_file() makes) fails its own request
    (500); the others of the batch are answered and the loop goes on. (It used to end the model process.)"""
    def broken():
        yield b"partial"
        raise RuntimeError("stream broke")

    outputs = {"a": "ok", "b": lambda: flask.Response(broken()),
               "c": lambda: flask.Response(io.BytesIO(b"x"), direct_passthrough=True)}
    model = server(lambda items: [outputs[x]() if callable(outputs[x]) else outputs[x] for x in items])
    peer = FakePeer()
    for rid, x in enumerate("abc"):
        model.submit(peer, rid, x, far())
    assert model.step(wait_s=0) == 3
    answers = {a.rid: a for a in peer.answers}
    assert answers[0].ok and answers[0].payload == "ok"
    for rid in (1, 2):
        assert not answers[rid].ok and isinstance(answers[rid].payload, errors.ResultUnusable)
        assert "cannot be read" in answers[rid].payload.message
    model.submit(peer, 3, "a", far())
    assert model.step(wait_s=0) == 1 and peer.answers[-1].payload == "ok"  # and it goes on


def test_an_error_of_the_scripts_own_type_crosses_as_ours_and_every_answer_goes_out():
    """A ServerError subclass defined in the script (here in a function: it cannot be pickled) crosses as the
    nearest of server.errors' types, with its message and so its status; the other HTTP worker's answers of the
    same batch go out too (it used to raise out of the batching loop, after they were marked answered)."""
    class ScriptOwn(errors.BadInput):
        extra_headers = {"X-Why": "own"}

    a, b = socket.socketpair()
    c, d = socket.socketpair()
    with a, b, c, d:
        model = server(lambda items: [ScriptOwn("not this one") if x == "bad" else x for x in items])
        model.submit(Peer(a), 1, "bad", far())
        model.submit(Peer(c), 2, "good", far())
        assert model.step(wait_s=0) == 2
        b.settimeout(5)
        d.settimeout(5)
        bad, good = wire.receive(b.makefile("rb"), 1 << 20), wire.receive(d.makefile("rb"), 1 << 20)
    assert good.rid == 2 and good.type == wire.Type.RESULT and good.payload == "good"
    assert bad.rid == 1 and bad.type == wire.Type.ERROR and type(bad.payload) is errors.BadInput
    assert bad.payload.message == "not this one" and bad.payload.extra_headers == {"X-Why": "own"}


def test_batch_max_above_the_largest_allowed_size_is_capped_to_it():
    """--batch-sizes 1,2,4,8 with --batch-max 16: a batch of 12 would reach run_batch() unpadded, a size never
    warmed that a fixed-profile engine refuses; batches are capped at 8 instead, and each is an allowed size."""
    seen = []
    model = server(lambda items: seen.append(len(items)) or items, batch_max=16, sizes=(1, 2, 4, 8), queue_max=32)
    peer = FakePeer()
    for i in range(12):
        model.submit(peer, i, i, far())
    while model.queue:
        model.step(wait_s=0)
    assert seen == [8, 4] and model.batch_max == 8
    assert sorted(a.rid for a in peer.answers) == list(range(12))
