"""DNS against a real server, dnsmasq (Debian's dnsmasq-base, installed by
the set-up when missing): A and AAAA, SRV priorities, re-resolution, errors,
through Node(dns_servers=[...]) and through the system resolver, the way a
Kubernetes pod resolves: in a network namespace whose resolv.conf has the
cluster's search list and ndots:5, with short service names."""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import time

import dns.name
import pytest
from dnsmasq import Dnsmasq, argv, free_port, require, wait_started
from support import COOKIE, ROOT, wait_until, with_nodes

import malla
from malla.dns import Resolver, search_names, srv_order

from netns import Namespace


@pytest.fixture(scope="session")
def dnsmasq_installed() -> str:
    return require()


@pytest.fixture
def dnsmasq(dnsmasq_installed):
    """Start one with `dnsmasq(records)`; stopped after the test."""
    started: list[Dnsmasq] = []

    def start(records: list[str]) -> Dnsmasq:
        started.append(Dnsmasq(records).__enter__())
        return started[-1]

    yield start
    for server in started:
        server.__exit__(None, None, None)


# -- the rules, on their own --------------------------------------------------------

K8S_SEARCH = [dns.name.from_text(d) for d in
              ("ns.svc.cluster.local", "svc.cluster.local", "cluster.local")]


@pytest.mark.parametrize(("name", "ndots", "expected"), [
    # fewer dots than ndots: the search domains first, then the name itself
    ("web", 5, ["web.ns.svc.cluster.local.", "web.svc.cluster.local.",
                "web.cluster.local.", "web."]),
    ("web.other", 5, ["web.other.ns.svc.cluster.local.", "web.other.svc.cluster.local.",
                      "web.other.cluster.local.", "web.other."]),
    # at least ndots dots: the name itself first
    ("web.other", 1, ["web.other.", "web.other.ns.svc.cluster.local.",
                      "web.other.svc.cluster.local.", "web.other.cluster.local."]),
    # a trailing dot: absolute, nothing else tried
    ("web.", 5, ["web."]),
])
def test_names_are_tried_in_resolv_conf_order(name, ndots, expected):
    assert [n.to_text() for n in search_names(name, K8S_SEARCH, ndots)] == expected


def test_srv_order_is_by_priority_then_weighted_by_weight():
    rng = random.Random(2782)
    records = [(10, 0, "backup"), (0, 1, "light"), (0, 3, "heavy")]
    firsts = [srv_order(records, rng)[0] for _ in range(4000)]
    orders = {tuple(srv_order(records, rng)) for _ in range(200)}
    # the priority-10 record always comes last; within priority 0 the
    # weight-3 record is first about 3 times in 4 (a wide band: a seeded draw)
    assert {o[2] for o in orders} == {"backup"}
    assert 0.70 < firsts.count("heavy") / len(firsts) < 0.80
    # weight 0: after the weighted ones of its priority, before the next priority
    assert srv_order([(1, 0, "next"), (0, 0, "zero"), (0, 5, "five")], rng) == [
        "five", "zero", "next"]


# -- through Node(dns_servers=[...]) ------------------------------------------------

async def dual_stack_pair(make):
    """Nodes a on 127.0.0.1 and b on ::1, on one port (what a name with an
    A and an AAAA record and a port points at)."""
    for attempt in range(10):
        try:
            port = free_port((socket.AF_INET, socket.SOCK_STREAM, "127.0.0.1"),
                             (socket.AF_INET6, socket.SOCK_STREAM, "::1"))
            a = await make(f"a{attempt}" if attempt else "a", port=port).start()
            b = await make(f"b{attempt}" if attempt else "b", host="::1", port=port).start()
            return a, b, port
        except OSError:     # taken by another process since: pick again
            continue
    raise RuntimeError("no port free on both 127.0.0.1 and ::1")

