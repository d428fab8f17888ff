"""Tests for scale0.core.dispatch: the broker's pure core, driven with a fake `now`.

No sockets and no sleeping: each test feeds Mongrel2 messages and S0W1 worker
frames to a `Dispatcher`, then drains and inspects its two outboxes. Every
step also runs `check_invariants()`.
"""

from __future__ import annotations

import json
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

import pytest
import tnetstring
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from scale0.core.dispatch import Dispatcher, DispatchSettings
from scale0.wire import mongrel2 as m2
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p

SENDER = b"f9a3b8c2-0000-4000-8000-000000000001"
SENDER_2 = b"f9a3b8c2-0000-4000-8000-000000000002"
OK_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Cmd = p.Command

# ---- building Mongrel2 messages (tnetstring handler protocol) ----------------


def m2_message(sender: bytes, conn_id: int, path: bytes, headers: dict[bytes, bytes],
               body: bytes = b"") -> bytes:
    """SENDER SP ID SP PATH SP tnetstring(headers) netstring(body)."""
    head: bytes = tnetstring.dumps(headers)
    return b"%s %d %s %s%d:%s," % (sender, conn_id, path, head, len(body), body)


def m2_request(conn_id: int, path: bytes = b"/app", *, method: bytes = b"GET",
               host: bytes = b"localhost", body: bytes = b"", version: bytes = b"HTTP/1.1",
               sender: bytes = SENDER, extra: dict[bytes, bytes] | None = None) -> bytes:
    headers = {
        b"METHOD": method, b"VERSION": version, b"PATH": path, b"URI": path,
        b"PATTERN": b"/", b"URL_SCHEME": b"http", b"REMOTE_ADDR": b"127.0.0.1",
        b"host": host,
    }
    if body:
        headers[b"content-length"] = b"%d" % len(body)
    headers.update(extra or {})
    return m2_message(sender, conn_id, path, headers, body)


def m2_disconnect(conn_id: int, sender: bytes = SENDER) -> bytes:
    return m2_message(sender, conn_id, b"@*", {b"METHOD": b"JSON"}, b'{"type":"disconnect"}')


def m2_credits(conn_id: int, credits: int, sender: bytes = SENDER) -> bytes:
    headers = {b"METHOD": b"JSON", b"DOWNLOAD_CREDITS": b"%d" % credits}
    return m2_message(sender, conn_id, b"@*", headers, b'{"type":"credits"}')


def m2_upload(conn_id: int, start: bytes, done: bytes | None = None,
              path: bytes = b"/app/up") -> bytes:
    """The upload-start message (done=None) or the upload-done one."""
    extra = {b"x-mongrel2-upload-start": start, b"content-length": b"5000"}
    if done is not None:
        extra[b"x-mongrel2-upload-done"] = done
    return m2_request(conn_id, path, method=b"POST", extra=extra)


def ok_reply(sender: bytes, conn_id: int, response: bytes = OK_RESPONSE) -> bytes:
    return m2r.reply(sender, conn_id, response)


# ---- reading the outboxes -------------------------------------------------------


@dataclass(frozen=True)
class ToWorker:
    ident: bytes
    command: p.Command
    args: tuple[bytes, ...]

    @property
    def rid(self) -> int:
        return p.decode_request_id(self.args[0])


@dataclass(frozen=True)
class Sent:
    """A REQUEST handed to a worker."""

    ident: bytes
    rid_frame: bytes
    service: bytes
    script_name: bytes
    raw: bytes
    window: bytes | None = None  # download credits left on the connection, if flow-controlled

    @property
    def rid(self) -> int:
        return p.decode_request_id(self.rid_frame)

    @property
    def event(self) -> m2.Message:
        event = m2.parse_message(self.raw)
        assert isinstance(event, m2.Message)
        return event

    @property
    def conn_id(self) -> int:
        return self.event.conn_id


@dataclass(frozen=True)
class ToClient:
    link: int
    sender: bytes
    conn_id: int
    body: bytes

    @property
    def status(self) -> int | None:
        """The HTTP status if this message starts a response, else None."""
        if not self.body.startswith(b"HTTP/1."):
            return None
        return int(self.body[9:12])

    @property
    def headers(self) -> dict[bytes, bytes]:
        head = self.body.split(b"\r\n\r\n", 1)[0]
        pairs = [line.split(b": ", 1) for line in head.split(b"\r\n")[1:]]
        return {name.lower(): value for name, value in pairs}

    @property
    def is_close(self) -> bool:
        return self.body == b""


def to_client(link: int, message: bytes) -> ToClient:
    parsed = m2r.parse_reply(message)
    assert not parsed.ctl and len(parsed.conn_ids) == 1
    return ToClient(link, parsed.sender, parsed.conn_ids[0], parsed.body)


class Harness:
    """A Dispatcher plus a fake clock; every step checks the invariants, and
    every worker command the S0W1 transition table (core/worker_states.py)."""

    def __init__(self, **overrides: object) -> None:
        overrides.setdefault("heartbeat_s", 100.0)  # no heartbeat expiry unless asked
        self.d = Dispatcher(DispatchSettings(**overrides))  # type: ignore[arg-type]
        self.d.check_transitions = True
        self.now = 0.0
        self.tick(0.0)  # start the heartbeat clock: the next one is due at heartbeat_s

    # -- input
    def m2(self, raw: bytes, link: int = 0) -> None:
        self.d.on_mongrel2(link, raw, self.now)
        self.d.check_invariants()

    def request(self, conn_id: int, path: bytes = b"/app", *, link: int = 0,
                **kwargs: object) -> bytes:
        raw = m2_request(conn_id, path, **kwargs)  # type: ignore[arg-type]
        self.m2(raw, link)
        return raw

    def frames(self, ident: bytes, frames: list[bytes]) -> None:
        self.d.on_worker(ident, frames, self.now)
        self.d.check_invariants()

    def worker(self, ident: bytes, command: p.Command, *args: bytes) -> None:
        self.frames(ident, [p.VERSION, p.CMD[command], *args])

    def hello(self, ident: bytes, services: dict[str, tuple[str, ...]] | None = None,
              capacity: int = 1, heartbeat_ms: int = 0, prefetch: int = 0) -> None:
        """Register a worker (default: service 'app' at '/app') and eat its WELCOME."""
        if services is None:
            services = {"app": ("/app",)}
        specs = tuple(p.ServiceSpec(name, routes) for name, routes in services.items())
        # Configured alike: the worker announces the broker's own interval.
        heartbeat_ms = heartbeat_ms or min(int(self.d.settings.heartbeat_s * 1000), 600_000)
        self.worker(ident, Cmd.HELLO, p.Hello(specs, capacity, worker=ident.decode(),
                                              heartbeat_ms=heartbeat_ms,
                                              prefetch=prefetch).encode())
        welcome = [f for f in self.d.to_workers if f[2] == p.CMD[Cmd.WELCOME]]
        assert [f[0] for f in welcome] == [ident]
        assert json.loads(welcome[0][3])["heartbeat_ms"] == int(
            self.d.settings.heartbeat_s * 1000)
        self.d.to_workers.remove(welcome[0])  # keep anything else (a retried request)

    def reply(self, sent: Sent, *messages: bytes, last: bool = True,
              ident: bytes | None = None) -> None:
        flag = p.FLAG_LAST if last else p.FLAG_MORE
        self.worker(ident or sent.ident, Cmd.REPLY, sent.rid_frame, flag, *messages)

    def serve(self, sent: Sent, response: bytes = OK_RESPONSE) -> None:
        """The worker answers `sent` in one LAST reply."""
        event = sent.event
        self.reply(sent, ok_reply(event.sender, event.conn_id, response))

    def tick(self, now: float) -> None:
        self.now = now
        self.d.on_tick(now)
        self.d.check_invariants()

    # -- output
    def take_workers(self) -> list[ToWorker]:
        out, self.d.to_workers = self.d.to_workers, []
        for frames in out:
            assert frames[1] == p.VERSION and len(frames[2]) == 1
        return [ToWorker(f[0], p.Command(f[2][0]), tuple(f[3:])) for f in out]

    def take_requests(self) -> list[Sent]:
        """REQUESTs sent to workers; anything else in the outbox fails the test."""
        out = self.take_workers()
        assert all(m.command == Cmd.REQUEST for m in out), out
        for m in out:
            assert len(m.args) in (4, 5)
        return [Sent(m.ident, *m.args) for m in out]

    def take_one_request(self) -> Sent:
        sent = self.take_requests()
        assert len(sent) == 1, sent
        return sent[0]

    def take_mongrel2(self) -> list[ToClient]:
        out, self.d.to_mongrel2 = self.d.to_mongrel2, []
        return [to_client(link, message) for link, message in out]

    def take_error(self, status: int, conn_id: int, *, link: int = 0, sender: bytes = SENDER,
                   close: bool = False) -> ToClient:
        """Exactly one error response to the conn (plus a close if `close`)."""
        out = self.take_mongrel2()
        assert [(m.link, m.sender, m.conn_id) for m in out] == [(link, sender, conn_id)] * (
            2 if close else 1), out
        assert out[0].status == status, out[0].body
        assert out[0].headers[b"content-length"] == b"%d" % len(
            out[0].body.split(b"\r\n\r\n", 1)[1])
        assert (out[0].headers.get(b"connection") == b"close") is close
        if close:
            assert out[1].is_close
        return out[0]

    def quiet(self) -> None:
        """Nothing was sent anywhere."""
        assert self.d.to_workers == [] and self.d.to_mongrel2 == []

    def ready(self, service: str) -> list[bytes]:
        return list(self.d.services[service].ready)


# ---- routing ------------------------------------------------------------------------


def test_announced_route_sends_request_to_worker_and_reply_back_unchanged() -> None:
    h = Harness()
    h.hello(b"w1", {"app": ("/app",)})
    raw = h.request(5, b"/app/x?y=1", link=1)
    sent = h.take_one_request()
    assert (sent.ident, sent.service, sent.script_name, sent.raw) == (b"w1", b"app", b"/app", raw)
    h.quiet()
    message = ok_reply(SENDER, 5)
    h.reply(sent, message)
    assert h.d.to_mongrel2 == [(1, message)]  # forwarded byte for byte, to the request's link
    h.d.to_mongrel2.clear()
    assert h.d.requests == {} and h.d.connections == {}
    assert h.d.counters.requests == 1 and h.d.counters.replies == 1
    assert h.d.workers[b"w1"].served == 1


def test_root_route_has_empty_script_name_and_host_routes_match_host() -> None:
    h = Harness()
    h.hello(b"w1", {"site": ("/",)})
    h.hello(b"w2", {"api": ("example.com/api",)})
    h.request(1, b"/api/v1", host=b"example.com:8080")
    sent = h.take_one_request()
    assert (sent.ident, sent.service, sent.script_name) == (b"w2", b"api", b"/api")
    h.request(2, b"/api/v1", host=b"other.org")
    sent = h.take_one_request()
    assert (sent.ident, sent.service, sent.script_name) == (b"w1", b"site", b"")


