"""malla.etcd and malla.etcd_discovery against a real etcd (Debian's
etcd-server, started by tests/etcdserver.py): registration under a lease,
the watch of the prefix, and what happens when etcd, a node or a record
misbehaves.  Leases of 2 s (the shortest DESIGN.md allows)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import ssl
import subprocess
import time
from collections.abc import Iterator

import pytest
import trustme
from etcdserver import EtcdServer
from support import free_port, run_async, spawn_python, wait_until

from malla import InvalidOption, NameInUse, ProtocolError, Unreachable
from malla.etcd import EtcdClient, parse_url
from malla.etcd_discovery import (
    JOIN,
    LEAVE,
    UPDATE,
    MemberEvent,
    Membership,
    NodeRecord,
    Registration,
    lease_ttl,
    nodes_prefix,
)

TTL = 2
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd() -> Iterator[EtcdServer]:
    with EtcdServer() as server:
        yield server


@pytest.fixture
def prefix() -> str:
    """A prefix of the test's own (the module shares one etcd)."""
    return f"/t{next(_prefixes)}-{time.monotonic_ns()}"


def record(name: str, incarnation: int = 1, **services: dict) -> NodeRecord:
    return NodeRecord(name, ("127.0.0.1", 4370), incarnation, (1, 2), dict(services))


class Watcher:
    """A Membership consumed by a task: its events, in order."""

    def __init__(self, client: EtcdClient, prefix: str) -> None:
        self.membership = Membership(client, prefix, retry_max=0.2)
        self.events: list[MemberEvent] = []
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for event in self.membership.events():
            self.events.append(event)

    def seen(self, kind: str, name: str, incarnation: int | None = None) -> bool:
        return any(e.kind == kind and e.name == name
                   and (incarnation is None or e.record.incarnation == incarnation)
                   for e in self.events)

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


async def registered(client: EtcdClient, prefix: str, rec: NodeRecord) -> Registration:
    reg = Registration(client, prefix, rec, ttl=TTL)
    await asyncio.to_thread(reg.register)
    reg.start()
    return reg


def test_parse_url():
    url = parse_url("etcd://10.0.0.1:2379,db2,[::1]:2380/malla/prod/")
    assert url.endpoints == (("10.0.0.1", 2379), ("db2", 2379), ("::1", 2380))
    assert url.prefix == "/malla/prod" and not url.tls
    assert parse_url("etcds://h:1/p").tls
    for bad in ("http://h:1/p", "etcd://h:1", "etcd://h:1/", "etcd://h:x/p", "etcd://,h/p",
                "h:1/p"):
        with pytest.raises(InvalidOption):
            parse_url(bad)
    assert lease_ttl(3.0) == 3 and lease_ttl(0.5) == 2 and lease_ttl(3.2) == 4


def test_record_round_trip_and_refusals():
    rec = record("n1", 2**64 - 1, Calc={"vsn": "1", "paused": True, "functions": {}})
    assert NodeRecord.decode(rec.encode(), "n1") == rec
    for raw, why in [(b"\xff", "not JSON"), (b"[1]", "not a JSON object"),
                     (rec.encode().replace(b'"v":1', b'"v":9'), "record format"),
                     (rec.encode(), "names 'n1', not 'n2'")]:
        with pytest.raises(ProtocolError, match=why):
            NodeRecord.decode(raw, "n2" if why.startswith("names") else "n1")
    with pytest.raises(ProtocolError, match="bad incarnation"):
        NodeRecord.decode(record("n1", -1).encode(), "n1")


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_register_watch_update_deregister(etcd, prefix, loop):
    async def main():
        client = EtcdClient.from_url(etcd.url(prefix))
        first = await registered(client, prefix, record("a"))
        watcher = Watcher(client, prefix)
        await wait_until(lambda: watcher.seen(JOIN, "a"))        # found by the first read
        second = await registered(client, prefix, record("b"))
        await wait_until(lambda: watcher.seen(JOIN, "b"))        # found by the watch
        assert set(watcher.membership.members) == {"a", "b"}
        # a service starts: the record is updated, under the same lease
        first.update(record("a", Calc={"vsn": "1"}))
        await wait_until(lambda: watcher.seen(UPDATE, "a"))
        assert watcher.membership.members["a"].services == {"Calc": {"vsn": "1"}}
        kv = await asyncio.to_thread(client.get, first.key)
        assert kv is not None and kv.lease == first.lease
        # stop: revoked, so gone at once (not one lease later)
        await asyncio.to_thread(second.close)
        assert await asyncio.to_thread(client.get, second.key) is None
        await wait_until(lambda: watcher.seen(LEAVE, "b"))
        assert set(watcher.membership.members) == {"a"}
        await watcher.close()
        await asyncio.to_thread(first.close)

    run_async(main(), loop=loop)


