"""Regression tests of the call-semantics defects the conformance issue named
(the conformance suite in tests/conformance/ pins the rest on every path):
silent failures, counters that went down, ghosts, a bad value that killed
a connection, errors that were not malla errors, races and identity."""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import signal
import threading

import msgpack
import pytest
from support import (
    RawPeer,
    dialling,
    kill_process,
    read_line,
    redials,
    seed_of,
    spawn_node,
    spawn_python,
    wait_until,
    with_nodes,
)

import malla
from malla import exceptions as mexc
from malla._ext import core
from malla.metrics import LatencyHistogram


class Svc(malla.Service, global_=True):
    def __init__(self) -> None:
        self.runs = 0

    def add(self, a, b):
        self.runs += 1
        return a + b

    def boom(self):
        self.runs += 1
        raise ValueError("boom")


class Nested(malla.Service, global_=True):
    def __init__(self, node: malla.Node) -> None:
        self.node = node
        self.runs = 0

    async def go(self):
        self.runs += 1
        return await self.node.remote("Nowhere", "f", sna_retries=0)


async def pair(make, *services, **opts):
    a = await make("a", **opts).start()
    for svc in services:
        await a.start_service(svc)
    b = await make("b", seeds=[seed_of(a)]).start()
    await wait_until(lambda: "a" in b.peers() and all(b.get_nodes(type(s)) for s in services))
    return a, b


def cast_frame(sid: int, service: str, fun: str, args: list) -> bytes:
    payload = core.packb([service, fun, args, None, 0, None, None])
    return core.build_frame(core.FT_CAST, 0, sid, payload)


# -- 2. in-process calls never leak the handler's own malla errors ---------------------

def test_in_process_nested_malla_error_is_remote_error_and_never_runs_twice():
    async def main(make):
        a = await make("a").start()
        c = await make("c", seeds=[seed_of(a)]).start()
        mine, theirs = Nested(a), Nested(c)
        await a.start_service(mine)
        await c.start_service(theirs)
        await wait_until(lambda: sorted(a.get_nodes("Nested")) == ["a", "c"])
        with pytest.raises(malla.RemoteError) as info:
            await a.remote("Nested", "go")            # in-process first
        assert info.value.exc_type == "malla.exceptions.ServiceNotAvailable"
        assert (mine.runs, theirs.runs) == (1, 0)     # no failover, no second run

    with_nodes(main)


# -- 4. silent failures ---------------------------------------------------------------------

def test_failed_casts_are_logged_and_counted_where_they_ran(caplog):
    class Paused(malla.Service, global_=True):
        def f(self):
            return 1

    async def main(make):
        svc = Svc()
        a = await make("a").start()
        await a.start_service(svc)
        await a.start_service(Paused)
        await a.pause_service("Paused")
        raw = await RawPeer.connect(a)
        with caplog.at_level(logging.WARNING, logger="malla"):
            for sid, (service, fun, args) in enumerate([
                    ("Svc", "boom", []),                  # the handler raises
                    ("Svc", "nope", []),                  # unknown
                    ("Svc", "_private", []),              # unexported
                    ("Svc", "add", [1]),                  # bad arguments
                    ("Paused", "f", []),                  # paused
                    ("Missing", "f", [])], start=0):      # not running here
                raw.writer.write(cast_frame(2 * sid + 1, service, fun, args))
            await raw.writer.drain()
            await wait_until(lambda: sum(a.stats()["errors"].values()) >= 6)
        assert a.stats()["errors"] == {"RemoteError": 1, "UnknownFunction": 2,
                                       "BadArguments": 1, "ServiceNotAvailable": 2}
        lines = [r.getMessage() for r in caplog.records if "cast" in r.getMessage()]
        assert len(lines) == 6
        assert any("Svc.boom failed: RemoteError" in line and "ValueError: boom" in line
                   for line in lines)
        assert "raw" in a.peers()                     # and nothing else broke
        raw.close()

    with_nodes(main)


