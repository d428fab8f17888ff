"""`scale0 ...` subcommands. The only place that sets up logging."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import logging.handlers
import os
import queue
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

from scale0 import __version__, config
from scale0.auth.keys import CurveKeys, KeyFileError, generate
from scale0.auth.zap import CurveServer
from scale0.core.dispatch import DispatchSettings
from scale0.deploy import m2db, malloc
from scale0.net.broker import Broker, LinkSpec
from scale0.ops import ctl
from scale0.ops.accesslog import AccessLog, AccessLogError
from scale0.wire import s0w1 as p

log = logging.getLogger("scale0")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


@contextlib.contextmanager
def _logging_off_the_loop() -> Iterator[None]:
    """For the single-process event loops (broker, relay): log records go
    through a queue to a thread that formats and writes them, so a burst of
    warnings (a flood of malformed input) never blocks the loop on stderr.
    Not for forking commands: a listener thread does not survive fork()."""
    root = logging.getLogger()
    handlers = root.handlers[:]
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    listener = logging.handlers.QueueListener(records, *handlers, respect_handler_level=True)
    root.handlers = [logging.handlers.QueueHandler(records)]
    listener.start()
    try:
        yield
    finally:
        listener.stop()  # writes what is still queued
        root.handlers = handlers


def _ready(line: str) -> None:
    """Readiness is announced on stdout, one line, for supervisors and tests."""
    print(line, flush=True)


def build_parser() -> argparse.ArgumentParser:
    """Every flag of broker, wsgi, asgi and up is generated from its settings class
    (scale0/config/); `main` merges them with the --config file and SCALE0_* env."""
    parser = argparse.ArgumentParser(prog="scale0", description=__doc__)
    parser.add_argument("--version", action="version", version=f"scale0 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run a broker: a Mongrel2 handler that balances workers")
    config.add_arguments(b, config.BrokerConfig)
    b.set_defaults(func=cmd_broker, settings=config.BrokerConfig)

    w = sub.add_parser("wsgi", help="serve a WSGI app as Scale0 workers")
    config.add_arguments(w, config.WsgiConfig)
    w.set_defaults(func=cmd_wsgi, settings=config.WsgiConfig)

    a = sub.add_parser("asgi", help="serve an ASGI app (HTTP, lifespan, WebSockets) as "
                                    "Scale0 workers")
    config.add_arguments(a, config.AsgiConfig)
    a.set_defaults(func=cmd_asgi, settings=config.AsgiConfig)

    ctl.add_parser(sub)  # `scale0 ctl`: a client, not a settings-driven process

    k = sub.add_parser("keygen", help="write a CURVE key pair: DIR/NAME.key (public, for "
                                      "--authorized-keys, --broker-key, --relay-key) and "
                                      "DIR/NAME.key_secret (for --curve-secret)")
    k.add_argument("name", metavar="NAME", help="the key's name (shown in logs and refusals)")
    k.add_argument("--dir", required=True, metavar="DIR", help="where to write the two files")
    k.add_argument("--services", metavar="A,B", default="",
                   help="the only services a worker with this key may announce "
                        "(default: any)")
    k.set_defaults(func=cmd_keygen, settings=None, log_level="warning")

    r = sub.add_parser("relay", help="share one Mongrel2 handler between brokers, losing "
                                     "nothing when a broker leaves (see scale0/net/relay.py)")
    config.add_arguments(r, config.RelayConfig)
    r.set_defaults(func=cmd_relay, settings=config.RelayConfig)

    u = sub.add_parser("up", help="start and supervise Mongrel2, brokers and worker pools")
    # --config here is the stack file, not a settings file (hence dest stack_file).
    u.add_argument("--config", dest="stack_file", required=True, metavar="FILE",
                   help="a TOML stack file, e.g. scale0.toml")
    config.add_arguments(u, config.UpConfig, settings_file=False)
    u.set_defaults(func=cmd_up, settings=config.UpConfig)
    return parser


def _links(cfg: config.BrokerConfig) -> list[LinkSpec]:
    """--mongrel2 links, then those read from --mongrel2-db."""
    found = list(cfg.mongrel2)
    if cfg.mongrel2_db is not None:
        for h in m2db.links(cfg.mongrel2_db, cfg.handler):
            log.info("serving Mongrel2 handler %s from %s: %s, %s", h.send_ident,
                     cfg.mongrel2_db, h.send_spec, h.recv_spec)
            found.append(LinkSpec(h.send_spec, h.recv_spec, h.recv_ident.encode()))
    return list(dict.fromkeys(found))  # the same handler twice would be one link


def cmd_broker(cfg: config.BrokerConfig, _: argparse.Namespace) -> int:
    try:
        links = _links(cfg)
    except m2db.M2DBError as exc:
        return _usage_error("broker", str(exc))
    upload_dir = os.path.abspath(cfg.upload_dir) if cfg.upload_dir else None
    # Each setting goes to its field by its declared name (config.build).
    settings = config.build(DispatchSettings, cfg, upload_dir=upload_dir,
                            inline_body_max=cfg.inline_body_max if upload_dir else 0)
    try:
        curve = (CurveServer.from_files(cfg.curve_secret, cfg.authorized_keys, b"workers")
                 if cfg.curve_secret else None)
        relay_curve = (CurveKeys.load(cfg.curve_secret, cfg.relay_key)
                       if cfg.curve_secret and cfg.relay_key else None)
    except KeyFileError as exc:
        return _usage_error("broker", str(exc))
    broker = config.build(Broker, cfg, links=links, settings=settings,
                          control="" if cfg.control == "off" else cfg.control,
                          curve=curve, relay_curve=relay_curve)
    if upload_dir is not None and cfg.inline_body_max:  # net/spool_files.py: bodies into requests
        broker.dispatcher.read_spooled = partial(_read_spooled, upload_dir)
    access: AccessLog | None = None
    if cfg.access_log:
        access = AccessLog(cfg.access_log, cfg.access_log_format)
        try:
            access.start()
        except AccessLogError as exc:
            return _usage_error("broker", str(exc))
        broker.add_done_sink(access.sink)
    try:
        return _serve(broker, "broker")
    finally:
        if access is not None:
            access.close()


def cmd_relay(cfg: config.RelayConfig, _: argparse.Namespace) -> int:
    from scale0.net.relay import Relay

    recv_spec, recv_ident = cfg.mongrel2_recv or ("", b"")
    try:
        curve = (CurveServer.from_files(cfg.curve_secret, cfg.authorized_keys, b"brokers")
                 if cfg.curve_secret else None)
    except KeyFileError as exc:
        return _usage_error("relay", str(exc))
    return _serve(config.build(Relay, cfg, recv_spec=recv_spec, recv_ident=recv_ident,
                               curve=curve), "relay")


class _Service(Protocol):
    def install_signal_handlers(self) -> None: ...
    def start(self) -> None: ...
    def ready_line(self) -> str: ...
    def run(self) -> None: ...
    def close(self) -> None: ...


def _serve(service: _Service, what: str) -> int:
    """Start, announce READY, run until a signal stops it, close."""
    with _logging_off_the_loop():
        return _run(service, what)


def _run(service: _Service, what: str) -> int:
    service.install_signal_handlers()
    try:
        service.start()
    except Exception as exc:
        log.error("cannot start the %s: %s", what, exc)
        return 2
    _ready(service.ready_line())
    try:
        service.run()
    finally:
        service.close()
    return 0


def load_app(spec: str) -> Any:
    """'module:attr', 'module:factory()' or 'module' (app `application` or `app`)."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    call = attr.endswith("()")
    names = [attr.removesuffix("()")] if attr else ["application", "app"]
    for name in names:
        obj = getattr(module, name, None)
        if obj is not None:
            obj = obj() if call else obj
            if not callable(obj):
                raise TypeError(f"{spec}: {name} is not callable")
            return obj
    raise AttributeError(f"{spec}: no {' or '.join(names)} in module {module_name}")


