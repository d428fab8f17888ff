"""Prefetch on the real stack (docs/protocol.md 4.6): GETs that wait at a busy
worker process, RECALLed from one stuck in a long request for a free one, and
retried when the process holding them is killed."""

from __future__ import annotations

import concurrent.futures
import os
import signal
from pathlib import Path

import requests

from .conftest import Stack, wait_for
from .test_control import status

BURST = 24  # GETs at once: more than the free process takes, so some wait behind the slow one


def _burst(s: Stack, n: int) -> list[requests.Response]:
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: requests.get(s.url("/"), timeout=30), range(n)))


def _in_app(marks: Path, n: int) -> list[int]:
    """The pids of the processes that took the first `n` sleeping requests,
    in the order they started, once all `n` are in the app."""
    found = wait_for(lambda: len(ms := sorted(marks.glob("sleep-*"),
                                              key=lambda m: int(m.name.split("-")[2])))
                     >= n and ms, what=f"{n} sleeping requests at the app")
    return [int(m.name.split("-")[1]) for m in found]


def _start(s: Stack, control: str, recall_after: str) -> Path:
    """Mongrel2, a broker, and a pool of two processes of one thread each."""
    marks = s.marks
    s.start_mongrel2()
    s.start_broker("--control", control, "--recall-after", recall_after)
    s.start_pool("e2e_apps:app", "--prefetch", "8", service="app", routes=("/",),
                 processes=2, threads=1, env={"E2E_MARK_DIR": str(marks)})
    s.wait_ok("/")
    wait_for(lambda: len(status(control)["workers"]) == 2, what="two workers")
    return marks


def _counters(control: str) -> dict[str, int]:
    counters: dict[str, int] = status(control)["counters"]
    return counters


def test_gets_waiting_behind_a_long_request_are_recalled_and_served_by_the_free_process(
        fresh_stack: Stack, control: str) -> None:
    """Two processes of one thread, one in a 6 s request, the other in a 0.5 s
    one, when a burst of GETs comes: none is free, so the GETs wait at both,
    the least loaded first. The second is free again after 0.5 s and serves
    what waits there; the first stalls (nothing finished for its
    recall_after, 1 s), so what waits behind its 6 s request is RECALLed,
    RETURNed while that request still runs, and served by the second: every
    GET is answered before the slow request is."""
    s = fresh_stack
    marks = _start(s, control, "1")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(requests.get, s.url("/sleep?6"), timeout=30)
        _in_app(marks, 1)
        short = pool.submit(requests.get, s.url("/sleep?0.5"), timeout=30)
        _in_app(marks, 2)
        answers = _burst(s, BURST)
        assert not slow.done()  # every GET was answered while the slow one still runs
        assert [(r.status_code, r.text) for r in answers] == [(200, "e2e hello\n")] * BURST
        counters = _counters(control)
        assert counters["prefetched"] >= BURST // 2
        # Those that waited behind the slow one came back (RETURN) and went to the other.
        assert counters["returns"] >= 1 and counters["recalls"] >= counters["returns"]
        assert short.result().json() == {"slept": 0.5}
        r = slow.result()
    assert r.status_code == 200 and r.json() == {"slept": 6.0}


def test_gets_waiting_at_a_killed_process_are_retried_on_the_other(
        fresh_stack: Stack, control: str) -> None:
    """Both processes in a request (a 20 s POST, a 2 s GET) when a burst of
    GETs comes, so some wait at each. The POST's process is SIGKILLed: the
    GETs that waited there are retried on the other process (200); the POST,
    which may not wait at a worker nor be retried, gets 502."""
    s = fresh_stack
    marks = _start(s, control, "60")  # no recall: what waits there stays
    with concurrent.futures.ThreadPoolExecutor(BURST + 2) as pool:
        post = pool.submit(requests.post, s.url("/sleep?20"), timeout=30)
        [pid] = _in_app(marks, 1)
        short = pool.submit(requests.get, s.url("/sleep?2"), timeout=30)
        _in_app(marks, 2)
        gets = [pool.submit(requests.get, s.url("/"), timeout=30) for _ in range(BURST)]
        wait_for(lambda: all(w["in_flight"] > 1 for w in status(control)["workers"]),
                 what="GETs waiting at both processes")
        waiting_there = next(w["in_flight"] - 1 for w in status(control)["workers"]
                             if w["label"].endswith(f":{pid}/0"))
        assert waiting_there >= 1
        os.kill(pid, signal.SIGKILL)
        assert [f.result().status_code for f in gets] == [200] * BURST
        assert post.result().status_code == 502
        assert short.result().status_code == 200
    assert _counters(control)["retries"] >= waiting_there
