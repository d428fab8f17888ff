"""Proxy headers from trusted peers: scheme and client address (gunicorn's model).

Theory of operation
-------------------
Behind a TLS-terminating load balancer, Mongrel2's peer is the balancer, and
the request's scheme and client address are only in headers the balancer
sets. What Mongrel2 does with them (seen with Mongrel2 1.12, docs/operating.md):

* ``X-Forwarded-For`` is overwritten with Mongrel2's peer address, unless
  Mongrel2 runs with ``no_clobber_xff=1`` (then it passes through);
* ``X-Forwarded-Proto``, ``X-Real-IP`` and ``Forwarded`` pass through as sent.

So, as gunicorn does with ``--forwarded-allow-ips``, a worker believes these
headers only when Mongrel2's peer (its REMOTE_ADDR) is in the allow list
(default: the loopback addresses; ``*``: any):

* ``X-Forwarded-Proto: https`` (or ``http``) sets ``wsgi.url_scheme``, and
  SERVER_PORT when Host names no port;
* the client-address header (default ``X-Real-IP``; with ``no_clobber_xff``,
  ``X-Forwarded-For`` works too: its last entry, the one the trusted peer
  added) sets REMOTE_ADDR when it holds an IP address.

From other peers both are ignored (the headers stay in the environ as
HTTP_*, as under gunicorn). ``HTTPS=on`` is set whenever the scheme is
https. `apply` is pure: it reads Mongrel2's headers and edits an environ.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from scale0.wire.mongrel2 import Headers

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_ALLOW = "127.0.0.1,::1"
DEFAULT_CLIENT_HEADER = "X-Real-IP"
_PROTO = b"x-forwarded-proto"


@dataclass(frozen=True, slots=True)
class Trust:
    """Which peers may set the scheme and client address, and by which header."""

    allow_any: bool = False
    addresses: frozenset[str] = frozenset(("127.0.0.1", "::1"))  # exact REMOTE_ADDR texts
    networks: tuple[IPNetwork, ...] = ()
    client_header: bytes = b"x-real-ip"  # lowercase: Mongrel2 lowercases client names

    def trusts(self, peer: str | None) -> bool:
        if self.allow_any:
            return True
        if peer is None:
            return False
        return peer in self.addresses or (bool(self.networks) and _in(peer, self.networks))


LOOPBACK = Trust()  # the default: a front on the same host


def parse_allow(text: str) -> tuple[bool, frozenset[str], tuple[IPNetwork, ...]]:
    """'127.0.0.1,::1', '*' or addresses and CIDR networks, comma-separated.
    Raises ValueError naming the bad entry."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ValueError("empty: give addresses, networks or '*'")
    if "*" in items:
        return True, frozenset(), ()
    addresses: set[str] = set()
    networks: list[IPNetwork] = []
    for item in items:
        try:
            if "/" in item:
                networks.append(ipaddress.ip_network(item, strict=False))
            else:
                address = ipaddress.ip_address(item)
                addresses.update((item, str(address)))  # as written and canonical
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return False, frozenset(addresses), tuple(networks)


def trust(allow: str = DEFAULT_ALLOW, client_header: str = DEFAULT_CLIENT_HEADER) -> Trust:
    """A Trust from the two worker settings; ValueError on a bad value."""
    if not client_header or not client_header.isascii() or any(
            c in client_header for c in " \t:_()<>@,;\\\"/[]?={}"):
        raise ValueError(f"{client_header!r} is not a header name (and '_' names are dropped)")
    allow_any, addresses, networks = parse_allow(allow)
    return Trust(allow_any, addresses, networks, client_header.lower().encode("ascii"))


def apply(environ: dict[str, Any], headers: Headers, trusted: Trust) -> None:
    """Set wsgi.url_scheme, SERVER_PORT, REMOTE_ADDR and HTTPS in `environ`
    (built from `headers`) from a trusted peer's proxy headers."""
    proto = headers.get(_PROTO)
    client = headers.get(trusted.client_header)
    if (proto is not None or client is not None) and trusted.trusts(environ.get("REMOTE_ADDR")):
        scheme = _scheme(proto)
        if scheme is not None and scheme != environ["wsgi.url_scheme"]:
            environ["wsgi.url_scheme"] = scheme
            if not _has_port(environ.get("HTTP_HOST")):
                environ["SERVER_PORT"] = "443" if scheme == "https" else "80"
        address = _address(client)
        if address is not None:
            environ["REMOTE_ADDR"] = address
    if environ["wsgi.url_scheme"] == "https":
        environ["HTTPS"] = "on"


def _scheme(value: bytes | list[bytes] | None) -> str | None:
    """'http' or 'https' from X-Forwarded-Proto (its first entry), else None."""
    if value is None:
        return None
    first = value[0] if isinstance(value, list) else value
    scheme = first.split(b",", 1)[0].strip().lower()
    return scheme.decode("ascii") if scheme in (b"http", b"https") else None


def _address(value: bytes | list[bytes] | None) -> str | None:
    """The last entry of the client-address header, if it is an IP address."""
    if value is None:
        return None
    last = value[-1] if isinstance(value, list) else value
    text = last.rsplit(b",", 1)[-1].strip().decode("latin-1")
    return _ip(text)


@lru_cache(maxsize=1024)
def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


@lru_cache(maxsize=1024)
def _in(peer: str, networks: tuple[IPNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in networks)


def _has_port(host: str | None) -> bool:
    if not host:
        return False
    return host.rpartition("]")[2].find(":") >= 0 if host.startswith("[") else ":" in host
