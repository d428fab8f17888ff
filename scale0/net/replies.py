"""Replies on their way to Mongrel2, held in order while it takes none.

Both the broker (each link) and the relay (replies brokers send it) publish
Mongrel2 replies, and both follow the same rules:

* Nothing goes out on an XPUB before Mongrel2's SUB has subscribed: the
  slow-joiner gap would lose it (XPUB_VERBOSE shows every subscription).
* Mongrel2 reads its SUB one frame at a time and takes each frame as a
  reply (handler.c: one zmq_msg_recv per reply, RCVMORE never looked at),
  so up to BATCH replies go out as one multipart message: one wake-up of
  the I/O threads on both sides instead of one per reply.
* ZeroMQ queues a multipart message whole or not at all, so at the
  high-water mark (XPUB_NODROP: send raises EAGAIN) a batch is held whole,
  in order, and offered again later (`retry`). While anything is held the
  owner reads no new requests (`writable`), which bounds what is held by
  what is in progress; past MAX_HELD_REPLIES replies are dropped, logged
  as an error and counted.

`XPubReplies` publishes on an XPUB connected to a recv_spec; `RelayReplies`
(a broker link named `relay+ENDPOINT` alone) sends them to the relay over
the link's DEALER, behind an empty frame (docs/protocol.md Appendix B).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence

import zmq

from scale0.net.frames import recv_one, send_frames
from scale0.wire import s0r1

log = logging.getLogger(__name__)

BATCH = 256  # replies per ZeroMQ message
MAX_HELD_REPLIES = 100_000
# Messages (batches) an XPUB queues inside libzmq before send raises EAGAIN;
# libzmq counts a multipart message once, whatever its size. Between us and
# a Mongrel2 that stopped reading are this queue, the TCP buffers and its
# SUB's queue (libzmq's default, 1000 messages): only once all are full does
# a send fail and the holding rules (counted, shown, intake paused) start.
# With our default of 1000 too, about 2000 x BATCH replies could wait where
# nothing counts them; at 100, about 1100 x BATCH. Mongrel2's ordinary pauses
# stay far below either. Publish few messages per wake-up (the broker one
# per link, the relay one per read of its brokers), or a burst can meet this
# limit before libzmq has told the sender what the reader took.
XPUB_SNDHWM = 100


class HeldReplies:
    """The holding rules; a subclass says where a batch goes (`_send`)."""

    def __init__(self, target: str, recv_ident: bytes = b"") -> None:
        self.target = target  # for the log: where the replies go
        self.recv_ident = recv_ident
        self.held: deque[bytes] = deque()
        self.published = 0
        self.dropped = 0

    @property
    def subscribed(self) -> bool:
        """Whether replies may be sent at all right now."""
        return True

    @property
    def writable(self) -> bool:
        """Whether replies go out now: subscribed and none held."""
        return self.subscribed and not self.held

    def _send(self, batch: Sequence[bytes]) -> None:
        """Send one batch now, or raise zmq.Again."""
        raise NotImplementedError

    def publish(self, replies: Sequence[bytes]) -> None:
        """Send `replies` in order, up to BATCH per message; hold what cannot go now."""
        ident = self.recv_ident
        if ident:  # Mongrel2 drops replies whose sender lacks its recv_ident prefix.
            replies = [ident + reply[reply.find(b" "):]
                       if not reply.startswith(ident) and reply.find(b" ") > 0 else reply
                       for reply in replies]
        start = 0
        if self.writable:
            while start < len(replies):
                batch = replies[start:start + BATCH]
                try:
                    self._send(batch)
                except zmq.Again:
                    break
                start += len(batch)
                self.published += len(batch)
            if start == len(replies):
                return
        if not self.held:
            log.warning("Mongrel2 at %s is not taking replies: holding them, intake paused",
                        self.target)
        room = max(0, MAX_HELD_REPLIES - len(self.held))
        left = len(replies) - start
        if left > room:
            self.dropped += left - room
            log.error("dropping %d replies: %d replies held for %s", left - room,
                      len(self.held), self.target)
        self.held.extend(replies[start:start + room])

    def retry(self) -> None:
        """Offer the held replies again, oldest first."""
        held = self.held
        if not held:
            return
        while held and self.subscribed:
            batch = [held[i] for i in range(min(BATCH, len(held)))]
            try:
                self._send(batch)
            except zmq.Again:
                return
            for _ in batch:
                held.popleft()
            self.published += len(batch)
        if not held:
            log.info("Mongrel2 at %s takes replies again", self.target)


class XPubReplies(HeldReplies):
    """An XPUB on a Mongrel2 recv_spec. Made in the thread that uses it."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], recv_spec: str,
                 recv_ident: bytes = b"") -> None:
        super().__init__(recv_spec, recv_ident)
        self.recv_spec = recv_spec
        self.socket: zmq.Socket[bytes] = ctx.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.LINGER, 2000)  # let queued replies out on a clean stop
        self.socket.setsockopt(zmq.XPUB_NODROP, 1)  # at HWM, send raises EAGAIN: hold replies
        self.socket.setsockopt(zmq.SNDHWM, XPUB_SNDHWM)
        self.socket.setsockopt(zmq.XPUB_VERBOSE, 1)  # see every (re)subscription
        self.socket.connect(recv_spec)
        self.subscriptions = 0

    @property
    def subscribed(self) -> bool:
        return self.subscriptions > 0

    def _send(self, batch: Sequence[bytes]) -> None:
        send_frames(self.socket, batch)

    def read_subscriptions(self) -> None:
        """The XPUB is readable: (un)subscriptions; then offer what is held."""
        while True:
            try:
                message = recv_one(self.socket)
            except zmq.Again:
                break
            if message[:1] == b"\x01":
                self.subscriptions += 1
                log.info("Mongrel2 at %s subscribed", self.recv_spec)
            elif message[:1] == b"\x00":
                self.subscriptions = max(0, self.subscriptions - 1)
                log.warning("Mongrel2 at %s unsubscribed", self.recv_spec)
        self.retry()

    def close(self) -> None:
        self.retry()
        self.socket.close()  # LINGER: what is queued gets 2 s to go out


class RelayReplies(HeldReplies):
    """Replies through the relay, over a broker link's DEALER. With no relay
    connected (ZMQ_IMMEDIATE) or at the send high-water mark the send raises
    and the replies are held; the relay holds them in turn until Mongrel2
    takes them, so this side counts as always subscribed."""

    def __init__(self, dealer: zmq.Socket[bytes], relay_spec: str) -> None:
        super().__init__(f"{relay_spec} (through the relay)")
        self.dealer = dealer

    def _send(self, batch: Sequence[bytes]) -> None:
        send_frames(self.dealer, s0r1.replies_message(batch))
