"""The broker's control interface: the commands behind `scale0 ctl`.

Theory of operation
-------------------
The broker binds a ROUTER on an ``ipc://`` endpoint (the control socket) and,
next to it, an XPUB (the tap). Both are polled by the broker's own loop, so a
command runs in the loop thread and reads or changes dispatch state with no
lock, between two events.

A request is ``[b"", JSON]`` (what a REQ socket, or a DEALER that adds the
empty delimiter, sends); the JSON is ``{"argv": ["routes", "add", "/x",
"app"]}``, words as an operator types them (HAProxy's stats socket style).
The reply is ``[b"", JSON]``: ``{"ok": true, "result": ...}`` or ``{"ok":
false, "error": "what went wrong and what to do"}``. A malformed request is
answered with an error, never raised out of the loop. `execute` is the whole
protocol, bytes in and bytes out, with no socket (unit-tested as such).

Tap: every finished request of the broker (`dispatch.Done`, via the broker's
done sinks) is published on the XPUB as ``[b"svc:" + SERVICE + b"\\n", JSON]``
while someone subscribes to it; nothing is encoded while nobody does. The tap
reads a copy of what dispatch recorded and never touches dispatch, so it
cannot take a request from a worker. A slow tap reader loses lines (PUB
drops at its high-water mark); the broker never waits for it. A subscriber
that subscribes to ``b"hello:" + NONCE`` after its real topics is sent one
message on that topic: ZeroMQ applies one peer's subscriptions in order, so
from then on it sees every record of its topics.

Only local users reach it: both sockets are ipc:// files of mode 0600, in a
directory of mode 0700 when the broker makes it (see `default_endpoint`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import zmq

from scale0 import __version__
from scale0.core.dispatch import Dispatcher, Done, Worker
from scale0.wire.control import (  # the framing and paths, shared with the ctl client
    HELLO_PREFIX,
    MAX_REQUEST_BYTES,
    TAP_PREFIX,
    ControlError,
    encode_reply,
    ipc_path,
    parse_request,
    runtime_dir,
    tap_endpoint,
)
from scale0.wire.control import default_endpoint as default_endpoint  # re-exported
from scale0.wire.control import encode_request as encode_request  # re-exported

log = logging.getLogger(__name__)

class Controlled(Protocol):
    """What commands need from the broker (broker.Broker provides it)."""

    dispatcher: Dispatcher
    endpoint: str
    graceful_timeout_s: float

    @property
    def taking(self) -> bool: ...  # the startup grace is over: Mongrel2's requests are read

    @property
    def stopping(self) -> bool: ...

    def stop(self, *, force: bool | None = None) -> None: ...

    def link_status(self) -> list[dict[str, Any]]: ...

    def key_status(self) -> dict[str, Any]: ...


def private_dir(path: Path) -> None:
    """Make `path` (mode 0700) or check that an existing one is ours and private."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ControlError(f"cannot make the control directory {path}: {exc}") from exc
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        raise ControlError(f"{path} is not a directory: remove it or pass --control")
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise ControlError(f"{path} must be owned by uid {os.geteuid()} with mode 0700 "
                           f"(it is uid {st.st_uid}, mode {st.st_mode & 0o777:04o}): "
                           "fix it or pass --control")


