"""The worker's per-request send window and reply stream (scale0/worker/reply.py)."""

from __future__ import annotations

import threading
import time

import pytest

from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p
from scale0.worker.reply import (
    MAX_MESSAGE_BYTES,
    MAX_OUTSTANDING_MESSAGES,
    Cancelled,
    FlowWindow,
    ReplyStream,
)

SENDER = b"5ca1e000-0000-4000-8000-0000000e2e01"
EVENT = m2.HttpRequest(SENDER, 7, b"/", {b"METHOD": b"GET"}, b"")


def test_window_gives_what_the_credits_allow_then_waits() -> None:
    flow = FlowWindow(100)
    assert flow.take(60) == 60
    assert flow.take(60) == 40
    assert flow.take(1) == 0  # no credit left: wait
    flow.grant(50)
    assert flow.take(60) == 50
    assert list(flow.outstanding) == [10, 40, 50]  # the first grant acked the first message


def test_window_caps_messages_in_flight_and_their_size() -> None:
    flow = FlowWindow(10 * MAX_MESSAGE_BYTES)
    assert flow.take(2 * MAX_MESSAGE_BYTES) == MAX_MESSAGE_BYTES
    for _ in range(MAX_OUTSTANDING_MESSAGES - 1):
        assert flow.take(1) == 1
    assert flow.take(1) == 0  # credits left, but Mongrel2 holds 8 of our messages
    flow.grant(MAX_MESSAGE_BYTES)  # acknowledges exactly the oldest one
    assert len(flow.outstanding) == MAX_OUTSTANDING_MESSAGES - 1
    assert flow.take(1) == 1


class FakeLoop:
    """What a ReplyStream needs of its loop: a lock, sends, and input waits
    (here: each wait lets `on_wait` act, as a CREDIT or CANCEL would)."""

    def __init__(self, on_wait: list[object]) -> None:
        self.lock = threading.Lock()
        self.sent: list[list[bytes]] = []
        self.on_wait = on_wait
        self.stream: ReplyStream | None = None
        self.blocked_seen: list[bool] = []  # stream.blocked at each wait

    def send(self, conn: object, frames: list[bytes]) -> None:
        assert self.lock.locked()
        self.sent.append(frames)

    def read_now(self) -> None:
        assert self.lock.locked()

    def wait_io(self) -> None:
        assert self.lock.locked() and self.stream is not None
        self.blocked_seen.append(self.stream.blocked)
        action = self.on_wait.pop(0)
        if action == "cancel":
            self.stream.cancelled = True
        elif isinstance(action, float):
            time.sleep(action)  # the time spent waiting, to be left out of the age
        elif isinstance(action, int) and self.stream.flow is not None:
            self.stream.flow.grant(action)


def stream_with(credits: int | None, on_wait: list[object]) -> tuple[FakeLoop, ReplyStream]:
    loop = FakeLoop(on_wait)
    flow = None if credits is None else FlowWindow(credits)
    stream = ReplyStream(loop, object(), b"r" * 8, EVENT, flow, time.monotonic())  # type: ignore[arg-type]
    loop.stream = stream
    return loop, stream


def bodies(frames: list[bytes]) -> list[bytes]:
    prefix = m2r.reply_prefix(SENDER, 7)
    assert all(f.startswith(prefix) for f in frames[4:])
    return [f[len(prefix):] for f in frames[4:]]


def test_a_small_response_is_one_last_message() -> None:
    loop, stream = stream_with(1000, [])
    stream.last(b"HTTP/1.1 200 OK\r\n\r\nhi", close=True)
    (frames,) = loop.sent
    assert frames[:4] == [p.VERSION, p.CMD[p.Command.REPLY], b"r" * 8, p.FLAG_LAST]
    assert bodies(frames) == [b"HTTP/1.1 200 OK\r\n\r\nhi", b""]  # the close in the same LAST


def test_over_the_window_the_stream_waits_for_credits_on_its_own_thread() -> None:
    loop, stream = stream_with(4, [0.0, 3, 0.0, 2])
    stream.last(b"abcdefghi", close=False)
    assert [(f[3], bodies(f)) for f in loop.sent] == [
        (p.FLAG_MORE, [b"abcd"]), (p.FLAG_MORE, [b"efg"]), (p.FLAG_LAST, [b"hi"])]
    assert not stream.blocked and loop.on_wait == []


def test_cancel_while_waiting_for_credits_raises_and_end_sends_a_bare_last() -> None:
    loop, stream = stream_with(2, ["cancel"])
    with pytest.raises(Cancelled):
        stream.send(b"abcd")
    with pytest.raises(Cancelled):
        stream.send(b"more")  # every later send too
    with loop.lock:
        stream.end_locked(close=True)
    assert [f[3] for f in loop.sent] == [p.FLAG_MORE, p.FLAG_LAST]
    assert bodies(loop.sent[-1]) == []  # no close message after a cancel


def test_time_blocked_on_credits_is_left_out_of_the_request_age() -> None:
    loop, stream = stream_with(0, [0.2, 10])
    started = stream.started_s
    stream.send(b"0123456789")
    assert loop.blocked_seen == [True, True]  # the heartbeat thread leaves it out of `oldest`
    assert stream.started_s - started >= 0.2
    assert not stream.blocked


def test_without_credits_pieces_are_only_capped_in_size() -> None:
    loop, stream = stream_with(None, [])
    stream.send(b"x" * (MAX_MESSAGE_BYTES + 1))
    assert [len(bodies(f)[0]) for f in loop.sent] == [MAX_MESSAGE_BYTES, 1]
