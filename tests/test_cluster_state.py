"""The cluster's peer table (malla.cluster): every allowed transition, the
refusal of any other, and the cluster's logic against fake connections
(admission, duplicates, the mesh, loss, redial, goodbye, forgetting) —
no socket; tests/test_cluster.py runs the same over real TCP."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time

import pytest
from support import FakeConnection, make_cluster, run_async

from malla import exceptions as mexc
from malla._ext import core
from malla.cluster import CONNECTED, DIALLING, FORGOTTEN, KNOWN, LOST, TRANSITIONS, PeerState

# how to bring a fresh peer (KNOWN) into each state, through allowed steps
_PATH = {KNOWN: [], DIALLING: [DIALLING], CONNECTED: [CONNECTED], LOST: [CONNECTED, LOST]}


def _peer_in(cluster, state: PeerState, name: str = "p"):
    peer = cluster._record(name)
    for step in _PATH[state]:
        cluster._set_state(peer, step, FakeConnection(name) if step is CONNECTED else None)
    assert peer.state is state
    return peer


def test_the_table_reaches_every_state_and_nothing_leaves_forgotten():
    assert {new for _, new in TRANSITIONS} == set(PeerState)
    assert not any(old is FORGOTTEN for old, _ in TRANSITIONS)
    assert (CONNECTED, FORGOTTEN) not in TRANSITIONS     # lost first, and only then gone


@pytest.mark.parametrize(("old", "new"), sorted(TRANSITIONS, key=lambda t: (t[0].value,
                                                                            t[1].value)),
                         ids=lambda s: s.value)
def test_every_allowed_transition_and_the_indexes_it_keeps(old, new):
    async def main():
        cluster = make_cluster()
        peer = _peer_in(cluster, old)
        conn = FakeConnection("p") if new is CONNECTED else None
        before = time.monotonic()
        cluster._set_state(peer, new, conn)
        assert peer.state is new
        if new is CONNECTED:
            assert cluster.connected == {"p": conn} and peer.conn is conn
            assert peer.lost_since is None
            assert cluster._liveness.last_heard("p") is not None
        else:
            assert "p" not in cluster.connected and peer.conn is None
        if new is LOST:
            assert peer.lost_since >= before
            assert cluster._liveness.last_heard("p") is None
        assert (cluster.peer("p") is None) == (new is FORGOTTEN)

    run_async(main())


_REFUSED = [(old, new) for old, new in itertools.product(PeerState, PeerState)
            if (old, new) not in TRANSITIONS and old is not FORGOTTEN]


@pytest.mark.parametrize(("old", "new"), _REFUSED, ids=lambda s: s.value)
def test_a_transition_not_in_the_table_is_refused_and_logged(old, new, caplog):
    async def main():
        cluster = make_cluster()
        peer = _peer_in(cluster, old)
        with caplog.at_level(logging.ERROR, logger="malla.cluster"):
            with pytest.raises(mexc.InternalError, match=f"{old.value} -> {new.value}"):
                cluster._set_state(peer, new, FakeConnection("p"))
        assert peer.state is old                           # unchanged
        assert ("p" in cluster.connected) == (old is CONNECTED)
        assert any("refused the transition" in r.getMessage() for r in caplog.records)

    run_async(main())


def test_admission_connects_the_peer_and_sends_table_and_members():
    async def main():
        cluster = make_cluster("b")
        first = FakeConnection("a", listen=("127.0.0.1", 5001))
        await cluster._admit_task(first)
        peer = cluster.peer("a")
        assert peer.state is CONNECTED and peer.address == ("127.0.0.1", 5001)
        assert first.serving is first and cluster.peers() == ["a"]
        assert first.proto.sent_of(core.FT_TABLE) == [{}]
        second = FakeConnection("c", listen=("127.0.0.1", 5002))
        await cluster._admit_task(second)
        # the newcomer hears of a; a hears of the newcomer
        assert second.proto.sent_of(core.FT_PEERS) == [[["a", "127.0.0.1", 5001],
                                                         ["c", "127.0.0.1", 5002]]]
        assert first.proto.sent_of(core.FT_PEERS)[-1] == [["c", "127.0.0.1", 5002]]
        assert cluster.members() == {"a": ("127.0.0.1", 5001), "c": ("127.0.0.1", 5002)}

    run_async(main())


def test_a_hidden_peer_is_connected_but_never_a_member_or_redialled():
    async def main():
        cluster = make_cluster("b")
        cli = FakeConnection("cli", listen=None, hidden=True)
        await cluster._admit_task(cli)
        assert cluster.peers() == ["cli"] and cluster.members() == {}
        cluster.connection_closed(cli)
        assert cluster.peer("cli").state is LOST and cluster.peer("cli").dial is None

    run_async(main())


def test_a_connection_to_itself_and_a_live_duplicate_name_are_refused():
    async def main():
        cluster = make_cluster("b")
        me = FakeConnection("b", incarnation=cluster.incarnation)
        await cluster._admit_task(me)
        assert "itself" in me.refused and cluster.peer("b") is None
        old = FakeConnection("a", incarnation=1, alive=True)
        await cluster._admit_task(old)
        impostor = FakeConnection("a", incarnation=2)
        await cluster._admit_task(impostor)
        assert "duplicate node name" in impostor.refused
        assert cluster.connected["a"] is old

    run_async(main())


def test_a_new_incarnation_replaces_a_silent_connection():
    async def main():
        cluster = make_cluster("b")
        old = FakeConnection("a", incarnation=1, alive=False)
        await cluster._admit_task(old)
        new = FakeConnection("a", incarnation=2)
        await cluster._admit_task(new)
        assert old.closed_by_cluster and cluster.connected["a"] is new
        assert cluster.peer("a").state is CONNECTED

    run_async(main())


@pytest.mark.parametrize(("me", "kept"), [("b", "mine"), ("z", "theirs")])
def test_of_two_simultaneous_dials_both_sides_keep_the_smaller_names(me, kept):
    async def main():
        cluster = make_cluster(me)
        mine = FakeConnection("m", dialer=True)      # this node dialled m
        theirs = FakeConnection("m", dialer=False)   # m dialled this node
        await cluster._admit_task(mine)
        await cluster._admit_task(theirs)
        survivor = {"mine": mine, "theirs": theirs}[kept]
        other = theirs if survivor is mine else mine
        assert cluster.connected["m"] is survivor
        assert other.serving is survivor
        await asyncio.sleep(0)                       # the loser retires
        assert other.closed_by_cluster and not survivor.closed_by_cluster

    run_async(main())


def test_a_lost_peer_is_redialled_at_its_address_then_forgotten():
    async def main():
        cluster = make_cluster("b", forget_after=0.2)
        conn = FakeConnection("a", listen=("127.0.0.1", 5001))
        await cluster._admit_task(conn)
        cluster._registry.set_remote("a", "Svc", {"vsn": "1", "functions": {}})
        cluster.connection_closed(conn)
        peer = cluster.peer("a")
        assert peer.state is DIALLING and peer.lost_since is not None
        assert cluster._registry.nodes("Svc") == [] and cluster.peers() == []
        await asyncio.sleep(0)
        assert cluster.dialled == ["127.0.0.1:5001"]
        dial = peer.dial
        cluster._forget_long_gone()
        assert cluster.peer("a") is peer                  # not yet
        await asyncio.sleep(0.25)
        cluster._forget_long_gone()
        assert cluster.peer("a") is None and peer.state is FORGOTTEN
        await asyncio.sleep(0.01)
        assert dial.cancelled()

    run_async(main())


def test_a_peer_that_said_goodbye_is_not_redialled():
    async def main():
        cluster = make_cluster("b")
        conn = FakeConnection("a")
        await cluster._admit_task(conn)
        cluster._registry.set_remote("a", "Svc", {"vsn": "1", "functions": {}})
        cluster.on_control(conn, core.FT_GOODBYE, None)
        assert cluster._registry.nodes("Svc") == []
        cluster.connection_closed(conn)
        assert cluster.peer("a").state is LOST and cluster.peer("a").dial is None
        cluster.check()                                    # the check cycle neither
        await asyncio.sleep(0)
        assert cluster.dialled == [] and cluster.members() == {}

    run_async(main())


@pytest.mark.parametrize(("me", "dials"), [("a", True), ("z", False)])
def test_the_mesh_the_smaller_name_dials_a_member_it_hears_of(me, dials):
    async def main():
        cluster = make_cluster(me)
        conn = FakeConnection("c")
        await cluster._admit_task(conn)
        cluster.on_control(conn, core.FT_PEERS, [["m", "127.0.0.1", 5009], ["bad"],
                                                 [me, "127.0.0.1", 1]])
        peer = cluster.peer("m")
        assert peer.address == ("127.0.0.1", 5009) and peer.lost_since is not None
        assert cluster.peer(me) is None                   # never a peer of itself
        assert peer.state is (DIALLING if dials else KNOWN)
        cluster.check()                                    # the check cycle dials it anyway
        await asyncio.sleep(0)
        assert peer.state is DIALLING and cluster.dialled == ["127.0.0.1:5009"]

    run_async(main())


def test_a_hidden_node_records_members_but_dials_none():
    async def main():
        cluster = make_cluster("cli", hidden=True)
        conn = FakeConnection("a")
        await cluster._admit_task(conn)
        assert conn.proto.sent_of(core.FT_PEERS) == []    # says nothing of its peers
        cluster.on_control(conn, core.FT_PEERS, [["m", "127.0.0.1", 5009]])
        cluster.check()
        await asyncio.sleep(0)
        assert cluster.members() == {"a": ("127.0.0.1", 5000), "m": ("127.0.0.1", 5009)}
        assert cluster.peer("m").state is KNOWN and cluster.dialled == []

    run_async(main())


def test_a_dial_that_ends_unconnected_leaves_the_peer_known():
    async def main():
        cluster = make_cluster("a")
        cluster.on_control(FakeConnection("c"), core.FT_PEERS, [["m", "127.0.0.1", 5009]])
        peer = cluster.peer("m")
        assert peer.state is DIALLING
        peer.dial.cancel()
        await asyncio.sleep(0.01)
        assert peer.state is KNOWN and peer.dial is None

    run_async(main())


def test_a_silent_peer_is_dropped_by_the_heartbeat_loop():
    async def main():
        cluster = make_cluster("b", heartbeat_interval=0.02, heartbeat_timeout=0.05)
        conn = FakeConnection("a")
        await cluster._admit_task(conn)
        conn.proto.last_heard = time.monotonic() - 10        # nothing heard for long
        cluster._liveness.forget("a")
        cluster._liveness.heard("a", time.monotonic() - 10)
        task = asyncio.get_running_loop().create_task(cluster._heartbeat_loop())
        try:
            for _ in range(100):
                if cluster.peer("a").state is not CONNECTED:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
        assert cluster.peer("a").state is DIALLING and conn.closed_by_cluster
        assert conn.proto.sent_of(core.FT_HEARTBEAT)

    run_async(main())


# -- dialling (malla.dialing) -------------------------------------------------------------

@pytest.mark.parametrize(("raised", "expected"), [
    (mexc.ConnectionLost("x"), mexc.Unreachable),
    (mexc.MessageTooLarge("x"), mexc.ProtocolError),
    (OSError("refused"), mexc.Unreachable),
    (ValueError("bad port"), mexc.InvalidOption),
])
def test_a_failed_dial_reaches_connect_as_the_error_of_its_kind(raised, expected):
    from malla.dialing import connect_error

    assert type(connect_error(raised, "h:1")) is expected
    kept = mexc.AuthenticationError("cookie")
    assert connect_error(kept, "h:1") is kept


def test_dialling_backs_off_while_unreached_and_stops_at_its_own_address():
    from malla import dialing

    async def main():
        attempts: list[float] = []

        async def unreachable(target):
            attempts.append(time.monotonic())
            if len(attempts) == 5:
                raise mexc.ProtocolError("node x connected to itself")
            raise mexc.Unreachable(f"{target}: refused")

        await asyncio.wait_for(dialing.dial_forever(unreachable, "h:1", "me", lambda: True,
                                                    redial_max=0.2), 10)
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        # (jitter: each pause is within [0.5, 1.5) of a doubling base, capped)
        bases = [min(dialing.BACKOFF_START * 2 ** i, 0.2) for i in range(len(gaps))]
        assert all(0.4 * base <= gap for gap, base in zip(gaps, bases, strict=True))
        assert len(attempts) == 5            # its own address: no sixth attempt
        assert await dialing.dial_once(unreachable, "h:1", "me") is None   # the 6th: unreached

    run_async(main())


class FakeSource:
    """A discovery source (interfaces.MemberSource) knowing `members`:
    name -> incarnation; records the restores asked of it."""

    def __init__(self, **members: int) -> None:
        self.members = members
        self.restores: list[str] = []

    def vouches(self, name: str, incarnation: int) -> bool:
        return self.members.get(name) == incarnation

    def knows(self, name: str) -> bool:
        return name in self.members

    def restore_later(self, name: str) -> None:
        self.restores.append(name)


def test_with_a_discovery_source_and_connections_on_demand():
    async def main():
        cluster = make_cluster("b", discovery="etcd://127.0.0.1:1/p")
        assert cluster.config.mesh == "on_demand"
        cluster.source = source = FakeSource(a=1)
        cluster.learn_member("a", "127.0.0.1", 5001)      # its record: known, not dialled
        await asyncio.sleep(0)
        assert cluster.peer("a").state is KNOWN and cluster.dialled == []
        conn = FakeConnection("a", incarnation=1)
        await cluster._admit_task(conn)
        assert conn.proto.sent_of(core.FT_PEERS) == []     # members come from etcd
        table = {"Svc": {"vsn": "1", "functions": {}}}
        stranger = FakeConnection("x", incarnation=7)
        await cluster._admit_task(stranger)
        cluster.on_control(stranger, core.FT_TABLE, table)  # not a member: ignored
        cluster.on_control(conn, core.FT_TABLE, table)      # the member's own: applied
        assert cluster._registry.nodes("Svc") == ["a"]
        # closed idle: not connected any more, its services kept, not redialled
        cluster.on_control(conn, core.FT_GOODBYE, "idle")
        await asyncio.sleep(0)                              # (closed by its own task)
        cluster.connection_closed(conn)
        assert cluster.peer("a").state is LOST and cluster.peers() == ["x"]
        assert cluster._registry.nodes("Svc") == ["a"] and conn.closed_by_cluster
        # a broken connection drops its services at once, for the source to restore
        conn = FakeConnection("a", incarnation=1)
        await cluster._admit_task(conn)
        cluster.connection_closed(conn)
        assert cluster._registry.nodes("Svc") == [] and source.restores == ["a"]
        await asyncio.sleep(0)
        assert cluster.dialled == []
        # its record goes: forgotten; a stranger's closed connection forgets it too
        cluster.leave_member("a")
        cluster.connection_closed(stranger)
        assert cluster.peer("a") is None and cluster.peer("x") is None

    run_async(main())

