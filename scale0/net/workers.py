"""The broker's port for workers: a ROUTER that S0W1 workers' DEALERs connect to.

The dispatcher (core/dispatch.py) decides; this owns the socket: bind (with
CURVE and its ZAP handler first, so a CURVE port never runs without it),
read up to BATCH messages per wake-up (a CURVE HELLO checked against its
key's services by the HelloGate), and send what the dispatcher queued in
`to_workers`, telling it about a worker that vanished (ROUTER_MANDATORY:
EHOSTUNREACH, never a silent drop).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq

from scale0.auth.zap import CurveServer, HelloGate
from scale0.core.dispatch import Dispatcher
from scale0.net.frames import recv_frames, send_frames

log = logging.getLogger(__name__)

BATCH = 256  # messages read per wake-up before looking at the other sockets
# ZMQ_MAXMSGSIZE of the workers' ROUTER, per frame: a worker that sends a larger
# one is disconnected by libzmq before it is read. worker/process.py sends a reply in
# pieces of at most 1 MiB (MAX_MESSAGE_BYTES) plus the Mongrel2 reply prefix;
# a HELLO is at most some 300 KB (protocol.md 3.1). 2 MiB leaves room for both.
MAX_WORKER_FRAME_BYTES = 2 << 20


class WorkerPort:
    """Constructors do no I/O: `open()` binds."""

    def __init__(self, bind: str, dispatcher: Dispatcher,
                 curve: CurveServer | None = None) -> None:
        self.bind = bind
        self.dispatcher = dispatcher
        self.curve = curve  # CURVE (auth/keys.py, auth/zap.py) on this port
        self._gate = HelloGate(curve.authorizer) if curve is not None else None
        self.socket: zmq.Socket[bytes] | None = None
        self.endpoint = ""

    def open(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> zmq.Socket[bytes]:
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a vanished worker raises, never drops
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_WORKER_FRAME_BYTES)
        try:
            if self.curve is not None:  # ZAP first: a CURVE port never runs without it
                self.curve.start(ctx)
                self.curve.secure(router)
            router.bind(self.bind)
        except Exception:
            router.close(0)
            if self.curve is not None:
                self.curve.close()
            raise
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self.socket = router
        return router

    def read(self, now: float) -> None:
        router, d, gate = self.socket, self.dispatcher, self._gate
        assert router is not None
        for _ in range(BATCH):
            try:
                frames = recv_frames(router) if gate is None else gate.recv(router)
            except zmq.Again:
                return
            if frames:  # [] : a refused HELLO, answered by the gate
                d.on_worker(frames[0], frames[1:], now)

    def send(self) -> None:
        """What the dispatcher queued for workers, in order."""
        d, router = self.dispatcher, self.socket
        if router is None or not d.to_workers:
            return
        out, d.to_workers = d.to_workers, []
        for frames in out:
            try:
                send_frames(router, frames)
            except zmq.ZMQError as exc:  # EHOSTUNREACH: that worker is gone
                worker = d.workers.get(frames[0])
                if worker is not None:
                    log.warning("worker %s unreachable: %s", worker.label, exc)
                    d.worker_unreachable(worker, frames, time.monotonic())

    def key_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {"curve": False}
        if self.curve is not None and self._gate is not None:
            status = {**self.curve.status(), "hellos_refused": self._gate.refused,
                      "revoked_messages": self._gate.revoked}
        return status

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close(0)
            self.socket = None
        if self.curve is not None:
            self.curve.close()
