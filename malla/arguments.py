"""Call arguments checked against a function's announced signature.

A call whose arguments do not fit raises BadArguments before anything is
sent or run, on every path (DESIGN.md "Transparent calls").  The check is on
every call's path, so the common case costs two comparisons: positional
arguments only, their count within the signature's range.  Anything else
(keywords, *args, keyword-only parameters) is bound by inspect.
"""

from __future__ import annotations

import inspect
from typing import Any

from malla import exceptions as mexc

__all__ = ["REMOTE_DEFAULT", "Checker", "checkers_of", "signature_from_wire"]

_P = inspect.Parameter
_POSITIONAL = (_P.POSITIONAL_ONLY, _P.POSITIONAL_OR_KEYWORD)
_NO_FAST = -1


class _Default:
    """Stands for a remote parameter's default, which is not sent."""

    def __repr__(self) -> str:
        return "..."


REMOTE_DEFAULT = _Default()


def signature_from_wire(params: list[list[Any]]) -> inspect.Signature:
    """An inspect.Signature from announced [name, kind, has_default] triples."""
    return inspect.Signature([
        _P(str(name), inspect._ParameterKind(int(kind)),
           default=REMOTE_DEFAULT if has_default else _P.empty)
        for name, kind, has_default in params])


class Checker:
    """The argument check of one function: `check(args, kwargs)`."""

    __slots__ = ("hi", "lo", "name", "signature")

    def __init__(self, name: str, signature: inspect.Signature) -> None:
        self.name = name
        self.signature = signature
        lo = hi = 0
        for p in signature.parameters.values():
            if p.kind in _POSITIONAL:
                hi += 1
                lo += p.default is _P.empty
            elif p.kind is _P.VAR_POSITIONAL:
                hi = 1 << 62
            elif p.kind is _P.KEYWORD_ONLY and p.default is _P.empty:
                hi = _NO_FAST    # needs a keyword: never the fast case
                break
        self.lo = lo
        self.hi = hi

    def check(self, args: Any, kwargs: Any) -> None:
        """BadArguments when `args`, `kwargs` do not fit the signature."""
        if not kwargs and self.lo <= len(args) <= self.hi:
            return
        bind(self.name, self.signature, args, kwargs or {})


def bind(name: str, signature: inspect.Signature, args: Any, kwargs: dict[str, Any]) -> None:
    """BadArguments, naming `name` and its signature, when the arguments do
    not fit (the check of Checker and of proxies)."""
    try:
        signature.bind(*args, **kwargs)
    except TypeError as exc:
        raise mexc.BadArguments(f"{name}{signature}: {exc}") from None


def checkers_of(service: str, functions: dict[str, list[list[Any]]]) -> dict[str, Checker]:
    """A Checker per announced function of `service`."""
    return {fun: Checker(f"{service}.{fun}", signature_from_wire(params))
            for fun, params in functions.items()}