def test_killed_registrant_is_gone_within_the_lease_and_its_name_free(etcd, prefix):
    """A process holding a lease is SIGKILLed: its record expires with the
    lease, and a newcomer waiting for the name gets it."""
    victim = spawn_python(
        "import sys, time\n"
        "from malla.etcd import EtcdClient\n"
        "from malla.etcd_discovery import NodeRecord, Registration\n"
        "reg = Registration(EtcdClient.from_url(sys.argv[1]), sys.argv[2],\n"
        "                   NodeRecord('v', ('127.0.0.1', 1), 7, (1, 2), {}), ttl=2)\n"
        "reg.register(); reg.start(); print('ready', flush=True); time.sleep(60)\n",
        etcd.url(prefix), prefix)

    async def main():
        client = EtcdClient.from_url(etcd.url(prefix))
        assert await asyncio.to_thread(victim.stdout.readline) == "ready\n"
        watcher = Watcher(client, prefix)
        await wait_until(lambda: watcher.seen(JOIN, "v", 7))
        newcomer = Registration(client, prefix, record("v", 8), ttl=TTL)
        victim.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.to_thread(newcomer.register)          # waits for the lease to expire
        await wait_until(lambda: watcher.seen(JOIN, "v", 8), timeout=TTL + 3)
        # (a wide bound: etcd checks expiry every 0.5 s)
        assert time.monotonic() - killed < TTL + 3
        assert watcher.seen(LEAVE, "v", 7)
        assert watcher.membership.members["v"].incarnation == 8
        await watcher.close()
        await asyncio.to_thread(newcomer.close)

    try:
        run_async(main())
    finally:
        victim.kill()
        victim.wait()


def test_a_frozen_loop_does_not_expire_the_lease(etcd, prefix):
    async def main():
        client = EtcdClient.from_url(etcd.url(prefix))
        reg = await registered(client, prefix, record("f"))
        watcher = Watcher(client, prefix)
        await wait_until(lambda: watcher.seen(JOIN, "f"))
        before = await asyncio.to_thread(client.get, reg.key)
        time.sleep(2.5 * TTL)             # the event loop blocked: the thread renews
        await asyncio.sleep(0.3)          # (anything the watch has to say, said)
        after = await asyncio.to_thread(client.get, reg.key)
        assert after is not None and before is not None
        assert after.create_revision == before.create_revision and after.lease == reg.lease
        assert not watcher.seen(LEAVE, "f")
        await watcher.close()
        await asyncio.to_thread(reg.close)

    run_async(main())


def test_a_second_live_incarnation_gets_name_in_use(etcd, prefix):
    async def main():
        client = EtcdClient.from_url(etcd.url(prefix))
        holder = await registered(client, prefix, record("d", 1))
        newcomer = Registration(client, prefix, record("d", 2), ttl=TTL)
        started = time.monotonic()
        with pytest.raises(NameInUse, match="incarnation 1"):
            await asyncio.to_thread(newcomer.register)
        assert time.monotonic() - started >= TTL        # it waited one lease first
        kv = await asyncio.to_thread(client.get, holder.key)
        assert kv is not None and NodeRecord.decode(kv.value, "d").incarnation == 1
        # the same incarnation registering again (a restart of the
        # registration, not of the node) takes its record over
        again = Registration(client, prefix, record("d", 1), ttl=TTL)
        await asyncio.to_thread(again.register, 0)
        await asyncio.to_thread(holder.close)
        await asyncio.to_thread(again.close)

    run_async(main())


def test_a_lost_lease_is_registered_again(etcd, prefix, caplog):
    async def main():
        client = EtcdClient.from_url(etcd.url(prefix))
        reg = await registered(client, prefix, record("l"))
        watcher = Watcher(client, prefix)
        await wait_until(lambda: watcher.seen(JOIN, "l"))
        lost = reg.lease
        await asyncio.to_thread(client.revoke, lost)        # as an operator might
        await wait_until(lambda: watcher.seen(LEAVE, "l"))
        await wait_until(lambda: [e.kind for e in watcher.events] == [JOIN, LEAVE, JOIN],
                         timeout=TTL + 2)
        await wait_until(lambda: reg.registered)    # (the thread may not have returned yet)
        assert reg.lease not in (0, lost)
        await watcher.close()
        await asyncio.to_thread(reg.close)

    with caplog.at_level(logging.WARNING, logger="malla.etcd"):
        run_async(main())
    assert "lease of " + nodes_prefix(prefix) + "l expired" in caplog.text


