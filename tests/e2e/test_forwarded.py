"""Behind a TLS front (issue 11): X-Forwarded-Proto and X-Real-IP from a
trusted peer set wsgi.url_scheme and REMOTE_ADDR; from any other, ignored."""

from __future__ import annotations

import http.client
import json
import ssl
from collections.abc import Iterator

import pytest
import requests

from .conftest import Stack
from .tls_front import CERT, TlsFront


@pytest.fixture(scope="module")
def fronted(stack: Stack) -> Iterator[tuple[Stack, TlsFront, TlsFront]]:
    stack.start_mongrel2()
    stack.start_broker()
    stack.start_pool("e2e_apps:app", service="trusting", routes=("/trusting",))  # loopback
    stack.start_pool("e2e_apps:app", "--forwarded-allow-ips", "192.0.2.1,10.0.0.0/8",
                     service="strict", routes=("/strict",))
    stack.start_pool("examples.flask_app:app", service="flask", routes=("/flask",))
    for path in ("/trusting/", "/strict/", "/flask/"):
        stack.wait_ok(path)
    # The second front reaches Mongrel2 from 127.0.0.3: not a loopback address
    # in the default allow list (127.0.0.1, ::1), so an untrusted peer.
    with TlsFront(stack.http_port) as front, TlsFront(stack.http_port, "127.0.0.3") as other:
        yield stack, front, other


def via_tls(front: TlsFront, path: str, client_ip: str = "127.0.0.2",
            headers: dict[str, str] | None = None) -> dict[str, object]:
    """GET over TLS from `client_ip` (any 127/8 address is the loopback)."""
    context = ssl.create_default_context(cafile=str(CERT))
    conn = http.client.HTTPSConnection("127.0.0.1", front.port, timeout=10, context=context,
                                       source_address=(client_ip, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        assert response.status == 200, response.read()[:300]
        return json.loads(response.read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def test_a_trusted_tls_front_sets_scheme_and_client_address(
        fronted: tuple[Stack, TlsFront, TlsFront]) -> None:
    _, front, _ = fronted
    env = via_tls(front, "/trusting/environ")
    assert env["wsgi.url_scheme"] == "https"
    assert env["REMOTE_ADDR"] == "127.0.0.2"  # the client, not the front (127.0.0.1)
    assert env["SERVER_PORT"] == str(front.port)  # the Host the client sent


def test_a_flask_app_sees_a_secure_request(fronted: tuple[Stack, TlsFront, TlsFront]) -> None:
    # Flask (werkzeug) derives is_secure and url_root from wsgi.url_scheme,
    # as Django's request.is_secure() does without SECURE_PROXY_SSL_HEADER.
    _, front, _ = fronted
    context = ssl.create_default_context(cafile=str(CERT))
    conn = http.client.HTTPSConnection("127.0.0.1", front.port, timeout=10, context=context)
    try:
        conn.request("GET", "/flask/scheme")
        response = conn.getresponse()
        assert response.status == 200, response.read()[:300]
        assert json.loads(response.read()) == {
            "is_secure": True, "scheme": "https", "remote_addr": "127.0.0.1",
            "url_root": f"https://127.0.0.1:{front.port}/flask/"}
    finally:
        conn.close()


def test_a_worker_not_trusting_the_front_ignores_its_headers(
        fronted: tuple[Stack, TlsFront, TlsFront]) -> None:
    _, front, _ = fronted
    env = via_tls(front, "/strict/environ")
    assert env["wsgi.url_scheme"] == "http"
    assert env["REMOTE_ADDR"] == "127.0.0.1"  # the front itself
    assert env["headers"]["HTTP_X_FORWARDED_PROTO"] == "https"  # still there, as gunicorn


def test_a_front_outside_the_allow_list_is_ignored(
        fronted: tuple[Stack, TlsFront, TlsFront]) -> None:
    _, _, other = fronted
    env = via_tls(other, "/trusting/environ")
    assert env["wsgi.url_scheme"] == "http"
    assert env["REMOTE_ADDR"] == "127.0.0.3"


def test_a_client_cannot_claim_https_past_a_strict_worker(
        fronted: tuple[Stack, TlsFront, TlsFront]) -> None:
    stack, _, _ = fronted
    r = requests.get(stack.url("/strict/environ"), timeout=10,
                     headers={"X-Forwarded-Proto": "https", "X-Real-IP": "203.0.113.9"})
    env = r.json()
    assert (env["wsgi.url_scheme"], env["REMOTE_ADDR"]) == ("http", "127.0.0.1")
    # Mongrel2 overwrote the client's X-Forwarded-For with its peer address
    r = requests.get(stack.url("/strict/environ"), timeout=10,
                     headers={"X-Forwarded-For": "203.0.113.9"})
    assert r.json()["headers"]["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