def test_no_route_answers_404_to_the_right_link_sender_and_conn() -> None:
    h = Harness()
    h.hello(b"w1", {"app": ("/app",)})
    h.request(7, b"/apple", link=2, sender=SENDER_2)
    h.take_error(404, 7, link=2, sender=SENDER_2)
    h.quiet()
    assert h.d.counters.no_route == 1 and h.d.requests == {} and h.d.connections == {}


def test_no_route_at_all_answers_404() -> None:
    h = Harness()
    h.request(1, b"/")
    h.take_error(404, 1)


def test_configured_route_wins_over_announced_one() -> None:
    # Changed with route ownership: a HELLO for another service on a configured
    # route is refused whole (it used to register, minus that route).
    h = Harness(routes=(("/x", "svc"),))
    h.worker(b"intruder", Cmd.HELLO, p.Hello((p.ServiceSpec("other", ("/x", "/y")),), 1,
                                             worker="intruder").encode())
    (error,) = h.take_workers()
    assert (error.ident, error.command, error.args[0]) == (b"intruder", Cmd.ERROR, b"409")
    assert error.args[1] == (b"route /x belongs to service svc (the broker's route table); "
                             b"not taken over by service other")
    assert b"intruder" not in h.d.workers and "other" not in h.d.services
    assert h.d.counters.hello_conflicts == 1
    # The configured service has no worker yet: 503, and /y was never added.
    h.request(1, b"/x/1")
    assert h.take_error(503, 1).headers[b"retry-after"] == b"5"
    h.request(2, b"/y")
    h.take_error(404, 2)
    h.hello(b"real", {"svc": ("/x",)})  # its own service may announce it
    h.request(3, b"/x/2")
    sent = h.take_one_request()
    assert (sent.ident, sent.service, sent.script_name) == (b"real", b"svc", b"/x")


def test_configured_service_without_worker_is_503_with_retry_after_at_once() -> None:
    h = Harness(routes=(("/x", "svc"),), retry_after_s=17)
    h.request(1, b"/x")
    error = h.take_error(503, 1)
    assert error.headers[b"retry-after"] == b"17"
    assert h.d.counters.no_worker == 1 and h.d.requests == {} and h.d.connections == {}


# ---- LRU ready queue ------------------------------------------------------------


def test_lru_three_workers_of_capacity_one() -> None:
    h = Harness()
    for ident in (b"w1", b"w2", b"w3"):
        h.hello(ident)
    assert isinstance(h.d.services["app"].ready, OrderedDict)  # O(1) pop-oldest/move
    assert h.ready("app") == [b"w1", b"w2", b"w3"]
    sent = {}
    for conn in (1, 2, 3):
        h.request(conn)
        s = h.take_one_request()
        sent[s.ident] = s
    assert list(sent) == [b"w1", b"w2", b"w3"]  # least recently used first
    assert h.ready("app") == []
    h.serve(sent[b"w2"])
    h.serve(sent[b"w1"])
    h.take_mongrel2()
    assert h.ready("app") == [b"w2", b"w1"]  # a worker that finishes goes to the back
    h.request(4)
    assert h.take_one_request().ident == b"w2"
    h.request(5)
    s5 = h.take_one_request()
    assert s5.ident == b"w1"
    h.serve(s5)
    h.serve(sent[b"w3"])
    h.take_mongrel2()
    assert h.ready("app") == [b"w1", b"w3"]


def test_lru_rotates_through_idle_workers() -> None:
    h = Harness()
    for ident in (b"w1", b"w2", b"w3"):
        h.hello(ident)
    order = []
    for conn in range(1, 7):
        h.request(conn)
        s = h.take_one_request()
        order.append(s.ident)
        h.serve(s)
        h.take_mongrel2()
    assert order == [b"w1", b"w2", b"w3"] * 2


def test_worker_serving_two_services_is_in_each_ready_queue_once() -> None:
    h = Harness()
    h.hello(b"w1", {"a": ("/a",), "b": ("/b",)}, capacity=2)
    h.hello(b"w2", {"b": ()})
    assert h.ready("a") == [b"w1"] and h.ready("b") == [b"w1", b"w2"]
    h.request(1, b"/a")
    s1 = h.take_one_request()
    assert s1.ident == b"w1" and s1.service == b"a"
    # One slot left: still ready for both, once each, and now behind w2 for b.
    assert h.ready("a") == [b"w1"] and h.ready("b") == [b"w1", b"w2"]
    h.request(2, b"/b")
    s2 = h.take_one_request()
    assert s2.ident == b"w1"
    assert h.ready("a") == [] and h.ready("b") == [b"w2"]
    h.serve(s1)
    h.take_mongrel2()
    assert h.ready("a") == [b"w1"] and h.ready("b") == [b"w2", b"w1"]


def test_capacity_is_never_exceeded() -> None:
    h = Harness()
    h.hello(b"w1", capacity=3)
    h.hello(b"w2", capacity=2)
    for conn in range(1, 21):
        h.request(conn)
    in_flight: dict[bytes, list[Sent]] = {b"w1": [], b"w2": []}
    order: list[int] = []
    for sent in h.take_requests():
        in_flight[sent.ident].append(sent)
    assert {k: len(v) for k, v in in_flight.items()} == {b"w1": 3, b"w2": 2}
    assert len(h.d.services["app"].queue) == 15
    while any(in_flight.values()):
        for ident in (b"w2", b"w1"):  # w2 answers first each round
            if in_flight[ident]:
                done = in_flight[ident].pop(0)
                order.append(done.conn_id)
                h.serve(done)
                (answer,) = h.take_mongrel2()
                assert answer.conn_id == done.conn_id
                for sent in h.take_requests():
                    in_flight[sent.ident].append(sent)
            assert len(in_flight[b"w1"]) <= 3 and len(in_flight[b"w2"]) <= 2
    assert sorted(order) == list(range(1, 21))
    assert h.d.requests == {} and h.d.counters.replies == 20


# ---- the service queue --------------------------------------------------------


def test_busy_workers_queue_requests_oldest_first_across_services() -> None:
    h = Harness()
    h.hello(b"w1", {"a": ("/a",), "b": ("/b",)})
    h.request(1, b"/a")
    busy = h.take_one_request()
    for conn, path, now in ((2, b"/b", 1.0), (3, b"/a", 2.0), (4, b"/b", 3.0), (5, b"/a", 4.0)):
        h.now = now
        h.request(conn, path)
        h.quiet()
    assert len(h.d.services["a"].queue) == 2 and len(h.d.services["b"].queue) == 2
    order = []
    current = busy
    for _ in range(4):
        h.serve(current)
        h.take_mongrel2()
        current = h.take_one_request()
        order.append(current.conn_id)
    assert order == [2, 3, 4, 5]
    h.serve(current)
    h.take_mongrel2()
    h.quiet()
    assert h.ready("a") == [b"w1"] and h.d.requests == {}


def test_new_worker_takes_queued_requests() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    h.take_one_request()
    h.request(2)
    h.request(3)
    h.quiet()
    h.hello(b"w2", capacity=5)
    assert [(s.ident, s.conn_id) for s in h.take_requests()] == [(b"w2", 2), (b"w2", 3)]
    assert h.ready("app") == [b"w2"]


def test_queue_full_is_503() -> None:
    h = Harness(queue_size=2)
    h.hello(b"w1")
    h.request(1)
    h.take_one_request()
    h.request(2)
    h.request(3)
    h.quiet()
    h.request(4)
    error = h.take_error(503, 4)
    assert error.headers[b"retry-after"] == b"5"
    assert h.d.counters.queue_full == 1
    assert [r.conn_id for r in h.d.services["app"].queue.values()] == [2, 3]


def test_queue_timeout_is_503_and_the_request_is_never_dispatched() -> None:
    h = Harness(queue_timeout_s=5.0)
    h.hello(b"w1")
    h.request(1)
    busy = h.take_one_request()
    h.now = 1.0
    h.request(2)
    h.now = 2.0
    h.request(3)
    assert h.d.next_deadline() == 6.0
    h.tick(5.99)
    h.quiet()
    h.tick(6.0)
    error = h.take_error(503, 2)
    assert error.headers[b"retry-after"] == b"5"
    assert h.d.counters.queue_timeouts == 1
    assert h.d.next_deadline() == 7.0
    h.tick(7.5)
    h.take_error(503, 3)
    assert h.d.counters.queue_timeouts == 2
    h.serve(busy)
    h.take_mongrel2()
    h.quiet()  # nothing left to dispatch
    assert h.d.requests == {} and h.ready("app") == [b"w1"]


# ---- request timeout ------------------------------------------------------------


