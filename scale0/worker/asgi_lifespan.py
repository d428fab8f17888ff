"""The ASGI lifespan protocol for the ASGI worker (asgiref "Lifespan Protocol" 2.0).

`startup` runs ``lifespan.startup`` before the worker says HELLO to any
broker, and hands back the app's ``state`` (copied into every request's
scope) and the shutdown step, which the worker runs on a graceful stop,
after its requests. The modes are the worker's ``--lifespan``:

* ``off``: no lifespan scope at all;
* ``auto``: an app that raises at once on the lifespan scope, having sent
  nothing, does not support it and is run without (as uvicorn does);
* ``on``: the app must support it.

A ``lifespan.startup.failed``, or an app that fails after taking part, is a
failed startup: `LifespanFailed`, and the worker exits with BOOT_FAILED, so
its pool does not respawn it. A shutdown that fails or takes longer than the
graceful timeout is logged, and the app's lifespan task cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from scale0.errors import Scale0Error
from scale0.worker import asgi
from scale0.worker.asgi_cycle import App, Message

log = logging.getLogger(__name__)

Shutdown = Callable[[], Awaitable[None]]


class LifespanFailed(Scale0Error, RuntimeError):
    """The app's lifespan startup failed: the worker does not serve."""


async def startup(app: App, mode: str,
                  graceful_timeout_s: float) -> tuple[dict[str, Any] | None, Shutdown | None]:
    """Run lifespan.startup; returns (the app's state, the shutdown step), or
    (None, None) if the app runs without lifespan. Raises LifespanFailed."""
    if mode == "off":
        return None, None
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    started: asyncio.Future[str | None] = loop.create_future()
    stopped: asyncio.Future[str | None] = loop.create_future()
    sent_any = False
    state: dict[str, Any] = {}

    async def receive() -> Message:
        return await inbox.get()

    async def send(message: Message) -> None:
        nonlocal sent_any
        sent_any = True
        kind = message.get("type")
        for name, fut in (("startup", started), ("shutdown", stopped)):
            if kind == f"lifespan.{name}.complete" and not fut.done():
                fut.set_result(None)
            elif kind == f"lifespan.{name}.failed" and not fut.done():
                fut.set_result(str(message.get("message", "")) or "failed")

    scope = {"type": "lifespan", "asgi": dict(asgi.ASGI_VERSION), "state": state}
    task = asyncio.ensure_future(app(scope, receive, send))
    inbox.put_nowait({"type": "lifespan.startup"})
    first: list[asyncio.Future[Any]] = [task, started]
    await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        exc = task.exception() if not task.cancelled() else None
        if sent_any or mode == "on":
            raise LifespanFailed(f"lifespan startup failed: {exc!r}")
        log.info("the app does not support the lifespan protocol (%r): running without", exc)
        return None, None
    failure = started.result()
    if failure is not None:
        raise LifespanFailed(f"lifespan startup failed: {failure}")

    async def shutdown() -> None:
        inbox.put_nowait({"type": "lifespan.shutdown"})
        last: list[asyncio.Future[Any]] = [task, stopped]
        done, _ = await asyncio.wait(last, timeout=graceful_timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
        if stopped.done() and stopped.result() is not None:
            log.error("lifespan shutdown failed: %s", stopped.result())
        elif not done:
            log.error("lifespan shutdown did not finish in time")
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    return state, shutdown
