"""allow= and @malla.allow (DESIGN.md "Identity and authorization") on real
loopback nodes: fnmatch patterns of caller node names, a function's list
replacing its class's, the rules announced and a caller refusing before
sending, the serving node deciding for a caller that did not check, the
hosting node's own calls, no failover, the warning, the counters.  The call
semantics on every path are in tests/conformance/ (the "allow=" cases)."""

from __future__ import annotations

import fnmatch
import logging
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from support import COOKIE, ROOT, RawPeer, free_port, seed_of, wait_until, with_nodes

import malla
from malla._ext import core
from malla.exceptions import ERR_FORBIDDEN
from malla.metrics import prometheus_collector
from malla.registry import Registry, invalid_info
from malla.service import RunningService

FAST = {"sna_retries": 0, "retries_sleep_msec": 50, "timeout": 5000}
RUNS: Counter[str] = Counter()


class Billing(malla.Service, global_=True, allow=["web-*", "billing"]):
    def quote(self, n):
        RUNS["quote"] += 1
        return n * 2

    @malla.allow("admin-?", "ops")
    def refund(self, n):
        RUNS["refund"] += 1
        return -n

    @malla.allow("*")
    def health(self):
        RUNS["health"] += 1
        return "ok"


class Open(malla.Service, global_=True):
    def ping(self):
        return "pong"


@pytest.fixture(autouse=True)
def _clear_runs():
    RUNS.clear()


async def _cluster(make, *callers: str):
    server = await make("billing").start()
    await server.start_service(Billing)
    nodes = {}
    for name in callers:
        node = nodes[name] = await make(name, seeds=[seed_of(server)]).start()
        await wait_until(lambda n=node: n.get_nodes("Billing") == ["billing"])
    return server, nodes


def test_patterns_match_caller_names_and_a_function_list_replaces_the_class_list():
    async def body(make):
        _server, nodes = await _cluster(make, "web-1", "batch-1", "admin-7", "admin-17")
        web, batch, admin, admin17 = (nodes[n] for n in ("web-1", "batch-1", "admin-7",
                                                         "admin-17"))
        assert await web.remote("Billing", "quote", [2], **FAST) == 4
        with pytest.raises(malla.Forbidden, match=r"web-1 may not call Billing\.refund"):
            await web.remote("Billing", "refund", [1], **FAST)
        with pytest.raises(malla.Forbidden):
            await batch.remote("Billing", "quote", [2], **FAST)
        # "admin-?" is one character: admin-7, not admin-17; refund's list
        # replaces the class's, so admin-7 may not quote
        assert await admin.remote("Billing", "refund", [3], **FAST) == -3
        with pytest.raises(malla.Forbidden):
            await admin.remote("Billing", "quote", [2], **FAST)
        with pytest.raises(malla.Forbidden):
            await admin17.remote("Billing", "refund", [3], **FAST)
        # "*" opens a function to everyone
        for node in (web, batch, admin, admin17):
            assert await node.remote("Billing", "health", **FAST) == "ok"
        assert RUNS == {"quote": 1, "refund": 1, "health": 4}

    with_nodes(body)


def test_the_rules_are_announced_and_a_caller_refuses_before_sending():
    async def body(make):
        server, nodes = await _cluster(make, "batch-1")
        batch = nodes["batch-1"]
        [(_, info)] = batch.get_instances("Billing")
        assert info["allow"] == {"quote": ["web-*", "billing"], "refund": ["admin-?", "ops"]}
        before = server.stats()
        proxy = batch.service("Billing")
        # the proxy refuses when the call is made, remote() and call_cb_all
        # before anything is sent
        with pytest.raises(malla.Forbidden):
            proxy.refund(1)
        with pytest.raises(malla.Forbidden):
            await batch.remote("Billing", "quote", [1], **FAST)
        with pytest.raises(malla.Forbidden):
            await batch.remote("Billing", "quote", [1], timeout=0)
        [slot] = await batch.call_cb_all("Billing", "refund", [1])
        assert isinstance(slot, malla.Forbidden)
        assert await proxy.health() == "ok"
        after = server.stats()
        # nothing reached the server but the one allowed call
        assert after["calls_in"] == before["calls_in"] + 1
        assert after["forbidden"] == before["forbidden"] == 0
        # (remote() counts what it raises: not the proxy's refusal, raised
        # where the call is made, nor the slot)
        assert batch.stats()["errors"]["Forbidden"] == 2
        assert RUNS == {"health": 1}

    with_nodes(body)


