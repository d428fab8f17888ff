"""The control protocol of `scale0 ctl`: where a broker's control socket is,
and how its requests and replies are framed. No sockets: the broker's
server (ops/control.py) and the `ctl` client (ops/ctl.py) both use it, and
the client imports nothing of the server side (dispatch, the broker).

A request is ``[b"", JSON]``, the JSON ``{"argv": [WORD, ...]}``, words as
an operator types them. The reply is ``[b"", JSON]``: ``{"ok": true,
"result": ...}`` or ``{"ok": false, "error": TEXT}``. The tap publishes
``[TAP_PREFIX + SERVICE + b"\\n", JSON]``; a subscriber's ``HELLO_PREFIX +
NONCE`` subscription is answered once (ops/control.py says why).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from scale0.errors import Scale0Error

MAX_REQUEST_BYTES = 64 * 1024
MAX_SUN_PATH = 107  # sockaddr_un.sun_path is 108 bytes on Linux, NUL included
TAP_PREFIX = b"svc:"
HELLO_PREFIX = b"hello:"


class ControlError(Scale0Error):
    """A command that cannot run; the text goes to the operator as is."""


# ---- where ---------------------------------------------------------------

def runtime_dir() -> Path:
    """/run/scale0 for root, else $XDG_RUNTIME_DIR/scale0, else /tmp/scale0-UID."""
    if os.geteuid() == 0:
        return Path("/run/scale0")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg, "scale0") if xdg else Path(f"/tmp/scale0-{os.geteuid()}")


def default_endpoint(bind: str) -> str:
    """The control endpoint of the broker whose worker endpoint is `bind`.

    A TCP port is one broker per machine, so ``tcp://HOST:6780`` gives
    ``ipc://RUNTIME_DIR/broker-6780.ctl``; other endpoints give a name made
    from their text (hashed when long). `scale0 ctl --broker BIND` derives
    the same path.
    """
    scheme, _, rest = bind.partition("://")
    if scheme == "tcp" and rest.rpartition(":")[2].isdigit():
        name = rest.rpartition(":")[2]
    else:
        name = re.sub(r"[^A-Za-z0-9.]+", "-", rest).strip("-.") or "default"
        if len(name) > 40:
            name = name[:24] + "-" + hashlib.sha256(bind.encode()).hexdigest()[:12]
    return f"ipc://{runtime_dir()}/broker-{name}.ctl"


def ipc_path(endpoint: str) -> Path:
    """The socket file of an ipc:// endpoint; ControlError for anything else."""
    scheme, _, path = endpoint.partition("://")
    if scheme != "ipc" or not path or path.startswith("@"):
        raise ControlError(f"control endpoint {endpoint!r}: expected ipc:///PATH (a socket "
                           "file, so file permissions decide who may connect)")
    if len(os.fsencode(path)) > MAX_SUN_PATH:
        raise ControlError(f"control endpoint {endpoint!r}: the path is longer than "
                           f"{MAX_SUN_PATH} bytes, which a unix socket cannot have")
    return Path(path)


def tap_endpoint(control: str) -> str:
    return (control.removesuffix(".ctl") if control.endswith(".ctl") else control) + ".tap"


# ---- the protocol (no sockets) -----------------------------------------

def encode_request(argv: list[str]) -> bytes:
    return json.dumps({"argv": argv}).encode()


def parse_request(body: bytes) -> list[str]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ControlError(f"malformed request: {exc}") from exc
    argv = data.get("argv") if isinstance(data, dict) else None
    if (not isinstance(argv, list) or not argv
            or not all(isinstance(word, str) for word in argv)):
        raise ControlError('malformed request: expected {"argv": ["COMMAND", ...]}')
    return argv


def encode_reply(result: Any = None, error: str | None = None) -> bytes:
    reply = {"ok": False, "error": error} if error is not None else {"ok": True, "result": result}
    return json.dumps(reply).encode()
