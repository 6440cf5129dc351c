"""The discovery table: which node runs which service, in call order.

Eventually consistent: filled from each peer's TABLE on connect and its
ANNOUNCEs after (or its etcd record), emptied of a node when its connection
is lost.  The order of remote nodes is shuffled each check cycle to spread
load; the local node comes first when it runs the service.  `nodes()` is on
every call's path, so orders are cached and derived again on first read
after a change.

With discovery from etcd every node applies every peer's record (N^2
applications in a cluster): applying one must cost the same whatever N.
So entries are stored by reference (the same object again costs a lookup,
an equal one a comparison), checked and compiled once per process (the
nodes of a process sharing a watch get the same decoded objects), and each
service's callable nodes are kept sorted as they come and go, a bisection
rather than a sort (docs/scale.md, "Applying a peer's record").

What a peer announces is checked before it is stored (`invalid_info`): a
malformed entry is refused by the caller of set_remote, never handed to
callers.  Each entry keeps the argument checkers of its functions.
"""

from __future__ import annotations

import asyncio
import logging
import random
from bisect import bisect_left
from typing import Any

from malla import exceptions as mexc
from malla.arguments import Checker, checkers_of
from malla.authz import forbidding_checkers, invalid_allow
from malla.idempotent import FUNCTION_META, invalid_function_meta

__all__ = ["BUILTIN", "Registry", "invalid_info", "service_name"]

# The built-in service every visible node runs (malla.builtin): reserved,
# and left out of services()
BUILTIN = "Malla"

_PARAM_KINDS = range(5)   # inspect._ParameterKind's values

log = logging.getLogger("malla.registry")


def service_name(service: Any) -> str:
    """The service id of a name or a Service subclass (or instance)."""
    if type(service) is str:
        return service
    name = getattr(service, "_malla_name", None)
    if not isinstance(name, str):
        raise mexc.InvalidOption(f"not a service name or malla.Service class: {service!r}")
    return name


def invalid_info(info: Any) -> str | None:
    """Why a service entry from a peer is malformed, or None when it is fine."""
    if type(info) is not dict:
        return f"a service entry is a map, not {type(info).__name__}"
    if type(info.get("vsn")) is not str:
        return "its vsn is not a string"
    for flag in ("paused", "global"):
        if flag in info and type(info[flag]) is not bool:
            return f"its {flag} flag is not a bool"
    functions = info.get("functions")
    if type(functions) is not dict:
        return "its functions are not a map"
    for fun, params in functions.items():
        if type(fun) is not str or not fun or fun[0] == "_":
            return f"function name {fun!r} is not an exported name"
        if type(params) is not list:
            return f"the signature of {fun} is not a list"
        for param in params:
            if (type(param) is not list or len(param) != 3 or type(param[0]) is not str
                    or type(param[1]) is not int or param[1] not in _PARAM_KINDS
                    or type(param[2]) is not bool):
                return f"the signature of {fun} has a malformed parameter {param!r}"
        try:
            checkers_of("", {fun: params})
        except (ValueError, TypeError) as exc:   # e.g. parameters out of order
            return f"the signature of {fun} is not valid: {exc}"
    if FUNCTION_META in info:
        why = invalid_function_meta(info[FUNCTION_META], functions)
        if why is not None:
            return why
    streams = info.get("streams", [])
    if type(streams) is not list or any(fun not in functions for fun in streams):
        return "its streams are not a list of its functions"
    if "allow" in info:
        return invalid_allow(info["allow"], functions)
    return None


# entries compiled and remembered at most (then forgotten all at once)
_COMPILED_MAX = 4096

Compiled = tuple[str | None, dict[str, Checker]]

# Process-wide, shared by every Registry: (service, a peer's entry as text)
# -> why it is malformed (None: valid) and its checkers before any allow
# rule, and the same by the entry object's id.  Every node running a
# service announces the same entry, and the nodes of a process sharing an
# etcd watch are handed the very same decoded objects: an entry is checked
# and compiled once per process, not once per node (docs/scale.md).
_BY_TEXT: dict[tuple[str, str], Compiled] = {}
_BY_OBJECT: dict[int, tuple[Any, str, Compiled]] = {}