class BillingOpen(malla.Service, name="Billing", global_=True):
    def refund(self, n):
        return -n


def test_a_proxy_drops_its_refusals_when_no_instance_takes_calls():
    # the rules may change with the next instance (a restart with new
    # ones): while none runs, the proxy leaves the decision to whichever
    # node serves next
    async def body(make):
        server, nodes = await _cluster(make, "batch-1")
        batch = nodes["batch-1"]
        proxy = batch.service("Billing")
        with pytest.raises(malla.Forbidden):
            proxy.refund(1)
        await server.stop_service(Billing)
        await wait_until(lambda: batch.get_nodes("Billing") == [])
        with pytest.raises(malla.ServiceNotAvailable):
            await batch.remote("Billing", "refund", [1], **FAST)
        call = proxy.refund(1)                   # not refused where it is made
        await server.start_service(BillingOpen)
        assert await call == -1                  # the new instance's rules hold

    with_nodes(body)


def test_the_serving_node_refuses_a_caller_that_did_not_check(caplog):
    async def body(make):
        server = await make("billing").start()
        await server.start_service(Billing)
        raw = await RawPeer.connect(server, name="intruder")
        try:
            with caplog.at_level(logging.WARNING, logger="malla"):
                # a refused cast: nobody to tell, counted and logged (once)
                raw.writer.write(core.build_frame(core.FT_CAST, 0, 999, core.packb(
                    ["Billing", "refund", [1], None, 0, None, None])))
                await wait_until(lambda: server.stats()["forbidden"] == 1)
                for _ in range(30):
                    ftype, (code, exc_type, message, _tb) = await raw.call(
                        "Billing", "quote", [1])
                    assert ftype == core.FT_ERROR and code == ERR_FORBIDDEN
                    assert exc_type == "malla.exceptions.Forbidden"
                    assert "intruder may not call Billing.quote" in message
                # the same connection still serves what it may call
                assert (await raw.call("Billing", "health"))[1] == "ok"
        finally:
            raw.close()
        stats = server.stats()
        assert stats["forbidden"] == 31 and stats["errors"] == {"Forbidden": 1}
        assert RUNS == {"health": 1}
        lines = [r.getMessage() for r in caplog.records if "Billing." in r.getMessage()]
        # logged naming service, function and caller, rate-limited
        assert lines[:2] == [
            "malla: billing: refused a call of Billing.refund from intruder: not allowed",
            "malla: billing: refused a call of Billing.quote from intruder: not allowed"]
        assert len(lines) == 10

    with_nodes(body)


def test_the_hosting_nodes_own_calls_are_checked_against_its_name():
    class Elsewhere(malla.Service, global_=True, allow="somebody-else"):
        def f(self):
            RUNS["f"] += 1
            return "ran"

    async def body(make):
        solo = await make("solo").start()
        await solo.start_service(Elsewhere)
        with pytest.raises(malla.Forbidden, match=r"solo may not call Elsewhere\.f"):
            await solo.remote("Elsewhere", "f", **FAST)
        with pytest.raises(malla.Forbidden):
            await solo.remote("Elsewhere", "f", timeout=0)
        with pytest.raises(malla.Forbidden):
            await solo.local("Elsewhere", "f")
        with pytest.raises(malla.Forbidden):
            await solo.service("Elsewhere").f()
        [slot] = await solo.call_cb_all("Elsewhere", "f")
        assert isinstance(slot, malla.Forbidden)
        await solo.stop_service("Elsewhere")
        # local() of a class that does not run here: a fresh instance, same rules
        with pytest.raises(malla.Forbidden):
            await solo.local(Elsewhere, "f")
        # (the proxy refused by the announced rules: the service was not asked)
        assert solo.stats()["forbidden"] == 5 and RUNS["f"] == 0

    with_nodes(body)


