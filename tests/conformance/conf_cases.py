"""The conformance table: one call, one behaviour on every path.

Each case is one line of data: what is called, with which options, and
the outcome every path must give — the result (or a check of it), or the
error class and its family — and how many times the server ran it.  Where
a path is documented to differ, the cell says so: `inprocess=` (values pass
by reference in-process, DESIGN.md "Calls") or `blocking=` (a blocking call
has no handle to cancel), `proxy=` (what a proxy cannot express).
Adding a case is adding a line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from malla.exceptions import DID_NOT_RUN, FAILED, MAY_HAVE_RUN

BIG = 2 << 20        # above the suite's max_message_size (1 MiB)


@dataclass(frozen=True)
class Ok:
    """The call returns `value` (or a value for which `check(value, env)` holds)."""

    value: Any = None
    check: Callable[[Any, Any], bool] | None = None
    runs: int | tuple[int, int] = 1


@dataclass(frozen=True)
class Err:
    """The call raises `cls` (a name in malla, or CancelledError), of `family`."""

    cls: str
    family: str | None
    runs: int | tuple[int, int] = 0
    check: Callable[[BaseException, Any], bool] | None = None


@dataclass(frozen=True)
class NA:
    """The case does not apply to this path, and why."""

    why: str


@dataclass(frozen=True)
class Case:
    name: str
    service: str
    fun: str
    args: Callable[[], tuple[Any, ...]] = tuple
    kwargs: dict[str, Any] | None = None
    opts: dict[str, Any] = field(default_factory=dict)
    expect: Ok | Err = field(default_factory=Ok)
    inprocess: Ok | Err | NA | None = None     # the documented in-process cell
    blocking: Ok | Err | NA | None = None      # the documented BlockingNode cell
    proxy: Ok | Err | NA | None = None         # the documented cell of the proxy paths
    how: str = "call"            # call | local | cb_all | cancel | stream [break|slow]
    setup: str | None = None     # hold | pause | late
    counted: str | None = None   # the function whose runs are counted (default: fun)
    then: str | None = None      # after: "alive" (the connection still carries calls)
    eventually: tuple[str, str, int] | None = None   # (service, fun, runs) reached later
    cancelled: int = 0           # server-side coroutines cancelled


def _args(*values: Any) -> Callable[[], tuple[Any, ...]]:
    return lambda: values


def _remote_key_error(exc: BaseException, env: Any) -> bool:
    return isinstance(exc, KeyError) and exc.exc_type == "builtins.KeyError"  # type: ignore


def _nested(exc: BaseException, env: Any) -> bool:
    return exc.exc_type == "malla.exceptions.ServiceNotAvailable"  # type: ignore[attr-defined]


def _retry_after(exc: BaseException, env: Any) -> bool:
    hint = exc.retry_after_ms  # type: ignore[attr-defined]
    return type(hint) is int and hint >= 1


def _one_ok_one_failed(value: Any, env: Any) -> bool:
    return (len(value) == 2 and value.count(env.server_name) == 1
            and sum(isinstance(v, RuntimeError) and isinstance(v, Exception)
                    and getattr(v, "exc_type", "") == "builtins.RuntimeError"
                    for v in value) == 1)


def _one_forbidden_one_open(value: Any, env: Any) -> bool:
    # (get_nodes' order: the serving node's slot refused, x's ran)
    import malla

    return (len(value) == 2 and value.count("x") == 1
            and sum(isinstance(v, malla.Forbidden) and isinstance(v, PermissionError)
                    and malla.family(v) == DID_NOT_RUN for v in value) == 1)


def _after_three(exc: BaseException, env: Any) -> bool:
    return env.items == [0, 1, 2] and exc.exc_type == "builtins.ValueError"  # type: ignore


def _first_only(exc: BaseException, env: Any) -> bool:
    return env.items == [0]


def _some_items(exc: BaseException, env: Any) -> bool:
    return 0 < len(env.items) < 10_000 and env.items == list(range(len(env.items)))


def _is_a_stream(exc: BaseException, env: Any) -> bool:
    return "is a stream" in str(exc)

KEY_HERE, KEY_X = "key-3", "key-1"     # (malla.rendezvous.rank over s/c and x)

_BY_REFERENCE = "in-process, values pass by reference, not through the codec"

CASES: list[Case] = [
    Case("plain call", "Conf", "echo", _args([1, "a", None]), expect=Ok([1, "a", None])),
    Case("kwargs", "Conf", "kw", _args(1), {"c": 5}, expect=Ok([1, 2, 5])),
    # (in-process, a cast is scheduled: it never runs before remote() returns)
    Case("cast", "Conf", "echo", _args(1), opts={"timeout": 0}, expect=Ok(None, runs=(0, 1)),
         inprocess=Ok(None, runs=0), eventually=("Conf", "echo", 1)),
    Case("cast under a deadline", "Conf", "slow", _args(3000),
         opts={"timeout": 0, "deadline": 8000}, expect=Ok(None, runs=(0, 1)),
         inprocess=Ok(None, runs=0), eventually=("Conf", "slow", 1)),
    Case("cast inside a handler with an inherited deadline", "Conf", "cast_inside",
         _args(3000), opts={"deadline": 8000},
         expect=Ok(check=lambda v, env: 0 <= v < 1500), eventually=("Conf", "slow", 1)),
    Case("unknown function", "Conf", "nope", expect=Err("UnknownFunction", DID_NOT_RUN)),
    Case("private function", "Conf", "_helper", expect=Err("UnknownFunction", DID_NOT_RUN)),
    Case("dunder", "Conf", "__init__", expect=Err("UnknownFunction", DID_NOT_RUN),
         proxy=NA("a proxy's dunders are the proxy object's own (Python's attribute "
                  "protocol): a remote dunder cannot even be named")),
    Case("hook function", "Hooked", "service_cb_in", _args("whoami", [], {}, {}),
         expect=Err("UnknownFunction", DID_NOT_RUN)),
    Case("bad arguments: too few", "Conf", "echo", expect=Err("BadArguments", DID_NOT_RUN)),
    Case("bad arguments: unknown keyword", "Conf", "kw", _args(1), {"d": 2},
         expect=Err("BadArguments", DID_NOT_RUN)),
    Case("unencodable argument", "Conf", "echo", lambda: (object(),),
         expect=Err("EncodeError", DID_NOT_RUN),
         inprocess=Ok(check=lambda v, env: type(v) is object)),
    Case("unencodable result", "Conf", "unencodable", expect=Err("RemoteError", FAILED, runs=1),
         inprocess=Ok(check=lambda v, env: type(v) is object)),
    Case("too-large message", "Conf", "echo", lambda: (b"x" * BIG,),
         expect=Err("MessageTooLarge", DID_NOT_RUN),
         inprocess=Ok(check=lambda v, env: len(v) == BIG)),
    Case("remote builtin exception, caught by its type", "Conf", "boom", _args("KeyError"),
         expect=Err("RemoteError", FAILED, runs=1, check=_remote_key_error)),
    Case("nested malla error inside a handler", "Conf", "nested",
         expect=Err("RemoteError", FAILED, runs=1, check=_nested)),
    Case("sna_retries until the service appears", "Late", "ping",
         opts={"sna_retries": 20, "retries_sleep_msec": 100}, setup="late",
         expect=Ok("late")),
    Case("excp_retries", "Conf", "flaky", opts={"excp_retries": 1, "retries_sleep_msec": 50},
         expect=Ok("ok", runs=2)),
    Case("deadline across retries", "Ghost", "f",
         opts={"sna_retries": 100, "retries_sleep_msec": 100, "deadline": 350},
         expect=Err("CallTimeout", DID_NOT_RUN), counted="-"),
    Case("deadline across exception retries", "Conf", "boom", _args("RuntimeError"),
         # (a deadline of 15 sleeps: on a machine loaded 7 times over its
         # CPUs, the first attempt alone took most of a 700 ms deadline)
         opts={"excp_retries": 100, "retries_sleep_msec": 100, "deadline": 1500},
         expect=Err("CallTimeout", MAY_HAVE_RUN, runs=(2, 16))),
    Case("timeout on a sleeping server", "Conf", "hold", _args(5000), opts={"timeout": 200},
         expect=Err("CallTimeout", MAY_HAVE_RUN, runs=1), cancelled=1),
    Case("cancel after begin", "Conf", "hold", _args(5000), how="cancel",
         expect=Err("CancelledError", None, runs=1), cancelled=1,
         blocking=NA("a blocking call has no handle to cancel; its timeout= sends CANCEL")),
    Case("max_concurrency gives Overloaded, with the server's retry_after_ms", "Limited",
         "hold", _args(10), opts={"sna_retries": 0}, setup="hold",
         expect=Err("Overloaded", DID_NOT_RUN, runs=1, check=_retry_after)),
    # hedged calls (DESIGN.md "Hedged calls"): the option on every path; the
    # hedge itself (a second node) is tests/test_hedging.py's
    Case("hedge_after on an idempotent function", "Conf", "same", _args([1, "a"]),
         opts={"hedge_after": 5_000}, expect=Ok([1, "a"])),
    Case("hedge_after on a function not marked idempotent", "Conf", "echo", _args(1),
         opts={"hedge_after": 5_000}, expect=Err("InvalidOption", DID_NOT_RUN)),
    Case("paused service", "Pausable", "ping", opts={"sna_retries": 0}, setup="pause",
         expect=Err("ServiceNotAvailable", DID_NOT_RUN)),
    Case("a decoder that raises on one value", "Conf", "echo", lambda: (_fragile("bad"),),
         expect=Err("EncodeError", DID_NOT_RUN), then="alive",
         inprocess=Ok(check=lambda v, env: v == _fragile("bad"))),
    Case("a reply the caller cannot rebuild", "Conf", "fragile_reply",
         expect=Err("RemoteError", FAILED, runs=1), then="alive",
         inprocess=Ok(check=lambda v, env: v == _fragile("bad"))),
    Case("call_cb_all with one node failing", "Pair", "who", how="cb_all",
         expect=Ok(check=_one_ok_one_failed)),
    Case("local()", "Conf", "echo", _args(5), how="local",
         expect=Err("ServiceNotAvailable", DID_NOT_RUN), inprocess=Ok(5)),
    Case("the hook sees caller and meta", "Hooked", "whoami", opts={"meta": {"k": [1]}},
         expect=Ok(check=lambda v, env: v == [env.caller_name, {"k": [1]}])),
    # allow= (DESIGN.md "Identity and authorization"): checked where the
    # service runs, in-process against the node's own name; a caller that
    # knows the announced rules refuses before sending (the server was
    # never asked: then="forbidden_where_checked")
    Case("allow=: an allowed caller", "Guarded", "ping", expect=Ok("pong")),
    Case("allow=: a denied caller gets Forbidden, nothing ran", "Guarded", "admin",
         expect=Err("Forbidden", DID_NOT_RUN), then="forbidden_where_checked"),
    Case("allow=: Forbidden is never retried nor failed over", "Guarded", "admin",
         opts={"sna_retries": 3, "excp_retries": 3, "retries_sleep_msec": 50},
         expect=Err("Forbidden", DID_NOT_RUN), then="not_retried"),
    Case("allow=: a denied cast", "Guarded", "admin", opts={"timeout": 0},
         expect=Err("Forbidden", DID_NOT_RUN), then="forbidden_where_checked"),
    Case("allow=: refused before service_cb_in", "Hooked", "secret",
         expect=Err("Forbidden", DID_NOT_RUN)),
    Case("allow=: a refusal fills its node's call_cb_all slot", "Fan", "who", how="cb_all",
         expect=Ok(check=_one_forbidden_one_open, runs=0)),
    Case("allow=: local() is checked too", "Guarded", "admin", how="local",
         expect=Err("ServiceNotAvailable", DID_NOT_RUN), inprocess=Err("Forbidden", DID_NOT_RUN)),
    Case("cast whose handler raises is counted where it ran", "Conf", "boom",
         _args("ValueError"), opts={"timeout": 0}, expect=Ok(None, runs=(0, 1)),
         eventually=("Conf", "boom", 1), then="cast_error_counted"),
    # streams (DESIGN.md "Streaming calls"): one run each, however many
    # items; a killed producer node is tests/test_streams.py's (it takes
    # a node down)
    Case("stream: items in order", "Feed", "ticks", _args(100), how="stream",
         expect=Ok(list(range(100)))),
    Case("stream: an empty stream", "Feed", "ticks", _args(0), how="stream", expect=Ok([])),
    Case("stream: an error after its items", "Feed", "fail_after", _args(3), how="stream",
         expect=Err("RemoteError", FAILED, runs=1, check=_after_three)),
    Case("stream: leaving the loop early closes the producer", "Feed", "ticks", _args(10_000),
         how="stream break", expect=Ok([0, 1, 2]), cancelled=1),
    # (in-process the generator runs only when asked: none ahead)
    Case("stream: a slow consumer bounds the producer", "Feed", "ticks", _args(10_000),
         how="stream slow", expect=Ok(check=lambda v, env: 1 <= v <= 1 + 64), cancelled=1),
    Case("stream: timeout per item", "Feed", "ticks", _args(10, 2000), opts={"timeout": 200},
         how="stream", expect=Err("CallTimeout", MAY_HAVE_RUN, runs=1, check=_first_only),
         cancelled=1),
    Case("stream: deadline mid-stream", "Feed", "ticks", _args(10_000, 20),
         opts={"deadline": 300}, how="stream",
         expect=Err("CallTimeout", MAY_HAVE_RUN, runs=1, check=_some_items),
         cancelled=1),
    Case("stream: allow= refuses a stream as a call", "Feed", "secret", how="stream",
         expect=Err("Forbidden", DID_NOT_RUN)),
    Case("stream: a stream function called with remote()", "Feed", "ticks", _args(3),
         expect=Err("RemoteError", FAILED, check=_is_a_stream), counted="-",
         proxy=NA("a proxy calls a function announced as a stream as one: it returns "
                  "its items")),
    # key= and vsn= (DESIGN.md "Routing and resilience"): KEY_HERE ranks the
    # serving node ("s", or "c" in-process) above x, KEY_X ranks x first
    Case("key=: the key's node serves it", "Pair", "who", opts={"key": KEY_HERE},
         expect=Ok(check=lambda v, env: v == env.server_name)),
    Case("key=: no local-first, the key decides", "Pair", "who", opts={"key": KEY_X},
         expect=Err("RemoteError", FAILED, runs=0)),
    Case("key= of another type", "Conf", "echo", _args(1), opts={"key": True},
         expect=Err("InvalidOption", DID_NOT_RUN)),
    Case("vsn= matching the announced vsn", "Conf", "echo", _args(1), opts={"vsn": "0*"},
         expect=Ok(1)),
    Case("vsn= matching no instance", "Conf", "echo", _args(1),
         opts={"vsn": "9.*", "sna_retries": 0}, expect=Err("ServiceNotAvailable", DID_NOT_RUN)),
    # key= and vsn= of a stream: the same round loop as a call's
    Case("stream key=: the key's node serves it", "Pair", "whos", opts={"key": KEY_HERE},
         how="stream", expect=Ok(check=lambda v, env: v == [env.server_name])),
    Case("stream key=: no local-first, the key decides", "Pair", "whos",
         opts={"key": KEY_X}, how="stream", expect=Err("RemoteError", FAILED, runs=0)),
    Case("stream key= of another type", "Feed", "ticks", _args(3), opts={"key": 1.5},
         how="stream", expect=Err("InvalidOption", DID_NOT_RUN)),
    Case("stream vsn= matching the announced vsn", "Feed", "ticks", _args(3),
         opts={"vsn": "0*"}, how="stream", expect=Ok([0, 1, 2])),
    Case("stream vsn= matching no instance", "Feed", "ticks", _args(3),
         opts={"vsn": "9.*", "sna_retries": 0}, how="stream",
         expect=Err("ServiceNotAvailable", DID_NOT_RUN)),
    # (last: it spends the caller's budget for Pair for the next 10 s)
    Case("retry budget: exception retries past it raise at once", "Pair", "who",
         opts={"key": KEY_X, "excp_retries": 1000, "retries_sleep_msec": 0},
         expect=Err("RemoteError", FAILED, runs=0), then="throttled"),
]


def _fragile(tag: str) -> Any:
    from conf_services import Fragile

    return Fragile(tag)


def cell(case: Case, path: Any) -> Ok | Err | NA:
    """The outcome `case` must have on `path` (its documented cell or the rule)."""
    if path.inprocess and case.inprocess is not None:
        return case.inprocess
    if path.blocking and case.blocking is not None:
        return case.blocking
    if path.via.startswith("proxy") and case.proxy is not None:
        return case.proxy
    return case.expect