def test_one_endpoint_down_fails_over_and_none_is_unreachable(etcd, prefix):
    dead = f"127.0.0.1:{free_port()}"

    async def main():
        client = EtcdClient.from_url(f"etcd://{dead},{etcd.endpoint}{prefix}")
        reg = await registered(client, prefix, record("e"))
        watcher = Watcher(EtcdClient.from_url(f"etcd://{dead},{etcd.endpoint}{prefix}"),
                          prefix)
        await wait_until(lambda: watcher.seen(JOIN, "e"))
        await watcher.close()
        await asyncio.to_thread(reg.close)
        nothing = EtcdClient.from_url(f"etcd://{dead}{prefix}")
        with pytest.raises(Unreachable, match=dead):
            await asyncio.to_thread(Registration(nothing, prefix, record("x"),
                                                 ttl=TTL).register)

    run_async(main())


def test_malformed_records_are_refused_and_logged_without_breaking_the_watch(
        etcd, prefix, caplog):
    nodes = nodes_prefix(prefix)

    async def main():
        client = EtcdClient.from_url(etcd.url(prefix))
        put = client.put
        await asyncio.to_thread(put, nodes + "junk", b"\xff\x00 not json")   # before the read
        watcher = Watcher(client, prefix)
        await asyncio.to_thread(put, nodes + "ok", record("ok").encode())
        await wait_until(lambda: watcher.seen(JOIN, "ok"))
        await asyncio.to_thread(put, nodes + "liar", record("someone-else").encode())
        await asyncio.to_thread(put, nodes + "ok", b'{"v": 1, "name": "ok"}')  # broken now
        await wait_until(lambda: watcher.seen(LEAVE, "ok"))
        await asyncio.to_thread(put, nodes + "late", record("late").encode())
        await wait_until(lambda: watcher.seen(JOIN, "late"))
        assert set(watcher.membership.members) == {"late"}
        assert [e.name for e in watcher.events] == ["ok", "ok", "late"]
        await watcher.close()

    with caplog.at_level(logging.WARNING, logger="malla.etcd"):
        run_async(main())
    assert f"refused the etcd record {nodes}junk: not JSON" in caplog.text
    assert f"refused the etcd record {nodes}liar: names 'someone-else', not 'liar'" in caplog.text
    assert f"refused the etcd record {nodes}ok: bad address" in caplog.text


def test_a_compacted_revision_is_read_again(etcd, prefix, caplog):
    async def main():
        client = EtcdClient.from_url(etcd.url(prefix))
        gone = await registered(client, prefix, record("gone"))
        membership = Membership(client, prefix)
        events = membership.events()
        assert (await events.__anext__()).name == "gone"
        await events.aclose()               # not watching now
        await asyncio.to_thread(gone.close)
        # resumed from the revision it last saw: what happened meanwhile
        events = membership.events()
        event = await events.__anext__()
        assert (event.kind, event.name) == (LEAVE, "gone")
        await events.aclose()
        again = await registered(client, prefix, record("gone", 2))
        await asyncio.to_thread(again.close)
        late = await registered(client, prefix, record("late"))
        revision, _ = await asyncio.to_thread(client.get_prefix, prefix)
        await asyncio.to_thread(client.request, "kv/compaction", {"revision": str(revision)})
        # that revision is compacted now: the prefix is read again (the
        # second "gone" came and went unseen)
        events = membership.events()
        event = await events.__anext__()
        await events.aclose()
        assert (event.kind, event.name) == (JOIN, "late")
        assert set(membership.members) == {"late"}
        await asyncio.to_thread(late.close)

    with caplog.at_level(logging.INFO, logger="malla.etcd"):
        run_async(main())
    assert "compacted" in caplog.text


def test_etcd_killed_and_restarted(caplog):
    """etcd SIGKILLed, then restarted on its data: warnings while it is
    away, the lease renewed again, a pending update stored, the watch
    resumed (it sees a node that registered after the restart)."""
    prefix = "/restart"

    async def main(etcd):
        client = EtcdClient.from_url(etcd.url(prefix))
        reg = await registered(client, prefix, record("r"))
        watcher = Watcher(client, prefix)
        await wait_until(lambda: watcher.seen(JOIN, "r"))
        etcd.kill()
        reg.update(record("r", Calc={"vsn": "2"}))      # while etcd is away
        await wait_until(lambda: caplog.text.count("etcd unreachable") >= 2)
        await asyncio.to_thread(etcd.start)
        await wait_until(lambda: watcher.seen(UPDATE, "r"), timeout=15)
        assert watcher.membership.members["r"].services == {"Calc": {"vsn": "2"}}
        late = await registered(client, prefix, record("late"))
        await wait_until(lambda: watcher.seen(JOIN, "late"))
        assert not watcher.seen(LEAVE, "r")
        assert caplog.text.count("etcd reachable again") >= 2
        await watcher.close()
        await asyncio.to_thread(reg.close)
        await asyncio.to_thread(late.close)

    with EtcdServer() as etcd, caplog.at_level(logging.INFO, logger="malla.etcd"):
        run_async(main(etcd))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("etcd unreachable, /restart/nodes/r not renewed" in w for w in warnings)
    assert any("etcd unreachable, the membership of /restart/nodes/" in w for w in warnings)


