"""The access log: one line per finished request, written off the broker loop.

The broker loop hands each batch of `dispatch.Done` records to `AccessLog.sink`,
which only puts the batch on a queue (one call per wake-up, not per request);
a writer thread formats the lines and writes them. A file destination is
reopened when it is moved or removed (logrotate without copytruncate), like
nginx after USR1, through `logging.handlers.WatchedFileHandler`.

The format is a `str.format` template over the fields in `FIELDS`, checked
when the log is made so a typo fails before the broker starts.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from scale0.core.dispatch import Done
from scale0.errors import ConfigError

DEFAULT_FORMAT = ('{time} {conn_id} "{method} {path}" {status} {bytes_out} '
                  '{duration_ms:.1f}ms {service} {worker}')

FIELDS = {
    "time": "end of the request, local time, ISO 8601 with milliseconds",
    "unix_time": "end of the request, seconds since the epoch",
    "link": "index of the Mongrel2 link (order of --mongrel2)",
    "conn_id": "Mongrel2 connection id",
    "method": "HTTP method",
    "path": "request path with query string, as Mongrel2 passed it",
    "status": "status sent to the client (499: the client left first)",
    "bytes_in": "bytes of the request message from Mongrel2",
    "bytes_out": "response bytes sent to Mongrel2",
    "duration_ms": "time in the broker, milliseconds (float)",
    "duration_s": "time in the broker, seconds (float)",
    "service": "service name ('' when no route matched)",
    "worker": "label of the last worker it was sent to ('' if none)",
    "attempts": "times it was sent to a worker (2 after a retry)",
}

_STOP = object()


class AccessLogError(ConfigError):
    """An access log that cannot be used; the message says which setting."""


def _fields(done: Done, wall_offset: float) -> dict[str, object]:
    ended = done.ended_at + wall_offset
    duration = done.ended_at - done.received_at
    local = time.localtime(ended)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", local)
    zone = time.strftime("%z", local)
    return {
        "time": f"{stamp}.{int(ended % 1 * 1000):03d}{zone}", "unix_time": round(ended, 3),
        "link": done.link, "conn_id": done.conn_id, "method": done.method, "path": done.path,
        "status": done.status, "bytes_in": done.bytes_in, "bytes_out": done.bytes_out,
        "duration_ms": duration * 1000, "duration_s": duration, "service": done.service or "-",
        "worker": done.worker or "-", "attempts": done.attempts,
    }


def check_format(template: str) -> None:
    """Raise AccessLogError unless `template` formats a sample record."""
    sample = Done(0, 1, "GET", "/", "svc", "w", 200, 1, 2, 0.0, 0.001, 1)
    try:
        template.format(**_fields(sample, 0.0))
    except (KeyError, IndexError, ValueError) as exc:
        known = ", ".join(FIELDS)
        raise AccessLogError(
            f"access_log_format {template!r}: {exc!r}; fields are {known}") from exc


class AccessLog:
    """Writes `template` lines for each Done to `destination`.

    `destination`: '-' for stderr, else a file path (appended to, reopened if
    moved). Call `start()` before use and `close()` at the end; `close()`
    writes what is still queued.
    """

    def __init__(self, destination: str, template: str = DEFAULT_FORMAT) -> None:
        check_format(template)
        self.destination = destination
        self.template = template
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._write: Callable[[str], None] = lambda line: None
        self._close: Callable[[], None] = lambda: None

    def start(self) -> None:
        if self.destination == "-":
            stream: TextIO = sys.stderr

            def write(text: str) -> None:
                stream.write(text)
                stream.flush()

            self._write = write
        else:
            try:
                handler = logging.handlers.WatchedFileHandler(self.destination, delay=False)
            except OSError as exc:
                raise AccessLogError(f"access_log {self.destination!r}: {exc}") from exc
            handler.terminator = ""

            def write_file(text: str) -> None:
                # emit() reopens the file if it was moved; one record per batch.
                handler.emit(logging.makeLogRecord({"msg": text, "levelno": logging.INFO}))

            handler.setFormatter(logging.Formatter("%(message)s"))
            self._write = write_file
            self._close = handler.close
        self._thread = threading.Thread(target=self._run, name="scale0-access-log",
                                        daemon=True)
        self._thread.start()

    def sink(self, batch: list[Done]) -> None:
        """For `Broker.add_done_sink`: O(1) in the loop."""
        self._queue.put(batch)

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(5.0)
            self._thread = None
        self._close()

    def _run(self) -> None:
        template = self.template
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            # Done times are monotonic: place them on the wall clock now.
            offset = time.time() - time.monotonic()
            batch: list[Done] = item  # type: ignore[assignment]
            try:
                self._write("".join(template.format(**_fields(done, offset)) + "\n"
                                    for done in batch))
            except Exception:  # a full disk must not kill the thread silently
                logging.getLogger(__name__).exception("access log write failed")
