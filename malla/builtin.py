"""The built-in `Malla` service (DESIGN.md "The built-in `Malla` service"):
every node that is not hidden runs it, so tools (`malla ping`, `malla top`)
ask nodes about themselves through ordinary calls, with no wire frame of
their own.

- `ping()`: the node's name (a probe also learns it reached the node it meant);
- `info()`: name, malla and protocol version, incarnation, peers, the
  services hosted with their state, the services the node should host and
  whether it is ready (every one of them started and not paused);
- `stats()`: the node's `stats()`, plus `builtin_calls`: the calls this
  service served from other nodes, which `calls_in` counts too (so a tool
  can leave its own sampling out of a rate).

The name is reserved: `start_service` (and stop/pause/resume) of a user
service named `Malla` raises `InvalidOption`; `get_services()` and the CLI's
service table leave it out.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from malla._version import __version__
from malla.handshake import PROTOCOL_VERSION
from malla.registry import BUILTIN
from malla.service import Service, invoke_function

if TYPE_CHECKING:
    from malla.hosting import Hosting
    from malla.interfaces import BuiltinHost

__all__ = ["BUILTIN", "Builtin"]

RUNNING, PAUSED, NOT_STARTED = "running", "paused", "not started"


class Builtin(Service, name=BUILTIN, global_=True, vsn=__version__):
    """The `Malla` service of one node (started by the node itself)."""

    def __init__(self, node: BuiltinHost, hosting: Hosting) -> None:
        self._node = node
        self._hosting = hosting
        self._served = 0

    def service_cb_in(self, fun: str, args: list[Any], kwargs: dict[str, Any],
                      opts: dict[str, Any]) -> Any:
        # counted so that stats() can tell which part of calls_in (the
        # calls from peers) was this service's
        if opts.get("caller") != self._node.name:
            self._served += 1
        return invoke_function(self, fun, args, kwargs)

    def ping(self) -> str:
        return self._node.name

    def info(self) -> dict[str, Any]:
        entries = self._hosting.entries
        expected = {name: (NOT_STARTED if name not in entries
                           else PAUSED if entries[name].paused else RUNNING)
                    for name in sorted(self._hosting.expected)}
        return {
            "name": self._node.name,
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "incarnation": self._node.incarnation,
            "peers": sorted(self._node.peers()),
            "services": {name: PAUSED if e.paused else RUNNING
                         for name, e in sorted(entries.items()) if name != BUILTIN},
            "expected": expected,
            "ready": all(state == RUNNING for state in expected.values()),
        }

    def stats(self) -> dict[str, Any]:
        return {**self._node.stats(), "builtin_calls": self._served}
