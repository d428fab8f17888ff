"""Long requests against Mongrel2's idle killer (limits.min_ping).

Measured here: with min_ping 1 the killer closes a 22 s request at about 20 s
(its sweep runs every ~10 s), so 22 s is the shortest request that shows the
keep-alives at work.
"""

from __future__ import annotations

import concurrent.futures
import socket
from pathlib import Path

import pytest
import requests

from .conftest import Stack

KILLER = {"limits.min_ping": 1, "limits.min_write_rate": 1, "limits.min_read_rate": 1,
          "limits.kill_limit": 1}


@pytest.fixture
def impatient_stack(tmp_path: Path) -> Stack:
    s = Stack(tmp_path, m2_settings=KILLER)
    yield s  # type: ignore[misc]
    s.stop()


def _idle_connection_closed(port: int) -> bool:
    """A client that connects and says nothing: the killer must close it."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        return sock.recv(1) == b""


def test_keep_alives_save_a_long_request_from_the_idle_killer(impatient_stack: Stack) -> None:
    s = impatient_stack
    s.start_mongrel2()
    s.start_broker("--keepalive", "0.5")
    s.start_pool("e2e_apps:app", service="app", routes=("/",))
    s.wait_ok("/")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        control = pool.submit(_idle_connection_closed, s.http_port)
        r = requests.get(s.url("/sleep?22"), timeout=40)
        assert control.result()  # the killer was active while we waited
    assert r.status_code == 200 and r.json() == {"slept": 22.0}
