"""A node: listens, dials, admits authenticated peers, hosts services,
announces them, keeps peers' liveness, and stops cleanly.

Everything here is lifecycle and membership; the services hosted here live
in malla.hosting, the call path in malla.caller (a composed Caller; metrics
and tracing wrap its remote() as interceptors) and the per-call work in the
core.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import ssl
import time
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla._ext import core
from malla.caller import Caller
from malla.config import NodeConfig
from malla.connection import Connection
from malla.dns import DEFAULT_PORT, Resolver, kind_of, parse_address, resolve_all
from malla.guard import HandshakeThrottle, cookie_weakness
from malla.handshake import CAP_UDP_HEARTBEAT, Hello, member, protocol_limits
from malla.heartbeat import HeartbeatThread
from malla.hosting import Hosting
from malla.liveness import Liveness
from malla.metrics import Metrics, Stats, serve_prometheus
from malla.precompile import load_precompile
from malla.proxy import Proxy, Services
from malla.registry import Registry, invalid_info, service_name
from malla.service import Service
from malla.tracing import Tracing

if TYPE_CHECKING:
    from malla.interfaces import CallInterceptor

__all__ = ["Node", "parse_address"]

log = logging.getLogger("malla.node")

def _cookie_bytes(cookie: str | bytes | None) -> bytes:
    if cookie is None:
        cookie = os.environ.get("MALLA_COOKIE") or os.urandom(32).hex()
    raw = cookie.encode() if isinstance(cookie, str) else bytes(cookie)
    weakness = cookie_weakness(raw)
    if weakness:
        log.warning("malla: weak cookie: %s; the cookie is the cluster's root secret", weakness)
    return raw


class Node:
    """A member of a malla cluster (DESIGN.md "Nodes and the cluster").

    Seconds as floats for node settings, bytes for sizes.
    """

    def __init__(self, name: str, *, cookie: str | bytes | None = None,
                 host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 seeds: list[str] | tuple[str, ...] = (),
                 connect: list[str] | tuple[str, ...] = (), hidden: bool = False,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 3.0,
                 handshake_timeout: float = 5.0, check_interval: float = 10.0,
                 redial_max: float = 5.0, max_frame_size: int = 1 << 20,
                 max_message_size: int = 64 << 20, window_size: int = core.WINDOW,
                 ssl_server: Any = None,
                 ssl_client: Any = None, dns_servers: list[str] | None = None,
                 forget_after: float = 60.0, precompile: Any = None,
                 udp_heartbeat: bool = True, metrics: bool = False,
                 metrics_port: int | None = None, tracing: bool | float = False) -> None:
        if isinstance(seeds, str) or isinstance(connect, str):
            raise mexc.InvalidOption("seeds and connect are lists of targets, not one string")
        config = self.config = NodeConfig(
            name=name, host=host, port=port, seeds=tuple(seeds), connect=tuple(connect),
            hidden=hidden, heartbeat_interval=heartbeat_interval,
            heartbeat_timeout=heartbeat_timeout, handshake_timeout=handshake_timeout,
            check_interval=check_interval, redial_max=redial_max, forget_after=forget_after,
            max_frame_size=max_frame_size, max_message_size=max_message_size,
            window_size=window_size, ssl_server=ssl_server, ssl_client=ssl_client,
            dns_servers=tuple(dns_servers) if dns_servers else None,
            udp_heartbeat=udp_heartbeat, metrics=metrics, metrics_port=metrics_port,
            tracing=tracing)
        # (the settings as attributes, for the layers that read them)
        self.name, self.host, self.port, self.hidden = name, host, port, hidden
        self.seeds, self.connect_targets = list(config.seeds), list(config.connect)
        self.dns_servers = list(config.dns_servers) if config.dns_servers else None
        self.forget_after = forget_after
        self.udp_heartbeat = udp_heartbeat
        self.metrics_port = metrics_port
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.handshake_timeout = handshake_timeout
        self.check_interval = check_interval
        self.redial_max = redial_max
        self.max_frame_size = max_frame_size
        self.max_message_size = max_message_size
        self.window_size = window_size
        self.ssl_server = ssl_server
        self.ssl_client = ssl_client
        self._metrics_server: Any = None
        self._hb_thread: HeartbeatThread | None = None
        # drawn again by every start(): a restarted node is a new incarnation
        self.incarnation = random.getrandbits(64)
        self._live = False
        self._cookie = _cookie_bytes(cookie)
        self._registry = Registry(name)
        self._throttle = HandshakeThrottle()
        self._precompiled = load_precompile(precompile)
        self._proxies: dict[str, Proxy] = {}
        self.services = Services(self)
        self._liveness = Liveness()
        self._stats = Stats()
        self._conns: dict[str, Connection] = {}
        # (the caller reads the admitted connections under this name)
        self.connected = self._conns
        self._all: set[Connection] = set()
        self._known: dict[str, tuple[str, int]] = {}
        self._lost_at: dict[str, float] = {}
        self._resolver: Resolver | None = None
        self._dialing: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._address: tuple[str, int] | None = None
        self._stopping = False
        self._draining = False
        self._goodbye_sent = False
        self._members: dict[str, tuple[str, int]] = {}
        self._metrics = Metrics() if metrics or metrics_port is not None else None
        tracer = None if tracing is False else Tracing(1.0 if tracing is True else float(tracing))
        self._hosting = Hosting(config, self._registry, self._stats, tracer, self._broadcast)
        self._caller = Caller(name, self._registry, self._hosting, self, self._stats,
                              self._spawn, carrier=tracer.carrier if tracer else None)
        remote, call_cb_all = self._caller.remote, self._caller.call_cb_all
        interceptors: list[CallInterceptor] = [i for i in (self._metrics, tracer) if i]
        for interceptor in interceptors:     # (the last one outermost)
            remote = interceptor.wrap_remote(remote)
            call_cb_all = interceptor.wrap_call_cb_all(call_cb_all)
        # Bound on the instance: a call enters the caller (or the first
        # interceptor) directly, with no frame of this node.
        self.remote = self._remote = remote  # type: ignore[method-assign]
        self.call_cb_all = self._call_cb_all = call_cb_all  # type: ignore[method-assign]
        self.local = self._caller.local  # type: ignore[method-assign]

    @property
    def running(self) -> bool:
        return self._live

    def _broadcast(self, ftype: int, body: Any) -> None:
        for conn in list(self._conns.values()):
            conn.proto.send_message(ftype, body)

    def __repr__(self) -> str:
        return f"<malla.Node {self.name} {self._address or 'not started'}>"

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> Node:
        """Listen, then dial the seeds in the background; returns once listening."""
        if self._server is not None:
            return self
        self._loop = asyncio.get_running_loop()
        self._stopping = self._draining = self._goodbye_sent = False
        if self._address is not None:      # started before: a new incarnation
            self.incarnation = random.getrandbits(64)
        self._server = await self._loop.create_server(
            lambda: self._make_protocol(False, None), self.host, self.port,
            ssl=self.ssl_server, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        self._address = (sock[0], sock[1])
        if self.udp_heartbeat:
            self._hb_thread = HeartbeatThread(self.name, self.incarnation, self._cookie,
                                              sock[0], self.heartbeat_interval, self._liveness)
            self._hb_thread.start()
        self._spawn(self._heartbeat_loop())
        self._spawn(self._check_loop())
        for target in self.seeds:
            self._dial_in_background(target)
        if self.connect_targets:
            self._spawn(self._resolve_loop())
        if self.metrics_port is not None and self._metrics_server is None:
            self._metrics_server = serve_prometheus(self, self.metrics_port, self.host)
        self._live = True
        log.info("malla: node %s listening on %s:%d", self.name, *self._address)
        return self

    async def stop(self) -> None:
        """Say goodbye to the peers, close every connection and stop. Idempotent."""
        if self._server is None or self._stopping:
            return
        self._stopping = True
        self._live = False
        for task in list(self._tasks) + list(self._dialing.values()):
            task.cancel()
        self._server.close()
        self._say_goodbye()
        # (a dial still connecting has no transport yet: cancelling it is enough)
        conns = [conn for conn in self._all if conn.proto is not None]
        for conn in conns:
            conn.close()
        if conns:
            await asyncio.wait([conn.closed for conn in conns], timeout=2.0)
        for conn in conns:
            if not conn.closed.done():
                conn.abort()
        await asyncio.gather(*self._tasks, *self._dialing.values(), return_exceptions=True)
        self._tasks.clear()
        self._dialing.clear()
        self._server = None
        if self._hb_thread is not None:
            self._hb_thread.stop()
            self._hb_thread = None
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            thread.join(timeout=2)
            self._metrics_server = None
        log.info("malla: node %s stopped", self.name)

    def _say_goodbye(self) -> None:
        if not self._goodbye_sent:
            self._goodbye_sent = True
            for conn in list(self._conns.values()):
                conn.proto.send_message(core.FT_GOODBYE, None)

    async def drain(self, grace: float = 10.0, linger: float = 0.2) -> None:
        """Leave the cluster without failing a call.

        Stops advertising every service at once (announced paused: callers
        fail over, and a call that still arrives gets "service not
        available"), lets calls in flight finish for up to `grace` seconds,
        says goodbye, answers stragglers for `linger` seconds, then stops.
        """
        if self._server is None or self._stopping or self._draining:
            return
        self._draining = True
        await self._hosting.pause_all()
        end = time.monotonic() + grace
        while self._busy() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._busy():
            log.warning("malla: %s drained with calls still running after %.1f s",
                        self.name, grace)
        self._say_goodbye()
        await asyncio.sleep(linger)
        await self.stop()

    def _busy(self) -> bool:
        """Calls to this node's services still running."""
        return (self._hosting.busy()
                or any(c.proto.running for c in self._conns.values()))

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound."""
        if self._address is None:
            raise mexc.NodeStopped(f"node {self.name} is not started")
        return self._address

    def peers(self) -> list[str]:
        """Names of the connected, authenticated peers."""
        return sorted(self._conns)

    def members(self) -> dict[str, tuple[str, int]]:
        """Every visible member this node has heard of, with its address
        (a hidden node hears of them but does not connect by itself)."""
        out = dict(self._members)
        out.update({n: c.peer.listen for n, c in self._conns.items()
                    if c.peer is not None and c.peer.listen})
        return out

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- connections ----------------------------------------------------------------

    def _hello(self, sockname: Any = None) -> Hello:
        vmin, vmax, caps = protocol_limits()
        udp = self._hb_thread.port if self._hb_thread and caps & CAP_UDP_HEARTBEAT else None
        return Hello(name=self.name, incarnation=self.incarnation, hidden=self.hidden,
                     vmin=vmin, vmax=vmax, caps=caps, max_frame_size=self.max_frame_size,
                     listen=None if self.hidden else self._advertised(sockname), udp=udp)

    def _advertised(self, sockname: Any) -> tuple[str, int] | None:
        # Bound to every interface (0.0.0.0): advertise the address this
        # connection uses, which the peer can reach us on.
        if self._address is None:
            return None
        host, port = self._address
        if host in ("0.0.0.0", "::") and sockname:
            host = sockname[0]
        return host, port

    def _make_protocol(self, dialer: bool, target: str | None) -> Any:
        conn = Connection(self, dialer, target)
        self._all.add(conn)
        assert self._loop is not None
        return core.Protocol(conn, self._loop, dialer, self._hosting.exposed,
                             self.max_frame_size, self.max_message_size)

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
        if not self._live:
            raise mexc.NodeStopped(f"node {self.name} is not running")
        if kind_of(target) == "address":
            await self._connect_checked(target)
            return
        try:
            addresses = await self._dns().resolve(target)
        except (OSError, ValueError) as exc:
            raise mexc.Unreachable(str(exc)) from exc
        results = await asyncio.gather(*(self._connect_checked(f"{h}:{p}")
                                         for h, p in addresses), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if len(errors) == len(results):
            if errors:
                raise errors[0]
            raise mexc.Unreachable(f"{target!r} resolved to no reachable node")

    async def _connect_checked(self, target: str) -> None:
        """_connect, its failures as malla errors (for connect())."""
        try:
            await self._connect(target)
        except (mexc.AuthenticationError, mexc.ProtocolError, mexc.Unreachable,
                mexc.NodeStopped, mexc.InvalidOption):
            raise
        except mexc.ConnectionLost as exc:   # closed during the handshake: never reached
            raise mexc.Unreachable(f"{target} closed the connection during the handshake"
                                   ) from exc
        except mexc.MallaError as exc:       # a peer's ERROR on stream 0 of another kind
            raise mexc.ProtocolError(f"{target} refused us: {exc}") from exc
        except ssl.SSLError as exc:
            raise mexc.AuthenticationError(f"TLS handshake with {target} failed: {exc}") from exc
        except ValueError as exc:
            raise mexc.InvalidOption(str(exc)) from exc
        except OSError as exc:   # refused, unreachable, timed out
            raise mexc.Unreachable(f"could not reach {target}: {exc}") from exc

    def _dns(self) -> Resolver:
        if self._resolver is None:
            self._resolver = Resolver(self.dns_servers)
        return self._resolver

    async def _resolve_loop(self) -> None:
        # Node(connect=[...]): re-resolve every check_interval and dial the
        # addresses not connected yet (pods come and go behind a name).
        while True:
            addresses = await resolve_all(self._dns(), self.connect_targets)
            connected = {c.peer.listen for c in self._conns.values() if c.peer and c.peer.listen}
            for host, port in addresses:
                if (host, port) not in connected and (host, port) != self._address:
                    self._dial_in_background(f"{host}:{port}", once=True)
            await asyncio.sleep(self.check_interval)

    async def _connect(self, target: str) -> Connection:
        if self._loop is None or self._stopping:
            raise mexc.NodeStopped(f"node {self.name} is not running")
        host, port = parse_address(target)
        made: list[Any] = []   # uvloop builds the protocol before the TCP connect

        def factory() -> Any:
            made.append(self._make_protocol(True, target))
            return made[-1]

        try:
            _, proto = await asyncio.wait_for(
                self._loop.create_connection(factory, host, port, ssl=self.ssl_client),
                self.handshake_timeout)
        except asyncio.TimeoutError:
            raise mexc.Unreachable(f"could not reach {target} within "
                                   f"{self.handshake_timeout} s") from None
        finally:
            for p in made:   # a failed connect must not leave a Connection behind
                if p.owner.proto is None:
                    self._all.discard(p.owner)
        conn: Connection = await proto.owner.ready
        return conn

    def _dial_in_background(self, target: str, peer: str | None = None,
                            once: bool = False) -> None:
        key = peer or target
        if key in self._dialing or self._stopping:
            return
        coro = self._dial_once(target) if once else self._dial_forever(target, peer)
        task = asyncio.get_running_loop().create_task(coro)
        self._dialing[key] = task
        task.add_done_callback(lambda _t: self._dialing.pop(key, None))

    async def _dial_forever(self, target: str, peer: str | None) -> None:
        # Seeds are dialled while the node runs; mesh peers while they stay
        # known.  Capped exponential backoff between attempts.
        delay = 0.05
        while not self._stopping:
            if peer is not None and (peer not in self._known or peer in self._conns):
                return
            try:
                conn = await self._connect(target)
                delay = 0.05
                await conn.closed
            except (OSError, ConnectionError, ValueError) as exc:
                # not reached (Unreachable and ConnectionLost are ConnectionErrors),
                # or a bad address: tried again, quietly
                log.debug("malla: %s could not reach %s: %s", self.name, target, exc)
            except mexc.MallaError as exc:
                if isinstance(exc, mexc.ProtocolError) and "itself" in str(exc):
                    return
                log.warning("malla: %s could not join %s: %s", self.name, target, exc)
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.redial_max)

    async def _dial_once(self, target: str) -> None:
        try:
            await self._connect(target)
        except (OSError, ConnectionError, ValueError) as exc:   # (as in _dial_forever)
            log.debug("malla: %s could not reach %s: %s", self.name, target, exc)
        except mexc.MallaError as exc:
            log.warning("malla: %s could not join %s: %s", self.name, target, exc)

    def _admit(self, conn: Connection) -> None:
        self._spawn(self._admit_task(conn))

    async def _admit_task(self, conn: Connection) -> None:
        peer = conn.peer
        assert peer is not None
        if peer.name == self.name:
            if peer.incarnation == self.incarnation:
                conn.refuse(f"node {self.name} connected to itself")
            else:
                conn.refuse(f"duplicate node name {peer.name!r}: that is this node's name")
            return
        old = self._conns.get(peer.name)
        if old is not None and old is not conn:
            if await old.ping(self.heartbeat_interval):
                if old.peer is not None and old.peer.incarnation != peer.incarnation:
                    conn.refuse(f"duplicate node name {peer.name!r}: "
                                "a live node of that name is connected")
                    return
                # Two live connections to one peer: both sides keep the same
                # one, and the other closes once its calls are done.
                if self._survivor(old, conn, peer.name) is old:
                    conn.admit(old)
                    self._spawn(conn.retire())
                    return
                old.admit(conn)
                self._spawn(old.retire())
            else:
                log.info("malla: %s replaces its silent connection to %s", self.name, peer.name)
                self._drop(old)
                old.abort()
        if self._stopping or conn.proto.closed:
            conn.close()
            return
        self._conns[peer.name] = conn
        self._lost_at.pop(peer.name, None)
        self._liveness.heard(peer.name)
        if self._hb_thread is not None and peer.udp and peer.caps & CAP_UDP_HEARTBEAT:
            peer_host = conn.proto.transport.get_extra_info("peername")[0]
            self._hb_thread.add(peer.name, (peer_host, peer.udp), peer.incarnation)
        if peer.listen and not peer.hidden:
            self._known[peer.name] = peer.listen
        conn.admit(conn)
        log.info("malla: %s connected to %s", self.name, peer.name)
        conn.proto.send_message(core.FT_TABLE, self._hosting.table())
        if not self.hidden:
            conn.proto.send_message(core.FT_PEERS, self._peer_list())
        if not self.hidden and not peer.hidden:
            others = [c for n, c in self._conns.items() if n != peer.name]
            entry = [[peer.name, peer.listen[0], peer.listen[1]]] if peer.listen else []
            for other in others:
                # hidden peers hear of members too: they record them, and a
                # client (the CLI) may choose to dial them
                if entry and other.peer is not None:
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

    def _connection_closed(self, conn: Connection) -> None:
        self._all.discard(conn)
        if conn.proto is not None:
            # its calls stay counted: stats() totals never go down
            self._stats.closed_in += conn.proto.calls_in
            self._stats.closed_out += conn.proto.calls_out
        if conn.peer is not None and self._conns.get(conn.peer.name) is conn:
            self._drop(conn)
            log.info("malla: %s lost its connection to %s", self.name, conn.peer.name)

    def _drop(self, conn: Connection) -> None:
        """Forget `conn` as the connection serving its peer (it broke, went
        silent or was replaced); the peer is redialled until forget_after."""
        name = conn.peer.name if conn.peer else None
        if name is not None and self._conns.get(name) is conn:
            del self._conns[name]
            self._registry.drop_node(name)
            self._liveness.forget(name)
            if self._hb_thread is not None:
                self._hb_thread.remove(name)
            self._lost_at[name] = time.monotonic()
            if name in self._known and not self._stopping and not self.hidden:
                host, port = self._known[name]
                self._dial_in_background(f"{host}:{port}", name)

    def _peer_list(self) -> list[list[Any]]:
        return [[n, c.peer.listen[0], c.peer.listen[1]] for n, c in self._conns.items()
                if c.peer is not None and c.peer.listen and not c.peer.hidden]

    def _on_control(self, conn: Connection, ftype: int, body: Any) -> None:
        name = conn.name
        assert name is not None
        if ftype == core.FT_TABLE:
            if type(body) is not dict:
                log.warning("malla: refused the service table of %s: not a map", name)
                return
            self._registry.set_table(name, {service: info for service, info in body.items()
                                            if self._valid_entry(name, service, info)})
        elif ftype == core.FT_ANNOUNCE:
            if type(body) is not list or len(body) != 2:
                log.warning("malla: refused an announcement of %s: not [service, info]", name)
                return
            service, info = body
            if info is None and type(service) is str:
                self._registry.set_remote(name, service, None)
            elif self._valid_entry(name, service, info):
                self._registry.set_remote(name, service, info)
        elif ftype == core.FT_PEERS:
            for entry in body if type(body) is list else [body]:
                try:
                    peer, host, port = member(entry)
                except ValueError:
                    log.warning("malla: ignored a malformed member %r from %s", entry, name)
                    continue
                if (not self.hidden and peer != self.name and peer not in self._members
                        and peer not in self._conns):
                    # not reached yet: forgotten after forget_after unless it is
                    self._lost_at.setdefault(peer, time.monotonic())
                self._members[peer] = (host, port)
                if not self.hidden:
                    self._learn(peer, host, port)
        elif ftype == core.FT_GOODBYE:
            # The peer is leaving for good: forget it now, do not redial.
            self._known.pop(name, None)
            self._registry.drop_node(name)

    def _valid_entry(self, peer: str, service: Any, info: Any) -> bool:
        """Whether a peer's entry for `service` may be stored; a malformed one
        is refused and logged (its other services are kept)."""
        why = ("the service name is not a string" if type(service) is not str
               else invalid_info(info))
        if why is not None:
            log.warning("malla: refused %s's entry for service %r: %s", peer, service, why)
            self._stats.count("ProtocolError")
        return why is None

    def _learn(self, peer: str, host: str, port: int) -> None:
        if peer == self.name or peer in self._conns:
            return
        self._known[peer] = (host, port)
        # The node with the smaller name dials, so that meshing rarely
        # races; the check cycle dials whatever is still missing.
        if self.name < peer:
            self._dial_in_background(f"{host}:{port}", peer)

    # -- liveness and the check cycle --------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        interval = self.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for name, conn in list(self._conns.items()):
                proto = conn.proto
                if now - proto.last_sent >= interval * 0.5:
                    proto.send_message(core.FT_HEARTBEAT, None)
                self._liveness.heard(name, proto.last_heard)
                if self._liveness.silent_for(name, now) > self.heartbeat_timeout:
                    log.warning("malla: %s has not heard from %s for %.1f s: dropping it",
                                self.name, name, self._liveness.silent_for(name, now))
                    self._drop(conn)
                    conn.abort()

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(self.check_interval)
            self._registry.reshuffle()
            table = self._hosting.table()
            for conn in list(self._conns.values()):
                conn.proto.send_message(core.FT_TABLE, table)
            self._forget_long_gone()
            if not self.hidden:
                for peer, (host, port) in list(self._known.items()):
                    if peer not in self._conns:
                        self._dial_in_background(f"{host}:{port}", peer)

    def _forget_long_gone(self) -> None:
        # A peer gone for forget_after seconds is not redialled any more:
        # short-lived clients leave no ghosts.
        now = time.monotonic()
        for peer, since in list(self._lost_at.items()):
            if peer in self._conns:
                del self._lost_at[peer]
            elif now - since > self.forget_after:
                del self._lost_at[peer]
                self._known.pop(peer, None)
                self._members.pop(peer, None)
                log.info("malla: %s forgets %s (gone for %.0f s)", self.name, peer, now - since)
                task = self._dialing.pop(peer, None)
                if task is not None:
                    task.cancel()

    # -- services -----------------------------------------------------------------

    async def start_service(self, service: Service | type[Service]) -> None:
        """Run a service on this node; a global one is announced to the cluster."""
        await self._hosting.start(service)

    async def stop_service(self, service: Any) -> None:
        """Stop a service here; calls to it fail over elsewhere."""
        await self._hosting.stop(service)

    async def pause_service(self, service: Any) -> None:
        """Keep the service registered but announce it paused: callers fail over."""
        await self._hosting.set_paused(service, True)

    async def resume_service(self, service: Any) -> None:
        await self._hosting.set_paused(service, False)

    # -- calls (bound on the instance by __init__; these are for help() and docs) ---

    async def remote(self, service: Any, fun: str, args: Any = (),
                     kwargs: dict[str, Any] | None = None, *, timeout: int = 15000,
                     sna_retries: int = 5, excp_retries: int = 0,
                     retries_sleep_msec: int = 1000, meta: Any = None,
                     deadline: float | None = None, **unknown: Any) -> Any:
        return await self._remote(service, fun, args, kwargs, timeout=timeout,
                                  sna_retries=sna_retries, excp_retries=excp_retries,
                                  retries_sleep_msec=retries_sleep_msec, meta=meta,
                                  deadline=deadline, **unknown)

    async def call_cb_all(self, service: Any, fun: str, args: Any = (),
                          kwargs: dict[str, Any] | None = None, **opts: Any) -> list[Any]:
        results: list[Any] = await self._call_cb_all(service, fun, args, kwargs, **opts)
        return results

    async def local(self, service: Any, fun: str, args: Any = (),
                    kwargs: dict[str, Any] | None = None) -> Any:
        return await self._caller.local(service, fun, args, kwargs)

    remote.__doc__ = Caller.remote.__doc__
    call_cb_all.__doc__ = Caller.call_cb_all.__doc__
    local.__doc__ = Caller.local.__doc__

    # -- proxies -------------------------------------------------------------------

    def service(self, service: Any) -> Any:
        """A proxy of `service` bound to this node (always; see `services`).

        Typed as Any so that a caller can give it the type of a
        typing.Protocol describing the service's functions as `async def`s:
        ``calc: CalculatorAPI = node.service("Calculator")``.
        """
        name = service_name(service)
        proxy = self._proxies.get(name)
        if proxy is None:
            proxy = self._proxies[name] = Proxy(self, name)
        return proxy

    def _knows(self, name: str) -> bool:
        return name in self._precompiled or name in self._registry.services()

    # -- discovery -----------------------------------------------------------------

    def get_nodes(self, service: Any) -> list[str]:
        """Nodes where the service runs: this node first when it does."""
        return list(self._registry.nodes(service_name(service)))

    def get_instances(self, service: Any) -> list[tuple[str, dict[str, Any]]]:
        """get_nodes' order, with each instance's metadata."""
        return self._registry.instances(service_name(service))

    def get_services(self) -> dict[str, list[str]]:
        """Every service seen, with the nodes running it now."""
        return self._registry.services()

    async def wait_for_services(self, services: list[Any], retries: int = 10) -> bool:
        """Wait (a second between tries) until each service has a node."""
        names = [service_name(s) for s in services]
        for attempt in range(retries + 1):
            if all(self._registry.nodes(n) for n in names):
                return True
            if attempt < retries:
                await asyncio.sleep(1.0)
        return False

    # -- observability ----------------------------------------------------------------

    def _cast_failed(self, service: str, fun: str, kind: str, message: str) -> None:
        self._hosting.cast_failed(service, fun, kind, message)

    def stats(self) -> dict[str, Any]:
        """Totals over the node's life (DESIGN.md "Tools around it")."""
        protos = [c.proto for c in self._all if c.proto is not None]
        return {
            "calls_in": self._stats.closed_in + sum(p.calls_in for p in protos),
            "calls_out": (self._stats.closed_out + sum(p.calls_out for p in protos)
                          + self._stats.local_calls),
            "errors": dict(self._stats.errors),
            "retries": self._stats.retries,
            "failovers": self._stats.failovers,
            "in_flight": sum(p.in_flight for p in protos if not p.closed),
            "latency": self._metrics.snapshot() if self._metrics is not None else {},
        }
