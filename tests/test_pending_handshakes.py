"""Bounded unauthenticated load (DESIGN.md "Identity and authorization"):
`max_pending_handshakes`, on real loopback TCP.

An accepted connection is pending from accept until its handshake succeeds
or it closes; past the limit a new one is closed before anything is read from
it and counted in `stats()["handshakes_refused"]`.  Attackers connect from
127.0.0.2/127.0.0.3 so that the per-address throttle, which their failures
feed, never slows the legitimate nodes on 127.0.0.1.  The hostile-peer
flood (20,000 attempts of four kinds, tests/flood.py) is the last but one.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest
from support import run_async, seed_of, wait_until, with_nodes
from test_identity import Pki

import malla
from malla._ext import core
from malla.acceptor import ACCEPT_BATCH
from malla.guard import HandshakeThrottle
from malla.handshake import Handshake, Hello

from flood import FT_AUTH, HANDSHAKE_KEYS, KINDS, FloodConfig, format_report, run_flood

HANDSHAKE_TIMEOUT = 1.5
# (long enough that the flood's phases and a legitimate dial all happen while
# the idle attackers still hold their slots, under CI load too)
FLOOD_HANDSHAKE_TIMEOUT = 3.0


class Echo(malla.Service, global_=True):
    def echo(self, x):
        return x


def pending(node: malla.Node) -> int:
    return int(node.stats()["handshakes_pending"])


def refused(node: malla.Node) -> int:
    return int(node.stats()["handshakes_refused"])


def connections(node: malla.Node) -> int:
    """The Connection objects the node holds, admitted or not."""
    return len(node._cluster.connections)


async def open_from(node: malla.Node, source: str = "127.0.0.2"):
    return await asyncio.open_connection("127.0.0.1", node.address[1],
                                         local_addr=(source, 0))


async def first_bytes(reader: asyncio.StreamReader, timeout: float = 1.0) -> bytes | None:
    """b"" if the node closed the connection (EOF or reset); None if it kept
    it open, waiting for our HELLO (the dialler speaks first), for `timeout`."""
    try:
        return await asyncio.wait_for(reader.read(65536), timeout)
    except ConnectionResetError:
        return b""
    except asyncio.TimeoutError:
        return None


async def keep_calling(node: malla.Node, stop: asyncio.Event) -> int:
    """Calls, one after another, until `stop`: each must succeed first time."""
    n = 0
    while not stop.is_set():
        assert await node.remote("Echo", "echo", [n], timeout=3000, sna_retries=0) == n
        n += 1
        await asyncio.sleep(0.005)
    return n


async def handshake_with(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         cookie: bytes) -> Exception | None:
    """Drive a dialler's handshake by hand; the error it ended with, if any."""
    hs = Handshake(True, Hello(name="intruder", incarnation=1, hidden=True), cookie)
    frames = core.FrameReader(1 << 20)
    for ftype, payload in hs.start():
        writer.write(core.build_frame(ftype, 0, 0, payload))
    while not hs.done:
        data = await reader.read(65536)
        if not data:
            return None
        for ftype, _flags, _sid, payload in frames.feed(data):
            try:
                out = hs.receive(ftype, payload)
            except malla.MallaError as exc:      # the node's ERROR, raised by the sans-IO side
                return exc
            for out_type, body in out:
                writer.write(core.build_frame(out_type, 0, 0, body))
    return None


def test_max_pending_handshakes_is_validated():
    for wrong in (0, -1, 1.5, True, "8"):
        with pytest.raises(malla.InvalidOption):
            malla.Node("a", max_pending_handshakes=wrong)
    assert malla.Node("a").config.max_pending_handshakes == 256
    assert malla.Node("a").stats()["handshakes_pending"] == 0


