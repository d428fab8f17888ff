"""CURVE on loopback, with real Mongrel2, relay, broker and worker processes:
who gets in, what a key may announce, SIGHUP re-reading the keys, the relay
link, and secure by default (a non-loopback bind without CURVE exits 2)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from scale0.auth.keys import generate

from .conftest import ROOT, Proc, Stack, wait_for


@dataclass
class Keys:
    root: Path
    authorized: Path  # the broker's --authorized-keys
    elsewhere: Path  # keys the broker does not know

    def secret(self, name: str) -> str:
        for folder in (self.root, self.authorized, self.elsewhere):
            path = folder / f"{name}.key_secret"
            if path.exists():
                return str(path)
        raise AssertionError(name)

    @property
    def broker_key(self) -> str:
        return str(self.root / "broker.key")

    def worker_args(self, name: str) -> tuple[str, ...]:
        return ("--curve-secret", self.secret(name), "--broker-key", self.broker_key)

    @property
    def broker_args(self) -> tuple[str, ...]:
        return ("--curve-secret", self.secret("broker"),
                "--authorized-keys", str(self.authorized))


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    k = Keys(tmp_path / "keys", tmp_path / "keys" / "authorized", tmp_path / "keys" / "other")
    generate("broker", k.root)
    generate("relay", k.root)
    generate("web", k.authorized, ["hello"])  # may announce only `hello`
    generate("any", k.authorized)  # any service
    generate("api", k.authorized, ["api"])  # authorized, for another service
    generate("stranger", k.elsewhere)  # a valid key the broker does not know
    # The authorized folder holds public keys only, as an operator's would.
    for secret in k.authorized.glob("*.key_secret"):
        shutil.move(secret, k.root / secret.name)
    return k


def control_of(broker: Proc) -> str:
    match = re.search(r"control=(\S+)", broker.ready_line)
    assert match, broker.ready_line
    return match.group(1)


def status(control: str) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "scale0.cli", "ctl", "--control", control,
                           "--json", "status"], capture_output=True, text=True, timeout=30,
                          cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def marks(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


@pytest.fixture
def curve_stack(fresh_stack: Stack, keys: Keys) -> Iterator[tuple[Stack, Proc]]:
    fresh_stack.start_mongrel2()
    broker = fresh_stack.start_broker(*keys.broker_args)
    yield fresh_stack, broker


def test_only_a_known_key_for_its_service_gets_requests(curve_stack: tuple[Stack, Proc],
                                                        keys: Keys, tmp_path: Path) -> None:
    stack, broker = curve_stack
    control = control_of(broker)
    stack.start_pool("e2e_apps:app", *keys.worker_args("web"), service="hello")
    assert stack.wait_ok("/").text == "e2e hello\n"
    # Rogues announce the same service and route; any request they got
    # would leave a file in their mark folder (e2e_apps /sleep).
    rogue_marks = tmp_path / "rogue-marks"
    rogue_marks.mkdir()
    env = {"E2E_MARK_DIR": str(rogue_marks)}
    # None of them is WELCOMEd, so none prints READY.
    stack.start_pool("e2e_apps:app", service="hello", env=env, ready=False)  # no key at all
    stack.start_pool("e2e_apps:app", *keys.worker_args("stranger"), service="hello", env=env,
                     ready=False)
    other = stack.start_pool("e2e_apps:app", *keys.worker_args("api"), service="hello", env=env,
                             ready=False)
    # The unknown key is refused at the handshake, the other-service key's
    # HELLO is answered ERROR (its pool then stops: a refused HELLO is a boot failure).
    wait_for(lambda: status(control)["keys"]["refused"] >= 1, what="the unknown key refused")
    wait_for(lambda: status(control)["keys"]["hellos_refused"] >= 1,
             what="the HELLO of the api key refused")
    assert other.popen.wait(30) == 3
    for _ in range(40):
        r = requests.get(stack.url("/sleep?0"), timeout=10)
        assert r.status_code == 200, r.text
    assert marks(rogue_marks) == []
    st = status(control)
    # Only the web pool's process is connected (a process has one worker per thread).
    assert len({w["label"].rpartition("/")[0] for w in st["workers"]}) == 1, st["workers"]
    assert st["keys"]["curve"] is True and st["keys"]["keys"] == 3
    assert "refused unknown key" in broker.log_tail(100_000)
    table = subprocess.run([sys.executable, "-m", "scale0.cli", "ctl", "--control", control,
                            "status"], capture_output=True, text=True, timeout=30, cwd=ROOT,
                           check=True).stdout
    assert "CURVE: 3 authorized keys" in table


def test_a_key_for_any_service_serves_and_sighup_lets_a_new_key_in(
        curve_stack: tuple[Stack, Proc], keys: Keys, tmp_path: Path) -> None:
    stack, broker = curve_stack
    control = control_of(broker)
    stack.start_pool("e2e_apps:app", *keys.worker_args("any"), service="anything",
                     routes=("/any",))
    assert stack.wait_ok("/any/").text == "e2e hello\n"
    # A worker whose key is not authorized yet: refused until the key is
    # added and the broker re-reads the folder.
    generate("late", keys.elsewhere, ["late"])
    late = stack.start_pool("e2e_apps:app", *keys.worker_args("late"), service="late",
                            routes=("/late",), ready=False)
    wait_for(lambda: status(control)["keys"]["refused"] >= 1, what="the late key refused")
    assert requests.get(stack.url("/late/"), timeout=10).status_code == 404
    shutil.copy(keys.elsewhere / "late.key", keys.authorized / "late.key")
    broker.send_signal(signal.SIGHUP)
    wait_for(lambda: status(control)["keys"]["reloads"] >= 1, what="the keys re-read")
    assert late.wait_ready(30).startswith("READY wsgi")  # let in: WELCOMEd at last
    assert stack.wait_ok("/late/", timeout_s=30).text == "e2e hello\n"
    assert status(control)["keys"]["keys"] == 4
    assert stack.wait_ok("/any/").status_code == 200
    assert broker.popen.poll() is None  # SIGHUP does not stop a broker
    # Revoked: the broker drops its messages and expires it; it gets no more requests.
    (keys.authorized / "late.key").unlink()
    broker.send_signal(signal.SIGHUP)
    wait_for(lambda: not any("late" in w["services"] for w in status(control)["workers"]),
             what="the revoked worker expired")
    assert status(control)["keys"]["revoked_messages"] >= 1
    for _ in range(5):
        assert requests.get(stack.url("/late/"), timeout=10).status_code != 200
    assert stack.wait_ok("/any/").status_code == 200


def test_relay_with_curve(fresh_stack: Stack, keys: Keys, tmp_path: Path) -> None:
    brokers = tmp_path / "broker-keys"
    brokers.mkdir()
    shutil.copy(keys.broker_key, brokers / "broker.key")
    fresh_stack.start_mongrel2()
    fresh_stack.start_relay(args=("--curve-secret", keys.secret("relay"),
                                  "--authorized-keys", str(brokers)))
    fresh_stack.start_broker(*keys.broker_args, "--relay-key", str(keys.root / "relay.key"))
    fresh_stack.start_pool("e2e_apps:app", *keys.worker_args("web"), service="hello")
    assert fresh_stack.wait_ok("/").text == "e2e hello\n"
    for n in range(20):
        r = requests.get(fresh_stack.url(f"/echo?{n}"), timeout=10)
        assert r.status_code == 200 and r.json()["query"] == str(n)


def test_a_broker_without_the_relay_key_gets_nothing(fresh_stack: Stack, keys: Keys,
                                                      tmp_path: Path) -> None:
    """The relay's authorized keys do not list this broker: it never joins."""
    fresh_stack.start_mongrel2()
    empty = tmp_path / "no-brokers"
    empty.mkdir()
    relay = fresh_stack.start_relay(args=("--curve-secret", keys.secret("relay"),
                                          "--authorized-keys", str(empty)))
    broker = fresh_stack.start_broker(*keys.broker_args, "--relay-key",
                                      str(keys.root / "relay.key"))
    fresh_stack.start_pool("e2e_apps:app", *keys.worker_args("web"), service="hello")
    # The relay refuses the broker's key at the handshake (seen by a client of
    # our own with that key, through its socket monitor), so the broker never joins.
    endpoint = fresh_stack.link.removeprefix("relay+").split(",")[0]
    assert _handshake(endpoint, keys.secret("broker"), str(keys.root / "relay.key")) == \
        "refused"
    with pytest.raises(requests.ReadTimeout):  # requests wait in Mongrel2: no broker joined
        requests.get(fresh_stack.url("/"), timeout=2)
    assert broker.status()["links"][0]["connected"] is False
    assert "joined" not in relay.log_tail(100_000)


