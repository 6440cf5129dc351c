"""The cluster, as one node sees it: listening, dialling and redialling,
admitting authenticated connections (duplicates, simultaneous dials), the
full mesh (PEERS), liveness (the heartbeat loop), the check cycle, and
forgetting peers gone for good.

Strategy: one record per peer name (`Peer`) in one table, with one state
(`PeerState`) that changes only through `Cluster._set_state`, which checks
the change against one table of allowed transitions (`TRANSITIONS`, as
h11's `_state.py` does) and refuses, logged, any other: a transition not in
the table is a bug in malla.  The structures the call path and the UDP
heartbeat thread read (`connected`, the thread's targets, liveness) are
indexes of that table, written by `_set_state` and nowhere else.

What is not a peer stays apart: connections not admitted yet
(`connections` holds every open connection, for stop() and the call counts) and dials to
a target whose name is not known yet (seeds, `connect=` targets).

The cluster is what a Connection talks to (interfaces.ConnectionHost); it
reads its settings from the frozen NodeConfig.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla._ext import core
from malla.acceptor import Acceptor
from malla.connection import Connection
from malla.dialing import dial_forever, dial_once
from malla.dns import format_address, parse_address
from malla.guard import HandshakeThrottle
from malla.handshake import CAP_UDP_HEARTBEAT, Hello, member, protocol_limits
from malla.handshakes import PendingHandshakes
from malla.targets import Targets

if TYPE_CHECKING:
    from malla.config import NodeConfig
    from malla.heartbeat import HeartbeatThread
    from malla.hosting import Hosting
    from malla.interfaces import MemberSource
    from malla.liveness import Liveness
    from malla.metrics import Stats
    from malla.registry import Registry

__all__ = ["IDLE", "TRANSITIONS", "Cluster", "Peer", "PeerState"]

log = logging.getLogger("malla.cluster")

Spawn = Callable[[Coroutine[Any, Any, Any]], "asyncio.Task[Any]"]
Opener = Callable[[str, int, "float | None"], Awaitable[Connection]]

# GOODBYE's body when a connection closes for lack of calls (mesh=
# "on_demand"): the sender stays a member (docs/protocol.md)
IDLE = "idle"


def _where(conn: Connection, hello: Hello) -> str:
    """A peer's address for the logs: where it listens, else (a hidden
    peer) where its connection comes from."""
    if hello.listen:
        return format_address(*hello.listen)
    transport = conn.proto.transport if conn.proto is not None else None
    peer = transport.get_extra_info("peername") if transport is not None else None
    return format_address(str(peer[0]), int(peer[1])) if peer else "?"


class PeerState(enum.Enum):
    KNOWN = "known"            # heard of, not connected, no dial running
    DIALLING = "dialling"      # not connected; a task (re)dials it
    CONNECTED = "connected"    # an admitted connection serves it (Peer.conn)
    LOST = "lost"              # its connection ended; not being redialled (yet)
    FORGOTTEN = "forgotten"    # out of the table (terminal)


KNOWN, DIALLING, CONNECTED, LOST, FORGOTTEN = PeerState

# Every allowed change of a peer's state, and why it happens.  Nothing else
# is: _set_state refuses it.
TRANSITIONS: dict[tuple[PeerState, PeerState], str] = {
    (KNOWN, DIALLING): "this node dials it (mesh, check cycle, a call on demand)",
    (KNOWN, CONNECTED): "it dialled this node",
    (KNOWN, FORGOTTEN): "never reached within forget_after, or its discovery record went",
    (DIALLING, CONNECTED): "a connection to it was admitted (this dial's or its own)",
    (DIALLING, KNOWN): "the dial ended unconnected (the node stopped, the address was this node)",
    (DIALLING, FORGOTTEN): "not reached within forget_after, or its discovery record went: "
                           "the dial is cancelled",
    # another connection of the same peer takes over: the survivor of a
    # simultaneous dial, or a new incarnation after the old went silent
    (CONNECTED, CONNECTED): "another connection serves it now",
    (CONNECTED, LOST): "its connection broke, went silent, was replaced or closed idle",
    (LOST, DIALLING): "redialled (or dialled by a call on demand)",
    (LOST, CONNECTED): "it dialled back",
    (LOST, FORGOTTEN): "gone for forget_after, or its discovery record went",
}


class Peer:
    """One peer of this node, by name: all the cluster knows of it."""

    __slots__ = ("address", "conn", "dial", "lost_since", "name", "state")

    def __init__(self, name: str, lost_since: float | None = None) -> None:
        self.name = name
        self.state = KNOWN
        # where to (re)dial it: its listen address; None for a hidden peer,
        # or one that said goodbye (never redialled)
        self.address: tuple[str, int] | None = None
        self.conn: Connection | None = None       # the admitted one, when CONNECTED
        # since when it is not connected (forgotten forget_after later; None:
        # never, e.g. a member a hidden node heard of)
        self.lost_since = lost_since
        # the task that (re)dials it while it stays known; it may be waiting
        # for the connection it made to end, so it outlives DIALLING
        self.dial: asyncio.Task[Any] | None = None

    def __repr__(self) -> str:
        return f"<malla.Peer {self.name} {self.state.value}>"


class Cluster:
    """The peers of one node, and the connections to them."""

    def __init__(self, config: NodeConfig, cookie: bytes, registry: Registry,
                 hosting: Hosting, stats: Stats, liveness: Liveness, spawn: Spawn) -> None:
        self.config = config
        self.name = config.name
        self.cookie = cookie
        self.throttle = HandshakeThrottle()
        self.pending = PendingHandshakes(config.max_pending_handshakes, config.name)
        # drawn again by every start() after the first: a restarted node is
        # a new incarnation
        self.incarnation = random.getrandbits(64)
        self._registry = registry
        self._hosting = hosting
        self._stats = stats
        self._liveness = liveness
        self._spawn = spawn
        self._peers: dict[str, Peer] = {}
        # (an index of _peers, kept by _set_state: the call path's one lookup)
        self.connected: dict[str, Connection] = {}
        # every open connection, admitted or not (stop() closes them all)
        self.connections: set[Connection] = set()
        self.targets = Targets(config, self._connect, lambda: self.stopping)
        # the discovery source (malla.discovery; None: membership from the
        # mesh) and what dials a call's connection (mesh="on_demand"), set
        # by the node
        self.source: MemberSource | None = None
        self.opener: Opener | None = None
        self._hb: HeartbeatThread | None = None
        self._server: Acceptor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.address: tuple[str, int] | None = None
        self.running = False
        self.stopping = False
        self._goodbye_sent = False

    # -- the peer table ---------------------------------------------------------------

    def peer(self, name: str) -> Peer | None:
        return self._peers.get(name)

    def peers(self) -> list[str]:
        return sorted(self.connected)

    def members(self) -> dict[str, tuple[str, int]]:
        return {p.name: p.address for p in self._peers.values() if p.address is not None}

    def _record(self, name: str, lost_since: float | None = None) -> Peer:
        peer = self._peers.get(name)
        if peer is None:
            peer = self._peers[name] = Peer(name, lost_since)
        return peer

    def _set_state(self, peer: Peer, new: PeerState, conn: Connection | None = None) -> None:
        """The one place a peer's state changes (and the indexes with it)."""
        old = peer.state
        if (old, new) not in TRANSITIONS:
            log.error("malla: %s: refused the transition of %s from %s to %s",
                      self.name, peer.name, old.value, new.value)
            raise mexc.InternalError(f"peer {peer.name}: no transition "
                                     f"{old.value} -> {new.value}")
        peer.state = new
        name = peer.name
        if old is CONNECTED and new is not CONNECTED:
            del self.connected[name]
            peer.conn = None
            self._liveness.forget(name)
            if self._hb is not None:
                self._hb.remove(name)
        if new is CONNECTED:
            assert conn is not None and conn.peer is not None
            peer.conn = self.connected[name] = conn
            peer.lost_since = None
            self._liveness.heard(name)
            hello = conn.peer
            if self._hb is not None and hello.udp and hello.caps & CAP_UDP_HEARTBEAT:
                peer_host = conn.proto.transport.get_extra_info("peername")[0]
                self._hb.add(name, (peer_host, hello.udp), hello.incarnation)
        elif new is LOST:
            peer.lost_since = time.monotonic()
        elif new is FORGOTTEN:
            del self._peers[name]
            if peer.dial is not None:
                peer.dial.cancel()

    # -- lifecycle ----------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self._server is not None

    async def listen(self) -> tuple[str, int]:
        """Bind the listening socket; returns the address bound."""
        self.loop = asyncio.get_running_loop()
        self.stopping = self._goodbye_sent = False
        if self.address is not None:      # started before: a new incarnation
            self.incarnation = random.getrandbits(64)
        # (strangers are refused there, before a Connection is made)
        acceptor = Acceptor(lambda key: self._make_protocol(False, None, key), self.pending,
                            self.throttle, self.config.ssl_server, self.config.handshake_timeout)
        await acceptor.listen(self.config.host, self.config.port)
        self._server = acceptor       # (only once listening: a failed start is no start)
        sock = acceptor.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        return self.address

    def start(self, heartbeat: HeartbeatThread | None) -> None:
        """Start the loops and dial the seeds (in the background)."""
        self._hb = heartbeat
        self._spawn(self._heartbeat_loop())
        self._spawn(self._check_loop())
        for target in self.config.seeds:
            self.targets.dial(target)
        if self.config.connect:
            self._spawn(self.targets.resolve_loop(self.connected, lambda: self.address))
        self.running = True

    async def stop(self) -> None:
        """Say goodbye, close every connection, end every dial."""
        self.stopping = True
        self.running = False
        dials = [*self.targets.dials.values(),
                 *(p.dial for p in self._peers.values() if p.dial is not None)]
        for task in dials:
            task.cancel()
        assert self._server is not None
        self._server.close()
        self.say_goodbye()
        # (a dial still connecting has no transport yet: cancelling it is enough)
        conns = [conn for conn in self.connections if conn.proto is not None]
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([conn.closed for conn in conns], timeout=2.0)
        for conn in conns:
            if not conn.closed.done():
                conn.abort()
        await asyncio.gather(*dials, return_exceptions=True)
        self.targets.dials.clear()
        self._server = None
        self._hb = None

    def say_goodbye(self) -> None:
        if not self._goodbye_sent:
            self._goodbye_sent = True
            self.broadcast(core.FT_GOODBYE, None)

    def broadcast(self, ftype: int, body: Any) -> None:
        """A control message to every connected peer."""
        for conn in list(self.connected.values()):
            conn.proto.send_message(ftype, body)

    def busy(self) -> bool:
        """Calls from peers still running here (drain)."""
        return any(c.proto.running for c in self.connected.values())

    def protocols(self) -> list[Any]:
        """The core of every open connection (for the call counts)."""
        return [c.proto for c in self.connections if c.proto is not None]

    async def open(self, node: str, timeout: int, at: float | None) -> Connection:
        """The connection for a call to `node`, which has none (CallPeers)."""
        if self.opener is None:
            raise mexc.ServiceNotAvailable(f"no connection to {node}")
        return await self.opener(node, timeout, at)

    # -- ConnectionHost ------------------------------------------------------------

    def hello(self, sockname: Any = None) -> Hello:
        vmin, vmax, caps = protocol_limits(self.config.identity)
        udp = self._hb.port if self._hb and caps & CAP_UDP_HEARTBEAT else None
        return Hello(name=self.name, incarnation=self.incarnation, hidden=self.config.hidden,
                     vmin=vmin, vmax=vmax, caps=caps, max_frame_size=self.config.max_frame_size,
                     listen=None if self.config.hidden else self._advertised(sockname), udp=udp)

    def _advertised(self, sockname: Any) -> tuple[str, int] | None:
        # Bound to every interface (0.0.0.0): advertise the address this
        # connection uses, which the peer can reach us on.
        if self.address is None:
            return None
        host, port = self.address
        if host in ("0.0.0.0", "::") and sockname:
            host = sockname[0]
        return host, port

    def cast_failed(self, service: str, fun: str, kind: str, message: str) -> None:
        self._hosting.cast_failed(service, fun, kind, message)

    def _make_protocol(self, dialer: bool, target: str | None,
                       pending_key: int | None = None) -> Any:
        conn = Connection(self, dialer, target, pending_key)
        self.connections.add(conn)
        assert self.loop is not None
        return core.Protocol(conn, self.loop, dialer, self._hosting.exposed,
                             self.config.max_frame_size, self.config.max_message_size)

    # -- connecting ----------------------------------------------------------------

    async def connect(self, target: str) -> None:
        """Connect to `target` and wait for the handshake(s).

        `target` is "host:port", "name@domain" (every A record of the domain,
        default port 4370) or a bare domain (its SRV records).  Raises
        AuthenticationError or ProtocolError when the peer refuses us (or we
        it), Unreachable when it cannot be reached or resolved, InvalidOption
        for a target that is not an address or a name.
        """
        if type(target) is not str:
            raise mexc.InvalidOption(f"a connect target is a str, not {type(target).__name__}")
        if not self.running:
            raise mexc.NodeStopped(f"node {self.name} is not running")
        await self.targets.connect(target)

    async def _connect(self, target: str) -> Connection:
        if self.loop is None or self.stopping:
            raise mexc.NodeStopped(f"node {self.name} is not running")
        host, port = parse_address(target)
        made: list[Any] = []   # uvloop builds the protocol before the TCP connect

        def factory() -> Any:
            made.append(self._make_protocol(True, target))
            return made[-1]

        limit = self.config.handshake_timeout
        try:
            _, proto = await asyncio.wait_for(
                self.loop.create_connection(factory, host, port, ssl=self.config.ssl_client),
                limit)
        except asyncio.TimeoutError:
            raise mexc.Unreachable(f"could not reach {target} within {limit} s") from None
        finally:
            for p in made:   # a failed connect must not leave a Connection behind
                if p.owner.proto is None:
                    self.connections.discard(p.owner)
        conn: Connection = await proto.owner.ready
        return conn

    def dial_peer(self, peer: Peer, once: bool = False) -> asyncio.Task[Any] | None:
        """(Re)dial a peer at its address, in the background (`once`: one
        attempt, for the calls waiting on it); the dial, None when there is
        nothing to dial."""
        if self.stopping or peer.address is None or peer.state is CONNECTED:
            return None
        if peer.dial is None or peer.dial.done():
            target = format_address(*peer.address)
            peer.dial = asyncio.get_running_loop().create_task(
                dial_once(self._connect, target, self.name) if once
                else self._dial_forever(target, peer))
            peer.dial.add_done_callback(functools.partial(self._dial_ended, peer))
        if peer.state is not DIALLING:
            self._set_state(peer, DIALLING)
        return peer.dial

    def _dial_ended(self, peer: Peer, task: asyncio.Task[None]) -> None:
        if peer.dial is not task:       # a newer dial took over
            return
        peer.dial = None
        if peer.state is DIALLING:
            self._set_state(peer, KNOWN)

    async def _dial_forever(self, target: str, peer: Peer) -> None:
        # mesh peers are dialled while they stay known and unconnected
        def keep_going() -> bool:
            return not self.stopping and (peer.address is not None and peer.state
                                          is not CONNECTED and peer.state is not FORGOTTEN)

        await dial_forever(self._connect, target, self.name, keep_going, self.config.redial_max)

    # -- admission ----------------------------------------------------------------

    def admit(self, conn: Connection) -> None:
        self._spawn(self._admit_task(conn))

    async def _admit_task(self, conn: Connection) -> None:
        hello = conn.peer
        assert hello is not None
        if hello.name == self.name:
            if hello.incarnation == self.incarnation:
                conn.refuse(f"node {self.name} connected to itself")
            else:
                conn.refuse(f"duplicate node name {hello.name!r}: that is this node's name")
            return
        old = self.connected.get(hello.name)
        if old is not None and old is not conn:
            if await old.ping(self.config.heartbeat_interval):
                if old.peer is not None and old.peer.incarnation != hello.incarnation:
                    conn.refuse(f"duplicate node name {hello.name!r}: "
                                "a live node of that name is connected")
                    return
                # Two live connections to one peer: both sides keep the same
                # one, and the other closes once its calls are done.
                if self._survivor(old, conn, hello.name) is old:
                    conn.admit(old)
                    self._spawn(conn.retire())
                    return
                old.admit(conn)
                self._spawn(old.retire())
            else:
                log.info("malla: %s replaces its silent connection to %s", self.name, hello.name)
                self._drop(old)
                old.abort()
        if self.stopping or conn.proto.closed:
            conn.close()
            return
        peer = self._record(hello.name)
        if hello.listen and not hello.hidden:
            peer.address = hello.listen
        self._set_state(peer, CONNECTED, conn)
        conn.admit(conn)
        # (a hidden client -- a CLI command, a probe every few seconds -- at
        # DEBUG: it would flood an operator's INFO log)
        log.log(logging.DEBUG if hello.hidden else logging.INFO,
                "malla: %s connected to %s at %s%s", self.name, hello.name,
                _where(conn, hello), " (hidden)" if hello.hidden else "")
        conn.proto.send_message(core.FT_TABLE, self._hosting.table())
        if self.config.hidden or self.source is not None:   # (or: members from etcd)
            return
        conn.proto.send_message(core.FT_PEERS, self._peer_list())
        if not hello.hidden and hello.listen:
            # hidden peers hear of members too: they record them, and a
            # client (the CLI) may choose to dial them
            entry = [[hello.name, hello.listen[0], hello.listen[1]]]
            for name, other in list(self.connected.items()):
                if name != hello.name:
                    other.proto.send_message(core.FT_PEERS, entry)

    def _survivor(self, a: Connection, b: Connection, peer: str) -> Connection:
        """Of two live connections to `peer`, the one both sides keep."""
        if a.dialer != b.dialer:
            # both dialled at once: the one dialled by the smaller name
            mine_wins = self.name < peer
            return a if a.dialer == mine_wins else b
        # one side dialled twice (a seed redial racing connect()): the one
        # from the dialler's lower port, which both sides see
        return a if a.dialer_port() < b.dialer_port() else b

    def connection_closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if conn.proto is not None:
            # its calls stay counted: stats() totals never go down
            self._stats.closed_in += conn.proto.calls_in
            self._stats.closed_out += conn.proto.calls_out
        if conn.peer is not None and self.connected.get(conn.peer.name) is conn:
            self._drop(conn)
            log.log(logging.DEBUG if conn.peer.hidden else logging.INFO,
                    "malla: %s lost its connection to %s", self.name, conn.peer.name)

    def _drop(self, conn: Connection) -> None:
        """Forget `conn` as the connection serving its peer (it broke, went
        silent or was replaced); the peer is redialled until forget_after."""
        peer = self._peers.get(conn.name) if conn.name is not None else None
        if peer is None or peer.conn is not conn:
            return
        self._set_state(peer, LOST)
        self._registry.drop_node(peer.name)
        if self.source is not None:
            if self._left(peer):
                return
            self.source.restore_later(peer.name)
        if not self.config.hidden and self.config.mesh == "full":
            self.dial_peer(peer)

    def release(self, conn: Connection, tell: bool) -> None:
        """Close an idle connection without forgetting its peer's services
        (mesh="on_demand"): said to the peer (`tell`) with GOODBYE "idle",
        closed once the calls in flight on it are done."""
        peer = self._peers.get(conn.name) if conn.name is not None else None
        if peer is None or peer.conn is not conn:
            return
        if tell:
            conn.proto.send_message(core.FT_GOODBYE, IDLE)
        self._set_state(peer, LOST)
        self._left(peer)
        self._spawn(conn.retire(idle=1.0))

    def _left(self, peer: Peer) -> bool:
        """Forget a peer no longer connected whose discovery record went."""
        gone = self.source is not None and not self.source.knows(peer.name)
        if gone:
            self._set_state(peer, FORGOTTEN)
        return gone

    def _peer_list(self) -> list[list[Any]]:
        return [[n, c.peer.listen[0], c.peer.listen[1]] for n, c in self.connected.items()
                if c.peer is not None and c.peer.listen and not c.peer.hidden]

    # -- control messages -------------------------------------------------------------

    def on_control(self, conn: Connection, ftype: int, body: Any) -> None:
        name = conn.name
        assert name is not None
        source, hello = self.source, conn.peer
        if ftype == core.FT_TABLE or ftype == core.FT_ANNOUNCE:
            if source is not None and not (hello and source.vouches(name, hello.incarnation)):
                return      # (with a discovery source: only a member's own, as it is now)
            # what the discovery table refuses is counted as a peer's error
            refused = (self._registry.apply_table(name, body) if ftype == core.FT_TABLE
                       else self._registry.apply_announce(name, body))
            if refused:
                self._stats.count("ProtocolError", refused)
        elif ftype == core.FT_PEERS and source is None:
            for entry in body if type(body) is list else [body]:
                try:
                    heard, host, port = member(entry)
                except ValueError:
                    log.warning("malla: ignored a malformed member %r from %s", entry, name)
                    continue
                self.learn_member(heard, host, port)
        elif ftype == core.FT_GOODBYE and body == IDLE:
            self.release(conn, tell=False)
        elif ftype == core.FT_GOODBYE:
            # The peer is leaving for good: never redialled, forgotten once
            # its connection ends and forget_after has passed.
            peer = self._peers.get(name)
            if peer is not None:
                peer.address = None
            self._registry.drop_node(name)

    def learn_member(self, name: str, host: str, port: int) -> None:
        """A member heard of (PEERS, or its discovery record)."""
        if name == self.name:
            return
        hidden = self.config.hidden
        # not reached yet: forgotten after forget_after unless it is (a
        # hidden node only records members, for its user to dial)
        peer = self._record(name, None if hidden else time.monotonic())
        if peer.state is CONNECTED:
            return
        peer.address = (host, port)
        # The node with the smaller name dials, so that meshing rarely
        # races; the check cycle dials whatever is still missing.
        if not hidden and self.config.mesh == "full" and self.name < name:
            self.dial_peer(peer)

    def leave_member(self, name: str) -> None:
        """A member's discovery record went: out of the discovery table at
        once, forgotten now (or when its connection ends)."""
        self._registry.drop_node(name)
        peer = self._peers.get(name)
        if peer is not None:
            peer.address = None
            if peer.state is not CONNECTED:
                self._set_state(peer, FORGOTTEN)

    # -- liveness and the check cycle --------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.config.heartbeat_interval
        limit = self.config.heartbeat_timeout
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for name, conn in list(self.connected.items()):
                proto = conn.proto
                if now - proto.last_sent >= interval * 0.5:
                    proto.send_message(core.FT_HEARTBEAT, None)
                self._liveness.heard(name, proto.last_heard)
                silent = self._liveness.silent_for(name, now)
                if silent > limit:
                    log.warning("malla: %s has not heard from %s for %.1f s: dropping it",
                                self.name, name, silent)
                    self._drop(conn)
                    conn.abort()

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_interval)
            self.check()

    def check(self) -> None:
        """One check cycle: reshuffle the call order, send every peer the
        service table (repairing drift), forget the long gone, dial the
        known peers not connected."""
        self._registry.reshuffle()
        if self.source is None:     # (a discovery source's watch keeps the tables)
            self.broadcast(core.FT_TABLE, self._hosting.table())
            self._forget_long_gone()
        if not self.config.hidden and self.config.mesh == "full":
            for peer in list(self._peers.values()):
                if peer.state is not CONNECTED:
                    self.dial_peer(peer)

    def _forget_long_gone(self) -> None:
        # A peer gone for forget_after seconds is not redialled any more:
        # short-lived clients leave no ghosts.
        now = time.monotonic()
        for peer in list(self._peers.values()):
            since = peer.lost_since
            if since is not None and peer.state is not CONNECTED and (
                    now - since > self.config.forget_after):
                log.info("malla: %s forgets %s (gone for %.0f s)", self.name, peer.name,
                         now - since)
                self._set_state(peer, FORGOTTEN)
