"""Screening a request before it is routed: HTTP edges Mongrel2 lets through.

Theory of operation
-------------------
Mongrel2 hands on some requests that HTTP says a server must refuse or read
otherwise. `screen` runs on each request message the broker routes, before
routing, and returns the request (possibly rewritten, with its raw message)
and a reason to refuse it with 400, or "":

* More than one Host field line: 400 (RFC 9112 section 3.2). Mongrel2 gives
  repeated headers as a list, so the broker would route by one value while
  the app saw them joined.
* Content-Length: field lines with different values, or a value that is not
  one decimal number, or beside a Transfer-Encoding: 400 (RFC 9110 section
  8.6, RFC 9112 sections 6.1 and 6.3).
  Mongrel2 reads the body by the first value; a check of another one would
  let a larger body past ``--max-body``. Identical repeats are one length.
* Absolute-form target (``GET http://host:port/path?q HTTP/1.1``, RFC 9112
  section 3.2.2): Mongrel2 drops the scheme and passes ``//host:port/path`` as
  PATH and URI (seen with Mongrel2 1.12, docs/protocol.md). The message is
  rewritten to origin-form: PATH ``/path``, URI ``/path?q``, and the Host
  header replaced by the target's authority, so routing and the app see what
  a proxy-style client meant. A userinfo (``user@host``) is refused (RFC 9110
  section 4.2.4).

The origin-form target ``//name/path`` arrives exactly like absolute-form,
so which one it was is a guess: ``//AUTHORITY/...`` is read as absolute-form
only when AUTHORITY is a valid host[:port] that contains a dot, a colon or a
bracket, is ``localhost``, or equals the Host header. A sloppily joined path
such as ``//api/x`` stays a path (routing then normalises it to ``/api/x``).

The common request (one Host, one decimal Content-Length, a ``/x`` path) costs
two dict lookups and a few type checks.
"""

from __future__ import annotations

import re
from typing import TypeVar, cast

import tnetstring

from scale0.wire import mongrel2 as m2

# RFC 3986 section 3.2.2 host (reg-name or IP-literal) and section 3.2.3 port;
# an optional userinfo is matched so that it can be refused by name.
_AUTHORITY_RE = re.compile(
    rb"(?:(?P<userinfo>[^@/?#\[\]]*)@)?"
    rb"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::(?P<port>[0-9]*))?")

E = TypeVar("E", bound=m2.Message)


def screen(req: E, raw: bytes) -> tuple[E, bytes, str]:
    """(request, raw message, "") to go on with, possibly rewritten to
    origin-form; or (req, raw, reason) when the request must get a 400."""
    headers = req.headers
    length = headers.get(b"content-length")
    if (type(headers.get(b"host")) is not list and req.path[:2] != b"//"
            and (length is None or (isinstance(length, bytes) and length.isdigit()
                                    and b"transfer-encoding" not in headers))):
        return req, raw, ""  # the common case
    problem = framing_problem(headers)
    if problem:
        return req, raw, problem
    if req.path[:2] == b"//":
        return absolute_form(req, raw)
    return req, raw, ""


def framing_problem(headers: m2.Headers) -> str:
    """Why the Host or Content-Length fields make the request invalid, or ""."""
    if type(headers.get(b"host")) is list:
        return "more than one Host header (RFC 9112 section 3.2)"
    length = headers.get(b"content-length")
    if length is None:
        return ""
    if b"transfer-encoding" in headers:
        return "both Transfer-Encoding and Content-Length (RFC 9112 section 6.1)"
    values = length if isinstance(length, list) else [length]
    if not all(value.isdigit() for value in values):
        return "invalid Content-Length (RFC 9112 section 6.3)"
    if len({value.lstrip(b"0") for value in values}) > 1:  # no int(): any number of digits
        return "conflicting Content-Length headers (RFC 9110 section 8.6)"
    return ""


def split_absolute(path: bytes, host: bytes | None) -> tuple[bytes, bytes] | str | None:
    """(authority, path) of a PATH that reads as absolute-form (``//host/p``),
    None if it is an origin-form path, or the reason to refuse it."""
    slash = path.find(b"/", 2)
    authority, rest = (path[2:], b"/") if slash < 0 else (path[2:slash], path[slash:])
    match = _AUTHORITY_RE.fullmatch(authority)
    if match is None:
        return None
    name = match["host"]
    if not (b"." in name or b"[" in name or match["port"] is not None
            or name.lower() == b"localhost"
            or (host is not None and authority.lower() == host.lower())):
        return None  # e.g. '//api/x': a path with a doubled slash
    if match["userinfo"] is not None:
        return "userinfo in the request target (RFC 9110 section 4.2.4)"
    return authority, rest


def absolute_form(req: E, raw: bytes) -> tuple[E, bytes, str]:
    """`req` rewritten from ``//authority/path`` to origin-form (RFC 9112
    section 3.2.2: the target's authority replaces Host), with its message."""
    host = req.headers.get(b"host")
    split = split_absolute(req.path, host if type(host) is bytes else None)
    if split is None:
        return req, raw, ""
    if isinstance(split, str):
        return req, raw, split
    authority, path = split
    headers = dict(req.headers)
    headers[b"host"] = authority
    headers[b"PATH"] = path
    query = headers.get(b"QUERY")
    headers[b"URI"] = path + b"?" + query if type(query) is bytes and query else path
    # Re-encoded with tnetstring headers whatever protocol Mongrel2 used:
    # parse_message reads both handler protocols (docs/protocol.md).
    encoded = tnetstring.dumps(headers)
    message = b"%s %d %s %s%d:%s," % (req.sender, req.conn_id, path, encoded,
                                      len(req.body), req.body)
    # Same headers but PATH/URI/host: parse_message gives the same event class.
    return cast(E, m2.parse_message(message)), message, ""
