"""The connection state machine of the core, driven by hypothesis (stateful).

A ``malla._core.Protocol`` (the dialling side) on a fake transport is taken
through any order of: handshake frames before ``set_ready``, ``set_ready``,
incoming CALL / REPLY / ERROR / CANCEL / HEARTBEAT / unknown optional /
unknown mandatory / malformed frames (built with ``build_frame`` and
``packb``, split into several frames when large), outgoing calls
(``proto.call``), their timeouts and cancellation, a close by us and the loss
of the connection.  A model follows what must happen; after every step:

* ``in_flight`` counts exactly the calls still waiting for their answer;
* every future is resolved at most once, and only as the model says;
* a reply (or error) to an unknown, timed-out or cancelled call is ignored;
* an unknown OPTIONAL frame is skipped, the connection stays open;
* after a protocol violation the transport is aborted and, once the loop
  has delivered the connection's loss, every pending future has failed;
* ``buffer_updated`` never raises, and no violation is an "internal error".

The fake transport stands in for TCP here only; the same paths run over
real sockets in the other tests (DESIGN.md, "Project conventions").
"""

from __future__ import annotations

import asyncio
import math
import time

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import malla
from malla import exceptions as mexc
from malla._ext import core
from malla._testbase import FakeTransport as RecordingTransport
from malla._testbase import RecordingOwner, deliver
from malla.codec import packb, unpackb
from malla.service import RunningService

MAX_FRAME = 1024


class Echo(malla.Service):
    def echo(self, *args):
        return list(args)

    async def aecho(self, *args):
        return list(args)

    async def wait(self):
        await asyncio.sleep(3600)


class FakeTransport(RecordingTransport):
    """Records writes; close/abort deliver connection_lost on the next loop
    iteration, as asyncio's transports do."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.proto: core.Protocol | None = None
        self.writes_after_abort = 0

    def write(self, data) -> None:
        if self.aborted:       # asyncio drops these; so do we
            self.writes_after_abort += 1
            return
        super().write(data)

    def _lose(self) -> None:
        if not self.closed:
            self.closed = True
            self.loop.call_soon(self.proto.connection_lost, None)

    def close(self) -> None:
        self._lose()

    def abort(self) -> None:
        self.aborted = True
        self._lose()


class _Timer:
    def __init__(self, callback, args) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class ManualTimers:
    """The event loop as the core sees it, except that its timers (call
    timeouts) fire only when `fire()` says so: the machine stays
    deterministic however slow a step is."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.timers: list[_Timer] = []

    def __getattr__(self, name: str):
        return getattr(self._loop, name)

    def call_later(self, delay, callback, *args):
        timer = _Timer(callback, args)
        self.timers.append(timer)
        return timer

    def fire(self) -> None:
        timers, self.timers = self.timers, []
        for timer in timers:
            if not timer.cancelled:
                timer.callback(*timer.args)


Owner = RecordingOwner


values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1),
              st.floats(allow_nan=False), st.text(max_size=20), st.binary(max_size=20)),
    lambda c: st.one_of(st.lists(c, max_size=4), st.tuples(c, c),
                        st.dictionaries(st.text(max_size=5), c, max_size=4)),
    max_leaves=8)
big_values = st.binary(min_size=MAX_FRAME, max_size=3 * MAX_FRAME)
# Rules that end the connection act on a roll of 0 only, so that most runs
# get far before one of them ends it.
ROLL = st.integers(0, 7)

ERROR_CLASSES = {1: mexc.ServiceNotAvailable, 2: mexc.Overloaded, 3: mexc.UnknownFunction,
                 4: mexc.RemoteError, 5: mexc.MessageTooLarge, 6: mexc.CallTimeout,
                 7: mexc.ProtocolError, 8: mexc.EncodeError, 10: mexc.BadArguments,
                 99: mexc.RemoteError}


class ConnectionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        # not silenced: an exception in any scheduled callback fails the run
        self.loop_errors: list[str] = []
        self.loop.set_exception_handler(
            lambda loop, ctx: self.loop_errors.append(str(ctx.get("exception") or ctx)))
        self.owner = Owner()
        self.timers = ManualTimers(self.loop)
        self.proto = core.Protocol(self.owner, self.timers, True,
                                   {"Echo": RunningService(Echo())}, MAX_FRAME, 1 << 20)
        self.transport = FakeTransport(self.loop)
        self.transport.proto = self.proto
        self.proto.connection_made(self.transport)
        # the model
        self.ready = False
        self.violated = False
        self.closing = False           # closed by us
        self.pending: dict[int, asyncio.Future] = {}
        self.expect: dict[int, object] = {}       # sid -> expected result / exception class
        self.short: set[int] = set()              # calls with a 1 ms timeout
        self.forgotten: set[int] = set()          # answered, timed out or cancelled
        self.abandoned: set[int] = set()          # cancelled by us: the caller owns them
        self.futures: dict[int, asyncio.Future] = {}
        self.resolutions: dict[int, int] = {}
        self.peer_sid = 2                         # the acceptor's streams are even
        self.incoming: dict[int, str] = {}        # peer call sid -> fun
        self.running: set[int] = set()

    # -- helpers -----------------------------------------------------------------

    @property
    def open(self) -> bool:
        return not (self.violated or self.closing or self.transport.closed)

    def run_soon(self, times: int = 3) -> None:
        for _ in range(times):
            self.loop.run_until_complete(asyncio.sleep(0))

    def feed(self, data: bytes) -> None:
        async def go() -> None:
            deliver(self.proto, data)
        self.loop.run_until_complete(go())
        self.run_soon()

    def message(self, ftype: int, sid: int, payload: bytes, flags: int = 0) -> bytes:
        return b"".join(core.split_message(ftype, sid, payload, MAX_FRAME, flags))

    def violation(self) -> None:
        self.violated = True
        self.run_soon()

    def written(self) -> list[tuple[int, int, int, bytes]]:
        reader = core.FrameReader(1 << 30)
        frames: list[tuple[int, int, int, bytes]] = []
        for chunk in self.transport.writes:
            frames.extend(reader.feed(chunk))
        return frames

    def settle(self, sid: int) -> None:
        self.pending.pop(sid, None)
        self.short.discard(sid)
        self.forgotten.add(sid)

    def track(self, sid: int, fut: asyncio.Future) -> None:
        self.futures[sid] = fut
        self.resolutions[sid] = 0

        def done(f: asyncio.Future) -> None:
            self.resolutions[sid] += 1
        fut.add_done_callback(done)

    # -- before the handshake ends -----------------------------------------------------------

    @precondition(lambda self: not self.ready and self.open)
    @rule(ftype=st.sampled_from([core.FT_HELLO, core.FT_AUTH, core.FT_ERROR]),
          payload=st.binary(max_size=64))
    def handshake_frame(self, ftype, payload):
        before = len(self.owner.handshake_frames)
        self.feed(core.build_frame(ftype, 0, 0, payload))
        assert self.owner.handshake_frames[before:] == [(ftype, payload)]
        assert not self.proto.closed

    @precondition(lambda self: not self.ready and self.open)
    @rule(ftype=st.sampled_from([core.FT_CALL, core.FT_REPLY, core.FT_HEARTBEAT,
                                 core.FT_TABLE, 0x7F]),
          optional=st.booleans(), roll=ROLL)
    def frame_before_handshake(self, ftype, optional, roll):
        if not optional and roll:
            return
        self.feed(core.build_frame(ftype, core.FLAG_OPTIONAL if optional else 0, 0, b""))
        if optional:
            assert not self.proto.closed
        else:
            self.violation()

    @precondition(lambda self: not self.ready and self.open)
    @rule()
    def call_before_ready(self):
        try:
            self.proto.call("Echo", "echo", [], None, 1000, None, None)
        except mexc.ServiceNotAvailable:
            pass
        else:
            raise AssertionError("a call before the handshake was sent")

    @precondition(lambda self: not self.ready and self.open)
    @rule()
    def set_ready(self):
        self.proto.set_ready("peer", MAX_FRAME)
        self.ready = True
        assert self.proto.ready

    # -- outgoing calls ---------------------------------------------------------------

    @precondition(lambda self: self.ready and self.open)
    @rule(timeout=st.sampled_from([0, 1, 60_000]), args=st.lists(values, max_size=2))
    def call(self, timeout, args):
        writes = len(self.written())
        fut = self.proto.call("Svc", "f", args, None, timeout, None, None)
        sid = self.proto.last_sid
        assert sid % 2 == 1 and sid not in self.futures, "stream id reused"
        self.pending[sid] = fut
        self.track(sid, fut)
        if timeout == 1:
            self.short.add(sid)
        self.run_soon()                  # under load, writes wait for the tick's end
        sent = [f for f in self.written()[writes:] if f[2] == sid]
        assert [f[0] for f in sent] == [core.FT_CALL]

    @precondition(lambda self: self.short and self.open)
    @rule()
    def timeouts_pass(self):
        time.sleep(0.005)                 # past the short calls' 1 ms
        self.timers.fire()
        self.run_soon()
        for sid in list(self.short):
            fut = self.futures[sid]
            assert fut.done() and isinstance(fut.exception(), mexc.CallTimeout)
            self.settle(sid)
            # and the peer is told to cancel it
            assert any(f[0] == core.FT_CANCEL and f[2] == sid for f in self.written())

    @precondition(lambda self: self.pending and self.open)
    @rule(data=st.data())
    def cancel_call(self, data):
        sid = data.draw(st.sampled_from(sorted(self.pending)))
        assert self.proto.cancel(sid)
        self.settle(sid)
        self.abandoned.add(sid)
        self.run_soon()
        assert any(f[0] == core.FT_CANCEL and f[2] == sid for f in self.written())
        assert not self.proto.cancel(sid)

    # -- incoming answers ---------------------------------------------------------------

    def pick_sid(self, data, which: str) -> int:
        if which == "pending" and self.pending:
            return data.draw(st.sampled_from(sorted(self.pending)))
        if which == "forgotten" and self.forgotten:
            return data.draw(st.sampled_from(sorted(self.forgotten)))
        # never used: even ids are the peer's, odd ones past ours are unknown
        return data.draw(st.sampled_from([0, 2, 4, 10**6 + 1, 2**64 - 1]))

    @precondition(lambda self: self.ready and self.open)
    @rule(data=st.data(), which=st.sampled_from(["pending", "forgotten", "unknown"]),
          value=values | big_values)
    def reply(self, data, which, value):
        sid = self.pick_sid(data, which)
        was_pending = sid in self.pending
        if sid == 0 and not was_pending:
            return        # stream 0 is never split; a small reply on it is just ignored
        self.feed(self.message(core.FT_REPLY, sid, packb(value)))
        assert not self.proto.closed
        if was_pending:
            fut = self.futures[sid]
            assert fut.done() and packb(fut.result()) == packb(value)
            assert type(fut.result()) is type(value)
            self.settle(sid)

    @precondition(lambda self: self.ready and self.open)
    @rule(data=st.data(), which=st.sampled_from(["pending", "forgotten", "unknown"]),
          code=st.sampled_from(sorted(ERROR_CLASSES)))
    def error(self, data, which, code):
        sid = self.pick_sid(data, which)
        was_pending = sid in self.pending
        before = len(self.owner.connection_errors)
        self.feed(core.build_frame(core.FT_ERROR, 0, sid,
                                   packb([code, "builtins.ValueError", "no", "tb"])))
        assert not self.proto.closed
        if sid == 0:
            # a connection-level error goes to the owner, which decides
            assert len(self.owner.connection_errors) == before + 1
        if was_pending:
            exc = self.futures[sid].exception()
            # (a remote builtin's RemoteError is also that builtin: a subclass)
            assert (type(exc) is ERROR_CLASSES[code]
                    or type(exc).__bases__[0] is ERROR_CLASSES[code]), (code, exc)
            if code == 6:
                assert exc.sent is False      # refused unstarted: it did not run
            self.settle(sid)

    @precondition(lambda self: self.pending and self.ready and self.open)
    @rule(data=st.data(), payload=st.sampled_from([b"\xc1", b"\x92\x01", b"\x01\x02"]),
          roll=ROLL)
    def malformed_reply(self, data, payload, roll):
        if roll:
            return
        sid = data.draw(st.sampled_from(sorted(self.pending)))
        self.feed(core.build_frame(core.FT_REPLY, 0, sid, payload))
        assert isinstance(self.futures[sid].exception(), mexc.ProtocolError)
        self.settle(sid)
        self.violation()

    # -- incoming calls -----------------------------------------------------------------

    @precondition(lambda self: self.ready and self.open)
    @rule(fun=st.sampled_from(["echo", "aecho", "wait", "nope", "_private"]),
          service=st.sampled_from(["Echo", "Echo", "Missing"]),
          args=st.lists(values, max_size=3),
          deadline=st.sampled_from([None, 5000, 0.5, 0, "soon", 2**1100, math.nan]))
    def incoming_call(self, fun, service, args, deadline):
        sid = self.peer_sid
        self.peer_sid += 2
        if fun == "wait":
            args = []
        self.feed(self.message(core.FT_CALL, sid,
                               packb([service, fun, args, None, 5000, deadline, None])))
        assert not self.proto.closed
        answers = [f for f in self.written() if f[2] == sid]
        if service == "Missing":
            expected = ("error", mexc.ERR_SERVICE_NOT_AVAILABLE)
        elif fun in ("nope", "_private"):
            expected = ("error", mexc.ERR_UNKNOWN_FUNCTION)
        elif deadline in ("soon", 2**1100) or deadline != deadline:
            # not a budget in ms: a malformed call (found by fuzz/fuzz_frames.py)
            expected = ("error", mexc.ERR_BAD_REQUEST)
        elif deadline == 0:
            expected = ("error", mexc.ERR_DEADLINE)
        elif fun == "wait":
            expected = None
        else:
            expected = ("reply", args)
        if expected is None:
            assert answers == []
            self.running.add(sid)
            return
        assert len(answers) == 1, answers
        ftype, _flags, _sid, body = answers[0]
        if expected[0] == "error":
            assert ftype == core.FT_ERROR and unpackb(body)[0] == expected[1]
        else:
            assert ftype == core.FT_REPLY and packb(unpackb(body)) == packb(args)

    @precondition(lambda self: self.ready and self.open)
    @rule(data=st.data())
    def incoming_cancel(self, data):
        pool = sorted(self.running) or [self.peer_sid + 100]
        sid = data.draw(st.sampled_from(pool))
        writes = len(self.written())
        self.feed(core.build_frame(core.FT_CANCEL, 0, sid))
        self.running.discard(sid)
        assert not self.proto.closed
        # a cancelled call is not answered
        assert [f for f in self.written()[writes:] if f[2] == sid] == []

    # -- control frames --------------------------------------------------------------------

    @precondition(lambda self: self.ready and self.open)
    @rule(ack=st.booleans(), sid=st.sampled_from([0, 7, 2**64 - 1]))
    def heartbeat(self, ack, sid):
        writes = len(self.written())
        self.feed(core.build_frame(core.FT_HEARTBEAT, core.FLAG_ACK if ack else 0, sid))
        assert not self.proto.closed
        new = self.written()[writes:]
        if ack:
            assert [(f[0], f[1], f[2]) for f in new] == [(core.FT_HEARTBEAT, 0, sid)]
        else:
            assert new == []     # an answer to no ping of ours: nothing happens

    @precondition(lambda self: self.ready and self.open)
    @rule(answered=st.booleans())
    def ping(self, answered):
        # a ping waits in the pending table until the peer's HEARTBEAT of
        # the same stream id answers it; held meanwhile, forgotten after
        writes = len(self.written())
        fut = self.proto.ping()
        self.run_soon()
        sent = [f for f in self.written()[writes:] if f[0] == core.FT_HEARTBEAT]
        assert [f[1] for f in sent] == [core.FLAG_ACK] and not fut.done()
        assert self.proto.debug_held()[0] == self.proto.in_flight + 1
        if answered:
            self.feed(core.build_frame(core.FT_HEARTBEAT, 0, sent[0][2]))
            assert fut.done() and fut.result() is None
        self.proto.forget_ping(fut)
        assert self.proto.debug_held()[0] == self.proto.in_flight
        fut.cancel()

    @precondition(lambda self: self.ready and self.open)
    @rule(ftype=st.integers(core.FT_CREDIT + 1, 255), payload=st.binary(max_size=3 * MAX_FRAME),
          sid=st.sampled_from([5, 2**40]))
    def unknown_optional(self, ftype, payload, sid):
        self.feed(self.message(ftype, sid, payload, core.FLAG_OPTIONAL))
        assert not self.proto.closed

    @precondition(lambda self: self.ready and self.open)
    @rule(ftype=st.integers(core.FT_CREDIT + 1, 255), roll=ROLL)
    def unknown_mandatory(self, ftype, roll):
        if roll:
            return
        self.feed(core.build_frame(ftype, 0, 0, b""))
        assert self.proto.closed and self.transport.aborted
        self.violation()

    @precondition(lambda self: self.ready and self.open)
    @rule(ftype=st.sampled_from([core.FT_HELLO, core.FT_AUTH]), roll=ROLL)
    def handshake_frame_after_ready(self, ftype, roll):
        if roll:
            return
        self.feed(core.build_frame(ftype, 0, 0, b"x"))
        self.violation()

    @precondition(lambda self: self.open)
    @rule(roll=ROLL)
    def oversized_frame(self, roll):
        if roll:
            return
        # a header announcing more than the frame limit: refused at once
        self.feed(core.build_frame(core.FT_REPLY, 0, 1, b"")[:4] + b"\x7f\xff\xff\xff"
                  + b"\x00" * 8)
        self.violation()

    # -- the end ------------------------------------------------------------------------

    @precondition(lambda self: self.open)
    @rule(roll=ROLL)
    def close_by_us(self, roll):
        if roll:
            return
        self.proto.close()
        self.closing = True
        self.run_soon()

    @precondition(lambda self: not self.transport.closed)
    @rule(roll=ROLL)
    def connection_lost(self, roll):
        if roll:
            return
        self.transport.closed = True
        self.proto.connection_lost(ConnectionResetError("reset by peer"))
        self.run_soon()

    # -- invariants ---------------------------------------------------------------------

    @invariant()
    def in_flight_counts_the_pending_calls(self):
        if self.transport.closed:
            # lost: every call failed
            assert self.proto.in_flight == 0
            for sid, fut in self.futures.items():
                if sid not in self.abandoned:
                    assert fut.done(), f"call {sid} still pending after the connection's loss"
                    if sid in self.pending:
                        assert isinstance(fut.exception(), (mexc.ConnectionLost,
                                                            mexc.ProtocolError))
            self.pending.clear()
            self.short.clear()
        else:
            assert self.proto.in_flight == len(self.pending)
            for sid, fut in self.pending.items():
                assert not fut.done(), f"call {sid} resolved without an answer"

    @invariant()
    def futures_resolved_at_most_once(self):
        for sid, n in self.resolutions.items():
            assert n <= 1, f"future of call {sid} resolved {n} times"
            if sid in self.abandoned:
                assert n == 0, "a cancelled call's future was resolved by the core"

    @invariant()
    def violations_abort(self):
        if self.violated:
            assert self.proto.closed and self.transport.aborted
            assert self.owner.protocol_errors
        else:
            assert not self.transport.aborted
            assert not self.owner.protocol_errors, self.owner.protocol_errors
        for err in self.owner.protocol_errors:
            assert isinstance(err, mexc.ProtocolError)
            assert not str(err).startswith("internal error"), err

    @invariant()
    def calls_running_here(self):
        if self.transport.closed:
            assert self.proto.running == 0
            self.running.clear()
        else:
            assert self.proto.running == len(self.running)

    @invariant()
    def no_exception_in_callbacks(self):
        assert self.loop_errors == []

    @invariant()
    def lost_once(self):
        assert self.owner.lost == (1 if self.transport.closed else 0)
        assert (self.proto.transport is None) == self.transport.closed

    @rule()
    def idle(self):
        self.run_soon()

    def teardown(self):
        if not self.transport.closed:
            self.transport.closed = True
            self.proto.connection_lost(None)
        self.run_soon()
        self.loop.close()


ConnectionMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TestConnectionStateMachine = ConnectionMachine.TestCase


def test_the_connection_states_follow_one_table():
    # the one table of the core (malla/core/wire.pyx), and a connection's
    # life through it; a change outside it is refused, never made
    assert core.TRANSITIONS == {("handshake", "ready"), ("handshake", "closing"),
                                ("handshake", "closed"), ("ready", "closing"),
                                ("ready", "closed"), ("closing", "closed")}

    async def life() -> list[str]:
        from malla._testbase import FakeTransport, RecordingOwner

        proto = core.Protocol(RecordingOwner(), asyncio.get_running_loop(), True, {})
        proto.connection_made(FakeTransport())
        seen = [proto.state]
        proto.set_ready("peer", 1 << 20)
        seen.append(proto.state)
        try:
            proto.set_ready("peer", 1 << 20)
        except mexc.InternalError:
            seen.append("refused")
        proto.close()
        proto.abort()               # (already closing: stays so)
        seen.append(proto.state)
        proto.connection_lost(None)
        seen.append(proto.state)
        try:
            proto.connection_lost(None)     # closed -> closed is no transition
        except mexc.InternalError:
            seen.append("refused")
        return seen

    assert asyncio.run(life()) == ["handshake", "ready", "refused", "closing", "closed",
                                   "refused"]