def test_forbidden_never_fails_over_to_a_node_that_would_allow():
    class Guard(malla.Service, global_=True, allow="nobody"):
        def f(self):
            RUNS["denied"] += 1

    class OpenGuard(malla.Service, name="Guard", global_=True):
        def f(self):
            RUNS["open"] += 1
            return "open"

    async def body(make):
        # in-process first (the local node comes first): refused, not failed over
        caller = await make("caller").start()
        await caller.start_service(Guard)
        other = await make("other", seeds=[seed_of(caller)]).start()
        await other.start_service(OpenGuard)
        await wait_until(lambda: len(caller.get_nodes("Guard")) == 2)
        with pytest.raises(malla.Forbidden):
            await caller.remote("Guard", "f", sna_retries=3, excp_retries=3,
                                retries_sleep_msec=10)
        assert RUNS == {} and caller.stats()["failovers"] == 0
        # over the network: either node may come first; whichever does decides
        third = await make("third", seeds=[seed_of(other)]).start()
        await third.start_service(Guard)
        await caller.stop_service("Guard")
        client = await make("client", seeds=[seed_of(other)]).start()
        await wait_until(lambda: sorted(client.get_nodes("Guard")) == ["other", "third"])
        outcomes: Counter[str] = Counter()
        for _ in range(200):
            client._registry.reshuffle()     # (what each check cycle does)
            try:
                outcomes[await client.remote("Guard", "f", **FAST)] += 1
            except malla.Forbidden:
                outcomes["forbidden"] += 1
            if len(outcomes) == 2 and sum(outcomes.values()) >= 20:
                break
        assert set(outcomes) == {"open", "forbidden"}
        assert RUNS == {"open": outcomes["open"]}     # a refusal never ran elsewhere
        assert client.stats()["failovers"] == 0

    with_nodes(body)


def test_a_warning_at_start_when_names_are_self_asserted(caplog):
    async def body(make):
        node = await make("n1").start()
        with caplog.at_level(logging.WARNING, logger="malla.authz"):
            await node.start_service(Open)
            assert not caplog.records
            await node.start_service(Billing)
        [record] = caplog.records
        assert record.name == "malla.authz"
        assert "Billing uses allow=" in record.getMessage()
        assert 'identity="cookie"' in record.getMessage()

    with_nodes(body)


def test_forbidden_is_counted_and_exported():
    async def body(make):
        server, _ = await _cluster(make)
        with pytest.raises(malla.Forbidden):
            await server.remote("Billing", "refund", [1], **FAST)
        families = {f.name: f for f in prometheus_collector(server).collect()}
        [sample] = families["malla_forbidden"].samples
        assert sample.labels == {"node": "billing"} and sample.value == 1
        assert server.stats()["forbidden"] == 1

    with_nodes(body)


def test_rules_are_validated_where_they_are_written():
    for bad in ([], "", [""], [1], 5, ["ok", None]):
        with pytest.raises(malla.InvalidOption):
            class Bad(malla.Service, allow=bad):
                def f(self):
                    pass
    for bad_patterns in ((), ("",), (b"x",)):
        with pytest.raises(malla.InvalidOption):
            malla.allow(*bad_patterns)
    with pytest.raises(malla.InvalidOption):
        malla.Node("n", identity="certificate")

    # a subclass keeps its parent's rules unless it gives its own
    class Child(Billing, name="Child"):
        def extra(self):
            pass

    assert Child._malla_rules == {"quote": ("web-*", "billing"), "refund": ("admin-?", "ops"),
                                  "extra": ("web-*", "billing")}

    # an override that does not repeat @malla.allow keeps the rule of the
    # function it overrides (overriding never silently opens a function);
    # one that gives its own replaces it
    class Audited(Open, name="Audited"):
        @malla.allow("admin-*")
        def ping(self):
            return "pong"

    class Wrapped(Audited, name="Wrapped"):
        def ping(self):                      # adds auditing, forgets the mark
            return super().ping()

    class Reopened(Audited, name="Reopened"):
        @malla.allow("*")
        def ping(self):
            return "pong"

    assert Wrapped._malla_rules == {"ping": ("admin-*",)}
    assert Reopened._malla_rules == {}

    # the bounds peers hold announced rules to hold here first (a service
    # beyond them would be refused by every peer)
    with pytest.raises(malla.InvalidOption, match="at most 128 characters"):
        malla.allow("x" * 129)
    with pytest.raises(malla.InvalidOption, match="at most 16 patterns"):
        malla.allow(*[f"n{i}" for i in range(17)])
    with pytest.raises(malla.InvalidOption, match="characters in all"):
        class Huge(malla.Service, allow=["x" * 128] * 16):
            def f1(self):
                pass

            def f2(self):
                pass

            def f3(self):
                pass