def _compiled(service: str, info: Any) -> Compiled:
    """Why `info` is malformed (None: valid) and, valid, its checkers as
    announced (no allow rule applied); remembered by object and content."""
    same = _BY_OBJECT.get(id(info))
    if same is not None and same[0] is info and same[1] == service:
        return same[2]
    key = (service, repr(info))        # (repr() is the dear part)
    compiled = _BY_TEXT.get(key)
    if compiled is None:
        why = invalid_info(info)
        compiled = (why, {} if why is not None else checkers_of(service, info["functions"]))
        if len(_BY_TEXT) >= _COMPILED_MAX:
            _BY_TEXT.clear()
        _BY_TEXT[key] = compiled
    if len(_BY_OBJECT) >= _COMPILED_MAX:
        _BY_OBJECT.clear()
    # (holding `info` keeps its id from being reused by another object)
    _BY_OBJECT[id(info)] = (info, service, compiled)
    return compiled


def _takes_calls(info: dict[str, Any]) -> bool:
    """A remote instance in the call order: not paused, and global."""
    return not info.get("paused") and info.get("global", True) is not False


class _Callers:
    """The remote nodes where one service takes calls, sorted by their
    shuffle key (then name): kept in order as nodes come and go (a bisection
    and a memmove, no Python work per node), so that a peer's record costs
    every node the same whatever N; re-sorted lazily after a reshuffle."""

    __slots__ = ("keys", "names")

    def __init__(self, pairs: list[tuple[float, str]]) -> None:
        pairs.sort()
        self.keys = [k for k, _ in pairs]
        self.names = [n for _, n in pairs]

    def _index(self, key: float, node: str) -> int:
        i = bisect_left(self.keys, key)
        keys, names = self.keys, self.names
        while i < len(keys) and keys[i] == key and names[i] < node:
            i += 1
        return i

    def add(self, key: float, node: str) -> None:
        i = self._index(key, node)
        self.keys.insert(i, key)
        self.names.insert(i, node)

    def remove(self, key: float, node: str) -> None:
        i = self._index(key, node)
        if i < len(self.names) and self.names[i] == node:
            del self.keys[i], self.names[i]


