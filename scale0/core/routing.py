"""Host and path normalisation and longest-match service lookup. Pure, no I/O.

Theory of operation
-------------------
A route is ``[HOST]/PREFIX``. A request (Host header, raw path) is matched in
two steps, like nginx's ``server_name`` then ``location``:

1. Host candidates, best first: the exact host; then each proper suffix on a
   label boundary, longest first, as ``*.SUFFIX`` (subdomains only) and then
   plain ``SUFFIX`` (the name and its subdomains); then ``''`` (any host).
   ``example.com`` matches ``api.example.com`` but never ``badexample.com``.
   IP literals match exactly (a TLD is never all digits, RFC 3696 section 2).
2. Within the first candidate host that has a prefix matching the path, the
   longest prefix on segment boundaries wins: ``/app`` matches ``/app``,
   ``/app/`` and ``/app/x`` but not ``/apple``. A host whose routes all miss
   falls through to the next candidate, so a host-specific ``/api`` never hides
   an any-host ``/``.

Paths are compared after `normalize_path` (RFC 3986 section 6.2.2), so
``/x/../app`` and ``//app`` are under ``/app``; an encoded slash ``%2F`` stays
encoded and is not a segment boundary. Lookup costs one dict probe per
(candidate host, path prefix): O(labels x min(segments, deepest route)),
independent of the number of routes.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote_to_bytes

__all__ = [
    "Match",
    "Route",
    "RouteTable",
    "normalize_host",
    "normalize_path",
    "parse_route",
    "split_script_name",
]

# RFC 3986 section 2.3 unreserved; escapes of these are decoded (section 6.2.2.2).
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters left as they are in a normalised path: pchar minus '%' plus '/'
# (RFC 3986 section 3.3). Anything else is percent-encoded.
_PATH_SAFE = r"A-Za-z0-9\-._~!$&'()*+,;=:@/"
_SAFE_PATH_RE = re.compile(f"[{_PATH_SAFE}]*")
# One escape, or one character that needs encoding (including a stray '%').
_ESCAPE_RE = re.compile(f"%([0-9A-Fa-f]{{2}})|[^{_PATH_SAFE}]")

# Route host as written: '*', a name (optionally '*.'-prefixed, trailing dot
# allowed) or an IPv6 literal (RFC 3986 section 3.2.2), then an optional port.
_HOST_SPEC_RE = re.compile(
    r"(?:\*|(?:\*\.)?[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
# Never valid in a route spec: whitespace, controls, and query/fragment marks.
_BAD_SPEC_RE = re.compile(r"[\s\x00-\x1f\x7f?#]")

_CACHE_SIZE = 4096  # bounded: Host headers are client-controlled
_MISS = object()


def normalize_host(host: bytes | str | None) -> str:
    """Lowercase `host`, drop its ':port' and trailing '.'; '' for None or empty.

    ``'[::1]:8080'`` -> ``'[::1]'``; a bare IPv6 address (several ':') is kept.
    """
    if not host:
        return ""
    return _normalize_host(host)


@lru_cache(maxsize=_CACHE_SIZE)
def _normalize_host(host: bytes | str) -> str:
    text = host.decode("latin-1") if isinstance(host, bytes) else host
    text = text.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        return text[: end + 1] if end != -1 else text
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


def _escape(match: re.Match[str]) -> str:
    hex_digits = match.group(1)
    if hex_digits is not None:
        char = chr(int(hex_digits, 16))
        return char if char in _UNRESERVED else "%" + hex_digits.upper()
    char = match.group()
    # A str path is bytes decoded latin-1 (PEP 3333), so chars <= U+00FF are
    # bytes; anything above can only come from text, encode it as UTF-8.
    data = bytes([ord(char)]) if ord(char) <= 0xFF else char.encode("utf-8")
    return "".join(f"%{byte:02X}" for byte in data)


def normalize_path(raw: bytes | str) -> str:
    """The RFC 3986 normal form of a request path, used for all matching.

    Query and fragment are dropped; escapes of unreserved characters are
    decoded and other escapes get uppercase hex (section 6.2.2.1-2); characters
    outside pchar (and a stray '%') are encoded; duplicate slashes collapse;
    dot segments are removed (section 5.2.4, never above '/'). The result
    starts with '/', keeps a trailing slash, and is a fixed point.
    """
    path = raw.decode("latin-1") if isinstance(raw, bytes) else raw
    # Fast path: already normal (the usual request).
    if (
        path[:1] == "/"
        and "//" not in path
        and "/." not in path
        and _SAFE_PATH_RE.fullmatch(path) is not None
    ):
        return path
    for mark in "?#":
        cut = path.find(mark)
        if cut != -1:
            path = path[:cut]
    # Decode before removing dot segments: '%2e%2E' is '..' (section 6.2.2.2).
    path = _ESCAPE_RE.sub(_escape, path)
    segments = path.split("/")
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment and segment != ".":
            kept.append(segment)
    if not kept:
        return "/"
    # '/a/', '/a/b/..' and '/a/.' all denote the directory '/a/'.
    trailing = "/" if segments[-1] in ("", ".", "..") else ""
    return "/" + "/".join(kept) + trailing


def _depth(prefix: str) -> int:
    """Number of segments in a route prefix: '/' -> 0, '/a/b' -> 2."""
    return 0 if prefix == "/" else prefix.count("/")


def _canonical_host(raw: str) -> str:
    if not raw:
        return ""
    if _HOST_SPEC_RE.fullmatch(raw) is None:
        raise ValueError(
            f"bad host {raw!r}: expected a name such as 'example.com' or '*.example.com',"
            " an IP address, or '*' for any host (an optional ':port' is ignored)"
        )
    host = normalize_host(raw)
    return "" if host == "*" else host


def _canonical_prefix(raw: str) -> str:
    if not raw.startswith("/"):
        raise ValueError(f"bad path prefix {raw!r}: it must start with '/'")
    bad = _BAD_SPEC_RE.search(raw)
    if bad is not None:
        raise ValueError(
            f"bad path prefix {raw!r}: {bad.group()!r} is not allowed"
            " (no whitespace, control characters, query or fragment)"
        )
    # Text is encoded UTF-8 so '/café' matches what browsers send ('/caf%C3%A9').
    prefix = normalize_path(raw.encode("utf-8"))
    return prefix.rstrip("/") or "/"


@dataclass(frozen=True, slots=True)
class Route:
    """A host and a path prefix, always in canonical form.

    Invariants (established by ``__post_init__``, which raises ValueError on
    bad input): `host` is '' (any host), a lowercase name without port or
    trailing dot, '*.' + such a name, or an IP literal; `prefix` is '/' or a
    normalised path without trailing slash.
    """

    host: str
    prefix: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", _canonical_host(self.host))
        object.__setattr__(self, "prefix", _canonical_prefix(self.prefix))

    def __str__(self) -> str:
        return self.host + self.prefix


@dataclass(frozen=True, slots=True)
class Match:
    """The result of a lookup. `script_name` is the prefix as WSGI wants it
    ('' for the root prefix, PEP 3333 "SCRIPT_NAME"), still percent-encoded."""

    service: str
    route: Route
    script_name: str


def parse_route(spec: str) -> Route:
    """Parse ``[HOST]/PATH``: '/api', 'example.com/api', '*.example.com/'.

    An empty or '*' host means any host. Raises ValueError naming `spec`.
    """
    text = spec.strip()
    if not text:
        raise ValueError(
            f"empty route {spec!r}: expected '[HOST]/PATH', e.g. 'example.com/api' or '/api'"
        )
    bad = _BAD_SPEC_RE.search(text)
    if bad is not None:
        raise ValueError(
            f"bad route {spec!r}: {bad.group()!r} at offset {bad.start()} is not allowed"
            " (no whitespace, control characters, query or fragment)"
        )
    slash = text.find("/")
    if slash == -1:
        raise ValueError(
            f"bad route {spec!r}: no path; expected '[HOST]/PATH'"
            f" ({text + '/'!r} routes the whole host)"
        )
    try:
        return Route(text[:slash], text[slash:])
    except ValueError as exc:
        raise ValueError(f"bad route {spec!r}: {exc}") from exc


@lru_cache(maxsize=_CACHE_SIZE)
def _host_candidates(host: str) -> tuple[str, ...]:
    """Route hosts that may serve the normalised `host`, best first."""
    if not host or "*" in host:
        return ("",)
    candidates = [host]
    if not host.startswith("[") and not host.rpartition(".")[2].isdigit():
        dot = host.find(".")
        while dot != -1:
            suffix = host[dot + 1 :]
            if suffix:
                # '*.suffix' excludes the apex, so it is the narrower of the two.
                candidates += ("*." + suffix, suffix)
            dot = host.find(".", dot + 1)
    candidates.append("")
    return tuple(candidates)


class RouteTable:
    """Routes -> service names, with longest-match lookup.

    Invariant: ``_by_host[route.host][route.prefix]`` holds the Match for each
    route, no host maps to an empty dict, and `_max_depth` is the largest
    prefix depth present (so lookup never probes deeper prefixes). `_cache`
    holds lookup results for the table as it is: emptied on every change,
    and when it reaches _CACHE_SIZE entries (host and path are the client's).
    """

    def __init__(self, routes: Iterable[tuple[Route, str]] = ()) -> None:
        self._by_host: dict[str, dict[str, Match]] = {}
        self._max_depth = 0
        self._count = 0
        self._cache: dict[tuple[bytes | str | None, bytes | str], Match | None] = {}
        for route, service in routes:
            self.add(route, service)

    def add(self, route: Route, service: str) -> None:
        """Route `route` to `service`; replaces the route's previous service."""
        if not service:
            raise ValueError(f"route {str(route)!r}: service name must not be empty")
        self._cache.clear()
        table = self._by_host.setdefault(route.host, {})
        if route.prefix not in table:
            self._count += 1
        script_name = "" if route.prefix == "/" else route.prefix
        table[route.prefix] = Match(service, route, script_name)
        self._max_depth = max(self._max_depth, _depth(route.prefix))

    def remove(self, route: Route, service: str | None = None) -> bool:
        """Remove `route` (only if it maps to `service`, when given).

        Returns whether a route was removed; removing an absent one is a no-op.
        """
        table = self._by_host.get(route.host)
        match = table.get(route.prefix) if table is not None else None
        if table is None or match is None:
            return False
        if service is not None and match.service != service:
            return False
        self._cache.clear()
        del table[route.prefix]
        self._count -= 1
        if not table:
            del self._by_host[route.host]
        if _depth(route.prefix) == self._max_depth:
            self._max_depth = max((_depth(p) for t in self._by_host.values() for p in t), default=0)
        return True

    def lookup(self, host: bytes | str | None, path: bytes | str) -> Match | None:
        """The best route for a request, or None. `path` is the raw request path."""
        key = (host, path)
        cache = self._cache
        match = cache.get(key, _MISS)
        if match is not _MISS:
            return match  # type: ignore[return-value]
        match = self._lookup(host, path)
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[key] = match
        return match

    def _lookup(self, host: bytes | str | None, path: bytes | str) -> Match | None:
        by_host = self._by_host
        if not by_host:
            return None
        prefixes = _path_prefixes(normalize_path(path), self._max_depth)
        for candidate in _host_candidates(normalize_host(host)):
            table = by_host.get(candidate)
            if table is None:
                continue
            for prefix in prefixes:
                match = table.get(prefix)
                if match is not None:
                    return match
        return None

    def routes(self) -> list[tuple[Route, str]]:
        """All (route, service) pairs, sorted by host then prefix."""
        pairs = [(m.route, m.service) for t in self._by_host.values() for m in t.values()]
        pairs.sort(key=lambda pair: (pair[0].host, pair[0].prefix))
        return pairs

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return f"<RouteTable {self._count} routes>"


def _path_prefixes(path: str, max_depth: int) -> list[str]:
    """Route prefixes that a normalised `path` is under, longest first, at most
    `max_depth` segments deep: '/a/b/' -> ['/a/b', '/a', '/']."""
    parts = path.rstrip("/").split("/", max_depth + 1)[1 : max_depth + 1]
    prefixes: list[str] = []
    current = ""
    for part in parts:
        current += "/" + part
        prefixes.append(current)
    prefixes.reverse()
    prefixes.append("/")
    return prefixes


def _unquote(text: str) -> str:
    # PEP 3333: environ strings are bytes decoded latin-1.
    return unquote_to_bytes(text).decode("latin-1") if "%" in text else text


def split_script_name(normalized_path: str, script_name: str) -> tuple[str, str]:
    """(SCRIPT_NAME, PATH_INFO) for a WSGI environ, both percent-decoded.

    ``('/app', '/x')`` for '/app/x' under '/app'; ``('/app', '')`` for '/app';
    ``('', '/x')`` under the root ('' or '/'). Raises ValueError if the path is
    not under `script_name` on a segment boundary.
    """
    if script_name in ("", "/"):
        return "", _unquote(normalized_path)
    if normalized_path == script_name:
        rest = ""
    elif normalized_path.startswith(script_name + "/"):
        rest = normalized_path[len(script_name) :]
    else:
        raise ValueError(f"path {normalized_path!r} is not under {script_name!r}")
    return _unquote(script_name), _unquote(rest)
