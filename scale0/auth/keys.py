"""CURVE keys: certificate files, socket options, and which endpoints need them.

Every TCP port that crosses hosts (a broker's worker port, a relay's broker
port) is a CURVE server (libzmq zmq_curve(7)): the server holds
its own key pair, each client holds its own and the server's public key.
Who may connect is decided at the handshake by ZAP (auth/zap.py).

Certificates are pyzmq's `zmq.auth` format (`zmq.auth.create_certificates`):
`NAME.key` holds the public key, `NAME.key_secret` both; `scale0 keygen`
writes the metadata (`services = a,b`) into both, since the public file is
the one a broker reads.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
import zmq.utils.z85

from scale0.errors import ConfigError
from scale0.wire import s0w1 as p

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

_PUBLIC_BANNER = """#   ****  Generated on {0} by pyzmq  ****
#   ZeroMQ CURVE Public Certificate
#   Exchange securely, or use a secure mechanism to verify the contents
#   of this file after exchange. Store public certificates in your home
#   directory, in the .curve subdirectory.

"""


class KeyFileError(ConfigError):
    """A key file or folder that cannot be used; the message names the file."""


# ---- certificate files ------------------------------------------------------

def generate(name: str, directory: str | Path,
             services: Iterable[str] = ()) -> tuple[Path, Path]:
    """Write DIRECTORY/NAME.key and NAME.key_secret (mode 0600); never overwrite."""
    if not NAME_RE.match(name):
        raise KeyFileError(f"key name {name!r}: use letters, digits, '.', '_' and '-'")
    services = tuple(services)
    for service in services:
        if not p._valid_name(service):
            raise KeyFileError(f"service name {service!r} is not valid")
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} exists: remove it first, or choose another name")
    metadata = {"services": ",".join(services)} if services else {}
    old_umask = os.umask(0o077)  # the secret file is never readable by others
    try:
        public_s, secret_s = zmq.auth.create_certificates(str(folder), name, metadata)
    finally:
        os.umask(old_umask)
    # pyzmq writes metadata only into the secret file; a broker reads the
    # public one, so it gets the same metadata (same format, same banner).
    public_key, _ = zmq.auth.load_certificate(public_s)
    lines = [_PUBLIC_BANNER.format(datetime.datetime.now()), "metadata\n"]
    lines += [f"    {k} = {v}\n" for k, v in metadata.items()]
    lines += ["curve\n", f'    public-key = "{public_key.decode()}"\n']
    Path(public_s).write_text("".join(lines), encoding="utf-8")
    os.chmod(public_s, 0o644)
    os.chmod(secret_s, 0o600)
    return Path(public_s), Path(secret_s)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The `metadata` section of a certificate (ZPL: indented `key = value`)."""
    out: dict[str, str] = {}
    section = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line[0].isspace():
            section = line.strip()
            continue
        if section == "metadata" and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip().strip("'\"")
    return out


def services_of(metadata: dict[str, str]) -> frozenset[str] | None:
    """The services a key may announce; None: any."""
    names = frozenset(s.strip() for s in metadata.get("services", "").split(",") if s.strip())
    return names or None


def load_public(path: str | Path) -> bytes:
    """A certificate's public key (Z85, 40 bytes), or KeyFileError."""
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a CURVE certificate: {exc}") from exc
    _check_z85(public, path)
    return public


def load_secret(path: str | Path) -> tuple[bytes, bytes]:
    """(public, secret) of a `.key_secret` file, or KeyFileError."""
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a CURVE certificate: {exc}") from exc
    if secret is None:
        raise KeyFileError(f"{path}: no secret-key in it (give the .key_secret file)")
    _check_z85(public, path)
    _check_z85(secret, path)
    return public, secret


def _check_z85(key: bytes, path: str | Path) -> None:
    try:
        if len(zmq.utils.z85.decode(key)) == 32:
            return
    except (ValueError, KeyError):
        pass
    raise KeyFileError(f"{path}: a key must be 40 Z85 characters")


# ---- socket options ---------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CurveKeys:
    """One side's key pair, and (for a client) the server's public key."""

    public: bytes
    secret: bytes
    server: bytes = b""

    @classmethod
    def load(cls, secret_file: str, server_file: str | None = None) -> CurveKeys:
        public, secret = load_secret(secret_file)
        return cls(public, secret, load_public(server_file) if server_file else b"")

    def server_socket(self, sock: zmq.Socket[bytes], domain: bytes) -> None:
        """Before bind(): CURVE server; ZAP (a running ZapServer) decides who."""
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.ZAP_DOMAIN, domain)

    def client_socket(self, sock: zmq.Socket[Any]) -> None:
        """Before connect(): CURVE client of the server whose key we hold."""
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server)


def is_local(endpoint: str) -> bool:
    """Whether `endpoint` can only be reached from this host: ipc://, inproc://,
    or tcp:// on a loopback address (127.0.0.0/8, ::1, localhost)."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    host = rest.rpartition(":")[0].strip("[]")
    host = host.rpartition(";")[2]  # tcp://SOURCE;HOST:PORT is a connect form
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', an interface name, a host name: may face the network


def insecure_bind_error(what: str, endpoint: str, flag: str) -> str | None:
    """The refusal for a non-local bind without CURVE, or None if it is fine."""
    if is_local(endpoint):
        return None
    return (f"{what} {endpoint} is reachable from other hosts without CURVE: give "
            f"{flag} (and --authorized-keys), or --insecure to run it in the clear")
