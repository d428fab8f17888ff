"""A WebSocket chat room as a plain ASGI app (no framework):
`scale0 asgi examples.chat:app --route /chat` (`make run` serves it at /chat).

GET /chat is the page; the page opens a WebSocket to /chat/ws, and every
text message one client sends is broadcast to every client connected to
this process. The room lives in one process: run its pool with
`processes = 1` (a room shared by several processes would need a message
bus between them, which this example leaves out).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_TEXT = 2000  # characters kept of one chat message

PAGE = b"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Scale0 chat</title>
<style>
 body { font: 16px system-ui, sans-serif; max-width: 40em; margin: 2em auto; }
 #log { list-style: none; padding: 0; border: 1px solid #ccc; height: 20em; overflow-y: auto; }
 #log li { padding: .2em .5em; } #log li.note { color: #777; font-style: italic; }
 form { display: flex; gap: .5em; margin-top: .5em; } #text { flex: 1; }
</style></head>
<body>
<h1>Scale0 chat</h1>
<p id="state">connecting...</p>
<ul id="log"></ul>
<form id="form"><input id="name" placeholder="name" size="8">
<input id="text" placeholder="say something" autocomplete="off"><button>Send</button></form>
<script>
const log = document.getElementById("log"), state = document.getElementById("state");
const root = location.pathname.replace(/\\/+$/, "");
const ws = new WebSocket((location.protocol === "https:" ? "wss://" : "ws://")
                         + location.host + root + "/ws");
function add(text, cls) {
  const li = document.createElement("li");
  li.textContent = text;
  if (cls) li.className = cls;
  log.appendChild(li);
  log.scrollTop = log.scrollHeight;
}
ws.onopen = () => { state.textContent = "connected"; state.dataset.state = "open"; };
ws.onclose = (e) => { state.textContent = "disconnected (" + e.code + ")";
                      state.dataset.state = "closed"; };
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  if (m.note) add(m.note, "note"); else add(m.name + ": " + m.text);
};
document.getElementById("form").onsubmit = (e) => {
  e.preventDefault();
  const text = document.getElementById("text");
  if (text.value && ws.readyState === WebSocket.OPEN) {
    ws.send(JSON.stringify({name: document.getElementById("name").value || "anonymous",
                            text: text.value}));
    text.value = "";
  }
};
</script></body></html>
"""


class Room:
    """The clients connected to this process: id -> their ASGI send."""

    def __init__(self) -> None:
        self.members: dict[int, Send] = {}

    async def broadcast(self, data: dict[str, str]) -> None:
        text = json.dumps(data)
        for member_id, send in list(self.members.items()):
            try:
                await send({"type": "websocket.send", "text": text})
            except OSError:  # that client is gone; its own task removes it
                self.members.pop(member_id, None)


room = Room()


async def app(scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    path = scope["path"][len(scope["root_path"]):] or "/"
    if scope["type"] == "websocket":
        if path != "/ws":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _chat(receive, send)
        return
    if path in ("/", ""):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/html; charset=utf-8"),
                                (b"content-length", b"%d" % len(PAGE))]})
        await send({"type": "http.response.body", "body": PAGE})
    else:
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"not found\n"})


async def _chat(receive: Receive, send: Send) -> None:
    if (await receive())["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    member_id = id(send)
    room.members[member_id] = send
    await room.broadcast({"note": f"someone joined ({len(room.members)} here)"})
    try:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                data = json.loads(message.get("text") or "")
                name, text = str(data["name"])[:40], str(data["text"])[:MAX_TEXT]
            except (ValueError, KeyError, TypeError):
                continue  # not a chat message: ignored
            await room.broadcast({"name": name, "text": text})
    finally:
        room.members.pop(member_id, None)
        await room.broadcast({"note": f"someone left ({len(room.members)} here)"})
