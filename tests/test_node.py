"""Nodes over real loopback TCP: lifecycle, address, peers, connect, the
handshake's refusals (cookie, timeout, garbage, oversized headers), seeds
dialled in the background, duplicate names, new incarnations and heartbeats.

Processes that must die or stop run as real subprocesses (kill -9, SIGSTOP).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import time

import pytest
from support import (
    COOKIE,
    RawPeer,
    free_port,
    kill_process,
    node_factory,
    run_async,
    seed_of,
    spawn_node,
    stop_all,
    wait_until,
    with_nodes,
)

import malla
from malla._ext import core

HEADER = struct.Struct(">BBHIQ")   # type, flags, reserved, length, stream id


class Calc(malla.Service, global_=True):
    def add(self, a, b):
        return a + b


# -- helpers ------------------------------------------------------------------------


async def read_until_eof(reader: asyncio.StreamReader, timeout: float) -> bytes:
    """Everything the peer sends until it closes; fails past `timeout` s."""
    got = b""

    async def drain() -> None:
        nonlocal got
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionResetError, BrokenPipeError):
                return
            if not chunk:
                return
            got += chunk

    await asyncio.wait_for(drain(), timeout)
    return got


async def raw_open(node: malla.Node) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", node.address[1])


# -- lifecycle ---------------------------------------------------------------------


def test_start_stop_address_and_idempotent_stop():
    async def main():
        node = malla.Node("solo", cookie=COOKIE, port=0)
        with pytest.raises(RuntimeError):
            node.address  # noqa: B018 - not started: no address yet
        assert await node.start() is node
        host, port = node.address
        assert host == "127.0.0.1" and isinstance(port, int) and port > 0
        # really bound there
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.close()
        assert node.peers() == []
        await node.stop()
        await node.stop()   # idempotent
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)

    run_async(main())


def test_async_with_starts_and_stops():
    async def main():
        async with malla.Node("ctx", cookie=COOKIE, port=0) as node:
            assert isinstance(node, malla.Node)
            port = node.address[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        await node.stop()   # still idempotent after __aexit__

    run_async(main())


def test_peers_and_connect_waits_for_handshake():
    async def main(make):
        a = await make("a").start()
        b = await make("b").start()
        c = await make("c").start()
        assert a.peers() == []
        await b.connect(seed_of(a))
        assert b.peers() == ["a"]          # no waiting: connect returned after the handshake
        await wait_until(lambda: a.peers() == ["b"])
        await c.connect(seed_of(a))
        assert "a" in c.peers()
        # full mesh, learned transitively
        await wait_until(lambda: a.peers() == ["b", "c"] and b.peers() == ["a", "c"]
                         and c.peers() == ["a", "b"])
        await b.stop()
        await wait_until(lambda: a.peers() == ["c"] and c.peers() == ["a"])
        assert b.peers() == []

    with_nodes(main)


def test_connect_to_nothing_raises_connection_error():
    async def main(make):
        a = await make("a").start()
        with pytest.raises(ConnectionError):
            await a.connect(f"127.0.0.1:{free_port()}")
        assert a.peers() == []

    with_nodes(main)


def test_failed_dials_leave_no_connection_behind():
    async def main(make):
        a = await make("a", seeds=[f"127.0.0.1:{free_port()}"], redial_max=0.05).start()
        await asyncio.sleep(0.5)      # several failed background dials
        with pytest.raises(ConnectionError):
            await a.connect(f"127.0.0.1:{free_port()}")
        # (uvloop makes the protocol before connecting; a background redial
        # of the seed may be under way at any instant, hence the wait)
        await wait_until(lambda: a._cluster.connections == set(), timeout=5)
        t0 = time.monotonic()
        await a.stop()
        assert time.monotonic() - t0 < 1.5, "stop() waited for connections that never were"

    with_nodes(main)


# -- authentication and the handshake ------------------------------------------------


def test_wrong_cookie_is_refused_and_acceptor_keeps_serving():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc())
        intruder = await make("intruder", cookie="not-the-cookie").start()
        with pytest.raises(malla.AuthenticationError):
            await intruder.connect(seed_of(a))
        assert a.peers() == []
        assert intruder.peers() == []
        assert a.stats()["calls_in"] == 0
        friend = await make("friend").start()
        await friend.connect(seed_of(a))
        await wait_until(lambda: friend.get_nodes(Calc))
        assert await friend.remote(Calc, "add", [2, 3]) == 5
        assert a.peers() == ["friend"]
        assert "intruder" not in a.peers()

    with_nodes(main)


def test_silent_client_closed_after_handshake_timeout():
    async def main(make):
        a = await make("a", handshake_timeout=0.3).start()
        reader, writer = await raw_open(a)
        t0 = time.monotonic()
        await read_until_eof(reader, timeout=5)
        elapsed = time.monotonic() - t0
        assert elapsed >= 0.2, f"closed after {elapsed:.3f} s, before handshake_timeout"
        writer.close()
        assert a.peers() == []

    with_nodes(main)


GARBAGE = {
    "http": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "random": random.Random(7).randbytes(4096),
    "call-before-handshake": core.build_frame(core.FT_CALL, 0, 1, b"\x93\xa1a\xa1b\x90"),
    "hello-not-msgpack": core.build_frame(core.FT_HELLO, 0, 0, b"\xc1\xc1\xc1garbage"),
    "frame-type-zero": HEADER.pack(0, 0, 0, 4, 0) + b"abcd",
}


@pytest.mark.parametrize("kind", sorted(GARBAGE))
def test_garbage_closes_that_connection_only(kind):
    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc())
        b = await make("b", seeds=[seed_of(a)]).start()
        await wait_until(lambda: b.get_nodes(Calc))
        reader, writer = await raw_open(a)
        writer.write(GARBAGE[kind])
        await writer.drain()
        await read_until_eof(reader, timeout=5)
        writer.close()
        assert a.peers() == ["b"]
        for i in range(3):
            assert await b.remote(Calc, "add", [i, 1], timeout=2000) == i + 1

    with_nodes(main)


def test_oversized_header_before_auth_closes_without_buffering():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc())
        b = await make("b", seeds=[seed_of(a)]).start()
        await wait_until(lambda: b.get_nodes(Calc))
        before = set(a._cluster.connections)
        reader, writer = await raw_open(a)
        await wait_until(lambda: len(set(a._cluster.connections) - before) == 1)
        (conn,) = set(a._cluster.connections) - before
        # A valid-looking header announcing 2 GiB; no payload follows.
        writer.write(HEADER.pack(core.FT_HELLO, 0, 0, 2**31, 0))
        await writer.drain()
        await read_until_eof(reader, timeout=5)
        writer.close()
        assert conn.proto.read_buffer_capacity < 1 << 20
        assert a.peers() == ["b"]
        assert await b.remote(Calc, "add", [1, 1], timeout=2000) == 2

    with_nodes(main)


def test_oversized_header_after_auth_closes_without_buffering():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc())
        b = await make("b", seeds=[seed_of(a)]).start()
        await wait_until(lambda: b.get_nodes(Calc))
        raw = await RawPeer.connect(a, "raw")
        reader, writer = raw.reader, raw.writer
        conn = a._cluster.connected["raw"]
        writer.write(HEADER.pack(core.FT_CALL, 0, 0, 2**31, 1))
        await writer.drain()
        await read_until_eof(reader, timeout=5)
        writer.close()
        await wait_until(lambda: "raw" not in a.peers())
        assert conn.proto.read_buffer_capacity < 1 << 20
        assert a.peers() == ["b"]
        assert await b.remote(Calc, "add", [2, 2], timeout=2000) == 4

    with_nodes(main)


def test_deeply_nested_extension_values_fail_one_call_not_the_node():
    """Each tuple is decoded by a nested msgpack call (~40 KiB of C stack):
    300 nested tuples from a peer once overflowed the stack and killed the
    process.  Now that call fails as undecodable; the node goes on."""
    import msgpack

    async def main(make):
        a = await make("a").start()
        await a.start_service(Calc())
        b = await make("b", seeds=[seed_of(a)]).start()
        await wait_until(lambda: b.get_nodes(Calc))
        deep = msgpack.packb(None)
        for _ in range(300):
            deep = msgpack.packb(msgpack.ExtType(core.EXT_TUPLE, b"\x91" + deep))
        payload = (b"\x97" + msgpack.packb("Calc") + msgpack.packb("add") + b"\x91" + deep
                   + msgpack.packb(None) + msgpack.packb(1000) + b"\xc0\xc0")
        raw = await RawPeer.connect(a, "raw")
        raw.writer.write(core.build_frame(core.FT_CALL, 0, 1, payload))
        while True:
            ftype, _flags, sid, body = await raw.next_frame()
            if sid == 1:
                break
        assert ftype == core.FT_ERROR
        assert core.unpackb(body)[:2] == [8, "malla.exceptions.EncodeError"]
        assert await b.remote(Calc, "add", [2, 2], timeout=2000) == 4
        # and the encoder refuses what no decoder would take
        nested = None
        for _ in range(core.MAX_EXT_NESTING + 1):
            nested = (nested,)
        with pytest.raises(malla.EncodeError, match="tuples or sets deep"):
            await b.remote(Calc, "add", [nested, 1])
        raw.close()

    with_nodes(main)


# -- seeds, duplicates, incarnations -----------------------------------------------------


def test_seed_dialled_in_background_before_the_server_exists():
    async def main(make):
        port = free_port()
        client = await make("client", seeds=[f"127.0.0.1:{port}"], redial_max=0.2).start()
        assert client.peers() == []     # start() returned without the seed
        await asyncio.sleep(0.3)        # a few failed dials
        server = await make("server", port=port).start()
        await server.start_service(Calc())
        await wait_until(lambda: client.peers() == ["server"], timeout=10)
        assert await client.wait_for_services([Calc], retries=5)
        assert await client.remote(Calc, "add", [20, 22]) == 42

    with_nodes(main)


def test_duplicate_live_name_is_refused_and_original_stays():
    async def main(make):
        a = await make("a", heartbeat_interval=0.2).start()
        await a.start_service(Calc())
        original = await make("dup").start()
        await original.connect(seed_of(a))
        await wait_until(lambda: original.get_nodes(Calc))
        impostor = await make("dup").start()
        with pytest.raises(malla.ProtocolError, match="duplicate"):
            await impostor.connect(seed_of(a))
        await asyncio.sleep(0.3)
        assert a.peers() == ["dup"]
        assert a._cluster.connected["dup"].peer.incarnation == original.incarnation
        assert original.peers() == ["a"]
        assert await original.remote(Calc, "add", [1, 2]) == 3
        await impostor.stop()

    with_nodes(main)


def test_new_incarnation_after_kill_is_accepted():
    async def main():
        make, made = node_factory()
        procs = []
        try:
            a = await make("a", heartbeat_interval=0.2).start()
            first = await spawn_node("phoenix", seed_of(a))
            procs.append(first)
            await wait_until(lambda: a.get_nodes("Echo") == ["phoenix"])
            assert await a.remote("Echo", "pid", timeout=5000) == first.pid
            first.kill()
            first.wait()
            second = await spawn_node("phoenix", seed_of(a))
            procs.append(second)
            await wait_until(lambda: a.get_nodes("Echo") == ["phoenix"])
            assert await a.remote("Echo", "pid", timeout=5000) == second.pid
            assert a.peers() == ["phoenix"]
        finally:
            for proc in procs:
                kill_process(proc)
            await stop_all(made)

    run_async(main())


def test_new_incarnation_replaces_a_silent_old_one():
    async def main():
        make, made = node_factory()
        procs = []
        try:
            # A long heartbeat_timeout: the old connection is still there when
            # the new incarnation arrives; only the ping decides.
            a = await make("a", heartbeat_interval=0.2, heartbeat_timeout=30).start()
            old = await spawn_node("phoenix", seed_of(a))
            procs.append(old)
            await wait_until(lambda: a.get_nodes("Echo") == ["phoenix"])
            old_inc = a._cluster.connected["phoenix"].peer.incarnation
            pending = asyncio.ensure_future(a.remote("Echo", "hang", timeout=20000))
            await asyncio.sleep(0.2)
            os.kill(old.pid, signal.SIGSTOP)
            new = await spawn_node("phoenix", seed_of(a))
            procs.append(new)
            assert a.peers() == ["phoenix"]
            assert a._cluster.connected["phoenix"].peer.incarnation != old_inc
            # the call in flight to the old incarnation fails: it may have run
            with pytest.raises(malla.ConnectionLost):
                await asyncio.wait_for(pending, 5)
            await wait_until(lambda: a.get_nodes("Echo") == ["phoenix"])
            assert await a.remote("Echo", "pid", timeout=5000) == new.pid
        finally:
            for proc in procs:
                kill_process(proc)
            await stop_all(made)

    run_async(main())


# -- liveness ----------------------------------------------------------------------------


def test_stopped_peer_dropped_by_heartbeat_timeout():
    async def main():
        make, made = node_factory()
        proc = None
        try:
            a = await make("a", heartbeat_interval=0.2, heartbeat_timeout=1.0).start()
            proc = await spawn_node("sleeper", seed_of(a), hb_timeout=1.0)
            await wait_until(lambda: a.get_nodes("Echo") == ["sleeper"])
            assert a.peers() == ["sleeper"]
            await asyncio.sleep(1.5)    # heartbeats keep an idle, live peer connected
            assert a.peers() == ["sleeper"]
            os.kill(proc.pid, signal.SIGSTOP)
            t0 = time.monotonic()
            await wait_until(lambda: "sleeper" not in a.peers(), timeout=1.0 + 2.0)
            assert time.monotonic() - t0 >= 0.5, "dropped before any silence could be noticed"
            assert a.get_nodes("Echo") == []
            with pytest.raises(malla.ServiceNotAvailable):
                await a.remote("Echo", "pid", sna_retries=0, timeout=1000)
            os.kill(proc.pid, signal.SIGCONT)
        finally:
            if proc is not None:
                kill_process(proc)
            await stop_all(made)

    run_async(main())
