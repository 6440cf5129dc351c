"""A node's settings: one frozen, validated record (DESIGN.md "Conventions":
seconds as floats for node settings, bytes for sizes).

`Node(...)` builds it from its keyword arguments; everything below the node
reads its settings here.  A setting that cannot work raises InvalidOption
(also a ValueError) when the node is made, not later when it is used.
"""

from __future__ import annotations

import math
import ssl
from dataclasses import dataclass, field
from typing import Any

from malla import exceptions as mexc
from malla._ext import core
from malla.balance import check_mode
from malla.budget import check_setting
from malla.dns import DEFAULT_PORT
from malla.etcd import parse_url
from malla.handshake import protocol_limits
from malla.tls import check_identity_contexts

__all__ = ["NodeConfig", "NodeSettings"]


@dataclass(frozen=True)
class NodeConfig:
    name: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    seeds: tuple[str, ...] = ()
    connect: tuple[str, ...] = ()
    hidden: bool = False
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 3.0
    handshake_timeout: float = 5.0
    # accepted connections still in their handshake at once; past it a new
    # one is closed unread (dialled connections do not count)
    max_pending_handshakes: int = 256
    check_interval: float = 10.0
    redial_max: float = 5.0
    forget_after: float = 60.0
    max_frame_size: int = 1 << 20
    max_message_size: int = 64 << 20
    # bytes of large messages in flight to a peer before it acknowledges
    # them (CAP_WINDOW): the bound on what a small call waits behind
    window_size: int = core.WINDOW
    # items a stream's producer may run ahead of this node consuming it
    stream_window: int = 64
    ssl_server: Any = field(default=None, repr=False)
    ssl_client: Any = field(default=None, repr=False)
    # "cookie": names are self-asserted; "tls": bound to certificates
    identity: str = "cookie"
    # "p2c": load-aware node choice (malla.balance); "shuffle": Malla's order
    balance: str = "p2c"
    # retries toward a service: this share of its calls over 10 s, plus
    # retry_floor per second (malla.budget)
    retry_budget: float = 0.2
    retry_floor: float = 10
    dns_servers: tuple[str, ...] | None = None
    udp_heartbeat: bool = True
    metrics: bool = False
    metrics_port: int | None = None
    # tracing=True: every call; a float: that share of calls starting a
    # trace (0.0 included: only calls made inside a trace)
    tracing: bool | float = False
    # "etcd://HOST:PORT[,HOST:PORT...]/PREFIX" (etcds://: TLS): membership
    # and service tables from etcd (malla.discovery); None: from the mesh
    discovery: str | None = None
    # the TLS context for etcds:// (None: the system's default trust)
    discovery_ssl: Any = field(default=None, repr=False)
    # "full" (Erlang's mesh) or "on_demand" (connections opened by calls and
    # closed idle_close s after the last); None: on_demand with discovery=
    mesh: str | None = None
    idle_close: float = 60.0

    def __post_init__(self) -> None:
        if self.mesh is None:     # (frozen: the default is settled once, here)
            object.__setattr__(self, "mesh", "on_demand" if self.discovery else "full")
        why = self._wrong_type() or self._invalid() or self._invalid_scale()
        if why is not None:
            raise mexc.InvalidOption(why)

    def _wrong_type(self) -> str | None:
        for setting in ("port", "max_frame_size", "max_message_size", "window_size",
                        "max_pending_handshakes", "stream_window"):
            value = getattr(self, setting)
            if isinstance(value, bool) or not isinstance(value, int):
                return f"{setting} is a whole number, not {value!r}"
        for setting in ("heartbeat_interval", "heartbeat_timeout", "handshake_timeout",
                        "check_interval", "redial_max", "forget_after", "idle_close"):
            value = getattr(self, setting)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value)):
                return f"{setting} is a finite number of seconds, not {value!r}"
        if not isinstance(self.host, str):
            return f"host is a str, not {self.host!r}"
        if self.metrics_port is not None and (isinstance(self.metrics_port, bool)
                                              or not isinstance(self.metrics_port, int)):
            return f"metrics_port is a port number, not {self.metrics_port!r}"
        return None

    def _invalid(self) -> str | None:
        if not self.name or not isinstance(self.name, str):
            return "a node needs a non-empty name"
        if not 0 <= self.port < 65536:
            return f"port {self.port} is not a TCP port"
        for setting in ("heartbeat_interval", "heartbeat_timeout", "handshake_timeout",
                        "check_interval", "redial_max"):
            if not getattr(self, setting) > 0:
                return f"{setting} must be a positive number of seconds"
        if self.forget_after < 0:
            return "forget_after must not be negative"
        if self.heartbeat_timeout <= self.heartbeat_interval:
            return (f"heartbeat_timeout ({self.heartbeat_timeout} s) must be longer than "
                    f"heartbeat_interval ({self.heartbeat_interval} s)")
        if self.max_frame_size < 1024 or self.max_frame_size > 0xFFFFFFFF:
            return "max_frame_size must be between 1 KiB and 4 GiB"
        if self.max_message_size < 1:
            return "max_message_size must be positive"
        if self.max_pending_handshakes < 1:
            return "max_pending_handshakes must be at least 1"
        if self.window_size and self.window_size < core.FRAME_OF_LARGE:
            return (f"window_size must be 0 (no pacing) or at least "
                    f"{core.FRAME_OF_LARGE} bytes (one frame of a large message)")
        if not 1 <= self.stream_window <= core.STREAM_WINDOW_MAX:
            return (f"stream_window is items, 1 to {core.STREAM_WINDOW_MAX}, "
                    f"not {self.stream_window}")
        why = (check_mode(self.balance) or check_setting("retry_budget", self.retry_budget)
               or check_setting("retry_floor", self.retry_floor))
        if why is not None:
            return why
        if self.identity not in ("cookie", "tls"):
            return f'identity is "cookie" or "tls", not {self.identity!r}'
        if self.identity == "tls":
            why = check_identity_contexts(self.ssl_server, self.ssl_client)
            if why is not None:
                return why
        try:
            protocol_limits(self.identity)    # (the test setting, if any, is well formed)
        except mexc.InvalidOption as exc:
            return str(exc)
        if self.metrics_port is not None and not 0 <= self.metrics_port < 65536:
            return f"metrics_port {self.metrics_port} is not a TCP port"
        if (not isinstance(self.tracing, (bool, int, float))
                or not 0 <= float(self.tracing) <= 1):
            return "tracing is True, False, or a share of calls between 0 and 1"
        return None

    def _invalid_scale(self) -> str | None:
        """What is wrong with discovery=, mesh= or idle_close=."""
        if self.mesh not in ("full", "on_demand"):
            return f'mesh is "full" or "on_demand", not {self.mesh!r}'
        if self.mesh == "on_demand" and not self.discovery:
            return ('mesh="on_demand" needs discovery= (etcd://...): idle connections '
                    "close, so membership must come from a discovery source")
        if not self.idle_close > 0:
            return "idle_close must be a positive number of seconds"
        if self.discovery is not None:
            if not isinstance(self.discovery, str):
                return f"discovery is an etcd:// URL, not {self.discovery!r}"
            try:
                parse_url(self.discovery)
            except mexc.InvalidOption as exc:
                return str(exc)
        if self.discovery_ssl is not None and not isinstance(self.discovery_ssl, ssl.SSLContext):
            return f"discovery_ssl is an ssl.SSLContext, not {self.discovery_ssl!r}"
        return None


