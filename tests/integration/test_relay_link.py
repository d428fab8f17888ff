"""A broker's relay link over real sockets: a fake relay (a ROUTER speaking
S0R1) and a raw S0W1 worker, the broker's own loop in a thread.

The case here is the end of the handover when replies go through the
relay: requests the relay sent before it read our LEAVE are answered after
it, and their replies must reach the relay even when BYE comes right after
them. `zmq_disconnect` drops what a DEALER still has queued, so the broker
must not disconnect its link once replies can be in it.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zmq

from scale0.net.broker import Broker, LinkSpec
from scale0.wire import s0r1
from scale0.wire import s0w1 as p
from tests.unit.test_dispatch import SENDER, m2_request

# Large enough that the broker's last replies still wait in its DEALER (not
# yet in the kernel) when BYE comes, as they do on a loaded machine.
PAYLOAD = b"x" * 65536
HEARTBEAT_S = 0.25  # the workers HELLO with heartbeat_ms 1000
BODY = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(PAYLOAD), PAYLOAD)


def _wait(ready: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


class RawWorker(threading.Thread):
    """Answers every REQUEST at once with one LAST REPLY; counts the answers."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        super().__init__(daemon=True)
        self.ctx, self.endpoint = ctx, endpoint
        self.welcomed = threading.Event()
        self.stopping = threading.Event()
        self.answered = 0
        self._beat_at = 0.0

    def beat(self, sock: zmq.Socket[bytes]) -> None:
        """HEARTBEAT every HEARTBEAT_S, as a real worker does: however slowly a
        loaded machine runs the test, the broker must not expire this worker."""
        now = time.monotonic()
        if now >= self._beat_at:
            sock.send_multipart([p.VERSION, p.CMD[p.Command.HEARTBEAT]])
            self._beat_at = now + HEARTBEAT_S

    def connect(self, label: str) -> zmq.Socket[bytes]:
        """A DEALER to the broker, its HELLO sent (service app on /, capacity 1000)."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        hello = {"services": [{"name": "app", "routes": ["/"]}], "capacity": 1000,
                 "worker": label, "heartbeat_ms": 1000}
        sock.send_multipart([p.VERSION, p.CMD[p.Command.HELLO], json.dumps(hello).encode()])
        return sock

    def run(self) -> None:
        sock = self.connect("raw")
        try:
            while not self.stopping.is_set():
                self.beat(sock)
                if not sock.poll(20):
                    continue
                frames = sock.recv_multipart()
                command = frames[1]
                if command == p.CMD[p.Command.WELCOME]:
                    self.welcomed.set()
                elif command == p.CMD[p.Command.REQUEST]:
                    raw = frames[5]
                    sender, conn_id = raw.split(b" ", 2)[:2]
                    reply = b"%s %d:%s, %s" % (sender, len(conn_id), conn_id, BODY)
                    sock.send_multipart([p.VERSION, p.CMD[p.Command.REPLY], frames[2],
                                         b"\x01", reply])
                    self.answered += 1
        finally:
            sock.close(0)


def _release(message: bytes) -> tuple[bytes, int] | None:
    """(connection key, count) of a RELEASE; None for any other command."""
    if not message.startswith(s0r1.RELEASE + b" "):
        return None
    command = s0r1.parse_command(message)
    assert isinstance(command, s0r1.Release)
    return command.key, command.n


class FakeRelay:
    """The relay's end of S0R1: a ROUTER that collects the replies it is sent."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.broker = b""  # the broker's routing id, from its HELLO
        self.replies: list[bytes] = []

    def _read(self) -> bytes | None:
        """One message within 20 ms: replies are collected, a command returned."""
        if not self.sock.poll(20):
            return None
        ident, *frames = self.sock.recv_multipart()
        message = s0r1.split_from_broker(frames)
        if isinstance(message, s0r1.Replies):
            self.replies.extend(message.replies)
            return None
        self.broker = ident
        return message

    def _commands(self, timeout_s: float, awaited: bytes) -> Iterator[bytes]:
        """The broker's commands as they come, replies collected meanwhile;
        AssertionError once `timeout_s` passes without the caller's `awaited`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            message = self._read()
            if message is not None:
                yield message
        raise AssertionError(f"the broker sent no {awaited.decode()}")

    def expect(self, command: bytes, timeout_s: float = 10.0) -> None:
        """Read until the broker sends `command`, collecting replies meanwhile."""
        for message in self._commands(timeout_s, command):
            if message.split(b" ")[0] == command:
                return

    def expect_release(self, timeout_s: float = 10.0) -> tuple[bytes, int]:
        """The next RELEASE the broker sends: (connection key, count)."""
        for message in self._commands(timeout_s, s0r1.RELEASE):
            release = _release(message)
            if release is not None:
                return release
        raise AssertionError("unreachable: _commands raises when time is up")

    def until_leave(self, timeout_s: float = 10.0) -> list[tuple[bytes, int]]:
        """Read until the broker's LEAVE; the RELEASEs (key, count) before it."""
        releases: list[tuple[bytes, int]] = []
        for message in self._commands(timeout_s, s0r1.LEAVE):
            if message == s0r1.LEAVE:
                return releases
            release = _release(message)
            if release is not None:
                releases.append(release)
        raise AssertionError("unreachable: _commands raises when time is up")

    def collect(self, n: int, timeout_s: float = 10.0, *, slowly: bool = False) -> None:
        """Up to `n` replies in all. `slowly`: a relay that reads one message
        per millisecond, so the broker's side of the link stays backed up."""
        deadline = time.monotonic() + timeout_s
        while len(self.replies) < n and time.monotonic() < deadline:
            if slowly:
                time.sleep(0.001)
            self._read()

    def send_requests(self, conn_ids: range) -> None:
        self.sock.send_multipart([self.broker, *(m2_request(c, b"/") for c in conn_ids)])

    def send(self, control: s0r1.Control) -> None:
        self.sock.send_multipart([self.broker, *s0r1.control_message(control)])