def test_request_timeout_is_504_cancel_and_the_slot_frees_on_last_reply() -> None:
    h = Harness(request_timeout_s=10.0)
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    assert h.d.next_deadline() == 10.0
    h.tick(9.99)
    h.quiet()
    h.tick(10.0)
    h.take_error(504, 1)
    (cancel,) = h.take_workers()
    assert (cancel.ident, cancel.command, cancel.args) == (b"w1", Cmd.CANCEL, (sent.rid_frame,))
    assert h.d.counters.request_timeouts == 1
    # The slot stays taken until the worker's LAST reply: a new request waits.
    h.request(2)
    h.quiet()
    # Late replies to the cancelled request are swallowed, not forwarded.
    h.reply(sent, ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\n"), last=False)
    h.quiet()
    h.reply(sent, ok_reply(SENDER, 1, b"late"))
    assert h.d.to_mongrel2 == []
    assert h.d.counters.late_replies == 0  # still in flight: dropped as cancelled
    # Now the slot is free and the queued request goes out.
    s2 = h.take_one_request()
    assert s2.conn_id == 2 and s2.rid != sent.rid
    # Anything after the LAST reply is for an unknown request: a late reply.
    h.reply(sent, ok_reply(SENDER, 1))
    h.quiet()
    assert h.d.counters.late_replies == 1
    h.serve(s2)
    (answer,) = h.take_mongrel2()
    assert (answer.conn_id, answer.status) == (2, 200)
    assert h.d.requests == {}


def test_request_timeout_after_reply_started_closes_instead_of_504() -> None:
    h = Harness(request_timeout_s=10.0)
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    head = ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc")
    h.reply(sent, head, last=False)
    assert [m.body[:15] for m in h.take_mongrel2()] == [b"HTTP/1.1 200 OK"]
    h.tick(10.0)
    (close,) = h.take_mongrel2()
    assert close.is_close and close.conn_id == 1
    assert [m.command for m in h.take_workers()] == [Cmd.CANCEL]


def test_request_timeout_for_http10_closes_the_connection() -> None:
    h = Harness(request_timeout_s=10.0)
    h.hello(b"w1")
    h.request(1, version=b"HTTP/1.0")
    h.take_one_request()
    h.tick(10.0)
    h.take_error(504, 1, close=True)


def test_pipelined_request_behind_a_timed_out_one_is_not_left_hanging() -> None:
    # The worker holding the timed-out request never answers it (but stays
    # alive): the next request on that connection must still be served.
    h = Harness(request_timeout_s=10.0)
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    stuck = h.take_one_request()
    h.request(1)  # pipelined on the same connection
    h.quiet()
    h.tick(10.0)
    h.take_error(504, 1)
    msgs = h.take_workers()
    assert [(m.ident, m.command) for m in msgs] == [(stuck.ident, Cmd.CANCEL),
                                                    (b"w2", Cmd.REQUEST)]
    nxt = Sent(msgs[1].ident, *msgs[1].args)
    h.serve(nxt)
    (answer,) = h.take_mongrel2()
    assert (answer.conn_id, answer.status) == (1, 200)
    h.reply(stuck, ok_reply(SENDER, 1))  # finally: dropped, slot freed
    h.quiet()
    assert h.d.requests == {} and h.ready("app") == [b"w2", b"w1"]


def test_timeout_order_survives_a_retry() -> None:
    # A request retried on another worker gets a fresh deadline; it must not
    # hide the earlier deadlines of requests sent after its first attempt.
    h = Harness(request_timeout_s=10.0)
    for ident in (b"w1", b"w2", b"w3"):
        h.hello(ident)
    h.request(1)
    first = h.take_one_request()
    h.now = 1.0
    h.request(2)
    second = h.take_one_request()
    assert (first.ident, second.ident) == (b"w1", b"w2")
    h.now = 8.0
    h.d.remove_worker(h.d.workers[b"w1"], h.now)
    retried = h.take_one_request()
    assert (retried.ident, retried.rid) == (b"w3", first.rid)
    assert h.d.next_deadline() == 11.0
    h.tick(11.0)
    h.take_error(504, 2)
    assert [m.command for m in h.take_workers()] == [Cmd.CANCEL]
    h.tick(17.99)
    h.quiet()
    h.tick(18.0)
    h.take_error(504, 1)


def test_retried_request_that_is_queued_is_not_also_active() -> None:
    h = Harness(request_timeout_s=10.0, queue_timeout_s=5.0)
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    h.take_one_request()
    h.request(2)
    h.take_one_request()
    h.now = 3.0
    h.d.remove_worker(h.d.workers[b"w1"], h.now)  # conn 1's GET waits for w2
    h.d.check_invariants()
    h.quiet()
    assert [r.conn_id for r in h.d.services["app"].active.values()] == [2]
    assert h.d.next_deadline() == 8.0
    h.tick(8.0)
    h.take_error(503, 1)
    h.tick(10.0)
    h.take_error(504, 2)


# ---- worker failure -------------------------------------------------------------


def test_lost_worker_get_is_retried_once_on_another_worker() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    raw = h.request(1)
    sent = h.take_one_request()
    assert sent.ident == b"w1"
    h.d.remove_worker(h.d.workers[b"w1"], h.now)
    h.d.check_invariants()
    again = h.take_one_request()
    assert (again.ident, again.rid, again.raw) == (b"w2", sent.rid, raw)
    assert h.d.counters.retries == 1 and h.d.counters.worker_failures == 0
    h.quiet()
    h.d.remove_worker(h.d.workers[b"w2"], h.now)
    h.take_error(502, 1)
    assert h.d.counters.retries == 1 and h.d.counters.worker_failures == 1


def test_get_failing_twice_is_502_even_with_a_third_worker() -> None:
    h = Harness()
    for ident in (b"w1", b"w2", b"w3"):
        h.hello(ident)
    h.request(1)
    first = h.take_one_request()
    h.worker(first.ident, Cmd.BYE)
    second = h.take_one_request()
    assert second.ident == b"w2"
    h.worker(second.ident, Cmd.BYE)
    h.take_error(502, 1)
    h.quiet()
    assert h.d.counters.retries == 1 and h.d.counters.worker_failures == 1
    assert h.ready("app") == [b"w3"] and h.d.requests == {}


def test_remove_worker_is_idempotent() -> None:
    h = Harness()
    h.hello(b"w1")
    w = h.d.workers[b"w1"]
    h.d.remove_worker(w, 0.0)
    h.d.remove_worker(w, 0.0)
    h.d.check_invariants()
    assert h.d.workers == {} and h.ready("app") == []
    assert h.d.services["app"].workers == {}


def test_lost_worker_post_is_502() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1, method=b"POST", body=b"data")
    h.take_one_request()
    h.worker(b"w1", Cmd.BYE)
    h.take_error(502, 1)
    h.quiet()
    assert h.d.counters.retries == 0 and h.d.counters.worker_failures == 1
    assert h.ready("app") == [b"w2"]


def test_lost_worker_after_reply_started_closes_instead_of_502() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    sent = h.take_one_request()
    h.reply(sent, ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\n\r\npartial"), last=False)
    assert [m.status for m in h.take_mongrel2()] == [200]
    h.d.remove_worker(h.d.workers[b"w1"], h.now)
    (close,) = h.take_mongrel2()
    assert close.is_close and close.conn_id == 1
    h.quiet()  # not retried: the client already has part of a response
    assert h.d.counters.worker_failures == 1 and h.d.counters.retries == 0


def test_more_reply_without_messages_does_not_count_as_started() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    sent = h.take_one_request()
    h.reply(sent, last=False)
    h.quiet()
    h.worker(b"w1", Cmd.BYE)
    assert h.take_one_request().ident == b"w2"


def test_heartbeat_expiry_retries_in_flight_get() -> None:
    h = Harness(heartbeat_s=1.0, liveness=3)
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    sent = h.take_one_request()
    assert sent.ident == b"w1"
    for now in (1.0, 2.0):
        h.tick(now)
        assert {m.ident for m in h.take_workers()} == {b"w1", b"w2"}  # heartbeats
        h.worker(b"w2", Cmd.HEARTBEAT)
    h.tick(3.0)  # w1 silent for heartbeat_s * liveness
    msgs = h.take_workers()
    assert [(m.ident, m.command) for m in msgs] == [(b"w2", Cmd.REQUEST), (b"w2", Cmd.HEARTBEAT)]
    assert msgs[0].rid == sent.rid
    assert b"w1" not in h.d.workers and h.d.counters.retries == 1


# ---- heartbeats -----------------------------------------------------------------


def test_heartbeats_go_to_every_worker_every_interval() -> None:
    h = Harness(heartbeat_s=1.0, liveness=3)
    h.hello(b"w1")
    h.hello(b"w2", {"other": ()})
    assert h.d.next_deadline() == 1.0
    h.tick(0.5)
    h.quiet()
    h.tick(1.0)
    out = h.take_workers()
    assert sorted((m.ident, m.command, m.args) for m in out) == [
        (b"w1", Cmd.HEARTBEAT, ()), (b"w2", Cmd.HEARTBEAT, ())]
    assert h.d.next_deadline() == 2.0
    h.tick(1.99)
    h.quiet()
    h.tick(2.0)
    assert len(h.take_workers()) == 2
    assert h.d.next_deadline() == 3.0


def test_worker_that_keeps_heartbeating_stays() -> None:
    h = Harness(heartbeat_s=1.0, liveness=3)
    h.hello(b"w1")
    for step in range(40):
        now = step * 0.5
        h.tick(now)
        h.take_workers()
        h.worker(b"w1", Cmd.HEARTBEAT)
        h.quiet()
    assert b"w1" in h.d.workers and h.ready("app") == [b"w1"]


def test_expiry_after_interval_times_liveness_removes_worker_everywhere() -> None:
    h = Harness(heartbeat_s=1.0, liveness=3)
    h.hello(b"w1", {"a": ("/a",), "b": ("/b",)}, capacity=2)
    h.now = 1.5
    h.worker(b"w1", Cmd.HEARTBEAT)  # last sign of life: expires at 4.5
    for now in (1.0, 2.0, 3.0, 4.0):
        h.tick(now)
        assert [m.command for m in h.take_workers()] == [Cmd.HEARTBEAT]
    assert h.ready("a") == [b"w1"] and h.ready("b") == [b"w1"]
    h.tick(5.0)
    h.quiet()  # no heartbeat to a dead worker
    assert h.d.workers == {}
    for service in ("a", "b"):
        assert h.ready(service) == [] and h.d.services[service].workers == {}
    h.request(1, b"/a")
    h.take_error(503, 1)  # route still known, but no worker


def test_any_message_counts_as_a_sign_of_life() -> None:
    h = Harness(heartbeat_s=1.0, liveness=3)
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    h.now = 2.5
    h.reply(sent, ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\n\r\n"), last=False)
    h.take_mongrel2()
    h.tick(3.0)
    assert [m.command for m in h.take_workers()] == [Cmd.HEARTBEAT]
    assert b"w1" in h.d.workers


# ---- client disconnects ---------------------------------------------------------


def test_disconnect_removes_a_queued_request() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    busy = h.take_one_request()
    h.request(2)
    h.quiet()
    h.m2(m2_disconnect(2))
    h.quiet()
    assert h.d.counters.client_gone == 1
    assert len(h.d.services["app"].queue) == 0
    h.serve(busy)
    assert [m.conn_id for m in h.take_mongrel2()] == [1]
    h.quiet()  # conn 2's request is gone
    assert h.d.requests == {} and h.ready("app") == [b"w1"]


def test_disconnect_cancels_a_running_request_and_discards_its_reply() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    h.request(1)  # a pipelined one behind it, never sent
    h.m2(m2_disconnect(1))
    (cancel,) = h.take_workers()
    assert (cancel.ident, cancel.command, cancel.args) == (b"w1", Cmd.CANCEL, (sent.rid_frame,))
    h.quiet()
    assert h.d.connections == {} and list(h.d.requests) == [sent.rid]
    h.request(2)
    h.quiet()  # w1's slot is still held by the cancelled request
    h.reply(sent, ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\n\r\n"), last=False)
    h.reply(sent, ok_reply(SENDER, 1, b"rest"))
    assert h.d.to_mongrel2 == []
    assert h.take_one_request().conn_id == 2
    assert h.d.counters.late_replies == 0


def test_disconnect_of_unknown_connection_is_harmless() -> None:
    h = Harness()
    h.m2(m2_disconnect(42))
    h.quiet()
    assert h.d.counters.client_gone == 0 and h.d.counters.bad_mongrel2 == 0


def test_cancelled_request_of_a_dying_worker_is_forgotten() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    h.take_one_request()
    h.m2(m2_disconnect(1))
    h.take_workers()
    h.worker(b"w1", Cmd.BYE)
    h.quiet()  # neither retried nor answered
    assert h.d.requests == {} and h.d.counters.retries == 0


# ---- credits --------------------------------------------------------------------


def test_credits_are_passed_to_the_worker_of_the_active_request() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    h.m2(m2_credits(1, 65536))
    (credit,) = h.take_workers()
    assert (credit.ident, credit.command, credit.args) == (
        b"w1", Cmd.CREDIT, (sent.rid_frame, b"65536"))
    h.quiet()


def test_credits_for_queued_or_unknown_connections_are_dropped() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    h.take_one_request()
    h.request(2)  # queued
    h.m2(m2_credits(2, 100))
    h.m2(m2_credits(3, 100))
    h.m2(m2_credits(1, 100, sender=SENDER), link=1)  # same conn id, other link
    h.quiet()


FC = {b"DOWNLOAD_CREDITS": b"102400"}  # what Mongrel2 adds to a connection's first request


def body_reply(conn_id: int, n: int) -> bytes:
    """A reply message whose body (what Mongrel2 counts against credits) is n bytes."""
    return m2r.reply(SENDER, conn_id, b"x" * n)


def test_without_flow_control_a_request_carries_no_window() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    assert sent.window is None
    h.reply(sent, body_reply(1, 200_000))
    h.take_mongrel2()
    assert h.d.unacked == {} and h.d.link_credits == {}


def test_the_window_is_the_connections_and_outlives_its_requests() -> None:
    # Mongrel2 1.12 puts DOWNLOAD_CREDITS on a connection's first request only,
    # and refuses a message that would leave more than that many bytes
    # uncredited on the connection, whichever request they belong to.
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1, extra=FC)
    first = h.take_one_request()
    assert first.window == b"102400"
    h.reply(first, body_reply(1, 60_000), last=False)
    h.m2(m2_credits(1, 60_000))
    h.take_workers()  # the CREDIT for `first`
    h.reply(first, body_reply(1, 40_000))  # LAST: 40 000 bytes not yet written
    h.take_mongrel2()
    assert h.d.unacked == {(0, 1): 40_000}
    h.request(1, b"/app/again")  # no DOWNLOAD_CREDITS: not the first on its connection
    second = h.take_one_request()
    assert second.ident == b"w2" and second.window == b"62400"
    h.m2(m2_credits(1, 40_000))  # for the first reply's bytes: now the second's to use
    (credit,) = h.take_workers()
    assert (credit.ident, credit.command, credit.args) == (
        b"w2", Cmd.CREDIT, (second.rid_frame, b"40000"))
    assert h.d.unacked == {}
    h.reply(second, body_reply(1, 100))
    h.take_mongrel2()
    h.request(1, b"/app/third")
    third = h.take_one_request()
    assert third.window == b"102300"  # the second's 100 bytes are not credited yet
    h.m2(m2_credits(1, 100))
    h.take_workers()
    h.request(2)  # another connection of the same Mongrel2: its own window
    assert h.take_one_request().window == b"102400"


def test_a_credits_message_with_an_absurd_connection_id_is_counted_not_raised() -> None:
    h = Harness()
    h.hello(b"w1")
    raw = m2_credits(1, 100).replace(b" 1 @*", b" " + b"9" * 5000 + b" @*", 1)
    h.m2(raw)  # Python's int() refuses 5000 digits: the fast path must not get there
    assert h.d.counters.bad_mongrel2 == 1


def test_credits_after_the_last_request_of_a_connection_settle_its_window() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1, extra=FC)
    h.reply(h.take_one_request(), body_reply(1, 5000))
    h.take_mongrel2()
    assert h.d.connections == {} and h.d.unacked == {(0, 1): 5000}
    h.m2(m2_credits(1, 3000))
    h.quiet()  # no request to pass them to
    assert h.d.unacked == {(0, 1): 2000}
    h.m2(m2_credits(1, 2000))
    assert h.d.unacked == {}


def test_the_brokers_own_answers_count_against_the_window() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1, b"/nowhere", extra=FC)  # 404, from the broker
    answer = h.take_error(404, 1)
    assert h.d.unacked == {(0, 1): len(answer.body)}
    h.request(1)
    assert h.take_one_request().window == b"%d" % (102400 - len(answer.body))


