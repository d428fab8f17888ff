"""ASGI apps the end-to-end tests serve with `scale0 asgi` (this folder is on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from typing import Any

from fastapi import BackgroundTasks, FastAPI, WebSocket, WebSocketDisconnect
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute

Scope = dict[str, Any]
_gathered: list[int] = []


async def raw(scope: Scope, receive: Any, send: Any) -> None:
    """A plain ASGI app: lifespan, HTTP routes by path, WebSocket echo."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if os.environ.get("E2E_LIFESPAN_FAIL"):
                    await send({"type": "lifespan.startup.failed", "message": "no database"})
                    return
                scope["state"]["started"] = "yes"
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                path = os.environ.get("E2E_SHUTDOWN_FILE")
                if path:
                    with open(path, "a") as f:
                        f.write(f"shutdown {os.getpid()}\n")
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await _ws(scope, receive, send)
        return
    path = scope["path"]
    if path.endswith("/scope"):
        body = json.dumps({k: v for k, v in scope.items() if k != "state"} | {
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            "raw_path": scope["raw_path"].decode("latin-1"),
            "query_string": scope["query_string"].decode("latin-1"),
            "state": scope.get("state", {}),
        }).encode()
        await _reply(send, 200, body, b"application/json")
    elif path.endswith("/echo"):
        digest = hashlib.sha256()
        size = pieces = 0
        while True:
            message = await receive()
            digest.update(message.get("body", b""))
            size += len(message.get("body", b""))
            pieces += 1
            if not message.get("more_body"):
                break
        await _reply(send, 200, json.dumps({"size": size, "sha256": digest.hexdigest(),
                                            "pieces": pieces}).encode())
    elif path.endswith("/sleep"):
        await asyncio.sleep(float(scope["query_string"] or b"1"))
        await _reply(send, 200, b"slept\n")
    elif path.endswith("/sse"):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        for i in range(3):
            await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                        "more_body": True})
            await asyncio.sleep(0.3)
        await send({"type": "http.response.body", "body": b""})
    elif path.endswith("/big"):
        size = int(scope["query_string"] or b"1000000")
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"%d" % size)]})
        block = b"x" * 65536
        sent = 0
        while sent < size:
            n = min(len(block), size - sent)
            sent += n
            await send({"type": "http.response.body", "body": block[:n],
                        "more_body": sent < size})
    elif path.endswith("/gather"):
        # Answers once `n` requests are in at once (or "alone" after 30 s): proof that
        # one process serves them concurrently, without timing anything.
        n = int(scope["query_string"] or b"20")
        _gathered.append(1)
        for _ in range(3000):
            if len(_gathered) >= n:
                await _reply(send, 200, b"together\n")
                return
            await asyncio.sleep(0.01)
        await _reply(send, 200, b"alone\n")
    elif path.endswith("/sse-gated"):
        # Event 1 is sent only once the client has seen event 0 (it creates the gate
        # file): a buffered response would never let it through.
        gate = os.environ["E2E_GATE_FILE"]
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        for _ in range(1000):
            if os.path.exists(gate):
                break
            await asyncio.sleep(0.01)
        last = b"data: 1\n\n" if os.path.exists(gate) else b"data: buffered\n\n"
        await send({"type": "http.response.body", "body": last})
    elif path.endswith("/block"):
        import time
        time.sleep(float(scope["query_string"] or b"30"))  # blocks the event loop
        await _reply(send, 200, b"unblocked\n")
    elif path.endswith("/fail-before"):
        raise RuntimeError("boom before the response")
    elif path.endswith("/fail-after"):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("boom after the start")
    elif path.endswith("/trailers"):
        await send({"type": "http.response.start", "status": 200, "headers": [],
                    "trailers": True})
        await send({"type": "http.response.body", "body": b"x"})
    elif path.endswith("/held"):
        # A streamed upload held after its first piece: writes "<flag>.read",
        # waits for the test to create <flag>, reads on, and writes what ended
        # the body ("disconnect" or "complete") to "<flag>.result".
        flag = scope["query_string"].decode()
        message = await receive()
        with open(f"{flag}.read", "w") as f:
            f.write(str(len(message.get("body", b""))))
        while not os.path.exists(flag):
            await asyncio.sleep(0.02)
        while message["type"] == "http.request" and message.get("more_body"):
            message = await receive()
        with open(f"{flag}.result", "w") as f:
            f.write("disconnect" if message["type"] == "http.disconnect" else "complete")
        if message["type"] != "http.disconnect":
            await _reply(send, 200, b"complete\n")
    elif path.endswith("/disconnect"):
        # Waits for the client to leave; then records that it saw http.disconnect.
        message = await receive()
        message = await receive()
        flag = os.environ.get("E2E_DISCONNECT_FILE")
        if flag and message["type"] == "http.disconnect":
            with open(flag, "a") as f:
                f.write("disconnect\n")
    else:
        await _reply(send, 200, b"hello from asgi\n")