def _setting(name: str, as_list: bool = False) -> Any:
    """A read-only attribute of the node: its frozen config's `name`."""
    def read(node: NodeSettings) -> Any:
        value = getattr(node.config, name)
        return list(value) if as_list and value is not None else value
    return property(read, doc=f"node.config.{name}")


class NodeSettings:
    """The settings of a Node as read-only attributes (`node.port`, ...),
    each its frozen config's field."""

    config: NodeConfig

    host = _setting("host")
    port = _setting("port")
    hidden = _setting("hidden")
    seeds = _setting("seeds", as_list=True)
    connect_targets = _setting("connect", as_list=True)
    dns_servers = _setting("dns_servers", as_list=True)
    heartbeat_interval = _setting("heartbeat_interval")
    heartbeat_timeout = _setting("heartbeat_timeout")
    handshake_timeout = _setting("handshake_timeout")
    check_interval = _setting("check_interval")
    redial_max = _setting("redial_max")
    forget_after = _setting("forget_after")
    max_frame_size = _setting("max_frame_size")
    max_message_size = _setting("max_message_size")
    window_size = _setting("window_size")
    stream_window = _setting("stream_window")
    ssl_server = _setting("ssl_server")
    ssl_client = _setting("ssl_client")
    identity = _setting("identity")
    balance = _setting("balance")
    retry_budget = _setting("retry_budget")
    retry_floor = _setting("retry_floor")
    udp_heartbeat = _setting("udp_heartbeat")
    metrics_port = _setting("metrics_port")
    discovery = _setting("discovery")
    mesh = _setting("mesh")
    idle_close = _setting("idle_close")