def test_a_disconnect_forgets_the_connections_window() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1, extra=FC)
    h.reply(h.take_one_request(), body_reply(1, 5000))
    h.take_mongrel2()
    h.m2(m2_disconnect(1))
    assert h.d.unacked == {}


def test_windows_of_connections_whose_credits_never_come_are_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import scale0.core.dispatch_state
    monkeypatch.setattr(scale0.core.dispatch_state, "MAX_UNACKED_CONNECTIONS", 2)
    h = Harness()
    h.hello(b"w1")
    for conn_id in (1, 2, 3):
        h.request(conn_id, extra=FC)
        h.reply(h.take_one_request(), body_reply(conn_id, 10))
    h.take_mongrel2()
    assert list(h.d.unacked) == [(0, 2), (0, 3)]  # the oldest is forgotten


def test_a_request_whose_body_looks_like_credits_is_still_served() -> None:
    h = Harness()
    h.hello(b"w1")
    raw = h.request(5, method=b"POST", body=b'{"type":"credits"}')
    assert raw.endswith(b'{"type":"credits"},')
    assert h.take_one_request().raw == raw


# ---- pipelining -----------------------------------------------------------------


def test_pipelined_request_waits_for_the_last_reply_of_the_first() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    first = h.take_one_request()
    h.request(1, b"/app/second")
    h.quiet()  # w2 is free, but order on the connection comes first
    h.request(1, link=1)  # the same conn id on another Mongrel2 is another connection
    assert h.take_one_request().ident == b"w2"
    h.reply(first, ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\n\r\n"), last=False)
    h.take_mongrel2()
    h.quiet()
    h.reply(first, ok_reply(SENDER, 1, b"end"))
    assert [m.body for m in h.take_mongrel2()] == [b"end"]
    second = h.take_one_request()
    assert second.event.path == b"/app/second" and second.ident == b"w1"


def test_pipelined_requests_failing_at_once_answer_in_order() -> None:
    h = Harness(routes=(("/none", "none"),))
    h.hello(b"w1")
    h.request(1)
    first = h.take_one_request()
    for _ in range(3):
        h.request(1, b"/none")
    h.request(1, b"/app")
    h.quiet()
    h.serve(first)
    out = h.take_mongrel2()
    assert [m.status for m in out] == [200, 503, 503, 503]
    assert h.take_one_request().ident == b"w1"


def test_pipelined_requests_refused_at_once_are_answered_in_turn() -> None:
    # HTTP/1.1 answers in request order (RFC 9112 section 9.3.2): a 404, 413 or
    # 400 for a pipelined request must not overtake the response in progress.
    h = Harness(max_body_bytes=10)
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    first = h.take_one_request()
    h.request(1, b"/nowhere")
    h.request(1, method=b"POST", body=b"x" * 11)
    h.m2(m2_upload(1, b"uploads/upload.F", done=b"uploads/upload.F"))
    h.request(1, b"/app/last")
    h.quiet()
    assert (h.d.counters.no_route, h.d.counters.too_large, h.d.counters.forged_uploads) == (
        1, 1, 1)
    h.reply(first, ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\n\r\n"), last=False)
    assert [m.status for m in h.take_mongrel2()] == [200]
    h.reply(first, ok_reply(SENDER, 1, b"body"))
    out = h.take_mongrel2()
    assert [(m.status, m.is_close) for m in out] == [
        (None, False), (404, False), (413, False), (None, True), (400, False), (None, True)]
    assert out[0].body == b"body"
    assert h.take_one_request().event.path == b"/app/last"


def test_refused_pipelined_request_of_a_disconnected_client_is_dropped() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    h.take_one_request()
    h.request(1, b"/nowhere")
    h.m2(m2_disconnect(1))
    assert [m.command for m in h.take_workers()] == [Cmd.CANCEL]
    h.quiet()
    assert h.d.connections == {}


def test_a_long_pipeline_failing_at_once_does_not_recurse() -> None:
    h = Harness(routes=(("/none", "none"),))
    h.hello(b"w1")
    h.request(1)
    first = h.take_one_request()
    for _ in range(2000):
        h.d.on_mongrel2(0, m2_request(1, b"/none"), h.now)
    h.serve(first)
    out = h.take_mongrel2()
    assert [m.status for m in out] == [200] + [503] * 2000
    assert h.d.requests == {} and h.d.connections == {}


# ---- uploads (Mongrel2 temp_store) ------------------------------------------------


def test_upload_done_without_upload_start_is_400() -> None:
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_upload(1, b"/etc/passwd", done=b"/etc/passwd"))
    h.take_error(400, 1, close=True)
    h.quiet()
    assert h.d.counters.forged_uploads == 1


def test_upload_start_then_done_dispatches_once() -> None:
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_upload(1, b"uploads/upload.AbC"))
    h.quiet()  # upload start: nothing to do yet
    assert h.d.counters.requests == 0
    done = m2_upload(1, b"uploads/upload.AbC", done=b"uploads/upload.AbC")
    h.m2(done)
    sent = h.take_one_request()
    assert sent.raw == done
    # The start is used up: a second done on that conn is forged, and is
    # answered after the first (pipelined on the same connection).
    h.m2(done)
    h.quiet()
    h.serve(sent)
    out = h.take_mongrel2()
    assert [(m.status, m.is_close) for m in out] == [(200, False), (400, False), (None, True)]
    assert h.d.counters.forged_uploads == 1 and h.d.requests == {}


def test_upload_done_with_another_path_or_conn_is_400() -> None:
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_upload(1, b"uploads/upload.AbC"))
    h.m2(m2_upload(1, b"uploads/upload.AbC", done=b"uploads/upload.XyZ"))
    h.take_error(400, 1, close=True)
    h.m2(m2_upload(2, b"uploads/upload.Q"))
    h.m2(m2_upload(2, b"uploads/upload.Q", done=b"uploads/upload.Q"), link=1)
    h.take_error(400, 2, link=1, close=True)
    h.m2(m2_disconnect(2))  # a disconnect forgets the start, too
    h.m2(m2_upload(2, b"uploads/upload.Q", done=b"uploads/upload.Q"))
    h.take_error(400, 2, close=True)
    assert h.d.counters.forged_uploads == 3
    h.quiet()


# ---- replies to the wrong connection -------------------------------------------------


