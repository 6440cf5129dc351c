"""One call, one behaviour on every path (tests/conformance/conf_cases.py).

Each (path, case) is one test: the outcome (result, or error class and its
family) and how many times the server ran the call must be what the table
says for that path.  Cells documented as not applying are listed by
test_not_applicable_cells_are_documented, never skipped silently.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conf_cases import CASES, NA, Case, Ok, cell
from conf_paths import PATHS, Env, Path

import malla

_current: dict[str, Env] = {}


def _env(path: Path) -> Env:
    env = _current.get(path.name)
    if env is None:
        for old in list(_current.values()):    # one environment at a time
            old.close()
        _current.clear()
        env = _current[path.name] = Env(path)
    return env


@pytest.fixture(scope="module", autouse=True)
def _close_envs():
    yield
    for env in list(_current.values()):
        env.close()
    _current.clear()


CELLS = [(p, c) for p in PATHS for c in CASES if not isinstance(cell(c, p), NA)]


@pytest.mark.parametrize(("path", "case"), CELLS,
                         ids=[f"{p.name}: {c.name}" for p, c in CELLS])
def test_conformance(path: Path, case: Case) -> None:
    env = _env(path)
    env.run(_run_case(env, case), timeout=60)
    assert env.failures == [], f"exceptions in the loop's callbacks: {env.failures}"


def test_not_applicable_cells_are_documented() -> None:
    na = [(p.name, c.name, cell(c, p).why) for p in PATHS for c in CASES
          if isinstance(cell(c, p), NA)]
    proxy_dunder = ("a proxy's dunders are the proxy object's own (Python's attribute "
                    "protocol): a remote dunder cannot even be named")
    as_one = ("a proxy calls a function announced as a stream as one: it returns its items")
    proxied = [(p, c, why) for p in ("proxy-await", "proxy-call")
               for c, why in (("dunder", proxy_dunder),
                              ("stream: a stream function called with remote()", as_one))]
    assert na == [*proxied,
                  ("blocking", "cancel after begin",
                   "a blocking call has no handle to cancel; its timeout= sends CANCEL")]


def _within(runs: int | tuple[int, int], n: int) -> bool:
    lo, hi = (runs, runs) if isinstance(runs, int) else runs
    return lo <= n <= hi


async def _invoke(env: Env, case: Case) -> Any:
    args = case.args()
    if case.how == "local":
        return await env.local(case.service, case.fun, args, case.kwargs)
    if case.how.startswith("stream"):
        return await env.stream(case.service, case.fun, args, case.opts,
                                case.how.partition(" ")[2] or "all")
    if case.how == "cb_all":
        return await env.cb_all(case.service, case.fun, args, case.kwargs, case.opts)
    if case.how == "cancel":
        task = asyncio.ensure_future(env.call(case.service, case.fun, args, case.kwargs,
                                              case.opts))
        await _eventually(env, case.service, case.fun, 1)
        task.cancel()
        return await task
    return await env.call(case.service, case.fun, args, case.kwargs, case.opts)


async def _eventually(env: Env, service: str, fun: str, runs: int) -> None:
    for _ in range(500):
        if await env.ctl("count", service, fun) >= runs:
            break
        await asyncio.sleep(0.01)
    assert await env.ctl("count", service, fun) == runs, f"{service}.{fun} ran other than {runs}x"


async def _setup(env: Env, case: Case) -> Any:
    if case.setup == "late":
        await env.ctl("stop_late")
        await env.until(lambda: env.server_name not in env.caller_nodes("Late"), "Late gone")
        await env.ctl("start_late", 300)
    elif case.setup == "pause":
        await env.ctl("pause", case.service)
        await env.until(lambda: env.server_name not in env.caller_nodes(case.service),
                        "the pause seen by the caller")
    elif case.setup == "hold":
        # a call that holds the only slot of max_concurrency=1
        holder = asyncio.ensure_future(env.call(case.service, case.fun, (800,), None, {}))
        await _eventually(env, case.service, case.fun, 1)
        return holder
    return None


async def _teardown(env: Env, case: Case, held: Any) -> None:
    if case.setup == "late":
        await env.ctl("stop_late")
    elif case.setup == "pause":
        await env.ctl("resume", case.service)
        await env.until(lambda: env.server_name in env.caller_nodes(case.service),
                        "the resume seen by the caller")
    elif held is not None:
        assert await held == 800


async def _run_case(env: Env, case: Case) -> None:
    want = cell(case, env.path)
    await env.ctl("reset")
    held = await _setup(env, case)
    in_flight = None
    if case.then == "alive":
        # a call in flight on the same connection must survive the bad value
        in_flight = asyncio.ensure_future(env.call("Conf", "slow", (300,), None, {}))
        await asyncio.sleep(0.05)
    errors_before = await env.ctl("errors")
    forbidden_before = await env.ctl("forbidden")
    caller_before = await env.caller_stats()
    value: Any = None
    error: BaseException | None = None
    try:
        value = await _invoke(env, case)
    except (Exception, asyncio.CancelledError) as exc:
        error = exc
    try:
        if isinstance(want, Ok):
            assert error is None, f"expected a result, got {error!r}"
            if want.check is not None:
                assert want.check(value, env), f"unexpected result {value!r}"
            else:
                assert value == want.value and type(value) is type(want.value), value
        else:
            assert error is not None, f"expected {want.cls}, got the result {value!r}"
            cls = asyncio.CancelledError if want.cls == "CancelledError" else getattr(malla,
                                                                                    want.cls)
            assert isinstance(error, cls), f"expected {want.cls}, got {error!r}"
            if want.family is not None:
                assert isinstance(error, malla.MallaError)
                assert malla.family(error) == want.family, (error, malla.family(error))
            if want.check is not None:
                assert want.check(error, env), f"unexpected error {error!r}"
        if case.counted != "-":
            runs = await env.ctl("count", case.service, case.counted or case.fun)
            assert _within(want.runs, runs), f"the server ran it {runs} times"
        if case.eventually is not None:
            await _eventually(env, *case.eventually)
        if case.cancelled:
            for _ in range(300):
                if await env.ctl("cancelled", case.fun) >= case.cancelled:
                    break
                await asyncio.sleep(0.01)
            assert await env.ctl("cancelled", case.fun) == case.cancelled, "not cancelled"
        if in_flight is not None:
            assert await in_flight == 300
            assert await env.call("Conf", "echo", (7,), None, {}) == 7
        if case.then == "forbidden_where_checked":
            # counted by the node that checked: the serving node itself
            # in-process; over the network the caller refused before
            # sending, so the server was never asked
            forbidden = await env.ctl("forbidden")
            assert forbidden == forbidden_before + env.path.inprocess, forbidden
        if case.then == "not_retried":
            caller_after = await env.caller_stats()
            for key in ("retries", "failovers"):
                assert caller_after[key] == caller_before[key], (key, caller_after[key])
        if case.then == "throttled":
            caller_after = await env.caller_stats()
            assert caller_after["retries_throttled"] == caller_before["retries_throttled"] + 1
        if case.then == "cast_error_counted" and not env.path.inprocess:
            errors = await env.ctl("errors")
            assert errors.get("RemoteError", 0) == errors_before.get("RemoteError", 0) + 1
    finally:
        await _teardown(env, case, held)
