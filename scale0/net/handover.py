"""A PULL on Mongrel2's send_spec that can leave without losing a request.

libzmq drops whatever Mongrel2's PUSH has queued for a peer when that peer's
connection ends, and `zmq_disconnect` also discards what already reached our
side. So whoever holds this PULL (a broker, or the relay) leaves in three
steps:

1. `half_close()`: shut down the write side of the TCP connection (the fd
   comes from the socket monitor); Mongrel2's libzmq sees EOF, closes its
   end, and sends new requests elsewhere or keeps them.
2. Keep reading until `read_monitor()` reports the disconnect: every byte
   Mongrel2 wrote before closing has then been read.
3. `leave()`: read what is left, then disconnect for good.

What this cannot cover is Mongrel2's own I/O thread: a request it had not
written yet when it saw the close is dropped (docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable

import zmq
from zmq.utils.monitor import parse_monitor_message

from scale0.net.frames import recv_one

log = logging.getLogger(__name__)

HANDOVER_TIMEOUT_S = 2.0  # how long the other side has to let go of a link
MAX_LEFT = 1_000_000  # bound on what `leave` reads: Mongrel2 wrote a finite amount


class MongrelPull:
    """Owns the PULL and its monitor. Made in the thread that uses it."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], send_spec: str) -> None:
        self.send_spec = send_spec
        self.socket: zmq.Socket[bytes] = ctx.socket(zmq.PULL)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.monitor: zmq.Socket[bytes] = self.socket.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        self.socket.connect(send_spec)
        self.fd = -1  # the current TCP/IPC connection; -1 if none

    @property
    def connected(self) -> bool:
        return self.fd >= 0

    def read_monitor(self) -> bool:
        """Track the connection's fd; True if it disconnected."""
        gone = False
        while True:
            try:
                event = parse_monitor_message(self.monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return gone
            if event["event"] == zmq.EVENT_CONNECTED:
                self.fd = int(event["value"])
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.fd, gone = -1, True

    def half_close(self) -> bool:
        """Step 1. False if there is no connection to close (nothing can be
        in flight to us) or it cannot be half-closed: then just `leave()`."""
        self.read_monitor()  # the fd is current: no unread DISCONNECTED
        if self.fd < 0:
            return False
        try:
            with socket.socket(fileno=os.dup(self.fd)) as conn:
                conn.shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.warning("cannot half-close the link to %s (%s): disconnecting",
                        self.send_spec, exc)
            return False
        log.info("handing over: half-closed the link to %s (fd %d)", self.send_spec, self.fd)
        return True

    def leave(self, take: Callable[[bytes], None]) -> int:
        """Step 3: pass each message still here to `take`, then disconnect.
        Returns how many there were."""
        read = 0
        while read < MAX_LEFT:
            try:
                raw = recv_one(self.socket)
            except zmq.Again:
                break
            read += 1
            take(raw)
        try:
            self.socket.disconnect(self.send_spec)
        except zmq.ZMQError:
            pass
        log.info("left Mongrel2 at %s (%d more requests read)", self.send_spec, read)
        return read

    def close(self) -> None:
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)