@contextlib.contextmanager
def broker_with(relay: FakeRelay, ctx: zmq.Context[zmq.Socket[bytes]],
                worker_type: type[RawWorker]) -> Iterator[tuple[Broker, Any, threading.Thread]]:
    """A broker linked to `relay` only, its loop on a thread, and a worker of
    `worker_type` WELCOMEd by it; everything is stopped on the way out."""
    broker = Broker([LinkSpec.parse(f"relay+tcp://127.0.0.1:{relay.port}")],
                    "tcp://127.0.0.1:0", context=ctx, startup_grace_s=0.0)

    def run() -> None:
        try:
            broker.run()
        finally:
            broker.close()

    loop = threading.Thread(target=run, daemon=True)
    worker: RawWorker | None = None
    try:
        loop.start()
        _wait(lambda: bool(broker.endpoint), "the broker to bind")
        worker = worker_type(ctx, broker.endpoint)
        worker.start()
        assert worker.welcomed.wait(10), "the broker did not WELCOME the worker"
        relay.expect(s0r1.HELLO)
        yield broker, worker, loop
    finally:
        broker.stop(force=True)
        loop.join(10)
        if worker is not None:
            worker.stopping.set()
            worker.join(10)
        relay.sock.close(0)


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


def test_replies_to_requests_read_between_leave_and_bye_reach_the_relay(
        ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    relay = FakeRelay(ctx)
    with broker_with(relay, ctx, RawWorker) as (broker, _, loop):
        relay.send_requests(range(1, 21))
        relay.collect(20)
        assert len(relay.replies) == 20
        broker.stop()
        relay.expect(s0r1.DRAIN)
        relay.expect(s0r1.LEAVE)
        # Sent before this relay read LEAVE: the broker serves them too.
        relay.send_requests(range(21, 221))
        relay.send(s0r1.Control.BYE)  # the broker answers them after it
        relay.collect(220, slowly=True)
        loop.join(10)
        assert not loop.is_alive(), "the broker did not stop"
        answered = sorted(int(r.split(b" ")[1].split(b":")[1].rstrip(b",")) for r in relay.replies)
        assert answered == list(range(1, 221))
        assert all(r.startswith(SENDER + b" ") for r in relay.replies)


class HoldingWorker(RawWorker):
    """Holds every REQUEST until `answer(conn_id)`; then one LAST REPLY."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str) -> None:
        super().__init__(ctx, endpoint)
        self.held: dict[bytes, list[bytes]] = {}  # conn id -> the REQUEST's frames
        self.received: dict[bytes, int] = {}  # conn id -> REQUESTs of it so far
        self._release: list[bytes] = []
        self._lock = threading.Lock()

    def answer(self, conn_id: int) -> None:
        with self._lock:
            self._release.append(b"%d" % conn_id)

    def holds(self, conn_id: int, requests: int = 1) -> bool:
        """It holds a request of `conn_id`, its `requests`th."""
        with self._lock:
            key = b"%d" % conn_id
            return key in self.held and self.received.get(key) == requests

    def run(self) -> None:
        sock = self.connect("holding")
        try:
            while not self.stopping.is_set():
                self.beat(sock)
                with self._lock:
                    release, self._release = self._release, []
                    for conn_id in release:
                        frames = self.held.pop(conn_id)
                        reply = b"%s %d:%s, %s" % (SENDER, len(conn_id), conn_id, BODY)
                        sock.send_multipart([p.VERSION, p.CMD[p.Command.REPLY], frames[2],
                                             b"\x01", reply])
                if not sock.poll(5):
                    continue
                frames = sock.recv_multipart()
                if frames[1] == p.CMD[p.Command.WELCOME]:
                    self.welcomed.set()
                elif frames[1] == p.CMD[p.Command.REQUEST]:
                    conn_id = frames[5].split(b" ", 2)[1]
                    with self._lock:
                        self.held[conn_id] = frames
                        self.received[conn_id] = self.received.get(conn_id, 0) + 1
        finally:
            sock.close(0)


def test_a_draining_broker_releases_each_connection_once_it_holds_nothing_of_it(
        ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """Appendix B, RELEASE: after DRAINING, a connection whose request is over
    is RELEASEd with the count of its messages read since; one still held
    is not; LEAVE comes once nothing is held at all."""
    relay = FakeRelay(ctx)
    with broker_with(relay, ctx, HoldingWorker) as (broker, worker, loop):
        relay.send_requests(range(1, 4))
        _wait(lambda: all(worker.holds(c) for c in (1, 2, 3)), "three requests held")
        broker.stop()
        relay.expect(s0r1.DRAIN)
        relay.send(s0r1.Control.DRAINING)
        worker.answer(1)
        assert relay.expect_release() == (SENDER + b" 1", 0)
        relay.send_requests(range(2, 3))  # conn 2 again (pipelined): read since DRAINING
        worker.answer(2)
        _wait(lambda: worker.holds(2, requests=2), "the second request of conn 2")
        worker.answer(2)
        assert relay.expect_release() == (SENDER + b" 2", 1)
        worker.answer(3)  # the last one: LEAVE, maybe after its RELEASE (LEAVE covers it)
        assert relay.until_leave() in ([], [(SENDER + b" 3", 0)])
        relay.send(s0r1.Control.BYE)
        loop.join(10)
        assert not loop.is_alive(), "the broker did not stop"