def _read_spooled(upload_dir: str, upload_path: bytes, max_bytes: int) -> bytes | None:
    from scale0.net.spool_files import read

    return read(upload_path, upload_dir, max_bytes)


# ---- worker pools: `scale0 wsgi` and `scale0 asgi` -------------------------
#
# One path for both: the settings are resolved and checked in the arbiter
# (before any fork), each child imports the app and runs the interface's
# worker, and READY is printed by the arbiter once every process of the pool
# is WELCOMEd (pool/supervise.py `on_ready`; worker/process.py says when a
# process is). An app that cannot be imported gives one ERROR line in its
# child, BOOT_FAILED, and the pool exits 3 without READY.

Runner = Callable[[Any], int]  # runs a loaded app as this process's worker
PoolSettings = config.WsgiConfig | config.AsgiConfig


def _wsgi_runner(cfg: PoolSettings, service: str, curve: CurveKeys | None,
                 upload_dir: str | None) -> Runner:
    from scale0.core.forwarded import trust
    from scale0.pool.childstate import current as child_state
    from scale0.worker.process import ReplyStream, Worker, WorkerSettings
    from scale0.worker.wsgi import WsgiSettings, run_wsgi

    assert isinstance(cfg, config.WsgiConfig)
    worker_settings = config.build(
        WorkerSettings, cfg, services=(p.ServiceSpec(service, cfg.route),), curve=curve,
        # It reads streamed bodies (upload.stream: BODY/READ, core/bodystream.py), and
        # spooled ones from Mongrel2's disk if it has it: then none are inlined.
        meta=(("bodies", "stream"), *((("uploads", "file"),) if upload_dir else ())))
    wsgi_settings = WsgiSettings(
        upload_dir=upload_dir, multithread=cfg.threads > 1, multiprocess=cfg.processes > 1,
        forwarded=trust(cfg.forwarded_allow_ips, cfg.client_address_header))

    def run(app: Any) -> int:
        def handle(event: Any, script_name: str, path_info: str, stream: ReplyStream) -> bool:
            info = run_wsgi(app, event, script_name=script_name, path_info=path_info,
                            send=stream.send, last=stream.last, settings=wsgi_settings,
                            body=stream.body)
            return info.close

        worker = Worker(handle, worker_settings, state=child_state())
        worker.install_signal_handlers()
        return worker.run()

    return run


