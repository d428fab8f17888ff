"""Multipart send/receive for the hot path.

pyzmq's ``send_multipart`` ORs ``SNDMORE`` into the flags as ``enum.IntFlag``
per frame, which costs more than the sends themselves: about 14 us for a
7-frame message against 1.5 us for the same frames sent with plain int flags
through the Cython ``Socket.send`` (measured on the bench machine). Same
semantics: ZeroMQ queues a multipart message atomically, so once the first
frame is taken (NOBLOCK did not raise) the others are too.

Receiving, ``Socket.get(RCVMORE)`` builds a ``SocketOption`` enum on every
call; a frame received with ``copy=False`` carries its ``more`` flag, read
inside the same C call. For a 5-frame message that is 2.5 us against 3.6 us
(and 4.3 us for ``recv_multipart``). A failed non-blocking receive raises
``zmq.Again``, whose construction costs about 2.4 us: read a socket until it
raises once per wake-up, not once per message.
"""

from __future__ import annotations

from collections.abc import Sequence

import zmq

_send = zmq.backend.Socket.send  # the Cython method, without pyzmq's per-call sugar
_recv = zmq.backend.Socket.recv

_MORE_NB = int(zmq.SNDMORE | zmq.NOBLOCK)
_NB = int(zmq.NOBLOCK)
_MORE = int(zmq.SNDMORE)


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes], *, block: bool = False) -> None:
    """Send one multipart message; without `block`, raise zmq.Again if it cannot go now."""
    more, last = (_MORE, 0) if block else (_MORE_NB, _NB)
    for frame in frames[:-1]:
        _send(sock, frame, more)
    _send(sock, frames[-1], last)


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receive one whole multipart message now, or raise zmq.Again."""
    frame: zmq.Frame = _recv(sock, _NB, False)
    frames: list[bytes] = [frame.bytes]
    while frame.more:
        frame = _recv(sock, 0, False)
        frames.append(frame.bytes)
    return frames


def send_one(sock: zmq.Socket[bytes], data: bytes) -> None:
    """Send a one-frame message now, or raise zmq.Again."""
    _send(sock, data, _NB)


def recv_one(sock: zmq.Socket[bytes]) -> bytes:
    """Receive a one-frame message now, or raise zmq.Again."""
    data: bytes = _recv(sock, _NB)
    return data