def test_name_at_domain_joins_every_a_and_aaaa_address(dnsmasq):
    """name@domain asks A and AAAA: a node on 127.0.0.1 and one on ::1 behind
    one name both join; an AAAA-only name joins over IPv6 alone."""
    async def main(make):
        a, b, port = await dual_stack_pair(make)
        server = dnsmasq(["--host-record=dual.test,127.0.0.1,::1",
                          "--host-record=six.test,::1"]).server
        r = Resolver([server])
        assert await r.resolve(f"x@dual.test:{port}") == [("127.0.0.1", port), ("::1", port)]
        assert await r.resolve(f"x@six.test:{port}") == [("::1", port)]
        c = await make("c", dns_servers=[server]).start()
        await c.connect(f"x@dual.test:{port}")
        assert c.peers() == [a.name, b.name]
        d = await make("d", dns_servers=[server]).start()
        await d.connect(f"x@six.test:{port}")
        assert d.peers() == [b.name]

    with_nodes(main)


def test_srv_targets_in_priority_order_all_joined(dnsmasq):
    """SRV records come back lowest priority first; the node joins every
    target (a cluster is a mesh: priority orders, it does not exclude), an
    AAAA-only target over IPv6."""
    async def main(make):
        a = await make("a", port=0).start()
        b = await make("b", host="::1", port=0).start()
        pa, pb = a.address[1], b.address[1]
        server = dnsmasq([
            "--host-record=n1.test,127.0.0.1", "--host-record=n6.test,::1",
            f"--srv-host=_malla._tcp.svc.test,n1.test,{pa},20,1",
            f"--srv-host=_malla._tcp.svc.test,n6.test,{pb},10,1"]).server
        r = Resolver([server])
        assert await r.resolve("_malla._tcp.svc.test") == [("::1", pb), ("127.0.0.1", pa)]
        c = await make("c", connect=["_malla._tcp.svc.test"], dns_servers=[server],
                       check_interval=0.2).start()
        await wait_until(lambda: c.peers() == ["a", "b"], timeout=10)

    with_nodes(main)


def test_a_changed_record_is_picked_up_by_connect_targets(dnsmasq):
    """Node(connect=[name@domain]) re-resolves: a pod added behind the name
    (dnsmasq restarted with the new zone) joins by itself."""
    async def main(make):
        a, b, port = await dual_stack_pair(make)
        server = dnsmasq(["--host-record=svc.test,127.0.0.1"])
        c = await make("c", connect=[f"x@svc.test:{port}"], dns_servers=[server.server],
                       check_interval=0.2).start()
        await wait_until(lambda: c.peers() == [a.name], timeout=10)
        server.restart(["--host-record=svc.test,127.0.0.1,::1"])
        await wait_until(lambda: c.peers() == [a.name, b.name], timeout=10)

    with_nodes(main)


def test_a_missing_name_is_unreachable_naming_it_and_the_servers(dnsmasq):
    server = dnsmasq(["--local=/test/", "--host-record=there.test,127.0.0.1"]).server

    async def main(make):
        c = await make("c", dns_servers=[server]).start()
        with pytest.raises(malla.Unreachable) as info:
            await c.connect("x@missing.test")
        assert "missing.test" in str(info.value)
        assert f"DNS servers {server}" in str(info.value)
        with pytest.raises(malla.Unreachable, match=r"_malla\._tcp\.missing\.test"):
            await c.connect("_malla._tcp.missing.test")

    with_nodes(main)


@pytest.mark.parametrize("down", ["silent", "stopped"])
def test_a_dns_server_that_is_down_fails_connect_within_its_timeout(dnsmasq, down):
    """A server that swallows queries, or one stopped (its port closed):
    connect() gives up after handshake_timeout with Unreachable naming the
    server, it does not hang."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        if down == "silent":
            server = f"127.0.0.1:{silent.getsockname()[1]}"
        else:
            stopped = dnsmasq(["--host-record=n.test,127.0.0.1"])
            stopped.stop()
            server = stopped.server

        async def main(make):
            c = await make("c", dns_servers=[server], handshake_timeout=1.0).start()
            started = time.monotonic()
            with pytest.raises(malla.Unreachable, match="no answer within 1 s") as info:
                await c.connect("x@n.test")
            assert time.monotonic() - started < 1.0 + 2.0
            assert f"DNS servers {server}" in str(info.value)

        with_nodes(main)


# -- through the system resolver, as in a pod ----------------------------------------

POD_RESOLV_CONF = """\
nameserver 127.0.0.1
search ns.svc.cluster.local svc.cluster.local cluster.local
options ndots:5
"""

# three "pods" on 127.0.0.11-13, port 4370, behind a headless service
# "malla-headless" in namespace "ns": A records, and SRV records for its
# named port "malla"; a decoy in the second search domain shows the first wins
ZONE = [
    "--local=/cluster.local/",
    *(f"--host-record=malla-headless.ns.svc.cluster.local,127.0.0.1{i}" for i in (1, 2, 3)),
    *(f"--host-record=pod{i}.malla-headless.ns.svc.cluster.local,127.0.0.1{i}"
      for i in (1, 2, 3)),
    *(f"--srv-host=_malla._tcp.malla-headless.ns.svc.cluster.local,"
      f"pod{i}.malla-headless.ns.svc.cluster.local,4370,0,10" for i in (1, 2, 3)),
    "--host-record=malla-headless.svc.cluster.local,127.0.0.99",
    "--host-record=db.other,127.0.0.31",
    "--host-record=db.other.ns.svc.cluster.local,127.0.0.32",
]

POD = """
import asyncio, json
import malla
from malla.dns import Resolver

