"""Authorization: which caller node names may call which function of a
service (DESIGN.md "Identity and authorization").

`allow=` on a service class and `@malla.allow(...)` on a function give
`fnmatch.fnmatchcase` patterns of caller node names; a function's own list
replaces the class's; a function without either is open to everyone.  The
rules are fixed when the class is defined (`rules_of`) and announced in the
service's `info` map (`"allow": {function: [pattern, ...]}`, only the
functions not open to everyone).

The serving node decides: its core asks the running service's `Policy`
once per (caller, function), caches the verdict, and refuses a denied call
with `Forbidden` before `service_cb_in` (malla/core/dispatch.pyx).  A caller
that knows the announced rules refuses before sending
(`forbidding_checkers`): the same answer, nothing sent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from fnmatch import fnmatchcase
from typing import Any, TypeVar

from malla import exceptions as mexc
from malla.arguments import Checker

__all__ = ["Forbidding", "Policy", "allow", "forbidding_checkers", "invalid_allow",
           "permits", "rules_of", "valid_patterns", "warn_self_asserted"]

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("malla.authz")

# (the attribute @malla.allow sets on a function)
_ATTR = "_malla_allow"
# What a peer's announced rules may hold (a receiver matches its own name
# against them): more is a malformed entry
MAX_PATTERNS = 16              # per function
MAX_PATTERN_LEN = 128
# every pattern of one service's announced rules together, in characters:
# a receiver matches its own name against them (fnmatch compiles each to a
# regex: bounded, a hostile table costs milliseconds, not seconds)
MAX_RULES_SIZE = 4096

Rules = dict[str, tuple[str, ...]]      # function -> its patterns


def valid_patterns(value: Any, where: str) -> tuple[str, ...]:
    """`value` (a str or a list/tuple of str) as a tuple of patterns;
    InvalidOption unless each is a non-empty str and there is at least one."""
    patterns = (value,) if isinstance(value, str) else value
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise mexc.InvalidOption(
            f"{where} takes one or more patterns of caller node names, not {value!r} "
            f"(to let no node call a function, give it a leading underscore)")
    for pattern in patterns:
        if type(pattern) is not str or not pattern:
            raise mexc.InvalidOption(f"{where}: a pattern is a non-empty str, not {pattern!r}")
        if len(pattern) > MAX_PATTERN_LEN:
            raise mexc.InvalidOption(f"{where}: a pattern is at most {MAX_PATTERN_LEN} "
                                     f"characters (peers refuse longer ones)")
    if len(patterns) > MAX_PATTERNS:
        raise mexc.InvalidOption(f"{where}: at most {MAX_PATTERNS} patterns")
    return tuple(patterns)


def allow(*patterns: str) -> Callable[[F], F]:
    """Let only callers whose node name matches one of `patterns`
    (`fnmatch.fnmatchcase`) call this function; replaces the class's
    ``allow=`` for it.  At least one pattern (InvalidOption otherwise)."""
    checked = valid_patterns(patterns, "@malla.allow()")

    def mark(fn: F) -> F:
        target = getattr(fn, "__func__", fn)    # (a staticmethod or classmethod)
        setattr(target, _ATTR, checked)
        return fn

    return mark


def rules_of(cls: type, class_patterns: tuple[str, ...] | None,
             functions: list[str]) -> Rules:
    """function -> its patterns, for each exported function that not every
    caller may call (a "*" pattern opens a function to everyone).  A
    function's own ``@malla.allow`` is looked for along the class's MRO: an
    override that does not repeat it keeps the rule of the one it overrides
    (overriding never silently opens a function)."""
    rules: Rules = {}
    for name in functions:
        patterns = _marked(cls, name, class_patterns)
        if patterns is not None and "*" not in patterns:
            rules[name] = patterns
    total = sum(len(p) for patterns in rules.values() for p in patterns)
    if total > MAX_RULES_SIZE:
        raise mexc.InvalidOption(
            f"{cls.__name__}: its allow patterns take {total} characters in all, more than "
            f"the {MAX_RULES_SIZE} peers accept")
    return rules


def _marked(cls: type, name: str, default: tuple[str, ...] | None) -> tuple[str, ...] | None:
    # the nearest definition of `name` along the MRO that @malla.allow marked
    for klass in cls.__mro__:
        fn = vars(klass).get(name)
        if fn is not None:
            patterns = getattr(getattr(fn, "__func__", fn), _ATTR, None)
            if patterns is not None:
                return patterns  # type: ignore[no-any-return]
    return default


def permits(patterns: tuple[str, ...] | list[str], caller: str | None) -> bool:
    """Whether the node named `caller` matches one of `patterns`."""
    name = caller or ""
    return any(fnmatchcase(name, pattern) for pattern in patterns)


def _message(caller: str | None, service: str, fun: str, patterns: Any) -> str:
    return (f"node {caller} may not call {service}.{fun} "
            f"(allowed: {', '.join(patterns)})")


class Policy:
    """The rules of one running service, as its dispatcher asks them.

    `report(service, fun, caller)` is told of every refusal (the hosting
    node logs and counts it)."""

    __slots__ = ("_report", "rules")

    def __init__(self, rules: Rules,
                 report: Callable[[str, str, str | None], None] | None = None) -> None:
        self.rules = rules
        self._report = report

    def permits(self, fun: str, caller: str | None) -> bool:
        patterns = self.rules.get(fun)
        return patterns is None or permits(patterns, caller)

    def denied(self, service: str, fun: str, caller: str | None) -> str:
        """A refused call: reported; the message its caller's Forbidden carries."""
        if self._report is not None:
            self._report(service, fun, caller)
        return _message(caller, service, fun, self.rules.get(fun, ()))


