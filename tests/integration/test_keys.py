"""auth/keys.py and auth/zap.py: certificate files, the insecure-bind check, the Authorizer's
decisions, and the ZAP handler and HELLO gate over real inproc/tcp sockets."""

from __future__ import annotations

import argparse
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth
import zmq.utils.z85

from scale0 import cli, config
from scale0.auth.keys import (
    CurveKeys,
    KeyFileError,
    generate,
    insecure_bind_error,
    is_local,
    load_public,
    load_secret,
    read_metadata,
    services_of,
)
from scale0.auth.zap import Authorizer, HelloGate, ZapServer
from scale0.wire import s0w1 as p


def raw(public_file: Path) -> bytes:
    return zmq.utils.z85.decode(load_public(public_file))


# ---- files --------------------------------------------------------------------

def test_keygen_writes_pyzmq_certificates_with_services(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    assert cli.main(["keygen", "web", "--dir", str(tmp_path / "k"), "--services",
                     "shop, api"]) == 0
    public, secret = tmp_path / "k" / "web.key", tmp_path / "k" / "web.key_secret"
    assert capsys.readouterr().out.split() == [str(public), str(secret)]
    pub_key, no_secret = zmq.auth.load_certificate(str(public))
    pub_again, sec_key = zmq.auth.load_certificate(str(secret))
    assert no_secret is None and pub_key == pub_again and sec_key is not None
    assert zmq.curve_public(sec_key) == pub_key  # a real pair
    for path in (public, secret):
        assert read_metadata(path) == {"services": "shop,api"}
        assert services_of(read_metadata(path)) == {"shop", "api"}
    assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
    assert zmq.auth.load_certificates(str(tmp_path / "k")) == {pub_key: True}


def test_keygen_without_services_and_refusals(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    public, _ = generate("plain", tmp_path)
    assert read_metadata(public) == {} and services_of({}) is None
    assert cli.main(["keygen", "plain", "--dir", str(tmp_path)]) == 2  # never overwrites
    assert "exists" in capsys.readouterr().err
    assert cli.main(["keygen", "../up", "--dir", str(tmp_path)]) == 2
    assert cli.main(["keygen", "x", "--dir", str(tmp_path), "--services", "no spaces"]) == 2


def test_metadata_round_trips_quoted_values(tmp_path: Path) -> None:
    path = tmp_path / "c.key"
    path.write_text('#  comment\nmetadata\n    services = "a,b"\n    name = \'x\'\ncurve\n'
                    '    public-key = "' + zmq.curve_keypair()[0].decode() + '"\n')
    assert read_metadata(path) == {"services": "a,b", "name": "x"}
    assert services_of({"services": " a , ,b "}) == {"a", "b"}


def test_loading_bad_key_files_names_the_file(tmp_path: Path) -> None:
    public, secret = generate("k", tmp_path)
    assert load_secret(secret)[0] == load_public(public)
    with pytest.raises(KeyFileError, match="no secret-key"):
        load_secret(public)
    with pytest.raises(KeyFileError, match="missing"):
        load_public(tmp_path / "missing.key")
    bad = tmp_path / "bad.key"
    bad.write_text('curve\n    public-key = "short"\n')
    with pytest.raises(KeyFileError, match=r"bad\.key: a key must be 40 Z85"):
        load_public(bad)


# ---- secure by default ------------------------------------------------------------

@pytest.mark.parametrize(("endpoint", "local"), [
    ("tcp://127.0.0.1:6780", True), ("tcp://127.9.9.9:1", True), ("tcp://[::1]:1", True),
    ("tcp://localhost:1", True), ("ipc:///run/x.sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:6780", False), ("tcp://*:6780", False), ("tcp://10.0.0.1:1", False),
    ("tcp://[::]:1", False), ("tcp://eth0:1", False), ("tcp://example.com:1", False),
    ("nonsense", False),
])
def test_is_local(endpoint: str, local: bool) -> None:
    assert is_local(endpoint) is local
    assert (insecure_bind_error("bind", endpoint, "--curve-secret") is None) is local


def test_settings_parse_and_the_insecure_check(tmp_path: Path) -> None:
    generate("b", tmp_path / "k")
    (tmp_path / "auth").mkdir()
    secret, public = str(tmp_path / "k" / "b.key_secret"), str(tmp_path / "k" / "b.key")
    auth = str(tmp_path / "auth")
    link = "tcp://127.0.0.1:9,tcp://127.0.0.1:8"

    def broker(env: dict[str, str], *argv: str) -> config.BrokerConfig:
        parser = argparse.ArgumentParser()
        config.add_arguments(parser, config.BrokerConfig)
        return config.resolve(config.BrokerConfig,
                              parser.parse_args(["--mongrel2", link, *argv]), env)

    cfg = broker({"SCALE0_CURVE_SECRET": secret, "SCALE0_AUTHORIZED_KEYS": auth},
                 "--bind", "tcp://0.0.0.0:6780", "--relay-key", public)
    assert (cfg.curve_secret, cfg.authorized_keys, cfg.relay_key) == (secret, auth, public)
    assert broker({"SCALE0_INSECURE": "yes"}, "--bind", "tcp://*:1").insecure is True
    with pytest.raises(config.ConfigError, match=r"without CURVE.*--insecure"):
        broker({}, "--bind", "tcp://10.1.2.3:6780")
    assert broker({}, "--curve-secret", secret).authorized_keys is None  # no key gets in
    with pytest.raises(config.ConfigError, match="needs curve_secret"):
        broker({}, "--authorized-keys", auth)
    with pytest.raises(config.ConfigError, match=r"relay_key.*needs curve_secret"):
        broker({}, "--relay-key", public)
    with pytest.raises(config.ConfigError, match=r"SCALE0_CURVE_SECRET: .*no secret-key"):
        broker({"SCALE0_CURVE_SECRET": public, "SCALE0_AUTHORIZED_KEYS": auth})
    with pytest.raises(config.ConfigError, match="not a folder"):
        broker({"SCALE0_CURVE_SECRET": secret, "SCALE0_AUTHORIZED_KEYS": str(tmp_path / "no")})
    toml = tmp_path / "w.toml"
    toml.write_text(f'app = "a:b"\nconnect = ["tcp://10.0.0.1:1"]\ncurve_secret = "{secret}"\n'
                    f'broker_key = "{public}"\n')
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, config.WsgiConfig)
    wsgi = config.resolve(config.WsgiConfig, parser.parse_args(["--config", str(toml)]), {})
    assert (wsgi.curve_secret, wsgi.broker_key) == (secret, public)
    with pytest.raises(config.ConfigError, match="go together"):
        config.resolve(config.WsgiConfig, parser.parse_args(
            ["a:b", "--connect", "tcp://127.0.0.1:1", "--curve-secret", secret]), {})


# ---- the authorizer ---------------------------------------------------------------

@pytest.fixture
def folder(tmp_path: Path) -> Path:
    auth = tmp_path / "auth"
    generate("web", auth, ["shop", "api"])
    generate("any", auth)
    generate("stranger", tmp_path / "other")
    return auth


def test_authorizer_decisions(folder: Path, tmp_path: Path) -> None:
    a = Authorizer(str(folder))
    a.load()
    assert sorted(peer.name for peer in a.peers.values()) == ["any", "web"]
    assert a.authenticate(b"CURVE", [raw(folder / "web.key")], b"10.0.0.2", 0.0) \
        == (b"200", b"OK", b"web")
    assert a.authenticate(b"CURVE", [raw(tmp_path / "other" / "stranger.key")], b"10.0.0.3",
                          0.0)[:2] == (b"400", b"unknown key")
    assert a.authenticate(b"PLAIN", [b"u", b"p"], b"10.0.0.3", 0.0)[0] == b"400"
    assert a.authenticate(b"CURVE", [b"short"], b"10.0.0.3", 0.0)[0] == b"400"
    assert a.authenticate(b"NULL", [], b"", 0.0)[0] == b"200"
    assert (a.accepted, a.refused) == (1, 3)
    assert a.may_announce("web", ["shop"]) is None
    assert a.may_announce("web", ["shop", "api"]) is None
    assert "not 'admin'" in str(a.may_announce("web", ["shop", "admin"]))
    assert a.may_announce("any", ["whatever"]) is None
    assert "no longer authorized" in str(a.may_announce("gone", ["shop"]))


def test_without_a_folder_no_key_gets_in(folder: Path) -> None:
    a = Authorizer(None)
    a.load()
    assert a.reload() and a.peers == {}
    assert a.authenticate(b"CURVE", [raw(folder / "web.key")], b"", 0.0)[0] == b"400"


def test_reload_adds_and_removes_keys_and_keeps_them_on_error(folder: Path,
                                                               tmp_path: Path) -> None:
    a = Authorizer(str(folder))
    a.load()
    stranger = raw(tmp_path / "other" / "stranger.key")
    (tmp_path / "other" / "stranger.key").rename(folder / "stranger.key")
    (folder / "web.key").unlink()
    assert a.reload() and a.reloads == 1
    assert a.authenticate(b"CURVE", [stranger], b"", 0.0)[2] == b"stranger"
    assert "no longer authorized" in str(a.may_announce("web", ["shop"]))
    (folder / "broken.key").write_text("nothing here\n")
    assert not a.reload() and a.reloads == 1
    assert sorted(peer.name for peer in a.peers.values()) == ["any", "stranger"]


def test_refusals_are_logged_at_most_every_few_seconds(folder: Path, tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    a = Authorizer(str(folder))
    a.load()
    stranger = raw(tmp_path / "other" / "stranger.key")
    for n in range(100):
        a.authenticate(b"CURVE", [stranger], b"10.0.0.3", n * 0.01)  # 1 s of a flood
    a.authenticate(b"CURVE", [stranger], b"10.0.0.3", 11.0)
    lines = [r.getMessage() for r in caplog.records if "unknown key" in r.getMessage()]
    assert a.refused == 101 and len(lines) == 2
    assert "and 99 more since" in lines[1]


# ---- over sockets -------------------------------------------------------------------

@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    yield context
    context.term()


def test_zap_server_and_hello_gate(folder: Path, tmp_path: Path,
                                   ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    generate("server", tmp_path / "srv")
    server = CurveKeys.load(str(tmp_path / "srv" / "server.key_secret"))
    authorizer = Authorizer(str(folder))
    authorizer.load()
    zap = ZapServer(authorizer, ctx)
    zap.start()
    sockets: list[zmq.Socket[bytes]] = []

    def client(secret: Path) -> zmq.Socket[bytes]:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        CurveKeys.load(str(secret), str(tmp_path / "srv" / "server.key")).client_socket(sock)
        sock.connect(endpoint)
        sockets.append(sock)
        return sock

    router = ctx.socket(zmq.ROUTER)
    sockets.append(router)
    try:
        router.setsockopt(zmq.LINGER, 0)
        server.server_socket(router, b"test")
        router.bind("tcp://127.0.0.1:0")
        endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        gate = HelloGate(authorizer)
        web = client(folder.parent / "auth" / "web.key_secret")
        hello = p.Hello((p.ServiceSpec("admin"),), 1).encode()
        web.send_multipart([p.VERSION, p.CMD[p.Command.HELLO], hello])
        assert router.poll(5000)
        assert gate.recv(router) == []  # refused, answered here
        assert web.poll(5000)
        assert web.recv_multipart()[:3] == [p.VERSION, p.CMD[p.Command.ERROR], b"403"]
        web.send_multipart([p.VERSION, p.CMD[p.Command.HELLO],
                            p.Hello((p.ServiceSpec("shop"),), 1).encode()])
        assert router.poll(5000)
        frames = gate.recv(router)
        assert frames[1:3] == [p.VERSION, p.CMD[p.Command.HELLO]] and gate.refused == 1
        stranger = client(tmp_path / "other" / "stranger.key_secret")
        stranger.send_multipart([p.VERSION, p.CMD[p.Command.HEARTBEAT]])
        deadline = time.monotonic() + 10
        while not authorizer.refused and time.monotonic() < deadline:
            time.sleep(0.01)
        assert authorizer.refused >= 1
        assert router.poll(0) == 0  # refused at the handshake: nothing of it arrives
        (tmp_path / "other" / "stranger.key").rename(folder / "stranger.key")
        zap.request_reload()  # as on SIGHUP: the next handshake knows it
        late = client(tmp_path / "other" / "stranger.key_secret")
        late.send_multipart([p.VERSION, p.CMD[p.Command.HEARTBEAT]])
        assert router.poll(5000)
        first = router.recv(copy=False)
        assert first.get("User-Id") == "stranger"
        while router.getsockopt(zmq.RCVMORE):
            router.recv()
        (folder / "web.key").unlink()
        assert authorizer.reload()
        web.send_multipart([p.VERSION, p.CMD[p.Command.HEARTBEAT]])
        assert router.poll(5000)
        assert gate.recv(router) == [] and gate.revoked == 1  # revoked: dropped
    finally:
        for sock in sockets:
            sock.close(0)
        zap.close()
