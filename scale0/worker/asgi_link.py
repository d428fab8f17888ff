"""One broker session of the ASGI worker: the link's logic and its zmq.asyncio DEALER.

`AsgiLink` is the sans-IO `BrokerLink` (worker/link.py, docs/protocol.md
4.1) with the socket it is driven on and a reader task that hands every
message from the broker to the worker (worker/asgi_loop.py), which feeds it
to the link. The worker opens and closes the socket when a link call says
so (`Op`), and sends what the link queued with `flush`.

Sends never wait: the DEALER has no high-water mark, so a message (a LAST
above all) is never dropped while the broker is connected, and
`send_multipart` with NOBLOCK completes at once; a failure is logged.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from typing import Any

import zmq
import zmq.asyncio

from scale0.auth.keys import CurveKeys
from scale0.worker.link import BrokerLink, LinkSettings

log = logging.getLogger(__name__)

OnMessage = Callable[["AsgiLink", list[bytes]], None]


class AsgiLink(BrokerLink):
    """A broker session, its DEALER and the task reading it (module docstring)."""

    __slots__ = ("index", "reader", "socket")

    def __init__(self, index: int, endpoint: str, hello: bytes, settings: LinkSettings) -> None:
        super().__init__(endpoint, hello, settings)
        self.index = index  # with a request id, the key of a cycle
        self.socket: zmq.asyncio.Socket | None = None
        self.reader: asyncio.Task[None] | None = None

    def open(self, ctx: zmq.asyncio.Context, curve: CurveKeys | None,
             on_message: OnMessage) -> None:
        """Connect a new DEALER to the broker and start reading it."""
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 0)  # a LAST is never dropped (see worker/loop.py)
        if curve is not None:  # CURVE client of the broker (auth/keys.py)
            curve.client_socket(sock)
        sock.connect(self.endpoint)
        self.socket = sock
        self.reader = asyncio.get_running_loop().create_task(self._read(sock, on_message))

    def close_socket(self) -> None:
        if self.reader is not None:
            self.reader.cancel()
            self.reader = None
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None

    def flush(self) -> None:
        """Send what the link queued, in order."""
        for frames in self.outbox:
            self.send_frames(frames)
        self.outbox.clear()

    def send_frames(self, frames: list[bytes]) -> None:
        """Send one whole message now; dropped if the socket is closed."""
        sock = self.socket
        if sock is not None:
            try:
                # No HWM: it never blocks, so the future is done at once; a failure
                # would be set on it rather than raised.
                sent = sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("broker %s not accepting messages: %s", self.endpoint, exc)
                return
            asyncio.ensure_future(sent).add_done_callback(
                functools.partial(_log_send_failure, self.endpoint))

    async def _read(self, sock: zmq.asyncio.Socket, on_message: OnMessage) -> None:
        while True:
            try:
                frames = await sock.recv_multipart()
            except zmq.ZMQError:
                return  # closed under us (reconnect or exit)
            if self.socket is not sock:
                return
            try:
                on_message(self, frames)
            except Exception:
                log.exception("failed to handle a message from broker %s", self.endpoint)


def _log_send_failure(endpoint: str, sent: asyncio.Future[Any]) -> None:
    if not sent.cancelled() and sent.exception() is not None:
        log.warning("broker %s not accepting messages: %s", endpoint, sent.exception())
