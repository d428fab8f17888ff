"""The control protocol and commands (scale0/ops/control.py) and `scale0 ctl` rendering
(scale0/ops/ctl.py), on a real Dispatcher, without sockets."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import pytest

from scale0.cli import build_parser
from scale0.core.dispatch import Dispatcher, DispatchSettings, Done
from scale0.ops import control as c
from scale0.ops import ctl, ctl_render
from scale0.wire import s0w1 as p
from tests.unit.test_dispatch import SENDER, m2_request, ok_reply

NOW = 100.0


class FakeBroker:
    """What the commands need of broker.Broker, around a real Dispatcher."""

    def __init__(self, settings: DispatchSettings | None = None) -> None:
        self.dispatcher = Dispatcher(settings)
        self.endpoint = "tcp://127.0.0.1:6780"
        self.graceful_timeout_s = 30.0
        self.taking = True
        self.stops: list[bool] = []

    @property
    def stopping(self) -> bool:
        return bool(self.stops)

    def stop(self, *, force: bool = False) -> None:
        self.stops.append(force)

    def link_status(self) -> list[dict[str, Any]]:
        return [{"send_spec": "tcp://127.0.0.1:9997", "recv_spec": "tcp://127.0.0.1:9996",
                 "connected": True, "subscribed": True, "held": 0, "replies": 3,
                 "closed": False}]

    def key_status(self) -> dict[str, Any]:
        return {"curve": False}


def hello(d: Dispatcher, ident: bytes, label: str, service: str = "app",
          routes: tuple[str, ...] = ("/app",), capacity: int = 1) -> None:
    frames = [p.VERSION, p.CMD[p.Command.HELLO],
              p.Hello((p.ServiceSpec(service, routes),), capacity, label, 1000, {}).encode()]
    d.on_worker(ident, frames, NOW)
    d.to_workers.clear()


@pytest.fixture
def server() -> c.ControlServer:
    broker = FakeBroker()
    hello(broker.dispatcher, b"w1", "host:1")
    hello(broker.dispatcher, b"w2", "host:2")
    return c.ControlServer(broker, "ipc:///tmp/test.ctl")


def run(server: c.ControlServer, *argv: str) -> dict[str, Any]:
    reply: dict[str, Any] = json.loads(server.execute(c.encode_request(list(argv)), NOW))
    return reply


def ok(server: c.ControlServer, *argv: str) -> Any:
    reply = run(server, *argv)
    assert reply["ok"], reply
    return reply["result"]


def error(server: c.ControlServer, *argv: str) -> str:
    reply = run(server, *argv)
    assert not reply["ok"], reply
    return str(reply["error"])


def dispatcher(server: c.ControlServer) -> Dispatcher:
    d = server.broker.dispatcher
    assert isinstance(d, Dispatcher)
    return d


def route_one(d: Dispatcher, conn_id: int, path: bytes) -> tuple[bytes, int] | int:
    """Send a request; the worker it went to (ident, rid), the error status,
    or 0 if it was queued."""
    d.on_mongrel2(0, m2_request(conn_id, path), NOW)
    if d.to_workers:
        frames = d.to_workers.pop()
        d.to_mongrel2.clear()
        return frames[0], p.decode_request_id(frames[3])
    if not d.to_mongrel2:
        return 0
    status = int(d.to_mongrel2[0][1].split(b", ", 1)[1][9:12])
    d.to_mongrel2.clear()
    return status


# ---- framing ---------------------------------------------------------------

@pytest.mark.parametrize("body", [b"", b"{", b"\xff", b"[]", b'{"argv": []}', b'{"argv": "status"}',
                                  b'{"argv": ["status", 1]}', b'{"cmd": "status"}', b"null"])
def test_a_malformed_request_is_answered_with_an_error(server: c.ControlServer,
                                                       body: bytes) -> None:
    reply = json.loads(server.execute(body, NOW))
    assert reply["ok"] is False and "malformed request" in reply["error"]


def test_an_unknown_command_names_the_known_ones(server: c.ControlServer) -> None:
    text = error(server, "frobnicate")
    assert "'frobnicate'" in text and "status" in text and "drain" in text


@pytest.mark.parametrize("argv", [("status", "x"), ("drain",), ("drain", "a", "b"),
                                  ("routes", "add", "/x"), ("routes", "remove"),
                                  ("routes", "x"), ("tap", "a", "b"), ("shutdown", "--now")])
def test_wrong_arguments_give_the_usage(server: c.ControlServer, argv: tuple[str, ...]) -> None:
    assert error(server, *argv).startswith("usage: ")


def test_a_failing_handler_is_an_error_reply_not_an_exception(
        server: c.ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*_: object) -> None:
        raise KeyError("bug")

    monkeypatch.setitem(c.COMMANDS, "status", boom)
    assert error(server, "status").startswith("internal error")


# ---- commands --------------------------------------------------------------

def test_status_has_broker_links_services_and_workers(server: c.ControlServer) -> None:
    st = ok(server, "status")
    assert st["broker"]["pid"] == os.getpid() and st["broker"]["state"] == "running"
    assert st["broker"]["control"] == "ipc:///tmp/test.ctl"
    server.broker.taking = False  # type: ignore[attr-defined]
    assert ok(server, "status")["broker"]["state"] == "starting"  # its startup grace
    assert st["broker"]["tap"] == "ipc:///tmp/test.tap"
    assert st["links"][0]["replies"] == 3
    assert [(s["name"], s["routes"], s["workers"]) for s in st["services"]] == [
        ("app", ["/app"], 2)]
    assert sorted(w["label"] for w in st["workers"]) == ["host:1", "host:2"]


def reply_to(d: Dispatcher, ident: bytes, rid: int, conn_id: int) -> None:
    d.on_worker(ident, [p.VERSION, p.CMD[p.Command.REPLY], p.encode_request_id(rid),
                        p.FLAG_LAST, ok_reply(SENDER, conn_id)], NOW)
    d.to_mongrel2.clear()
    d.to_workers.clear()


def test_drain_keeps_the_worker_connected_and_sends_it_nothing(server: c.ControlServer) -> None:
    d = dispatcher(server)
    held = route_one(d, 1, b"/app/x")  # LRU: w1 takes the first request
    assert held == (b"w1", ANY) and isinstance(held, tuple)
    result = ok(server, "drain", "host:1")
    assert result == {"target": "host:1", "kind": "worker", "drained": ["host:1"],
                      "already_draining": []}
    assert d.to_workers == []  # no DRAIN: the worker is not asked to leave
    d.check_invariants()
    for conn_id in range(2, 5):  # capacity 1: w2 takes one, the rest queue, none go to w1
        assert route_one(d, conn_id, b"/app/x") == (0 if conn_id > 2 else (b"w2", ANY))
    reply_to(d, b"w1", held[1], 1)  # what it had in flight finishes
    assert not d.workers[b"w1"].in_flight and d.workers[b"w1"].served == 1
    assert [s["queued"] for s in ok(server, "status")["services"]] == [2]  # still not w1's
    w1 = next(w for w in ok(server, "status")["workers"] if w["label"] == "host:1")
    assert (w1["state"], w1["draining"]) == ("draining", True)
    d.check_invariants()
    assert ok(server, "drain", "host:1")["already_draining"] == ["host:1"]


def test_undrain_and_ready_put_the_worker_back(server: c.ControlServer) -> None:
    d = dispatcher(server)
    ok(server, "drain", "app")
    assert route_one(d, 1, b"/app/x") == 0  # both drained: it queues
    result = ok(server, "undrain", "host:1")
    assert result == {"target": "host:1", "kind": "worker", "ready": [],
                      "still_draining": ["host:1"]}  # its service is still drained
    result = ok(server, "ready", "app")  # HAProxy's word
    assert result["kind"] == "service" and sorted(result["ready"]) == ["host:1", "host:2"]
    assert sum(len(w.in_flight) for w in d.workers.values()) == 1  # the queued one went out
    assert d.to_workers[0][1:3] == [p.VERSION, p.CMD[p.Command.REQUEST]]
    d.check_invariants()
    assert all(w["state"] == "ready" for w in ok(server, "status")["workers"])


def test_a_drained_worker_that_reconnects_stays_drained(server: c.ControlServer) -> None:
    d = dispatcher(server)
    ok(server, "drain", "host:1")
    ok(server, "routes", "add", "/other", "other")  # a service with no worker yet
    assert ok(server, "drain", "other")["drained"] == []
    d.on_worker(b"w1", [p.VERSION, p.CMD[p.Command.BYE]], NOW)
    hello(d, b"w1", "host:1")  # the same label again (a re-HELLO, a new connection)
    hello(d, b"w3", "host:3", service="other", routes=("/other",))
    assert d.workers[b"w1"].draining and d.workers[b"w1"].held
    assert d.workers[b"w3"].draining
    assert route_one(d, 9, b"/app/x") == (b"w2", ANY)
    d.check_invariants()
    assert ok(server, "status")["drained"] == {"services": ["other"], "workers": ["host:1"]}


def test_drain_by_id_and_by_service(server: c.ControlServer) -> None:
    d = dispatcher(server)
    assert ok(server, "drain", b"w2".hex())["drained"] == ["host:2"]
    result = ok(server, "drain", "app")
    assert result["kind"] == "service" and result["drained"] == ["host:1"]
    assert result["already_draining"] == ["host:2"]
    assert all(w.draining and not w.leaving for w in d.workers.values())
    assert ok(server, "status")["drained"] == {"services": ["app"], "workers": ["host:2"]}
    d.check_invariants()


def test_drain_undrain_and_recycle_of_nothing_known_are_refused(server: c.ControlServer) -> None:
    for command in ("drain", "undrain", "recycle"):
        assert "host:1" in error(server, command, "nope")


def test_recycle_sends_drain_and_the_worker_leaves(server: c.ControlServer) -> None:
    d = dispatcher(server)
    result = ok(server, "recycle", "host:1")
    assert result == {"target": "host:1", "kind": "worker", "recycled": ["host:1"],
                      "already_leaving": []}
    assert d.to_workers == [[b"w1", p.VERSION, p.CMD[p.Command.DRAIN]]]
    d.to_workers.clear()
    for conn_id in range(1, 4):  # capacity 1: w2 takes one, the rest queue, none go to w1
        assert route_one(d, conn_id, b"/app/x") == (0 if conn_id > 1 else (b"w2", ANY))
    assert not d.workers[b"w1"].in_flight and len(d.workers[b"w2"].in_flight) == 1
    d.check_invariants()
    assert ok(server, "recycle", "host:1")["already_leaving"] == ["host:1"]  # sent once
    assert d.to_workers == []
    assert ok(server, "undrain", "host:1")["still_draining"] == ["host:1"]  # leaving stays
    assert next(w for w in ok(server, "status")["workers"]
                if w["label"] == "host:1")["state"] == "leaving"
    d.check_invariants()


def test_a_recycled_worker_that_says_drain_is_acked(server: c.ControlServer) -> None:
    d = dispatcher(server)
    ok(server, "recycle", "host:1")
    d.to_workers.clear()
    d.on_worker(b"w1", [p.VERSION, p.CMD[p.Command.DRAIN]], NOW)  # its stop() says DRAIN
    assert d.to_workers == [[b"w1", p.VERSION, p.CMD[p.Command.DRAIN]]]


def test_a_workers_own_drain_is_not_undone_by_undrain(server: c.ControlServer) -> None:
    d = dispatcher(server)
    ok(server, "drain", "host:1")
    d.on_worker(b"w1", [p.VERSION, p.CMD[p.Command.DRAIN]], NOW)  # SIGTERM in its pool
    ok(server, "undrain", "host:1")
    assert d.workers[b"w1"].draining and d.workers[b"w1"].leaving
    d.check_invariants()


def test_routes_add_and_remove_change_routing_at_run_time(server: c.ControlServer) -> None:
    d = dispatcher(server)
    assert route_one(d, 1, b"/extra/x") == 404
    assert ok(server, "routes", "add", "/extra", "app") == {"added": "/extra", "service": "app"}
    assert isinstance(route_one(d, 2, b"/extra/x"), tuple)
    listed = ok(server, "routes")["routes"]
    assert {"route": "/extra", "service": "app", "origin": "broker"} in listed
    assert {"route": "/app", "service": "app", "origin": "worker"} in listed
    assert ok(server, "routes", "remove", "/extra/") == {"removed": "/extra/", "service": "app"}
    assert route_one(d, 3, b"/extra/x") == 404
    assert "no route" in error(server, "routes", "remove", "/extra")


def test_a_route_added_for_a_new_service_answers_503_until_a_worker_comes(
        server: c.ControlServer) -> None:
    d = dispatcher(server)
    ok(server, "routes", "add", "shop.example/", "shop")
    assert d.routes.lookup(b"shop.example", b"/").service == "shop"  # type: ignore[union-attr]
    d.on_mongrel2(0, m2_request(1, b"/", host=b"shop.example"), NOW)
    assert b" 503 " in d.to_mongrel2[0][1]


def test_a_broker_route_wins_over_what_a_worker_announces_later(
        server: c.ControlServer) -> None:
    d = dispatcher(server)
    ok(server, "routes", "add", "/other", "app")
    hello(d, b"w3", "host:3", service="other", routes=("/other",))
    assert d.routes.lookup(None, b"/other").service == "app"  # type: ignore[union-attr]
    assert b"w3" not in d.workers  # refused (409): the route is the broker's
    assert [r["code"] for r in ok(server, "status")["refused_hellos"]] == [409]


@pytest.mark.parametrize("argv", [("routes", "add", "no-slash", "app"),
                                  ("routes", "add", "/x", "two words"),
                                  ("routes", "remove", "/a b")])
def test_bad_routes_are_refused_with_the_reason(server: c.ControlServer,
                                                argv: tuple[str, ...]) -> None:
    assert "route" in error(server, *argv) or "service" in error(server, *argv)


def test_tap_names_the_endpoint_and_topic(server: c.ControlServer) -> None:
    assert ok(server, "tap", "app")["topic"] == "svc:app\n"
    assert ok(server, "tap")["topic"] == "svc:"
    assert ok(server, "tap")["endpoint"] == "ipc:///tmp/test.tap"


def test_shutdown_is_immediate_unless_graceful(server: c.ControlServer) -> None:
    broker = server.broker
    assert isinstance(broker, FakeBroker)
    assert ok(server, "shutdown", "--graceful")["graceful"] is True
    assert ok(server, "shutdown")["graceful"] is False
    assert broker.stops == [False, True]


# ---- tap publishing ------------------------------------------------------------

def done(service: str, status: int = 200) -> Done:
    return Done(0, 1, "GET", "/x", service, "host:1", status, 10, 20, 5.0, 5.25, 1)


def test_the_tap_publishes_only_subscribed_services(server: c.ControlServer) -> None:
    sent: list[tuple[bytes, bytes]] = []
    server._publish = lambda topic, body: sent.append((topic, body))  # type: ignore[method-assign]
    server.on_done([done("app")])
    assert sent == []  # nobody tapping: nothing encoded
    server._tapped.add(b"svc:app\n")
    server.on_done([done("app", 500), done("other")])
    assert [topic for topic, _ in sent] == [b"svc:app\n"]
    record = json.loads(sent[0][1])
    assert (record["status"], record["ms"], record["worker"]) == (500, 250.0, "host:1")
    server._tapped.add(b"svc:")
    sent.clear()
    server.on_done([done("app"), done("other"), done("")])
    assert [topic for topic, _ in sent] == [b"svc:app\n", b"svc:other\n", b"svc:\n"]


def test_done_records_of_real_requests_reach_the_tap(server: c.ControlServer) -> None:
    d = dispatcher(server)
    d.record = True
    sent: list[bytes] = []
    server._publish = lambda topic, body: sent.append(body)  # type: ignore[method-assign]
    server._tapped.add(b"svc:")
    ident, rid = route_one(d, 1, b"/app/x")  # type: ignore[misc]
    d.on_worker(ident, [p.VERSION, p.CMD[p.Command.REPLY], p.encode_request_id(rid),
                        p.FLAG_LAST, ok_reply(SENDER, 1)], NOW + 0.5)
    server.on_done(d.done)
    (record,) = [json.loads(body) for body in sent]
    assert (record["status"], record["path"], record["ms"]) == (200, "/app/x", 500.0)


# ---- where -----------------------------------------------------------------------

def test_default_endpoint_is_derived_from_the_worker_endpoint(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert c.default_endpoint("tcp://127.0.0.1:6780") == "ipc:///run/user/1000/scale0/broker-6780.ctl"
    assert c.default_endpoint("tcp://*:6781").endswith("/broker-6781.ctl")
    assert c.default_endpoint("ipc:///var/run/w.sock").endswith("/broker-var-run-w.sock.ctl")
    long = c.default_endpoint("ipc:///" + "x/" * 40)
    assert len(long) < 100 and long.endswith(".ctl")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert c.runtime_dir() == Path("/tmp/scale0-1000")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert c.runtime_dir() == Path("/run/scale0")


@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:1", "ipc://", "ipc://@abstract",
                                      "ipc:///" + "p" * 120])
def test_only_ipc_files_are_control_endpoints(endpoint: str) -> None:
    with pytest.raises(c.ControlError):
        c.ipc_path(endpoint)


def test_tap_endpoint_sits_next_to_the_control_socket() -> None:
    assert c.tap_endpoint("ipc:///r/broker-6780.ctl") == "ipc:///r/broker-6780.tap"
    assert c.tap_endpoint("ipc:///r/control") == "ipc:///r/control.tap"


def test_private_dir_is_made_0700_and_a_shared_one_refused(tmp_path: Path) -> None:
    mine = tmp_path / "run"
    c.private_dir(mine)
    assert mine.stat().st_mode & 0o777 == 0o700
    c.private_dir(mine)  # existing and private: fine
    mine.chmod(0o755)
    with pytest.raises(c.ControlError, match="mode 0700"):
        c.private_dir(mine)
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(c.ControlError, match="not a directory"):
        c.private_dir(tmp_path / "link")


# ---- scale0 ctl ------------------------------------------------------------------

@pytest.mark.parametrize(("words", "wire"), [
    (["status"], ["status"]),
    (["drain", "host:1"], ["drain", "host:1"]),
    (["undrain", "host:1"], ["undrain", "host:1"]),
    (["ready", "app"], ["undrain", "app"]),
    (["recycle", "app"], ["recycle", "app"]),
    (["routes"], ["routes"]),
    (["routes", "add", "/x", "app"], ["routes", "add", "/x", "app"]),
    (["routes", "remove", "/x"], ["routes", "remove", "/x"]),
    (["shutdown"], ["shutdown"]),
    (["shutdown", "--graceful"], ["shutdown", "--graceful"]),
])
def test_the_command_line_becomes_the_wire_words(words: list[str], wire: list[str]) -> None:
    args = build_parser().parse_args(["ctl", "--json", *words])
    assert ctl.wire_argv(args) == wire and args.json


@pytest.mark.parametrize("words", [
    ["ctl", "--json", "--control", "ipc:///x.ctl", "--log-level", "debug", "status"],
    ["ctl", "status", "--json", "--control", "ipc:///x.ctl", "--log-level", "debug"],
    ["ctl", "--json", "status", "--control", "ipc:///x.ctl", "--log-level", "debug"],
    ["ctl", "--log-level", "debug", "routes", "add", "/x", "app", "--json", "--control",
     "ipc:///x.ctl"],
])
def test_options_work_before_and_after_the_command(words: list[str]) -> None:
    args = build_parser().parse_args(words)
    assert (args.json, args.control, args.log_level, args.timeout) == (
        True, "ipc:///x.ctl", "debug", 3.0)


def test_options_left_out_keep_their_defaults() -> None:
    args = build_parser().parse_args(["ctl", "status"])
    assert (args.json, args.control, args.broker, args.log_level, args.timeout) == (
        False, None, ctl.DEFAULT_BROKER, "warning", 3.0)
    args = build_parser().parse_args(["ctl", "--broker", "tcp://127.0.0.1:7000", "status",
                                      "--timeout", "1"])
    assert (args.broker, args.timeout) == ("tcp://127.0.0.1:7000", 1.0)


def test_ctl_without_a_command_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["ctl"])
    assert exc.value.code == ctl.USAGE


def test_table_aligns_text_left_and_numbers_right() -> None:
    assert ctl_render.table(["NAME", "N"], [["a", 1], ["bbb", 100]]).splitlines() == [
        "NAME    N", "a       1", "bbb   100"]
    assert ctl_render.table(["NAME"], []).splitlines() == ["NAME", "(none)"]


@pytest.mark.parametrize(("seconds", "text"), [(0.4, "0s"), (59, "59s"), (125, "2m05s"),
                                               (3 * 3600 + 420, "3h07m"), (2 * 86400 + 4 * 3600,
                                                                          "2d04h")])
def test_duration(seconds: float, text: str) -> None:
    assert ctl_render.duration(seconds) == text


def test_status_renders_as_tables(server: c.ControlServer) -> None:
    d = dispatcher(server)
    route_one(d, 1, b"/app/x")
    text = ctl_render.render("status", ok(server, "status"))
    lines = text.splitlines()
    assert lines[0].startswith(f"broker pid {os.getpid()} (running), up ")
    header = next(line for line in lines if line.startswith("WORKER"))
    assert header.split() == ["WORKER", "ID", "SERVICES", "LOAD", "STATE", "AGE", "SERVED"]
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("host:")}
    assert sorted(row[3] for row in rows.values()) == ["0/1", "1/1"]
    assert next(line for line in lines if line.startswith("app")).split()[:3] == [
        "app", "/app", "0"]
    assert "requests=1" in lines[-1]


def test_other_results_render_as_one_liners(server: c.ControlServer) -> None:
    added = ctl_render.render("routes", ok(server, "routes", "add", "/x", "app"))
    assert added == "route /x -> app added"
    assert "removed" in ctl_render.render("routes", ok(server, "routes", "remove", "/x"))
    assert ctl_render.render("drain", ok(server, "drain", "host:1")).splitlines() == [
        "worker host:1: 1 worker(s) draining: no new request, the ones in progress finish "
        "(undrain to undo)", "  host:1"]
    assert ctl_render.render("undrain", ok(server, "undrain", "host:1")).splitlines() == [
        "worker host:1: 1 worker(s) take requests again", "  host:1"]
    assert ctl_render.render("recycle", ok(server, "recycle", "host:2")).splitlines() == [
        "worker host:2: 1 worker(s) asked to finish and leave (their pool starts new ones)",
        "  host:2"]
    stopping = ctl_render.render("shutdown", ok(server, "shutdown", "--graceful"))
    assert "gracefully (up to 30 s" in stopping


def test_tap_line_has_time_status_method_ms_worker_path() -> None:
    line = ctl_render.tap_line(c.tap_record(done("app", 404), to_wall=1_700_000_000.0))
    assert line.split()[1:] == ["404", "GET", "250.0", "host:1", "/x"]
    assert ctl_render.TAP_HEADER.split() == ["TIME", "STATUS", "METHOD", "MS", "WORKER", "PATH"]


def test_call_to_a_missing_socket_says_where_it_looked(tmp_path: Path) -> None:
    (tmp_path / "other.ctl").touch()
    with pytest.raises(ctl.Unreachable, match="no broker control socket") as exc:
        ctl.call(f"ipc://{tmp_path}/none.ctl", ["status"])
    assert "other.ctl" in str(exc.value)


def test_status_shows_refused_hellos_ejected_workers_orphans_and_limits() -> None:
    broker = FakeBroker(DispatchSettings(request_timeout_s=1.0, eject_after=1, eject_s=30.0,
                                         max_workers=3, route_grace_s=20.0))
    d = broker.dispatcher
    hello(d, b"w1", "host:1", routes=("/app",), capacity=2)
    hello(d, b"w2", "host:2", service="evil", routes=("/app",))
    hello(d, b"w3", "host:3", service="gone", routes=("/gone",))
    d.remove_worker(d.workers[b"w3"], NOW)  # lost: its route waits out the grace
    route_one(d, 1, b"/app/x")
    d.on_tick(NOW + 1.0)  # times out: host:1 ejected
    server = c.ControlServer(broker, "ipc:///tmp/test.ctl")
    status = json.loads(server.execute(c.encode_request(["status"]), NOW + 1.0))["result"]
    assert status["refused_hellos"] == [{
        "at": NOW, "worker": "host:2", "id": b"w2".hex(), "code": 409, "age_s": 1.0,
        "reason": "route /app belongs to service app (workers of that service); not "
                  "taken over by service evil"}]
    assert status["orphaned_routes"] == [{"route": "/gone", "service": "gone",
                                          "forget_in_s": 19.0}]
    assert status["limits"]["workers"] == [1, 3]
    assert status["workers"][0]["ejected_s"] == 30.0
    lines = ctl_render.render("status", status).splitlines()
    row = next(line for line in lines if line.startswith("host:1"))
    assert "ejected 30s" in row
    assert "limits: workers 1/3 services 2/256 routes 2/4096" in lines
    assert any(line.split()[:2] == ["/gone", "gone"] for line in lines)
    refused = next(line for line in lines if line.startswith("host:2"))
    assert refused.split()[1:3] == ["1s", "409"] and "not taken over by service evil" in refused


def test_a_socket_file_nobody_listens_on_is_a_stale_broker(tmp_path: Path) -> None:
    path = tmp_path / "stale.ctl"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(path))  # a broker killed with SIGKILL leaves its file
    with pytest.raises(ctl.Unreachable, match=r"nothing listens on .*stale\.ctl: the broker "
                                              "is not running"):
        ctl.call(f"ipc://{path}", ["status"])


def test_a_file_that_is_not_a_socket_is_named(tmp_path: Path) -> None:
    (tmp_path / "plain.ctl").write_text("")
    with pytest.raises(ctl.Unreachable, match=r"plain\.ctl is not a socket"):
        ctl.call(f"ipc://{tmp_path}/plain.ctl", ["status"])


def test_ctl_main_prints_one_line_and_exits_3_when_unreachable(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["ctl", "status", "--control",
                                      f"ipc://{tmp_path}/none.ctl"])
    assert ctl.main(args) == ctl.UNREACHABLE
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("scale0 ctl: no broker control socket at ")
