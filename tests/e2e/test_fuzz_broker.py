"""Fuzz the broker's two inputs over real sockets; it must keep serving.

The broker gets a second, fake Mongrel2 link (a PUSH and a SUB bound here) that
feeds it mutated captures and random bytes, while fake workers send random and
mutated S0W1 frames to its ROUTER. Afterwards the real Mongrel2 link still
serves requests, and the broker process is alive.
"""

from __future__ import annotations

import ast
import json
import random
from pathlib import Path

import requests
import zmq

from scale0.wire import s0w1 as p

from .conftest import FakeMongrel2, Stack, wait_for
from .test_ownership import status

CAPTURES = Path(__file__).resolve().parents[1] / "fixtures" / "mongrel2-captures"
N_MESSAGES = 3000


def _captures() -> list[bytes]:
    out = []
    for path in sorted(CAPTURES.glob("*.txt")):
        for line in path.read_text().splitlines():
            kind, _, literal = line.partition(" ")
            if kind == "IN":
                out.append(ast.literal_eval(literal))
    return out


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        op = rng.random()
        pos = rng.randrange(len(buf) + 1)
        if op < 0.4 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op < 0.7:
            buf[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
        else:
            del buf[pos:pos + rng.randint(1, 16)]
    return bytes(buf)


def _worker_garbage(rng: random.Random) -> list[bytes]:
    hello = p.Hello((p.ServiceSpec("fuzz", ("/fuzz",)),), 1).encode()
    choice = rng.random()
    if choice < 0.25:
        return [bytes(rng.randrange(256) for _ in range(rng.randint(0, 12)))
                for _ in range(rng.randint(1, 6))]
    if choice < 0.5:
        return [p.VERSION, bytes([rng.randrange(256)]),
                *[rng.randbytes(rng.randint(0, 10)) for _ in range(rng.randint(0, 4))]]
    if choice < 0.7:
        return [p.VERSION, p.CMD[p.Command.HELLO], _mutate(rng, hello)]
    if choice < 0.8:
        junk = json.dumps({"services": [{"name": "x" * rng.randint(0, 300)}],
                           "capacity": rng.choice([0, -1, 1, 10**9, "1", None])})
        return [p.VERSION, p.CMD[p.Command.HELLO], junk.encode()]
    if choice < 0.9:  # replies for requests that do not exist
        return [p.VERSION, p.CMD[p.Command.REPLY], rng.randbytes(rng.choice([7, 8, 9])),
                rng.choice([p.FLAG_LAST, p.FLAG_MORE, b"\x07"]), rng.randbytes(20)]
    return [b"S0W2", p.CMD[p.Command.HEARTBEAT]]


def test_broker_survives_garbage_on_both_inputs(fresh_stack: Stack) -> None:
    rng = random.Random(20261124)
    fresh_stack.start_mongrel2()
    ctx = zmq.Context()
    dealers: list[zmq.Socket[bytes]] = []
    try:
        with FakeMongrel2() as fake:
            fake_push, fake_sub = fake.push, fake.sub
            broker = fresh_stack.start_broker("--mongrel2", fake.link)
            fresh_stack.start_pool("e2e_apps:app", service="app", routes=("/",))
            fresh_stack.wait_ok("/")  # the real link is subscribed
            fake.wait_subscribed(broker, links_before=1)

            captures = _captures()
            for i in range(N_MESSAGES):
                if i % 3 == 0:
                    message = rng.randbytes(rng.randint(0, 200))
                else:
                    message = _mutate(rng, rng.choice(captures))
                fake_push.send(message)
            endpoint = fresh_stack.broker_endpoints[0]
            for _ in range(20):
                dealer = ctx.socket(zmq.DEALER)
                dealer.setsockopt(zmq.LINGER, 0)
                dealer.connect(endpoint)
                dealers.append(dealer)
            for i in range(N_MESSAGES):
                dealers[i % len(dealers)].send_multipart(_worker_garbage(rng))

            # The broker answered what it could on the fake link (400s for readable
            # senders, 404s for lucky requests) ...
            assert wait_for(lambda: fake_sub.poll(100), what="answers on the fake link")

            def digested() -> bool:  # ... read both inputs to the end (the last ones
                counters = status(broker)["counters"]  # sent are a known bad version) ...
                return bool(counters["bad_mongrel2"] > N_MESSAGES // 3
                            and counters["bad_worker"] > N_MESSAGES // 3)

            wait_for(digested, 30, "the broker to read all the garbage", interval_s=0.5)
            # ... logging a sample and a count, not a line per message ...
            log = broker.log_tail(2_000_000)
            assert log.count("malformed Mongrel2 message") < 20, log[-3000:]
            assert log.count("bad message from worker") < 20, log[-3000:]
            # ... and keeps serving the real link.
            for i in range(20):
                r = requests.get(fresh_stack.url(f"/echo?after={i}"), timeout=10)
                assert r.status_code == 200 and r.json()["query"] == f"after={i}"
            assert broker.popen.poll() is None
            assert "Traceback" not in broker.log_tail(200_000)
    finally:
        for dealer in dealers:
            dealer.close(0)
        ctx.term()