def test_connections_past_the_limit_are_closed_unread_and_counted(caplog):
    async def main(make):
        a = await make("a", max_pending_handshakes=8,
                       handshake_timeout=FLOOD_HANDSHAKE_TIMEOUT).start()
        await a.start_service(Echo)
        b = await make("b", seeds=[seed_of(a)]).start()       # established before the flood
        assert await b.wait_for_services(["Echo"], retries=5)
        assert pending(a) == 0
        stop = asyncio.Event()
        caller = asyncio.create_task(keep_calling(b, stop))

        idle = [await open_from(a) for _ in range(50)]
        await wait_until(lambda: pending(a) + refused(a) == 50, timeout=5)
        assert pending(a) == 8 and refused(a) == 42
        seen = await asyncio.gather(*(first_bytes(r) for r, _ in idle))
        assert seen.count(None) == 8                       # kept, awaiting a HELLO
        assert seen.count(b"") == 42                       # EOF at once: closed unread

        # garbage and slowloris bytes while the slots are held: refused unread too
        noisy = []
        for i in range(20):
            reader, writer = await open_from(a)
            writer.write(b"GET / HTTP/1.1\r\n\r\n" if i % 2 else b"\x00")
            noisy.append((reader, writer))
        seen = await asyncio.gather(*(first_bytes(r) for r, _ in noisy))
        assert seen.count(b"") == 20
        assert pending(a) == 8 and refused(a) == 62

        # a legitimate node dialling now is refused too, until the idle ones
        # time out; then it joins
        c = await make("c", seeds=[seed_of(a)], redial_max=0.2).start()
        await wait_until(lambda: refused(a) > 62, timeout=5)
        assert "c" not in a.peers()
        await wait_until(lambda: "c" in a.peers(), timeout=FLOOD_HANDSHAKE_TIMEOUT + 5)
        assert await c.wait_for_services(["Echo"], retries=5)
        assert await c.remote("Echo", "echo", ["c"], sna_retries=0) == "c"
        await wait_until(lambda: pending(a) == 0, timeout=FLOOD_HANDSHAKE_TIMEOUT + 2)

        for _, writer in idle + noisy:
            writer.close()
        stop.set()
        assert await caller > 0         # the established connection served throughout
        assert pending(a) == 0

    # rate-limited: 60-odd refusals, at most one burst of warnings
    with caplog.at_level(logging.WARNING, logger="malla.handshakes"):
        with_nodes(main)
    lines = [r for r in caplog.records if "max_pending_handshakes" in r.getMessage()]
    assert 1 <= len(lines) <= 10


def test_every_way_a_handshake_ends_frees_its_slot():
    async def main(make):
        a = await make("a", max_pending_handshakes=1,
                       handshake_timeout=HANDSHAKE_TIMEOUT).start()
        await a.start_service(Echo)

        # closed by the stranger mid-handshake
        reader, writer = await open_from(a)
        assert await first_bytes(reader, timeout=0.2) is None
        assert pending(a) == 1
        writer.close()
        await wait_until(lambda: pending(a) == 0, timeout=2)

        # timed out
        reader, writer = await open_from(a)
        assert await first_bytes(reader, timeout=0.2) is None
        assert pending(a) == 1
        await wait_until(lambda: pending(a) == 0, timeout=HANDSHAKE_TIMEOUT + 2)
        writer.close()

        # failed: garbage, then a wrong cookie
        reader, writer = await open_from(a, "127.0.0.3")
        writer.write(b"GET / HTTP/1.1\r\n\r\n" * 4)
        await wait_until(lambda: pending(a) == 0, timeout=2)
        writer.close()
        reader, writer = await open_from(a, "127.0.0.4")
        refusal = await asyncio.wait_for(handshake_with(reader, writer, b"another-cookie-x"), 2)
        assert isinstance(refusal, malla.AuthenticationError)
        await wait_until(lambda: pending(a) == 0, timeout=2)
        writer.close()

        # succeeded: a node joins through the one slot, which is free again
        b = await make("b", seeds=[seed_of(a)]).start()
        assert await b.wait_for_services(["Echo"], retries=5)
        assert pending(a) == 0
        assert refused(a) == 0          # one at a time: nothing was over the limit
        # dialled connections never count: b's own dial to a is not pending on b
        assert pending(b) == 0

    with_nodes(main)


def test_under_tls_a_connection_is_pending_from_accept_through_its_tls_handshake(tmp_path):
    """The TLS handshake comes before the node's own: a stranger stalling it,
    or failing it, holds a slot as long as it lasts (handshake_timeout at
    most), and leaves nothing behind."""
    pki = Pki(tmp_path)

    async def main(make):
        a = await make("a", max_pending_handshakes=2, handshake_timeout=HANDSHAKE_TIMEOUT,
                       **pki.node_settings("a", uri=("a",))).start()
        await a.start_service(Echo)
        # no ClientHello at all: the two first wait in their TLS handshake,
        # the third is refused
        stalled = [await open_from(a) for _ in range(3)]
        await wait_until(lambda: pending(a) + refused(a) == 3, timeout=5)
        assert (pending(a), refused(a)) == (2, 1)
        await wait_until(lambda: pending(a) == 0, timeout=HANDSHAKE_TIMEOUT + 3)
        # a failed TLS handshake frees its slot at once
        reader, writer = await open_from(a, "127.0.0.3")
        writer.write(b"GET / HTTP/1.1\r\n\r\n" * 4)
        assert await first_bytes(reader, timeout=2) in (b"", None)
        await wait_until(lambda: pending(a) == 0, timeout=2)
        # neither left a Connection behind; a node with a certificate joins
        assert connections(a) == 0
        b = await make("b", seeds=[seed_of(a)], **pki.node_settings("b", uri=("b",))).start()
        assert await b.wait_for_services(["Echo"], retries=5)
        assert pending(a) == 0 and connections(a) == 1
        for _, w in [*stalled, (reader, writer)]:
            w.close()

    with_nodes(main)


