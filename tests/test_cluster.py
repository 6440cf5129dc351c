"""Membership and discovery in one process: mesh, simultaneous dials,
hidden nodes, announcements, the check cycle."""

from __future__ import annotations

import asyncio

import pytest
from support import dialling, redials, seed_of, wait_until, with_nodes

import malla


class Svc(malla.Service, global_=True):
    def ping(self):
        return "pong"


class LocalOnly(malla.Service):
    def ping(self):
        return "local"


def connection_count(nodes):
    return sum(len(n.peers()) for n in nodes) // 2


def test_full_mesh_from_a_chain_of_seeds():
    async def main(make):
        nodes = [await make("n0").start()]
        for i in range(1, 6):   # each knows only the previous one
            nodes.append(await make(f"n{i}", seeds=[seed_of(nodes[-1])]).start())
        n = len(nodes)
        await wait_until(lambda: connection_count(nodes) == n * (n - 1) // 2, timeout=15)
        for node in nodes:
            assert node.peers() == sorted(x.name for x in nodes if x is not node)

    with_nodes(main)


def test_simultaneous_dials_end_with_one_connection():
    async def main(make):
        a = await make("a").start()
        b = await make("b").start()
        await asyncio.gather(a.connect(seed_of(b)), b.connect(seed_of(a)))
        await wait_until(lambda: len(a._cluster.connections) == len(b._cluster.connections) == 1,
                         timeout=5)
        survivor_a = a._cluster.connected["b"]
        survivor_b = b._cluster.connected["a"]
        # the connection dialled by the smaller name ("a") survived
        assert survivor_a.dialer and not survivor_b.dialer
        await a.start_service(Svc)
        await wait_until(lambda: b.get_nodes("Svc") == ["a"])
        assert await b.remote("Svc", "ping") == "pong"

    with_nodes(main)


def test_hidden_nodes_are_not_meshed_and_leave_no_ghost():
    async def main(make):
        a = await make("a").start()
        b = await make("b", seeds=[seed_of(a)]).start()
        await wait_until(lambda: a.peers() == ["b"])
        await b.start_service(Svc)
        h = await make("cli", hidden=True).start()
        await h.connect(seed_of(a))
        await asyncio.sleep(0.3)
        assert h.peers() == ["a"]                  # not meshed with b
        assert b.peers() == ["a"]
        assert a.peers() == ["b", "cli"]
        assert not redials(a, "cli")               # nobody will redial it
        with pytest.raises(ValueError):
            await h.start_service(Svc)             # no global services on hidden
        await h.stop()
        await wait_until(lambda: a.peers() == ["b"])
        assert not redials(a, "cli") and not dialling(a, "cli")

    with_nodes(main)


def test_announcements_and_non_global_services():
    async def main(make):
        a = await make("a").start()
        b = await make("b", seeds=[seed_of(a)]).start()
        await wait_until(lambda: a.peers() == ["b"])
        await a.start_service(LocalOnly)
        await a.start_service(Svc)
        await wait_until(lambda: b.get_nodes("Svc") == ["a"])
        assert b.get_nodes("LocalOnly") == []       # never announced
        assert a.get_nodes("LocalOnly") == ["a"]
        await a.pause_service("Svc")
        await wait_until(lambda: b.get_nodes("Svc") == [])
        assert a.get_nodes("Svc") == []
        await a.resume_service("Svc")
        await wait_until(lambda: b.get_nodes("Svc") == ["a"])
        await b.start_service(Svc)
        assert b.get_nodes("Svc") == ["b", "a"]      # local node first
        await a.stop_service("Svc")
        await wait_until(lambda: b.get_nodes("Svc") == ["b"])
        assert b.get_services()["Svc"] == ["b"]
        await b.stop_service("Svc")
        assert b.get_services()["Svc"] == []         # seen before, gone now

    with_nodes(main)


def test_check_cycle_repairs_drift_and_reshuffles():
    async def main(make):
        caller = await make("caller", check_interval=0.1).start()
        peers = [await make(f"p{i}", seeds=[seed_of(caller)], check_interval=0.1).start()
                 for i in range(4)]
        for p in peers:
            await p.start_service(Svc)
        await wait_until(lambda: len(caller.get_nodes("Svc")) == 4)
        # drift: the caller forgets one instance without being told
        caller._registry.set_remote("p0", "Svc", None)
        assert "p0" not in caller.get_nodes("Svc")
        await wait_until(lambda: "p0" in caller.get_nodes("Svc"), timeout=3)
        orders = set()
        for _ in range(30):
            orders.add(tuple(caller.get_nodes("Svc")))
            await asyncio.sleep(0.12)
        assert len(orders) > 1                      # reshuffled across cycles

    with_nodes(main)


def test_lost_peer_is_redialled_then_forgotten():
    async def main(make):
        a = await make("a", check_interval=0.1, forget_after=0.5, redial_max=0.1).start()
        b = await make("b", seeds=[seed_of(a)]).start()
        await wait_until(lambda: a.peers() == ["b"])
        assert redials(a, "b")
        port = b.address[1]
        # b vanishes without a goodbye: a redials it while it is known
        for conn in list(b._cluster.connections):
            conn.abort()
        b._cluster.stopping = True
        b._cluster._server.close()
        await wait_until(lambda: a.peers() == [])
        assert redials(a, "b")
        await wait_until(lambda: not redials(a, "b"), timeout=5)
        await asyncio.sleep(0.3)
        assert not dialling(a, "b")
        # b comes back on the same port: a dials no more, b dials a
        b2 = await make("b", port=port, seeds=[seed_of(a)]).start()
        await wait_until(lambda: a.peers() == ["b"])
        assert b2.incarnation != b.incarnation

    with_nodes(main)


def test_a_second_connection_from_the_same_side_fails_no_call():
    """A seed redial racing an explicit connect() (or any duplicate dial)
    makes a second live connection: one is retired once its calls are done,
    and no call in flight fails."""
    class Slow(malla.Service, global_=True):
        async def work(self, i):
            await asyncio.sleep(0.01)
            return i

    async def main(make):
        a = await make("zed").start()   # the caller's name sorts first
        await a.start_service(Slow)
        b = await make("b", seeds=[seed_of(a)]).start()
        assert await b.wait_for_services(["Slow"], retries=5)
        stop = asyncio.Event()
        errors, ok = [], 0

        async def caller(k):
            nonlocal ok
            while not stop.is_set():
                try:
                    assert await b.remote("Slow", "work", [k]) == k
                    ok += 1
                except malla.MallaError as exc:
                    errors.append(exc)

        tasks = [asyncio.ensure_future(caller(k)) for k in range(16)]
        await asyncio.sleep(0.2)
        for _ in range(5):
            await b.connect(seed_of(a))           # the same side dials again
            await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*tasks)
        assert errors == [] and ok > 100
        await wait_until(lambda: len(a._cluster.connections) == len(b._cluster.connections) == 1,
                         timeout=5)
        assert b.peers() == ["zed"]

    with_nodes(main)
