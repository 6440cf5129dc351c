"""The nodes of one process share one etcd client, ONE watch and one lease
renewed by one thread (malla.etcd_share), against a real etcd
(tests/etcdserver.py): what etcd itself counts (watch streams, leases) and
what every node sees, with the subprocess nodes killed where a process must
die.  Leases of 2 s (heartbeat_timeout 1 s)."""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import threading
import time

from etcdserver import EtcdServer
from support import ROOT, kill_process, read_line, spawn_python, wait_until, with_nodes
from test_discovery import FAST, TTL, Calc, etcd, registered, url  # noqa: F401 (fixtures)

import malla
from malla.etcd import EtcdClient
from malla.etcd_discovery import nodes_prefix

# Several nodes in a process of their own, each hosting Calc(label=name);
# prints READY.  argv: names (comma-separated) url tests-dir.
CROWD = r"""
import asyncio, sys
import malla
sys.path.insert(0, sys.argv[3])
from test_discovery import Calc

async def main():
    names, url = sys.argv[1].split(","), sys.argv[2]
    nodes = [malla.Node(name, port=0, discovery=url, heartbeat_interval=0.3,
                        heartbeat_timeout=1.0) for name in names]
    await asyncio.gather(*(node.start() for node in nodes))
    for node in nodes:
        await node.start_service(Calc(node.name))
    print("READY", flush=True)
    await asyncio.Event().wait()

malla.run(main())
"""


def leases(where: str) -> dict[str, int]:
    """Each registered node's lease id, read from etcd."""
    client = EtcdClient.from_url(where)
    prefix = nodes_prefix("/" + where.split("/", 3)[3])
    return {kv.key[len(prefix):]: kv.lease for kv in client.get_prefix(prefix)[1]}


def live_leases(where: str) -> set[int]:
    answer = EtcdClient.from_url(where).request("lease/leases", {})
    return {int(lease["ID"]) for lease in answer.get("leases", [])}


