"""`@malla.idempotent`: a function that may run twice for one call (DESIGN.md
"Hedged calls").

A hedged call (`remote(..., hedge_after=ms)`) may run the function on two
nodes at once, so only functions their author marked as safe to run more
than once can be hedged.  The mark is fixed when the class is defined
(`idempotent_of`) and announced in the service's `info` map as function
metadata: ``"function_meta": {function: {"idempotent": true}}`` (only the
marked functions; docs/protocol.md).  A caller reads it back
(`hedgeable`) before it sends a hedged call.

Where DESIGN.md is silent: the mark belongs to the definition it decorates;
an override in a subclass that does not repeat it is not idempotent (the
safe direction: a function wrongly left unmarked is only never hedged).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from malla import exceptions as mexc

__all__ = ["FUNCTION_META", "hedgeable", "idempotent", "idempotent_of",
           "invalid_function_meta"]

F = TypeVar("F", bound=Callable[..., Any])

# (the attribute @malla.idempotent sets on a function)
_ATTR = "_malla_idempotent"
# the key of the info map's per-function metadata
FUNCTION_META = "function_meta"


def idempotent(fn: F) -> F:
    """Mark a service function as safe to run more than once for one call,
    so callers may hedge it (``remote(..., hedge_after=ms)``)."""
    target = getattr(fn, "__func__", fn)     # (a staticmethod or classmethod)
    setattr(target, _ATTR, True)
    return fn


def idempotent_of(cls: type, functions: Iterable[str]) -> frozenset[str]:
    """The exported `functions` of `cls` whose nearest definition along the
    MRO is marked idempotent."""
    marked = set()
    for name in functions:
        for klass in cls.__mro__:
            fn = vars(klass).get(name)
            if fn is not None:
                if getattr(getattr(fn, "__func__", fn), _ATTR, False) is True:
                    marked.add(name)
                break
    return frozenset(marked)


def invalid_function_meta(meta: Any, functions: dict[Any, Any]) -> str | None:
    """Why a peer's announced function metadata is malformed, or None.
    Keys a receiver does not know are ignored (later versions may add some)."""
    if type(meta) is not dict:
        return "its function metadata is not a map"
    for fun, entry in meta.items():
        if type(fun) is not str or fun not in functions:
            return f"function metadata names {fun!r}, which is not one of its functions"
        if type(entry) is not dict:
            return f"the metadata of {fun} is not a map"
        if "idempotent" in entry and type(entry["idempotent"]) is not bool:
            return f"the idempotent flag of {fun} is not a bool"
    return None


def _marks(info: dict[str, Any], fun: str) -> bool:
    entry = info.get(FUNCTION_META, {}).get(fun)
    return entry is not None and entry.get("idempotent") is True


def hedgeable(service: str, fun: str, infos: list[dict[str, Any]]) -> None:
    """Nothing when a call of `fun` may be hedged, by the announced `infos`
    of every instance of `service` the discovery table knows; otherwise the
    error to raise before sending: InvalidOption when nothing is known of
    the service or an instance does not mark `fun` idempotent (an older
    version of it, say: a hedge could land there), UnknownFunction when the
    service exports no `fun`."""
    if not infos:
        raise mexc.InvalidOption(
            f"hedge_after: the discovery table does not know {service} yet, so whether "
            f"{fun} is idempotent is not known (no hedged call before it is discovered)")
    for info in infos:
        if fun not in info.get("functions", {}):
            raise mexc.UnknownFunction(f"service {service} exports no function {fun!r}")
        if not _marks(info, fun):
            raise mexc.InvalidOption(
                f"hedge_after applies only to functions marked @malla.idempotent; "
                f"{service}.{fun} is not (on every node that serves it)")
