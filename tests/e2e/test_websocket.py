"""WebSockets end to end: the `websockets` client library -> Mongrel2 -> relay
or broker -> `scale0 asgi`. Echoes, close codes both ways, refusals, many
connections on one process, clients and workers that vanish, graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.e2e.conftest import Stack, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ws_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Through a relay: raw ASGI app at /a, Starlette at /st, FastAPI at /fa, WSGI at /w."""
    s = Stack(tmp_path_factory.mktemp("ws"))
    try:
        s.start_mongrel2()
        s.start_relay()
        s.start_broker()
        s.start_asgi("asgi_apps:raw", service="raw", routes=("/a",), concurrency=1100,
                     env={"E2E_WS_DISCONNECT_FILE": str(s.tmp / "ws-disconnects")})
        s.start_asgi("asgi_apps:starlette_app", service="st", routes=("/st",))
        s.start_asgi("asgi_apps:fastapi_app", service="fa", routes=("/fa",))
        s.start_pool("e2e_apps:app", service="wsgi", routes=("/w",))
        for path in ("/a/", "/st/", "/fa/tasks", "/w/"):
            s.wait_ok(path)
        yield s
    finally:
        s.stop()


def ws_url(stack: Stack, path: str) -> str:
    return f"ws://127.0.0.1:{stack.http_port}{path}"


def test_text_and_200kb_binary_echo(ws_stack: Stack) -> None:
    with connect(ws_url(ws_stack, "/a/ws"), max_size=None, open_timeout=10) as ws:
        ws.send("hello")
        assert ws.recv(10) == "hello"
        ws.send("héllo ✓")
        assert ws.recv(10) == "héllo ✓"
        blob = os.urandom(200_000)
        ws.send(blob)
        assert ws.recv(20) == blob
        ws.send(["frag", "mented"])  # fragments: Mongrel2 passes one reassembled frame
        assert ws.recv(10) == "fragmented"
        ws.ping(b"p").wait(10)  # answered with a pong


def test_websocket_scope_subprotocol_and_accept_headers(ws_stack: Stack) -> None:
    with connect(ws_url(ws_stack, "/a/room/1?x=y"), subprotocols=["chat", "v2"],
                 open_timeout=10) as ws:
        assert ws.subprotocol == "chat"
        assert ws.response.headers["x-accepted"] == "yes"
        ws.send("scope")
        scope = json.loads(ws.recv(10))
    assert scope == {"path": "/a/room/1", "root_path": "/a", "query_string": "x=y",
                     "subprotocols": ["chat", "v2"], "scheme": "ws"}


def test_close_codes_both_ways(ws_stack: Stack) -> None:
    with connect(ws_url(ws_stack, "/a/ws"), open_timeout=10) as ws:
        ws.send("close 4001 bye now")
        with pytest.raises(ConnectionClosed):
            ws.recv(10)
    assert ws.close_code == 4001 and ws.close_reason == "bye now"

    flag = ws_stack.tmp / "ws-disconnects"
    flag.unlink(missing_ok=True)
    with connect(ws_url(ws_stack, "/a/ws"), open_timeout=10) as ws:
        ws.close(4002, "client done")
    assert ws.close_code == 4002  # the server echoed the close frame (RFC 6455 5.5.1)
    wait_for(lambda: flag.exists() and flag.read_text() == "4002\n",
             what="the app to get websocket.disconnect 4002")


def test_close_before_accept_is_http_403(ws_stack: Stack) -> None:
    with pytest.raises(InvalidStatus) as info:
        connect(ws_url(ws_stack, "/a/refuse"), open_timeout=10)
    assert info.value.response.status_code == 403