def test_failed_tls_handshakes_are_counted_and_throttle_their_address(tmp_path):
    """Garbage sent to a TLS port fails in the TLS layer, before the node's
    own handshake: it still counts in handshakes_failed, and an address that
    keeps failing is closed at once, like one failing the cookie check."""
    pki = Pki(tmp_path)

    async def main(make):
        a = await make("a", **pki.node_settings("a", uri=("a",))).start()
        throttle = a._cluster.throttle
        for _ in range(throttle.free):
            reader, writer = await open_from(a, "127.0.0.4")
            writer.write(b"GET / HTTP/1.1\r\n\r\n" * 4)
            assert await first_bytes(reader, timeout=2) in (b"", None)
            writer.close()
        await wait_until(lambda: a.stats()["handshakes_failed"] == throttle.free, timeout=5)
        assert a.stats()["handshakes_throttled"] == 0
        # the next one from that address is closed unread; another address is not
        _, writer = await open_from(a, "127.0.0.4")
        await wait_until(lambda: a.stats()["handshakes_throttled"] == 1, timeout=5)
        writer.close()
        await make("b", seeds=[seed_of(a)], **pki.node_settings("b", uri=("b",))).start()
        await wait_until(lambda: "b" in a.peers(), timeout=5)
        assert a.stats()["handshakes_failed"] == throttle.free

    with_nodes(main)


def test_a_turn_of_the_loop_accepts_at_most_a_batch():
    """Connections waiting in the backlog are taken ACCEPT_BATCH per turn of
    the event loop: what else is ready runs in between."""
    async def main(make):
        a = await make("a", max_pending_handshakes=4).start()
        acceptor = a._cluster._server
        # (blocking connects: the kernel completes them from its backlog
        # while this turn of the loop goes on)
        waiting = [socket.create_connection(a.address, source_address=("127.0.0.2", 0))
                   for _ in range(3 * ACCEPT_BATCH)]
        acceptor._accept(acceptor.sockets[0])      # one turn's accepting
        assert pending(a) + refused(a) == ACCEPT_BATCH
        await wait_until(lambda: pending(a) + refused(a) == 3 * ACCEPT_BATCH, timeout=5)
        assert (pending(a), refused(a)) == (4, 3 * ACCEPT_BATCH - 4)
        for sock in waiting:
            sock.close()

    with_nodes(main)


