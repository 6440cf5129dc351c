"""Large messages: sent without copying their bytes values, received without
a last whole-message copy, and paced by the receiver's WINDOW
acknowledgements (CAP_WINDOW), so that small calls on the same connection
find at most a window of them ahead (docs/protocol.md, "Messages larger than
a frame")."""

from __future__ import annotations

import asyncio
import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import node_factory, run_async, spawn_python, stop_all, wait_until, with_nodes

import malla
from malla._ext import core
from malla._testbase import FakeTransport, RecordingOwner
from malla._testbase import deliver as feed
from malla.codec import packb, unpackb

from test_codec import same, values

SMALL_DETACH = 8      # detach threshold for the sans-IO tests: small values suffice


def detachable(value) -> list[bytes]:
    """The bytes values a receiver detaches: bins of at least SMALL_DETACH
    bytes that are msgpack tokens of the message (not inside an extension
    value such as a tuple or a set), in encoding order."""
    if type(value) is bytes:
        return [value] if len(value) >= SMALL_DETACH else []
    if type(value) is list:
        return [b for item in value for b in detachable(item)]
    if type(value) is dict:
        return [b for k, v in value.items() for b in detachable(k) + detachable(v)]
    return []


def reassemble(payload: bytes, cuts: list[int]) -> core.Reassembly:
    part = core.Reassembly(core.FT_REPLY, 0, SMALL_DETACH, 1 << 24)
    at = 0
    for cut in [*sorted(c % (len(payload) + 1) for c in cuts), len(payload)]:
        part.add(payload[at:cut])
        at = max(at, cut)
    return part


blobs = st.binary(min_size=0, max_size=64)
with_blobs = st.recursive(
    st.one_of(values, blobs),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(blobs, c, max_size=3)),
    max_leaves=12)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(with_blobs, st.lists(st.integers(0, 10_000), max_size=8))
def test_reassembly_detaches_bins_and_decodes_the_same_value(value, cuts):
    part = reassemble(packb(value), cuts)
    assert same(part.decode(), value)
    assert part.detached_values == detachable(value)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
def test_reassembly_decodes_arbitrary_bytes_as_the_codec_does(payload, cuts):
    """Any payload, cut anywhere: the same value, or the same kind of failure
    (EncodeError: that message fails; anything else: malformed)."""
    def outcome(decode):
        try:
            return "value", decode()
        except malla.EncodeError as exc:
            return "fails", str(exc)
        except Exception:
            return "malformed", None

    kind, got = outcome(reassemble(payload, cuts).decode)
    want_kind, want = outcome(lambda: unpackb(payload))
    assert kind == want_kind
    if kind != "malformed":
        assert same(got, want)


def test_a_message_ending_inside_a_detached_bin_is_malformed():
    part = reassemble(packb([b"x" * 100, 1])[:60], [])
    assert len(part.detached_values) == 1      # allocated, half filled
    with pytest.raises(ValueError):         # msgpack's "malformed" family
        part.decode()


def test_the_internal_marker_cannot_be_forged():
    # extension code 127 from the wire fails like any code we do not know,
    # whatever its payload (here: what a marker of value 0 would carry)
    forged = msgpack.packb([msgpack.ExtType(core.EXT_DETACHED, b"\x00" * 5), b"y" * 20])
    for decode in (reassemble(forged, [3]).decode, lambda: unpackb(forged)):
        with pytest.raises(malla.EncodeError, match="unknown extension type 127"):
            decode()


# -- the sender ------------------------------------------------------------------

def ready_protocol(window: bool, max_frame: int = 1 << 20, window_size: int = core.WINDOW,
                   max_message: int = 1 << 30):
    owner = RecordingOwner()
    proto = core.Protocol(owner, asyncio.get_running_loop(), True, {}, max_frame, max_message)
    transport = FakeTransport()
    proto.connection_made(transport)
    proto.set_ready("peer", max_frame, window, window_size)
    return owner, proto, transport


