"""Proof under load: faults on the make-run stack shape while clients keep asking.

A bounded load (threads looping GETs on two services, at most LOAD_S seconds,
on loopback) runs while the test SIGKILLs a worker process, adds a pool,
drains (SIGTERMs) a pool and restarts the broker gracefully (behind the relay,
as in scale0.toml). It reports sent,
2xx, 5xx by code, connection errors and requests left hanging (no answer
within CLIENT_TIMEOUT_S), and writes them to the path in SCALE0_PROOF_REPORT
if set (docs/reliability.md quotes a run).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

from .conftest import Load, Stack

CLIENTS = 8
LOAD_S = 60.0
CLIENT_TIMEOUT_S = 10.0


def test_faults_under_load_report(fresh_stack: Stack) -> None:
    s = fresh_stack
    s.start_mongrel2()
    s.start_relay()  # as in scale0.toml: Mongrel2 -> relay -> broker
    broker = s.start_broker("--heartbeat", "0.5")
    port = int(s.broker_endpoints[0].rsplit(":", 1)[1])
    hello = s.start_pool("examples.hello:app", "--heartbeat", "0.5", service="hello",
                         routes=("/",), processes=2, threads=4)
    s.start_pool("examples.flask_app:app", "--heartbeat", "0.5", service="flask",
                 routes=("/flask",), processes=2, threads=4)
    s.wait_ok("/")
    s.wait_ok("/flask/")
    paths = ("/", "/flask/")
    steps = []
    with Load(lambda n: s.url(paths[n % 2]), clients=CLIENTS, max_s=LOAD_S,
              timeout_s=CLIENT_TIMEOUT_S) as load:
        load.wait_more(100)
        pids = subprocess.run(["pgrep", "-P", str(hello.popen.pid)], capture_output=True,
                              text=True).stdout.split()
        os.kill(int(pids[0]), signal.SIGKILL)
        steps.append("SIGKILL one hello worker process (its pool respawns it)")
        load.wait_more(100)
        s.start_pool("examples.hello:app", "--heartbeat", "0.5", service="hello",
                     routes=("/",), processes=1, threads=4)  # READY: WELCOMEd
        steps.append("add a hello pool")
        load.wait_more(100)
        hello.send_signal(signal.SIGTERM)
        assert hello.popen.wait(30) == 0
        steps.append("drain and stop the first hello pool (SIGTERM)")
        load.wait_more(100)
        broker.stop()
        s.procs.remove(broker)
        s.start_broker("--heartbeat", "0.5", port=port)
        steps.append("restart the broker (SIGTERM, then a new one on the same port)")
        load.wait_more(200)
    outcomes = load.outcomes
    report = {"sent": sum(outcomes.values()), **dict(sorted(outcomes.items())), "steps": steps}
    print("proof under load:", json.dumps(report))
    if os.environ.get("SCALE0_PROOF_REPORT"):
        with open(os.environ["SCALE0_PROOF_REPORT"], "w") as out:
            json.dump(report, out, indent=1)
    # What must hold: through all of it every request is answered with a 2xx:
    # no 5xx, no connection error, nothing left hanging.
    assert set(outcomes) == {"2xx"}, report
    assert outcomes["2xx"] > 500, report