def test_etcds_with_a_trusted_and_an_untrusted_certificate(tmp_path):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    trusted = ssl.create_default_context()
    ca.configure_trust(trusted)
    prefix = "/tls"

    async def main(etcd):
        assert etcd.url(prefix).startswith("etcds://")
        client = EtcdClient.from_url(etcd.url(prefix), ssl_context=trusted)
        reg = await registered(client, prefix, record("s"))
        watcher = Watcher(client, prefix)
        await wait_until(lambda: watcher.seen(JOIN, "s"))
        await watcher.close()
        await asyncio.to_thread(reg.close)
        # the system's trust does not know the tests' CA
        untrusted = EtcdClient.from_url(etcd.url(prefix))
        with pytest.raises(Unreachable, match="CERTIFICATE_VERIFY_FAILED"):
            await asyncio.to_thread(untrusted.get_prefix, prefix)

    with EtcdServer(tls=(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
                    ca_context=trusted) as etcd:
        run_async(main(etcd))


class NotEtcd:
    """A real HTTP server on loopback answering every POST with `body`
    (what a proxy, another service on etcd's port or a broken etcd might)."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.body = b""
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", str(len(outer.body)))
                self.end_headers()
                self.wfile.write(outer.body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_malformed_answers_raise_protocol_error_and_the_watch_goes_on(caplog):
    fake = NotEtcd()
    try:
        client = EtcdClient.from_url(f"etcd://{fake.endpoint}/p")
        for body, why in [(b"<html>", "not JSON"), (b"[1, 2]", "the answer is not an object"),
                          (b'{"kvs": 5}', "kvs is not a list"),
                          (b'{"kvs": [{"key": "%%%"}]}', "bad base64"),
                          (b'{"header": {"revision": "x"}}', "'revision' is not an integer")]:
            fake.body = body
            with pytest.raises(ProtocolError, match=why):
                client.get_prefix("/p/nodes/")
        fake.body = b'{"header": {"revision": "1"}, "count": "0"}'

        async def main():
            # the range passes, the watch is answered without a stream:
            # refused, logged, tried again (the task keeps going)
            watcher = Watcher(client, "/p")
            await wait_until(lambda: caplog.text.count("the watch answer is not chunked") >= 2)
            assert not watcher.task.done() and watcher.events == []
            await watcher.close()

        with caplog.at_level(logging.WARNING, logger="malla.etcd"):
            run_async(main())
    finally:
        fake.close()


def test_etcd_partitioned_away_and_back(caplog):
    """etcd behind a cut link (packets vanish, nothing is reset): the
    renewal and the quiet watch both notice (the watch through its TCP
    keepalives) and warn; etcd expires the lease meanwhile; healed, the
    node registers again and the watch reports it gone, then back."""
    from netns import Topology

    prefix = "/partition"

    async def main(topo, etcd):
        client = EtcdClient.from_url(etcd.url(prefix))
        reg = await registered(client, prefix, record("p"))
        watcher = Watcher(client, prefix)
        await wait_until(lambda: watcher.seen(JOIN, "p"))
        topo.cut("e")
        await wait_until(lambda: "the membership of /partition/nodes/ may be out of date"
                         in caplog.text and "/partition/nodes/p not renewed" in caplog.text,
                         timeout=20)
        topo.heal("e")
        await wait_until(lambda: [e.kind for e in watcher.events] == [JOIN, LEAVE, JOIN],
                         timeout=20)
        await wait_until(lambda: reg.registered)
        assert "lease of /partition/nodes/p expired" in caplog.text
        await watcher.close()
        await asyncio.to_thread(reg.close)

    with Topology(["e"]) as topo:
        with EtcdServer(host=topo.addr("e"),
                        run=lambda argv: topo.run("e", argv, stdout=subprocess.DEVNULL,
                                                  stderr=subprocess.DEVNULL)) as etcd, \
                caplog.at_level(logging.INFO, logger="malla.etcd"):
            run_async(main(topo, etcd))