def etcd_gauge(server: EtcdServer, name: str) -> float:
    """One of etcd's own metrics (its /metrics page)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return sum(float(line.split()[1]) for line in text.splitlines()
               if line.startswith(name + " "))


def keepers() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("malla-etcd")]


async def crowd(names: list[str], where: str):
    proc = spawn_python(CROWD, ",".join(names), where, os.path.join(ROOT, "tests"))
    assert (await read_line(proc)).startswith("READY"), proc.stderr.read()
    return proc


def test_the_nodes_of_a_process_share_one_watch_and_one_lease(etcd, url):  # noqa: F811
    async def test(make):
        watches = etcd_gauge(etcd, "etcd_debugging_mvcc_watcher_total")
        a, b, c = (make(n, discovery=url, **FAST) for n in "abc")
        for node in (a, b, c):
            await node.start()
        await b.start_service(Calc("b"))
        await c.start_service(Calc("c"))
        await wait_until(lambda: all(sorted(n.get_nodes(Calc)) == ["b", "c"]
                                     for n in (a, b, c)))
        held = leases(url)
        assert sorted(held) == ["a", "b", "c"] and len(set(held.values())) == 1
        assert etcd_gauge(etcd, "etcd_debugging_mvcc_watcher_total") == watches + 1
        assert len(keepers()) == 1
        # a node started later in the same process joins the same watch and
        # lease, and hears of the members known already
        d = make("d", discovery=url, **FAST)
        await d.start()
        await wait_until(lambda: sorted(d.get_nodes(Calc)) == ["b", "c"])
        assert set(leases(url).values()) == set(held.values())
        assert etcd_gauge(etcd, "etcd_debugging_mvcc_watcher_total") == watches + 1
        # the shared lease outlives several TTLs, renewed by the one thread
        await asyncio.sleep(2 * TTL)
        assert leases(url) == dict(held, d=held["a"])
        assert await a.remote(Calc, "add", [1, 2]) == 3

    with_nodes(test)


class Other(malla.Service, global_=True):
    def ping(self):
        return "pong"


def test_the_nodes_of_a_process_hold_a_peers_entries_by_reference(url):  # noqa: F811
    """Each record is decoded once for the process and stored by reference
    by every node of it; a record that changes one service keeps the very
    objects of the others (the nodes skip them)."""
    async def test(make):
        a, b, c = (make(n, discovery=url, **FAST) for n in "abc")
        for node in (a, b, c):
            await node.start()
        await c.start_service(Calc("c"))
        await c.start_service(Other())
        await b.start_service(Other())
        await wait_until(lambda: a.get_nodes(Other) in (["b", "c"], ["c", "b"])
                         and b.get_nodes(Other)[1:] == ["c"])
        calc = a._registry.remote_info("Calc", "c")
        assert calc is not None and b._registry.remote_info("Calc", "c") is calc
        assert a._registry.checks("Calc", "c") is b._registry.checks("Calc", "c")
        # the equal entries of two nodes are one object for the process
        assert a._registry.remote_info("Other", "b") is a._registry.remote_info("Other", "c")
        await c.pause_service(Other)
        await wait_until(lambda: a.get_nodes(Other) == ["b"] and b.get_nodes(Other) == ["b"])
        for node in (a, b):
            assert node._registry.remote_info("Calc", "c") is calc
            assert node._registry.remote_info("Other", "c")["paused"] is True
        assert await a.remote(Calc, "who") == "c"

    with_nodes(test)


def test_a_killed_process_takes_all_its_nodes_within_the_lease(url):  # noqa: F811
    async def test(make):
        a = make("a", discovery=url, **FAST)
        await a.start()
        names = ["v1", "v2", "v3"]
        proc = await crowd(names, url)
        try:
            await wait_until(lambda: sorted(a.get_nodes(Calc)) == names)
            held = leases(url)
            assert len({held[n] for n in names}) == 1 and held["a"] != held["v1"]
            kill_process(proc)
            killed = time.monotonic()
            await wait_until(lambda: a.get_nodes(Calc) == [] and not set(names) & set(
                a.members()), timeout=TTL + 2)
            assert time.monotonic() - killed < TTL + 2
            assert registered(url) == {"a"}
        finally:
            kill_process(proc)

    with_nodes(test)


def test_a_stopped_node_of_a_shared_process_deletes_only_its_record(url):  # noqa: F811
    async def test(make):
        a, b, c = (make(n, discovery=url, **FAST) for n in "abc")
        for node in (a, b, c):
            await node.start()
        await b.start_service(Calc("b"))
        await c.start_service(Calc("c"))
        await wait_until(lambda: sorted(a.get_nodes(Calc)) == ["b", "c"])
        lease = leases(url)["a"]
        stopped = time.monotonic()
        await b.stop()
        # at once (the shared lease stays: a lease later would be too late)
        await wait_until(lambda: registered(url) == {"a", "c"}
                         and a.get_nodes(Calc) == ["c"], timeout=TTL / 2)
        assert time.monotonic() - stopped < TTL
        await asyncio.sleep(2 * TTL)          # the others' records are still renewed
        assert leases(url) == {"a": lease, "c": lease}
        assert await a.remote(Calc, "who") == "c"
        # b starts again in the same process: back under the shared lease
        await b.start()
        await wait_until(lambda: sorted(a.get_nodes(Calc)) == ["b", "c"])
        assert leases(url)["b"] == lease
        # the last node's stop revokes the shared lease
        for node in (a, b, c):
            await node.stop()
        assert registered(url) == set() and lease not in live_leases(url)
        assert keepers() == []

    with_nodes(test)


def test_shared_nodes_register_again_after_etcd_restarts_without_their_lease(caplog):
    caplog.set_level(logging.WARNING, "malla")
    with EtcdServer() as server:
        where = server.url("/share-restart")

        async def test(make):
            a, b = (make(n, discovery=where, **FAST) for n in "ab")
            await a.start()
            await b.start()
            await b.start_service(Calc("b"))
            await wait_until(lambda: a.get_nodes(Calc) == ["b"])
            old = leases(where)
            assert len(set(old.values())) == 1
            server.kill()
            # calls between known nodes go on
            assert await a.remote(Calc, "add", [2, 2]) == 4
            await wait_until(lambda: "etcd unreachable" in caplog.text)
            server.start()
            # etcd kept the lease: renewed again, nothing registered anew
            await asyncio.sleep(TTL)
            assert leases(where) == old and a.get_nodes(Calc) == ["b"]
            # etcd lost it (as after a restore, or `etcdctl lease revoke`):
            # both nodes register again, under one new lease
            EtcdClient.from_url(where).revoke(old["a"])
            await wait_until(lambda: sorted(leases(where)) == ["a", "b"]
                             and len(set(leases(where).values()) - set(old.values())) == 1
                             and len(set(leases(where).values())) == 1, timeout=3 * TTL)
            assert "expired; its nodes register again" in caplog.text
            await wait_until(lambda: a.get_nodes(Calc) == ["b"])
            assert await a.remote(Calc, "who") == "b"
            assert isinstance(a, malla.Node)

        with_nodes(test)
