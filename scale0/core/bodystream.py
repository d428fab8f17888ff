"""Request bodies streamed to a worker in bounded windows, sans-IO.

Theory of operation
-------------------
With Mongrel2's ``upload.stream=1`` a body over ``limits.content_length``
(and every chunked body) is not spooled to disk: Mongrel2 sends the request
message (marked ``UPLOAD_STREAM: 0``, with whatever body bytes it already
had) and then reads the client only as far as the handler lets it, sending
each piece read as a message of its own (`mongrel2.UploadChunk`), the last
one marked ``UPLOAD_STREAM_DONE``. A handler lets it read ``n`` more bytes
with a ``["ctl", {"credits": n}]`` reply (handler.c adds them to the
connection's credits; upload.c reads at most that many, a chunked body a
whole chunk whenever the credits are positive, which may drive them below
zero). The broker forwards each piece as one S0W1 BODY, and turns the
worker's READ n into that ctl reply (docs/protocol.md 4.5).

So the worker decides how much of the body is on its way: `BodyReader` is
the worker's side of one request's body. It is fed the pieces (`feed`),
hands them to the app (`take`), and says how many credits to grant
(`credit`): the whole window at the start, and then what the app consumed,
in batches of at least a quarter window. Invariant (declared lengths):
bytes granted and not yet received + bytes received and not yet taken
<= `window` (plus the bytes that came inside the request message, which
Mongrel2 sends uncredited). A chunked body can overshoot by one client chunk. So neither
the worker nor anything between it and Mongrel2 ever holds more than about
one window of a body, however large, and a slow app paces the client:
Mongrel2 stops reading its socket when the credits run out.

`BodyInput` is the PEP 3333 ``wsgi.input`` over a reader; its I/O (wait for
the next message, send READ) is passed in as two callables, so it has no
socket of its own. ``read(n)`` returns n bytes unless the body ends first
(what apps that do ``read(int(CONTENT_LENGTH))`` rely on), granting credits
as it goes, so a read larger than the window still completes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator

from scale0.errors import ProtocolError

# Credits granted ahead of the app's reads (bytes on their way or buffered).
WINDOW_BYTES = 256 << 10


class BodyError(ProtocolError, ValueError):
    """The pieces do not make the body the request declared; `status_hint` for
    whoever answers the client."""


class BodyReader:
    """One streamed request body at the worker (see the module docstring)."""

    __slots__ = ("_granted_once", "_pieces", "_to_grant", "buffered", "consumed",
                 "ended", "length", "received", "window")

    def __init__(self, first: bytes, length: int | None, *,
                 window: int = WINDOW_BYTES) -> None:
        if window <= 0:
            raise ValueError(f"window must be positive: {window}")
        self.length = length  # the declared Content-Length; None: chunked
        self.window = window
        self._pieces: deque[bytes] = deque((first,) if first else ())
        self.buffered = len(first)  # received, not yet taken
        self.received = len(first)  # body bytes fed so far, the first ones included
        self.consumed = 0  # taken by the app
        self.ended = False  # the last piece is in
        self._granted_once = False
        self._to_grant = 0  # taken since the last grant
        if length is not None and len(first) > length:
            raise BodyError(f"{len(first)} body bytes, {length} declared")

    def feed(self, data: bytes, end: bool) -> None:
        """The next piece (BODY); `end`: the body ends with it. BodyError if
        it runs past the declared length, comes after the end, or the body
        ends short of its length."""
        if self.ended:
            raise BodyError("body piece after the end of the body")
        self.received += len(data)
        if self.length is not None and self.received > self.length:
            raise BodyError(f"{self.received} body bytes, {self.length} declared")
        if data:
            self._pieces.append(data)
            self.buffered += len(data)
        if end:
            self.ended = True
            if self.length is not None and self.received != self.length:
                raise BodyError(f"body ended after {self.received} of {self.length} bytes")

    @property
    def eof(self) -> bool:
        """Everything has arrived and been taken."""
        return self.ended and not self.buffered

    def take(self, n: int = -1, *, line: bool = False) -> bytes:
        """Up to `n` buffered bytes (all of them if n < 0), without waiting;
        with `line`, only up to and including the first b"\\n". b"" when
        nothing is buffered (see `eof`)."""
        pieces = self._pieces
        out: list[bytes] = []
        want = self.buffered if n < 0 else min(n, self.buffered)
        got = 0
        while got < want:
            piece = pieces[0]
            size = min(len(piece), want - got)
            if line:
                newline = piece.find(b"\n", 0, size)
                if newline >= 0:
                    size = newline + 1
            if size == len(piece):
                pieces.popleft()
            else:
                pieces[0] = piece[size:]
                piece = piece[:size]
            out.append(piece)
            got += size
            if line and piece.endswith(b"\n"):
                break
        self.buffered -= got
        self.consumed += got
        self._to_grant += got
        return out[0] if len(out) == 1 else b"".join(out)

    def credit(self) -> int:
        """Credits to grant now (0: none): the window at first, then what the
        app took, once it is at least a quarter window. None after the end."""
        if self.ended:
            return 0
        if not self._granted_once:
            self._granted_once = True
            self._to_grant = 0
            return self.window
        if self._to_grant >= self.window // 4:
            n, self._to_grant = self._to_grant, 0
            return n
        return 0


class BodyInput:
    """``wsgi.input`` (PEP 3333 "Input and Error Streams") over a BodyReader.

    `wait()` blocks until the next message for this request has been read
    (and fed to the reader), raising to abandon the request (cancelled);
    `grant(n)` sends READ n to the broker.
    """

    def __init__(self, reader: BodyReader, wait: Callable[[], None],
                 grant: Callable[[int], None]) -> None:
        self.reader = reader
        self._wait = wait
        self._grant = grant
        self.error: BodyError | None = None  # the pieces broke the body: raised to the app
        self.aborted: BaseException | None = None  # what wait() raised: the request is over

    def feed(self, data: bytes, end: bool) -> None:
        """A BODY piece for this request (from the worker's loop)."""
        if self.error is None:
            try:
                self.reader.feed(data, end)
            except BodyError as exc:
                self.error = exc

    def _credit(self) -> None:
        n = self.reader.credit()
        if n:
            self._grant(n)

    def _collect(self, size: int, line: bool) -> bytes:
        reader = self.reader
        out: list[bytes] = []
        got = 0
        while True:
            if self.aborted is not None:
                raise self.aborted
            data = reader.take(-1 if size < 0 else size - got, line=line)
            if data:
                out.append(data)
                got += len(data)
            done = ((size >= 0 and got >= size) or reader.eof
                    or (line and data.endswith(b"\n")))
            if self.error is not None and not done:
                raise self.error
            self._credit()  # the window refills as the app takes
            if done:
                return b"".join(out)
            try:
                self._wait()
            except BaseException as exc:
                self.aborted = exc
                raise

    def read(self, size: int | None = -1) -> bytes:
        return self._collect(-1 if size is None or size < 0 else size, line=False)

    def readline(self, size: int | None = -1) -> bytes:
        return self._collect(-1 if size is None or size < 0 else size, line=True)

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line

    def close(self) -> None:
        """Nothing to release: what was not read is dropped with the request."""
