"""DNS joining against a real authoritative DNS server on loopback (dnslib)."""

from __future__ import annotations

import pytest
from dnslib import QTYPE, RR, SRV, A, DNSLabel
from dnslib.server import BaseResolver, DNSServer
from support import run_async, wait_until, with_nodes

from malla.dns import Resolver, kind_of


class ZoneResolver(BaseResolver):
    """Answers from a mutable table: (name, qtype) -> list of RRs."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[RR]] = {}

    def resolve(self, request, handler):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".")
        qtype = QTYPE[request.q.qtype]
        for rr in self.records.get((name, qtype), []):
            reply.add_answer(rr)
        if not reply.rr:
            reply.header.rcode = 3  # NXDOMAIN
        return reply

    def set_a(self, name: str, ips: list[str]) -> None:
        self.records[(name, "A")] = [RR(name, QTYPE.A, rdata=A(ip), ttl=1) for ip in ips]

    def set_srv(self, name: str, targets: list[tuple[str, int]]) -> None:
        self.records[(name, "SRV")] = [
            RR(name, QTYPE.SRV, rdata=SRV(priority=0, weight=0, port=port,
                                          target=DNSLabel(target)), ttl=1)
            for target, port in targets]


@pytest.fixture
def dns_server():
    zone = ZoneResolver()
    server = DNSServer(zone, address="127.0.0.1", port=0)
    server.start_thread()
    port = server.server.server_address[1]
    try:
        yield zone, f"127.0.0.1:{port}"
    finally:
        server.stop()


def test_kinds_of_targets():
    assert kind_of("127.0.0.1:4370") == "address"
    assert kind_of("db1.example:4370") == "address"
    assert kind_of("storage@storage.svc.cluster.local") == "a"
    assert kind_of("_malla._tcp.example.com") == "srv"


def test_resolver_a_and_srv(dns_server):
    zone, server = dns_server
    zone.set_a("nodes.test", ["127.0.0.1", "127.0.0.2"])
    zone.set_a("n1.test", ["127.0.0.3"])
    zone.set_srv("_malla._tcp.test", [("n1.test", 5000), ("nodes.test", 6000)])

    async def main():
        r = Resolver([server], default_port=4370)
        assert await r.resolve("storage@nodes.test") == [("127.0.0.1", 4370), ("127.0.0.2", 4370)]
        # equal priorities and weights: RFC 2782 order is random among them
        assert sorted(await r.resolve("_malla._tcp.test")) == [
            ("127.0.0.1", 6000), ("127.0.0.2", 6000), ("127.0.0.3", 5000)]
        with pytest.raises(ConnectionError):
            await r.resolve("missing@nowhere.test")

    run_async(main())


def test_connect_through_srv_and_reresolve(dns_server):
    """Node(connect=[SRV name]) joins the nodes the SRV records list, and picks
    up a node added to the records later (a headless service scaling up)."""
    zone, server = dns_server

    async def main(make):
        a = await make("a").start()
        b = await make("b").start()
        zone.set_a("a.test", ["127.0.0.1"])
        zone.set_srv("_malla._tcp.test", [("a.test", a.address[1])])
        c = await make("c", connect=["_malla._tcp.test"], dns_servers=[server],
                       check_interval=0.2).start()
        await wait_until(lambda: c.peers() == ["a"], timeout=10)
        # scale up: b appears in the SRV records
        zone.set_srv("_malla._tcp.test", [("a.test", a.address[1]),
                                          ("a.test", b.address[1])])
        await wait_until(lambda: c.peers() == ["a", "b"], timeout=10)

    with_nodes(main)


def test_connect_name_at_domain(dns_server):
    zone, server = dns_server

    async def main(make):
        a = await make("a", port=0).start()
        zone.set_a("cluster.test", ["127.0.0.1"])
        c = await make("c", dns_servers=[server]).start()
        await c.connect(f"a@cluster.test:{a.address[1]}")
        assert c.peers() == ["a"]
        with pytest.raises(ConnectionError):
            await c.connect("x@missing.test")

    with_nodes(main)