def test_a_websocket_to_a_wsgi_service_is_refused_in_every_variant(ws_stack: Stack) -> None:
    with pytest.raises(InvalidStatus) as info:
        connect(ws_url(ws_stack, "/w/ws"), open_timeout=10)
    assert info.value.response.status_code == 400
    assert b"does not take WebSockets" in info.value.response.body
    # Without the key or version Mongrel2 passes the upgrade on as a plain GET:
    # it must not reach the app as one, whichever kind of service it is.
    for path in ("/w/ws", "/a/ws"):
        for extra in (b"", b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"):
            with socket.create_connection(("127.0.0.1", ws_stack.http_port), timeout=10) as s:
                s.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\n"
                          b"Upgrade: websocket\r\nConnection: Upgrade\r\n" + extra + b"\r\n")
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
            assert data.startswith(b"HTTP/1.1 426 "), data


def test_starlette_and_fastapi_websocket_endpoints(ws_stack: Stack) -> None:
    with connect(ws_url(ws_stack, "/st/ws"), open_timeout=10) as ws:
        ws.send("hi")
        assert ws.recv(10) == "starlette: hi"
    with connect(ws_url(ws_stack, "/fa/ws"), open_timeout=10) as ws:
        ws.send(b"abc")
        assert ws.recv(10) == b"cba"


def test_a_thousand_concurrent_websockets_on_one_process(ws_stack: Stack) -> None:
    n = 1000

    async def one(i: int, sem: asyncio.Semaphore, ready: asyncio.Event,
                  opened: list[int]) -> str:
        async with sem:  # connect in waves of 200; all then stay open together
            ws = await websockets.connect(ws_url(ws_stack, "/a/ws"), open_timeout=60)
        try:
            opened.append(i)
            if len(opened) == n:
                ready.set()
            await asyncio.wait_for(ready.wait(), 90)
            await ws.send(f"m{i}")
            return str(await asyncio.wait_for(ws.recv(), 60))
        finally:
            await ws.close()

    async def main() -> list[str]:
        ready, opened, sem = asyncio.Event(), [], asyncio.Semaphore(200)
        return await asyncio.wait_for(
            asyncio.gather(*(one(i, sem, ready, opened) for i in range(n))), 150)

    answers = asyncio.run(main())
    assert answers == [f"m{i}" for i in range(n)]
    pids = {w["label"] for w in _workers(ws_stack, "raw")}
    assert len(pids) == 1  # one process held them all


def _status(stack: Stack, broker: int = 0) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "scale0.cli", "ctl", "--broker",
                          stack.broker_endpoints[broker], "--json", "status"],
                         capture_output=True, text=True, timeout=10, check=True)
    status: dict[str, Any] = json.loads(out.stdout)
    return status


def _workers(stack: Stack, service: str) -> list[dict[str, object]]:
    return [w for w in _status(stack)["workers"] if service in w["services"]]


def _in_flight(stack: Stack, service: str) -> int:
    return sum(int(str(w["in_flight"])) for w in _workers(stack, service))


def test_a_client_that_vanishes_gives_the_app_websocket_disconnect(ws_stack: Stack) -> None:
    flag = ws_stack.tmp / "ws-disconnects"
    flag.unlink(missing_ok=True)
    before = _in_flight(ws_stack, "raw")
    with connect(ws_url(ws_stack, "/a/ws"), open_timeout=10) as ws:
        ws.send("x")
        assert ws.recv(10) == "x"
        ws.socket.shutdown(socket.SHUT_RDWR)  # gone without a close frame
    wait_for(lambda: flag.exists() and flag.read_text() == "1006\n",
             what="websocket.disconnect 1006 at the app")
    wait_for(lambda: _in_flight(ws_stack, "raw") == before, what="the slot to free")


def test_http_and_websockets_share_one_process(ws_stack: Stack) -> None:
    with connect(ws_url(ws_stack, "/a/ws"), open_timeout=10) as ws:
        assert requests.get(ws_stack.url("/a/"), timeout=10).status_code == 200
        ws.send("still")
        assert ws.recv(10) == "still"


# ---- failures: their own stacks ----------------------------------------------


