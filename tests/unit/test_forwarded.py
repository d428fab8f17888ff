"""Tests for scale0.core.forwarded: proxy headers believed only from trusted peers."""

from __future__ import annotations

import io
from typing import Any

import pytest

from scale0.core.forwarded import LOOPBACK, Trust, apply, parse_allow, trust
from scale0.wire.mongrel2 import HttpRequest
from scale0.worker.wsgi import WsgiSettings, build_environ


def environ_for(peer: str, extra: dict[bytes, bytes | list[bytes]], *,
                forwarded: Trust = LOOPBACK, host: bytes = b"example.com",
                scheme: bytes = b"http") -> dict[str, Any]:
    headers: dict[bytes, bytes | list[bytes]] = {
        b"PATH": b"/x", b"METHOD": b"GET", b"VERSION": b"HTTP/1.1", b"URI": b"/x",
        b"URL_SCHEME": scheme, b"REMOTE_ADDR": peer.encode(), b"host": host,
        b"x-forwarded-for": peer.encode(), **extra}
    request = HttpRequest(b"s", 1, b"/x", headers, b"")
    return build_environ(request, script_name="", path_info="/x",
                         settings=WsgiSettings(forwarded=forwarded), errors=io.StringIO())


def test_a_loopback_front_sets_scheme_port_and_client() -> None:
    env = environ_for("127.0.0.1", {b"x-forwarded-proto": b"https", b"x-real-ip": b"203.0.113.7"})
    assert env["wsgi.url_scheme"] == "https" and env["HTTPS"] == "on"
    assert env["SERVER_PORT"] == "443"  # Host names no port
    assert env["REMOTE_ADDR"] == "203.0.113.7"
    assert env["HTTP_X_FORWARDED_PROTO"] == "https"


def test_an_untrusted_peer_is_ignored() -> None:
    env = environ_for("198.51.100.9", {b"x-forwarded-proto": b"https",
                                       b"x-real-ip": b"203.0.113.7"})
    assert env["wsgi.url_scheme"] == "http" and "HTTPS" not in env
    assert env["SERVER_PORT"] == "80" and env["REMOTE_ADDR"] == "198.51.100.9"


def test_an_explicit_host_port_is_kept() -> None:
    env = environ_for("::1", {b"x-forwarded-proto": b"https"}, host=b"example.com:8443")
    assert (env["wsgi.url_scheme"], env["SERVER_PORT"]) == ("https", "8443")


def test_http_from_a_front_downgrades_a_tls_listener() -> None:
    env = environ_for("127.0.0.1", {b"x-forwarded-proto": b"HTTP"}, scheme=b"https")
    assert env["wsgi.url_scheme"] == "http" and "HTTPS" not in env
    assert env["SERVER_PORT"] == "80"


def test_a_tls_listener_alone_sets_https_on() -> None:
    env = environ_for("198.51.100.9", {}, scheme=b"https")
    assert env["wsgi.url_scheme"] == "https" and env["HTTPS"] == "on"


@pytest.mark.parametrize("value, expected", [
    (b"https", "https"), (b" HTTPS ", "https"), (b"https, http", "https"),
    ([b"https", b"http"], "https"), (b"wss", "http"), (b"", "http"),
])
def test_the_first_proto_entry_counts(value: bytes | list[bytes], expected: str) -> None:
    assert environ_for("127.0.0.1", {b"x-forwarded-proto": value})["wsgi.url_scheme"] == expected


@pytest.mark.parametrize("value, expected", [
    (b"203.0.113.7", "203.0.113.7"),
    (b"10.0.0.1, 203.0.113.7", "203.0.113.7"),  # the entry the trusted peer added
    ([b"10.0.0.1", b"203.0.113.7"], "203.0.113.7"),
    (b"2001:DB8::1", "2001:db8::1"),
    (b"not-an-ip", "127.0.0.1"), (b"", "127.0.0.1"), (b"203.0.113.7:5000", "127.0.0.1"),
])
def test_client_address_must_be_an_ip(value: bytes | list[bytes], expected: str) -> None:
    assert environ_for("127.0.0.1", {b"x-real-ip": value})["REMOTE_ADDR"] == expected


def test_a_configured_header_and_network() -> None:
    front = trust("10.0.0.0/8, 192.0.2.1", "X-Forwarded-For")
    env = environ_for("10.1.2.3", {b"x-forwarded-for": b"203.0.113.7", b"x-real-ip": b"1.1.1.1"},
                      forwarded=front)
    assert env["REMOTE_ADDR"] == "203.0.113.7"
    assert environ_for("192.0.2.1", {b"x-forwarded-proto": b"https"},
                       forwarded=front)["wsgi.url_scheme"] == "https"
    assert environ_for("127.0.0.1", {b"x-forwarded-proto": b"https"},
                       forwarded=front)["wsgi.url_scheme"] == "http"  # loopback not listed


def test_star_trusts_any_peer() -> None:
    env = environ_for("198.51.100.9", {b"x-forwarded-proto": b"https"}, forwarded=trust("*"))
    assert env["wsgi.url_scheme"] == "https"


def test_parse_allow() -> None:
    assert parse_allow("127.0.0.1,::1") == (False, frozenset({"127.0.0.1", "::1"}), ())
    assert parse_allow(" * ")[0] is True
    allow_any, addresses, networks = parse_allow("0:0:0:0:0:0:0:1, 10.0.0.0/8")
    assert not allow_any and "::1" in addresses
    assert [str(n) for n in networks] == ["10.0.0.0/8"]
    for bad in ("", " , ", "localhost", "10.0.0.0/33"):
        with pytest.raises(ValueError):
            parse_allow(bad)


def test_header_names_are_checked() -> None:
    assert trust(client_header="X-Client-IP").client_header == b"x-client-ip"
    for bad in ("", "X Real", "X_Real_IP", "X:IP"):
        with pytest.raises(ValueError):
            trust(client_header=bad)


def test_apply_without_proxy_headers_changes_nothing_but_https() -> None:
    env: dict[str, Any] = {"wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1"}
    apply(env, {}, LOOPBACK)
    assert env == {"wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1"}


def test_worker_settings_read_and_checked() -> None:
    from scale0 import cli, config

    def resolve(*argv: str, env: dict[str, str] | None = None) -> Any:
        args = cli.build_parser().parse_args(["wsgi", "m:app", "--connect", "tcp://a:1", *argv])
        return config.resolve(args.settings, args, env or {})

    cfg = resolve()
    assert (cfg.forwarded_allow_ips, cfg.client_address_header) == ("127.0.0.1,::1", "X-Real-IP")
    cfg = resolve(env={"SCALE0_FORWARDED_ALLOW_IPS": "*",
                       "SCALE0_CLIENT_ADDRESS_HEADER": "X-Client-IP"})
    assert (cfg.forwarded_allow_ips, cfg.client_address_header) == ("*", "X-Client-IP")
    with pytest.raises(config.ConfigError, match="not an IP address"):
        resolve(env={"SCALE0_FORWARDED_ALLOW_IPS": "lb.example"})
    with pytest.raises(config.ConfigError, match="not a header name"):
        resolve(env={"SCALE0_CLIENT_ADDRESS_HEADER": "X_Real_IP"})
