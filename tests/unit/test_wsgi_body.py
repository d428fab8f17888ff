"""scale0/worker/wsgi.py with a streamed body (upload.stream): the environ and the end of
a request whose body read was abandoned."""

from __future__ import annotations

import io
from typing import Any

import pytest
import tnetstring

from scale0.core.bodystream import BodyInput, BodyReader
from scale0.wire import mongrel2 as m2
from scale0.worker.wsgi import WsgiSettings, build_environ, run_wsgi

SENDER = b"5ca1e000-0000-4000-8000-0000000e2e01"


def streamed(length: int | None) -> m2.HttpRequest:
    headers: dict[bytes, bytes] = {b"METHOD": b"POST", b"VERSION": b"HTTP/1.1", b"PATH": b"/",
                                   b"URI": b"/", b"host": b"localhost", b"UPLOAD_STREAM": b"0"}
    if length is None:
        headers[b"transfer-encoding"] = b"chunked"
    else:
        headers[b"content-length"] = b"%d" % length
    raw = b"%s 3 / %s2:ab," % (SENDER, tnetstring.dumps(headers))
    event = m2.parse_message(raw)
    assert isinstance(event, m2.HttpRequest) and m2.streamed_body(event.headers)
    return event


def body_of(event: m2.HttpRequest, rest: bytes, length: int | None) -> BodyInput:
    reader = BodyReader(event.body, length)
    pieces = [rest]

    def wait() -> None:
        reader.feed(pieces.pop(0) if pieces else b"", True)

    return BodyInput(reader, wait, lambda n: None)


@pytest.mark.parametrize("length", [5, None])
def test_the_environ_of_a_streamed_body(length: int | None) -> None:
    event = streamed(length)
    body = body_of(event, b"cde", length)
    environ = build_environ(event, script_name="", path_info="/", settings=WsgiSettings(),
                            errors=io.StringIO(), body=body)
    assert environ["wsgi.input"] is body and environ["wsgi.input_terminated"] is True
    assert environ.get("CONTENT_LENGTH") == (None if length is None else "5")
    assert environ["wsgi.input"].read() == b"abcde"


def test_an_abandoned_body_read_propagates_and_is_not_a_500() -> None:
    class Gone(Exception):
        pass

    event = streamed(100)
    reader = BodyReader(event.body, 100)

    def wait() -> None:
        raise Gone

    body = BodyInput(reader, wait, lambda n: None)
    sent: list[bytes] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        try:
            environ["wsgi.input"].read(50)
        except Exception as exc:  # an app that wraps errors in its own
            raise RuntimeError("could not read the body") from exc
        return [b""]

    with pytest.raises(Gone):
        run_wsgi(app, event, script_name="", path_info="/", send=sent.append,
                 settings=WsgiSettings(), errors=io.StringIO(), body=body)
    assert sent == []  # no 500 page for a request that is over
