"""The worker side of the dispatcher: `on_worker`, one S0W1 message.

Commands are handled from a table, h11-style: `TRANSITIONS`
(core/worker_states.py, protocol.md 4.2) says which states of the sender's
identity take each command; `_handlers` maps each command to its method
here, all of one signature. A command its state does not take is answered
BYE from an unregistered identity (section 3.6: "HELLO again"), ERROR 400
from a registered one. Any message from a registered worker is a sign of
life (section 5).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING

from scale0.core.mongrel2_events import Mongrel2Events
from scale0.core.records import Worker, status_of
from scale0.core.worker_states import REMOVED, TRANSITIONS, Row, state_of
from scale0.wire import mongrel2_reply as m2r
from scale0.wire import s0w1 as p

if TYPE_CHECKING:
    from scale0.core.dispatch import DispatchSettings

# (worker or None, identity, frames, now): what every command handler takes.
Handler = Callable[[Worker | None, bytes, list[bytes], float], None]

_unpack_id = struct.Struct(">Q").unpack
_BYE = p.CMD[p.Command.BYE]
_DRAIN = p.CMD[p.Command.DRAIN]


def _not_a_command(w: Worker | None, ident: bytes, frames: list[bytes], now: float) -> None:
    raise AssertionError("an empty row takes no state")


# What a byte that is no worker command gets: a row that no state is in.
_NOT_A_COMMAND: tuple[Handler, Row] = (_not_a_command, {})


class WorkerEvents(Mongrel2Events):
    def __init__(self, settings: DispatchSettings) -> None:
        super().__init__(settings)
        handlers: dict[p.Command, Handler] = {
            p.Command.HELLO: self._cmd_hello,
            p.Command.REPLY: self._on_reply,
            p.Command.RETURN: self._cmd_return,
            p.Command.HEARTBEAT: self._cmd_heartbeat,
            p.Command.READ: self._cmd_read,
            p.Command.DRAIN: self._cmd_drain,
            p.Command.BYE: self._cmd_bye,
        }
        # Command byte -> (its handler, its row of the transition table).
        self._commands: dict[int, tuple[Handler, Row]] = {
            int(command): (handlers[command], row) for command, row in TRANSITIONS.items()}
        # For tests: check the state after each command against TRANSITIONS.
        self.check_transitions = False

    def on_worker(self, ident: bytes, frames: list[bytes], now: float) -> None:
        self._now = now
        if len(frames) < 2 or frames[0] != p.VERSION or len(frames[1]) != 1:
            self.counters.bad_worker += 1
            if frames and frames[0] != p.VERSION:
                self.to_workers.append([ident, *p.error(p.ERR_BAD_VERSION, "expected S0W1")])
            self.warnings.warning("malformed worker", now,
                                  "malformed worker message from %r (%d frames)", ident,
                                  len(frames))
            return
        command = frames[1][0]
        w = self.workers.get(ident)
        if w is not None:
            w.expires_at = now + w.expiry_s
        state = state_of(w)
        handler, row = self._commands.get(command, _NOT_A_COMMAND)
        try:
            if state in row:
                handler(w, ident, frames, now)
            elif state is REMOVED:
                # Unknown worker (e.g. after a broker restart): ask it to say HELLO.
                self.to_workers.append([ident, p.VERSION, _BYE])
            else:
                raise p.WireError(f"unknown command {command:#x}")
        except p.WireError as exc:
            self.counters.bad_worker += 1
            self.warnings.warning("bad worker", now, "bad message from worker %r: %s", ident, exc)
            self.to_workers.append([ident, *p.error(exc.code, str(exc))])
        if self.check_transitions and state in row:
            after = state_of(self.workers.get(ident))
            if after not in row[state]:
                raise AssertionError(f"{p.Command(command).name} took worker {ident!r} from "
                                     f"{state.value} to {after.value}")

    def _cmd_hello(self, w: Worker | None, ident: bytes, frames: list[bytes],
                   now: float) -> None:
        self._on_hello(ident, frames, now)

    def _cmd_heartbeat(self, w: Worker | None, ident: bytes, frames: list[bytes],
                       now: float) -> None:
        pass  # a sign of life, taken above

    def _cmd_read(self, w: Worker | None, ident: bytes, frames: list[bytes],
                  now: float) -> None:
        assert w is not None  # TRANSITIONS: registered states only
        self._on_read(w, frames)

    def _cmd_return(self, w: Worker | None, ident: bytes, frames: list[bytes],
                    now: float) -> None:
        assert w is not None  # TRANSITIONS: registered states only
        self._on_return(w, frames, now)

    def _cmd_drain(self, w: Worker | None, ident: bytes, frames: list[bytes],
                   now: float) -> None:
        assert w is not None  # TRANSITIONS: registered states only
        w.draining = w.leaving = True
        self._update_ready(w)
        # Ack with DRAIN: every REQUEST sent before it reaches the worker first.
        self.to_workers.append([ident, p.VERSION, _DRAIN])

    def _cmd_bye(self, w: Worker | None, ident: bytes, frames: list[bytes],
                 now: float) -> None:
        if w is not None:  # from an unknown identity: ignored (section 3.6)
            self.remove_worker(w, now, deliberate=True)

    def _on_reply(self, w: Worker | None, ident: bytes, frames: list[bytes], now: float) -> None:
        assert w is not None  # TRANSITIONS: registered states only
        if len(frames) < 4 or frames[3] not in (p.FLAG_MORE, p.FLAG_LAST):
            raise p.WireError("REPLY takes request id, flags, messages")
        rid_frame = frames[2]
        rid: int = (_unpack_id(rid_frame)[0] if len(rid_frame) == 8
                    else p.decode_request_id(rid_frame))  # which raises the WireError
        r = w.in_flight.get(rid)
        if r is None:
            self.counters.late_replies += 1
            return
        last = frames[3] == p.FLAG_LAST
        if not r.cancelled:
            prefix, messages = r.reply_prefix, frames[4:]
            # Check all before forwarding any: a 502 after part of a reply
            # would corrupt the client's stream.
            single = len(messages) == 1  # the usual: one whole response
            if (messages[0].startswith(prefix) if single
                    else all(message.startswith(prefix) for message in messages)):
                link = r.link
                if single:
                    self.to_mongrel2.append((link, messages[0]))
                else:
                    self.to_mongrel2.extend([(link, message) for message in messages])
                if link in self.link_credits and messages:
                    self._unacked_add((link, r.conn_id),
                                      sum(map(len, messages)) - len(prefix) * len(messages))
                if self.record and messages:
                    if not r.reply_started:
                        r.status = status_of(messages[0], len(prefix))
                    r.bytes_out += sum(map(len, messages)) - len(prefix) * len(messages)
                if messages and not last:
                    # A streaming reply is alive: the timeout is between pieces,
                    # not for the whole download. now + timeout is the latest
                    # deadline, so `active` stays in deadline order.
                    r.reply_started = True
                    r.deadline = now + r.service.timeout_s
                    r.service.active.move_to_end(rid)
                elif messages:
                    r.reply_started = True
                elif last and not r.reply_started:
                    self.counters.worker_failures += 1
                    self.warnings.warning("no response", now,
                                          "worker %s ended a request without a response",
                                          w.label)
                    self._reply_error(link, r.sender, r.conn_id, 502, "no response from worker",
                                      close=r.close_after)
                    r.status = 502
                if last:
                    self._record(r, r.status)
            else:
                self.counters.bad_worker += 1
                self.warnings.warning("wrong connection", now,
                                      "worker %s replied to the wrong connection", w.label)
                # Cancelled: the rest is dropped; the slot frees on the LAST reply.
                self._fail(r, 502, "bad reply from worker", close=True)
        if last:
            if r.streamed and not r.body_done and not r.cancelled:
                # Answered before its body was in: Mongrel2 would wait for
                # credits that never come; close (after the response) instead.
                self.to_mongrel2.append((r.link, m2r.close_reply(r.sender, r.conn_id)))
            w.served += 1
            self.counters.replies += 1
            self._finish(r, w, now)