def _asgi_runner(cfg: PoolSettings, service: str, curve: CurveKeys | None,
                 upload_dir: str | None) -> Runner:
    from scale0.core.forwarded import trust
    from scale0.pool.childstate import current as child_state
    from scale0.worker.asgi_loop import AsgiSettings, AsgiWorker, event_loop_policy

    assert isinstance(cfg, config.AsgiConfig)
    settings = config.build(
        AsgiSettings, cfg, services=(p.ServiceSpec(service, cfg.route),), upload_dir=upload_dir,
        forwarded=trust(cfg.forwarded_allow_ips, cfg.client_address_header), curve=curve)

    def run(app: Any) -> int:
        log.debug("ASGI worker on the %s event loop", event_loop_policy())
        return AsgiWorker(app, settings, state=child_state()).run()

    return run


@dataclass(frozen=True, slots=True)
class _Interface:
    """What differs between `scale0 wsgi` and `scale0 asgi`."""

    command: str
    runner: Callable[[PoolSettings, str, CurveKeys | None, str | None], Runner]
    per_process: str  # the setting of requests at once per process, shown in READY


_INTERFACES = {"wsgi": _Interface("wsgi", _wsgi_runner, "threads"),
               "asgi": _Interface("asgi", _asgi_runner, "concurrency")}


