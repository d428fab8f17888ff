"""A Mongrel2 that stops reading replies slows the broker; no reply is lost.

A fake Mongrel2 link (PUSH and SUB bound here, tnetstring requests) sends
more requests than the reply path can buffer while its SUB reads nothing.
The broker's XPUB (XPUB_NODROP) then refuses replies; the broker holds them
and stops taking requests from that link. Once the SUB reads again, every
request gets exactly one reply.
"""

from __future__ import annotations

import tnetstring

from scale0.wire import mongrel2_reply as m2r

from .conftest import FakeMongrel2, Stack, service_status, wait_for

SENDER = b"5ca1e000-0000-4000-8000-0000000bac01"
N_REQUESTS = 12_000
REPLY_BYTES = 10_000


def _request(conn_id: int) -> bytes:
    headers = {b"METHOD": b"GET", b"VERSION": b"HTTP/1.1", b"PATH": b"/blob",
               b"URI": b"/blob?%d" % REPLY_BYTES, b"QUERY": b"%d" % REPLY_BYTES,
               b"PATTERN": b"/", b"URL_SCHEME": b"http", b"REMOTE_ADDR": b"127.0.0.1",
               b"host": b"localhost"}
    return b"%s %d /blob %s0:," % (SENDER, conn_id, tnetstring.dumps(headers))


def test_slow_reader_gets_every_reply(fresh_stack: Stack) -> None:
    # What can queue before the broker must hold: its XPUB's 100 messages,
    # the SUB's 10 and the TCP buffers (a few MB). A message carries the
    # replies of one wake-up (1 to 256), so 12,000 replies outgrow that
    # unless the wake-ups carry over 100 each on average; about 9 were seen
    # on a loaded machine. (With libzmq's default of 1000 messages in the
    # XPUB, those batches fitted in it whole and this test failed.)
    with FakeMongrel2(sub_hwm=10) as fake:
        # The stack's own Mongrel2 is not started: this broker serves the fake link.
        broker = fresh_stack.start_broker("--queue-size", str(N_REQUESTS), "--queue-timeout",
                                          "300", "--mongrel2", fake.link)
        fresh_stack.start_pool("e2e_apps:app", service="app", routes=("/",), threads=4)
        # The pool's READY: its workers are WELCOMEd, so the broker lists them.
        assert service_status(broker.status(), "app")["ready"] >= 1
        fake.wait_subscribed(broker)
        for conn_id in range(1, N_REQUESTS + 1):
            fake.push.send(_request(conn_id))
        # 10 KB replies x 12,000 outgrow every buffer on the way: with nobody
        # reading, the broker must hold replies (not drop them) and pause.
        wait_for(lambda: any(link["held"] for link in broker.status()["links"]), 60,
                 "the broker to hold replies")
        got: dict[int, bytes] = {}

        def read_some() -> bool:
            while fake.sub.poll(200):
                reply = m2r.parse_reply(fake.sub.recv())
                for conn_id in reply.conn_ids:
                    if reply.body:  # the close reply of HTTP/1.0 etc. has none
                        assert conn_id not in got, f"two replies for {conn_id}"
                        got[conn_id] = reply.body
            return len(got) >= N_REQUESTS

        wait_for(read_some, 120, f"{N_REQUESTS} replies")
        assert sorted(got) == list(range(1, N_REQUESTS + 1))
        assert all(body.startswith(b"HTTP/1.1 200 OK") and body.endswith(b"z" * 100)
                   for body in got.values())
        assert not any(link["held"] for link in broker.status()["links"])  # takes them again
        assert broker.popen.poll() is None
