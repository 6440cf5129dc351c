"""Past the full mesh: `Node(discovery="etcd://...")` and `mesh="on_demand"`
against a real etcd (tests/etcdserver.py), with real nodes on loopback and
subprocess nodes where one must die.  Leases of 2 s (heartbeat_timeout 1 s),
the shortest DESIGN.md allows."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import trustme
from etcdserver import EtcdServer
from support import COOKIE, ROOT, kill_process, read_line, spawn_python, wait_until, with_nodes

import malla
from malla import tls
from malla.etcd import EtcdClient
from malla.etcd_discovery import nodes_prefix

FAST = {"heartbeat_interval": 0.3, "heartbeat_timeout": 1.0}   # a lease of 2 s
TTL = 2
_prefixes = itertools.count()


class Calc(malla.Service, global_=True):
    def __init__(self, label: str = "") -> None:
        self.label = label

    def add(self, a, b):
        return a + b

    def who(self):
        return self.label

    async def slow(self, seconds):
        await asyncio.sleep(seconds)
        return "done"

    async def ticks(self, n, pause):
        for i in range(n):
            yield i
            await asyncio.sleep(pause)


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def url(etcd) -> str:
    """A discovery URL with a prefix of the test's own (one etcd per module)."""
    return etcd.url(f"/d{next(_prefixes)}-{time.monotonic_ns()}")


def registered(url: str) -> set[str]:
    """The node names with a record under the URL's prefix, read from etcd."""
    client = EtcdClient.from_url(url)
    prefix = nodes_prefix("/" + url.split("/", 3)[3])
    return {kv.key[len(prefix):] for kv in client.get_prefix(prefix)[1]}


# A node in a process of its own, hosting Calc(label=name), registered in
# etcd; prints READY.  argv: name url heartbeat_timeout.
VICTIM = r"""
import asyncio, sys
import malla
sys.path.insert(0, sys.argv[4])
from test_discovery import Calc

async def main():
    name, url, hb_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    node = malla.Node(name, port=0, discovery=url, heartbeat_interval=0.3,
                      heartbeat_timeout=hb_timeout)
    await node.start()
    await node.start_service(Calc(name))
    print("READY", flush=True)
    await asyncio.Event().wait()

malla.run(main())
"""


async def victim(name: str, url: str, hb_timeout: float = 1.0) -> subprocess.Popen:
    proc = spawn_python(VICTIM, name, url, str(hb_timeout), os.path.join(ROOT, "tests"))
    assert (await read_line(proc)).startswith("READY"), proc.stderr.read()
    return proc


async def caller_and_server(make, url: str) -> tuple[malla.Node, malla.Node]:
    """Nodes "a" and "b" started with discovery from `url`, b hosting Calc."""
    a = make("a", discovery=url, **FAST)
    b = make("b", discovery=url, **FAST)
    await a.start()
    await b.start()
    await b.start_service(Calc("b"))
    return a, b


def test_options_past_the_full_mesh():
    with pytest.raises(malla.InvalidOption, match="needs discovery"):
        malla.Node("a", mesh="on_demand")
    for bad in ({"discovery": "http://h:1/p"}, {"discovery": "etcd://h:1/"},
                {"discovery": "etcd://h/p", "mesh": "star"},
                {"discovery": "etcd://h/p", "idle_close": 0},
                {"discovery": "etcds://h/p", "discovery_ssl": "ca.pem"}):
        with pytest.raises(malla.InvalidOption):
            malla.Node("a", **bad)
    assert malla.Node("a").mesh == "full"
    node = malla.Node("a", discovery="etcd://h/p")
    assert (node.mesh, node.idle_close, node.discovery) == ("on_demand", 60.0, "etcd://h/p")
    assert malla.Node("a", discovery="etcd://h/p", mesh="full").mesh == "full"


@pytest.mark.parametrize("mesh", ["on_demand", "full"])
def test_discovery_calls_proxies_call_cb_all_and_service_changes(url, mesh):
    async def test(make):
        a, b, c = (make(n, discovery=url, mesh=mesh, **FAST) for n in "abc")
        for node in (a, b, c):
            await node.start()
        await b.start_service(Calc("b"))
        await c.start_service(Calc("c"))
        assert await a.wait_for_services([Calc], retries=20)
        await wait_until(lambda: sorted(a.get_nodes(Calc)) == ["b", "c"])
        assert registered(url) == {"a", "b", "c"}
        if mesh == "full":
            # membership from etcd, connections to all
            await wait_until(lambda: a.peers() == ["b", "c"])
        assert a.peers() == ["b", "c"] if mesh == "full" else a.peers() == []
        assert await a.remote(Calc, "add", [1, 2]) == 3
        assert await a.service("Calc").add(2, 3) == 5
        assert sorted(await a.call_cb_all(Calc, "who")) == ["b", "c"]
        assert a.peers() == ["b", "c"]          # (on demand: each opened by a call)
        assert a.get_instances(Calc)[0][1]["functions"]["add"]
        # a service's start, pause, resume and stop reach the others through etcd
        await b.pause_service(Calc)
        await wait_until(lambda: a.get_nodes(Calc) == ["c"])
        assert {await a.remote(Calc, "who") for _ in range(10)} == {"c"}
        await b.resume_service(Calc)
        await wait_until(lambda: sorted(a.get_nodes(Calc)) == ["b", "c"])
        await c.stop_service(Calc)
        await wait_until(lambda: a.get_nodes(Calc) == ["b"])
        # stop() revokes the lease: gone from every view at once
        await b.stop()
        await wait_until(lambda: a.get_nodes(Calc) == [] and "b" not in a.members(),
                         timeout=TTL)
        assert "b" not in c.members() and registered(url) == {"a", "c"}

    with_nodes(test)


