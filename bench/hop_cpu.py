"""CPU per request of the broker and relay hop, with a raw worker behind them.

Starts Mongrel2 (download.flow_control on or off) -> [scale0 relay] ->
scale0 broker -> bench.raw_worker on free loopback ports, runs
`wrk -t1 -cC -dDs` for each C, and prints each process's CPU time
(utime + stime from /proc, all threads) divided by the requests wrk counted.
Short and self-contained, for working on the hop; `make bench` is the full
benchmark.

    python -m bench.hop_cpu [--relay | --relay-replies] [--flow-control 0|1] [-c 1,16,128] [-d 5]
                            [--threads] [--profile DIR]   # py-spy the broker (and relay) per run
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from scale0.deploy.m2server import Mongrel2Server
from tests.mongrel2_helpers import config_text

from .procs import Proc, answers_200, free_port, wait_until

ROOT = Path(__file__).resolve().parents[1]
SENDER = "5ca1e000-0000-4000-8000-00000000be01"
M2_UUID = "5ca1e000-0000-4000-8000-00000000be0a"
TICK_US = 1_000_000 / os.sysconf("SC_CLK_TCK")


def cpu_us(pid: int) -> float:
    """utime + stime of `pid` (every thread), in microseconds."""
    stat = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(stat[11]) + int(stat[12])) * TICK_US


def threads_us(pid: int) -> dict[str, float]:
    """CPU microseconds (user, system) per thread name of `pid`."""
    found: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        for kind, index in (("user", 11), ("sys", 12)):
            key = f"{comm}:{kind}"
            found[key] = found.get(key, 0.0) + int(stat[index]) * TICK_US
    return found


def start(tmp: Path, *, relay: bool, flow_control: bool,
          relay_replies: bool = False) -> tuple[list[Proc], int]:
    http_port = free_port()
    send_spec = f"tcp://127.0.0.1:{free_port()}"
    recv_spec = f"tcp://127.0.0.1:{free_port()}"
    text = config_text(http_port=http_port, send_spec=send_spec, recv_spec=recv_spec,
                       send_ident=SENDER, uuid=M2_UUID, flow_control=flow_control)
    conf = tmp / "mongrel2.conf"
    conf.write_text(text)
    server = Mongrel2Server(conf, tmp / "m2", M2_UUID)
    server.prepare()
    procs = [Proc("mongrel2", server.argv(), server.runtime_dir, tmp, stop_signal=signal.SIGINT)]
    cli = [sys.executable, "-m", "scale0.cli"]
    link = f"{send_spec},{recv_spec}"
    if relay or relay_replies:
        relay_at = f"tcp://127.0.0.1:{free_port()}"
        also = ["--mongrel2-recv", recv_spec] if relay_replies else []
        procs.append(Proc("relay", [*cli, "relay", "--mongrel2", send_spec, "--bind", relay_at,
                                    *also], ROOT, tmp))
        link = f"relay+{relay_at}" if relay_replies else f"relay+{relay_at},{recv_spec}"
    broker = f"tcp://127.0.0.1:{free_port()}"
    procs.append(Proc("broker", [*cli, "broker", "--bind", broker, "--mongrel2", link],
                      ROOT, tmp))
    procs.append(Proc("raw_worker", [sys.executable, "-m", "bench.raw_worker",
                                     "--connect", broker], ROOT, tmp))

    def alive() -> None:
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited\n{proc.log_tail()}")

    wait_until(lambda: answers_200(http_port), 30, "HTTP 200", alive)
    return procs, http_port


def wrk(port: int, conns: int, seconds: int) -> tuple[int, float]:
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency",
                          f"http://127.0.0.1:{port}/"], capture_output=True, text=True,
                         timeout=seconds + 30, check=True).stdout
    total = re.search(r"(\d+) requests in", out)
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if total is None or rate is None or "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk output not clean:\n{out}")
    return int(total.group(1)), float(rate.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hop_cpu", description=__doc__.split("\n")[0])
    parser.add_argument("--relay", action="store_true")
    parser.add_argument("--relay-replies", action="store_true",
                        help="a relay that also carries the replies (broker linked as "
                             "relay+ENDPOINT alone)")
    parser.add_argument("--flow-control", type=int, choices=(0, 1), default=1)
    parser.add_argument("-c", "--connections", default="1,16,128")
    parser.add_argument("-d", "--duration", type=int, default=5)
    parser.add_argument("--threads", action="store_true",
                        help="also split each process's CPU by thread, user and system")
    parser.add_argument("--profile", type=Path, help="py-spy record into this folder")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="scale0-hop-") as tmp_name:
        procs, port = start(Path(tmp_name), relay=args.relay,
                            flow_control=bool(args.flow_control),
                            relay_replies=args.relay_replies)
        try:
            served = wrk(port, 16, 1)[0]  # warm up
            names = [p.name for p in procs]
            print(f"relay={args.relay} relay_replies={args.relay_replies} "
                  f"flow_control={args.flow_control}")
            print("conns  req/s    " + "  ".join(f"{n:>10}" for n in names) + "   (us/request)")
            for conns in (int(c) for c in args.connections.split(",")):
                spies = []
                if args.profile:
                    args.profile.mkdir(parents=True, exist_ok=True)
                    for p in procs:
                        if p.name in ("broker", "relay"):
                            out = args.profile / (f"{p.name}-c{conns}-r{int(args.relay)}"
                                                  f"-f{args.flow_control}.txt")
                            spies.append(subprocess.Popen(
                                [str(Path(sys.executable).parent / "py-spy"), "record",
                                 "-r", "500", "-f", "raw", "-o", str(out),
                                 "-d", str(args.duration), "-p", str(p.pid)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                before = [cpu_us(p.pid) for p in procs]
                split = {p.name: threads_us(p.pid) for p in procs if args.threads}
                requests, rate = wrk(port, conns, args.duration)
                served += requests
                after = [cpu_us(p.pid) for p in procs]
                split_after = {p.name: threads_us(p.pid) for p in procs if args.threads}
                for spy in spies:
                    spy.wait(30)
                cost = [(a - b) / requests for a, b in zip(after, before, strict=True)]
                print(f"{conns:>5} {rate:>7.0f}    " + "  ".join(f"{c:>10.1f}" for c in cost),
                      flush=True)
                for name, threads in split_after.items():
                    parts = [f"{key} {(us - split[name].get(key, 0.0)) / requests:.1f}"
                             for key, us in sorted(threads.items())]
                    print(f"      {name}: " + ", ".join(parts))
        finally:
            for proc in reversed(procs):
                proc.stop()
        for proc in procs:  # the loops log their wake-ups when they stop
            found = re.search(r"after (\d+) wake-ups", proc.log_path.read_text())
            if found:
                print(f"{proc.name}: {served / int(found.group(1)):.2f} requests per wake-up"
                      " (all runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
