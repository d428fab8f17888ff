"""`scale0 ctl`: the operator's client of a broker's control socket (ops/control.py).

Talks to one broker over its ipc:// control socket: by default the one of
the broker bound for workers at tcp://127.0.0.1:6780 (see --broker). The
options work before or after the command (`scale0 ctl status --json`).

drain takes workers out of rotation (they stay connected, listed as
draining) until undrain (or ready); recycle makes them leave, and their
pools start new processes.

Exit status: 0 done; 1 the broker refused the command (the reason is
printed); 2 bad usage; 3 no broker answers (not running, wrong endpoint, no
permission), found out within --timeout seconds."""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import zmq

from scale0.errors import Scale0Error
from scale0.ops.ctl_render import TAP_HEADER, render, tap_line
from scale0.wire.control import (
    HELLO_PREFIX,
    ControlError,
    default_endpoint,
    encode_request,
    ipc_path,
)

DEFAULT_BROKER = "tcp://127.0.0.1:6780"
REFUSED, USAGE, UNREACHABLE = 1, 2, 3
ROOT_RUNTIME_DIR = Path("/run/scale0")  # control.runtime_dir() of a broker run by root
TAP_PING_S = 3.0  # a quiet tap checks this often that its broker is still there


class Unreachable(Scale0Error):
    """No broker answered; the text says what to check."""


class Refused(Scale0Error):
    """The broker answered with an error."""


# ---- the client ------------------------------------------------------------

def call(endpoint: str, argv: list[str], timeout_s: float = 3.0,
         ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> Any:
    """Run one command on the broker at `endpoint`; its result, or raise
    Unreachable (nothing answered within `timeout_s`) or Refused."""
    check_socket(ipc_path(endpoint))
    own = ctx is None
    ctx = ctx or zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    try:
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoint)
        sock.send_multipart([b"", encode_request(argv)])
        if not sock.poll(int(timeout_s * 1000)):
            raise Unreachable(f"no answer from {endpoint} within {timeout_s:g} s: the broker "
                              "is not running (stale socket file) or is stuck")
        frames = sock.recv_multipart()
    finally:
        sock.close(0)
        if own:
            ctx.term()
    try:
        reply = json.loads(frames[-1])
    except ValueError as exc:
        raise Refused(f"malformed reply from {endpoint}: {exc}") from exc
    if not reply.get("ok"):
        raise Refused(str(reply.get("error")))
    return reply.get("result")


