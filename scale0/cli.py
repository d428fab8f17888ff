"""`scale0 ...` subcommands. The only place that sets up logging."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, cast

from . import __version__
from . import protocol as p
from .broker import Broker, LinkSpec
from .dispatch import DispatchSettings
from .routing import parse_route

log = logging.getLogger("scale0")

LOG_FORMAT = "%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=LOG_FORMAT, stream=sys.stderr)


def _ready(line: str) -> None:
    """Readiness is announced on stdout, one line, for supervisors and tests."""
    print(line, flush=True)


def _positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text}")
        return value
    return parse


def _route_to_service(text: str) -> tuple[str, str]:
    spec, sep, service = text.rpartition("=")
    if not sep or not spec or not service:
        raise argparse.ArgumentTypeError(f"expected [HOST]/PATH=SERVICE, got {text!r}")
    try:
        parse_route(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return spec, service


def _service_seconds(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not sep or not name or seconds <= 0:
        raise argparse.ArgumentTypeError(f"expected SERVICE=SECONDS (> 0), got {text!r}")
    return name, seconds


def _service_page(text: str) -> tuple[str, bytes]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected SERVICE=FILE, got {text!r}")
    try:
        with open(path, "rb") as page:
            return name, page.read()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"maintenance page for {name}: {exc}") from exc


def _metrics_address(text: str) -> tuple[str, int] | None:
    from .status import parse_address

    try:
        return parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"], help="default: info")
    parser.add_argument("--heartbeat", type=_positive(float), default=1.0, metavar="SECONDS",
                        help="heartbeat interval (default: 1.0)")
    parser.add_argument("--liveness", type=_positive(int), default=3,
                        help="heartbeats missed before a peer is dead (default: 3)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scale0", description=__doc__)
    parser.add_argument("--version", action="version", version=f"scale0 {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("broker", help="run a broker: a Mongrel2 handler that balances workers")
    b.add_argument("--mongrel2", action="append", type=LinkSpec.parse, required=True,
                   metavar="SEND_SPEC,RECV_SPEC[,RECV_IDENT]",
                   help="a Mongrel2 handler to serve (repeatable)")
    b.add_argument("--bind", default="tcp://127.0.0.1:6780",
                   help="ROUTER endpoint for workers (default: tcp://127.0.0.1:6780)")
    b.add_argument("--route", action="append", type=_route_to_service, default=[],
                   metavar="[HOST]/PATH=SERVICE", help="a route-table entry (repeatable)")
    b.add_argument("--queue-size", type=_positive(int), default=1024,
                   help="requests waiting per service (default: 1024)")
    b.add_argument("--queue-timeout", type=_positive(float), default=10.0, metavar="SECONDS",
                   help="longest wait for a free worker before 503 (default: 10)")
    b.add_argument("--request-timeout", type=_positive(float), default=60.0, metavar="SECONDS",
                   help="longest wait for a worker's reply before 504 (default: 60)")
    b.add_argument("--retry-after", type=_positive(int), default=5, metavar="SECONDS",
                   help="Retry-After sent with 503 (default: 5)")
    b.add_argument("--max-body", type=_positive(int), default=1 << 30, metavar="BYTES",
                   help="larger request bodies get 413 (default: 1 GiB)")
    b.add_argument("--service-timeout", action="append", type=_service_seconds, default=[],
                   metavar="SERVICE=SECONDS", help="request timeout of one service (repeatable)")
    b.add_argument("--maintenance-page", action="append", type=_service_page, default=[],
                   metavar="SERVICE=FILE",
                   help="HTML sent with the 503 while no worker of SERVICE is connected")
    b.add_argument("--graceful-timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                   help="on SIGTERM, time to finish requests in progress (default: 30)")
    b.add_argument("--keepalive", type=_positive(float), default=30.0, metavar="SECONDS",
                   help="send Mongrel2 a ctl keep-alive for requests waiting this long, and "
                        "again as often, so its idle killer (min_ping) spares them "
                        "(default: 30)")
    # Metrics and status page (scale0/status.py): the broker's one option for them.
    b.add_argument("--metrics", type=_metrics_address, default=None, metavar="[HOST:]PORT",
                   help="serve Prometheus /metrics and the status page / here, e.g. "
                        "127.0.0.1:6790 (HOST defaults to 127.0.0.1; default: off)")
    _add_common(b)
    b.set_defaults(func=cmd_broker)

    w = sub.add_parser("wsgi", help="serve a WSGI app as Scale0 workers")
    w.add_argument("app", metavar="MODULE:APP", help="e.g. examples.hello:app")
    w.add_argument("--connect", action="append", required=True, metavar="ENDPOINT",
                   help="broker endpoint (repeatable)")
    w.add_argument("--service", help="service name (default: the app's module name)")
    w.add_argument("--route", action="append", default=[], metavar="[HOST]/PATH",
                   help="route this service serves (repeatable; '/api' means any host)")
    w.add_argument("--processes", type=_positive(int), default=1,
                   help="pre-forked worker processes (default: 1)")
    w.add_argument("--threads", type=_positive(int), default=1,
                   help="requests handled at once per process (default: 1)")
    w.add_argument("--upload-dir", metavar="DIR",
                   help="Mongrel2's upload.temp_store folder, for large request bodies")
    w.add_argument("--graceful-timeout", type=_positive(float), default=30.0, metavar="SECONDS",
                   help="time to finish in-flight requests on SIGTERM (default: 30)")
    w.add_argument("--chdir", metavar="DIR", help="change to DIR before loading the app")
    _add_common(w)
    w.set_defaults(func=cmd_wsgi)

    u = sub.add_parser("up", help="start and supervise Mongrel2, brokers and worker pools")
    u.add_argument("--config", required=True, help="a TOML stack file, e.g. scale0.toml")
    u.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default: info")
    u.add_argument("--exit-with-parent", action="store_true",
                   help="stop the stack when the parent process dies (as under `make run`)")
    u.set_defaults(func=cmd_up)
    return parser


def cmd_broker(args: argparse.Namespace) -> int:
    settings = DispatchSettings(
        heartbeat_s=args.heartbeat, liveness=args.liveness, queue_size=args.queue_size,
        queue_timeout_s=args.queue_timeout, request_timeout_s=args.request_timeout,
        retry_after_s=args.retry_after, max_body_bytes=args.max_body,
        keepalive_s=args.keepalive, routes=tuple(args.route),
        service_timeouts=tuple(args.service_timeout),
        maintenance_pages=tuple(args.maintenance_page))
    broker = Broker(args.mongrel2, args.bind, settings,
                    graceful_timeout_s=args.graceful_timeout, metrics=args.metrics)
    broker.install_signal_handlers()
    try:
        broker.start()
    except Exception as exc:
        log.error("cannot start the broker: %s", exc)
        return 2
    _ready(broker.ready_line())
    try:
        broker.run()
    finally:
        broker.close()
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
                raise TypeError(f"{spec}: {name} is not a WSGI callable")
            return obj
    raise AttributeError(f"{spec}: no {' or '.join(names)} in module {module_name}")


def cmd_wsgi(args: argparse.Namespace) -> int:
    from .supervise import BOOT_FAILED, Pool
    from .worker import ReplyStream, Worker, WorkerSettings
    from .wsgi import WsgiSettings, run_wsgi

    if args.chdir:
        os.chdir(args.chdir)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    service = args.service or args.app.partition(":")[0].rsplit(".", 1)[-1]
    for route in args.route:
        try:
            parse_route(route)
        except ValueError as exc:
            log.error("%s", exc)
            return 2
    routes = tuple(args.route)
    worker_settings = WorkerSettings(
        connect=tuple(args.connect), services=(p.ServiceSpec(service, routes),),
        capacity=args.threads, heartbeat_s=args.heartbeat, liveness=args.liveness,
        graceful_timeout_s=args.graceful_timeout)
    wsgi_settings = WsgiSettings(
        upload_dir=os.path.abspath(args.upload_dir) if args.upload_dir else None,
        multithread=args.threads > 1, multiprocess=args.processes > 1)

    def serve() -> int:
        try:
            app = load_app(args.app)
        except Exception:
            log.exception("cannot load %s", args.app)
            return BOOT_FAILED

        def handle(event: Any, script_name: str, path_info: str, stream: ReplyStream) -> bool:
            info = run_wsgi(app, event, script_name=script_name, path_info=path_info,
                            send=stream.send, last=stream.last, settings=wsgi_settings)
            return info.close

        worker = Worker(handle, worker_settings)
        worker.install_signal_handlers()
        return worker.run()

    _ready(f"READY wsgi pid={os.getpid()} app={args.app} service={service} "
           f"processes={args.processes} threads={args.threads}")
    return Pool(serve, args.processes, graceful_timeout_s=args.graceful_timeout + 5,
                name=f"wsgi[{service}]").run()


def cmd_up(args: argparse.Namespace) -> int:
    from .stack import Stack, StackError, exit_with_parent

    if args.exit_with_parent:
        exit_with_parent()
    try:
        stack = Stack.from_file(args.config)
    except StackError as exc:
        log.error("%s", exc)
        return 2
    return stack.run(_ready)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    return cast(int, args.func(args))


if __name__ == "__main__":
    sys.exit(main())
