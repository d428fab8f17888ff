"""BodyReader and BodyInput (scale0/core/bodystream.py): a fake broker feeds pieces."""

from __future__ import annotations

import hashlib
import random

import pytest

from scale0.core.bodystream import BodyError, BodyInput, BodyReader


class FakeLink:
    """Plays Mongrel2 + broker: sends at most the credits granted, in pieces."""

    def __init__(self, body: bytes, piece: int, reader: BodyReader) -> None:
        self.body, self.piece, self.reader = body, piece, reader
        self.sent = reader.received  # the first bytes came in the request message
        self.credits = 0
        self.max_held = 0
        self.waits = 0

    def grant(self, n: int) -> None:
        self.credits += n

    def wait(self) -> None:
        self.waits += 1
        if self.credits <= 0:
            raise AssertionError("the reader waits with no credit granted: deadlock")
        n = min(self.piece, self.credits, len(self.body) - self.sent)
        data = self.body[self.sent:self.sent + n]
        self.sent += n
        self.credits -= n
        self.reader.feed(data, self.sent == len(self.body))
        # bytes on their way (credited) + bytes held by the reader
        self.max_held = max(self.max_held, self.credits + self.reader.buffered)


def test_read_all_intact_and_window_bounded() -> None:
    body = random.Random(1).randbytes(3_000_000)
    reader = BodyReader(body[:1000], len(body), window=64 << 10)
    link = FakeLink(body, 16 << 10, reader)
    stream = BodyInput(reader, link.wait, link.grant)
    out = []
    while chunk := stream.read(10_000):
        out.append(chunk)
    assert hashlib.sha256(b"".join(out)).digest() == hashlib.sha256(body).digest()
    assert reader.eof and reader.consumed == len(body)
    assert link.max_held <= (64 << 10) + 1000  # the window + the first bytes (uncredited)


def test_read_larger_than_window_completes() -> None:
    body = bytes(range(256)) * 4000
    reader = BodyReader(b"", len(body), window=8192)
    link = FakeLink(body, 1000, reader)
    assert BodyInput(reader, link.wait, link.grant).read(len(body)) == body
    assert link.max_held <= 8192


def test_read_without_size_and_readline_and_iter() -> None:
    body = b"".join(b"line %d\n" % i for i in range(5000)) + b"tail"
    for size in (None, -1):
        reader = BodyReader(b"", len(body), window=4096)
        link = FakeLink(body, 700, reader)
        assert BodyInput(reader, link.wait, link.grant).read(size) == body
    reader = BodyReader(b"", None, window=4096)  # chunked: no length
    link = FakeLink(body, 333, reader)
    stream = BodyInput(reader, link.wait, link.grant)
    assert stream.readline() == b"line 0\n"
    assert stream.readline(3) == b"lin"
    assert stream.readline() == b"e 1\n"
    lines = list(stream)
    assert lines[0] == b"line 2\n" and lines[-1] == b"tail" and len(lines) == 4999
    assert stream.read() == b"" and stream.readline() == b""


def test_readlines_hint() -> None:
    body = b"a\nbb\nccc\n"
    reader = BodyReader(body, len(body))
    stream = BodyInput(reader, lambda: None, lambda n: None)
    reader.feed(b"", True)
    assert stream.readlines(3) == [b"a\n", b"bb\n"]
    assert stream.readlines() == [b"ccc\n"]


def test_credit_schedule() -> None:
    reader = BodyReader(b"", 1 << 20, window=1000)
    assert reader.credit() == 1000  # the whole window first
    assert reader.credit() == 0
    reader.feed(b"x" * 600, False)
    assert reader.take(200) == b"x" * 200
    assert reader.credit() == 0  # under a quarter window: batched
    reader.take(100)
    assert reader.credit() == 300
    reader.take()
    assert reader.credit() == 300
    reader.feed(b"y" * ((1 << 20) - 600), True)
    reader.take()
    assert reader.credit() == 0  # the body is in: nothing more to let come
    assert reader.eof


def test_pieces_that_break_the_length() -> None:
    reader = BodyReader(b"abc", 5)
    with pytest.raises(BodyError):
        reader.feed(b"def", False)
    reader = BodyReader(b"abc", 5)
    with pytest.raises(BodyError):
        reader.feed(b"d", True)  # short
    reader = BodyReader(b"abc", None)
    reader.feed(b"", True)
    with pytest.raises(BodyError):
        reader.feed(b"late", False)
    with pytest.raises(BodyError):
        BodyReader(b"abcdef", 5)
    with pytest.raises(ValueError):
        BodyReader(b"", 5, window=0)


def test_chunked_overshoot_still_completes() -> None:
    """A chunked body comes a whole client chunk at a time, past the credits."""
    body = random.Random(2).randbytes(300_000)
    reader = BodyReader(b"", None, window=4096)
    sent = 0
    credits = 0
    stream_credit = []

    def grant(n: int) -> None:
        nonlocal credits
        credits += n
        stream_credit.append(n)

    def wait() -> None:
        nonlocal sent, credits
        assert credits > 0
        n = min(65524, len(body) - sent)  # curl's chunk size
        reader.feed(body[sent:sent + n], sent + n == len(body))
        sent += n
        credits -= n

    assert BodyInput(reader, wait, grant).read() == body


def test_wait_raising_abandons_the_read() -> None:
    class Gone(Exception):
        pass

    def wait() -> None:
        raise Gone

    reader = BodyReader(b"ab", 10)
    stream = BodyInput(reader, wait, lambda n: None)
    with pytest.raises(Gone):
        stream.read(5)