def test_reply_to_another_connection_is_502_and_not_forwarded() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    s1 = h.take_one_request()
    h.request(2)
    s2 = h.take_one_request()
    h.reply(s1, ok_reply(SENDER, 2), last=False)  # conn 2 is someone else's
    h.take_error(502, 1, close=True)
    (cancel,) = h.take_workers()
    assert (cancel.ident, cancel.command) == (b"w1", Cmd.CANCEL)
    assert h.d.counters.bad_worker == 1
    h.reply(s1, ok_reply(SENDER, 2))  # the rest is dropped too
    h.quiet()
    assert h.ready("app") == [b"w1"] and list(h.d.requests) == [s2.rid]


def test_reply_with_another_sender_or_a_multi_target_is_502() -> None:
    for message in (ok_reply(SENDER_2, 1), m2r.reply(SENDER, [1, 2], OK_RESPONSE)):
        h = Harness()
        h.hello(b"w1")
        h.request(1)
        h.reply(h.take_one_request(), message)
        h.take_error(502, 1, close=True)
        assert [m.command for m in h.take_workers()] == [Cmd.CANCEL]
        assert h.d.requests == {} and h.ready("app") == [b"w1"]


def test_a_bad_message_in_a_reply_stops_the_whole_reply() -> None:
    # Forwarding the good half and then a 502 would corrupt the client's stream.
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    h.reply(sent, ok_reply(SENDER, 1), ok_reply(SENDER, 9))
    h.take_error(502, 1, close=True)


def test_bad_message_after_the_reply_started_closes() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    h.reply(sent, ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\n\r\n"), last=False)
    h.take_mongrel2()
    h.reply(sent, ok_reply(SENDER, 9, b"x"), last=False)
    (close,) = h.take_mongrel2()
    assert close.is_close and close.conn_id == 1


# ---- bad input ------------------------------------------------------------------


def test_every_truncated_mongrel2_message_is_counted_and_answered_if_possible() -> None:
    h = Harness()
    h.hello(b"w1")
    raw = m2_request(31, b"/app/x", method=b"POST", body=b"hello")
    for cut in range(len(raw)):
        h.m2(raw[:cut])
        out = h.take_mongrel2()
        readable = raw[:cut].startswith(SENDER + b" 31 ")
        if readable:
            assert [(m.conn_id, m.status) for m in out] == [(31, 400), (31, None)]
            assert out[1].is_close
        else:
            assert out == []
        h.quiet()
    assert h.d.counters.bad_mongrel2 == len(raw)
    assert h.d.counters.requests == 0 and h.d.requests == {}


def test_malformed_message_with_unanswerable_sender_is_only_counted() -> None:
    h = Harness()
    h.m2(b"bad_sender 3 /x 2:}0:,")  # '_' is not allowed in a reply sender
    h.m2(b"\xff\xfe 3 /x garbage")
    h.quiet()
    assert h.d.counters.bad_mongrel2 == 2


def test_request_with_unanswerable_sender_is_dropped_not_raised() -> None:
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_request(3, sender=b"bad_sender"))
    h.quiet()
    assert h.d.requests == {} and h.ready("app") == [b"w1"]
    assert h.d.counters.bad_mongrel2 == 1


def test_json_messages_are_501_and_a_stray_websocket_frame_is_closed() -> None:
    h = Harness()
    h.m2(m2_message(SENDER, 4, b"@chat", {b"METHOD": b"JSON"}, b'{"type":"msg"}'))
    h.take_error(501, 4, close=True)
    # WebSockets are served now (test_dispatch_websocket.py); a frame of a
    # connection with no WebSocket here is closed.
    h.m2(m2_message(SENDER, 5, b"/ws", {b"METHOD": b"WEBSOCKET", b"FLAGS": b"0x81"}, b"hi"))
    (close,) = h.take_mongrel2()
    assert close.conn_id == 5 and close.is_close


def test_wrong_version_gets_an_error_frame() -> None:
    h = Harness()
    h.frames(b"w1", [b"S0W0", p.CMD[Cmd.HELLO], b"{}"])
    (error,) = h.take_workers()
    assert (error.ident, error.command, error.args[0]) == (b"w1", Cmd.ERROR, b"505")
    assert h.d.counters.bad_worker == 1 and h.d.workers == {}


@pytest.mark.parametrize("frames", [[], [p.VERSION], [p.VERSION, b""], [p.VERSION, b"\x01\x01"]])
def test_too_short_worker_messages_are_counted(frames: list[bytes]) -> None:
    h = Harness()
    h.hello(b"w1")
    h.frames(b"w1", frames)
    h.quiet()
    assert h.d.counters.bad_worker == 1


def test_unknown_command_from_known_worker_is_error_and_from_unknown_is_bye() -> None:
    h = Harness()
    h.hello(b"w1")
    h.frames(b"w1", [p.VERSION, b"\x7f"])
    (error,) = h.take_workers()
    assert (error.ident, error.command, error.args[0]) == (b"w1", Cmd.ERROR, b"400")
    assert b"w1" in h.d.workers
    h.frames(b"w9", [p.VERSION, b"\x7f"])
    (bye,) = h.take_workers()
    assert (bye.ident, bye.command, bye.args) == (b"w9", Cmd.BYE, ())


@pytest.mark.parametrize("payload", [
    b"not json",
    b"[]",
    json.dumps({"services": [{"name": "app"}], "capacity": 0}).encode(),
    json.dumps({"services": [], "capacity": 1}).encode(),
    json.dumps({"services": [{"name": "a b"}], "capacity": 1}).encode(),
    json.dumps({"services": [{"name": "app", "routes": ["no-slash"]}], "capacity": 1}).encode(),
    json.dumps({"services": [{"name": "app", "routes": ["/ok"]},
                             {"name": "api", "routes": ["/bad path"]}], "capacity": 1}).encode(),
])
def test_nonsense_hello_is_refused_and_registers_nothing(payload: bytes) -> None:
    h = Harness()
    h.worker(b"w1", Cmd.HELLO, payload)
    (error,) = h.take_workers()
    assert (error.ident, error.command, error.args[0]) == (b"w1", Cmd.ERROR, b"400")
    assert h.d.workers == {}
    assert all(not s.workers for s in h.d.services.values())
    h.request(1, b"/ok")  # no half-registered route
    h.take_error(404, 1)


def test_hello_with_extra_frames_is_refused() -> None:
    h = Harness()
    hello = p.Hello((p.ServiceSpec("app", ("/app",)),), 1).encode()
    h.worker(b"w1", Cmd.HELLO, hello, b"extra")
    assert [m.command for m in h.take_workers()] == [Cmd.ERROR]
    assert h.d.workers == {}


def test_bad_hello_from_a_registered_worker_keeps_it() -> None:
    h = Harness()
    h.hello(b"w1")
    h.worker(b"w1", Cmd.HELLO, b"{}")
    assert [m.command for m in h.take_workers()] == [Cmd.ERROR]
    assert h.ready("app") == [b"w1"]


@pytest.mark.parametrize("command", [Cmd.HEARTBEAT, Cmd.REPLY, Cmd.DRAIN])
def test_message_from_unknown_worker_gets_bye(command: p.Command) -> None:
    h = Harness()
    args = [p.encode_request_id(1), p.FLAG_LAST] if command == Cmd.REPLY else []
    h.worker(b"ghost", command, *args)
    (bye,) = h.take_workers()
    assert (bye.ident, bye.command) == (b"ghost", Cmd.BYE)
    assert h.d.workers == {}


def test_bye_from_unknown_worker_is_ignored() -> None:
    h = Harness()
    h.worker(b"ghost", Cmd.BYE)
    h.quiet()


def test_reply_for_unknown_request_id_is_counted_and_dropped() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    sent = h.take_one_request()
    h.worker(b"w1", Cmd.REPLY, p.encode_request_id(999), p.FLAG_LAST, ok_reply(SENDER, 1))
    h.quiet()
    assert h.d.counters.late_replies == 1
    # Another worker cannot answer w1's request either.
    h.reply(sent, ok_reply(SENDER, 1), ident=b"w2")
    h.quiet()
    assert h.d.counters.late_replies == 2 and list(h.d.requests) == [sent.rid]


@pytest.mark.parametrize("args", [
    [],
    [b"\x00" * 7, p.FLAG_LAST],
    [p.encode_request_id(1)],
    [p.encode_request_id(1), b"\x02"],
])
def test_malformed_reply_is_an_error_frame(args: list[bytes]) -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    h.take_one_request()
    h.worker(b"w1", Cmd.REPLY, *args)
    (error,) = h.take_workers()
    assert (error.command, error.args[0]) == (Cmd.ERROR, b"400")
    h.quiet()
    assert h.d.counters.bad_worker == 1 and len(h.d.requests) == 1


# ---- limits and HTTP/1.0 --------------------------------------------------------


def test_body_over_max_body_bytes_is_413() -> None:
    h = Harness(max_body_bytes=10)
    h.hello(b"w1")
    h.request(1, method=b"POST", body=b"x" * 11)
    h.take_error(413, 1, close=True)
    assert h.d.counters.too_large == 1
    # A length of 5000 digits: Python's int() refuses it, the broker answers 413.
    h.request(3, method=b"POST", extra={b"content-length": b"9" * 5000})
    h.take_error(413, 3, close=True)
    assert h.d.counters.too_large == 2
    h.request(2, method=b"POST", body=b"x" * 10)
    assert h.take_one_request().conn_id == 2


@pytest.mark.parametrize(("version", "connection", "close"), [
    (b"HTTP/1.0", None, True),
    (b"HTTP/1.0", b"Keep-Alive", False),
    (b"HTTP/1.1", None, False),
    (b"HTTP/1.1", b"close", True),
])
def test_error_replies_close_when_the_client_will_not_keep_alive(
        version: bytes, connection: bytes | None, close: bool) -> None:
    h = Harness(routes=(("/none", "none"),))
    extra = {b"connection": connection} if connection else {}
    h.request(1, b"/nowhere", version=version, extra=extra)
    h.take_error(404, 1, close=close)
    h.request(2, b"/none", version=version, extra=extra)
    h.take_error(503, 2, close=close)


# ---- drain and bye --------------------------------------------------------------


def test_drain_takes_worker_out_of_ready_queues_and_in_flight_finishes() -> None:
    h = Harness()
    h.hello(b"w1", {"a": ("/a",), "b": ("/b",)}, capacity=2)
    h.hello(b"w2", {"a": ()})
    h.request(1, b"/a")
    sent = h.take_one_request()
    assert sent.ident == b"w1"
    h.worker(b"w1", Cmd.DRAIN)
    (ack,) = h.take_workers()  # every REQUEST sent before it reached the worker first
    assert (ack.ident, ack.command) == (b"w1", Cmd.DRAIN)
    h.quiet()
    assert h.ready("a") == [b"w2"] and h.ready("b") == []
    h.request(2, b"/a")
    assert h.take_one_request().ident == b"w2"
    h.request(3, b"/b")  # only a draining worker serves b: the request waits
    h.quiet()
    h.serve(sent)
    assert [m.conn_id for m in h.take_mongrel2()] == [1]
    h.quiet()  # nothing new for a draining worker
    assert h.ready("a") == [] and h.ready("b") == []
    h.worker(b"w1", Cmd.BYE)
    # b's last worker left: its queued request gets 503 now, not at its timeout
    h.take_error(503, 3)
    h.quiet()
    assert b"w1" not in h.d.workers
    # Left deliberately: its route /b and the service b (nothing else names it) are gone.
    assert "b" not in h.d.services and h.d.routes.lookup(b"localhost", b"/b") is None