def test_killed_nodes_go_and_calls_fail_over_meanwhile(url):
    """A killed node nobody is connected to stays listed until its lease
    expires: calls that pick it meanwhile fail over (unreachable before
    sending), and it is gone everywhere within its lease + 2 s.  A killed
    node with an open connection is gone at once, well within its lease."""
    async def test(make):
        a, b = await caller_and_server(make, url)
        v = await victim("v", url)
        w = await victim("w", url, hb_timeout=3.0)       # a lease of 3 s
        try:
            await wait_until(lambda: sorted(a.get_nodes(Calc)) == ["b", "v", "w"])
            assert await a._caller.call_node("w", Calc, "who") == "w"
            assert "v" not in a.peers() and "w" in a.peers()
            kill_process(v)
            kill_process(w)
            killed = time.monotonic()
            await wait_until(lambda: "w" not in a.get_nodes(Calc), timeout=2.0)
            answers = [await a.remote(Calc, "who", timeout=2000) for _ in range(20)]
            assert set(answers) <= {"b", "v"} and "v" not in answers
            await wait_until(lambda: "v" not in a.get_nodes(Calc) and "v" not in b.members(),
                             timeout=TTL + 2)
            assert time.monotonic() - killed < TTL + 2
            # w's record stays until its own lease expires: not restored meanwhile
            while "w" in a.members():
                assert "w" not in a.get_nodes(Calc)
                await asyncio.sleep(0.05)
        finally:
            kill_process(v)
            kill_process(w)

    with_nodes(test)


def test_a_failover_past_the_deadline_stops_there(url):
    """Failing over along nodes it must dial, a call stops when its deadline
    passes: CallTimeout, nothing sent, not a dial (a turn of the event loop
    each, seconds under load) for every node left of a large service."""
    async def test(make):
        a = make("a", discovery=url, **FAST)
        await a.start()
        frozen = [await victim(f"v{i}", url, hb_timeout=3.0) for i in range(5)]
        try:
            await wait_until(lambda: len(a.get_nodes(Calc)) == 5)
            for proc in frozen:       # (their TCP accepts, their handshakes never come)
                os.kill(proc.pid, signal.SIGSTOP)
            began = time.monotonic()
            with pytest.raises(malla.CallTimeout) as info:
                await a.remote(Calc, "who", timeout=150, deadline=400)
            assert info.value.sent is False
            assert time.monotonic() - began < 2.0
            # stopped where the deadline passed (400 ms over dials of at most
            # 150), neither walking every node nor sleeping for a retry round
            assert a.stats()["failovers"] < 5 and a.stats()["retries"] == 0, a.stats()
        finally:
            for proc in frozen:
                kill_process(proc)

    with_nodes(test)


def test_idle_connections_close_and_keep_the_services(url):
    async def test(make):
        a = make("a", discovery=url, idle_close=0.5, **FAST)
        b = make("b", discovery=url, idle_close=0.5, **FAST)
        h = make("h", discovery=url, hidden=True)
        for node in (a, b, h):
            await node.start()
        await b.start_service(Calc("b"))
        await wait_until(lambda: a.get_nodes(Calc) == ["b"] and h.get_nodes(Calc) == ["b"])
        # a call longer than idle_close is not cut
        assert await a.remote(Calc, "slow", [1.2]) == "done"
        assert a.peers() == ["b"] and b.peers() == ["a"]
        await wait_until(lambda: a.peers() == [] and b.peers() == [], timeout=3)
        # closed idle on both sides: no heartbeats, the services kept
        assert a._hb_thread is not None and a._hb_thread._targets == {}
        assert a.get_nodes(Calc) == ["b"] and b.members().keys() == {"a"}
        assert await a.remote(Calc, "add", [1, 1]) == 2
        # a hidden node reads the membership, calls, and never registers
        assert await h.remote(Calc, "who") == "b"
        assert "h" not in registered(url) and "h" not in a.members()

    with_nodes(test)


def test_on_demand_calls_keep_to_a_window_and_spread_beyond_it_under_load(url):
    """One caller, eight servers: sequential calls open at most the window's
    4 connections (not one per call); calls waiting on every node of it
    open more (the balancer's load spreading)."""
    async def test(make):
        servers = [make(f"s{i}", discovery=url, **FAST) for i in range(8)]
        c = make("c", discovery=url, **FAST)
        for node in (*servers, c):
            await node.start()
        for i, node in enumerate(servers):
            await node.start_service(Calc(f"s{i}"))
        await wait_until(lambda: len(c.get_nodes(Calc)) == 8)
        answered = {await c.remote(Calc, "who") for _ in range(60)}
        assert len(c.peers()) <= 4 and len(answered) <= 4, (c.peers(), answered)
        assert set(c.peers()) == answered
        await asyncio.gather(*(c.remote(Calc, "slow", [0.3]) for _ in range(64)))
        assert len(c.peers()) > 4, c.peers()

    with_nodes(test)