async def ticks(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_a_call_too_large_to_send_leaves_nothing_behind():
    # refused before sending: no pending future, no deadline in the heap,
    # nothing half-written in the buffer (the next call goes out whole)
    async def main():
        _owner, proto, transport = ready_protocol(window=False, max_message=1 << 20)
        with pytest.raises(malla.MessageTooLarge):
            proto.call("Svc", "f", [b"x" * (2 << 20)], None, 5000, None, None)
        assert proto.in_flight == 0 and proto.timer_heap_len == 0
        fut = proto.call("Svc", "g", [1], None, 5000, None, None)
        await ticks()
        frames = core.FrameReader(1 << 20).feed(b"".join(transport.writes))
        assert [(t, msgpack.unpackb(p)[1]) for t, _f, _s, p in frames] == [(core.FT_CALL, "g")]
        assert proto.in_flight == 1 and proto.timer_heap_len == 1
        fut.cancel()

    run_async(main())


def test_large_bytes_go_to_the_transport_uncopied_and_arrive_whole():
    async def main():
        _owner, proto, transport = ready_protocol(window=False)
        big = os.urandom(3 * core.SPLIT)
        proto.call("Svc", "f", [big, "tail"], None, 0, None, None)
        await ticks(200)
        assert proto.queued_large == 0
        assert any(b is big or (isinstance(b, memoryview) and b.obj is big)
                   for b in transport.given)
        frames = core.FrameReader(1 << 20).feed(b"".join(transport.writes))
        assert all(len(p) <= core.FRAME_OF_LARGE for _t, _f, _s, p in frames)
        assert [f & core.FLAG_MORE for _t, f, _s, _p in frames] == (
            [core.FLAG_MORE] * (len(frames) - 1) + [0])
        # the frames, reassembled by a receiver, are the call
        part = core.Reassembly(core.FT_CALL, 0, core.DETACH, 1 << 30)
        for chunk in core.FrameReader(1 << 20).feed(b"".join(transport.writes)):
            part.add(chunk[3])
        msg = part.decode()
        assert msg[:4] == ["Svc", "f", [big, "tail"], None]
        assert part.detached_values == [big]

    run_async(main())


def window_frame(consumed: int) -> bytes:
    return core.build_frame(core.FT_WINDOW, core.FLAG_OPTIONAL, 0, packb(consumed))



def sent_of_large(transport: FakeTransport) -> int:
    return sum(len(p) for t, _f, _s, p in core.FrameReader(1 << 20).feed(
        b"".join(transport.writes)) if t == core.FT_CAST)


def test_the_window_bounds_what_is_in_flight_and_acknowledgements_release_more():
    async def main():
        _owner, proto, transport = ready_protocol(window=True)
        proto.cast("Svc", "f", [os.urandom(2 << 20)], None, None)
        await ticks()
        stalled = sent_of_large(transport)                    # stalled at the window
        assert core.WINDOW - core.FRAME_OF_LARGE < stalled <= core.WINDOW
        feed(proto, window_frame(core.FRAME_OF_LARGE))
        await ticks()
        assert stalled < sent_of_large(transport) <= stalled + core.FRAME_OF_LARGE
        assert proto.queued_large == 1
        for _ in range(200):                                  # acknowledge the rest
            feed(proto, window_frame(core.WINDOW))
            await ticks(3)
        assert proto.queued_large == 0
        assert sent_of_large(transport) > 2 << 20
        assert not proto.closed

    run_async(main())


@pytest.mark.parametrize("windows, size", [(False, core.WINDOW), (True, 0)])
def test_without_a_window_a_large_message_is_not_held_back(windows, size):
    """Not negotiated, or window_size=0 (which still acknowledges the peer's)."""
    async def main():
        _owner, proto, transport = ready_protocol(windows, window_size=size)
        assert proto.window == 0
        proto.cast("Svc", "f", [os.urandom(2 << 20)], None, None)
        await ticks(200)
        assert proto.queued_large == 0
        assert sent_of_large(transport) > 2 << 20

    run_async(main())


def test_a_large_call_that_timed_out_is_not_run():
    """The caller gives up while its 64 MB argument is still crossing: the
    rest is not sent, and the callee, which never got all of it, never runs
    the call (and its connection goes on)."""
    ran = []

    class Sink(malla.Service, global_=True):
        def take(self, blob):
            ran.append(len(blob))
            return len(blob)

    async def main(make):
        a = await make("a", max_message_size=128 << 20).start()
        await a.start_service(Sink)
        b = await make("b", seeds=[f"127.0.0.1:{a.address[1]}"],
                       max_message_size=128 << 20).start()
        assert await b.wait_for_services(["Sink"], retries=5)
        with pytest.raises(malla.CallTimeout):
            await b.remote("Sink", "take", [os.urandom(64 << 20)], timeout=5)
        await wait_until(lambda: a._cluster.connected["b"].proto.receiving_large == 0)
        assert await b.remote("Sink", "take", [b"small"]) == 5
        assert ran == [5]

    with_nodes(main)


def test_window_size_is_a_node_setting():
    with pytest.raises(ValueError, match="window_size"):
        malla.Node("w", window_size=1000)

    class Echo(malla.Service, global_=True):
        def echo(self, x):
            return x

    async def main(make):
        a = await make("a", window_size=0).start()
        await a.start_service(Echo)
        b = await make("b", seeds=[f"127.0.0.1:{a.address[1]}"], window_size=64 << 10).start()
        assert await b.wait_for_services(["Echo"], retries=5)
        await wait_until(lambda: "b" in a._cluster.connected)
        assert b._cluster.connected["a"].proto.window == 64 << 10
        assert a._cluster.connected["b"].proto.window == 0
        big = os.urandom(3 << 20)
        assert await b.remote("Echo", "echo", [big]) == big    # paced one way only

    with_nodes(main)


def test_the_receiver_acknowledges_the_frames_of_split_messages_only():
    async def main():
        for window, size in ((True, core.WINDOW), (True, 0), (False, core.WINDOW)):
            _owner, proto, transport = ready_protocol(window, window_size=size)
            payload = core.packb(["Svc", "f", [b"z" * 100_000], None, 0, None, None])
            frames = core.split_message(core.FT_CAST, 2, payload, core.FRAME_OF_LARGE)
            whole = core.build_frame(core.FT_CAST, 0, 4, core.packb(["Svc", "f", [], None,
                                                                      0, None, None]))
            feed(proto, b"".join(frames) + whole)
            acks = [unpackb(p) for t, _f, _s, p in
                    core.FrameReader(1 << 20).feed(b"".join(transport.writes))
                    if t == core.FT_WINDOW]
            # at the end of each read, what it took of split messages
            assert sum(acks) == (len(payload) if window else 0)
            assert (len(acks) > 0) == window
            assert not proto.closed

    run_async(main())


@pytest.mark.parametrize("value", [-1, "x", None, 2 ** 41])
def test_a_malformed_window_frame_is_a_protocol_violation(value):
    async def main():
        _owner, proto, transport = ready_protocol(window=True)
        feed(proto, window_frame(0))                 # a well-formed one is fine
        assert not proto.closed
        feed(proto, core.build_frame(core.FT_WINDOW, core.FLAG_OPTIONAL, 0,
                                     msgpack.packb(value)))
        assert proto.closed and transport.aborted

    run_async(main())


def test_a_window_frame_is_ignored_where_windows_were_not_agreed():
    async def main():
        _owner, proto, _transport = ready_protocol(window=False)
        feed(proto, window_frame(1 << 20) + window_frame(0))
        assert not proto.closed

    run_async(main())


def test_large_messages_queued_behind_the_streaming_one_congest_the_connection():
    """One large message streams while small calls go on; a backlog of more
    large messages makes callers wait (flow control), and frees them as it
    drains."""
    async def main():
        owner, proto, _transport = ready_protocol(window=True)
        proto.cast("Svc", "f", [os.urandom(8 << 20)], None, None)
        assert not proto.writing_paused                  # alone: small calls go on
        for _ in range(4):
            proto.cast("Svc", "f", [os.urandom(core.SPLIT + 1)], None, None)
        assert proto.writing_paused and owner.flow == ["paused"]
        while proto.queued_large:
            feed(proto, window_frame(core.WINDOW))
            await ticks(3)
        assert not proto.writing_paused and owner.flow == ["paused", "resumed"]

    run_async(main())


@pytest.mark.parametrize("windows", [True, False])
def test_a_call_cancelled_while_its_large_message_crosses(windows):
    """With windows, the sender stops sending the message and the receiver
    forgets its part: the call never runs.  Without (an older peer, which
    takes a CANCEL inside a message for a protocol violation), the rest of
    the message goes first, then the CANCEL: the call is cancelled like one
    that has arrived.  Either way the connection stays."""
    async def main():
        _owner, proto, transport = ready_protocol(windows)
        proto.call("Svc", "f", [os.urandom(2 << 20)], None, 0, None, None)
        sid = proto.last_sid
        await ticks(8)
        assert proto.queued_large == 1
        proto.cancel(sid)
        assert proto.queued_large == (0 if windows else 1)
        await ticks(400)
        frames = core.FrameReader(1 << 20).feed(b"".join(transport.writes))
        calls = [f for f in frames if f[0] == core.FT_CALL]
        assert frames[-1][:3] == (core.FT_CANCEL, 0, sid)
        assert all(f[1] & core.FLAG_MORE for f in calls) == windows
        # the receiver (it runs no service: a call that ran would be answered)
        _owner, peer, answers = ready_protocol(windows)
        for chunk in transport.writes:
            feed(peer, chunk)
        await ticks()
        assert peer.receiving_large == 0 and not peer.closed
        answered = [f for f in core.FrameReader(1 << 20).feed(b"".join(answers.writes))
                    if f[0] != core.FT_WINDOW]
        assert (answered == []) == windows     # (no service here: it answers an error)

    run_async(main())


def test_a_cancel_inside_a_message_from_a_peer_without_windows_drops_it():
    """Robustness: such a CANCEL (no sender of ours writes one) is not a
    protocol violation; the call, when its last frame comes, never runs."""
    async def main():
        payload = core.packb(["Svc", "f", [b"z" * 100_000], None, 0, None, None])
        frames = core.split_message(core.FT_CALL, 1, payload, core.FRAME_OF_LARGE)
        cancel = core.build_frame(core.FT_CANCEL, 0, 1)
        _owner, peer, answers = ready_protocol(False)
        feed(peer, frames[0] + cancel + b"".join(frames[1:]))
        await ticks()
        assert peer.receiving_large == 0 and not peer.closed
        assert answers.writes == []

    run_async(main())


@pytest.mark.parametrize("windows", [True, False])
def test_a_large_call_cancelled_before_any_frame_left_is_not_sent(windows):
    async def main():
        _owner, proto, transport = ready_protocol(windows)
        proto.pause_writing()                  # nothing leaves for now
        proto.call("Svc", "f", [os.urandom(1 << 20)], None, 0, None, None)
        proto.cancel(proto.last_sid)
        proto.resume_writing()
        await ticks()
        frames = core.FrameReader(1 << 20).feed(b"".join(transport.writes))
        assert [f[0] for f in frames] == [core.FT_CANCEL]
        assert proto.queued_large == 0 and not proto.writing_paused

    run_async(main())


def test_large_messages_share_the_window_round_robin():
    """A window that frees one frame at a time goes to the messages in turn:
    a 300 KB message queued behind an 8 MB one is done long before it."""
    async def main():
        _owner, proto, transport = ready_protocol(True, window_size=core.FRAME_OF_LARGE)
        proto.cast("Svc", "f", [os.urandom(8 << 20)], None, None)
        proto.cast("Svc", "g", [os.urandom(300_000)], None, None)
        big_sid, small_sid = proto.last_sid - 2, proto.last_sid
        done = {}
        for _ in range(40):
            feed(proto, window_frame(core.FRAME_OF_LARGE))
            await ticks(2)
            for _t, flags, sid, _p in core.FrameReader(1 << 20).feed(
                    b"".join(transport.writes)):
                if not flags & core.FLAG_MORE:
                    done.setdefault(sid, True)
        assert small_sid in done and big_sid not in done
        assert not proto.writing_paused        # one large message left: no backlog

    run_async(main())


def test_what_a_peer_may_have_in_progress_is_bounded():
    """Large `bytes` values are allocated when announced: a peer opening many
    messages that each announce one (and never finish them) gets the ones
    past 4 x max_message_size dropped, and answered MessageTooLarge."""
    async def main():
        limit = 1 << 20
        _owner, proto, transport = ready_protocol(False, max_message=limit)
        size = 900_000
        head = b"\x97\xa3Svc\xa1f\x91\xc6" + size.to_bytes(4, "big") + b"x" * 10
        for sid in range(1, 41, 2):
            feed(proto, core.build_frame(core.FT_CALL, core.FLAG_MORE, sid, head))
        assert proto.receiving_large == 20 and not proto.closed
        assert proto.receiving_bytes <= 4 * limit
        # the last stream was dropped: its end gets MessageTooLarge
        feed(proto, core.build_frame(core.FT_CALL, 0, 39, b"y"))
        errors = [unpackb(p) for t, _f, sid, p in core.FrameReader(1 << 20).feed(
            b"".join(transport.writes)) if t == core.FT_ERROR and sid == 39]
        assert errors and errors[0][1] == "malla.exceptions.MessageTooLarge"
        assert "in progress" in errors[0][2]
        assert proto.receiving_large == 19

    run_async(main())


# -- end to end ----------------------------------------------------------------------

SERVER = """
import asyncio, malla
class Sink(malla.Service, global_=True):
    def take(self, blob):
        return len(blob)
    def echo(self, x):
        return x
async def main():
    node = malla.Node("server", port=0, max_message_size=128 << 20)
    await node.start()
    await node.start_service(Sink)
    print(node.address[1], flush=True)
    await asyncio.Event().wait()
malla.run(main())
"""


def test_small_calls_pass_a_large_message_on_the_same_connection():
    """While 64 MB cross a connection to another process, small calls on it
    keep completing: each finds at most a window of the large message ahead
    of it, not the megabytes the kernel's socket buffers would hold."""
    proc = spawn_python(SERVER)

    async def main():
        port = int(proc.stdout.readline())
        make, made = node_factory()
        try:
            b = await make("b", seeds=[f"127.0.0.1:{port}"], max_message_size=128 << 20).start()
            assert await b.wait_for_services(["Sink"], retries=10)
            big = os.urandom(64 << 20)
            transfer = asyncio.ensure_future(b.remote("Sink", "take", [big], timeout=60_000))
            small = 0
            while not transfer.done():
                assert await b.remote("Sink", "echo", [b"s" * 1024]) == b"s" * 1024
                small += 1
            assert await transfer == len(big)
            # ~500 here; ~5-20 without the window
            print(f"\n{small} small calls during the transfer")
            assert small >= 100, small
            assert b.peers() == ["server"]
        finally:
            await stop_all(made)
            proc.kill()
            proc.wait()

    run_async(main())
