"""The `scale0 up` stack file: its TOML tables read and checked into the
processes to run (deploy/stack.py starts and watches them).

Each [[relay]], [[broker]] and [[pool]] table holds the settings of that
command (scale0/config/), checked here so that a typo names the file and the
key, plus the stack's own keys: `routes`, `args` (extra arguments) and, for a
pool, `interface`. Nothing is started here; the files read are the Mongrel2
config (for its server uuid) and any file a setting names (a maintenance
page), checked from the stack file's folder.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scale0.config import (
    AsgiConfig,
    BrokerConfig,
    CommonConfig,
    ConfigError,
    RelayConfig,
    WsgiConfig,
    default_service,
    from_mapping,
    specs,
    to_argv,
    unknown,
)
from scale0.core.backoff import Backoff
from scale0.deploy.m2server import Mongrel2Error, Mongrel2Server, server_uuid


class StackError(ConfigError):
    """A stack file that cannot be used; the message names the file and key."""


@dataclass(slots=True)
class StackProc:
    """One process of the stack: how to start it and what it is doing now."""

    name: str
    argv: list[str]
    cwd: Path
    popen: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: Backoff = field(default_factory=Backoff)  # its crash history
    stop_signal: int = signal.SIGTERM
    stop_order: int = 0  # lower stops first
    pid: int = 0  # of the last process started, also its process group
    ready_prefix: bytes = b""  # its READY line starts so, e.g. b"READY broker " ("": none)
    ready: bool = False  # the running process is ready (its READY line was read)
    out: bytes = b""  # its stdout read so far, short of a whole line


@dataclass(slots=True)
class StackPlan:
    """What a stack file asks for: Mongrel2, its HTTP address, the processes
    (Mongrel2's first), the grace period of a stop."""

    mongrel2: Mongrel2Server
    http_addr: tuple[str, int]
    graceful_timeout_s: float
    procs: list[StackProc] = field(default_factory=list)


def read_stack(data: dict[str, Any], base: Path, source: str = "<config>") -> StackPlan:
    """The processes of the parsed stack file `data` (named `source` in
    errors), run from `base`: Mongrel2, then each relay, broker and pool in
    file order. A pool's `interface` is "wsgi" (the default) or "asgi"."""
    def need(table: dict[str, Any], key: str, kind: type, where: str) -> Any:
        value = table.get(key)
        if not isinstance(value, kind):
            name = f"{where}.{key}" if where else key
            raise StackError(f"{source}: {name} must be a {kind.__name__}")
        return value

    _known_keys(data, STACK_KEYS, source)
    m2 = need(data, "mongrel2", dict, "")
    _known_keys(m2, MONGREL2_KEYS, f"{source}: mongrel2")
    config = base / need(m2, "config", str, "mongrel2")
    runtime = base / m2.get("runtime_dir", "var/mongrel2")
    host, _, port = str(need(m2, "http", str, "mongrel2")).rpartition(":")
    if not host or not port.isdigit():
        raise StackError(f"{source}: mongrel2.http must be HOST:PORT")
    try:
        uuid = m2.get("uuid") or server_uuid(config.read_text())
    except (OSError, Mongrel2Error) as exc:
        raise StackError(f"{source}: mongrel2.config: {exc}") from exc
    server = Mongrel2Server(config, runtime, uuid)
    try:
        graceful_timeout_s = float(_positive(data.get("graceful_timeout", 30.0)))
    except ValueError as exc:
        raise StackError(f"{source}: graceful_timeout must be a number > 0") from exc
    stack = StackPlan(server, (host, int(port)), graceful_timeout_s)
    stack.procs.append(StackProc("mongrel2", server.supervised_argv(), runtime,
                             stop_signal=signal.SIGINT, stop_order=3))
    scale0 = [sys.executable, "-m", "scale0.cli"]
    pool_routes = _pool_routes(data.get("pool"))
    binds = [str(b.get("bind")) for b in data.get("broker", [])
             if isinstance(b, dict)] if isinstance(data.get("broker"), list) else []
    for i, r in enumerate(need(data, "relay", list, "") if "relay" in data else []):
        where = f"relay[{i}]"
        settings = _settings(RelayConfig, r, f"{source}: {where}", RELAY_OWN_KEYS, base)
        need(r, "mongrel2", str, where)
        argv = [*scale0, "relay", *to_argv(RelayConfig, settings), *_args(r, where, source)]
        stack.procs.append(StackProc(f"relay-{i}", argv, base, stop_order=2,
                                 ready_prefix=b"READY relay "))
    for i, b in enumerate(need(data, "broker", list, "") if "broker" in data else []):
        where = f"broker[{i}]"
        settings = _settings(BrokerConfig, b, f"{source}: {where}", BROKER_OWN_KEYS, base)
        need(b, "bind", str, where)
        if "mongrel2" not in b and "mongrel2_db" not in b:
            raise StackError(f"{source}: {where} needs mongrel2 or mongrel2_db")
        # The pools' routes first, as configured routes: a service whose
        # workers are down or crash-looping then gets 503, not 404. The
        # broker's own `route` and `routes` come after them and win.
        argv = [*scale0, "broker", f"--upload-dir={server.upload_dir}",
                *(f"--route={spec}={service}"
                  for spec, service in _routes_for(b["bind"], binds, pool_routes)),
                *to_argv(BrokerConfig, settings)]
        routes: dict[str, Any] = need(b, "routes", dict, where) if "routes" in b else {}
        argv += [f"--route={spec}={service}" for spec, service in routes.items()]
        argv += _args(b, where, source)
        stack.procs.append(StackProc(f"broker-{i}", argv, base, stop_order=1,
                                 ready_prefix=b"READY broker "))
    for i, pool in enumerate(need(data, "pool", list, "") if "pool" in data else []):
        where = f"pool[{i}]"
        interface = pool.get("interface", "wsgi") if isinstance(pool, dict) else "wsgi"
        if interface not in POOL_INTERFACES:
            raise StackError(f"{source}: {where}.interface must be one of "
                             f"{', '.join(POOL_INTERFACES)}, got {interface!r}")
        pool_cls = POOL_INTERFACES[interface]
        settings = _settings(pool_cls, pool, f"{source}: {where}", POOL_OWN_KEYS, base)
        need(pool, "app", str, where)
        need(pool, "connect", list, where)
        # Stack defaults first: the table's own settings come later and win.
        argv = [*scale0, interface, f"--upload-dir={server.upload_dir}",
                *to_argv(pool_cls, settings)]
        paths: list[Any] = need(pool, "routes", list, where) if "routes" in pool else []
        argv += [f"--route={route}" for route in paths]
        argv += _args(pool, where, source)
        # Only its arbiter prints this (an app printing to stdout is passed on).
        stack.procs.append(StackProc(f"pool-{pool.get('service', i)}", argv, base,
                                 ready_prefix=f"READY {interface} ".encode()))
    return stack


STACK_KEYS = ("graceful_timeout", "mongrel2", "relay", "broker", "pool")
RELAY_OWN_KEYS = ("args",)
MONGREL2_KEYS = ("config", "runtime_dir", "http", "uuid")
BROKER_OWN_KEYS = ("routes", "args")  # routes: {"[HOST]/PATH" = "SERVICE"}
POOL_OWN_KEYS = ("routes", "args", "interface")  # routes: ["[HOST]/PATH", ...]
# interface: which command runs the pool, so which settings its table takes.
POOL_INTERFACES: dict[str, type[CommonConfig]] = {"wsgi": WsgiConfig, "asgi": AsgiConfig}


def _known_keys(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in known:
            raise StackError(unknown(where, key, known))


def _settings(cls: type[CommonConfig], table: Any, where: str,
              own: tuple[str, ...], base: Path) -> dict[str, Any]:
    """The table's settings of `cls` (checked; raw values, as written), without the
    stack's own keys. Checked from `base`, the folder the processes run in, so
    that a relative path (a maintenance page) means the same to both."""
    if not isinstance(table, dict):
        raise StackError(f"{where}: must be a table")
    known = [*(f.name for f, _ in specs(cls)), *own]
    _known_keys(table, tuple(known), where)
    settings = {key: value for key, value in table.items() if key not in own}
    try:
        with contextlib.chdir(base):
            from_mapping(cls, settings, where)
    except ConfigError as exc:
        raise StackError(str(exc)) from exc
    return settings


PoolRoutes = list[tuple[tuple[str, ...], list[tuple[str, str]]]]


def _pool_routes(pools: Any) -> PoolRoutes:
    """(connect endpoints, [(route, service)]) of each [[pool]] table; tables
    of the wrong shape are skipped here (read_stack's pool loop reports them)."""
    out: PoolRoutes = []
    for pool in pools if isinstance(pools, list) else []:
        if not isinstance(pool, dict) or not isinstance(pool.get("app"), str):
            continue
        service = pool.get("service") or default_service(pool["app"])
        specs = [r for key in ("routes", "route") if isinstance(pool.get(key), list)
                 for r in pool[key] if isinstance(r, str)]
        connect = pool.get("connect")
        endpoints = tuple(c for c in connect if isinstance(c, str)) if isinstance(
            connect, list) else ()
        out.append((endpoints, [(spec, str(service)) for spec in specs]))
    return out


def _routes_for(bind: str, binds: list[str], pool_routes: PoolRoutes) -> list[tuple[str, str]]:
    """The routes of the pools that connect to the broker bound at `bind`. A
    pool that reaches none of the stack's brokers (`binds`) as far as the
    endpoints tell (another name for the same host) gives them to every one."""
    out: list[tuple[str, str]] = []
    for endpoints, routes in pool_routes:
        if any(_reaches(bind, e) for e in endpoints) or not any(
                _reaches(b, e) for b in binds for e in endpoints):
            out += routes
    return out


def _reaches(bind: str, endpoint: str) -> bool:
    """A worker connecting to `endpoint` reaches a broker bound at `bind`: the
    same endpoint, or the same port when the broker binds every interface."""
    host, _, port = bind.rpartition(":")
    return endpoint == bind or (host.endswith(("//*", "//0.0.0.0"))
                                and endpoint.rpartition(":")[2] == port)


def _args(table: dict[str, Any], where: str, source: str) -> list[str]:
    args = table.get("args", [])
    if not isinstance(args, list):
        raise StackError(f"{source}: {where}.args must be a list")
    return [str(a) for a in args]


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(value)
    return float(value)
