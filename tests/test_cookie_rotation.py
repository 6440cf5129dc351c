"""Cookie rotation: `Node(cookie=[new, old])` proves with the first cookie
and accepts either, over real loopback TCP and UDP, up to a five-node
cluster moving to a new cookie one node at a time with no call failing."""

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


def test_the_handshake_sends_a_proof_per_cookie_and_never_a_cookie():
    frames: list[tuple[str, int, bytes]] = []
    dialer, acceptor = pair(d_cookie=cookie_bytes([NEW, OLD]), a_cookie=cookie_bytes(OLD))
    pump(dialer, acceptor, frames)
    assert dialer.done and acceptor.done
    auths = [(way, len(p)) for way, t, p in frames if t == FT_AUTH]
    assert auths == [("d->a", 64), ("a->d", 32)]   # the answer: under the cookie that matched
    assert not any(c.encode() in p for _, _, p in frames for c in (NEW, OLD))
    # one cookie each: the one 32-byte proof the protocol always had
    frames.clear()
    pump(*pair(d_cookie=cookie_bytes(OLD), a_cookie=cookie_bytes([NEW, OLD])), frames)
    assert [len(p) for _, t, p in frames if t == FT_AUTH] == [32, 32]
    # more proofs than anyone may hold: refused though the real one is among them
    dialer, acceptor = pair(d_cookie=cookie_bytes(OLD), a_cookie=cookie_bytes(OLD))
    with pytest.raises(malla.AuthenticationError):
        pump(dialer, acceptor, tamper=lambda way, t, p: bytes(32 * 4) + p if t == FT_AUTH else p)


def test_a_rotating_node_talks_to_old_and_new_and_disjoint_ones_are_refused():
    async def main():
        make, made = node_factory()
        try:
            rotating = await make("rotating", cookie=[NEW, OLD]).start()
            await rotating.start_service(Adder)
            old = await make("old", cookie=OLD).start()
            new = await make("new", cookie=NEW).start()
            # both ways: the rotating node dials the old one, the new one dials it
            await rotating.connect(seed_of(old))
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


def test_heartbeat_datagrams_carry_a_mac_per_cookie():
    rotating = HeartbeatThread("r", 1, cookie_bytes([NEW, OLD]), "127.0.0.1", 0.05, Liveness())
    receivers = {c: (HeartbeatThread("x", 2, c.encode(), "127.0.0.1", 0.05, live), live)
                 for c, live in ((OLD, Liveness()), (NEW, Liveness()),
                                 ("other-cookie-4e9d1a7b3c", Liveness()))}
    try:
        for receiver, _ in receivers.values():
            receiver.add("r", ("127.0.0.1", rotating.port), 1)
            receiver._receive(rotating._datagram())
        assert receivers[OLD][1].last_heard("r") is not None
        assert receivers[NEW][1].last_heard("r") is not None
        assert receivers["other-cookie-4e9d1a7b3c"][1].last_heard("r") is None
    finally:
        for thread in (rotating, *(r for r, _ in receivers.values())):
            thread._sock.close()


def test_the_udp_heartbeat_keeps_a_rotating_pair_alive():
    """A node on [new, old] whose loop is blocked is reachable only through
    its heartbeat thread: observers on the old and on the new cookie both
    keep it up (with one MAC under the first cookie, the old one would drop it)."""
    code = BLOCKER.replace('Node("busy", ', f'Node("busy", cookie={[NEW, OLD]!r}, ')
    assert code != BLOCKER
    proc = spawn_python(code)

    async def main():
        port = int(proc.stdout.readline())
        make, made = node_factory()
        try:
            observers = [await make(f"obs-{i}", cookie=cookie, seeds=[f"127.0.0.1:{port}"],
                                    heartbeat_interval=0.2, heartbeat_timeout=1.0).start()
                         for i, cookie in enumerate((OLD, NEW))]
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


def test_a_rolling_rotation_of_five_nodes_fails_no_call():
    """Five nodes on the old cookie; each in turn is drained and replaced by
    a node of the same name on [new, old], then each in turn on [new].  A
    caller on [new, old] (where every node is between its two restarts)
    calls without pause; every call succeeds, and calls succeed during
    every restart of both passes."""
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
            node = await make(name, cookie=cookie, seeds=seeds, heartbeat_interval=0.2,
                              heartbeat_timeout=1.0).start()
            await node.start_service(Adder)
            return node

        try:
            nodes = {}
            for i in range(N):
                nodes[f"n{i}"] = await server(f"n{i}", OLD,
                                              [seed_of(n) for n in nodes.values()])
            client = await make("client", cookie=[NEW, OLD],
                                seeds=[seed_of(n) for n in nodes.values()]).start()
            await wait_until(lambda: len(client.get_nodes("Adder")) == N)
            tasks = [asyncio.ensure_future(caller(k)) for k in range(8)]
            await asyncio.sleep(0.3)
            progress: dict[str, list[int]] = {"[new, old]": [], "[new]": []}
            for phase, cookie in (("[new, old]", [NEW, OLD]), ("[new]", [NEW])):
                for name in list(nodes):
                    before = len(outcomes)
                    await nodes[name].drain(grace=2.0)
                    others = [n for n in nodes.values() if n.name != name]
                    fresh = nodes[name] = await server(name, cookie,
                                                       [seed_of(n) for n in others])
                    await client.connect(seed_of(fresh))
                    # it meshes with every other server (old, rotating or new alike)
                    await wait_until(lambda f=fresh, o=others: all(
                        n.name in f.peers() for n in o), timeout=10)
                    await wait_until(lambda f=fresh: f.name in client.get_nodes("Adder"))
                    await asyncio.sleep(0.2)
                    progress[phase].append(len(outcomes) - before)
            stop.set()
            await asyncio.gather(*tasks)
            assert [o for o in outcomes if o is not True] == []
            assert all(n > 0 for calls in progress.values() for n in calls), progress
        finally:
            stop.set()
            await stop_all(made)

    run_async(main(), timeout=120)
