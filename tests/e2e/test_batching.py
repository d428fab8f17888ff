"""Batching on the hop: several messages in one ZeroMQ multipart message.

The broker publishes the replies of one wake-up to Mongrel2 as one multipart
message, and the relay sends a broker the Mongrel2 messages of one wake-up as
one multipart message (docs/protocol.md Appendix B). These tests pin down the
behaviour that relies on: real Mongrel2 takes every frame as a reply, the
broker serves every frame of a relay batch, and the relay keeps a broker's
messages in order around control messages.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import requests
import tnetstring
import zmq

from scale0.net.broker import Broker, LinkSpec
from scale0.net.relay import Relay
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r

from .conftest import FakeMongrel2, Stack, free_port

SENDER = b"5ca1e000-0000-4000-8000-0000000ba7c1"


def _recv(sock: zmq.Socket[bytes], timeout_s: float = 10.0) -> list[bytes]:
    if not sock.poll(int(timeout_s * 1000)):
        raise AssertionError(f"nothing received in {timeout_s} s")
    return sock.recv_multipart()


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    try:
        yield context
    finally:
        context.destroy(linger=0)


def test_mongrel2_takes_every_frame_of_a_multipart_message_as_a_reply(
        fresh_stack: Stack, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    fresh_stack.start_mongrel2()
    pull, pub = ctx.socket(zmq.PULL), ctx.socket(zmq.XPUB)
    try:
        pull.connect(fresh_stack.send_spec)
        pub.connect(fresh_stack.recv_spec)
        assert _recv(pub)[0][:1] == b"\x01"  # Mongrel2 subscribed: replies can go
        results: dict[int, requests.Response] = {}

        def get(n: int) -> None:
            results[n] = requests.get(fresh_stack.url(f"/client/{n}"), timeout=20)

        clients = [threading.Thread(target=get, args=(n,)) for n in range(3)]
        for client in clients:
            client.start()
        events = [m2.parse_message(_recv(pull)[0]) for _ in clients]
        replies = []
        for event in events:
            assert isinstance(event, m2.HttpRequest)
            body = b"answer for " + event.path
            replies.append(m2r.reply(event.sender, event.conn_id, m2r.http_response(
                200, [(b"Content-Length", b"%d" % len(body))], body)))
        pub.send_multipart(replies)  # one ZeroMQ message, three replies
        for client in clients:
            client.join(25)
    finally:
        pull.close(0)
        pub.close(0)
    assert sorted(results) == [0, 1, 2]
    for n, response in results.items():
        assert response.status_code == 200
        assert response.content == b"answer for /client/%d" % n


def _request(conn_id: int) -> bytes:
    headers = {b"METHOD": b"GET", b"VERSION": b"HTTP/1.1", b"PATH": b"/nowhere",
               b"URI": b"/nowhere", b"PATTERN": b"/", b"URL_SCHEME": b"http",
               b"REMOTE_ADDR": b"127.0.0.1", b"host": b"localhost"}
    return b"%s %d /nowhere %s0:," % (SENDER, conn_id, tnetstring.dumps(headers))


def test_a_broker_serves_every_message_of_a_relay_batch(
        ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    relay = ctx.socket(zmq.ROUTER)  # a fake relay: we play S0R1 by hand
    relay.setsockopt(zmq.LINGER, 0)
    relay_at = f"tcp://127.0.0.1:{free_port()}"
    relay.bind(relay_at)
    with FakeMongrel2() as fake, relay:
        recv_spec = fake.link.split(",")[1]
        broker = Broker([LinkSpec.parse(f"relay+{relay_at},{recv_spec}")], "tcp://127.0.0.1:0",
                        startup_grace_s=0.0, graceful_timeout_s=1.0)
        broker.start()
        thread = threading.Thread(target=broker.run)
        thread.start()
        try:
            deadline = time.monotonic() + 15
            while True:  # poll the fake SUB so its subscription goes out
                fake.sub.poll(10)
                if relay.poll(0):
                    ident, hello = relay.recv_multipart()
                    if hello.startswith(b"HELLO S0R1 "):
                        break
                assert time.monotonic() < deadline, "no HELLO from the broker"
            relay.send_multipart([ident, *(_request(n) for n in (1, 2, 3))])
            answered: dict[int, bytes] = {}
            while len(answered) < 3:
                reply = m2r.parse_reply(fake_frame(fake))
                answered[reply.conn_ids[0]] = reply.body
            assert sorted(answered) == [1, 2, 3]
            # No route at all: each one is answered 404, none lost or merged.
            assert all(body.startswith(b"HTTP/1.1 404 ") for body in answered.values())
        finally:
            broker.stop(force=True)
            thread.join(10)
            broker.close()
        assert not thread.is_alive()


def fake_frame(fake: FakeMongrel2, timeout_s: float = 10.0) -> bytes:
    """One frame from the fake Mongrel2's SUB: one reply, as Mongrel2 reads it."""
    if not fake.sub.poll(int(timeout_s * 1000)):
        raise AssertionError(f"no reply in {timeout_s} s")
    return fake.sub.recv()


def test_the_relay_batches_per_broker_and_keeps_control_messages_in_order() -> None:
    relay = Relay("tcp://127.0.0.1:1", f"tcp://127.0.0.1:{free_port()}")
    relay.start()  # binds; run() is never called, _flush is driven by hand
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    brokers = []
    try:
        for ident in (b"A", b"B"):
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.IDENTITY, ident)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(relay.endpoint)
            dealer.send(b"HELLO S0R1 100")
            brokers.append(dealer)
        router = relay._router
        assert router is not None
        for _ in brokers:
            frames = _recv(router)
            relay.core.on_broker(frames[0], frames[1], 0.0)
        a, b = brokers
        relay.core.to_brokers = [[b"A", b"m1"], [b"B", b"n1"], [b"A", b"m2"],
                                 [b"A", b"", b"HEARTBEAT"], [b"A", b"m3"], [b"B", b"n2"]]
        relay._flush(router)
        assert _recv(a) == [b"m1", b"m2"]  # everything before the control message
        assert _recv(a) == [b"", b"HEARTBEAT"]
        assert _recv(a) == [b"m3"]
        assert _recv(b) == [b"n1", b"n2"]
    finally:
        for dealer in brokers:
            dealer.close(0)
        ctx.term()
        relay.close()