def test_failed_cast_log_is_rate_limited_but_every_failure_counted(caplog):
    async def main(make):
        a = await make("a").start()
        await a.start_service(Svc())
        raw = await RawPeer.connect(a)
        with caplog.at_level(logging.WARNING, logger="malla"):
            for i in range(50):
                raw.writer.write(cast_frame(2 * i + 1, "Svc", "nope", []))
            await raw.writer.drain()
            await wait_until(lambda: a.stats()["errors"].get("UnknownFunction") == 50)
        lines = [r for r in caplog.records if "cast Svc.nope failed" in r.getMessage()]
        assert len(lines) == 10                       # the burst, then counted only
        raw.close()

    with_nodes(main)


def test_in_process_cast_that_raises_is_logged_and_counted(caplog):
    async def main(make):
        svc = Svc()
        a = await make("a").start()
        await a.start_service(svc)
        with caplog.at_level(logging.WARNING, logger="malla"):
            assert await a.remote("Svc", "boom", timeout=0) is None
            assert svc.runs == 0                      # scheduled, not run yet
            await wait_until(lambda: a.stats()["errors"].get("RemoteError") == 1)
        assert svc.runs == 1
        assert any("cast Svc.boom failed" in r.getMessage() for r in caplog.records)

    with_nodes(main)


def test_misspelt_options_are_invalid_everywhere():
    async def main(make):
        _a, b = await pair(make, Svc())
        with pytest.raises(malla.InvalidOption, match="timout"):
            await b.call_cb_all("Svc", "add", [1, 2], timout=5)
        with pytest.raises(malla.InvalidOption, match="sna_retries"):
            await b.call_cb_all("Svc", "add", [1, 2], sna_retries=3)   # no failover there
        with pytest.raises(malla.InvalidOption, match="timout"):
            await b.remote("Svc", "add", [1, 2], timout=5)
        with pytest.raises(malla.InvalidOption, match="timout"):
            await malla.call(b.services.Svc.add(1, 2), timout=5)
        assert isinstance(malla.InvalidOption("x"), ValueError)

    with_nodes(main)


def test_malformed_service_table_and_announcements_are_refused_and_logged(caplog):
    async def main(make):
        a = await make("a").start()
        raw = await RawPeer.connect(a)
        good = {"vsn": "1", "global": True, "paused": False, "max_concurrency": 5,
                "functions": {"f": [["x", 1, False]]}}
        table = {
            "Good": good,
            "NotAMap": [1, 2],
            "NoFunctions": {"vsn": "1"},
            "BadParam": {"vsn": "1", "functions": {"f": [[1, 2, 3]]}},
            "Private": {"vsn": "1", "functions": {"_f": []}},
            "Ext": {"vsn": msgpack.ExtType(42, b"x"), "functions": {}},
        }
        with caplog.at_level(logging.WARNING, logger="malla"):
            raw.writer.write(core.build_frame(core.FT_TABLE, 0, 0, msgpack.packb(table)))
            raw.writer.write(core.build_frame(core.FT_ANNOUNCE, 0, 0, msgpack.packb([1])))
            raw.writer.write(core.build_frame(core.FT_ANNOUNCE, 0, 0, msgpack.packb(
                ["Late", {"vsn": 2, "functions": {}}])))
            raw.writer.write(core.build_frame(core.FT_PEERS, 0, 0, msgpack.packb(
                [["m", "127.0.0.1", "port"], ["n", 5, 6]])))
            await raw.writer.drain()
            await wait_until(lambda: a.get_nodes("Good") == ["raw"])
            await asyncio.sleep(0.1)
        assert set(a.get_services()) == {"Good"}
        refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()
                   or "malformed" in r.getMessage()]
        assert len(refused) == 9, refused
        # none of it reaches a caller as anything but malla's errors
        for service in ("NoFunctions", "BadParam", "Late"):
            with pytest.raises(malla.ServiceNotAvailable):
                await a.remote(service, "f", [1], sna_retries=0)
        with pytest.raises(malla.BadArguments):                 # Good's signature is known
            await a.remote("Good", "f", [1, 2], sna_retries=0)
        assert "raw" in a.peers() and a.members() == {}
        raw.close()

    with_nodes(main)


# -- 5. counters never go down -------------------------------------------------------------