class Registry:
    def __init__(self, local_name: str) -> None:
        self.local_name = local_name
        self._local: dict[str, dict[str, Any]] = {}          # service -> info
        self._remote: dict[str, dict[str, dict[str, Any]]] = {}  # service -> node -> info
        # node -> service -> info: what is known of each peer (the same
        # objects as in _remote: a peer's entries are stored by reference)
        self._tables: dict[str, dict[str, dict[str, Any]]] = {}
        self._shuffle: dict[str, float] = {}                 # node -> sort key
        self._seen: set[str] = set()
        # service -> the remote nodes taking its calls, in order; None: to
        # be sorted again on first read (after a reshuffle)
        self._callers: dict[str, _Callers | None] = {}
        # service -> its call order, derived on first read after a change
        self._order: dict[str, list[str]] = {}
        # service -> node -> function -> its argument checker
        self._checks: dict[str, dict[str, dict[str, Checker]]] = {}
        # (read by the core's common call path: service -> node -> checkers)
        self.checks_table = self._checks
        # an entry with allow rules -> its checkers for this node (by id,
        # holding the entry); entries without are shared process-wide
        self._allowed: dict[int, tuple[Any, dict[str, Checker]]] = {}
        self.version = 0   # bumped on every change (proxies follow it)

    # -- changes --------------------------------------------------------------

    def set_local(self, service: str, info: dict[str, Any] | None) -> None:
        if info is None:
            self._local.pop(service, None)
        else:
            self._local[service] = info
            self._seen.add(service)
        self._set_checks(service, self.local_name, info)
        self._changed(service)

    def set_remote(self, node: str, service: str, info: dict[str, Any] | None) -> None:
        """Store a peer's entry (validated by the caller: invalid_info)."""
        self._store(node, service, info, None if info is None else _compiled(service, info)[1])

    def _store(self, node: str, service: str, info: dict[str, Any] | None,
               checks: dict[str, Checker] | None) -> None:
        """`set_remote`, given the entry's checkers as announced.  The hot
        path of a peer's record, once per entry and node: no work that grows
        with the number of nodes."""
        table = self._tables.get(node)
        old = None if table is None else table.get(service)
        if info is None:
            if table is None or old is None:
                return
            del table[service]
            del self._remote[service][node]
            self._checks[service].pop(node, None)
        elif old is info:
            return                       # (the same record again: nothing new)
        else:
            if table is None:
                table = self._tables[node] = {}
            table[service] = self._remote.setdefault(service, {})[node] = info
            self._seen.add(service)
            self._shuffle.setdefault(node, random.random())
            if old is not None and old == info:
                return                   # (an equal entry: stored, nothing else changes)
            assert checks is not None
            if info.get("allow"):
                checks = self._forbidding(service, info, checks)
            self._checks.setdefault(service, {})[node] = checks
        callers = self._callers.get(service)
        if callers is not None:
            key = self._shuffle[node]
            if old is not None and _takes_calls(old):
                callers.remove(key, node)
            if info is not None and _takes_calls(info):
                callers.add(key, node)
        self._order.pop(service, None)
        self.version += 1

    def apply_table(self, node: str, body: Any) -> int:
        """A peer's TABLE message, as decoded: its valid entries replace all
        that is known of it.  Returns how many entries were refused (each
        logged; a message that is no table at all is logged and ignored)."""
        if type(body) is not dict:
            log.warning("malla: refused the service table of %s: not a map", node)
            return 0
        valid: dict[str, tuple[dict[str, Any], dict[str, Checker]]] = {}
        for service, info in body.items():
            if type(service) is not str:
                why: str | None = "the service name is not a string"
            else:
                why, checks = _compiled(service, info)
            if why is None:
                valid[service] = (info, checks)
            else:
                log.warning("malla: refused %s's entry for service %r: %s", node, service, why)
        self._set_table(node, valid)
        return len(body) - len(valid)

    def apply_announce(self, node: str, body: Any) -> int:
        """A peer's ANNOUNCE message ([service, info], info None: stopped).
        Returns 1 when its entry was refused, else 0 (as apply_table)."""
        if type(body) is not list or len(body) != 2:
            log.warning("malla: refused an announcement of %s: not [service, info]", node)
            return 0
        service, info = body
        if info is None and type(service) is str:
            self.set_remote(node, service, None)
        elif self._valid_entry(node, service, info):
            self.set_remote(node, service, info)
        else:
            return 1
        return 0

    def _valid_entry(self, node: str, service: Any, info: Any) -> bool:
        """Whether a peer's entry for `service` may be stored; a malformed one
        is refused and logged (its other services are kept)."""
        why = ("the service name is not a string" if type(service) is not str
               else _compiled(service, info)[0])
        if why is not None:
            log.warning("malla: refused %s's entry for service %r: %s", node, service, why)
        return why is None

    def _forbidding(self, service: str, info: dict[str, Any],
                    checks: dict[str, Checker]) -> dict[str, Checker]:
        """The checkers of an entry with allow rules for this node: a
        function it may not call is refused before sending (malla.authz).
        (Entries without rules share the process's checkers.)"""
        same = self._allowed.get(id(info))
        if same is not None and same[0] is info:
            return same[1]
        mine = forbidding_checkers(service, dict(checks), info, self.local_name)
        if len(self._allowed) >= _COMPILED_MAX:
            self._allowed.clear()
        self._allowed[id(info)] = (info, mine)
        return mine

    def _set_checks(self, service: str, node: str, info: dict[str, Any] | None) -> None:
        if info is None:
            self._checks.get(service, {}).pop(node, None)
        else:
            checks = _compiled(service, info)[1]
            self._checks.setdefault(service, {})[node] = (
                self._forbidding(service, info, checks) if info.get("allow") else checks)

    def set_table(self, node: str, table: dict[str, dict[str, Any]]) -> None:
        """Replace everything known of `node` by its full table (valid)."""
        self._set_table(node, {s: (info, _compiled(s, info)[1]) for s, info in table.items()})

    def _set_table(self, node: str,
                   table: dict[str, tuple[dict[str, Any], dict[str, Checker]]]) -> None:
        """The work is that of the entries that changed: none for the same
        record again."""
        known = self._tables.get(node)
        if known:
            for service in [s for s in known if s not in table]:
                self._store(node, service, None, None)
        for service, (info, checks) in table.items():
            self._store(node, service, info, checks)
        self.version += 1

    def drop_node(self, node: str) -> None:
        for service in list(self._tables.get(node, ())):
            self._store(node, service, None, None)
        self._tables.pop(node, None)
        self._shuffle.pop(node, None)
        self.version += 1

    def reshuffle(self) -> None:
        for node in self._shuffle:
            self._shuffle[node] = random.random()
        self._order.clear()
        for service in self._callers:
            self._callers[service] = None
        self.version += 1

    def _changed(self, service: str) -> None:
        self._order.pop(service, None)
        self.version += 1

    # -- queries --------------------------------------------------------------

    def nodes(self, service: str) -> list[str]:
        """Nodes where `service` runs and takes calls, in call order."""
        order = self._order.get(service)
        if order is None:
            order = self._order[service] = self._compute(service)
        return order

    def _compute(self, service: str) -> list[str]:
        local = self._local.get(service)
        head = [self.local_name] if local is not None and not local.get("paused") else []
        callers = self._callers.get(service)
        if callers is None:
            shuffle = self._shuffle
            callers = self._callers[service] = _Callers(
                [(shuffle[n], n) for n, info in self._remote.get(service, {}).items()
                 if _takes_calls(info)])
        return head + callers.names

    def instances(self, service: str) -> list[tuple[str, dict[str, Any]]]:
        return [(node, dict(self._info_of(service, node))) for node in self.nodes(service)]

    def _info_of(self, service: str, node: str) -> dict[str, Any]:
        return self._local[service] if node == self.local_name else self._remote[service][node]

    def infos(self, service: str) -> list[dict[str, Any]]:
        """The metadata of every instance of `service` that takes calls, in
        call order; else of the one known_info gives; else [].  Not copies."""
        infos = [self._info_of(service, node) for node in self.nodes(service)]
        if not infos:
            known = self.known_info(service)
            infos = [known] if known is not None else []
        return infos

    def remote_info(self, service: str, node: str) -> dict[str, Any] | None:
        nodes = self._remote.get(service)
        return None if nodes is None else nodes.get(node)

    def checks(self, service: str, node: str) -> dict[str, Checker] | None:
        """The argument checkers of `service` on `node` (None: not known)."""
        nodes = self._checks.get(service)
        return None if nodes is None else nodes.get(node)

    def info(self, service: str) -> dict[str, Any] | None:
        """Metadata of the first instance in call order (local preferred), or
        None.  Not a copy: for reading (proxies read it on every call)."""
        nodes = self.nodes(service)
        return self._info_of(service, nodes[0]) if nodes else None

    def known_info(self, service: str) -> dict[str, Any] | None:
        """Metadata of an instance of `service` that takes calls, else of any
        known one (paused included), else None.  Not a copy."""
        info = self.info(service)
        if info is None:
            info = self._local.get(service)
        if info is None:
            info = next(iter(self._remote.get(service, {}).values()), None)
        return info

    def services(self) -> dict[str, list[str]]:
        """Every service seen (but the built-in one), with its nodes now."""
        return {s: list(self.nodes(s)) for s in sorted(self._seen) if s != BUILTIN}


async def wait_for(registry: Registry, names: list[str], retries: int) -> bool:
    """`node.wait_for_services`: a second between tries until each service
    has a node in `registry`."""
    for attempt in range(retries + 1):
        if all(registry.nodes(n) for n in names):
            return True
        if attempt < retries:
            await asyncio.sleep(1.0)
    return False