def test_hello_again_replaces_the_worker() -> None:
    h = Harness()
    h.hello(b"w1")
    h.hello(b"w2")
    h.request(1)
    sent = h.take_one_request()
    h.hello(b"w1", {"app": ("/app",)}, capacity=2)  # restarted with the same identity
    retried = h.take_one_request()
    assert (retried.ident, retried.rid) == (b"w2", sent.rid)
    assert h.d.workers[b"w1"].capacity == 2 and h.ready("app") == [b"w1"]


def test_removing_a_replaced_worker_object_leaves_its_successor() -> None:
    h = Harness()
    h.hello(b"w1")
    old = h.d.workers[b"w1"]
    h.hello(b"w1", capacity=2)
    h.d.remove_worker(old, h.now)
    h.d.check_invariants()
    assert h.d.workers[b"w1"].capacity == 2 and h.ready("app") == [b"w1"]


# ---- random interleavings -------------------------------------------------------

IDENTS = (b"w0", b"w1", b"w2", b"w3")
# /c is configured but never served; /nowhere has no route.
PATHS = (b"/a", b"/a/x", b"/b", b"/a", b"/b/y", b"/c", b"/nowhere")


@dataclass
class Job:
    sent: Sent
    started: bool = False


@dataclass
class FakeWorker:
    alive: bool = False
    silent: bool = False  # stops heartbeating (hung process)
    jobs: dict[int, Job] = field(default_factory=dict)
    recalled: set[int] = field(default_factory=set)  # RECALLs not answered yet


@dataclass
class Conn:
    tokens: list[bytes] = field(default_factory=list)  # requests not yet answered, in order
    gone: bool = False


class DispatchMachine(RuleBasedStateMachine):
    """Random requests, replies, worker life and death, disconnects and time.

    A fake worker echoes each request's x-token header in its response, so
    the machine checks that every connection gets its answers in order, one
    per request, and nothing is sent to a connection after its disconnect.
    Connections are (link, conn id): the same conn id on two links is two.
    """

    def __init__(self) -> None:
        super().__init__()
        self.h = Harness(heartbeat_s=1.0, liveness=3, queue_size=3, queue_timeout_s=4.0,
                         request_timeout_s=6.0, max_body_bytes=100, routes=(("/c", "c"),))
        self.workers = {ident: FakeWorker() for ident in IDENTS}
        self.conns: dict[tuple[int, int], Conn] = {}
        self.finished: list[Sent] = []  # for replies that come too late
        self.next_token = 0

    # -- bookkeeping after every step
    def absorb(self) -> None:
        h = self.h
        h.d.check_invariants()
        returns: list[tuple[bytes, int]] = []
        for msg in h.take_workers():
            fake = self.workers[msg.ident]
            if msg.command == Cmd.REQUEST:
                assert fake.alive and msg.rid not in fake.jobs
                fake.jobs[msg.rid] = Job(Sent(msg.ident, *msg.args))
            elif msg.command in (Cmd.CANCEL, Cmd.CREDIT):
                pass  # the fake worker ignores both; it still sends its LAST reply
            elif msg.command == Cmd.RECALL:
                assert msg.rid in fake.jobs and msg.rid not in fake.recalled
                fake.recalled.add(msg.rid)  # RETURNed by return_recalled, or ignored
                if msg.rid % 2 and not fake.jobs[msg.rid].started:
                    returns.append((msg.ident, msg.rid))  # some at once
            else:
                assert msg.command in (Cmd.HEARTBEAT, Cmd.WELCOME, Cmd.DRAIN), msg
        raw, h.d.to_mongrel2 = h.d.to_mongrel2, []
        for link, message in raw:
            parsed = m2r.parse_reply(message)
            if parsed.ctl:  # a keep-alive for a long wait (teardown advances the
                # clock past keepalive_s): not an answer, but never to a gone client
                conn = self.conns.get((link, parsed.conn_ids[0]))
                assert conn is not None and not conn.gone, parsed
                continue
            out = to_client(link, message)
            assert out.sender == SENDER
            conn = self.conns.get((out.link, out.conn_id))
            assert conn is not None, f"message to unknown conn {out.conn_id}"
            assert not conn.gone, "message to a disconnected client"
            if out.status is None:
                continue  # more body, or a close
            assert conn.tokens, f"extra response on conn {out.conn_id}"
            token = conn.tokens.pop(0)
            if out.status == 200:
                assert out.headers[b"x-token"] == token
        for ident, fake in self.workers.items():
            if fake.alive and ident not in h.d.workers:  # expired
                fake.alive = False
                fake.jobs.clear()
            fake.recalled &= fake.jobs.keys()
        for ident, rid in returns:
            job = self.workers[ident].jobs.pop(rid, None)
            if job is not None:
                self.workers[ident].recalled.discard(rid)
                h.worker(ident, Cmd.RETURN, job.sent.rid_frame)
                self.absorb()

    @invariant()
    def invariants_hold(self) -> None:
        self.h.d.check_invariants()

    def _open(self, pick: int) -> tuple[int, int] | None:
        open_conns = [key for key, conn in self.conns.items() if not conn.gone]
        return open_conns[pick % len(open_conns)] if open_conns else None

    # -- rules
    @initialize(capacity=st.integers(1, 3), prefetch=st.integers(0, 2))
    def start_workers(self, capacity: int, prefetch: int) -> None:
        self.hello(b"w0", {"a", "b"}, capacity, prefetch)
        self.hello(b"w1", {"a"}, 1, prefetch)

    @rule(ident=st.sampled_from(IDENTS),
          services=st.sets(st.sampled_from(("a", "b")), min_size=1),
          capacity=st.integers(1, 3), prefetch=st.integers(0, 2))
    def hello(self, ident: bytes, services: set[str], capacity: int, prefetch: int) -> None:
        fake = self.workers[ident]
        routes = {"a": ("/a",), "b": ("/b",)}
        specs = tuple(p.ServiceSpec(s, routes[s]) for s in sorted(services))
        fake.jobs.clear()
        fake.alive, fake.silent = True, False
        self.h.worker(ident, Cmd.HELLO, p.Hello(specs, capacity, prefetch=prefetch).encode())
        self.absorb()

    @rule(pick=st.integers(0, 1000))
    def return_recalled(self, pick: int) -> None:
        """A worker gives back a recalled request it has not started."""
        recalled = [(ident, rid) for ident, fake in self.workers.items() if fake.alive
                    for rid in sorted(fake.recalled) if not fake.jobs[rid].started]
        if not recalled:
            return
        ident, rid = recalled[pick % len(recalled)]
        fake = self.workers[ident]
        job = fake.jobs.pop(rid)
        fake.recalled.discard(rid)
        self.h.worker(ident, Cmd.RETURN, job.sent.rid_frame)
        self.absorb()

    @rule(new=st.booleans(), link=st.integers(0, 1), pick=st.integers(0, 1000),
          path=st.sampled_from(PATHS), method=st.sampled_from((b"GET", b"POST")),
          http10=st.booleans(), big=st.booleans())
    def request(self, new: bool, link: int, pick: int, path: bytes, method: bytes,
                http10: bool, big: bool) -> None:
        key = None if new else self._open(pick)
        first = key is None
        if key is None:
            key = (link, sum(1 for k in self.conns if k[0] == link) + 1)
            self.conns[key] = Conn()
        self.next_token += 1
        token = b"t%d" % self.next_token
        self.conns[key].tokens.append(token)
        extra = {b"x-token": token}
        if first and key[0] == 1:  # link 1 is flow-controlled: Mongrel2 says so once
            extra[b"DOWNLOAD_CREDITS"] = b"102400"
        if not http10 or pick % 2:
            extra[b"connection"] = b"keep-alive"
        if big and pick % 8 == 0:
            extra[b"content-length"] = b"101"  # over max_body_bytes: 413
        self.h.request(key[1], path, link=key[0], method=method, extra=extra,
                       version=b"HTTP/1.0" if http10 else b"HTTP/1.1")
        self.absorb()

    @rule(pick=st.integers(0, 1000), kind=st.sampled_from(("whole", "start", "chunk", "last",
                                                          "wrong", "late")))
    def reply(self, pick: int, kind: str) -> None:
        if kind == "late":
            if self.finished:
                sent = self.finished[pick % len(self.finished)]
                if self.workers[sent.ident].alive:
                    self.h.serve(sent)
                    self.absorb()
            return
        jobs = [(ident, rid) for ident, fake in self.workers.items()
                if fake.alive for rid in fake.jobs]
        if not jobs:
            return
        ident, rid = jobs[pick % len(jobs)]
        job = self.workers[ident].jobs[rid]
        event = job.sent.event
        token = event.header(b"x-token") or b""
        messages: list[bytes] = []
        last = kind in ("whole", "last", "wrong")
        if kind == "wrong":  # the next conn id: maybe someone else's, maybe nobody's
            messages.append(ok_reply(event.sender, event.conn_id + 1))
        elif not job.started:
            head = b"HTTP/1.1 200 OK\r\nX-Token: %s\r\n\r\n" % token
            messages.append(ok_reply(event.sender, event.conn_id, head))
            job.started = True
        elif kind != "last":
            messages.append(ok_reply(event.sender, event.conn_id, b"chunk"))
        if last:
            del self.workers[ident].jobs[rid]
            self.finished.append(job.sent)
        self.h.reply(job.sent, *messages, last=last)
        self.absorb()

    @rule(n=st.integers(2, 6), link=st.integers(0, 1))
    def burst(self, n: int, link: int) -> None:
        """GETs on new connections, more than the free slots: some wait at workers."""
        for _ in range(n):
            self.request(True, link, 0, b"/a", b"GET", False, False)

    @rule(ident=st.sampled_from(IDENTS))
    def finish_all(self, ident: bytes) -> None:
        """A worker answers everything it holds (so it is free while others
        may hold waiting requests: what RECALL is for)."""
        fake = self.workers[ident]
        if not fake.alive:
            return
        for rid, job in list(fake.jobs.items()):
            event = job.sent.event
            head = b"" if job.started else b"HTTP/1.1 200 OK\r\nX-Token: %s\r\n\r\n" % (
                event.header(b"x-token") or b"")
            del fake.jobs[rid]
            self.finished.append(job.sent)
            self.h.reply(job.sent, *([ok_reply(event.sender, event.conn_id, head)] if head
                                     else []))
            self.absorb()

    @rule(pick=st.integers(0, 1000), kind=st.sampled_from(("whole", "start", "last")))
    def reply_more(self, pick: int, kind: str) -> None:
        self.reply(pick, kind)  # replies are the common case: give them more weight

    @rule(ident=st.sampled_from(IDENTS), how=st.sampled_from(("bye", "remove", "silent")))
    def worker_dies(self, ident: bytes, how: str) -> None:
        fake = self.workers[ident]
        if not fake.alive:
            return
        if how == "silent":
            fake.silent = True  # stops heartbeating: expires at a later tick
            return
        fake.alive = False
        fake.jobs.clear()
        if how == "bye":
            self.h.worker(ident, Cmd.BYE)
        else:
            self.h.d.remove_worker(self.h.d.workers[ident], self.h.now)
        self.absorb()

    @rule(ident=st.sampled_from(IDENTS))
    def drain(self, ident: bytes) -> None:
        if self.workers[ident].alive:
            self.h.worker(ident, Cmd.DRAIN)
            self.absorb()

    @rule(name=st.sampled_from(("a", "b", *IDENTS)), undo=st.booleans())
    def operator_drain(self, name: str | bytes, undo: bool) -> None:
        """`ctl drain` / `ctl undrain` of a service or a worker label (kept by
        name, so it also holds over a later HELLO of that worker)."""
        d, now = self.h.d, self.h.now
        how = {"service": name} if isinstance(name, str) else {"label": name.hex()}
        (d.undrain if undo else d.drain)(now, **how)
        for w in d.workers.values():
            assert w.held == (w.label in d.drained_labels or any(
                sv.name in d.drained_services for sv in w.services))
        self.absorb()

    @rule(pick=st.integers(0, 1000))
    def disconnect(self, pick: int) -> None:
        key = self._open(pick)
        if key is not None:
            self.h.m2(m2_disconnect(key[1]), link=key[0])
            self.conns[key].gone = True
            self.absorb()

    @rule(pick=st.integers(0, 1000))
    def credits(self, pick: int) -> None:
        if self.conns:
            link, conn_id = list(self.conns)[pick % len(self.conns)]
            self.h.m2(m2_credits(conn_id, 4096), link=link)
            self.absorb()

    @rule(dt=st.sampled_from((0.0, 0.03, 0.06, 0.5, 1.0, 2.5, 7.0)))
    def tick(self, dt: float) -> None:
        self.advance(self.h.now + dt)

    def advance(self, now: float) -> None:
        self.h.now = now
        for ident, fake in self.workers.items():
            if fake.alive and not fake.silent:
                self.h.worker(ident, Cmd.HEARTBEAT)
        self.h.tick(now)
        self.absorb()

    def teardown(self) -> None:
        h = self.h
        # 1. Hung workers (alive, heartbeating, never answering): every
        # request still gets its answer by its deadline.
        for _ in range(300):
            pending = [r.deadline for s in h.d.services.values()
                       for r in (*s.queue.values(), *s.active.values())]
            if not pending:
                break
            self.advance(max(h.now, min(pending)))  # workers heartbeat, so none expires
        assert h.d.connections == {}
        for key, conn in self.conns.items():
            if not conn.gone:
                assert conn.tokens == [], f"conn {key} left hanging"
        assert all(not s.queue and not s.active for s in h.d.services.values())
        # 2. Workers finish what they hold (all cancelled by now): nothing left.
        for fake in self.workers.values():
            if fake.alive:
                for job in fake.jobs.values():
                    h.reply(job.sent)
                fake.jobs.clear()
        self.absorb()
        assert h.d.requests == {}
        for w in h.d.workers.values():
            assert w.in_flight == {}