async def _reply(send: Any, status: int, body: bytes, ctype: bytes = b"text/plain") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", ctype), (b"x-dup", b"1"), (b"x-dup", b"2")]})
    await send({"type": "http.response.body", "body": body})


async def _ws(scope: Scope, receive: Any, send: Any) -> None:
    message = await receive()
    assert message["type"] == "websocket.connect"
    path = scope["path"]
    if path.endswith("/refuse"):
        await send({"type": "websocket.close", "code": 1008})
        return
    subprotocol = scope["subprotocols"][0] if scope["subprotocols"] else None
    await send({"type": "websocket.accept", "subprotocol": subprotocol,
                "headers": [(b"x-accepted", b"yes")]})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            flag = os.environ.get("E2E_WS_DISCONNECT_FILE")
            if flag:
                with open(flag, "a") as f:
                    f.write(f"{message['code']}\n")
            return
        text = message.get("text")
        if text is not None and text.startswith("close "):
            code, _, reason = text[6:].partition(" ")
            await send({"type": "websocket.close", "code": int(code), "reason": reason})
            return
        if text == "pid":
            await send({"type": "websocket.send", "text": str(os.getpid())})
            continue
        if text == "scope":
            await send({"type": "websocket.send", "text": json.dumps({
                "path": scope["path"], "root_path": scope["root_path"],
                "query_string": scope["query_string"].decode(),
                "subprotocols": scope["subprotocols"], "scheme": scope["scheme"]})})
            continue
        await send({"type": "websocket.send", **{k: v for k, v in message.items()
                                                  if k in ("text", "bytes") and v is not None}})


async def no_lifespan(scope: Scope, receive: Any, send: Any) -> None:
    """An app that does not speak lifespan (raises on it, as many do)."""
    if scope["type"] != "http":
        raise RuntimeError(f"unsupported scope {scope['type']}")
    await _reply(send, 200, b"no lifespan here\n")


def create_app() -> Any:
    """A factory, for `module:create_app()`."""
    return no_lifespan


# ---- Starlette ---------------------------------------------------------------

async def _st_home(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"starlette {request.url.path} root={request.scope['root_path']}")


async def _st_json(request: Request) -> JSONResponse:
    data = await request.json()
    return JSONResponse({"got": data, "query": dict(request.query_params)})


async def _st_stream(request: Request) -> StreamingResponse:
    async def numbers() -> Any:
        for i in range(5):
            yield f"{i}\n"
            await asyncio.sleep(0.05)
    return StreamingResponse(numbers(), media_type="text/plain")


async def _st_ws(websocket: Any) -> None:
    await websocket.accept()
    async for text in websocket.iter_text():
        await websocket.send_text(f"starlette: {text}")


starlette_app = Starlette(routes=[
    Route("/", _st_home), Route("/json", _st_json, methods=["POST"]),
    Route("/stream", _st_stream), WebSocketRoute("/ws", _st_ws)])


# ---- FastAPI -----------------------------------------------------------------

fastapi_app = FastAPI()
_done_tasks: list[str] = []


@fastapi_app.get("/items/{item_id}")
async def _fa_item(item_id: int, q: str | None = None) -> dict[str, Any]:
    return {"item_id": item_id, "q": q}


def _record(name: str) -> None:
    _done_tasks.append(name)


@fastapi_app.post("/task/{name}")
async def _fa_task(name: str, background: BackgroundTasks) -> dict[str, str]:
    background.add_task(_record, name)
    return {"queued": name}


@fastapi_app.get("/tasks")
async def _fa_tasks() -> list[str]:
    return _done_tasks


@fastapi_app.websocket("/ws")
async def _fa_ws(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            data = await websocket.receive_bytes()
            await websocket.send_bytes(data[::-1])
    except WebSocketDisconnect:
        pass
