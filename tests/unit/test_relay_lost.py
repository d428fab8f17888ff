"""RelayCore: a broker that dies takes its connections with it; the relay
closes them (with --mongrel2-recv) so clients do not hang, and a broker's
announced heartbeat is clamped."""

from __future__ import annotations

from scale0.core.relaycore import RelayCore
from scale0.wire import mongrel2_reply as m2r

from .test_relay import S, req, sent

S2 = b"5ca1e000-0000-4000-8000-000000000002"


def relay(*brokers: bytes, close_lost: bool = True, hb_ms: int = 1000) -> RelayCore:
    c = RelayCore(heartbeat_s=1.0, liveness=3, max_peer_heartbeat_s=30.0,
                  close_lost=close_lost)
    for ident in brokers:
        c.on_broker(ident, b"HELLO S0R1 1000 %d" % hb_ms, 0.0)
    return c


def test_an_expired_broker_has_its_connections_closed_and_the_next_go_elsewhere() -> None:
    c = relay(b"A", b"B")
    for conn in range(1, 6):
        c.on_mongrel2(req(conn))
    c.on_mongrel2(S2 + b" 7 / 2:{},0:,")
    assert [who for who, _ in sent(c)] == [b"A", b"B", b"A", b"B", b"A", b"B"]
    for t in (1.0, 2.0, 3.0):
        c.on_broker(b"B", b"HEARTBEAT", t)
        c.on_tick(t)
    assert b"A" not in c.peers
    assert c.to_mongrel2 == [m2r.close_reply(S, [1, 3, 5])]
    assert c.lost_connections == 3
    sent(c)  # heartbeats
    c.on_mongrel2(req(3, b"/again"))  # a late message of that connection: B takes it
    assert sent(c) == [(b"B", req(3, b"/again"))]


def test_an_unreachable_broker_is_lost_too_but_one_that_leaves_is_not() -> None:
    c = relay(b"A", b"B")
    c.on_mongrel2(req(1))
    c.on_mongrel2(req(2))
    c.on_broker(b"B", b"LEAVE", 0.5)
    assert c.to_mongrel2 == []  # a broker that leaves has answered what it held
    c.unreachable(b"A")
    assert c.to_mongrel2 == [m2r.close_reply(S, [1])]


def test_without_recv_spec_the_connections_are_only_forgotten() -> None:
    c = relay(b"A", close_lost=False)
    c.on_mongrel2(req(1))
    c.unreachable(b"A")
    assert c.to_mongrel2 == [] and c.owners == {} and c.lost_connections == 1


def test_closes_go_in_batches_of_mongrel2s_target_limit() -> None:
    c = relay(b"A")
    for conn in range(1, 301):
        c.on_mongrel2(req(conn))
    c.unreachable(b"A")
    assert c.to_mongrel2 == [m2r.close_reply(S, list(range(1, 129))),
                             m2r.close_reply(S, list(range(129, 257))),
                             m2r.close_reply(S, list(range(257, 301)))]


def test_a_huge_announced_heartbeat_is_clamped_and_a_small_one_honoured() -> None:
    c = relay(b"rogue", hb_ms=600_000)
    assert c.peers[b"rogue"].expiry_s == 90.0  # 30 s (max_peer_heartbeat) x 3
    assert c.peers[b"rogue"].expires_at == 90.0
    c.on_broker(b"fast", b"HELLO S0R1 100 200", 0.0)
    assert c.peers[b"fast"].expiry_s == 0.2 * 3
    c.on_broker(b"odd", b"HELLO S0R1 100 " + b"9" * 40, 0.0)
    assert c.peers[b"odd"].expiry_s == 3.0  # not a sane number: our own
    for t in range(1, 91):
        c.on_tick(float(t))
    assert b"rogue" not in c.peers