async def resolved(resolver, target, order=list):
    try:
        return order(await resolver.resolve(target))
    except malla.Unreachable as exc:
        return str(exc)

async def main():
    system = Resolver()
    out = {"source": system.source,
           "a": await resolved(system, "x@malla-headless"),
           "srv": await resolved(system, "_malla._tcp.malla-headless", order=sorted),
           "fewer_dots": await resolved(system, "x@db.other"),
           "absolute": await resolved(system, "x@db.other."),
           "absolute_missing": await resolved(system, "x@malla-headless."),
           # dns_servers replace the nameservers only: the search list stays
           "servers_a": await resolved(Resolver(["127.0.0.1:53"]), "x@malla-headless")}
    pods = [malla.Node("pod1", host="127.0.0.11", port=4370, check_interval=0.2,
                       connect=["_malla._tcp.malla-headless"]),
            malla.Node("pod2", host="127.0.0.12", port=4370, check_interval=0.2,
                       connect=["pod@malla-headless"]),
            malla.Node("pod3", host="127.0.0.13", port=4370, check_interval=0.2,
                       connect=["_malla._tcp.malla-headless"])]
    for pod in pods:
        await pod.start()
    try:
        for _ in range(1000):
            if all(len(pod.peers()) == 2 for pod in pods):
                break
            await asyncio.sleep(0.01)
        out["peers"] = {pod.name: pod.peers() for pod in pods}
    finally:
        for pod in pods:
            await pod.stop()
    print(json.dumps(out), flush=True)

malla.run(main())
"""


def test_short_names_join_a_cluster_through_the_system_resolver(dnsmasq_installed):
    """In a namespace whose resolv.conf is a pod's (search list, ndots:5),
    with dnsmasq as its cluster DNS: `malla-headless` and
    `_malla._tcp.malla-headless` resolve through the search list (the first
    domain that has the name wins), a trailing dot does not search, and
    three nodes join one another by the short names."""
    with Namespace("dns", POD_RESOLV_CONF) as ns:
        log = f"/tmp/malla-dnsmasq-{ns.name}.log"
        open(log, "w").close()
        server = ns.run(argv(ZONE, address="127.0.0.1", port=53, log=log),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_started(server, log)
        pod = ns.run([sys.executable, "-c", POD], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE, text=True,
                     env={"PATH": "/usr/bin:/bin", "PYTHONPATH": ROOT, "MALLA_COOKIE": COOKIE})
        stdout, stderr = pod.communicate(timeout=60)
        assert pod.returncode == 0, stderr
        out = json.loads(stdout)
    # JSON: an address is [host, port]; a failure is the Unreachable's text
    pods = [[f"127.0.0.1{i}", 4370] for i in (1, 2, 3)]
    assert "nameserver 127.0.0.1 in /etc/resolv.conf" in out["source"]
    assert out["a"] == pods
    assert out["srv"] == pods
    assert out["servers_a"] == pods
    assert out["fewer_dots"] == [["127.0.0.32", 4370]]   # db.other.ns.svc.cluster.local
    assert out["absolute"] == [["127.0.0.31", 4370]]     # db.other.
    assert "malla-headless." in out["absolute_missing"]
    assert "the system resolver" in out["absolute_missing"]
    assert out["peers"] == {"pod1": ["pod2", "pod3"], "pod2": ["pod1", "pod3"],
                            "pod3": ["pod1", "pod2"]}