def test_malformed_announced_rules_are_refused_and_logged(caplog):
    good = {"vsn": "1", "functions": {"f": [], "g": [], "f0": [], "f1": [], "f2": []}}
    for bad in ([["x"]], {"h": ["x"]}, {"f": []}, {"f": "x"}, {"f": [""]}, {"f": [3]},
                {"f": ["x"] * 17}, {"f": ["x" * 129]},
                # within each bound, beyond the total a receiver matches
                {f"f{i}": ["*a" * 64] * 16 for i in range(3)}):
        assert invalid_info({**good, "allow": bad}) is not None, bad
    assert invalid_info({**good, "allow": {"f": ["web-*"]}}) is None
    registry = Registry("me")
    with caplog.at_level(logging.WARNING, logger="malla.registry"):
        assert registry.apply_announce("peer", ["S", {**good, "allow": {"h": ["x"]}}]) == 1
    assert registry.nodes("S") == []
    assert "refused peer's entry for service 'S'" in caplog.text
    assert "allow names 'h'" in caplog.text


_names = st.text(alphabet="ab-*?[]!x1", max_size=6)


@settings(max_examples=200, deadline=None)
@given(patterns=st.lists(_names.filter(bool), min_size=1, max_size=3),
       callers=st.lists(st.text(alphabet="ab-x1*?[", max_size=6), min_size=1, max_size=8))
def test_the_cached_verdict_is_fnmatchcase(patterns, callers):
    class Prop(malla.Service, allow=patterns):
        def f(self):
            pass

    refused: list[str] = []
    entry = RunningService(Prop(), report=lambda service, fun, caller: refused.append(caller))
    for caller in callers * 2:      # the second time from the verdict cache
        allowed = any(fnmatch.fnmatchcase(caller, p) for p in patterns) or "*" in patterns
        assert (entry.denial("f", caller) is None) == allowed
        assert (entry.refusal("f", [], None, None, caller) is None) == allowed
    assert len(refused) == 2 * sum(1 for c in callers * 2
                                   if not any(fnmatch.fnmatchcase(c, p) for p in patterns)
                                   and "*" not in patterns)


def test_the_verdict_cache_starts_anew_past_its_bound_and_stays_right():
    class Bounded(malla.Service, allow="even-*"):
        def f(self):
            pass

    entry = RunningService(Bounded())
    for round_ in range(2):
        for i in range(3000):
            name = f"{'even' if i % 2 == 0 else 'odd'}-{i}"
            assert (entry.denial("f", name) is None) == (i % 2 == 0), (round_, name)


def test_an_old_peer_reads_the_code_as_a_remote_error():
    # a receiver maps an error code it does not know to RemoteError with the
    # class name (exceptions.error_from_wire): what a peer older than code
    # 11 raises for Forbidden
    from malla.exceptions import error_body, error_from_wire

    code, exc_type, message, _ = error_body(malla.Forbidden("node x may not call S.f"))
    assert (code, exc_type) == (ERR_FORBIDDEN, "malla.exceptions.Forbidden")
    assert isinstance(error_from_wire(code, exc_type, message, None), malla.Forbidden)
    old = error_from_wire(99, exc_type, message, None)
    assert type(old) is malla.RemoteError and old.exc_type == "malla.exceptions.Forbidden"


ADMIN_SERVICE = '''
import malla


class Admin(malla.Service, global_=True, allow="ops-*"):
    def purge(self):
        return "purged"
'''


def test_malla_call_is_checked_under_its_client_name(tmp_path):
    """The CLI's calls come from its hidden node (malla-cli-PID unless
    --name): refused, `malla call` exits 3 (did not run) with one line."""
    (tmp_path / "authz_cli_service.py").write_text(ADMIN_SERVICE)
    env = dict(os.environ, MALLA_COOKIE=COOKIE,
               PYTHONPATH=os.pathsep.join([ROOT, str(tmp_path)]))
    port = free_port()
    node = subprocess.Popen([sys.executable, "-m", "malla", "node", "n1", "--port", str(port),
                             "--service", "authz_cli_service:Admin"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "listening on" in node.stdout.readline()

        def call(*extra: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "malla", "call", "Admin.purge",
                                   "--seed", f"127.0.0.1:{port}", *extra],
                                  capture_output=True, text=True, timeout=60, env=env)

        refused = call()
        assert refused.returncode == 3, refused
        assert "Forbidden" in refused.stderr and "may not call Admin.purge" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        allowed = call("--name", "ops-1")
        assert allowed.returncode == 0, allowed
        assert allowed.stdout.strip() == '"purged"'
    finally:
        node.kill()
        node.wait()
        node.stdout.close()
        node.stderr.close()