TestDispatchMachine = DispatchMachine.TestCase
TestDispatchMachine.settings = settings(max_examples=150, stateful_step_count=40,
                                        deadline=None, database=None)


def test_counters_add_up_in_a_simple_run() -> None:
    h = Harness()
    h.hello(b"w1")
    counts: Counter[int | None] = Counter()
    for conn in range(1, 4):
        h.request(conn)
        h.serve(h.take_one_request())
        counts.update(m.status for m in h.take_mongrel2())
    h.request(9, b"/zzz")
    counts.update(m.status for m in h.take_mongrel2())
    assert counts == {200: 3, 404: 1}
    c = h.d.counters
    assert (c.requests, c.replies, c.no_route) == (4, 3, 1)


# ---- later fixes: forged upload-start, 413 at upload start, empty LAST, idle deadline ----


def test_forged_upload_start_on_a_small_request_is_400_not_recorded() -> None:
    # A client's own header on a small request: a body came with it, or no length.
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_request(1, b"/app", method=b"POST", body=b"hi",
                    extra={b"x-mongrel2-upload-start": b"/etc/passwd"}))
    h.take_error(400, 1, close=True)
    h.m2(m2_request(2, b"/app", extra={b"x-mongrel2-upload-start": b"/etc/passwd"}))
    h.take_error(400, 2, close=True)
    assert h.d.uploads == {} and h.d.counters.forged_uploads == 2
    # ... so a later upload-done on that connection has nothing to match
    h.m2(m2_upload(2, b"/etc/passwd", done=b"/etc/passwd"))
    h.take_error(400, 2, close=True)


def test_upload_over_max_body_is_413_at_its_start() -> None:
    h = Harness(max_body_bytes=1000)
    h.hello(b"w1")
    h.m2(m2_upload(1, b"uploads/upload.Big"))  # declares 5000 bytes
    h.take_error(413, 1, close=True)
    assert h.d.uploads == {} and h.d.counters.too_large == 1
    assert h.d.counters.requests == 1  # counted once, like every answered request


def test_last_without_any_response_is_502() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    h.reply(sent)  # LAST with no message at all
    h.take_error(502, 1)
    assert h.d.requests == {} and h.ready("app") == [b"w1"]


def test_streaming_reply_deadline_is_between_pieces() -> None:
    h = Harness(request_timeout_s=60.0, keepalive_s=10_000.0)
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    piece = ok_reply(SENDER, 1, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    for now in (50.0, 100.0, 150.0):  # a piece every 50 s: alive for 150 s
        h.tick(now)
        h.reply(sent, piece, last=False)
        assert len(h.take_mongrel2()) == 1
    h.tick(209.0)
    assert h.take_mongrel2() == []
    h.tick(210.5)  # 60 s after the last piece: a started reply is closed, not 504'd
    (close,) = h.take_mongrel2()
    assert close.is_close
    assert h.d.counters.request_timeouts == 1


def test_long_requests_get_ctl_keep_alives() -> None:
    h = Harness(keepalive_s=30.0, request_timeout_s=500.0, queue_timeout_s=500.0,
                heartbeat_s=1000.0)
    h.hello(b"w1")
    h.request(1)
    sent = h.take_one_request()
    h.request(2)  # queued behind the busy worker
    h.tick(29.0)
    assert h.take_mongrel2() == []
    h.tick(30.0)
    out = h.d.to_mongrel2
    h.d.to_mongrel2 = []
    assert sorted(out) == sorted([(0, m2r.keep_alive_reply(SENDER, 1)),
                                  (0, m2r.keep_alive_reply(SENDER, 2))])
    h.serve(sent)
    h.take_mongrel2()
    h.take_requests()  # the queued one now runs
    h.tick(60.0)
    assert h.d.to_mongrel2 == [(0, m2r.keep_alive_reply(SENDER, 2))]


def test_per_service_request_timeout() -> None:
    h = Harness(request_timeout_s=60.0, service_timeouts=(("fast", 2.0),), keepalive_s=1e6)
    h.hello(b"w1", {"fast": ("/fast",), "slow": ("/slow",)}, capacity=2)
    h.request(1, b"/fast")
    h.request(2, b"/slow")
    assert len(h.take_requests()) == 2
    h.tick(2.5)
    h.take_error(504, 1)
    h.tick(59.0)
    assert h.take_mongrel2() == []  # the other service keeps the default 60 s
    h.tick(60.5)
    h.take_error(504, 2)


def test_maintenance_page_while_a_service_has_no_worker() -> None:
    page = b"<h1>Back soon</h1>"
    h = Harness(routes=(("/shop", "shop"),), maintenance_pages=(("shop", page),))
    h.request(1, b"/shop/cart")
    (out,) = h.take_mongrel2()
    assert out.status == 503
    assert out.headers[b"content-type"].startswith(b"text/html")
    assert out.headers[b"retry-after"] == b"5"
    assert out.body.split(b"\r\n\r\n", 1)[1] == page


# ---- records of finished requests (access log, metrics, tap) and the snapshot ---------


def test_every_ended_request_is_recorded_once_with_its_status() -> None:
    h = Harness(request_timeout_s=10.0)
    h.d.record = True
    h.hello(b"w1", capacity=2)
    h.now = 1.0
    h.request(1, b"/app/ok?q=1")
    ok = h.take_one_request()
    h.request(2, b"/app/slow")
    slow = h.take_one_request()
    h.now = 1.5
    h.serve(ok)
    h.request(3, b"/nowhere")  # 404 at once
    h.request(4, b"/app/gone")  # queued (no free slot? capacity 2: one left) -> sent
    gone = h.take_one_request()
    h.m2(m2_disconnect(4))  # the client leaves first: 499
    h.tick(11.0)  # /app/slow times out: 504
    h.reply(slow, ok_reply(SENDER, 2, b"late"))  # late: not recorded again
    h.reply(gone, ok_reply(SENDER, 4))  # cancelled: not recorded again
    done = {(r.conn_id, r.path): r for r in h.d.done}
    assert len(h.d.done) == 4
    assert done[1, "/app/ok?q=1"].status == 200
    assert done[1, "/app/ok?q=1"].worker == "w1" and done[1, "/app/ok?q=1"].service == "app"
    assert done[1, "/app/ok?q=1"].ended_at - done[1, "/app/ok?q=1"].received_at == 0.5
    assert done[1, "/app/ok?q=1"].bytes_out == len(OK_RESPONSE)
    assert done[3, "/nowhere"].status == 404 and done[3, "/nowhere"].service == ""
    assert done[4, "/app/gone"].status == 499
    assert done[2, "/app/slow"].status == 504


def test_nothing_is_recorded_unless_asked() -> None:
    h = Harness()
    h.hello(b"w1")
    h.request(1)
    h.serve(h.take_one_request())
    h.request(2, b"/nowhere")
    assert h.d.done == []


def test_snapshot_lists_services_routes_workers_and_counters() -> None:
    h = Harness()
    h.hello(b"w1", {"app": ("/app",), "api": ("example.com/api",)}, capacity=2)
    h.now = 5.0
    h.request(1)
    h.take_one_request()
    snap = h.d.snapshot(7.5)
    json.dumps(snap)  # plain data
    services = {sv["name"]: sv for sv in snap["services"]}
    assert services["app"]["routes"] == ["/app"] and services["api"]["routes"] == [
        "example.com/api"]
    assert services["app"]["in_flight"] == 1 and services["app"]["capacity"] == 2
    (w,) = snap["workers"]
    assert (w["label"], w["in_flight"], w["capacity"], w["age_s"]) == ("w1", 1, 2, 7.5)
    assert snap["counters"]["requests"] == 1 and snap["requests"] == 1


# ---- HTTP edges (scale0/core/screen.py): duplicate Host, conflicting lengths, absolute-form ----


def test_duplicate_host_and_conflicting_lengths_are_400_and_counted() -> None:
    h = Harness(max_body_bytes=1000)
    h.hello(b"w1")
    h.m2(m2_message(SENDER, 1, b"/app", {b"METHOD": b"GET", b"VERSION": b"HTTP/1.1",
                                          b"PATH": b"/app", b"host": [b"a", b"localhost"]}))
    assert b"Host" in h.take_error(400, 1, close=True).body
    # Mongrel2 reads the body by the first length: a check of the last must not pass it.
    h.m2(m2_message(SENDER, 2, b"/app", {b"METHOD": b"POST", b"VERSION": b"HTTP/1.1",
                                          b"PATH": b"/app", b"host": b"localhost",
                                          b"content-length": [b"3000", b"3"]}, b"abc"))
    assert b"Content-Length" in h.take_error(400, 2, close=True).body
    assert h.d.counters.bad_requests == 2 and h.d.counters.requests == 2
    assert h.take_workers() == []


def test_absolute_form_routes_by_the_target_authority() -> None:
    h = Harness()
    h.hello(b"w1", {"app": ("example.com/app",)})
    raw = m2_request(1, b"//example.com/app/x", host=b"other",
                     extra={b"URI": b"//example.com/app/x?q=1", b"QUERY": b"q=1"})
    h.m2(raw)
    sent = h.take_one_request()
    event = sent.event
    assert (event.path, event.headers[b"host"], event.headers[b"URI"]) == (
        b"/app/x", b"example.com", b"/app/x?q=1")
    assert sent.script_name == b"/app"
    h.serve(sent)
    assert [m.status for m in h.take_mongrel2()] == [200]


# ---- spooled bodies (scale0/net/spool_files.py): chunked uploads, cleanup ------------------------


def m2_chunked(conn_id: int, start: bytes, done: bytes | None = None,
               path: bytes = b"/app/up") -> bytes:
    """Mongrel2's upload pair for a chunked body: no Content-Length."""
    extra = {b"x-mongrel2-upload-start": start, b"transfer-encoding": b"chunked"}
    if done is not None:
        extra[b"x-mongrel2-upload-done"] = done
    return m2_request(conn_id, path, method=b"POST", extra=extra)


def take_unlink(h: Harness) -> list[bytes]:
    out, h.d.to_unlink = h.d.to_unlink, []
    return out


def test_a_chunked_upload_is_served_and_its_file_removed_after() -> None:
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_chunked(1, b"uploads/upload.C"))
    h.quiet()
    h.m2(m2_chunked(1, b"uploads/upload.C", done=b"uploads/upload.C"))
    sent = h.take_one_request()
    assert take_unlink(h) == []  # the worker reads it now
    h.serve(sent)
    assert [m.status for m in h.take_mongrel2()] == [200]
    assert take_unlink(h) == [b"uploads/upload.C"]
    assert h.d.counters.forged_uploads == 0


