"""scale0.worker.wsgi: environ building and HTTP/1.x response bytes, with no transport.

Every app runs under wsgiref.validate.validator; pytest turns its
warnings into errors, and an iterable it sees garbage-collected unclosed fails.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment
from wsgiref.validate import validator

import pytest

from scale0.wire.mongrel2 import HttpRequest, UploadDone
from scale0.worker import wsgi
from scale0.worker.wsgi import BadRequest, ResponseInfo, WsgiSettings, build_environ, run_wsgi

TEXT = [("Content-Type", "text/plain")]


# --- helpers ---------------------------------------------------------------------


def split_path(path: str, script_name: str) -> tuple[str, str]:
    """SCRIPT_NAME/PATH_INFO of a normalized path under a known mount (PEP 3333)."""
    if script_name and (path == script_name or path.startswith(script_name + "/")):
        return script_name, path[len(script_name):]
    return "", path


def make_request(
    path: bytes = b"/app/x",
    *,
    method: bytes = b"GET",
    version: bytes = b"HTTP/1.1",
    query: bytes | None = None,
    headers: Mapping[bytes, bytes | list[bytes]] | None = None,
    body: bytes = b"",
    upload_path: bytes | None = None,
) -> HttpRequest | UploadDone:
    """A request shaped like Mongrel2's (docs/mongrel2.md) (JSON/tnetstring headers)."""
    hdrs: dict[bytes, bytes | list[bytes]] = {
        b"PATH": path,
        b"x-forwarded-for": b"127.0.0.1",
        b"host": b"localhost",
        b"METHOD": method,
        b"VERSION": version,
        b"URI": path + (b"?" + query if query is not None else b""),
        b"PATTERN": b"/app",
        b"URL_SCHEME": b"http",
        b"REMOTE_ADDR": b"127.0.0.1",
    }
    if query is not None:
        hdrs[b"QUERY"] = query
    hdrs.update(headers or {})
    common = {"sender": b"f9a3b8c2", "conn_id": 5, "path": path, "body": body}
    if upload_path is not None:
        hdrs[b"x-mongrel2-upload-start"] = upload_path
        hdrs[b"x-mongrel2-upload-done"] = upload_path
        return UploadDone(headers=hdrs, upload_path=upload_path, **common)  # type: ignore[arg-type]
    return HttpRequest(headers=hdrs, **common)  # type: ignore[arg-type]


@dataclass
class Parsed:
    version: str
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    complete: bool  # chunked: the 0-size terminator arrived

    def get(self, name: str) -> str | None:
        values = self.all(name)
        assert len(values) <= 1, values
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


def parse(raw: bytes) -> Parsed:
    """A tiny HTTP/1.x response parser; checks framing leaves no stray bytes."""
    head, sep, rest = raw.partition(b"\r\n\r\n")
    assert sep, raw[:200]
    status_line, *lines = head.decode("latin-1").split("\r\n")
    version, status, _reason = status_line.split(" ", 2)
    headers = [(n, v) for n, _, v in (line.partition(": ") for line in lines)]
    parsed = Parsed(version, int(status), headers, rest, complete=True)
    if parsed.get("Transfer-Encoding") == "chunked":
        body, parsed.complete = b"", False
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                assert rest == b"\r\n"
                parsed.complete, rest = True, b""
                break
            assert rest[size:size + 2] == b"\r\n"
            body, rest = body + rest[:size], rest[size + 2:]
        parsed.body = body
    return parsed


@dataclass
class Run:
    info: ResponseInfo
    response: Parsed
    sends: list[bytes]


