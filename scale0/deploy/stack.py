"""`scale0 up`: start and watch Mongrel2, brokers and worker pools from one TOML file.

Each process runs in its own session, so a Ctrl-C at the terminal reaches
only this supervisor, which then stops everything in order: worker pools
first (SIGTERM: they finish what they have while brokers and Mongrel2 still
deliver their replies), then brokers, then relays, then Mongrel2; SIGKILL
after the grace period. A second SIGINT/SIGTERM forces the stop: SIGKILL to
every process group (a pool's forked workers too), at once. If this
supervisor itself dies (even by SIGKILL), every child gets SIGTERM from the
kernel (pool/lifeline.py: PR_SET_PDEATHSIG; Mongrel2 as root through the lifeline
watcher) and stops. SIGHUP reloads every worker pool (forwarded to each
pool's arbiter, which starts new processes and then retires the old ones,
pool/supervise.py) and the authorized keys of every broker and relay (forwarded
to them); they and Mongrel2 keep running.

A process that dies is restarted on the crash-loop policy of the worker
pools (core/backoff.py): a delay that doubles per quick crash, with jitter,
up to a cap; quick crashes in a row are logged as a crash loop. The pid file
never outlives the stack. Signal handlers only count (pool/runloop.py); the
loop sleeps on the wake-up pipe, which SIGCHLD (a child exited) and the stop
and reload signals write to, or until the next restart is due.

READY: `scale0 up` prints its READY line once every process it started is
ready, each by its own signal: Mongrel2 accepts TCP on its HTTP address, and
each relay, broker and pool has printed its READY line (read from its stdout,
which is a pipe to us, at each turn of the loop; what else it prints there is
passed on to our stdout, and its READY line is logged instead). A pool's
READY means its processes are WELCOMEd by their brokers (pool/supervise.py),
so the stack's READY means requests are served. It is printed once; a
process that is never ready (an app that cannot boot) means no READY, and a
warning after NOT_READY_AFTER_S names what is waited for.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable
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
from scale0.deploy.m2server import (
    Mongrel2Error,
    Mongrel2Server,
    raise_open_files_limit,
    server_uuid,
)
from scale0.pool import lifeline
from scale0.pool.runloop import RunLoop

log = logging.getLogger(__name__)

CHECK_EVERY_S = 1.0  # the loop's longest sleep (child exits and signals wake it sooner)
READY_POLL_S = 0.1  # until every process is ready: how often to look
NOT_READY_AFTER_S = 30.0  # then say which processes the READY line waits for


class StackError(ConfigError):
    """A stack file that cannot be used; the message names the file and key."""


@dataclass(slots=True)
class _Proc:
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
class Stack:
    mongrel2: Mongrel2Server
    http_addr: tuple[str, int]
    procs: list[_Proc] = field(default_factory=list)
    graceful_timeout_s: float = 30.0
    _loop: RunLoop | None = None  # made in run(): wake-up pipe, signal counts, stop

    @classmethod
    def from_file(cls, path: str | Path) -> Stack:
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise StackError(f"{path}: {exc}") from exc
        base = path.resolve().parent
        return cls.from_dict(data, base, str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], base: Path, source: str = "<config>") -> Stack:
        """Each [[broker]] and [[pool]] table holds settings of `scale0 broker` /
        `scale0 wsgi` (scale0/config/, checked here so that a typo names this file and
        key) plus the stack's own keys: `routes` and `args` (extra arguments), and
        for a pool `interface`: "wsgi" (the default) or "asgi" (`scale0 asgi`)."""
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
        stack = cls(server, (host, int(port)), graceful_timeout_s=graceful_timeout_s)
        stack.procs.append(_Proc("mongrel2", server.supervised_argv(), runtime,
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
            stack.procs.append(_Proc(f"relay-{i}", argv, base, stop_order=2,
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
            stack.procs.append(_Proc(f"broker-{i}", argv, base, stop_order=1,
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
            stack.procs.append(_Proc(f"pool-{pool.get('service', i)}", argv, base,
                                     ready_prefix=f"READY {interface} ".encode()))
        return stack

    def run(self, ready: Callable[[str], None]) -> int:
        raise_open_files_limit()  # inherited by Mongrel2: one descriptor per client connection
        try:
            self.mongrel2.prepare()
        except Mongrel2Error as exc:
            log.error("%s", exc)
            return 2
        loop = self._loop = RunLoop()
        loop.install_signals(count=(signal.SIGHUP, signal.SIGCHLD))
        announced = False
        started = time.monotonic()
        waited_long = False
        try:
            while not loop.stop.stopping:
                now = time.monotonic()
                loop.take(signal.SIGCHLD)  # it only woke us: _watch polls every process
                if loop.take(signal.SIGHUP):
                    self._reload()
                for proc in self.procs:
                    self._read_stdout(proc)
                    self._watch(proc, now)
                if not announced:
                    waiting = self._not_ready()
                    if not waiting:
                        announced = True
                        ready(f"READY up http://{self.http_addr[0]}:{self.http_addr[1]}/")
                    elif not waited_long and now - started > NOT_READY_AFTER_S:
                        waited_long = True
                        log.warning("not ready after %.0fs: waiting for %s",
                                    NOT_READY_AFTER_S, ", ".join(waiting))
                wake = min((p.backoff.retry_at for p in self.procs if p.popen is None),
                           default=now + CHECK_EVERY_S)
                wake = min(wake, now + (CHECK_EVERY_S if announced else READY_POLL_S))
                loop.wait(wake - time.monotonic())
        finally:
            self._stop_all()
            self.mongrel2.remove_pid_file()
            loop.close()
        return 0

    def _not_ready(self) -> list[str]:
        """The processes not ready yet (Mongrel2: until it accepts TCP)."""
        for proc in self.procs:
            if not proc.ready_prefix and not proc.ready and proc.popen is not None:
                proc.ready = _accepts(self.http_addr)
        return [proc.name for proc in self.procs if not proc.ready]

    def _read_stdout(self, proc: _Proc) -> None:
        """Take the READY line out of what `proc` printed; pass the rest on."""
        pipe = proc.popen.stdout if proc.popen is not None else None
        if pipe is None:
            return
        while True:
            try:
                chunk = os.read(pipe.fileno(), 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                break
            proc.out += chunk
        *lines, proc.out = proc.out.split(b"\n")
        for line in lines:
            if proc.ready_prefix and line.startswith(proc.ready_prefix) and not proc.ready:
                proc.ready = True
                log.info("%s is ready: %s", proc.name, line.decode(errors="replace"))
            else:
                with contextlib.suppress(OSError, ValueError):  # our stdout is gone
                    sys.stdout.buffer.write(line + b"\n")
                    sys.stdout.flush()

    def _reload(self) -> None:
        """SIGHUP to each pool's arbiter (not its group: its workers ignore HUP,
        and a signal to the group would reach them too), and to each broker
        and relay: they re-read their authorized keys (auth/zap.py) and go on.
        Never to Mongrel2."""
        for proc in self.procs:
            if proc.name != "mongrel2" and proc.popen is not None \
                    and proc.popen.poll() is None:
                log.info("reloading %s (SIGHUP to pid %d)", proc.name, proc.popen.pid)
                proc.popen.send_signal(signal.SIGHUP)

    def _watch(self, proc: _Proc, now: float) -> None:
        if proc.popen is not None:
            code = proc.popen.poll()
            if code is None:
                return
            self._read_stdout(proc)  # what it printed before it exited
            if proc.popen.stdout is not None:
                proc.popen.stdout.close()
            proc.popen, proc.ready, proc.out = None, False, b""
            _kill_group(proc.pid)  # what it left behind, e.g. a dead pool's workers
            # Every exit here is unexpected (we stop nothing while running): a crash.
            backoff = proc.backoff
            delay = backoff.exited(now, now - proc.started_at)
            if backoff.crash_loop:
                log.error("%s: crash loop: exited with %s, crash %d in a row, each within "
                          "%.0fs of its start; restarting in %.1fs", proc.name, code,
                          backoff.crashes, backoff.policy.healthy_s, delay)
            else:
                log.error("%s exited with %s; restarting in %.1fs", proc.name, code, delay)
            if proc.name == "mongrel2":
                self.mongrel2.remove_pid_file()
            return
        if proc.backoff.due(now):
            # Its own session (a terminal's Ctrl-C reaches only us), and SIGTERM
            # when we die, even by SIGKILL (pool/lifeline.py).
            proc.popen = subprocess.Popen(proc.argv, cwd=proc.cwd, start_new_session=True,
                                          preexec_fn=lifeline.preexec(),
                                          stdout=subprocess.PIPE if proc.ready_prefix else None)
            if proc.popen.stdout is not None:
                os.set_blocking(proc.popen.stdout.fileno(), False)
            proc.pid = proc.popen.pid
            proc.started_at = now
            log.info("started %s (pid %d)", proc.name, proc.popen.pid)

    def _stop_all(self) -> None:
        # Pools first: they finish in-flight requests while brokers and Mongrel2
        # still carry the replies; then brokers (each hands its link back to
        # the relay); then relays; Mongrel2 last. Each process group is
        # SIGKILLed after the grace period, or at once on a second signal, so
        # nothing a process forked outlives the stack.
        loop = self._loop
        assert loop is not None
        if not loop.stop.stopping:  # an exception ended the loop: a signal from now on forces
            loop.stop.request(force=False)
        for order in (0, 1, 2, 3):
            group = [proc for proc in self.procs if proc.stop_order == order]
            for proc in group:
                if proc.popen is not None and proc.popen.poll() is None:
                    proc.popen.send_signal(proc.stop_signal)
            deadline = time.monotonic() + self.graceful_timeout_s
            while any(p.popen is not None and p.popen.poll() is None for p in group):
                now = time.monotonic()
                if loop.stop.forced or now >= deadline:
                    break
                for proc in self.procs:  # a full pipe would stall a stopping process
                    self._read_stdout(proc)
                # A child's exit (SIGCHLD) or a signal wakes us; its output at least each second.
                loop.wait(min(deadline - now, CHECK_EVERY_S))
            for proc in group:
                if proc.popen is None:
                    continue
                if proc.popen.poll() is None:
                    log.warning("%s: %s: killing it", proc.name, "forced stop"
                                if loop.stop.forced else "did not stop in time")
                _kill_group(proc.pid)
                proc.popen.wait()
                if proc.popen.stdout is not None:
                    proc.popen.stdout.close()
                proc.popen = None


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
    of the wrong shape are skipped here (from_dict's pool loop reports them)."""
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


def exit_with_parent() -> None:
    """Get SIGTERM when the parent dies (Linux PR_SET_PDEATHSIG), e.g. when the
    `make` that started us is killed: make does not forward signals."""
    if not lifeline.supported():
        log.warning("--exit-with-parent is not supported here")
        return
    parent = os.getppid()
    if parent == 1:  # the parent died before we could ask
        os.kill(os.getpid(), signal.SIGTERM)
        return
    lifeline.die_with_parent(parent)


def _kill_group(pgid: int) -> None:
    """SIGKILL a process group (each process runs in its own session: pgid = pid)."""
    if pgid > 0:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _accepts(addr: tuple[str, int]) -> bool:
    try:
        with socket.create_connection(addr, timeout=0.2):
            return True
    except OSError:
        return False
