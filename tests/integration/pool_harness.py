"""A Pool of fake workers, for tests/integration/test_supervise.py (run as a script).

argv: DIR SIZE [KEY=VALUE ...] (Pool keyword arguments). A fake worker
behaves as the files in DIR say: `broken` -> it cannot boot (BOOT_FAILED);
`wedge` -> once ready its loop stops reporting; `stubborn` -> it ignores
SIGTERM; `slow-stop` -> after SIGTERM it drains for SLOW_STOP_S (serving
nothing) before it exits. Otherwise it reports alive and ready, "serves" a
request every 20 ms (asking to retire at its limit) and exits 0 on SIGTERM.

What the tests wait on, in DIR: `ready-PID` once the process reported
ready, `boot-failed-PID` once it failed to boot, `term-PID` once it got
SIGTERM; and the pool's READY line on stdout (Pool's `on_ready`).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from pathlib import Path

from scale0.pool.childstate import current
from scale0.pool.supervise import BOOT_FAILED, Pool

SLOW_STOP_S = 1.0


def fake_worker(folder: Path) -> int:
    pid = os.getpid()
    if (folder / "broken").exists():
        (folder / f"boot-failed-{pid}").touch()
        return BOOT_FAILED
    stop = False
    stop_at = 0.0  # slow-stop: draining until then

    def on_term(*_: object) -> None:
        nonlocal stop, stop_at
        (folder / f"term-{pid}").touch()
        if (folder / "slow-stop").exists():
            stop_at = time.monotonic() + SLOW_STOP_S
        else:
            stop = not (folder / "stubborn").exists()

    signal.signal(signal.SIGTERM, on_term)
    state = current()
    assert state is not None
    served = 0
    while not stop:
        now = time.monotonic()
        state.beat(now, 0.0)
        if not state.ready:
            (folder / f"ready-{pid}").touch()
            state.set_ready()
        if (folder / "wedge").exists():
            time.sleep(3600)
        if stop_at:  # draining: no new requests
            stop = now >= stop_at
            time.sleep(0.02)
            continue
        served += 1
        if state.max_requests and served >= state.max_requests:
            state.ask_retire()
        time.sleep(0.02)
    return 0


def main() -> int:
    logging.basicConfig(level="INFO", format="%(process)d %(message)s")
    folder, size = Path(sys.argv[1]), int(sys.argv[2])
    kwargs = {k: float(v) if "." in v else int(v)
              for k, _, v in (a.partition("=") for a in sys.argv[3:])}
    return Pool(lambda: fake_worker(folder), size, name="fake",  # type: ignore[arg-type]
                on_ready=lambda: print("READY", flush=True), **kwargs).run()


if __name__ == "__main__":
    sys.exit(main())