def _asgi_stack(s: Stack, *args: str) -> None:
    s.start_mongrel2()
    s.start_broker("--heartbeat", "0.2")
    s.start_asgi("asgi_apps:raw", *args, "--heartbeat", "0.2", service="raw")
    s.wait_ok("/")


def test_worker_sigkilled_under_open_websockets_clients_see_the_close(
        fresh_stack: Stack) -> None:
    _asgi_stack(fresh_stack)
    with contextlib.ExitStack() as opened:
        clients = [opened.enter_context(connect(ws_url(fresh_stack, "/ws"), open_timeout=10))
                   for _ in range(5)]
        clients[0].send("pid")
        pid = int(clients[0].recv(10))
        os.kill(pid, signal.SIGKILL)
        for ws in clients:
            with pytest.raises(ConnectionClosed):
                ws.recv(15)  # the broker notices (heartbeats) and closes them: no hang
    # The pool respawns the process, which serves again.
    fresh_stack.wait_ok("/")
    with connect(ws_url(fresh_stack, "/ws"), open_timeout=10) as ws:
        ws.send("back")
        assert ws.recv(10) == "back"


def test_graceful_drain_closes_open_websockets_with_1001(fresh_stack: Stack) -> None:
    _asgi_stack(fresh_stack, "--graceful-timeout", "1")
    pool = fresh_stack.procs[-1]
    with contextlib.ExitStack() as opened:
        clients = [opened.enter_context(connect(ws_url(fresh_stack, "/ws"), open_timeout=10))
                   for _ in range(3)]
        for ws in clients:
            ws.send("before")
            assert ws.recv(10) == "before"
        pool.send_signal(signal.SIGTERM)
        for ws in clients:
            # Closed with 1001 once the graceful timeout has passed.
            with pytest.raises(ConnectionClosed):
                while True:
                    ws.recv(20)
            assert ws.close_code == 1001
    assert pool.popen.wait(30) == 0


def test_websockets_through_a_relay_with_two_brokers(fresh_stack: Stack) -> None:
    """Each connection's frames stay on the broker that took its handshake, and
    that broker sends them to the one worker process that accepted it."""
    s = fresh_stack
    s.start_mongrel2()
    s.start_relay()
    s.start_broker()
    s.start_broker()
    s.start_asgi("asgi_apps:raw", service="raw", processes=2, concurrency=500)
    s.wait_ok("/")
    wait_for(lambda: len(_workers(s, "raw")) == 2, what="both processes at broker 0")
    with contextlib.ExitStack() as opened:
        clients = []

        def both_brokers_hold_some() -> bool:
            # A broker joins the relay when its startup grace ends: open more
            # WebSockets until each broker has taken handshakes.
            clients.append(opened.enter_context(connect(ws_url(s, "/ws"), open_timeout=10)))
            return len(clients) >= 12 and all(
                _status(s, b)["counters"]["websockets"] > 0 for b in (0, 1))

        wait_for(both_brokers_hold_some, 30, "handshakes at both brokers", interval_s=0.1)
        pids = set()
        for round_ in range(5):
            for i, ws in enumerate(clients):
                ws.send(f"{i}.{round_}")
                assert ws.recv(10) == f"{i}.{round_}"
        for ws in clients:
            ws.send("pid")
            pids.add(ws.recv(10))
    assert len(pids) == 2  # spread over both processes, each kept its own connections


def test_a_stopping_broker_closes_open_websockets_with_1001(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    broker = s.start_broker("--graceful-timeout", "1")
    s.start_asgi("asgi_apps:raw", service="raw")
    s.wait_ok("/")
    with connect(ws_url(s, "/ws"), open_timeout=10) as ws:
        ws.send("x")
        assert ws.recv(10) == "x"
        broker.send_signal(signal.SIGTERM)
        with pytest.raises(ConnectionClosed):
            while True:
                ws.recv(20)
    assert ws.close_code == 1001 and ws.close_reason == "broker shutting down"
    assert broker.popen.wait(20) == 0