def _in_use(path: Path) -> bool:
    """Whether a live process listens on the unix socket `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except OSError:
            return False
    return True


Handler = Callable[["ControlServer", list[str], float], Any]


def _usage(text: str, args: list[str], n: int | tuple[int, int]) -> None:
    low, high = (n, n) if isinstance(n, int) else n
    if not low <= len(args) <= high:
        raise ControlError(f"usage: {text}")


def _ping(server: ControlServer, args: list[str], now: float) -> Any:
    _usage("ping", args, 0)
    return {"pid": os.getpid()}


def _status(server: ControlServer, args: list[str], now: float) -> Any:
    _usage("status", args, 0)
    b = server.broker
    return {
        "broker": {"pid": os.getpid(), "version": __version__,
                   "uptime_s": round(time.time() - server.started_at, 3),
                   # starting: workers are taken, Mongrel2's requests wait
                   # (the startup grace); running: requests are read.
                   "state": "stopping" if b.stopping else "running" if b.taking
                   else "starting",
                   "workers_endpoint": b.endpoint, "control": server.endpoint,
                   "tap": server.tap_endpoint},
        "links": b.link_status(),
        "keys": b.key_status(),
        **b.dispatcher.snapshot(now),
    }


def _workers_named(d: Dispatcher, target: str) -> list[Worker]:
    return [w for w in d.workers.values() if target in (w.ident.hex(), w.label)]


def _unknown(d: Dispatcher, target: str) -> ControlError:
    known = ", ".join(sorted(w.label for w in d.workers.values())) or "none"
    return ControlError(f"no worker or service {target!r} (workers: {known}; services: "
                        + (", ".join(sorted(n for n in d.services if n)) or "none") + ")")


def _drain(server: ControlServer, args: list[str], now: float) -> Any:
    """HAProxy's drain: WORKER (id or label) or every worker of SERVICE gets
    no new request, finishes what it holds and stays connected, listed as
    draining, until `undrain`. Kept by label or service name (core/dispatch.py)."""
    _usage("drain WORKER|SERVICE", args, 1)
    d, target = server.broker.dispatcher, args[0]
    named = _workers_named(d, target)
    if named:
        kind, workers = "worker", named
        labels = {w.label for w in named}
        drained = [w for label in sorted(labels) for w in d.drain(now, label=label)]
    elif target in d.services:
        kind, workers = "service", list(d.services[target].workers.values())
        drained = d.drain(now, service=target)
    else:
        raise _unknown(d, target)
    log.info("control: drain %s %s: %d workers take no new request", kind, target,
             len(drained))
    return {"target": target, "kind": kind, "drained": [w.label for w in drained],
            "already_draining": [w.label for w in workers if w not in drained]}


def _undrain(server: ControlServer, args: list[str], now: float) -> Any:
    """Undo `drain`: the workers take requests again (`ready` is HAProxy's word)."""
    _usage("undrain WORKER|SERVICE", args, 1)
    d, target = server.broker.dispatcher, args[0]
    named = _workers_named(d, target)
    if named or target in d.drained_labels:
        kind = "worker"
        labels = {w.label for w in named} | ({target} & d.drained_labels)
        workers = [w for w in d.workers.values() if w.label in labels]
        ready = [w for label in sorted(labels) for w in d.undrain(now, label=label)]
    elif target in d.services or target in d.drained_services:
        kind = "service"
        service = d.services.get(target)
        workers = list(service.workers.values()) if service else []
        ready = d.undrain(now, service=target)
    else:
        raise _unknown(d, target)
    log.info("control: undrain %s %s: %d workers take requests again", kind, target,
             len(ready))
    return {"target": target, "kind": kind, "ready": [w.label for w in ready],
            "still_draining": [w.label for w in workers if w.draining]}


def _recycle(server: ControlServer, args: list[str], now: float) -> Any:
    """WORKER (id or label) or every worker of SERVICE finishes its requests
    and leaves (DRAIN, protocol.md 3.7); a pool starts a new process for it."""
    _usage("recycle WORKER|SERVICE", args, 1)
    d, target = server.broker.dispatcher, args[0]
    workers = _workers_named(d, target)
    kind = "worker"
    if not workers and target in d.services:
        workers, kind = list(d.services[target].workers.values()), "service"
    elif not workers:
        raise _unknown(d, target)
    recycled = [w.label for w in workers if d.drain_worker(w)]
    log.info("control: recycle %s %s: %d workers asked to leave", kind, target, len(recycled))
    return {"target": target, "kind": kind, "recycled": recycled,
            "already_leaving": [w.label for w in workers if w.label not in recycled]}


def _routes(server: ControlServer, args: list[str], now: float) -> Any:
    d = server.broker.dispatcher
    try:
        if args[:1] == ["add"]:
            _usage("routes add [HOST]/PATH SERVICE", args[1:], 2)
            route = d.add_route(args[1], args[2])
            log.info("control: route %s -> %s added", route, args[2])
            return {"added": str(route), "service": args[2]}
        if args[:1] == ["remove"]:
            _usage("routes remove [HOST]/PATH", args[1:], 1)
            service = d.remove_route(args[1])
            if service is None:
                raise ControlError(f"no route {args[1]!r}: see `scale0 ctl routes`")
            log.info("control: route %s (-> %s) removed", args[1], service)
            return {"removed": args[1], "service": service}
    except ValueError as exc:
        raise ControlError(str(exc)) from exc
    _usage("routes [add [HOST]/PATH SERVICE | remove [HOST]/PATH]", args, 0)
    return {"routes": [{"route": str(r), "service": name,
                        "origin": "broker" if r in d.configured else "worker"}
                       for r, name in d.routes.routes()]}


def _tap(server: ControlServer, args: list[str], now: float) -> Any:
    _usage("tap [SERVICE]", args, (0, 1))
    topic = TAP_PREFIX + (args[0].encode() + b"\n" if args else b"")
    return {"endpoint": server.tap_endpoint, "topic": topic.decode(), "pid": os.getpid()}


def _shutdown(server: ControlServer, args: list[str], now: float) -> Any:
    _usage("shutdown [--graceful]", args, (0, 1))
    if args and args[0] != "--graceful":
        raise ControlError("usage: shutdown [--graceful]")
    graceful = bool(args)
    log.warning("control: shutdown%s", " (graceful)" if graceful else " (immediate)")
    server.broker.stop(force=not graceful)
    return {"pid": os.getpid(), "graceful": graceful,
            "graceful_timeout_s": server.broker.graceful_timeout_s if graceful else 0}


COMMANDS: dict[str, Handler] = {
    "ping": _ping, "status": _status, "drain": _drain, "undrain": _undrain, "ready": _undrain,
    "recycle": _recycle, "routes": _routes, "tap": _tap, "shutdown": _shutdown,
}


# ---- the server (thin I/O, in the broker's loop) -------------------------

class ControlServer:
    """Constructors do no I/O: `start()` binds, `on_readable()` serves."""

    def __init__(self, broker: Controlled, endpoint: str) -> None:
        self.broker = broker
        self.endpoint = endpoint
        self.tap_endpoint = tap_endpoint(endpoint)
        self.started_at = time.time()
        self.router: zmq.Socket[bytes] | None = None
        self.tap: zmq.Socket[bytes] | None = None
        self.sockets: tuple[zmq.Socket[bytes], ...] = ()
        self._tapped: set[bytes] = set()  # topics with a subscriber (XPUB tells us)

    def execute(self, body: bytes, now: float) -> bytes:
        """One request's JSON -> the reply's JSON. Never raises."""
        try:
            argv = parse_request(body)
            handler = COMMANDS.get(argv[0])
            if handler is None:
                raise ControlError(f"unknown command {argv[0]!r}; commands: "
                                   + ", ".join(COMMANDS))
            return encode_reply(handler(self, argv[1:], now))
        except ControlError as exc:
            return encode_reply(error=str(exc))
        except Exception as exc:  # a bug must not stop the broker
            log.exception("control command failed")
            return encode_reply(error=f"internal error: {exc}")

    def start(self, ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
        control, tap = ipc_path(self.endpoint), ipc_path(self.tap_endpoint)
        if control.parent == runtime_dir():
            private_dir(control.parent)
        for path in (control, tap):
            if _in_use(path):
                raise ControlError(f"{path} is in use by another broker: pass --control")
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 1000)  # a `shutdown` reply still goes out
        router.setsockopt(zmq.MAXMSGSIZE, MAX_REQUEST_BYTES)
        pub = ctx.socket(zmq.XPUB)
        pub.setsockopt(zmq.LINGER, 0)
        old_umask = os.umask(0o077)  # the files are 0600 from the start, not after a chmod
        try:
            router.bind(self.endpoint)
            pub.bind(self.tap_endpoint)
        except zmq.ZMQError as exc:
            router.close(0)
            pub.close(0)
            raise ControlError(f"cannot bind the control socket {self.endpoint}: {exc}") from exc
        finally:
            os.umask(old_umask)
        for path in (control, tap):
            os.chmod(path, 0o600)
        self.router, self.tap, self.sockets = router, pub, (router, pub)
        log.info("control socket %s (tap %s)", self.endpoint, self.tap_endpoint)

    def on_readable(self, sock: zmq.Socket[bytes], now: float) -> None:
        if sock is self.tap:
            self._read_subscriptions()
            return
        for _ in range(64):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1]:
                log.warning("control: malformed message (%d frames) dropped", len(frames))
                continue
            try:
                sock.send_multipart([frames[0], b"", self.execute(frames[2], now)], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                log.warning("control: cannot reply: %s", exc)

    def _read_subscriptions(self) -> None:
        assert self.tap is not None
        while True:
            try:
                message = self.tap.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            topic = message[1:]
            if message[:1] == b"\x01" and topic.startswith(HELLO_PREFIX):
                self._publish(topic, b"{}")
            elif message[:1] == b"\x01":
                self._tapped.add(topic)
            elif message[:1] == b"\x00":
                self._tapped.discard(topic)

    def tapping(self) -> bool:
        """Whether a tap is subscribed (then the broker keeps Done records)."""
        return bool(self._tapped)

    def on_done(self, batch: list[Done]) -> None:
        """A done sink: publish what a tap subscribes to; nothing while none does."""
        tapped = self._tapped
        if not tapped:
            return
        everything = TAP_PREFIX in tapped
        to_wall = time.time() - time.monotonic()
        for done in batch:
            topic = TAP_PREFIX + done.service.encode() + b"\n"
            if everything or topic in tapped:
                self._publish(topic, json.dumps(tap_record(done, to_wall)).encode())

    def _publish(self, topic: bytes, body: bytes) -> None:
        if self.tap is not None:
            try:
                self.tap.send_multipart([topic, body], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # a tap is best effort; the broker never waits for one

    def close(self) -> None:
        """Close both sockets and remove their files (libzmq leaves them)."""
        for sock in self.sockets:
            sock.close()
        if self.sockets:
            for endpoint in (self.endpoint, self.tap_endpoint):
                ipc_path(endpoint).unlink(missing_ok=True)
        self.sockets = ()


def tap_record(done: Done, to_wall: float) -> dict[str, Any]:
    """A Done as the tap sends it; `to_wall` turns monotonic times into epoch seconds."""
    return {"time": round(done.ended_at + to_wall, 3), "service": done.service,
            "worker": done.worker, "status": done.status, "method": done.method,
            "path": done.path, "ms": round((done.ended_at - done.received_at) * 1000, 1),
            "bytes_in": done.bytes_in, "bytes_out": done.bytes_out, "attempts": done.attempts}
