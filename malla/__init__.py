"""malla: call functions of services running anywhere in a cluster of Python
processes — transparent proxies, remote() with timeouts, retries and
failover, discovery — on a compiled uvloop core.  See DESIGN.md / docs/.
"""

from malla import codec as _codec  # noqa: F401  (installs the codec's hooks in the core)
from malla import services
from malla._ext import core as _core  # noqa: F401  (fails loudly when not built)
from malla._version import __version__
from malla.api import (
    call_cb_all,
    get_instances,
    get_nodes,
    get_services,
    local,
    remote,
    start,
    stop,
    stream,
    wait_for_services,
)
from malla.authz import allow
from malla.codec import register_type
from malla.context import CallContext, current_call, remaining_ms
from malla.exceptions import (
    AuthenticationError,
    BadArguments,
    CallTimeout,
    ConnectionLost,
    EncodeError,
    Forbidden,
    InvalidOption,
    MallaError,
    MessageTooLarge,
    NameInUse,
    NodeStopped,
    Overloaded,
    ProtocolError,
    RemoteError,
    ServiceNotAvailable,
    UnknownFunction,
    Unreachable,
    family,
)
from malla.facade import BlockingNode
from malla.idempotent import idempotent
from malla.node import Node
from malla.proxy import call
from malla.runner import run
from malla.service import Service, blocking
from malla.streams import Stream

__all__ = [
    "AuthenticationError",
    "BadArguments",
    "BlockingNode",
    "CallContext",
    "CallTimeout",
    "ConnectionLost",
    "EncodeError",
    "Forbidden",
    "InvalidOption",
    "MallaError",
    "MessageTooLarge",
    "NameInUse",
    "Node",
    "NodeStopped",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "Service",
    "ServiceNotAvailable",
    "Stream",
    "UnknownFunction",
    "Unreachable",
    "__version__",
    "allow",
    "blocking",
    "call",
    "call_cb_all",
    "current_call",
    "family",
    "get_instances",
    "get_nodes",
    "get_services",
    "idempotent",
    "local",
    "register_type",
    "remaining_ms",
    "remote",
    "run",
    "services",
    "start",
    "stop",
    "stream",
    "wait_for_services",
]