def _handshake(endpoint: str, secret_file: str, server_key_file: str) -> str:
    """'refused' or 'accepted': a CURVE client with this key pair, against the
    server at `endpoint`, as its ZeroMQ socket monitor reports the handshake."""
    import zmq
    import zmq.auth
    from zmq.utils.monitor import recv_monitor_message

    public, secret = zmq.auth.load_certificate(secret_file)
    server, _ = zmq.auth.load_certificate(server_key_file)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server
        sock.connect(endpoint)
        assert monitor.poll(15_000), f"no CURVE handshake with {endpoint} within 15 s"
        event = recv_monitor_message(monitor)["event"]
        return "refused" if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH else "accepted"
    finally:
        sock.disable_monitor()
        monitor.close(0)
        sock.close(0)
        ctx.term()


def run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scale0.cli", *argv], capture_output=True,
                          text=True, timeout=30, cwd=ROOT, check=False,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("command", [
    ["broker", "--mongrel2", "tcp://127.0.0.1:9,tcp://127.0.0.1:8", "--bind",
     "tcp://0.0.0.0:0"],
    ["relay", "--mongrel2", "tcp://127.0.0.1:9", "--bind", "tcp://*:0"],
])
def test_a_non_loopback_bind_without_curve_exits_2(command: list[str]) -> None:
    done = run_cli(*command)
    assert done.returncode == 2
    assert "without CURVE" in done.stderr and "--insecure" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_insecure_lets_a_non_loopback_bind_start(tmp_path: Path) -> None:
    proc = Proc("relay", [sys.executable, "-m", "scale0.cli", "relay", "--mongrel2",
                          "tcp://127.0.0.1:9", "--bind", "tcp://0.0.0.0:0", "--insecure"],
                tmp_path)
    try:
        assert proc.wait_ready().startswith("READY relay")
    finally:
        assert proc.stop() == 0


