"""malla: call functions of services running anywhere in a cluster of Python
processes — transparent proxies, remote() with timeouts, retries and
failover, discovery — on a compiled uvloop core.  See DESIGN.md / docs/.
"""

from malla._version import __version__
from malla._ext import core as _core  # fails loudly when the extension is not built
from malla import codec as _codec  # installs the codec's hooks in the core
from malla.codec import register_type
from malla.exceptions import (
    AuthenticationError,
    CallTimeout,
    ConnectionLost,
    EncodeError,
    MallaError,
    MessageTooLarge,
    Overloaded,
    ProtocolError,
    RemoteError,
    ServiceNotAvailable,
    UnknownFunction,
)
from malla.node import Node
from malla.facade import BlockingNode
from malla.service import Service, blocking
from malla.runner import run
from malla.proxy import call
from malla.api import (
    call_cb_all,
    get_instances,
    get_nodes,
    get_services,
    local,
    remote,
    start,
    stop,
    wait_for_services,
)
from malla import services

__all__ = [
    "__version__",
    "Node",
    "BlockingNode",
    "Service",
    "blocking",
    "register_type",
    "run",
    "call",
    "start",
    "stop",
    "remote",
    "local",
    "call_cb_all",
    "get_nodes",
    "get_instances",
    "get_services",
    "wait_for_services",
    "services",
    "MallaError",
    "ServiceNotAvailable",
    "Overloaded",
    "RemoteError",
    "CallTimeout",
    "ConnectionLost",
    "UnknownFunction",
    "EncodeError",
    "MessageTooLarge",
    "AuthenticationError",
    "ProtocolError",
]
