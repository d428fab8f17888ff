"""S0W1 HELLO validation: every nonsense payload is one WireError, nothing else."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scale0.wire import s0w1 as p


def hello(**fields: object) -> bytes:
    data: dict[str, object] = {"services": [{"name": "app", "routes": ["/app"]}],
                               "capacity": 2}
    data.update(fields)
    return json.dumps(data).encode()


def test_round_trip() -> None:
    h = p.Hello((p.ServiceSpec("app", ("/a", "example.com/b")),), 4, "host:1", 500, {"k": "v"})
    assert p.Hello.decode(h.encode()) == h


@pytest.mark.parametrize("payload", [
    b"", b"{", b"[]", b"null", b"\xff\xfe", b"[" * 100_000, b'{"a":' * 50_000,
    hello(capacity=0), hello(capacity=10_001), hello(capacity="2"), hello(capacity=True),
    hello(services=[]), hello(services={}), hello(services=[{"name": ""}]),
    hello(services=[{"name": "caf\u00e9"}]), hello(services=[{"name": "a b"}]),
    hello(services=[{"name": "x" * 129}]), hello(services=[{"name": "a", "routes": "/x"}]),
    hello(services=[{"name": "a", "routes": [1]}]), hello(services=[{"name": f"s{i}"}
                                                                      for i in range(65)]),
    hello(services=[{"name": "a", "routes": ["/r"] * 257}]), hello(heartbeat_ms=5),
    hello(worker=7), hello(meta={"a": 1}),
])
def test_nonsense_is_a_wire_error(payload: bytes) -> None:
    with pytest.raises(p.WireError):
        p.Hello.decode(payload)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20).map(lambda v: json.dumps(v).encode()))
def test_decode_raises_only_wire_error(payload: bytes) -> None:
    try:
        p.Hello.decode(payload)
    except p.WireError:
        pass


def test_request_id_codec() -> None:
    assert p.decode_request_id(p.encode_request_id(2**48 + 5)) == 2**48 + 5
    with pytest.raises(p.WireError):
        p.decode_request_id(b"\x00" * 7)


def test_count_frames_are_bounded_decimals() -> None:
    assert [p.count_of(f) for f in (b"0", b"102400", b"9" * 12)] == [0, 102400, 10**12 - 1]
    assert [p.count_of(f) for f in (None, b"", b"-1", b"1.5", b"9" * 13, b"9" * 5000)] == [
        None] * 6
