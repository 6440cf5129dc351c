"""A node: the facade that composes the layers below and runs their
lifecycle (start, stop, drain).

- `malla.config.NodeConfig`: the settings, frozen and validated;
- `malla.registry.Registry`: the discovery table;
- `malla.hosting.Hosting`: the services this node runs and announces;
- `malla.cluster.Cluster`: the peers, their connections, the mesh, liveness;
- `malla.caller.Caller`: remote(), local(), call_cb_all();
- `malla.metrics.Metrics`, `malla.tracing.Tracing`: call interceptors,
  built once here (with neither on, remote() is the caller's own);
- `malla.heartbeat.HeartbeatThread`: the UDP heartbeats, fed into liveness.

Everything public is here; what each does is in the module that owns it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any

from malla import exceptions as mexc
from malla._ext import core
from malla.balance import p2c_order
from malla.budget import RetryBudget
from malla.builtin import Builtin
from malla.caller import Caller
from malla.cluster import Cluster
from malla.config import NodeConfig, NodeSettings
from malla.discovery import EtcdDiscovery
from malla.dns import DEFAULT_PORT, parse_address
from malla.guard import CookieSetting, cookie_bytes
from malla.handshakes import handshake_counts
from malla.heartbeat import HeartbeatThread
from malla.hosting import Hosting
from malla.liveness import Liveness
from malla.metrics import Metrics, Stats, serve_prometheus
from malla.ondemand import OnDemand
from malla.precompile import load_precompile
from malla.proxy import Proxy, Services
from malla.registry import Registry, service_name, wait_for
from malla.service import Service
from malla.streams import Stream, Streamer
from malla.tracing import Tracing

if TYPE_CHECKING:
    from malla.interfaces import CallInterceptor

__all__ = ["Node", "parse_address"]

log = logging.getLogger("malla.node")


class Node(NodeSettings):
    """A member of a malla cluster (docs/cluster.md).

    Seconds as floats for node settings, bytes for sizes.
    """

    _cluster: Cluster

    def __init__(self, name: str, *, cookie: CookieSetting = None,
                 host: str = "127.0.0.1", port: int = DEFAULT_PORT,
                 seeds: list[str] | tuple[str, ...] = (),
                 connect: list[str] | tuple[str, ...] = (), hidden: bool = False,
                 heartbeat_interval: float = 1.0, heartbeat_timeout: float = 3.0,
                 handshake_timeout: float = 5.0, check_interval: float = 10.0,
                 redial_max: float = 5.0, max_frame_size: int = 1 << 20,
                 max_message_size: int = 64 << 20, window_size: int = core.WINDOW,
                 stream_window: int = 64,
                 ssl_server: Any = None, ssl_client: Any = None, identity: str = "cookie",
                 balance: str = "p2c", retry_budget: float = 0.2, retry_floor: float = 10,
                 dns_servers: list[str] | None = None,
                 forget_after: float = 60.0, precompile: Any = None,
                 udp_heartbeat: bool = True, metrics: bool = False,
                 metrics_port: int | None = None, tracing: bool | float = False,
                 max_pending_handshakes: int = 256, discovery: str | None = None,
                 discovery_ssl: Any = None, mesh: str | None = None,
                 idle_close: float = 60.0) -> None:
        if isinstance(seeds, str) or isinstance(connect, str):
            raise mexc.InvalidOption("seeds and connect are lists of targets, not one string")
        config = self.config = NodeConfig(
            name=name, host=host, port=port, seeds=tuple(seeds), connect=tuple(connect),
            hidden=hidden, heartbeat_interval=heartbeat_interval, retry_floor=retry_floor,
            heartbeat_timeout=heartbeat_timeout, handshake_timeout=handshake_timeout,
            check_interval=check_interval, redial_max=redial_max, forget_after=forget_after,
            max_frame_size=max_frame_size, max_message_size=max_message_size,
            window_size=window_size, stream_window=stream_window, ssl_server=ssl_server,
            ssl_client=ssl_client, identity=identity, balance=balance, retry_budget=retry_budget,
            dns_servers=tuple(dns_servers) if dns_servers else None,
            udp_heartbeat=udp_heartbeat, metrics=metrics, metrics_port=metrics_port,
            tracing=tracing, max_pending_handshakes=max_pending_handshakes,
            discovery=discovery, discovery_ssl=discovery_ssl, mesh=mesh, idle_close=idle_close)
        self.name = name
        self._cookie = cookie_bytes(cookie)
        self._registry = Registry(name)
        self._precompiled = load_precompile(precompile)
        self._proxies: dict[str, Proxy] = {}
        self.services = Services(self)
        self._stats = Stats()
        self._liveness = Liveness()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._hb_thread: HeartbeatThread | None = None
        self._metrics_server: Any = None
        self._draining = False
        self._metrics = Metrics() if metrics or metrics_port is not None else None
        tracer = None if tracing is False else Tracing(1.0 if tracing is True else float(tracing))
        # (the hosting announces through the cluster, built next)
        self._hosting = Hosting(config, self._registry, self._stats, tracer, self._announce)
        cluster = self._cluster = Cluster(config, self._cookie, self._registry, self._hosting,
                                          self._stats, self._liveness, self._spawn)
        # past the full mesh (DESIGN.md): membership from etcd, calls' own dials
        self._discovery = cluster.source = EtcdDiscovery.of(
            config, self._registry, self._hosting.table, cluster, self._stats, self._spawn)
        self._on_demand = OnDemand(cluster) if config.mesh == "on_demand" else None
        order = (p2c_order(self._registry.nodes, self._cluster.connected, name,
                           dial=self._on_demand is not None) if balance == "p2c" else None)
        self._caller = Caller(name, self._registry, self._hosting, self._cluster, self._stats,
                              self._spawn, order=order, carrier=tracer.carrier if tracer else None,
                              here=tracer.here if tracer else None,
                              budget=RetryBudget(retry_budget, retry_floor))
        remote, call_cb_all = self._caller.remote, self._caller.call_cb_all
        interceptors: list[CallInterceptor] = [i for i in (self._metrics, tracer) if i]
        for interceptor in interceptors:     # (the last one outermost)
            remote = interceptor.wrap_remote(remote)
            call_cb_all = interceptor.wrap_call_cb_all(call_cb_all)
        # Bound on the instance: a call enters the caller (or the outermost
        # interceptor) directly, with no frame of this facade.
        self.remote = self._remote = remote  # type: ignore[method-assign]
        self.call_cb_all = self._call_cb_all = call_cb_all  # type: ignore[method-assign]
        self.local = self._caller.local  # type: ignore[method-assign]
        self._streamer = Streamer(self._caller, stream_window)

    def __repr__(self) -> str:
        return f"<malla.Node {self.name} {self._cluster.address or 'not started'}>"

    @property
    def incarnation(self) -> int:
        """This life's random 64-bit id (each start() draws a new one)."""
        return self._cluster.incarnation

    @property
    def address(self) -> tuple[str, int]:
        """The (host, port) actually bound."""
        if self._cluster.address is None:
            raise mexc.NodeStopped(f"node {self.name} is not started")
        return self._cluster.address

    @property
    def _loop(self) -> asyncio.AbstractEventLoop | None:
        return self._cluster.loop

    def _announce(self, ftype: int, body: Any) -> None:   # (to the peers and its record)
        self._cluster.broadcast(ftype, body)
        if self._discovery is not None:
            self._discovery.changed()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        # the node's background tasks: cancelled by stop()
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> Node:
        """Listen, then dial the seeds in the background; returns once listening."""
        if self._cluster.listening:
            return self
        self._draining = False
        config = self.config
        if not config.hidden:   # before anything is announced: peers see it at once
            self._hosting.start_builtin(Builtin(self, self._hosting))
        host, port = await self._cluster.listen()
        if config.udp_heartbeat:
            self._hb_thread = HeartbeatThread(self.name, self._cluster.incarnation, self._cookie,
                                              host, config.heartbeat_interval, self._liveness)
            self._hb_thread.start()
        self._cluster.start(self._hb_thread)
        if self._on_demand is not None:
            self._spawn(self._on_demand.idle_loop())
        if self._discovery is not None:
            try:      # (NameInUse: another live node holds the name)
                await self._discovery.start((host, port), self._cluster.incarnation)
            except BaseException:
                await self.stop()
                raise
        if config.metrics_port is not None and self._metrics_server is None:
            self._metrics_server = serve_prometheus(self, config.metrics_port, config.host)
        log.info("malla: node %s listening on %s:%d", self.name, host, port)
        return self

    async def stop(self) -> None:
        """Say goodbye to the peers, close every connection and stop. Idempotent."""
        if not self._cluster.listening or self._cluster.stopping:
            return
        if self._discovery is not None:   # (first: the others drop this node at once)
            await self._discovery.stop()
        for task in list(self._tasks):
            task.cancel()
        await self._cluster.stop()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._hb_thread is not None:
            self._hb_thread.stop()
            self._hb_thread = None
        if self._metrics_server is not None:
            server, thread = self._metrics_server
            server.shutdown()
            thread.join(timeout=2)
            self._metrics_server = None
        log.info("malla: node %s stopped", self.name)

    async def drain(self, grace: float = 10.0, linger: float = 0.2) -> None:
        """Leave the cluster without failing a call: stop advertising every
        service (announced paused: callers fail over, a call that still
        arrives gets "service not available"), let calls in flight finish
        for up to `grace` s, say goodbye, answer stragglers for `linger` s, stop."""
        if not self._cluster.listening or self._cluster.stopping or self._draining:
            return
        self._draining = True
        log.info("malla: node %s draining (grace %.1f s)", self.name, grace)
        await self._hosting.pause_all()
        end = time.monotonic() + grace
        while self._busy() and time.monotonic() < end:
            await asyncio.sleep(0.01)
        if self._busy():
            log.warning("malla: %s drained with calls still running after %.1f s",
                        self.name, grace)
        self._cluster.say_goodbye()
        await asyncio.sleep(linger)
        await self.stop()

    def _busy(self) -> bool:
        """Calls to this node's services still running (in-process or from peers)."""
        return self._hosting.busy() or self._cluster.busy()

    async def __aenter__(self) -> Node:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    # -- the cluster -----------------------------------------------------------------

    def peers(self) -> list[str]:
        """Names of the peers connected now (mesh="on_demand": open connections)."""
        return self._cluster.peers()

    def members(self) -> dict[str, tuple[str, int]]:
        """Every visible member this node has heard of and not forgotten, with
        its address (a hidden node hears of them but does not connect by itself)."""
        return self._cluster.members()

    async def connect(self, target: str) -> None:
        await self._cluster.connect(target)

    connect.__doc__ = Cluster.connect.__doc__

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
                     deadline: float | None = None, **options: Any) -> Any:
        return await self._remote(service, fun, args, kwargs, timeout=timeout,
                                  sna_retries=sna_retries, excp_retries=excp_retries,
                                  retries_sleep_msec=retries_sleep_msec, meta=meta,
                                  deadline=deadline, **options)

    async def call_cb_all(self, service: Any, fun: str, args: Any = (),
                          kwargs: dict[str, Any] | None = None, **opts: Any) -> list[Any]:
        results: list[Any] = await self._call_cb_all(service, fun, args, kwargs, **opts)
        return results

    async def local(self, service: Any, fun: str, args: Any = (),
                    kwargs: dict[str, Any] | None = None) -> Any:
        return await self._caller.local(service, fun, args, kwargs)

    def stream(self, service: Any, fun: str, args: Any = (),
               kwargs: dict[str, Any] | None = None, **opts: Any) -> Stream:
        return self._streamer.stream(service, fun, args, kwargs, **opts)

    remote.__doc__ = Caller.remote.__doc__
    stream.__doc__ = Streamer.stream.__doc__
    call_cb_all.__doc__ = Caller.call_cb_all.__doc__
    local.__doc__ = Caller.local.__doc__

    # -- proxies and discovery ---------------------------------------------------------

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
        return await wait_for(self._registry, [service_name(s) for s in services], retries)

    def stats(self) -> dict[str, Any]:
        """Totals over the node's life: they never go down when a peer
        leaves (docs/operations.md)."""
        return {
            **self._stats.totals(self._cluster.protocols()),
            **self._caller.routing.stats(),                 # (ejected, retries_throttled)
            **handshake_counts(self._cluster.pending, self._cluster.throttle),
            "latency": self._metrics.snapshot() if self._metrics is not None else {},
        }