def run(
    app: WSGIApplication,
    request: HttpRequest | UploadDone | None = None,
    *,
    script_name: str = "/app",
    settings: WsgiSettings | None = None,
    send: Callable[[bytes], None] | None = None,
    wrap: Callable[[WSGIApplication], WSGIApplication] = lambda app: app,
) -> Run:
    """run_wsgi on validator(app); `wrap` goes outside the validator."""
    request = request or make_request()
    script_name, path_info = split_path(request.path.decode("latin-1"), script_name)
    sends: list[bytes] = []

    def collect(data: bytes) -> None:
        assert type(data) is bytes and data
        sends.append(data)
        if send is not None:
            send(data)

    info = run_wsgi(wrap(validator(app)), request, script_name=script_name,
                    path_info=path_info, send=collect, settings=settings or WsgiSettings(),
                    errors=io.StringIO())
    return Run(info, parse(b"".join(sends)), sends)


def buffered(app: WSGIApplication) -> WSGIApplication:
    """Middleware returning a list (the validator hides it behind an iterator)."""
    def wrapped(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        result = app(environ, start_response)
        try:
            return list(result)
        finally:
            result.close()  # type: ignore[attr-defined]
    return wrapped


def capture(seen: dict[str, Any]) -> WSGIApplication:
    """An app recording its environ and the body it read."""
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        seen.update(environ)
        seen["body"] = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
        start_response("200 OK", [*TEXT, ("Content-Length", "2")])
        return [b"ok"]
    return app


def blocks_app(blocks: list[bytes], headers: list[tuple[str, str]] | None = None,
               status: str = "200 OK") -> WSGIApplication:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response(status, TEXT + (headers or []))
        yield from blocks
    return app


class Closing:
    """An app iterable recording close(); optionally raising at block `fail_at`."""

    def __init__(self, blocks: list[bytes], fail_at: int | None = None) -> None:
        self.blocks, self.fail_at, self.closed = blocks, fail_at, 0

    def __iter__(self) -> Iterator[bytes]:
        for i, block in enumerate(self.blocks):
            if i == self.fail_at:
                raise ValueError("app broke")
            yield block

    def close(self) -> None:
        self.closed += 1


# --- environ -----------------------------------------------------------------------


def test_environ_get_with_query() -> None:
    seen: dict[str, Any] = {}
    result = run(capture(seen), make_request(query=b"a=1&b=%20c"))
    assert result.response.status == 200 and result.response.body == b"ok"
    assert seen["REQUEST_METHOD"] == "GET"
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == ("/app", "/x")
    assert seen["QUERY_STRING"] == "a=1&b=%20c"
    assert seen["REQUEST_URI"] == seen["RAW_URI"] == "/app/x?a=1&b=%20c"
    assert seen["SERVER_PROTOCOL"] == "HTTP/1.1"
    assert (seen["SERVER_NAME"], seen["SERVER_PORT"]) == ("localhost", "80")
    assert seen["REMOTE_ADDR"] == "127.0.0.1"
    assert seen["HTTP_HOST"] == "localhost"
    assert seen["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
    assert "CONTENT_LENGTH" not in seen and "CONTENT_TYPE" not in seen
    assert seen["wsgi.version"] == (1, 0) and seen["wsgi.url_scheme"] == "http"
    assert seen["wsgi.multithread"] is False and seen["wsgi.multiprocess"] is False
    assert seen["wsgi.run_once"] is False and seen["wsgi.input_terminated"] is True
    assert seen["wsgi.file_wrapper"] is wsgi.FileWrapper
    assert seen["scale0.conn_id"] == 5
    assert seen["body"] == b""


def test_environ_post_body() -> None:
    seen: dict[str, Any] = {}
    request = make_request(b"/app/post", method=b"POST", body=b"hello=world", headers={
        b"content-type": b"application/x-www-form-urlencoded", b"content-length": b"11"})
    run(capture(seen), request)
    assert seen["REQUEST_METHOD"] == "POST"
    assert seen["CONTENT_TYPE"] == "application/x-www-form-urlencoded"
    assert seen["CONTENT_LENGTH"] == "11"
    assert "HTTP_CONTENT_TYPE" not in seen and "HTTP_CONTENT_LENGTH" not in seen
    assert seen["body"] == b"hello=world"
    assert seen["QUERY_STRING"] == ""


def test_environ_input_and_errors_objects() -> None:
    errors = io.StringIO()
    environ = build_environ(make_request(body=b"abc"), script_name="", path_info="/app/x",
                            settings=WsgiSettings(multithread=True), errors=errors)
    assert isinstance(environ["wsgi.input"], io.BytesIO)
    assert environ["wsgi.input"].read() == b"abc"
    assert environ["wsgi.errors"] is errors and environ["wsgi.multithread"] is True


def test_repeated_headers_joined_and_latin1() -> None:
    seen: dict[str, Any] = {}
    run(capture(seen), make_request(headers={
        b"x-dup": [b"one", b"two", b"three"], b"cookie": [b"a=1", b"b=2"],
        b"x-latin": b"caf\xe9"}))
    assert seen["HTTP_X_DUP"] == "one, two, three"
    assert seen["HTTP_COOKIE"] == "a=1; b=2"
    assert seen["HTTP_X_LATIN"] == "caf\xe9"


def test_mongrel2_keys_and_forgeable_headers_do_not_leak() -> None:
    seen: dict[str, Any] = {}
    run(capture(seen), make_request(query=b"q=1", headers={
        b"FRAGMENT": b"frag", b"DOWNLOAD_CREDITS": b"102400", b"FLAGS": b"0x81",
        b"method": b"evil",  # a client header really named "method"
        b"x_forwarded_for": b"6.6.6.6",  # '_' would collide with '-' (werkzeug)
        b"x-mongrel2-upload-done": b"/etc/passwd"}))
    http_keys = {key for key in seen if key.startswith("HTTP_")}
    assert http_keys == {"HTTP_HOST", "HTTP_X_FORWARDED_FOR", "HTTP_METHOD"}
    assert seen["HTTP_METHOD"] == "evil" and seen["REQUEST_METHOD"] == "GET"
    assert seen["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"


@pytest.mark.parametrize(("host", "scheme", "expected"), [
    (b"example.com:8080", b"http", ("example.com", "8080")),
    (b"example.com", b"http", ("example.com", "80")),
    (b"example.com", b"https", ("example.com", "443")),
    (b"[::1]:8443", b"https", ("[::1]", "8443")),
    (b"[::1]", b"http", ("[::1]", "80")),
    (None, b"http", ("fallback.test", "8000")),
])
def test_server_name_and_port(host: bytes | None, scheme: bytes,
                              expected: tuple[str, str]) -> None:
    request = make_request(headers={b"URL_SCHEME": scheme})
    if host is None:
        del request.headers[b"host"]
    else:
        request.headers[b"host"] = host
    seen: dict[str, Any] = {}
    run(capture(seen), request,
        settings=WsgiSettings(server_name="fallback.test", server_port="8000"))
    assert (seen["SERVER_NAME"], seen["SERVER_PORT"]) == expected
    assert seen["wsgi.url_scheme"] == scheme.decode()


@pytest.mark.parametrize(("path", "script_name", "expected"), [
    (b"/app/x", "/app", ("/app", "/x")),
    (b"/app", "/app", ("/app", "")),
    (b"/", "", ("", "/")),
    (b"/app/caf\xe9 x", "/app", ("/app", "/caf\xe9 x")),
])
def test_script_name_and_path_info_passed_through(
        path: bytes, script_name: str, expected: tuple[str, str]) -> None:
    seen: dict[str, Any] = {}
    run(capture(seen), make_request(path), script_name=script_name)
    assert (seen["SCRIPT_NAME"], seen["PATH_INFO"]) == expected


# --- uploads -----------------------------------------------------------------------


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


@pytest.mark.parametrize("delete", [True, False])
def test_upload_read_then_deleted(upload_dir: Path, delete: bool) -> None:
    stored = upload_dir / "upload.AbC123"
    stored.write_bytes(b"x" * 50_000)
    seen: dict[str, Any] = {}
    request = make_request(b"/app/up", method=b"POST", upload_path=b"uploads/upload.AbC123",
                           headers={b"content-type": b"application/octet-stream"})
    result = run(capture(seen), request,
                 settings=WsgiSettings(upload_dir=str(upload_dir), delete_uploads=delete))
    assert result.response.status == 200
    assert seen["body"] == b"x" * 50_000 and seen["CONTENT_LENGTH"] == "50000"
    assert seen["CONTENT_TYPE"] == "application/octet-stream"
    assert "HTTP_X_MONGREL2_UPLOAD_DONE" not in seen
    assert stored.exists() is not delete


def test_upload_deleted_when_app_fails(upload_dir: Path) -> None:
    stored = upload_dir / "upload.fail"
    stored.write_bytes(b"data")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        raise ValueError("boom")

    result = run(app, make_request(upload_path=b"uploads/upload.fail"),
                 settings=WsgiSettings(upload_dir=str(upload_dir)))
    assert result.response.status == 500 and not stored.exists()


def _forge(upload_dir: Path, case: str) -> bytes:
    """Set up one hostile layout; returns the upload path the client claims."""
    outside = upload_dir.parent / "secret"
    outside.write_bytes(b"secret")
    if case == "symlink-escape":
        (upload_dir / "evil").symlink_to(outside)
        return b"uploads/evil"
    if case == "symlink-inside":
        (upload_dir / "real").write_bytes(b"real")
        (upload_dir / "link").symlink_to(upload_dir / "real")
        return b"uploads/link"
    if case == "directory":
        (upload_dir / "sub").mkdir()
        return b"uploads/sub"
    if case == "fifo":
        os.mkfifo(upload_dir / "pipe")
        return b"uploads/pipe"
    return {"etc-passwd": b"/etc/passwd", "dotdot-name": b"../secret", "dotdot": b"..",
            "dot": b"uploads/.", "empty": b"", "trailing-slash": b"uploads/",
            "nul": b"uploads/a\x00b"}[case]


@pytest.mark.parametrize("case", ["etc-passwd", "dotdot-name", "dotdot", "dot", "empty",
                                  "trailing-slash", "nul", "symlink-escape",
                                  "symlink-inside", "directory", "fifo"])
def test_forged_upload_is_400_and_app_not_called(upload_dir: Path, case: str) -> None:
    upload_path = _forge(upload_dir, case)
    before = sorted(p.name for p in upload_dir.parent.rglob("*"))
    seen: dict[str, Any] = {}
    result = run(capture(seen), make_request(upload_path=upload_path),
                 settings=WsgiSettings(upload_dir=str(upload_dir)))
    assert seen == {}
    assert result.response.status == 400 and result.info.status == 400
    assert result.response.get("Connection") == "close" and result.info.close
    assert int(result.response.get("Content-Length") or -1) == len(result.response.body)
    assert sorted(p.name for p in upload_dir.parent.rglob("*")) == before  # nothing deleted


def test_upload_without_upload_dir_is_400(upload_dir: Path) -> None:
    (upload_dir / "upload.x").write_bytes(b"x")
    seen: dict[str, Any] = {}
    result = run(capture(seen), make_request(upload_path=b"uploads/upload.x"))
    assert seen == {} and result.response.status == 400 and result.info.close
    assert (upload_dir / "upload.x").exists()
    with pytest.raises(BadRequest) as caught:
        build_environ(make_request(upload_path=b"uploads/upload.x"), script_name="",
                      path_info="/", settings=WsgiSettings(), errors=sys.stderr)
    assert caught.value.status == 400


# --- framing and keep-alive --------------------------------------------------------


def test_app_content_length_keeps_alive_in_one_send() -> None:
    result = run(blocks_app([b"hello"], [("Content-Length", "5")]))
    assert result.response.get("Content-Length") == "5"
    assert result.response.get("Connection") is None
    assert result.response.get("Transfer-Encoding") is None
    assert result.response.body == b"hello" and len(result.sends) == 1
    assert result.info == ResponseInfo(status=200, body_bytes=5, close=False)


def test_list_result_gets_computed_content_length() -> None:
    result = run(blocks_app([b"ab", b"", b"cd"]), wrap=buffered)
    assert result.response.get("Content-Length") == "4"
    assert result.response.get("Transfer-Encoding") is None
    assert result.response.body == b"abcd" and not result.info.close


def test_generator_is_chunked_on_http11() -> None:
    result = run(blocks_app([b"ab", b"", b"cde"]))
    assert result.response.get("Transfer-Encoding") == "chunked"
    assert result.response.get("Content-Length") is None
    assert result.response.body == b"abcde" and result.response.complete
    assert result.sends[0].endswith(b"\r\n\r\n2\r\nab\r\n")  # headers ride with block 1
    assert result.info == ResponseInfo(status=200, body_bytes=5, close=False)


def test_generator_on_http10_closes_after_body() -> None:
    result = run(blocks_app([b"ab", b"cd"]), make_request(
        version=b"HTTP/1.0", headers={b"connection": b"keep-alive"}))
    assert result.response.version == "HTTP/1.0"
    assert result.response.get("Transfer-Encoding") is None
    assert result.response.get("Content-Length") is None
    assert result.response.get("Connection") == "close"
    assert result.response.body == b"abcd" and result.info.close


@pytest.mark.parametrize(("connection", "keep_alive"), [
    (b"keep-alive", True), (b"Keep-Alive", True), (None, False), (b"close", False)])
def test_http10_keep_alive_only_when_asked(connection: bytes | None, keep_alive: bool) -> None:
    headers = {b"connection": connection} if connection else {}
    result = run(blocks_app([b"hi"], [("Content-Length", "2")]),
                 make_request(version=b"HTTP/1.0", headers=headers))
    assert result.response.get("Connection") == ("keep-alive" if keep_alive else "close")
    assert result.info.close is not keep_alive


def test_empty_body_is_one_send_with_zero_length() -> None:
    result = run(blocks_app([]), make_request(version=b"HTTP/1.0",
                                              headers={b"connection": b"keep-alive"}))
    assert len(result.sends) == 1
    assert result.response.get("Content-Length") == "0"
    assert result.response.get("Connection") == "keep-alive" and not result.info.close


@pytest.mark.parametrize("connection", [b"close", b"Keep-Alive, Close", [b"te", b"close"]])
def test_request_connection_close(connection: bytes | list[bytes]) -> None:
    result = run(blocks_app([b"hi"], [("Content-Length", "2")]),
                 make_request(headers={b"connection": connection}))
    assert result.response.get("Connection") == "close" and result.info.close


def test_app_connection_close_and_hop_by_hop_dropped(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(wsgi, "_warned_hop_by_hop", set())
    hop = [("Connection", "close"), ("Keep-Alive", "timeout=5"), ("Upgrade", "h2c"),
           ("Transfer-Encoding", "gzip"), ("Trailer", "x"), ("X-Kept", "1")]
    for _ in range(2):
        with caplog.at_level(logging.WARNING, logger="scale0.worker.wsgi"):
            result = run(blocks_app([b"hi"], [*hop, ("Content-Length", "2")]))
    assert result.response.all("Connection") == ["close"] and result.info.close
    assert result.response.get("X-Kept") == "1"
    for name in ("Keep-Alive", "Upgrade", "Transfer-Encoding", "Trailer"):
        assert result.response.get(name) is None
    warned = [r.getMessage() for r in caplog.records if "hop-by-hop" in r.getMessage()]
    assert len(warned) == 4  # once per name, not per response; none for Connection: close


def test_head_keeps_app_length_but_sends_no_body() -> None:
    request = make_request(method=b"HEAD")
    result = run(blocks_app([b"hello"], [("Content-Length", "5")]), request)
    assert result.response.get("Content-Length") == "5" and result.response.body == b""
    assert len(result.sends) == 1
    assert result.info == ResponseInfo(status=200, body_bytes=0, close=False)
    result = run(blocks_app([b"hello", b"more"]), request)
    assert result.response.get("Content-Length") is None
    assert result.response.get("Transfer-Encoding") is None
    assert result.response.body == b"" and not result.info.close


@pytest.mark.parametrize("status", ["204 No Content", "304 Not Modified"])
def test_no_body_statuses(status: str) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response(status, [("ETag", '"x"')])
        yield b"ignored"

    result = run(app)
    assert result.response.status == int(status[:3]) and result.response.body == b""
    assert result.response.get("Content-Length") is None
    assert result.response.get("Transfer-Encoding") is None
    assert result.info == ResponseInfo(status=int(status[:3]), body_bytes=0, close=False)


# --- start_response, write() and errors --------------------------------------------


def test_write_callable_goes_before_iterable() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", TEXT)
        write(b"")
        write(b"a")
        write(b"b")
        return [b"c"]

    result = run(app, wrap=buffered)  # a list, but write() already sent the headers
    assert result.response.body == b"abc" and result.response.complete
    assert result.response.get("Transfer-Encoding") == "chunked"
    assert result.sends[0].endswith(b"\r\n\r\n1\r\na\r\n")


def test_start_response_again_with_exc_info_before_headers() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [*TEXT, ("X-First", "1")])
        try:
            raise KeyError("lookup")
        except KeyError:
            start_response("503 Service Unavailable", TEXT, sys.exc_info())
        return [b"sorry"]

    result = run(app)
    assert result.response.status == 503 and result.response.body == b"sorry"
    assert result.response.get("X-First") is None and result.info.status == 503


def test_start_response_with_exc_info_after_headers_reraises(
        caplog: pytest.LogCaptureFixture) -> None:
    reraised: list[BaseException] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", TEXT)
        yield b"partial"
        try:
            raise KeyError("late")
        except KeyError:
            try:
                start_response("500 Oops", TEXT, sys.exc_info())
            except KeyError as exc:
                reraised.append(exc)
                raise

    result = run(app)
    assert len(reraised) == 1
    assert result.response.status == 200 and result.response.body == b"partial"
    assert not result.response.complete  # no chunk terminator: the client sees the break
    assert result.info == ResponseInfo(status=200, body_bytes=7, close=True)


def test_start_response_twice_without_exc_info_is_500() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        start_response("201 Created", TEXT)
        return [b"x"]

    assert run(app).response.status == 500


@pytest.mark.parametrize("headers", [
    [("X-Bad", "a\r\nX-Evil: 1")], [("X-Euro", "\u20ac")], [("X-Del", "a\x7fb")],
    [("Content-Length", "abc")], [("Content-Length", "2"), ("Content-Length", "3")],
])
def test_invalid_headers_are_app_errors(headers: list[tuple[str, str]]) -> None:
    result = run(blocks_app([b"ab"], headers))
    assert result.response.status == 500 and result.response.get("X-Evil") is None


@pytest.mark.parametrize("status", ["600 Too Big", "099 Small", "2000 OK"])
def test_invalid_status_is_app_error(status: str) -> None:
    assert run(blocks_app([b"x"], status=status)).response.status == 500


def test_app_exception_before_headers_is_500(caplog: pytest.LogCaptureFixture) -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [*TEXT, ("X-App", "1")])
        yield from ()  # a generator: the error comes while iterating
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, logger="scale0.worker.wsgi"):
        result = run(app, make_request(method=b"POST"))
    response = result.response
    assert response.status == 500 and response.body == b"Internal Server Error"
    assert response.get("Content-Length") == str(len(response.body))
    assert (response.get("Content-Type") or "").startswith("text/plain")
    assert response.get("X-App") is None and response.get("Connection") is None
    assert result.info == ResponseInfo(status=500, body_bytes=21, close=False)
    record = next(r for r in caplog.records if r.exc_info)
    assert "POST /app/x" in record.getMessage()


def test_app_exception_in_call_is_500_with_http10_close() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        raise RuntimeError("no")

    result = run(app, make_request(version=b"HTTP/1.0"))
    assert result.response.status == 500 and result.response.get("Connection") == "close"
    assert result.info.close


def test_app_exception_after_headers_closes() -> None:
    closing = Closing([b"one", b"two", b"three"], fail_at=2)
    result = run(lambda environ, start_response: (start_response("200 OK", TEXT), closing)[1])
    assert result.response.body == b"onetwo" and not result.response.complete
    assert result.info == ResponseInfo(status=200, body_bytes=6, close=True)
    assert closing.closed == 1


def test_no_start_response_is_500() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        return []

    assert run(app).response.status == 500


@pytest.mark.parametrize("fail_at", [None, 0, 1])
def test_iterable_closed_on_every_path(fail_at: int | None) -> None:
    closing = Closing([b"a", b"b"], fail_at=fail_at)

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return closing

    result = run(app)
    assert closing.closed == 1
    assert result.response.status == (500 if fail_at == 0 else 200)


def test_send_failure_propagates_after_close(upload_dir: Path) -> None:
    closing = Closing([b"a", b"b"])
    (upload_dir / "upload.y").write_bytes(b"y")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        return closing

    def broken(data: bytes) -> None:
        raise ConnectionError("client gone")

    with pytest.raises(ConnectionError):
        run(app, make_request(upload_path=b"uploads/upload.y"), send=broken,
            settings=WsgiSettings(upload_dir=str(upload_dir)))
    assert closing.closed == 1 and not (upload_dir / "upload.y").exists()


def test_send_failure_propagates_even_if_app_wraps_it() -> None:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        write = start_response("200 OK", TEXT)
        try:
            write(b"x")
        except ConnectionError as exc:
            raise ValueError("app's own error") from exc
        return []

    def broken(data: bytes) -> None:
        raise ConnectionError("client gone")

    with pytest.raises(ConnectionError):
        run(app, send=broken)


def test_body_longer_than_content_length_is_truncated(
        caplog: pytest.LogCaptureFixture) -> None:
    produced: list[bytes] = []

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterator[bytes]:
        start_response("200 OK", [*TEXT, ("Content-Length", "3")])
        for block in (b"he", b"llo", b"never"):
            produced.append(block)
            yield block

    result = run(app)
    assert result.response.body == b"hel" and produced == [b"he", b"llo"]
    assert result.info == ResponseInfo(status=200, body_bytes=3, close=True)
    assert any("longer than Content-Length" in r.getMessage() for r in caplog.records)


def test_body_shorter_than_content_length_closes(caplog: pytest.LogCaptureFixture) -> None:
    result = run(blocks_app([b"abc"], [("Content-Length", "10")]))
    assert result.response.body == b"abc"
    assert result.info == ResponseInfo(status=200, body_bytes=3, close=True)
    assert any("shorter than Content-Length" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("length_known", [False, True])
def test_10mb_response_streams_in_blocks(length_known: bool) -> None:
    block = bytes(range(256)) * 256  # 64 KiB
    count = 160  # 10 MiB
    headers = [("Content-Length", str(len(block) * count))] if length_known else []
    result = run(blocks_app([block] * count, headers))
    assert len(result.sends) >= count
    assert max(len(data) for data in result.sends) <= len(block) + 256  # + head or framing
    assert result.response.body == block * count
    assert result.info == ResponseInfo(status=200, body_bytes=len(block) * count, close=False)


def test_file_wrapper() -> None:
    source = io.BytesIO(b"0123456789")

    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", TEXT)
        result: Iterable[bytes] = environ["wsgi.file_wrapper"](source, 4)
        return result

    result = run(app)
    assert result.response.body == b"0123456789" and source.closed
    assert len(result.sends) == 4  # 3 blocks + terminator


# --- a real framework --------------------------------------------------------------


class _ReadAll:
    """werkzeug calls read() with no size when wsgi.input_terminated is set, which
    the validator's InputWrapper refuses: turn it into read(-1) beneath the validator."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def read(self, size: int = -1) -> bytes:
        data: bytes = self.stream.read(size)
        return data

    def readline(self, size: int = -1) -> bytes:
        line: bytes = self.stream.readline(size)
        return line


def flask_app() -> WSGIApplication:
    from flask import Flask, jsonify, request, url_for

    app = Flask(__name__)

    @app.get("/hello")
    def hello() -> str:
        return "hi " + request.args.get("name", "?")

    @app.get("/json")
    def as_json() -> Any:
        return jsonify(args=request.args.to_dict(flat=False), url=url_for("hello"),
                       host=request.host)

    @app.post("/echo")
    def echo() -> bytes:
        return request.get_data()[::-1]

    def wsgi_app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        environ["wsgi.input"] = _ReadAll(environ["wsgi.input"])
        return app(environ, start_response)

    return wsgi_app


def test_flask_app() -> None:
    app = flask_app()
    result = run(app, make_request(b"/app/hello", query=b"name=bob"))
    assert result.response.status == 200 and result.response.body == b"hi bob"
    assert not result.info.close

    result = run(app, make_request(b"/app/json", query=b"a=1&a=2&b=%20c",
                                   headers={b"host": b"example.com:8080"}))
    assert result.response.get("Content-Type") == "application/json"
    assert json.loads(result.response.body) == {
        "args": {"a": ["1", "2"], "b": [" c"]}, "url": "/app/hello",
        "host": "example.com:8080"}

    result = run(app, make_request(b"/app/echo", method=b"POST", body=b"abc123", headers={
        b"content-type": b"application/octet-stream", b"content-length": b"6"}))
    assert result.response.body == b"321cba"

    result = run(app, make_request(b"/app/missing"))
    assert result.response.status == 404 and not result.info.close


# --- `last`: the bytes that complete a response end the request in one message ---


def _run_with_last(app: WSGIApplication, request: HttpRequest | None = None
                   ) -> tuple[ResponseInfo, list[bytes], list[tuple[bytes, bool]]]:
    request = request or make_request()
    sends: list[bytes] = []
    lasts: list[tuple[bytes, bool]] = []
    info = run_wsgi(validator(app), request, script_name="", path_info="/x",
                    send=sends.append, last=lambda data, close: lasts.append((data, close)),
                    settings=WsgiSettings(), errors=io.StringIO())
    return info, sends, lasts


def _app_with(blocks: list[bytes], headers: list[tuple[str, str]]) -> WSGIApplication:
    def app(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain"), *headers])
        return iter(blocks)
    return app


def test_last_gets_the_whole_small_response() -> None:
    info, sends, lasts = _run_with_last(_app_with([b"hello"], [("Content-Length", "5")]))
    assert sends == []
    assert len(lasts) == 1 and lasts[0][1] is False
    assert parse(lasts[0][0]).body == b"hello"
    assert info.ended


def test_last_gets_the_block_that_reaches_content_length() -> None:
    info, sends, lasts = _run_with_last(_app_with([b"ab", b"cd", b"e"], [("Content-Length", "5")]))
    assert len(sends) == 2 and len(lasts) == 1
    assert parse(b"".join(sends) + lasts[0][0]).body == b"abcde"
    assert lasts[0][0] == b"e" and info.ended


def test_last_gets_the_chunked_terminator() -> None:
    _info, sends, lasts = _run_with_last(_app_with([b"ab", b"cd"], []))
    assert lasts == [(b"0\r\n\r\n", False)]
    assert parse(b"".join(sends) + lasts[0][0]).body == b"abcd"


def test_last_carries_close_for_connection_close() -> None:
    request = make_request(headers={b"connection": b"close"})
    _, _, lasts = _run_with_last(_app_with([b"hello"], [("Content-Length", "5")]), request)
    assert len(lasts) == 1 and lasts[0][1] is True


def test_last_is_not_called_when_the_end_is_unknown() -> None:
    request = make_request(headers={b"VERSION": b"HTTP/1.0"})
    info, sends, lasts = _run_with_last(_app_with([b"ab", b"cd"], []), request)
    assert lasts == [] and not info.ended and info.close
    assert parse(b"".join(sends)).body == b"abcd"