def test_call_counters_are_totals_over_the_nodes_life():
    async def main(make):
        a, b = await pair(make, Svc())
        c = await make("c", seeds=[seed_of(a)]).start()
        await wait_until(lambda: c.get_nodes("Svc") == ["a"])
        for i in range(5):
            assert await b.remote("Svc", "add", [i, 1]) == i + 1
            assert await c.remote("Svc", "add", [i, 2]) == i + 2
        assert a.stats()["calls_in"] == 10
        await c.stop()
        await wait_until(lambda: "c" not in a.peers())
        assert a.stats()["calls_in"] == 10           # c left: its calls stay counted
        await a.stop()
        await wait_until(lambda: b.peers() == [])
        assert b.stats()["calls_out"] == 5

    with_nodes(main)


def test_latency_histogram_has_a_real_sum_and_bucket_counts():
    h = LatencyHistogram()
    for us in (100, 1_000, 3_000, 250_000):
        h.record_ns(us * 1000)
    assert h.sum_ns == 254_100_000
    assert h.count_below_us(128) == 1                # 100 µs
    assert h.count_below_us(1024) == 2
    assert h.count_below_us(4096) == 3
    assert h.count_below_us(1 << 20) == 4
    with pytest.raises(ValueError):
        h.count_below_us(1000)                       # not a bucket bound


# -- 6. ghosts --------------------------------------------------------------------------------

def test_a_peer_dropped_by_the_heartbeat_timeout_is_forgotten():
    async def main(make):
        a = await make("a", heartbeat_interval=0.1, heartbeat_timeout=0.6, check_interval=0.1,
                       forget_after=1.0, redial_max=0.1, handshake_timeout=0.3).start()
        proc = await spawn_node("frozen", seed_of(a), hb_timeout=30)
        try:
            await wait_until(lambda: "frozen" in a.peers())
            os.kill(proc.pid, signal.SIGSTOP)         # alive to TCP, silent to malla
            await wait_until(lambda: "frozen" not in a.peers(), timeout=10)
            assert redials(a, "frozen")                # redialled for a while...
            # ...then forgotten: no ghost redialled forever
            await wait_until(lambda: not redials(a, "frozen"), timeout=10)
            await asyncio.sleep(0.3)
            assert not dialling(a, "frozen") and "frozen" not in a.members()
        finally:
            kill_process(proc)

    with_nodes(main)


def test_a_member_heard_of_but_never_reached_is_forgotten():
    async def main(make):
        a = await make("a", check_interval=0.1, forget_after=0.5, redial_max=0.1).start()
        raw = await RawPeer.connect(a)
        raw.writer.write(core.build_frame(core.FT_PEERS, 0, 0, msgpack.packb(
            [["ghost", "127.0.0.1", 1]])))
        await raw.writer.drain()
        await wait_until(lambda: "ghost" in a.members())
        await wait_until(lambda: "ghost" not in a.members(), timeout=10)
        raw.close()

    with_nodes(main)


# -- 7. one bad value fails one call, never the connection ------------------------------

def test_a_builtin_extension_with_bad_contents_fails_that_call_only():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Svc())
        raw = await RawPeer.connect(a)
        bad_tuple = msgpack.ExtType(core.EXT_TUPLE, b"\xc1")     # 0xc1: never valid msgpack
        raw.writer.write(core.build_frame(core.FT_CALL, 0, 1, msgpack.packb(
            ["Svc", "add", [bad_tuple, 1], None, 5000, None, None])))
        await raw.writer.drain()
        while True:
            ftype, _flags, sid, body = await raw.next_frame()
            if sid == 1:
                break
        assert ftype == core.FT_ERROR and msgpack.unpackb(body)[0] == mexc.ERR_UNDECODABLE
        raw._next_sid = 3
        assert await raw.call("Svc", "add", [1, 2]) == (core.FT_REPLY, 3)   # still serving
        raw.close()

    with_nodes(main)


# -- 8. errors are malla errors ----------------------------------------------------------------