def test_the_throttle_forgets_its_oldest_address_past_its_bound():
    t = HandshakeThrottle(free=1, base=10.0, max_entries=3)
    for host in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        t.failed(host)
    t.failed("10.0.0.1")                # a new failure makes 10.0.0.1 the newest
    t.failed("10.0.0.4")                # past the bound: 10.0.0.2, the oldest, goes
    assert len(t) == 3
    assert t.blocked("10.0.0.1") and t.blocked("10.0.0.3") and t.blocked("10.0.0.4")
    assert not t.blocked("10.0.0.2")
    many = HandshakeThrottle()
    for i in range(30_000):             # each failure O(1): this takes milliseconds
        many.failed(f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
    assert len(many) == 10_000


# The flood's peak resident-memory growth of the attacked node: at most 256
# connections pending at once, each holding its buffers (about 36 KiB) for up
# to handshake_timeout, are some 9 MiB; measured 6-7 MiB (docs/security.md).
# Wide slack: what it must catch is growth with the attempts (20,000 of them).
FLOOD_RSS_BOUND_MIB = 32


@pytest.mark.serial
def test_a_hostile_flood_of_20000_attempts_leaves_calls_and_memory_alone():
    """tests/flood.py: 20,000 attempts (idle, slowloris, garbage, replayed
    handshakes; 1,000 from one address, the rest from 2,000) against a node
    in its own process, while a legitimate node keeps calling it.  (`make
    soak` runs 200,000 and reports the calls' p99 beside the idle p99.)"""
    # (500 idle calls, not 2,000: their p99 is not asserted here, and each
    # is a millisecond apart -- make test is near its budget)
    report = run_flood(FloodConfig(one_address=1_000, many=19_000, idle_calls=500), timeout=150)
    print("\n" + format_report(report))
    assert report["attacker"]["attempts"] == 20_000
    check_flood(report)


def check_flood(report: dict) -> None:
    """What must hold of every flood (tests/long_soak.py's too)."""
    cfg, attacker, node = report["config"], report["attacker"], report["node"]
    kinds = attacker["by_kind"]
    attempts = cfg["one_address"] + cfg["many"]
    # the flood really happened: every attempt made, of every kind, each
    # connection closed by the node and counted there once -- refused at the
    # limit, throttled, or failed.  (Slack for the kernel: past the listen
    # backlog a connection the client sees as open may not be accepted for a
    # while; one the attacker gave up on after handshake_timeout + 10 s is
    # `outlived`, and never counted by the node.)
    assert attacker["attempts"] == attempts
    assert all(kinds[f"many:{k}"]["connected"] > 0 for k in KINDS)
    connected, outlived = attacker["connected"], attacker["outlived"]
    assert 0.99 * attempts <= connected and outlived <= attempts // 100, attacker
    done = {k: node["after"][k] - node["before"][k] for k in HANDSHAKE_KEYS[1:]}
    assert 0.99 * (connected - outlived) <= sum(done.values()) <= connected, (done, attacker)
    # the limit held and was reached; the one address was throttled
    assert node["max_pending"] <= cfg["max_pending_handshakes"]
    assert done["handshakes_refused"] > 0
    assert done["handshakes_throttled"] >= cfg["one_address"] // 2
    assert node["after"]["handshakes_pending"] == 0
    # replayed handshakes got as far as the proof, and no further: the
    # acceptor answered them (its HELLO), then refused the stale proof, and
    # never sent its own
    replies = attacker["replay_replies"]
    replayed = kinds["many:replay"]["answered"] + kinds["one:replay"]["answered"]
    assert replies.get("auth_failed", 0) == replayed > 0, replies
    assert str(FT_AUTH) not in replies, replies
    # a stranger that has not sent a whole HELLO is told nothing
    assert kinds["many:idle"]["answered"] == kinds["many:slowloris"]["answered"] == 0
    # every legitimate call succeeded (keep_calling asserts each), throughout
    assert report["calls"]["flood"]["count"] > 0
    rss = report["rss_kib"]
    assert rss["peak"] - rss["before"] < FLOOD_RSS_BOUND_MIB * 1024, rss


def test_stop_closes_pending_handshakes():
    # run_async directly: the node must be stopped with its strangers still open
    async def main():
        a = await malla.Node("a", port=0, max_pending_handshakes=3).start()
        try:
            conns = [await open_from(a) for _ in range(4)]
            await wait_until(lambda: pending(a) + refused(a) == 4, timeout=5)
            assert (pending(a), refused(a)) == (3, 1)
        finally:
            await a.stop()
        assert pending(a) == 0           # stop() closed the pending ones
        for _, writer in conns:
            writer.close()

    run_async(main(), timeout=30)


def test_a_stop_in_the_turn_of_an_accept_frees_the_slots_and_the_sockets():
    """close() in the same turn of the loop as an accept: the tasks that
    would admit those connections are cancelled before their first step,
    and their slots and sockets are freed all the same."""
    from malla.acceptor import Acceptor
    from malla.handshakes import PendingHandshakes

    async def main():
        pending = PendingHandshakes(64, "n")
        made: list[asyncio.Protocol] = []
        acceptor = Acceptor(lambda key: made.append(asyncio.Protocol()) or made[-1], pending,
                            HandshakeThrottle(), None, 1.0)
        await acceptor.listen("127.0.0.1", 0)
        address = acceptor.sockets[0].getsockname()
        clients = [socket.create_connection(address) for _ in range(ACCEPT_BATCH)]
        try:
            time.sleep(0.05)     # (all of them in the backlog, the loop held meanwhile)
            acceptor._accept(acceptor.sockets[0])    # what the reader callback does
            assert len(pending) == ACCEPT_BATCH
            acceptor.close()                     # node.stop(), in the same turn
            await asyncio.sleep(0.05)
            assert len(pending) == 0 and made == []
            for client in clients:               # closed on our side: end of stream
                client.settimeout(5)
                assert client.recv(1) == b""
        finally:
            for client in clients:
                client.close()

    run_async(main())


def test_a_start_that_could_not_listen_can_be_tried_again():
    async def main(make):
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        node = make("n", port=port)
        with pytest.raises(OSError):
            await node.start()
        blocker.close()
        await node.start()                       # (it returned at once, not listening)
        assert node.address[1] == port
        socket.create_connection(("127.0.0.1", port), timeout=5).close()

    with_nodes(main)