def test_scale0_up_passes_the_keys_on_and_forwards_sighup(tmp_path: Path, keys: Keys) -> None:
    """Keys as TOML settings of [[broker]] and [[pool]] tables (paths relative to
    the stack file); a SIGHUP to `scale0 up` re-reads the broker's keys and the
    broker keeps running."""
    from tests.mongrel2_helpers import config_text

    from .conftest import free_port

    http_port, send_port, recv_port, broker_port = (free_port() for _ in range(4))
    (tmp_path / "mongrel2.conf").write_text(config_text(
        http_port=http_port, send_spec=f"tcp://127.0.0.1:{send_port}",
        recv_spec=f"tcp://127.0.0.1:{recv_port}", send_ident="up-curve-sender"))
    control = f"ipc://{tmp_path}/b.ctl"
    if len(control) > 100:
        pytest.skip("temporary path too long for a unix socket")
    stack_file = tmp_path / "stack.toml"
    stack_file.write_text(f"""
graceful_timeout = 10
[mongrel2]
config = "mongrel2.conf"
runtime_dir = "var"
http = "127.0.0.1:{http_port}"
[[broker]]
bind = "tcp://127.0.0.1:{broker_port}"
mongrel2 = ["tcp://127.0.0.1:{send_port},tcp://127.0.0.1:{recv_port}"]
control = "{control}"
curve_secret = "keys/broker.key_secret"
authorized_keys = "keys/authorized"
[[pool]]
app = "e2e_apps:app"
service = "hello"
routes = ["/"]
connect = ["tcp://127.0.0.1:{broker_port}"]
curve_secret = "keys/web.key_secret"
broker_key = "keys/broker.key"
""")
    up = Proc("up", [sys.executable, "-m", "scale0.cli", "up", "--config", str(stack_file)],
              tmp_path, {"PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{ROOT}"})
    try:
        assert up.wait_ready(30, "READY up").startswith("READY up")
        url = f"http://127.0.0.1:{http_port}/"

        def ok() -> bool:
            try:
                return requests.get(url, timeout=2).status_code == 200
            except requests.RequestException:
                return False
        wait_for(ok, 30, "200 through scale0 up with CURVE")
        before = wait_for(lambda: _status_or_none(control), 30, "the broker's control socket")
        assert before["keys"]["curve"] is True and before["keys"]["keys"] == 3
        up.send_signal(signal.SIGHUP)
        after = wait_for(lambda: (st := _status_or_none(control)) and st["keys"]["reloads"] >= 1
                         and st, 30, "the broker to re-read its keys")
        assert after["broker"]["pid"] == before["broker"]["pid"]
        wait_for(ok, 30, "200 after the reload")
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.stop(30) == 0


