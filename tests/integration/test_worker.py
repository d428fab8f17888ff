"""The worker runtime (scale0/worker/process.py, scale0/worker/loop.py) against a fake broker: a
ROUTER on loopback speaking S0W1, driving a real Worker on a thread."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import tnetstring
import zmq

from scale0.wire import s0w1 as p
from scale0.worker.process import ReplyStream, Worker, WorkerSettings

SENDER = b"5ca1e000-0000-4000-8000-0000000e2e01"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Cmd = p.Command


def request_message(conn_id: int) -> bytes:
    headers = {b"METHOD": b"GET", b"VERSION": b"HTTP/1.1", b"PATH": b"/", b"URI": b"/",
               b"PATTERN": b"/", b"URL_SCHEME": b"http", b"host": b"localhost"}
    return b"%s %d / %s0:," % (SENDER, conn_id, tnetstring.dumps(headers))


def handler(event: object, script_name: str, path_info: str, stream: ReplyStream) -> bool:
    stream.last(RESPONSE, False)
    return False


class FakeBroker:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"

    def recv(self, timeout_s: float = 5.0) -> list[bytes]:
        assert self.router.poll(int(timeout_s * 1000)), "no message from the worker"
        return self.router.recv_multipart()

    def recv_command(self, command: p.Command, timeout_s: float = 5.0) -> list[bytes]:
        """The next message with `command`, skipping heartbeats."""
        deadline = time.monotonic() + timeout_s
        while True:
            frames = self.recv(max(0.01, deadline - time.monotonic()))
            if frames[2] == p.CMD[command]:
                return frames
            assert frames[2] == p.CMD[Cmd.HEARTBEAT], frames

    def send(self, ident: bytes, command: p.Command, *args: bytes) -> None:
        self.router.send_multipart([ident, p.VERSION, p.CMD[command], *args])

    def welcome(self, ident: bytes, heartbeat_ms: int = 60_000) -> None:
        # This fake never heartbeats: it announces a long interval, so the
        # worker (which expires a broker by WELCOME's interval x liveness) does
        # not drop it and say HELLO again while a test runs on a loaded machine.
        self.send(ident, Cmd.WELCOME, json.dumps({"broker": "fake",
                                                  "heartbeat_ms": heartbeat_ms}).encode())

    def close(self) -> None:
        self.router.close(0)
        self.ctx.term()


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    b = FakeBroker()
    try:
        yield b
    finally:
        b.close()


class Running:
    """A Worker run on a thread; `stop()` ends it and returns its exit code."""

    def __init__(self, broker: FakeBroker, threads: int = 1, heartbeat_s: float = 1.0,
                 *, also: tuple[FakeBroker, ...] = (),
                 handle: Callable[[Any, str, str, ReplyStream], bool] = handler) -> None:
        settings = WorkerSettings(connect=(broker.endpoint, *(b.endpoint for b in also)),
                                  services=(p.ServiceSpec("svc", ("/",)),), capacity=threads,
                                  heartbeat_s=heartbeat_s, graceful_timeout_s=5.0,
                                  label="test")
        self.worker = Worker(handle, settings)
        self.code: list[int] = []
        self.thread = threading.Thread(target=lambda: self.code.append(self.worker.run()))
        self.thread.start()

    def join(self, timeout_s: float = 10.0) -> int:
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the worker did not stop"
        return self.code[0]

    def stop(self) -> int:
        self.worker.stop()
        return self.join()


def test_each_thread_says_hello_as_a_worker_of_capacity_one(broker: FakeBroker) -> None:
    running = Running(broker, threads=2)
    try:
        hellos = [broker.recv_command(Cmd.HELLO) for _ in range(2)]
        assert len({h[0] for h in hellos}) == 2  # two identities: two workers
        decoded = sorted((p.Hello.decode(h[3]) for h in hellos), key=lambda h: h.worker)
        assert [(h.worker, h.capacity) for h in decoded] == [("test/0", 1), ("test/1", 1)]
        assert [h.meta["thread"] for h in decoded] == ["0", "1"]
        assert {h.meta["pid"] for h in decoded} == {str(os.getpid())}
    finally:
        assert running.stop() == 0


def test_a_small_response_is_one_last_reply_message(broker: FakeBroker) -> None:
    running = Running(broker)
    try:
        ident = broker.recv_command(Cmd.HELLO)[0]
        broker.welcome(ident)
        rid = p.encode_request_id(7)
        broker.send(ident, Cmd.REQUEST, rid, b"svc", b"", request_message(3))
        reply = broker.recv_command(Cmd.REPLY)
        assert reply[3:] == [rid, p.FLAG_LAST, SENDER + b" 1:3, " + RESPONSE]
    finally:
        assert running.stop() == 0


def test_stop_drains_waits_for_the_ack_then_says_bye(broker: FakeBroker) -> None:
    running = Running(broker)
    ident = broker.recv_command(Cmd.HELLO)[0]
    broker.welcome(ident)
    # A reply after the WELCOME: the worker has read it (one socket keeps order).
    broker.send(ident, Cmd.REQUEST, p.encode_request_id(1), b"svc", b"", request_message(1))
    broker.recv_command(Cmd.REPLY)
    running.worker.stop()
    assert broker.recv_command(Cmd.DRAIN)[0] == ident
    assert running.thread.is_alive()  # it waits for our DRAIN, the proof nothing is on its way
    broker.send(ident, Cmd.DRAIN)
    assert broker.recv_command(Cmd.BYE)[0] == ident
    assert running.join() == 0  # every socket closed: Context.term() returned


def test_error_before_welcome_exits_3(broker: FakeBroker) -> None:
    running = Running(broker)
    ident = broker.recv_command(Cmd.HELLO)[0]
    broker.send(ident, Cmd.ERROR, b"400", b"bad HELLO")
    assert running.join() == 3


def test_the_broker_is_expired_by_its_welcome_interval(broker: FakeBroker) -> None:
    """Our own heartbeat is 5 s (silence 15 s); the broker announces 50 ms, so
    we heartbeat at its pace and give it up after 3 x 50 ms of silence."""
    running = Running(broker, heartbeat_s=5.0)
    try:
        first = broker.recv_command(Cmd.HELLO)[0]
        broker.welcome(first, heartbeat_ms=50)
        beat = broker.recv(timeout_s=2.0)  # not 5 s: the broker's interval
        assert beat[:3] == [first, p.VERSION, p.CMD[Cmd.HEARTBEAT]]
        again = broker.recv_command(Cmd.HELLO, timeout_s=5.0)  # we stay silent
        assert again[0] != first  # a new DEALER: a new identity
    finally:
        assert running.stop() == 0


def test_the_request_window_frame_bounds_the_reply_until_credits_come(
        broker: FakeBroker) -> None:
    running = Running(broker)
    try:
        ident = broker.recv_command(Cmd.HELLO)[0]
        broker.welcome(ident)
        rid = p.encode_request_id(9)
        # protocol.md 3.3: what is left of the connection's window, here 10 bytes.
        broker.send(ident, Cmd.REQUEST, rid, b"svc", b"", request_message(4), b"10")
        prefix = SENDER + b" 1:4, "
        first = broker.recv_command(Cmd.REPLY)
        assert first[3:] == [rid, p.FLAG_MORE, prefix + RESPONSE[:10]]
        deadline = time.monotonic() + 0.2  # the rest waits for credits: no REPLY meanwhile
        while (left := deadline - time.monotonic()) > 0 and broker.router.poll(
                int(left * 1000) + 1):
            assert broker.router.recv_multipart()[2] == p.CMD[Cmd.HEARTBEAT]
        broker.send(ident, Cmd.CREDIT, rid, b"%d" % len(RESPONSE))
        last = broker.recv_command(Cmd.REPLY)
        assert last[3:] == [rid, p.FLAG_LAST, prefix + RESPONSE[10:]]
    finally:
        assert running.stop() == 0


def test_a_long_request_leaves_the_other_brokers_until_it_is_over(broker: FakeBroker) -> None:
    """Capacity 1 at each broker: while broker A's request runs long, broker B
    must not send this loop a request that would wait behind it."""
    other = FakeBroker()
    release = threading.Event()

    def slow(event: object, script_name: str, path_info: str, stream: ReplyStream) -> bool:
        release.wait(20)
        stream.last(RESPONSE, False)
        return False

    running = Running(broker, also=(other,), handle=slow)
    try:
        a = broker.recv_command(Cmd.HELLO)[0]
        b = other.recv_command(Cmd.HELLO)[0]
        broker.welcome(a)
        other.welcome(b)
        rid = p.encode_request_id(5)
        broker.send(a, Cmd.REQUEST, rid, b"svc", b"", request_message(5))
        assert other.recv_command(Cmd.BYE, timeout_s=10)[0] == b  # it left B...
        release.set()
        assert broker.recv_command(Cmd.REPLY)[3:5] == [rid, p.FLAG_LAST]
        again = other.recv_command(Cmd.HELLO, timeout_s=10)  # ...and is back when done
        assert again[0] != b
    finally:
        release.set()
        assert running.stop() == 0
        other.close()


def test_a_request_waiting_behind_a_long_one_is_returned_when_recalled(
        broker: FakeBroker) -> None:
    """Prefetch (docs/protocol.md 4.6): REQUESTs sent while the app runs wait
    in order; a RECALL of one that has not started is answered RETURN while
    the app still runs; a RECALL of the running one is ignored (it ends with
    its LAST), and the rest run in order."""
    started = threading.Event()
    release = threading.Event()
    ran: list[int] = []

    def first_is_slow(event: Any, script_name: str, path_info: str,
                      stream: ReplyStream) -> bool:
        ran.append(event.conn_id)
        if event.conn_id == 1:
            started.set()
            release.wait(20)
        stream.last(RESPONSE, False)
        return False

    running = Running(broker, handle=first_is_slow)
    try:
        hello = broker.recv_command(Cmd.HELLO)
        ident = hello[0]
        assert p.Hello.decode(hello[3]).prefetch > 0  # --prefetch's default
        broker.welcome(ident)
        rids = {n: p.encode_request_id(100 + n) for n in (1, 2, 3)}
        broker.send(ident, Cmd.REQUEST, rids[1], b"svc", b"", request_message(1))
        assert started.wait(10)
        for n in (2, 3):  # they wait behind request 1
            broker.send(ident, Cmd.REQUEST, rids[n], b"svc", b"", request_message(n))
        broker.send(ident, Cmd.RECALL, rids[2])
        broker.send(ident, Cmd.RECALL, rids[1])  # running: not ours to give back
        returned = broker.recv_command(Cmd.RETURN, timeout_s=10)
        assert returned[3:] == [rids[2]] and not release.is_set()  # while 1 still runs
        release.set()
        replies = [broker.recv_command(Cmd.REPLY)[3:5] for _ in range(2)]
        assert replies == [[rids[1], p.FLAG_LAST], [rids[3], p.FLAG_LAST]]
    finally:
        release.set()
        assert running.stop() == 0
    assert ran == [1, 3]  # request 2 never ran here: it went back