def invalid_allow(rules: Any, functions: dict[Any, Any]) -> str | None:
    """Why a peer's announced `allow` map is malformed, or None."""
    if type(rules) is not dict:
        return "its allow rules are not a map"
    size = 0
    for fun, patterns in rules.items():
        if type(fun) is not str or fun not in functions:
            return f"allow names {fun!r}, which is not one of its functions"
        if (type(patterns) is not list or not 0 < len(patterns) <= MAX_PATTERNS
                or any(type(p) is not str or not 0 < len(p) <= MAX_PATTERN_LEN
                       for p in patterns)):
            return (f"the allow rule of {fun} is not a list of 1 to {MAX_PATTERNS} patterns "
                    f"of at most {MAX_PATTERN_LEN} characters")
        size += sum(len(p) for p in patterns)
        if size > MAX_RULES_SIZE:
            return f"its allow rules hold more than {MAX_RULES_SIZE} characters"
    return None


class Forbidding(Checker):
    """The argument check of a function this node may not call: every call
    of it is refused before sending (its range is empty, so the common
    path of remote() hands it to `check`)."""

    __slots__ = ("message",)

    def __init__(self, checker: Checker, message: str) -> None:
        super().__init__(checker.name, checker.signature)
        self.lo, self.hi = 1, 0
        self.message = message

    def check(self, args: Any, kwargs: Any) -> None:
        raise mexc.Forbidden(self.message)


def forbidding_checkers(service: str, checkers: dict[str, Checker], info: dict[str, Any],
                        caller: str) -> dict[str, Checker]:
    """`checkers` with those of the functions the node named `caller` may not
    call, by the announced `info`, replaced by Forbidding ones."""
    rules = info.get("allow")
    if not rules:
        return checkers
    for fun, patterns in rules.items():
        if fun in checkers and not permits(patterns, caller):
            checkers[fun] = Forbidding(checkers[fun], _message(caller, service, fun, patterns))
    return checkers


def without_refusals(checkers: dict[str, Checker]) -> dict[str, Checker]:
    """`checkers` with each Forbidding one back to a plain argument check:
    what a caller holds when no instance it knows of takes calls (the rules
    may change with the next one; the serving node decides)."""
    return {fun: Checker(c.name, c.signature) if isinstance(c, Forbidding) else c
            for fun, c in checkers.items()}


def warn_self_asserted(node: str, service: str, rules: Rules, identity: str) -> None:
    """Warn that `service` uses allow= on a node whose peers' names are
    self-asserted (identity="cookie": any holder of the cookie can claim
    any name)."""
    if rules and identity == "cookie":
        log.warning("malla: %s: service %s uses allow=, but with identity=\"cookie\" "
                    "caller names are self-asserted (any holder of the cookie can claim "
                    "any name); use identity=\"tls\" to bind names to certificates",
                    node, service)
