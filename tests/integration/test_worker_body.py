"""Streamed request bodies at the worker (scale0/worker/loop.py + scale0/core/bodystream.py)
against a fake broker: READ credits out, BODY pieces in, on the request's
own thread."""

from __future__ import annotations

import hashlib
import random
import threading
from collections.abc import Iterator

import pytest
import tnetstring

from scale0.wire import s0w1 as p
from scale0.worker.process import ReplyStream, Worker, WorkerSettings
from tests.integration.test_worker import SENDER, FakeBroker

Cmd = p.Command


def streamed_request(conn_id: int, first: bytes, length: int) -> bytes:
    headers = {b"METHOD": b"POST", b"VERSION": b"HTTP/1.1", b"PATH": b"/", b"URI": b"/",
               b"PATTERN": b"/", b"URL_SCHEME": b"http", b"host": b"localhost",
               b"content-length": b"%d" % length, b"UPLOAD_STREAM": b"0"}
    return b"%s %d / %s%d:%s," % (SENDER, conn_id, tnetstring.dumps(headers), len(first), first)


def hashing_handler(event: object, script_name: str, path_info: str,
                    stream: ReplyStream) -> bool:
    assert stream.body is not None
    digest = hashlib.sha256()
    while piece := stream.body.read(10_000):
        digest.update(piece)
    text = b"%d %s" % (stream.body.reader.consumed, digest.hexdigest().encode())
    stream.last(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(text), text), False)
    return False


@pytest.fixture
def running() -> Iterator[tuple[FakeBroker, Worker]]:
    broker = FakeBroker()
    settings = WorkerSettings(connect=(broker.endpoint,), services=(p.ServiceSpec("svc", ("/",)),),
                              capacity=1, heartbeat_s=1.0, graceful_timeout_s=5.0, label="t",
                              meta=(("bodies", "stream"),))
    worker = Worker(hashing_handler, settings)
    thread = threading.Thread(target=worker.run)
    thread.start()
    try:
        yield broker, worker
    finally:
        worker.stop()
        thread.join(10)
        broker.close()
        assert not thread.is_alive()


def test_pieces_come_as_credited_and_the_app_reads_them_all(
        running: tuple[FakeBroker, Worker]) -> None:
    broker, _ = running
    hello = broker.recv_command(Cmd.HELLO)
    ident = hello[0]
    assert p.Hello.decode(hello[3]).meta["bodies"] == "stream"
    broker.welcome(ident)
    body = random.Random(3).randbytes(1_000_000)
    rid = p.encode_request_id(9)
    broker.send(ident, Cmd.REQUEST, rid, b"svc", b"", streamed_request(4, body[:1000], len(body)))
    sent, credits, reads = 1000, 0, 0
    while sent < len(body):
        read = broker.recv_command(Cmd.READ)
        assert read[3] == rid
        credits += int(read[4])
        reads += 1
        assert credits <= 256 << 10  # never more than a window on its way
        while credits and sent < len(body):  # Mongrel2's pieces: at most 20 KiB
            n = min(20480, credits, len(body) - sent)
            end = sent + n == len(body)
            broker.send(ident, Cmd.BODY, rid, p.BODY_END if end else p.BODY_MORE,
                        body[sent:sent + n])
            sent += n
            credits -= n
    while (reply := broker.recv())[2] != p.CMD[Cmd.REPLY]:  # a READ may still come
        assert reply[2] in (p.CMD[Cmd.READ], p.CMD[Cmd.HEARTBEAT]), reply
    assert reply[3:5] == [rid, p.FLAG_LAST]
    assert reply[5].endswith(b"%d %s" % (len(body), hashlib.sha256(body).hexdigest().encode()))
    assert reads > 3  # granted again as the app read


def test_a_cancel_while_the_app_waits_for_body_ends_the_request(
        running: tuple[FakeBroker, Worker]) -> None:
    broker, _ = running
    ident = broker.recv_command(Cmd.HELLO)[0]
    broker.welcome(ident)
    rid = p.encode_request_id(10)
    broker.send(ident, Cmd.REQUEST, rid, b"svc", b"", streamed_request(5, b"", 100_000))
    assert broker.recv_command(Cmd.READ)[3] == rid
    broker.send(ident, Cmd.BODY, rid, p.BODY_MORE, b"x" * 5000)
    broker.send(ident, Cmd.CANCEL, rid)
    assert broker.recv_command(Cmd.REPLY)[3:] == [rid, p.FLAG_LAST]  # no messages
