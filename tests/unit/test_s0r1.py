"""S0R1 codec (wire/s0r1.py): every message whole, every truncated prefix,
trailing bytes, and nonsense: one S0R1Error, never anything else."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scale0.wire import s0r1

COMMANDS: list[tuple[bytes, s0r1.BrokerCommand]] = [
    (b"HELLO S0R1 512 1000", s0r1.Hello(512, 1000)),
    (b"HELLO S0R1 512", s0r1.Hello(512)),
    (b"HELLO S0R1 0", s0r1.Hello(0)),
    (b"CREDIT 128", s0r1.Credit(128)),
    (b"HEARTBEAT", s0r1.Heartbeat()),
    (b"DRAIN", s0r1.Drain()),
    (b"RELEASE 5ca1e000-0000-4000-8000-000000000001 17 3",
     s0r1.Release(b"5ca1e000-0000-4000-8000-000000000001 17", 3)),
    (b"RELEASE S 0 0", s0r1.Release(b"S 0", 0)),
    (b"LEAVE", s0r1.Leave()),
]


def decoded_or_error(frame: bytes) -> s0r1.BrokerCommand | None:
    """The command, or None for an S0R1Error (anything else fails the test)."""
    try:
        return s0r1.parse_command(frame)
    except s0r1.S0R1Error:
        return None


@pytest.mark.parametrize(("frame", "command"), COMMANDS)
def test_commands_round_trip(frame: bytes, command: s0r1.BrokerCommand) -> None:
    assert s0r1.parse_command(frame) == command
    assert s0r1.encode_command(command) == frame


@pytest.mark.parametrize(("frame", "command"), COMMANDS)
def test_every_strict_prefix_and_any_suffix_is_rejected_or_another_command(
        frame: bytes, command: s0r1.BrokerCommand) -> None:
    # A frame comes whole (ZeroMQ), so a prefix is a different frame: it is
    # refused, or (a HELLO's optional heartbeat, a shorter number) it reads
    # as a different command, never as this one.
    for end in range(len(frame)):
        assert decoded_or_error(frame[:end]) != command
    for extra in (b"x", b" ", b"0", b" 5", b"\x00", b"\xff", frame):
        if extra == b" " and isinstance(command, s0r1.Hello) and command.heartbeat_ms is None:
            # An empty heartbeat field: the relay's own, as if absent (by design).
            assert decoded_or_error(frame + extra) == command
            continue
        assert decoded_or_error(frame + extra) != command


def test_heartbeat_ms_that_is_not_a_positive_number_means_the_relays_own() -> None:
    for tail in (b" 0", b" ", b" x", b" -5", b" " + b"9" * 13, b" 100 extra"):
        assert s0r1.parse_command(b"HELLO S0R1 8" + tail) == s0r1.Hello(8, None)
    assert s0r1.encode_hello(8) == b"HELLO S0R1 8"
    assert s0r1.encode_hello(8, 250) == b"HELLO S0R1 8 250"


@pytest.mark.parametrize(("frame", "command"), [
    (b"HELLO S0R9 512", b"HELLO"), (b"HELLO S0R1", b"HELLO"), (b"HELLO S0R1 x", b"HELLO"),
    (b"HELLO S0R1 " + b"1" * 13, b"HELLO"), (b"HELLO", b"HELLO"),
    (b"CREDIT", b"CREDIT"), (b"CREDIT x", b"CREDIT"), (b"CREDIT -1", b"CREDIT"),
    (b"CREDIT " + b"1" * 13, b"CREDIT"), (b"CREDIT 1 2", b"CREDIT"), (b"CREDIT 08", b"CREDIT"),
    (b"HELLO S0R1 00", b"HELLO"), (b"CREDIT \xd9\xa3", b"CREDIT"),
    (b"HEARTBEAT 1", b"HEARTBEAT"), (b"heartbeat", b"heartbeat"), (b"", b""),
    (b"LEAVE ", b"LEAVE"), (b"WHAT", b"WHAT"),
    (b"RELEASE", b"RELEASE"), (b"RELEASE S", b"RELEASE"), (b"RELEASE S 1", b"RELEASE"),
    (b"RELEASE S x 1", b"RELEASE"), (b"RELEASE S 1 x", b"RELEASE"),
    (b"RELEASE  1 1", b"RELEASE"), (b"RELEASE S 1 01", b"RELEASE"),
    (b"RELEASE S " + b"1" * 21 + b" 1", b"RELEASE"), (b"RELEASE " + b"s" * 257 + b" 1 1",
                                                        b"RELEASE"),
])
def test_malformed_commands_name_what_they_claim_to_be(frame: bytes, command: bytes) -> None:
    with pytest.raises(s0r1.S0R1Error) as info:
        s0r1.parse_command(frame)
    assert info.value.command == command


def test_broker_messages_are_one_command_frame_or_replies_behind_an_empty_frame() -> None:
    assert s0r1.split_from_broker([b"CREDIT 4"]) == b"CREDIT 4"
    replies = [b"S 1:1, HTTP/1.1 200 OK\r\n\r\n", b"S 1:2, "]
    assert s0r1.replies_message(replies) == [b"", *replies]
    assert s0r1.split_from_broker(s0r1.replies_message(replies)) == s0r1.Replies(replies)
    for bad in ([], [b"CREDIT 4", b"x"], [b"x", b""]):
        with pytest.raises(s0r1.S0R1Error):
            s0r1.split_from_broker(bad)
    with pytest.raises(ValueError):
        s0r1.replies_message([])


@pytest.mark.parametrize("control", list(s0r1.Control))
def test_relay_control_messages_and_each_truncation(control: s0r1.Control) -> None:
    frames = s0r1.control_message(control)
    assert frames == [b"", control.value]
    assert s0r1.parse_from_relay(frames) is control
    for n in range(len(frames)):  # fewer frames
        with pytest.raises(s0r1.S0R1Error):
            s0r1.parse_from_relay(frames[:n])
    for end in range(len(control.value)):  # a shorter second frame
        with pytest.raises(s0r1.S0R1Error):
            s0r1.parse_from_relay([b"", control.value[:end]])
    for extra in ([b""], [b"x"], [control.value]):  # more frames
        with pytest.raises(s0r1.S0R1Error):
            s0r1.parse_from_relay(frames + extra)
    with pytest.raises(s0r1.S0R1Error):
        s0r1.parse_from_relay([b"", control.value + b" "])


def test_a_batch_is_any_frames_whose_first_is_not_empty_taken_as_they_are() -> None:
    frames = [b"S 1 / 2:{},0:,", b"", b"S 2 @* 17:{}"]  # the dispatcher judges each one
    batch = s0r1.parse_from_relay(frames)
    assert isinstance(batch, s0r1.Batch) and batch.messages is frames


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | st.sampled_from([frame for frame, _ in COMMANDS]).flatmap(
    lambda frame: st.integers(0, len(frame)).map(lambda n: frame[:n])))
def test_any_frame_parses_or_raises_s0r1_error_only(frame: bytes) -> None:
    command = decoded_or_error(frame)
    if command is not None:  # whatever parsed encodes to a frame that parses the same
        assert s0r1.parse_command(s0r1.encode_command(command)) == command


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=12) | st.sampled_from([b"", b"BYE", b"WHO", b"HEARTBEAT"]),
                max_size=4))
def test_any_frames_parse_or_raise_s0r1_error_only(frames: list[bytes]) -> None:
    for parse in (s0r1.parse_from_relay, s0r1.split_from_broker):
        try:
            parse(frames)
        except s0r1.S0R1Error:
            pass


def test_a_connection_key_is_the_first_two_words_of_a_mongrel2_message() -> None:
    sender = b"5ca1e000-0000-4000-8000-000000000001"
    assert s0r1.connection_key(sender + b" 17 /path 2:{},0:,") == sender + b" 17"
    assert s0r1.connection_key(sender + b" 17 @* 17:{}") == sender + b" 17"
    for bad in (b"", b"x", b"x ", b" 17 /", b"x  /", sender,
                sender + b" seventeen /path 2:{},0:,", sender + b" 017 /", sender + b" -1 /",
                sender + b" " + b"1" * 21 + b" /"):  # no id a reply could name
        assert s0r1.connection_key(bad) is None
