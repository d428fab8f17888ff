"""Broker lifecycle rules that need no sockets (the constructor does no I/O)."""

from __future__ import annotations

from scale0.net.broker import Broker, LinkSpec


def test_broker_stop_a_second_signal_forces_a_second_graceful_shutdown_does_not() -> None:
    links = [LinkSpec.parse("tcp://127.0.0.1:1,tcp://127.0.0.1:2")]
    by_control = Broker(links, "tcp://127.0.0.1:0")  # the constructor does no I/O
    by_control.stop(force=False)
    by_control.stop(force=False)
    assert by_control.stopping and not by_control._forced
    by_control.stop(force=True)
    assert by_control._forced
    by_signal = Broker(links, "tcp://127.0.0.1:0")
    by_signal.stop()
    assert not by_signal._forced
    by_signal.stop()
    assert by_signal._forced


def test_the_dispatcher_keeps_records_only_while_a_sink_wants_them() -> None:
    links = [LinkSpec.parse("tcp://127.0.0.1:1,tcp://127.0.0.1:2")]
    broker = Broker(links, "tcp://127.0.0.1:0")
    assert not broker.dispatcher.record  # no sink: no per-request record at all
    tapping = [False]
    broker.add_done_sink(lambda batch: None, wanted=lambda: tapping[0])
    assert not broker.dispatcher.record  # a tap nobody subscribed to
    tapping[0] = True
    broker._update_recording()
    assert broker.dispatcher.record
    broker.add_done_sink(lambda batch: None)  # the access log: always
    tapping[0] = False
    broker._update_recording()
    assert broker.dispatcher.record


def test_a_relay_link_without_recv_spec_sends_its_replies_through_the_relay() -> None:
    link = LinkSpec.parse("relay+tcp://10.0.0.1:6781")
    assert (link.send_spec, link.recv_spec, link.relay) == ("tcp://10.0.0.1:6781", "", True)
    assert link.replies_via_relay and str(link) == "relay+tcp://10.0.0.1:6781"
    both = LinkSpec.parse("relay+tcp://127.0.0.1:6781,tcp://127.0.0.1:9996")
    assert not both.replies_via_relay and both.recv_spec == "tcp://127.0.0.1:9996"
    for bad in ("tcp://127.0.0.1:9997", "relay+", "relay+tcp://a:1,", ""):
        try:
            LinkSpec.parse(bad)
        except ValueError as exc:
            assert "SEND_SPEC,RECV_SPEC" in str(exc)
        else:
            raise AssertionError(f"{bad!r} parsed")
