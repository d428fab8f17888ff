"""Hosts for end-to-end tests: Linux network namespaces on one bridge.

`Net` makes one namespace per host, each with an `eth0` (one end of a veth
pair whose other end is a port of bridge `br0` in a switch namespace) and
an address in 198.18.213.0/24 (RFC 2544's benchmarking range: never routed,
and here reachable only from the namespaces, which have no route out). A
link cut is `ip link set eth0 down` in a host; packet loss is an nftables
table (`numgen random`) in a host. `Net.close()` kills what still runs in
the namespaces and deletes them, which removes their veths and nftables
tables with them.

Test code reaches the hosts from threads that have joined a namespace
(`setns(2)` acts on the calling thread only): `NsClient` for single requests,
`NsLoad` for load. Processes run in a host with `ip netns exec`, which
execs the command, so the pid and signals are the command's own.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import subprocess
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from .conftest import Load

SUBNET = "198.18.213"
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def unavailable() -> str | None:
    """Why namespaces cannot be used here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "`ip` (iproute2) is not installed"
    probe = f"s0probe-{uuid.uuid4().hex[:6]}"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return f"`ip netns add` failed: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, check=False)
    return None


def enter(ns: str) -> None:
    """Move the calling thread (only it) into namespace `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"setns({ns}): {os.strerror(errno)}")
    finally:
        os.close(fd)


class Net:
    """Hosts `names` on one bridge; `close()` removes every trace."""

    def __init__(self, names: list[str]) -> None:
        self.tag = uuid.uuid4().hex[:6]
        self.switch = f"s0{self.tag}-sw"
        self.hosts = {name: f"s0{self.tag}-{name}" for name in names}
        self.addrs = {name: f"{SUBNET}.{10 + i}" for i, name in enumerate(names)}
        self._made: list[str] = []

    def ns(self, host: str) -> str:
        return self.hosts[host]

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)

    def start(self) -> None:
        for ns in (self.switch, *self.hosts.values()):
            self.ip("netns", "add", ns)
            self._made.append(ns)
            self.ip("-n", ns, "link", "set", "lo", "up")
        self.ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        self.ip("-n", self.switch, "link", "set", "br0", "up")
        for host, ns in self.hosts.items():
            port = f"v-{host}"
            self.ip("-n", self.switch, "link", "add", port, "type", "veth", "peer", "name",
                    "eth0", "netns", ns)
            self.ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
            self.ip("-n", ns, "addr", "add", f"{self.addrs[host]}/24", "dev", "eth0")
            self.ip("-n", ns, "link", "set", "eth0", "up")

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.hosts[host], *argv]

    def link(self, host: str, up: bool) -> None:
        self.ip("-n", self.hosts[host], "link", "set", "eth0", "up" if up else "down")

    def loss(self, host: str, percent: int) -> None:
        """Drop `percent` % of the packets in and out of `host`'s eth0."""
        drop = f"numgen random mod 100 < {percent} counter drop"
        rules = (f"table inet s0loss {{\n"
                 f"  chain in {{ type filter hook input priority 0; iifname eth0 {drop}; }}\n"
                 f"  chain out {{ type filter hook output priority 0; oifname eth0 {drop}; }}\n"
                 f"}}\n")
        subprocess.run(self.exec_argv(host, ["nft", "-f", "-"]), input=rules.encode(),
                       check=True, capture_output=True, timeout=30)

    def dropped(self, host: str) -> int:
        """Packets the loss rules of `host` dropped so far."""
        done = subprocess.run(self.exec_argv(host, ["nft", "list", "table", "inet", "s0loss"]),
                              capture_output=True, text=True, timeout=30, check=True)
        return sum(int(n) for n in re.findall(r"counter packets (\d+)", done.stdout))

    def no_loss(self, host: str) -> None:
        subprocess.run(self.exec_argv(host, ["nft", "delete", "table", "inet", "s0loss"]),
                       capture_output=True, timeout=30, check=False)

    def pids(self, host: str) -> set[int]:
        done = subprocess.run(["ip", "netns", "pids", self.hosts[host]], capture_output=True,
                              text=True, timeout=30, check=False)
        return {int(pid) for pid in done.stdout.split()}

    def close(self) -> None:
        """Kill whatever still runs in our namespaces (only ours), delete them."""
        for ns in reversed(self._made):
            done = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True, timeout=30, check=False)
            for pid in done.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30,
                           check=False)
        self._made.clear()


class NsClient:
    """requests from a thread inside namespace `ns`. Use as a context manager."""

    def __init__(self, ns: str) -> None:
        self._pool = ThreadPoolExecutor(1, initializer=enter, initargs=(ns,))

    def call(self, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        return self._pool.submit(fn, *args, **kw).result()

    def get(self, url: str, **kw: Any) -> requests.Response:
        response: requests.Response = self.call(requests.get, url, **kw)
        return response

    def post(self, url: str, **kw: Any) -> requests.Response:
        response: requests.Response = self.call(requests.post, url, **kw)
        return response

    def __enter__(self) -> NsClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._pool.shutdown(wait=True)


class NsLoad(Load):
    """conftest.Load with its client threads inside namespace `ns`."""

    def __init__(self, ns: str, url_for: Callable[[int], str], **kw: Any) -> None:
        self.ns = ns
        super().__init__(url_for, **kw)

    def _client(self, n: int) -> None:
        enter(self.ns)
        super()._client(n)
