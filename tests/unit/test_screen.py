"""Tests for scale0.core.screen: duplicate Host, conflicting lengths, absolute-form."""

from __future__ import annotations

import json

import pytest
import tnetstring

from scale0.core.screen import framing_problem, screen, split_absolute
from scale0.wire import mongrel2 as m2

SENDER = b"5ca1e000-0000-4000-8000-0000000e2e01"


def message(path: bytes, headers: dict[bytes, object], body: bytes = b"",
            protocol: str = "tnetstring") -> bytes:
    base: dict[bytes, object] = {b"METHOD": b"GET", b"VERSION": b"HTTP/1.1", b"PATH": path,
                                 b"URI": path, b"URL_SCHEME": b"http"}
    base.update(headers)
    if protocol == "json":
        head = json.dumps({k.decode(): (v.decode() if isinstance(v, bytes)
                                        else [x.decode() for x in v])  # type: ignore[attr-defined]
                           for k, v in base.items()}).encode()
        return b"%s 7 %s %d:%s,%d:%s," % (SENDER, path, len(head), head, len(body), body)
    return b"%s 7 %s %s%d:%s," % (SENDER, path, tnetstring.dumps(base), len(body), body)


def run(raw: bytes) -> tuple[m2.Event, bytes, str]:
    return screen(m2.parse_message(raw), raw)


def test_the_common_request_passes_untouched() -> None:
    raw = message(b"/app/x", {b"host": b"localhost", b"content-length": b"3"}, b"abc")
    req, out, problem = run(raw)
    assert out is raw and problem == "" and req.path == b"/app/x"


@pytest.mark.parametrize("headers, reason", [
    ({b"host": [b"a", b"b"]}, "Host"),
    ({b"host": [b"a", b"a"]}, "Host"),  # even the same value twice (RFC 9112 3.2)
    ({b"content-length": [b"3", b"3000000"]}, "conflicting"),
    ({b"content-length": [b"3000000", b"3"]}, "conflicting"),
    ({b"content-length": b"3, 5"}, "invalid"),
    ({b"content-length": b"-1"}, "invalid"),
    ({b"content-length": [b"3", b"x"]}, "invalid"),
    ({b"content-length": [b"3", b"9" * 5000]}, "conflicting"),  # no int() of 5000 digits
])
def test_framing_problems_are_refused(headers: dict[bytes, m2.HeaderValue], reason: str) -> None:
    assert reason in framing_problem(headers)
    _, _, problem = run(message(b"/app", headers))
    assert reason in problem


def test_identical_content_lengths_are_one_length() -> None:
    assert framing_problem({b"content-length": [b"3", b"3"]}) == ""
    assert framing_problem({b"content-length": [b"3", b"003"]}) == ""  # the same number
    assert run(message(b"/app", {b"content-length": [b"3", b"3"]}, b"abc"))[2] == ""


@pytest.mark.parametrize("protocol", ["tnetstring", "json"])
def test_absolute_form_becomes_origin_form_with_the_target_host(protocol: str) -> None:
    # What Mongrel2 passes for 'GET http://example.com:8080/a/b?x=1' with Host: other
    raw = message(b"//example.com:8080/a/b",
                  {b"host": b"other", b"QUERY": b"x=1", b"URI": b"//example.com:8080/a/b?x=1",
                   b"x-dup": [b"1", b"2"]}, b"", protocol)
    req, out, problem = run(raw)
    assert problem == "" and out != raw
    assert isinstance(req, m2.HttpRequest)
    assert req.path == b"/a/b"
    assert req.headers[b"PATH"] == b"/a/b"
    assert req.headers[b"URI"] == b"/a/b?x=1"
    assert req.headers[b"host"] == b"example.com:8080"
    assert req.headers[b"x-dup"] == [b"1", b"2"]
    assert m2.parse_message(out) == req  # the message the worker gets says the same


def test_absolute_form_without_a_path_is_the_root() -> None:
    req, _, problem = run(message(b"//example.com", {b"URI": b"//example.com"}))
    assert (problem, req.path, req.headers[b"URI"], req.headers[b"host"]) == (
        "", b"/", b"/", b"example.com")


def test_absolute_form_keeps_an_upload_an_upload() -> None:
    raw = message(b"//example.com/up", {b"METHOD": b"POST", b"content-length": b"30000",
                                        b"x-mongrel2-upload-start": b"uploads/u.1",
                                        b"x-mongrel2-upload-done": b"uploads/u.1"})
    req, _, problem = run(raw)
    assert problem == "" and isinstance(req, m2.UploadDone) and req.path == b"/up"
    assert req.upload_path == b"uploads/u.1"


@pytest.mark.parametrize("path, host, expected", [
    (b"//example.com/x", None, (b"example.com", b"/x")),
    (b"//localhost/x", None, (b"localhost", b"/x")),
    (b"//LOCALHOST:81/x", None, (b"LOCALHOST:81", b"/x")),
    (b"//[::1]:81/x", b"h", (b"[::1]:81", b"/x")),
    (b"//10.0.0.1/", None, (b"10.0.0.1", b"/")),
    (b"//svc/x", b"svc", (b"svc", b"/x")),  # equals the Host header
    (b"//api/x", b"localhost", None),  # a doubled slash, not a host
    (b"//api/x", None, None),
    (b"///x", None, None),
    (b"//a b/x", None, None),
    (b"//user@example.com/x", None, "userinfo"),
])
def test_split_absolute(path: bytes, host: bytes | None,
                        expected: tuple[bytes, bytes] | str | None) -> None:
    got = split_absolute(path, host)
    if isinstance(expected, str):
        assert isinstance(got, str) and expected in got
    else:
        assert got == expected


def test_a_doubled_slash_path_is_left_alone() -> None:
    raw = message(b"//api/x", {b"host": b"localhost"})
    req, out, problem = run(raw)
    assert (out, problem, req.path) == (raw, "", b"//api/x")


def test_userinfo_in_the_target_is_refused() -> None:
    assert "userinfo" in run(message(b"//u:pw@example.com/x", {b"host": b"h"}))[2]


def test_a_length_beside_transfer_encoding_is_refused() -> None:
    problem = run(message(b"/app", {b"content-length": b"5", b"transfer-encoding": b"chunked"}))[2]
    assert "Transfer-Encoding" in problem
    assert run(message(b"/app", {b"transfer-encoding": b"chunked"}))[2] == ""
