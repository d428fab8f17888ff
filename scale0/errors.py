"""One family of exceptions, as h11 has one (`h11.ProtocolError`).

    Scale0Error                      anything Scale0 raises on purpose
    +-- ProtocolError                a message breaks a protocol; status_hint
    |   +-- Mongrel2ProtocolError    wire/mongrel2.py: not Mongrel2 handler protocol (400)
    |   +-- ReplyError               wire/mongrel2_reply.py: a reply that cannot be built (500)
    |   +-- WireError                wire/s0w1.py: a malformed S0W1 message (502)
    |   +-- S0R1Error                wire/s0r1.py: a malformed S0R1 (relay) message (502)
    |   +-- BodyError                core/bodystream.py: pieces that are not the body (400, 413)
    |   +-- BadRequest               worker/upload.py: a request the app cannot be given
    |   +-- ApplicationError         worker/wsgi.py: the app broke PEP 3333 (500)
    |   +-- asgi.ProtocolError       worker/asgi.py: the app broke the ASGI spec (500)
    +-- ConfigError                  a setting that cannot be used (config/)
    |   +-- Invalid                  config/kinds.py: a value's own reason, made a ConfigError
    |   +-- AccessLogError           ops/accesslog.py
    |   +-- KeyFileError             auth/keys.py
    |   +-- M2DBError                deploy/m2db.py
    |   +-- StackError               deploy/stack_file.py (a `scale0 up` stack file)
    +-- Mongrel2Error                deploy/m2server.py: Mongrel2 missing, its config bad
    +-- ControlError                 wire/control.py: a control command that cannot run
    +-- Unreachable, Refused         ops/ctl.py: no broker answered / it answered an error
    +-- Cancelled                    worker/reply.py: the broker cancelled the request
    +-- ClientDisconnected           worker/asgi_cycle.py: send() after the client left
    +-- LifespanFailed               worker/asgi_lifespan.py: the app's startup failed
    +-- LinkStateError               worker/link.py: a move its table lacks (a bug)

Each class lives in the module whose concern it is and keeps the name it had,
so `except m2.Mongrel2ProtocolError` goes on working; this module holds the
roots only and imports nothing of Scale0, so every layer (the codecs too) may
use it. The classes that were ValueError (or RuntimeError, OSError) still
are, as a second base: callers that catch those keep catching them.

`status_hint` is the HTTP status for whoever answers a waiting client; the
code that raises knows what went wrong, the code that answers reads the hint
(h11's `error_status_hint`).
"""

from __future__ import annotations


class Scale0Error(Exception):
    """The root: `except Scale0Error` catches every error Scale0 raises on purpose."""


class ProtocolError(Scale0Error):
    """A message that breaks a protocol (Mongrel2's, S0W1, PEP 3333, ASGI).

    `status_hint`: the HTTP status to answer with where a client waits.
    """

    def __init__(self, msg: str, *, status_hint: int = 400) -> None:
        super().__init__(msg)
        self.status_hint = status_hint


class ConfigError(Scale0Error, ValueError):
    """A setting that cannot be used; the message names the source and the key."""