def test_a_forged_chunked_start_with_a_body_is_400_and_nothing_removed() -> None:
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_request(1, b"/app", method=b"POST", body=b"hi",
                    extra={b"x-mongrel2-upload-start": b"uploads/upload.Other",
                           b"transfer-encoding": b"chunked"}))
    h.take_error(400, 1, close=True)  # a length beside chunked: refused by scale0/core/screen.py
    assert take_unlink(h) == [] and h.d.counters.bad_requests == 1
    h.m2(m2_message(SENDER, 2, b"/app", {b"METHOD": b"GET", b"VERSION": b"HTTP/1.1",
                                          b"transfer-encoding": b"chunked",
                                          b"x-mongrel2-upload-start": b"uploads/upload.O"},
                    b"hi"))
    h.take_error(400, 2, close=True)
    assert take_unlink(h) == [] and h.d.counters.forged_uploads == 1


def test_a_forged_done_is_never_removed() -> None:
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_upload(1, b"uploads/upload.Real"))
    h.m2(m2_upload(1, b"uploads/upload.Real", done=b"uploads/upload.Victim"))
    h.take_error(400, 1, close=True)
    assert take_unlink(h) == []


def test_an_upload_refused_at_its_start_is_removed_and_its_done_dropped() -> None:
    h = Harness(max_body_bytes=1000)
    h.hello(b"w1")
    h.m2(m2_upload(1, b"uploads/upload.Big"))  # Content-Length 5000
    h.take_error(413, 1, close=True)
    assert take_unlink(h) == [b"uploads/upload.Big"]
    assert h.d.counters.requests == 1
    # The body was in before the close: Mongrel2 still sends the done.
    h.m2(m2_upload(1, b"uploads/upload.Big", done=b"uploads/upload.Big"))
    h.quiet()
    assert take_unlink(h) == [b"uploads/upload.Big"]
    assert (h.d.counters.requests, h.d.counters.forged_uploads) == (1, 0)


@pytest.mark.parametrize("ending", ["no route", "no worker", "worker gone", "timeout",
                                    "client gone", "worker refuses"])
def test_every_ending_removes_the_spooled_body(ending: str) -> None:
    h = Harness(routes=(("/none", "none"),), request_timeout_s=5.0)
    h.hello(b"w1")
    path = {"no route": b"/nowhere", "no worker": b"/none"}.get(ending, b"/app/up")
    h.m2(m2_upload(1, b"uploads/upload.E", path=path))
    h.m2(m2_upload(1, b"uploads/upload.E", done=b"uploads/upload.E", path=path))
    if ending == "no route":
        h.take_error(404, 1)
    elif ending == "no worker":
        h.take_error(503, 1)
    else:
        sent = h.take_one_request()
        assert take_unlink(h) == []
        if ending == "worker gone":  # a POST is not retried: 502
            h.worker(b"w1", Cmd.BYE)
            h.take_error(502, 1)
        elif ending == "timeout":
            h.tick(6.0)
            h.take_error(504, 1)
            assert take_unlink(h) == []  # still at the worker, which may be reading it
            h.serve(sent)
        elif ending == "client gone":
            h.m2(m2_disconnect(1))
            assert take_unlink(h) == []
            h.serve(sent)  # its last reply: the request is over
        else:  # e.g. a worker with no --upload-dir answers 400
            h.serve(sent, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
    assert take_unlink(h) == [b"uploads/upload.E"]
    assert h.d.requests == {}


def test_a_disconnect_during_an_upload_removes_its_file() -> None:
    h = Harness()
    h.hello(b"w1")
    h.m2(m2_upload(1, b"uploads/upload.Half"))
    h.m2(m2_disconnect(1))
    assert take_unlink(h) == [b"uploads/upload.Half"] and h.d.uploads == {}


def test_a_spooled_body_within_the_inline_limit_goes_inside_the_request() -> None:
    h = Harness(inline_body_max=100, inline_budget_bytes=150)
    files = {b"uploads/upload.S": b"s" * 80, b"uploads/upload.T": b"t" * 80,
             b"uploads/upload.B": b"b" * 101}
    asked: list[tuple[bytes, int]] = []

    def read(path: bytes, limit: int) -> bytes | None:
        asked.append((path, limit))
        body = files[path]
        return body if len(body) <= limit else None

    h.d.read_spooled = read
    h.hello(b"w1", capacity=3)
    for conn, name in ((1, b"uploads/upload.S"), (2, b"uploads/upload.T"),
                       (3, b"uploads/upload.B")):
        h.m2(m2_chunked(conn, name))
        h.m2(m2_chunked(conn, name, done=name))
    first, second, third = h.take_requests()
    event = first.event
    assert isinstance(event, m2.HttpRequest) and event.body == b"s" * 80
    assert event.headers[b"content-length"] == b"80"
    assert b"transfer-encoding" not in event.headers
    assert b"x-mongrel2-upload-done" not in event.headers
    # The budget (150) had 70 left for the second and the third: they stay files.
    assert asked == [(b"uploads/upload.S", 100), (b"uploads/upload.T", 70),
                     (b"uploads/upload.B", 70)]
    assert isinstance(second.event, m2.UploadDone) and isinstance(third.event, m2.UploadDone)
    assert take_unlink(h) == [b"uploads/upload.S"]  # in memory: its file goes at once
    assert h.d.inline_bytes == 80
    h.serve(first)
    assert h.d.inline_bytes == 0
    assert take_unlink(h) == [b"uploads/upload.S"]  # again at its end: harmless
    # With the budget back, a body up to inline_body_max goes inline again.
    h.m2(m2_chunked(4, b"uploads/upload.S"))
    h.m2(m2_chunked(4, b"uploads/upload.S", done=b"uploads/upload.S"))
    fourth = h.take_one_request()
    assert isinstance(fourth.event, m2.HttpRequest)
    assert asked[-1] == (b"uploads/upload.S", 100)
    h.serve(fourth)
    assert take_unlink(h) == [b"uploads/upload.S"] * 2
    h.serve(second)
    h.serve(third)
    assert take_unlink(h) == [b"uploads/upload.T", b"uploads/upload.B"]


def test_no_inline_without_a_reader() -> None:
    h = Harness(inline_body_max=100)
    h.hello(b"w1")
    h.m2(m2_chunked(1, b"uploads/upload.S"))
    h.m2(m2_chunked(1, b"uploads/upload.S", done=b"uploads/upload.S"))
    assert isinstance(h.take_one_request().event, m2.UploadDone)


def test_a_worker_that_reads_spooled_files_gets_the_file() -> None:
    h = Harness(inline_body_max=100)
    h.d.read_spooled = lambda path, limit: b"x" * 10
    hello = p.Hello((p.ServiceSpec("app", ("/app",)),), 1, worker="disk",
                    meta={"uploads": "file"})
    h.worker(b"disk", Cmd.HELLO, hello.encode())
    h.d.to_workers.clear()  # its WELCOME
    h.m2(m2_chunked(1, b"uploads/upload.D"))
    h.m2(m2_chunked(1, b"uploads/upload.D", done=b"uploads/upload.D"))
    sent = h.take_one_request()
    assert isinstance(sent.event, m2.UploadDone) and take_unlink(h) == []
    h.serve(sent)
    assert take_unlink(h) == [b"uploads/upload.D"] and h.d.inline_bytes == 0
