"""Who may connect over CURVE: the ZAP handler (RFC 27) and the HELLO gate.

libzmq asks the ZAP handler during every CURVE handshake, on an
`inproc://zeromq.zap.01` REP socket of the same context:

* `Authorizer` is the decision, with no sockets: the public keys of an
  `--authorized-keys` folder (one `NAME.key` certificate per peer, auth/keys.py),
  each with the services its metadata allows (none listed: any). A known key
  is answered 200 with User-Id NAME, an unknown one 400: libzmq then drops
  the connection before any message of the peer is read. `reload()` (on
  SIGHUP) re-reads the folder and keeps the old set if the folder cannot be
  read.
* `ZapServer` is the driver: one thread owning the REP socket (and a wake-up
  pipe for reloads and the stop), started before the CURVE socket binds.
* `HelloGate` holds each worker message to its key: the broker reads the
  message's User-Id (a property libzmq attaches to every message of that
  connection); see the class.
* `CurveServer` bundles them for a process's --bind port.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.utils.z85

from scale0.auth.keys import CurveKeys, KeyFileError, load_public, read_metadata, services_of
from scale0.net.frames import recv_frames, send_frames
from scale0.wire import s0w1 as p

log = logging.getLogger(__name__)

ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # RFC 27: fixed by libzmq
ZAP_VERSION = b"1.0"
ERR_FORBIDDEN = 403  # S0W1 ERROR code: this key may not announce that service
LOG_EVERY_S = 10.0  # refusals logged at most this often per kind (with a count)


# ---- who may connect ----------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Peer:
    name: str  # the certificate's file name without .key: the User-Id
    services: frozenset[str] | None  # None: any service


class _Throttle:
    """Log a kind of refusal at most every LOG_EVERY_S, with how many since."""

    def __init__(self) -> None:
        self._next: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def __call__(self, kind: str, now: float) -> int | None:
        """None: stay quiet; else how many were not logged since the last one."""
        if now < self._next.get(kind, 0.0):
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return None
        self._next[kind] = now + LOG_EVERY_S
        return self._skipped.pop(kind, 0)


class Authorizer:
    """Which public keys may connect, and the services each may announce.

    Read by the ZAP thread and the loop, replaced whole by `reload()`: a
    reader sees the old table or the new one, never half of each.
    """

    def __init__(self, directory: str | None) -> None:
        self.directory = directory  # None: no key is authorized
        self.peers: dict[bytes, Peer] = {}  # by Z85 public key
        self.by_name: dict[str, Peer] = {}
        self.accepted = 0
        self.refused = 0  # handshakes refused: unknown key or wrong mechanism
        self.reloads = 0
        self._throttle = _Throttle()

    def load(self) -> None:
        """Read the folder; KeyFileError if it or a certificate in it is unusable."""
        if self.directory is None:
            return
        folder = Path(self.directory)
        if not folder.is_dir():
            raise KeyFileError(f"authorized keys {self.directory}: not a folder")
        peers: dict[bytes, Peer] = {}
        for path in sorted(folder.glob("*.key")):
            key = load_public(path)
            try:
                peer = Peer(path.stem, services_of(read_metadata(path)))
            except (OSError, UnicodeDecodeError) as exc:
                raise KeyFileError(f"{path}: cannot read it: {exc}") from exc
            peers[key] = peer
        self.peers, self.by_name = peers, {peer.name: peer for peer in peers.values()}

    def reload(self) -> bool:
        """Re-read the folder (SIGHUP); on an error keep the keys we had."""
        try:
            self.load()
        except KeyFileError as exc:
            log.error("keeping %d authorized keys: %s", len(self.peers), exc)
            return False
        self.reloads += 1
        log.info("authorized keys reloaded from %s: %d keys", self.directory, len(self.peers))
        return True

    def authenticate(self, mechanism: bytes, credentials: list[bytes], address: bytes,
                     now: float) -> tuple[bytes, bytes, bytes]:
        """(status code, status text, user id) for a ZAP request (RFC 27)."""
        if mechanism == b"NULL":
            # libzmq asks for NULL peers of sockets with a ZAP domain only; our
            # CURVE sockets never take NULL peers (the mechanisms must match).
            return b"200", b"OK", b""
        if mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._refuse("mechanism", now, "refused a %s handshake from %s",
                         mechanism.decode("ascii", "replace"), address.decode("ascii", "replace"))
            return b"400", b"CURVE only", b""
        key = zmq.utils.z85.encode(credentials[0])
        peer = self.peers.get(key)
        if peer is None:
            self._refuse("unknown", now, "refused unknown key %s from %s (not in %s)",
                         key.decode(), address.decode("ascii", "replace"),
                         self.directory or "authorized keys: none given")
            return b"400", b"unknown key", b""
        self.accepted += 1
        return b"200", b"OK", peer.name.encode()

    def may_announce(self, user: str, services: Iterable[str]) -> str | None:
        """None if key `user` may announce all of `services`; else the reason."""
        peer = self.by_name.get(user)
        if peer is None:  # removed from the folder since its handshake
            return f"key {user!r} is no longer authorized"
        if peer.services is None:
            return None
        for name in services:
            if name not in peer.services:
                return (f"key {user!r} may announce {', '.join(sorted(peer.services))}, "
                        f"not {name!r}")
        return None

    def _refuse(self, kind: str, now: float, message: str, *args: object) -> None:
        self.refused += 1
        skipped = self._throttle(kind, now)
        if skipped is not None:
            log.warning(message + (" (and %d more since)" if skipped else ""),
                        *args, *((skipped,) if skipped else ()))


class HelloGate:
    """The broker's check of each worker message against its sender's key.

    libzmq gives every message of a CURVE connection the User-Id that ZAP
    answered (the key's name), so the key is read from the message itself:

    * a key removed from `authorized_keys` (and SIGHUP) since its handshake:
      the message is dropped, so the broker hears nothing more from it and
      expires it after heartbeat x liveness (its requests answered as for
      any lost worker); its next handshake is refused;
    * a HELLO for a service the key may not announce: answered ERROR 403.
    """

    def __init__(self, authorizer: Authorizer) -> None:
        self.authorizer = authorizer
        self.refused = 0  # HELLOs refused
        self.revoked = 0  # messages dropped: their key is no longer authorized
        self._throttle = _Throttle()

    def recv(self, router: zmq.Socket[bytes]) -> list[bytes]:
        """One message from the worker ROUTER (zmq.Again if none): its frames,
        or [] for a message dropped or answered here."""
        first = router.recv(zmq.NOBLOCK, copy=False)
        frames = [first.bytes]
        if router.getsockopt(zmq.RCVMORE):
            frames += recv_frames(router)
        user = str(first.get("User-Id"))
        if user not in self.authorizer.by_name:
            self.revoked += 1
            skipped = self._throttle("revoked", time.monotonic())
            if skipped is not None:
                log.warning("dropped a message of key %r: no longer authorized%s", user,
                            f" (and {skipped} more since)" if skipped else "")
            return []
        if len(frames) < 4 or frames[2] != p.CMD[p.Command.HELLO] or frames[1] != p.VERSION:
            return frames
        try:
            services = [s.name for s in p.Hello.decode(frames[3]).services]
        except p.WireError:
            return frames  # the dispatcher answers a malformed HELLO
        reason = self.authorizer.may_announce(user, services)
        if reason is None:
            return frames
        self.refused += 1
        skipped = self._throttle("hello", time.monotonic())
        if skipped is not None:
            log.warning("refused HELLO: %s%s", reason,
                        f" (and {skipped} more since)" if skipped else "")
        try:
            send_frames(router, [frames[0], *p.error(ERR_FORBIDDEN, reason)])
        except zmq.ZMQError:
            pass  # it is gone already
        return []


# ---- the ZAP driver -------------------------------------------------------------

class ZapServer:
    """Serves `authorizer` on the context's ZAP endpoint from a thread.

    Constructors do no I/O; `start()` binds (in the thread) and waits for it.
    `request_reload()` is signal-safe: it only writes a byte to a pipe.
    """

    def __init__(self, authorizer: Authorizer, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.authorizer = authorizer
        self.context = context
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._reload = False
        self._stop = False
        self._started = threading.Event()
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, name="scale0-zap", daemon=True)

    def start(self, timeout_s: float = 5.0) -> None:
        self._thread.start()
        if not self._started.wait(timeout_s):
            raise RuntimeError("the ZAP handler did not start")
        if self._error is not None:
            raise RuntimeError(f"cannot serve ZAP: {self._error}")

    def request_reload(self) -> None:
        self._reload = True
        self._wake()

    def close(self) -> None:
        self._stop = True
        self._wake()
        if self._thread.is_alive():
            self._thread.join(5)
        self._wake_r.close()
        self._wake_w.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _run(self) -> None:
        try:
            zap = self.context.socket(zmq.REP)
            zap.setsockopt(zmq.LINGER, 0)
            zap.bind(ZAP_ENDPOINT)
        except zmq.ZMQError as exc:
            self._error = exc
            self._started.set()
            return
        self._started.set()
        poller = zmq.Poller()
        poller.register(zap, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        try:
            while not self._stop:
                events = dict(poller.poll())
                if self._wake_r in events:
                    try:
                        self._wake_r.recv(64)
                    except OSError:
                        pass
                if self._reload:
                    self._reload = False
                    self.authorizer.reload()
                if zap in events:
                    self._answer(zap)
        finally:
            zap.close(0)

    def _answer(self, zap: zmq.Socket[bytes]) -> None:
        while True:
            try:
                request = recv_frames(zap)
            except zmq.Again:
                return
            # RFC 27: version, request id, domain, address, identity, mechanism, credentials...
            if len(request) < 6 or request[0] != ZAP_VERSION:
                rid = request[1] if len(request) > 1 else b""
                send_frames(zap, [ZAP_VERSION, rid, b"500", b"bad ZAP request", b"", b""])
                continue
            status, text, user = self.authorizer.authenticate(
                request[5], request[6:], request[3], time.monotonic())
            send_frames(zap, [ZAP_VERSION, request[1], status, text, user, b""])


class CurveServer:
    """CURVE for a process's --bind port: its keys, who may connect, the ZAP
    thread. `start()` before the socket binds; `reload()` is signal-safe."""

    def __init__(self, keys: CurveKeys, authorizer: Authorizer, domain: bytes) -> None:
        self.keys = keys
        self.authorizer = authorizer
        self.domain = domain
        self._zap: ZapServer | None = None

    @classmethod
    def from_files(cls, secret_file: str, authorized_keys: str | None,
                   domain: bytes) -> CurveServer:
        return cls(CurveKeys.load(secret_file), Authorizer(authorized_keys), domain)

    def start(self, context: zmq.Context[zmq.Socket[bytes]]) -> None:
        self.authorizer.load()
        self._zap = ZapServer(self.authorizer, context)
        self._zap.start()
        if self.authorizer.directory is None:
            log.warning("CURVE on without authorized keys: every peer is refused")
            return
        log.info("CURVE on: %d authorized keys in %s", len(self.authorizer.peers),
                 self.authorizer.directory)

    def secure(self, sock: zmq.Socket[bytes]) -> None:
        self.keys.server_socket(sock, self.domain)

    def reload(self) -> None:
        if self._zap is not None:
            self._zap.request_reload()

    def close(self) -> None:
        if self._zap is not None:
            self._zap.close()
            self._zap = None

    def status(self) -> dict[str, object]:
        a = self.authorizer
        return {"curve": True, "authorized_keys": a.directory, "keys": len(a.peers),
                "accepted": a.accepted, "refused": a.refused, "reloads": a.reloads}