def test_a_stream_dials_on_demand_and_an_open_one_is_not_idle(url):
    async def test(make):
        a = make("a", discovery=url, idle_close=0.3, **FAST)
        b = make("b", discovery=url, idle_close=0.3, **FAST)
        for node in (a, b):
            await node.start()
        await b.start_service(Calc("b"))
        await wait_until(lambda: a.get_nodes(Calc) == ["b"])
        assert a.peers() == []
        # the first call that needs b is a stream: it opens the connection
        assert [x async for x in a.stream(Calc, "ticks", [3, 0], sna_retries=0)] == [0, 1, 2]
        assert a.peers() == ["b"]
        # quiet between its items for longer than idle_close, it is not cut
        assert [x async for x in a.stream(Calc, "ticks", [6, 0.15])] == list(range(6))

    with_nodes(test)


def test_a_duplicate_name_is_settled_through_etcd(url):
    async def test(make):
        await make("a", discovery=url, **FAST).start()
        twin = make("a", discovery=url, **FAST)
        started = time.monotonic()
        with pytest.raises(malla.NameInUse):
            await twin.start()
        assert time.monotonic() - started >= TTL - 0.5      # it waited for the lease
        assert not twin._cluster.listening          # (start() stopped it again)

    with_nodes(test)


def test_etcd_killed_and_restarted(caplog):
    caplog.set_level(logging.WARNING, "malla")
    with EtcdServer() as etcd:
        url = etcd.url("/restart")

        async def test(make):
            a, _ = await caller_and_server(make, url)
            await wait_until(lambda: a.get_nodes(Calc) == ["b"])
            etcd.kill()
            # calls between known nodes go on (a connection opened meanwhile too)
            assert await a.remote(Calc, "add", [2, 2]) == 4
            c = make("c", discovery=url, **FAST)
            await asyncio.wait_for(c.start(), 10)      # returns once listening
            await c.start_service(Calc("c"))
            assert "could not register in etcd" in caplog.text
            await wait_until(lambda: "etcd unreachable" in caplog.text)
            etcd.start()
            await wait_until(lambda: sorted(a.get_nodes(Calc)) == ["b", "c"], timeout=15)
            assert registered(url) == {"a", "b", "c"}
            assert sorted(await a.call_cb_all(Calc, "who")) == ["b", "c"]

        with_nodes(test)


def test_on_demand_with_tls_identity(url, tmp_path):
    ca = trustme.CA()
    ca_file = str(tmp_path / "ca.pem")
    ca.cert_pem.write_to_path(ca_file)

    def contexts(name: str) -> dict:
        pem = str(tmp_path / f"{name}.pem")
        ca.issue_cert(name).private_key_and_cert_chain_pem.write_to_path(pem)
        return {"ssl_server": tls.server_context(pem, pem, ca_file),
                "ssl_client": tls.client_context(pem, pem, ca_file), "identity": "tls"}

    async def test(make):
        a = make("a", discovery=url, **contexts("a"), **FAST)
        b = make("b", discovery=url, **contexts("b"), **FAST)
        await a.start()
        await b.start()
        await b.start_service(Calc("b"))
        await wait_until(lambda: a.get_nodes(Calc) == ["b"])
        assert await a.remote(Calc, "who") == "b" and a.peers() == ["b"]
        assert isinstance(a._cluster.connected["b"].proto.transport.get_extra_info(
            "ssl_object"), ssl.SSLObject)

    with_nodes(test)


def test_the_cli_reaches_an_etcd_discovered_cluster(url):
    env = dict(os.environ, PYTHONPATH=ROOT, MALLA_COOKIE=COOKIE)

    def malla_cli(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "malla", *args], capture_output=True,
                              text=True, timeout=60, env=dict(env, **extra), cwd=ROOT)

    node = subprocess.Popen([sys.executable, "-m", "malla", "node", "n1", "--port", "0",
                             "--service", "examples.calculator:Calculator", "--discovery", url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, cwd=ROOT)
    try:
        assert "listening on" in node.stdout.readline()
        out = malla_cli("services", "--json", "--discovery", url)
        assert out.returncode == 0, out.stderr
        assert [r["nodes"] for r in json.loads(out.stdout)] == [["n1"]]
        out = malla_cli("call", "Calculator.add", "1", "2", MALLA_DISCOVERY=url)
        assert (out.returncode, out.stdout.strip()) == (0, "3"), out.stderr
        out = malla_cli("ping", "n1", "--ready", "--discovery", url)
        assert out.returncode == 0 and "n1: ready" in out.stdout, out.stderr
    finally:
        node.terminate()
        node.wait(10)
        for stream in (node.stdout, node.stderr):
            stream.close()