def cmd_wsgi(cfg: config.WsgiConfig, _: argparse.Namespace) -> int:
    return _serve_pool(_INTERFACES["wsgi"], cfg)


def cmd_asgi(cfg: config.AsgiConfig, _: argparse.Namespace) -> int:
    return _serve_pool(_INTERFACES["asgi"], cfg)


def _serve_pool(interface: _Interface, cfg: PoolSettings) -> int:
    from scale0.pool.supervise import BOOT_FAILED, Pool

    # Relative paths in settings mean the working directory they were given in.
    upload_dir = os.path.abspath(cfg.upload_dir) if cfg.upload_dir else None
    if cfg.chdir:
        os.chdir(cfg.chdir)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    service = cfg.service or config.default_service(cfg.app)
    try:
        curve = (CurveKeys.load(cfg.curve_secret, cfg.broker_key)
                 if cfg.curve_secret and cfg.broker_key else None)
    except KeyFileError as exc:
        return _usage_error(interface.command, str(exc))
    run = interface.runner(cfg, service, curve, upload_dir)

    def serve() -> int:  # in each forked child
        try:
            app = load_app(cfg.app)
        except Exception as exc:
            log.error("cannot load %s: %s", cfg.app, _one_line(exc))
            log.debug("cannot load %s", cfg.app, exc_info=True)
            return BOOT_FAILED
        return run(app)

    line = (f"READY {interface.command} pid={os.getpid()} app={cfg.app} service={service} "
            f"processes={cfg.processes} {interface.per_process}="
            f"{getattr(cfg, interface.per_process)}")
    # Its graceful timeout is the workers' own plus 5 s: they drain first,
    # the arbiter SIGKILLs after.
    pool = config.build(Pool, cfg, target=serve, size=cfg.processes,
                        name=f"{interface.command}[{service}]",
                        graceful_timeout_s=cfg.graceful_timeout + 5,
                        on_ready=partial(_ready, line))
    return pool.run()


def _one_line(exc: BaseException) -> str:
    """'TypeError: message (at file.py:12)': the exception and the app's line
    it was raised at (the innermost frame outside importlib)."""
    where = ""
    tb = exc.__traceback__
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if "importlib" not in name and not name.endswith("scale0/cli.py"):
            where = f" (at {name}:{tb.tb_lineno})"
        tb = tb.tb_next
    if isinstance(exc, SyntaxError):
        where = ""  # its text names the file and line
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}{where}"


def cmd_keygen(args: argparse.Namespace) -> int:
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    try:
        public, secret = generate(args.name, args.dir, services)
    except (KeyFileError, OSError) as exc:
        return _usage_error("keygen", str(exc))
    print(f"{public}\n{secret}")
    return 0


def cmd_up(cfg: config.UpConfig, args: argparse.Namespace) -> int:
    from scale0.deploy.stack import Stack, exit_with_parent

    if cfg.exit_with_parent:
        exit_with_parent()
    try:
        stack = Stack.from_file(args.stack_file)
    except config.ConfigError as exc:  # a StackError: the message names file and key
        log.error("%s", exc)
        return 2
    return stack.run(_ready)


def _usage_error(command: str, message: str) -> int:
    """A bad setting: one line on stderr and exit status 2 (as argparse does)."""
    print(f"scale0 {command}: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "settings", None) is None:  # `scale0 ctl`
        _setup_logging(args.log_level)
        return cast(int, args.func(args))
    try:
        cfg = config.resolve(args.settings, args, os.environ)
    except config.ConfigError as exc:
        return _usage_error(args.command, str(exc))
    _setup_logging(cfg.log_level)
    malloc.tune_this_process(os.environ)  # Large bodies stay mapped; before threads start.
    for warning in config.env_warnings(os.environ, *config.COMMANDS.values()):
        log.warning("%s", warning)
    return cast(int, args.func(cfg, args))


if __name__ == "__main__":
    sys.exit(main())