def _status_or_none(control: str) -> dict[str, Any] | None:
    try:
        return status(control)
    except AssertionError:
        return None


def test_replies_through_the_relay_with_curve(fresh_stack: Stack, keys: Keys,
                                              tmp_path: Path) -> None:
    """A broker linked as relay+ENDPOINT alone (no Mongrel2 recv_spec of its
    own) sends its replies through the relay, over the same CURVE link."""
    brokers = tmp_path / "broker-keys"
    brokers.mkdir()
    shutil.copy(keys.broker_key, brokers / "broker.key")
    fresh_stack.start_mongrel2()
    fresh_stack.start_relay(replies=True, args=(
        "--curve-secret", keys.secret("relay"), "--authorized-keys", str(brokers)))
    assert "," not in fresh_stack.link  # relay+ENDPOINT alone
    fresh_stack.start_broker(*keys.broker_args, "--relay-key", str(keys.root / "relay.key"))
    fresh_stack.start_pool("e2e_apps:app", *keys.worker_args("web"), service="hello")
    assert fresh_stack.wait_ok("/").text == "e2e hello\n"
    for n in range(20):
        r = requests.get(fresh_stack.url(f"/echo?{n}"), timeout=10)
        assert r.status_code == 200 and r.json()["query"] == str(n)
    r = requests.get(fresh_stack.url("/big"), timeout=60)
    assert r.status_code == 200 and len(r.content) == 10 * 1024 * 1024


def test_an_asgi_worker_with_its_key_serves_and_an_unknown_key_gets_nothing(
        curve_stack: tuple[Stack, Proc], keys: Keys) -> None:
    # `scale0 asgi` takes the same --curve-secret / --broker-key as `scale0 wsgi`.
    stack, broker = curve_stack
    control = control_of(broker)
    stack.start_asgi("asgi_apps:raw", *keys.worker_args("web"), service="hello")
    assert stack.wait_ok("/").status_code == 200
    # Neither is WELCOMEd, so neither prints READY.
    stack.start_asgi("asgi_apps:raw", service="hello", ready=False)  # no key: no CURVE
    stack.start_asgi("asgi_apps:raw", *keys.worker_args("stranger"), service="hello",
                     ready=False)
    wait_for(lambda: status(control)["keys"]["refused"] >= 1, what="the unknown key refused")
    for _ in range(20):
        assert requests.get(stack.url("/"), timeout=10).status_code == 200
    workers = status(control)["workers"]
    assert len(workers) == 1 and workers[0]["services"] == ["hello"], workers