def test_the_common_call_takes_one_c_call_and_the_rest_the_full_path():
    # CoreProtocol.try_call: the future of the common call, None for what the
    # caller's full path must decide (it then checks, waits or fails over)
    from malla._testbase import FakeTransport, RecordingOwner
    from malla.arguments import Checker, signature_from_wire

    async def main() -> None:
        proto = core.Protocol(RecordingOwner(), asyncio.get_running_loop(), True, {})
        transport = FakeTransport()
        proto.connection_made(transport)
        assert proto.try_call({}, "b", "S", "f", [1], None, 5000, None) is None  # not ready
        proto.set_ready("b", 1 << 20)
        one = Checker("S.f", signature_from_wire([["x", 1, False]]))
        checks = {"S": {"b": {"f": one}}}
        fut = proto.try_call(checks, "b", "S", "f", [1], None, 5000, None)
        assert fut is not None and proto.in_flight == 1 and proto.timer_heap_len == 1
        for args, kwargs, timeout, fun in [([1, 2], None, 5000, "f"),     # too many
                                           ([1], {"x": 1}, 5000, "f"),    # keywords
                                           ([1], None, 0, "f"),           # a cast
                                           ([1], None, 5000, "g")]:       # unknown
            assert proto.try_call(checks, "b", "S", fun, args, kwargs, timeout, None) is None
        assert proto.in_flight == 1             # none of those was sent
        # a service the table does not know: sent unchecked, as the full path does
        assert proto.try_call(checks, "b", "T", "h", [1, 2, 3], None, 5000, None) is not None
        await asyncio.sleep(0)
        sent = core.FrameReader(1 << 20).feed(b"".join(transport.writes))
        assert [(t, core.unpackb(p)[:3]) for t, _f, _s, p in sent] == [
            (core.FT_CALL, ["S", "f", [1]]), (core.FT_CALL, ["T", "h", [1, 2, 3]])]
        proto.connection_lost(None)
        assert isinstance(fut.exception(), mexc.ConnectionLost)

    asyncio.run(main())
