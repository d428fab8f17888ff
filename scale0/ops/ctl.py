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
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import zmq

from scale0.errors import Scale0Error
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


# ---- rendering ---------------------------------------------------------------

TAP_HEADER = f"{'TIME':<12} {'STATUS':>6} {'METHOD':<7} {'MS':>8}  {'WORKER':<24} PATH"


def tap_line(r: dict[str, Any]) -> str:
    clock = datetime.fromtimestamp(r["time"]).strftime("%H:%M:%S.%f")[:12]
    return (f"{clock:<12} {r['status']:>6} {r['method']:<7} {r['ms']:>8.1f}  "
            f"{r['worker'] or '-':<24} {r['path']}")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns, two spaces apart; numbers aligned right."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h), *(len(row[i]) for row in cells)]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) and bool(rows)
               for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(row, widths, numeric, strict=True)).rstrip()

    body = [line(row) for row in cells] or ["(none)"]
    return "\n".join([line(list(headers)), *body])


def duration(seconds: float) -> str:
    """3s, 2m05s, 3h07m, 2d04h."""
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def render_status(st: dict[str, Any]) -> str:
    b = st["broker"]
    parts = [f"broker pid {b['pid']} ({b['state']}), up {duration(b['uptime_s'])}, "
             f"workers at {b['workers_endpoint']}, control {b['control']}",
             f"requests held {st['requests']}, connections {st['connections']}", "",
             table(["MONGREL2 SEND_SPEC", "RECV_SPEC", "CONNECTED", "SUBSCRIBED", "HELD",
                    "REPLIES"],
                   [[ln["send_spec"], ln["recv_spec"], _yes(ln["connected"]),
                     _yes(ln["subscribed"]), ln["held"], ln["replies"]]
                    for ln in st["links"]]), "",
             table(["SERVICE", "ROUTES", "QUEUED", "IN_FLIGHT", "WORKERS", "READY", "CAPACITY",
                    "TIMEOUT"],
                   [[s["name"] or "-", ",".join(s["routes"]) or "-", s["queued"],
                     s["in_flight"], s["workers"], s["ready"], s["capacity"],
                     f"{s['timeout_s']:g}s"] for s in st["services"]]), "",
             table(["WORKER", "ID", "SERVICES", "LOAD", "STATE", "AGE", "SERVED"],
                   [[w["label"], w["id"], ",".join(w["services"]),
                     _load(w), _worker_state(w),
                     duration(w["age_s"]), w["served"]] for w in st["workers"]]), ""]
    limits = st.get("limits")
    if limits:
        parts.append("limits: " + " ".join(f"{name} {used}/{most}"
                                            for name, (used, most) in limits.items()))
    if st.get("orphaned_routes"):
        parts += ["", table(["ROUTE WITHOUT WORKERS", "SERVICE", "FORGOTTEN IN"],
                            [[o["route"], o["service"], duration(o["forget_in_s"])]
                             for o in st["orphaned_routes"]])]
    if st.get("refused_hellos"):
        parts += ["", table(["REFUSED HELLO", "AGO", "CODE", "REASON"],
                            [[r["worker"], duration(r["age_s"]), r["code"], r["reason"]]
                             for r in st["refused_hellos"]])]
    if limits or st.get("orphaned_routes") or st.get("refused_hellos"):
        parts.append("")
    counters = st["counters"]
    parts.append("counters: " + " ".join(f"{k}={v}" for k, v in counters.items()))
    keys = st.get("keys", {})
    if keys.get("curve"):
        parts.append(f"CURVE: {keys['keys']} authorized keys in {keys['authorized_keys']} "
                     f"(reloaded {keys['reloads']} times), handshakes accepted="
                     f"{keys['accepted']} refused={keys['refused']}, HELLOs refused="
                     f"{keys['hellos_refused']}, messages of revoked keys dropped="
                     f"{keys['revoked_messages']}")
    return "\n".join(parts)


def _load(w: dict[str, Any]) -> str:
    """'in flight/capacity', and '+prefetch' for a worker that lets requests wait."""
    prefetch = w.get("prefetch", 0)
    return f"{w['in_flight']}/{w['capacity']}" + (f"+{prefetch}" if prefetch else "")


def _worker_state(w: dict[str, Any]) -> str:
    if w["draining"]:  # `state` says why: an operator's drain, or leaving
        return str(w.get("state", "draining"))
    if w.get("ejected_s"):
        return f"ejected {duration(w['ejected_s'])}"
    return "ready"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def render(command: str, result: Any) -> str:
    if command == "status":
        return render_status(result)
    if command == "routes" and "routes" in result:
        return table(["ROUTE", "SERVICE", "ORIGIN"],
                     [[r["route"], r["service"], r["origin"]] for r in result["routes"]])
    if command == "routes" and "added" in result:
        return f"route {result['added']} -> {result['service']} added"
    if command == "routes":
        return f"route {result['removed']} (was -> {result['service']}) removed"
    if command == "drain":
        text = (f"{result['kind']} {result['target']}: {len(result['drained'])} worker(s) "
                "draining: no new request, the ones in progress finish (undrain to undo)")
        names = result["drained"] + [f"{n} (already draining)"
                                     for n in result["already_draining"]]
        return text + "".join(f"\n  {n}" for n in names)
    if command in ("undrain", "ready"):
        text = (f"{result['kind']} {result['target']}: {len(result['ready'])} worker(s) "
                "take requests again")
        names = result["ready"] + [f"{n} (still draining: drained by another name, or "
                                   "leaving)" for n in result["still_draining"]]
        return text + "".join(f"\n  {n}" for n in names)
    if command == "recycle":
        text = (f"{result['kind']} {result['target']}: {len(result['recycled'])} worker(s) "
                "asked to finish and leave (their pool starts new ones)")
        names = result["recycled"] + [f"{n} (already leaving)"
                                      for n in result["already_leaving"]]
        return text + "".join(f"\n  {n}" for n in names)
    if command == "shutdown":
        how = (f"gracefully (up to {result['graceful_timeout_s']:g} s for requests in progress)"
               if result["graceful"] else "now (requests in progress get 503)")
        return f"broker pid {result['pid']} stopping {how}"
    return json.dumps(result)


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