def test_connect_failures_are_malla_errors():
    async def main(make):
        a = await make("a", handshake_timeout=1.0).start()
        with pytest.raises(malla.Unreachable) as info:
            await a.connect("127.0.0.1:1")
        assert isinstance(info.value, ConnectionError)
        with pytest.raises(malla.InvalidOption):
            await a.connect("127.0.0.1:notaport")
        with pytest.raises(malla.Unreachable):
            await a.connect("x@name.invalid")

        async def hang_up(reader, writer):      # accepts, then closes at once
            writer.close()

        closer = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        with pytest.raises(malla.Unreachable):
            await a.connect(f"127.0.0.1:{closer.sockets[0].getsockname()[1]}")
        closer.close()
        stopped = make("s")
        with pytest.raises(malla.NodeStopped):
            await stopped.connect(seed_of(a))
        with pytest.raises(malla.NodeStopped):
            stopped.address                                    # noqa: B018
        with pytest.raises(malla.NodeStopped):
            await stopped.remote("Svc", "add", [1, 2])
        await a.stop()
        with pytest.raises(malla.NodeStopped):
            await a.remote("Svc", "add", [1, 2])

    with_nodes(main)


def test_remote_builtin_exceptions_are_caught_by_their_type():
    err = mexc.remote_error("builtins.KeyError", "'k'", "tb")
    assert isinstance(err, KeyError) and isinstance(err, malla.RemoteError)
    assert str(err) == "builtins.KeyError: 'k'"
    assert isinstance(mexc.remote_error("builtins.FileNotFoundError", "x"), OSError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is type(err) and back.traceback == "tb"
    # never a class that stops the process or steers control flow, never an import
    for name in ("builtins.SystemExit", "builtins.KeyboardInterrupt",
                 "builtins.StopIteration", "os.error", "builtins.NoSuchThing"):
        assert type(mexc.remote_error(name, "m")) is malla.RemoteError, name


# -- 9. races and identity ----------------------------------------------------------------------

def test_every_start_is_a_new_incarnation():
    async def main(make):
        a = make("a")
        await a.start()
        first = a.incarnation
        await a.stop()
        await a.start()
        assert a.incarnation != first

    with_nodes(main)


def test_blocking_proxies_read_the_discovery_table_on_the_loop_thread(cookie):
    async def serve():
        a = await malla.Node("a", cookie=cookie, port=0).start()
        await a.start_service(Svc())
        return a

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    a = asyncio.run_coroutine_threadsafe(serve(), loop).result(10)
    try:
        with malla.BlockingNode("b", cookie=cookie, port=0) as bn:
            bn.connect(seed_of(a))
            assert bn.wait_for_services(["Svc"], retries=5)
            readers: set[str] = set()
            registry = bn.node._registry
            original = registry.known_info

            def spy(service):
                readers.add(threading.current_thread().name)
                return original(service)

            registry.known_info = spy
            proxy = bn.services.Svc
            assert proxy.add(1, 2) == 3
            assert "add" in dir(proxy)
            assert readers == {"malla-node-b"}, readers
    finally:
        asyncio.run_coroutine_threadsafe(a.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


# A node whose loop never reads (SIGSTOP) congests the connection to it.
SINK_NODE = r"""
import asyncio, os, sys
import malla

class Sink(malla.Service, global_=True):
    def take(self, data):
        return os.getpid()

class Hole(malla.Service, global_=True):
    def take(self, data):
        return None

async def main():
    node = malla.Node("sink", port=0, heartbeat_timeout=60, udp_heartbeat=False)
    await node.start()
    await node.start_service(Sink())
    await node.start_service(Hole())
    await node.connect(sys.argv[1])
    print("READY", flush=True)
    await asyncio.Event().wait()

malla.run(main())
"""


def test_call_cb_all_waits_for_a_congested_slot_instead_of_failing_it():
    class Sink(malla.Service, global_=True):
        def take(self, data):
            return "here"

    async def main(make):
        a = await make("a", heartbeat_timeout=60, udp_heartbeat=False).start()
        await a.start_service(Sink())
        b = await make("b", heartbeat_timeout=60, udp_heartbeat=False,
                       seeds=[seed_of(a)]).start()
        proc = spawn_python(SINK_NODE, seed_of(a))
        try:
            assert (await read_line(proc)).startswith("READY")
            await wait_until(lambda: sorted(b.get_nodes("Sink")) == ["a", "sink"]
                             and b.get_nodes("Hole") == ["sink"])
            os.kill(proc.pid, signal.SIGSTOP)
            chunk = b"x" * (512 << 10)
            congested = b._cluster.connected["sink"].proto
            for _ in range(256):                      # fill the kernel's buffers, then ours
                await b.remote("Hole", "take", [chunk], timeout=0)
                if congested.writing_paused:
                    break
            assert congested.writing_paused
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            slots = await b.call_cb_all("Sink", "take", [b""], timeout=400)
            waited = loop.time() - t0
            by_node = dict(zip(b.get_nodes("Sink"), slots, strict=True))
            assert by_node["a"] == "here"
            # the congested slot waited within its timeout (no failover applies)
            assert isinstance(by_node["sink"], malla.CallTimeout), by_node["sink"]
            assert not by_node["sink"].sent            # nothing was sent on it
            assert waited >= 0.3
        finally:
            kill_process(proc)

    with_nodes(main)


def test_node_settings_are_validated_when_the_node_is_made():
    for bad in ({"heartbeat_interval": 3.0, "heartbeat_timeout": 2.0}, {"port": 70000},
                {"seeds": "127.0.0.1:4370"}, {"tracing": 2}, {"max_frame_size": 10},
                {"handshake_timeout": 0}, {"window_size": 5}, {"port": "4370"},
                {"forget_after": float("nan")}, {"heartbeat_timeout": None}):
        with pytest.raises(malla.InvalidOption):
            malla.Node("x", **bad)
    config = malla.Node("x", seeds=["127.0.0.1:4370"]).config
    assert config.seeds == ("127.0.0.1:4370",) and config.heartbeat_timeout == 3.0
    with pytest.raises(AttributeError):
        config.port = 1                                         # frozen


def test_a_call_that_may_have_run_never_ends_as_did_not_run():
    """excp_retries after ConnectionLost, then no node left: the error says the
    call may have run (not ServiceNotAvailable, "did not run")."""
    async def main(make):
        a = await make("a", heartbeat_timeout=30).start()
        proc = await spawn_node("dies", seed_of(a), hb_timeout=30)
        try:
            await wait_until(lambda: a.get_nodes("Echo") == ["dies"])
            call = asyncio.ensure_future(a.remote("Echo", "hang", excp_retries=1, sna_retries=1,
                                                  retries_sleep_msec=50))
            assert (await read_line(proc)).startswith("ENTERED")
            kill_process(proc)
            with pytest.raises(malla.ConnectionLost) as info:
                await call
            assert malla.family(info.value) == "may have run"
        finally:
            kill_process(proc)

    with_nodes(main)


def test_call_options_are_checked():
    async def main(make):
        _a, b = await pair(make, Svc())
        for bad in ({"timeout": None}, {"timeout": -1}, {"timeout": "5"},
                    {"deadline": float("inf")}, {"deadline": float("nan")}, {"deadline": 0},
                    {"deadline": 10 ** 20}):
            with pytest.raises(malla.InvalidOption):
                await b.remote("Svc", "add", [1, 2], **bad)
            with pytest.raises(malla.InvalidOption):
                await b.call_cb_all("Svc", "add", [1, 2], **bad)
        assert await b.remote("Svc", "add", [1, 2], timeout=2.5, deadline=1000.5) == 3

    with_nodes(main)


def test_a_cast_too_large_for_the_server_is_counted_there():
    async def main(make):
        a = await make("a", max_message_size=64 << 10).start()
        await a.start_service(Svc())
        raw = await RawPeer.connect(a)
        big = core.packb(["Svc", "add", [b"x" * (100 << 10), 1], None, 0, None, None])
        for frame in core.split_message(core.FT_CAST, 1, big, 16 << 10):
            raw.writer.write(frame)
        await raw.writer.drain()
        await wait_until(lambda: a.stats()["errors"].get("MessageTooLarge") == 1)
        assert "raw" in a.peers()
        raw.close()

    with_nodes(main)


def test_a_restarted_node_says_goodbye_again():
    async def main(make):
        a = await make("a", redial_max=0.1).start()
        b = make("b")
        for _ in range(2):                     # the second life must leave as cleanly
            await b.start()
            await b.connect(seed_of(a))
            await wait_until(lambda: redials(a, "b") and "b" in a.peers())
            await b.stop()
            await wait_until(lambda: not redials(a, "b"), timeout=5)   # GOODBYE: forgotten

    with_nodes(main)
