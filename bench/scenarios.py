"""The Mongrel2 stacks measured, each with its own Mongrel2 on free ports in a temp folder.

- direct: Mongrel2 (download.flow_control=0) -> bench.direct_handler (one
  Python process answering itself).
- scale0: Mongrel2 -> `scale0 broker` -> `scale0 wsgi examples.hello:app`:
  one broker, one pool of processes=2 threads=4, download.flow_control=1
  (tests/mongrel2_helpers.py config_text sets it).
- scale0+relay: the same with `scale0 relay` between Mongrel2 and the broker,
  the shape of scale0.toml's hello stack (what `make run` starts).
- scale0+relay fc-off: the same with Mongrel2's download.flow_control=0.
- scale0+relay no-prefetch: the same with the workers' --prefetch 0 (how it was
  before prefetch: a worker holds only the request it runs).
- scale0+relay-replies: scale0+relay with the replies through the relay too
  (broker linked as relay+ENDPOINT alone, relay started with --mongrel2-recv).
- scale0 asgi: Mongrel2 -> relay -> broker -> `scale0 asgi
  examples.asgi_hello:app --processes 2 --concurrency 100`.

The peers (nginx -> gunicorn, nginx -> granian) are in bench.peers.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from scale0.deploy.m2server import Mongrel2Server
from tests.mongrel2_helpers import config_text

from .procs import (
    BenchError,
    Proc,
    WaitTimeout,
    answers_200,
    children,
    descendants,
    free_port,
    wait_until,
)

ROOT = Path(__file__).resolve().parents[1]
SENDER = "5ca1e000-0000-4000-8000-00000000be01"
M2_UUID = "5ca1e000-0000-4000-8000-00000000be0a"
READY_TIMEOUT_S = 30.0
POOL_PROCESSES = 2
POOL_THREADS = 4
ASGI_CONCURRENCY = 100  # per process: above the 128 connections / 2 processes of the top case


@dataclass(slots=True)
class Scenario:
    name: str
    http_port: int
    procs: list[Proc] = field(default_factory=list)  # in start order

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def ws_url(self, path: str) -> str:
        return f"ws://127.0.0.1:{self.http_port}{path}"

    def check_alive(self) -> None:
        for proc in self.procs:
            if not proc.alive():
                raise BenchError(f"{self.name}: {proc.name} exited with {proc.popen.returncode}"
                                 f"\n{self.log_tails()}")

    def log_tails(self) -> str:
        return "\n".join(proc.log_tail() for proc in self.procs)

    def wait_ready(self, expected_workers: int = 0) -> None:
        """HTTP 200 from /, then (scale0) every pre-forked worker process up."""
        try:
            wait_until(lambda: answers_200(self.http_port), READY_TIMEOUT_S,
                       f"{self.name}: HTTP 200 from {self.url('/')}", self.check_alive)
            if expected_workers:
                pool = self.procs[-1]
                wait_until(lambda: len(children(pool.pid)) >= expected_workers,
                           READY_TIMEOUT_S, f"{self.name}: {expected_workers} worker processes",
                           self.check_alive)
        except WaitTimeout as exc:
            raise BenchError(f"{exc}\n{self.log_tails()}") from None

    def wait_children(self, proc_name: str, count: int) -> None:
        """Wait until the started process `proc_name` has forked `count` processes."""
        proc = next(p for p in self.procs if p.name == proc_name)
        try:
            wait_until(lambda: len(children(proc.pid)) >= count, READY_TIMEOUT_S,
                       f"{self.name}: {count} {proc.child_role} processes", self.check_alive)
        except WaitTimeout as exc:
            raise BenchError(f"{exc}\n{self.log_tails()}") from None

    def processes(self) -> list[tuple[str, int]]:
        """(role, pid) of every process of the scenario: each started process,
        then everything it forked (pool workers, nginx and gunicorn workers, ...)."""
        found: list[tuple[str, int]] = []
        for proc in self.procs:
            found.append((proc.name, proc.pid))
            found += [(f"{proc.child_role} {i + 1}", pid)
                      for i, pid in enumerate(descendants(proc.pid))]
        return found

    def stop(self) -> None:
        """Stop in reverse start order: workers, broker/handler, then Mongrel2."""
        for proc in reversed(self.procs):
            proc.stop()


def _start_mongrel2(scenario: Scenario, tmp: Path, *, flow_control: bool = True,
                    settings: dict[str, int] | None = None) -> tuple[str, str, Path]:
    """Mongrel2 for `scenario`; returns (send_spec, recv_spec, upload_dir)."""
    send_spec = f"tcp://127.0.0.1:{free_port()}"
    recv_spec = f"tcp://127.0.0.1:{free_port()}"
    conf = tmp / "mongrel2.conf"
    conf.write_text(config_text(http_port=scenario.http_port, send_spec=send_spec,
                                recv_spec=recv_spec, send_ident=SENDER, uuid=M2_UUID,
                                flow_control=flow_control, settings=settings))
    server = Mongrel2Server(conf, tmp / "m2", M2_UUID)
    server.prepare()
    logs = server.runtime_dir / "logs"
    scenario.procs.append(Proc("mongrel2", server.argv(), server.runtime_dir, tmp,
                               stop_signal=signal.SIGINT,
                               extra_logs=(logs / "error.log",)))
    return send_spec, recv_spec, server.upload_dir


def start_direct(tmp: Path) -> Scenario:
    tmp.mkdir(parents=True, exist_ok=True)
    scenario = Scenario("direct", free_port())
    try:
        # Without flow control: the handler then sends every reply as one
        # message, the cheapest way through Mongrel2 (with it on, it would
        # send replies over Mongrel2's 102400-byte window in pieces, each
        # waiting for credits: docs/protocol.md 3.9).
        send_spec, recv_spec, _ = _start_mongrel2(scenario, tmp, flow_control=False)
        argv = [sys.executable, "-m", "bench.direct_handler",
                "--send-spec", send_spec, "--recv-spec", recv_spec]
        scenario.procs.append(Proc("direct_handler", argv, ROOT, tmp))
        scenario.wait_ready()
    except BaseException:
        scenario.stop()
        raise
    return scenario


def start_scale0(tmp: Path, *, relay: bool = False, flow_control: bool = True,
                 name: str = "", m2_settings: dict[str, int] | None = None,
                 replies: bool = False, asgi: bool = False,
                 prefetch: int | None = None) -> Scenario:
    """`replies`: the broker is linked as relay+ENDPOINT alone and the relay
    gets `--mongrel2-recv`, so replies go broker -> relay -> Mongrel2 (how a
    broker on another host reaches Mongrel2). `asgi`: the pool is `scale0 asgi
    examples.asgi_hello:app --processes 2 --concurrency ASGI_CONCURRENCY`.
    `prefetch`: the pool's --prefetch (None: its default)."""
    tmp.mkdir(parents=True, exist_ok=True)
    scenario = Scenario(name or ("scale0+relay" if relay else "scale0"), free_port())
    try:
        send_spec, recv_spec, upload_dir = _start_mongrel2(
            scenario, tmp, flow_control=flow_control, settings=m2_settings)
        broker = f"tcp://127.0.0.1:{free_port()}"
        cli = [sys.executable, "-m", "scale0.cli"]
        link = f"{send_spec},{recv_spec}"
        if relay:
            relay_at = f"tcp://127.0.0.1:{free_port()}"
            also = ["--mongrel2-recv", recv_spec] if replies else []
            scenario.procs.append(Proc("relay", [*cli, "relay", "--mongrel2", send_spec,
                                                 "--bind", relay_at, *also], ROOT, tmp))
            link = f"relay+{relay_at}" if replies else f"relay+{relay_at},{recv_spec}"
        scenario.procs.append(Proc("broker", [*cli, "broker", "--bind", broker,
                                              "--mongrel2", link], ROOT, tmp))
        if asgi:
            kind = ["asgi", "examples.asgi_hello:app", "--concurrency", str(ASGI_CONCURRENCY)]
        else:
            kind = ["wsgi", "examples.hello:app", "--threads", str(POOL_THREADS),
                    *(() if prefetch is None else ("--prefetch", str(prefetch)))]
        scenario.procs.append(Proc("pool", [
            *cli, *kind, "--connect", broker, "--service", "hello",
            "--route", "/", "--processes", str(POOL_PROCESSES),
            "--upload-dir", str(upload_dir)], ROOT, tmp, child_role="pool worker"))
        scenario.wait_ready(expected_workers=POOL_PROCESSES)
    except BaseException:
        scenario.stop()
        raise
    return scenario