def check_socket(path: Path) -> None:
    """Raise Unreachable, with one line saying what to do, unless a process
    listens on the unix socket `path` and we may connect to it."""
    denied = (f"permission denied on {path}: run scale0 ctl as the broker's user "
              "(or root), or pass --control")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise Unreachable(f"no broker control socket at {path}{_others(path)}") from None
    except PermissionError:
        raise Unreachable(denied) from None
    except OSError as exc:
        raise Unreachable(f"cannot reach the control socket {path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise Unreachable(f"{path} is not a socket: pass the broker's --control endpoint")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(os.fspath(path))
        except PermissionError:
            raise Unreachable(denied) from None
        except ConnectionRefusedError:
            raise Unreachable(f"nothing listens on {path}: the broker is not running (the "
                              "file is left over); start it, or pass --control") from None
        except OSError as exc:
            raise Unreachable(f"cannot reach the control socket {path}: {exc.strerror}") from None


def _others(path: Path) -> str:
    try:
        found = sorted(str(p) for p in path.parent.glob("*.ctl"))
    except OSError:
        found = []
    hint = " (is the broker running? started with another --bind or --control?)"
    if os.geteuid() != 0 and ROOT_RUNTIME_DIR.exists() and path.parent != ROOT_RUNTIME_DIR:
        hint += (f"; a broker run by root has its socket in {ROOT_RUNTIME_DIR}: run ctl as "
                 "root, or pass --control")
    return hint + ("; control sockets there: " + ", ".join(found) if found else "")


def tap(endpoint: str, service: str | None, out: TextIO, *, as_json: bool,
        count: int = 0, timeout_s: float = 3.0) -> int:
    """Print finished requests as they happen until Ctrl-C (or `count` lines)."""
    info = call(endpoint, ["tap", *([service] if service else [])], timeout_s)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    hello = HELLO_PREFIX + os.urandom(8).hex().encode()
    try:
        sub.connect(info["endpoint"])
        sub.setsockopt(zmq.SUBSCRIBE, info["topic"].encode())
        sub.setsockopt(zmq.SUBSCRIBE, hello)  # answered once our topic is in place
        deadline = time.monotonic() + timeout_s
        while not (sub.poll(100) and sub.recv_multipart()[0] == hello):
            if time.monotonic() > deadline:
                raise Unreachable(f"the tap at {info['endpoint']} does not answer")
        sub.setsockopt(zmq.UNSUBSCRIBE, hello)
        print(f"tapping {service or 'all services'} at broker pid {info['pid']}; "
              "Ctrl-C to stop", file=sys.stderr)
        if not as_json:
            print(TAP_HEADER, file=out, flush=True)
        seen, quiet_since = 0, time.monotonic()
        while not count or seen < count:
            if not sub.poll(1000):
                if time.monotonic() - quiet_since > TAP_PING_S:
                    call(endpoint, ["ping"], timeout_s, ctx)  # Unreachable when gone
                    quiet_since = time.monotonic()
                continue
            record = json.loads(sub.recv_multipart()[1])
            seen += 1
            quiet_since = time.monotonic()
            print(json.dumps(record) if as_json else tap_line(record), file=out, flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        sub.close(0)
        ctx.term()
    return 0


# ---- the command line -----------------------------------------------------------

def _options(p: argparse.ArgumentParser, *, top: bool) -> None:
    """The options every command takes, before or after its name (`scale0 ctl
    status --json`). On the commands' parsers they default to SUPPRESS, so
    one given before the command name is not reset by the command's parser."""
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    where = p.add_mutually_exclusive_group()
    where.add_argument("--control", metavar="ENDPOINT", default=default(None),
                       help="the broker's control socket (ipc://PATH)")
    where.add_argument("--broker", metavar="BIND", default=default(DEFAULT_BROKER),
                       help="find the control socket of the broker bound for workers at BIND "
                            f"(default: {DEFAULT_BROKER})")
    p.add_argument("--json", action="store_true", default=default(False),
                   help="print JSON instead of tables")
    p.add_argument("--timeout", type=float, default=default(3.0), metavar="SECONDS",
                   help="wait this long for the broker (default: 3)")
    p.add_argument("--log-level", default=default("warning"),
                   choices=["debug", "info", "warning", "error"],
                   help="log level on stderr (default: warning)")


def add_parser(sub: Any) -> None:
    """The `ctl` subcommand, on the subparsers of `scale0`."""
    c = sub.add_parser("ctl", help="control a running broker (status, drain, undrain, "
                                   "recycle, routes, tap, shutdown)",
                       description=__doc__.partition("\n\n")[2] if __doc__ else None,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(c, top=True)
    cmds = c.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")

    def command(name: str, help: str, aliases: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = cmds.add_parser(name, help=help, aliases=aliases)
        _options(parser, top=False)
        return parser

    command("status", "links, services, queues, workers, counters")
    d = command("drain", "a worker (label or id) or every worker of a service takes no new "
                         "request, finishes the ones it has and stays, listed as draining, "
                         "until undrain")
    d.add_argument("target", metavar="WORKER|SERVICE")
    u = command("undrain", "undo drain: the workers take requests again", aliases=("ready",))
    u.add_argument("target", metavar="WORKER|SERVICE")
    rc = command("recycle", "a worker (label or id) or every worker of a service finishes "
                            "its requests and leaves; its pool starts a new process")
    rc.add_argument("target", metavar="WORKER|SERVICE")
    r = command("routes", "list, add or remove route-table entries")
    ra = r.add_subparsers(dest="routes_action", metavar="ACTION")
    add = ra.add_parser("add", help="route [HOST]/PATH to SERVICE")
    _options(add, top=False)
    add.add_argument("route", metavar="[HOST]/PATH")
    add.add_argument("service", metavar="SERVICE")
    rm = ra.add_parser("remove", help="remove the route [HOST]/PATH")
    _options(rm, top=False)
    rm.add_argument("route", metavar="[HOST]/PATH")
    t = command("tap", "print finished requests live (Ctrl-C stops)")
    t.add_argument("service", nargs="?", metavar="SERVICE", help="default: all services")
    t.add_argument("--count", type=int, default=0, metavar="N", help="stop after N requests")
    s = command("shutdown", "stop the broker")
    s.add_argument("--graceful", action="store_true",
                   help="like SIGTERM: finish requests in progress (default: at once, "
                        "like a second SIGTERM)")
    c.set_defaults(func=main)


ALIASES = {"ready": "undrain"}


def wire_argv(args: argparse.Namespace) -> list[str]:
    """The parsed command line -> the words sent to the broker."""
    command: str = ALIASES.get(args.ctl_command, args.ctl_command)
    if command in ("drain", "undrain", "recycle"):
        return [command, args.target]
    if command == "routes" and args.routes_action == "add":
        return [command, "add", args.route, args.service]
    if command == "routes" and args.routes_action == "remove":
        return [command, "remove", args.route]
    if command == "shutdown" and args.graceful:
        return [command, "--graceful"]
    return [command]


def main(args: argparse.Namespace) -> int:
    endpoint = args.control or ""
    try:
        endpoint = endpoint or default_endpoint(args.broker)
        if args.ctl_command == "tap":
            return tap(endpoint, args.service, sys.stdout, as_json=args.json, count=args.count,
                       timeout_s=args.timeout)
        result = call(endpoint, wire_argv(args), args.timeout)
    except ControlError as exc:
        print(f"scale0 ctl: {exc}", file=sys.stderr)
        return USAGE
    except Unreachable as exc:
        print(f"scale0 ctl: {exc}", file=sys.stderr)
        return UNREACHABLE
    except (zmq.ZMQError, OSError) as exc:  # one line, never a traceback
        print(f"scale0 ctl: cannot talk to the broker at {endpoint}: {exc}", file=sys.stderr)
        return UNREACHABLE
    except Refused as exc:
        print(f"scale0 ctl: {args.ctl_command}: {exc}", file=sys.stderr)
        return REFUSED
    except KeyboardInterrupt:
        return 130
    print(json.dumps(result, indent=2) if args.json else render(args.ctl_command, result))
    return 0
