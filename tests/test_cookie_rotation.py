"""Cookie rotation: `Node(cookie=[first, other])` proves with the first
cookie and accepts either, over real loopback TCP and UDP, up to a
five-node cluster moving to a new cookie one node at a time, in three
rolling passes ([old, new], then [new, old], then [new]), with no call
failing.  Nothing on the wire changes: one proof, one MAC, as with one
cookie."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest
from support import node_factory, run_async, seed_of, spawn_python, stop_all, wait_until
from test_handshake import pair, pump
from test_liveness import BLOCKER

import malla
from malla._core import FT_AUTH
from malla.cli_input import cookie as cli_cookie
from malla.cli_output import UserError
from malla.guard import accepted_cookies, cookie_bytes
from malla.heartbeat import HeartbeatThread
from malla.liveness import Liveness

OLD = "old-cookie-7f3a9c2e51d84b06"
NEW = "new-cookie-c81e47d9a02f6b35"


class Adder(malla.Service, global_=True):
    def add(self, a: int, b: int) -> int:
        return a + b


def test_the_cookie_setting_takes_one_or_a_list_of_them(caplog):
    assert accepted_cookies(malla.Node("one", cookie=OLD)._cookie) == (OLD.encode(),)
    node = malla.Node("two", cookie=[NEW, OLD.encode()])
    assert bytes(node._cookie) == NEW.encode()             # the first proves
    assert accepted_cookies(node._cookie) == (NEW.encode(), OLD.encode())
    assert NEW not in repr(node._cookie) and OLD not in str(node._cookie)
    for bad in ([], (), [NEW] * 5, [NEW, 7], 7, [None], {NEW}):
        with pytest.raises(malla.InvalidOption):
            malla.Node("bad", cookie=bad)
    with caplog.at_level(logging.WARNING, logger="malla.guard"):
        malla.Node("weak", cookie=[NEW, "s3cret"])
    assert "weak cookie (number 2 of 2)" in caplog.text
    assert NEW not in caplog.text and "s3cret" not in caplog.text


def test_the_cookie_file_holds_one_cookie_a_line(tmp_path):
    one, two, empty = tmp_path / "one", tmp_path / "two", tmp_path / "empty"
    one.write_text(f"{OLD}\n")
    two.write_text(f"{NEW}\n\n{OLD}\n")
    empty.write_text("\n")
    assert cli_cookie(str(one)) == OLD
    assert cli_cookie(str(two)) == [NEW, OLD]
    with pytest.raises(UserError):
        cli_cookie(str(empty))


def test_the_handshake_proves_with_the_first_cookie_and_never_sends_one():
    frames: list[tuple[str, int, bytes]] = []
    # [old, new] to [old]: proven with old, one 32-byte proof each way
    dialer, acceptor = pair(d_cookie=cookie_bytes([OLD, NEW]), a_cookie=cookie_bytes(OLD))
    pump(dialer, acceptor, frames)
    assert dialer.done and acceptor.done
    assert [(way, len(p)) for way, t, p in frames if t == FT_AUTH] == [("d->a", 32), ("a->d", 32)]
    assert not any(c.encode() in p for _, _, p in frames for c in (NEW, OLD))
    # [new, old] to [old, new]: the acceptor takes new, and answers under it
    dialer, acceptor = pair(d_cookie=cookie_bytes([NEW, OLD]), a_cookie=cookie_bytes([OLD, NEW]))
    pump(dialer, acceptor)
    assert dialer.done and acceptor.done
    # [new] to [old, new] too; but [new, old] to [old] alone is refused
    pump(*pair(d_cookie=cookie_bytes(NEW), a_cookie=cookie_bytes([OLD, NEW])))
    with pytest.raises(malla.AuthenticationError):
        pump(*pair(d_cookie=cookie_bytes([NEW, OLD]), a_cookie=cookie_bytes(OLD)))
    # anything but one proof is refused, even with the real one in it
    dialer, acceptor = pair(d_cookie=cookie_bytes(OLD), a_cookie=cookie_bytes([NEW, OLD]))
    with pytest.raises(malla.AuthenticationError):
        pump(dialer, acceptor, tamper=lambda way, t, p: bytes(32) + p if t == FT_AUTH else p)


def test_a_rotating_node_talks_to_old_and_new_and_disjoint_ones_are_refused():
    async def main():
        make, made = node_factory()
        try:
            # the first pass: [old, new] proves with old, takes new too
            rotating = await make("rotating", cookie=[OLD, NEW]).start()
            await rotating.start_service(Adder)
            old = await make("old", cookie=OLD).start()
            new = await make("new", cookie=NEW).start()
            # both ways with old; the new one dials it (its own dial, proven
            # with old, is refused by new)
            await rotating.connect(seed_of(old))
            await old.connect(seed_of(rotating))
            await new.connect(seed_of(rotating))
            await wait_until(lambda: sorted(rotating.peers()) == ["new", "old"])
            for caller in (old, new):
                assert await caller.wait_for_services(["Adder"], retries=10)
                assert await caller.remote("Adder", "add", [2, 3]) == 5
            # old and new hold no cookie in common: refused both ways
            with pytest.raises(malla.AuthenticationError):
                await old.connect(seed_of(new))
            with pytest.raises(malla.AuthenticationError):
                await new.connect(seed_of(old))
            assert "new" not in old.peers() and "old" not in new.peers()
        finally:
            await stop_all(made)

    run_async(main())


def test_heartbeat_datagrams_carry_one_mac_under_the_first_cookie():
    rotating = HeartbeatThread("r", 1, cookie_bytes([NEW, OLD]), "127.0.0.1", 0.05, Liveness())
    receivers = {key: (HeartbeatThread("x", 2, cookie_bytes(c), "127.0.0.1", 0.05, live), live)
                 for key, c, live in (("old, new", [OLD, NEW], Liveness()),
                                      ("new", NEW, Liveness()), ("old", OLD, Liveness()))}
    try:
        datagram = rotating._datagram()
        assert len(datagram) == 1 + 1 + 16 + 16        # name "r", incarnation, seq, one MAC
        for receiver, _ in receivers.values():
            receiver.add("r", ("127.0.0.1", rotating.port), 1)
            receiver._receive(datagram)
        assert receivers["old, new"][1].last_heard("r") is not None
        assert receivers["new"][1].last_heard("r") is not None
        assert receivers["old"][1].last_heard("r") is None       # not one of its cookies
    finally:
        for thread in (rotating, *(r for r, _ in receivers.values())):
            thread._sock.close()


def test_the_udp_heartbeat_keeps_a_rotating_pair_alive():
    """A node on [new, old] whose loop is blocked is reachable only through
    its heartbeat thread: observers on [old, new] and on [new] both keep it
    up (its MAC is under new, which both accept)."""
    code = BLOCKER.replace('Node("busy", ', f'Node("busy", cookie={[NEW, OLD]!r}, ')
    assert code != BLOCKER
    proc = spawn_python(code)

    async def main():
        port = int(proc.stdout.readline())
        make, made = node_factory()
        try:
            observers = [await make(f"obs-{i}", cookie=cookie, seeds=[f"127.0.0.1:{port}"],
                                    heartbeat_interval=0.2, heartbeat_timeout=1.0).start()
                         for i, cookie in enumerate(([OLD, NEW], NEW))]
            for obs in observers:
                assert await obs.wait_for_services(["Blocker"], retries=10)
            blocking = asyncio.ensure_future(observers[0].remote("Blocker", "block", [3.0]))
            await asyncio.sleep(0.2)
            end = time.monotonic() + 2.5        # more than two heartbeat timeouts
            while time.monotonic() < end:
                for obs in observers:
                    assert "busy" in obs.peers(), obs.name
                await asyncio.sleep(0.05)
            assert await blocking == "unblocked"
        finally:
            await stop_all(made)
            proc.kill()
            proc.communicate(timeout=10)

    run_async(main())


N = 5


@pytest.mark.serial
def test_a_rolling_rotation_of_five_nodes_fails_no_call():
    """Five nodes on the old cookie; each in turn is drained and replaced by
    a node of the same name on [old, new], then each in turn on [new, old],
    then each on [new] (a pass starts once the one before is complete).  A
    caller on [new, old], which every server's dial proves to, calls without
    pause; every call succeeds, and calls succeed during every restart of
    the three passes."""
    async def main():
        make, made = node_factory()
        stop = asyncio.Event()
        outcomes: list[object] = []      # each call's result, or what it raised

        async def caller(k: int) -> None:
            for i in itertools.count():
                if stop.is_set():
                    return
                call = client.remote("Adder", "add", [k, i], deadline=10_000,
                                     sna_retries=50, retries_sleep_msec=20)
                outcome = (await asyncio.gather(call, return_exceptions=True))[0]
                outcomes.append(True if outcome == k + i else outcome)

        async def server(name: str, cookie: object, seeds: list[str]) -> malla.Node:
            # (a drained node says GOODBYE: a heartbeat_timeout of 1 s only
            # took a loop starved of CPU by a parallel test for a dead peer)
            node = await make(name, cookie=cookie, seeds=seeds, heartbeat_interval=0.2,
                              heartbeat_timeout=3.0).start()
            await node.start_service(Adder)
            return node

        try:
            # (the servers dial the caller: its own dials, proven with new,
            # are refused by servers on old alone)
            client = await make("client", cookie=[NEW, OLD]).start()
            nodes: dict[str, malla.Node] = {}
            for i in range(N):
                nodes[f"n{i}"] = await server(f"n{i}", OLD, [seed_of(client)] +
                                              [seed_of(n) for n in nodes.values()])
            await wait_until(lambda: len(client.get_nodes("Adder")) == N, timeout=20)
            tasks = [asyncio.ensure_future(caller(k)) for k in range(8)]
            await asyncio.sleep(0.3)
            passes = (("[old, new]", [OLD, NEW]), ("[new, old]", [NEW, OLD]), ("[new]", [NEW]))
            progress: dict[str, list[int]] = {phase: [] for phase, _ in passes}
            for phase, cookie in passes:
                for name in list(nodes):
                    before = len(outcomes)
                    await nodes[name].drain(grace=2.0)
                    others = [n for n in nodes.values() if n.name != name]
                    fresh = nodes[name] = await server(
                        name, cookie, [seed_of(client)] + [seed_of(n) for n in others])
                    # it meshes with every other server (old, rotating or new alike)
                    await wait_until(lambda f=fresh, o=others: all(
                        n.name in f.peers() for n in o), timeout=10)
                    await wait_until(lambda f=fresh: f.name in client.get_nodes("Adder"),
                                     timeout=10)
                    await asyncio.sleep(0.2)
                    progress[phase].append(len(outcomes) - before)
            stop.set()
            await asyncio.gather(*tasks)
            assert [o for o in outcomes if o is not True] == []
            assert all(n > 0 for calls in progress.values() for n in calls), progress
        finally:
            stop.set()
            await stop_all(made)

    run_async(main(), timeout=180)
