"""Transparent calls: proxies, lazy call objects, malla.call, stubs, the
default node and malla.services."""

from __future__ import annotations

import asyncio
import gc
import inspect
import json
import pydoc
import time
import warnings

import pytest
from support import (
    COOKIE,
    node_factory,
    run_async,
    seed_of,
    spawn_python,
    stop_all,
    wait_until,
    with_nodes,
)

import malla
from malla import api


class UserService(malla.Service, global_=True, vsn="1.0"):
    def get_user_by_id(self, user_id, *, full=False):
        return {"id": user_id, "full": full}

    async def slow(self, seconds):
        await asyncio.sleep(seconds)
        return seconds


class UserServiceV2(malla.Service, name="UserService", global_=True, vsn="2.0"):
    def get_user(self, user_id, extra=None):
        return {"id": user_id, "v": 2}


async def pair(make):
    a = await make("a").start()
    b = await make("b", seeds=[seed_of(a)]).start()
    await wait_until(lambda: a.peers() == ["b"] and b.peers() == ["a"])
    return a, b


def test_proxy_signatures_dir_help_and_checks():
    async def main(make):
        a, b = await pair(make)
        await a.start_service(UserService)
        assert await b.wait_for_services(["UserService"], retries=5)
        proxy = b.services.UserService
        assert proxy is b.service("UserService") is b.service(UserService)
        assert dir(proxy) == ["get_user_by_id", "slow"]
        sig = inspect.signature(proxy.get_user_by_id)
        assert list(sig.parameters) == ["user_id", "full"]
        assert sig.parameters["full"].kind is inspect.Parameter.KEYWORD_ONLY
        assert "get_user_by_id" in pydoc.render_doc(proxy)
        with pytest.raises(TypeError):
            proxy.get_user_by_id()                 # missing user_id, checked locally
        with pytest.raises(TypeError):
            proxy.get_user_by_id(1, 2)             # full is keyword-only
        with pytest.raises(AttributeError, match="get_user_by_id, slow"):
            _ = proxy.nope
        assert await proxy.get_user_by_id(5, full=True) == {"id": 5, "full": True}

    with_nodes(main)


def test_lazy_call_does_nothing_until_awaited_and_warns_if_never():
    async def main(make):
        a, b = await pair(make)
        await a.start_service(UserService)
        assert await b.wait_for_services(["UserService"], retries=5)
        before = a.stats()["calls_in"]
        obj = b.services.UserService.get_user_by_id(1)
        await asyncio.sleep(0.1)
        assert a.stats()["calls_in"] == before       # nothing sent yet
        assert await obj == {"id": 1, "full": False}
        assert a.stats()["calls_in"] == before + 1
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b.services.UserService.get_user_by_id(2)
            gc.collect()
        assert any("never awaited" in str(w.message) for w in caught)
        # malla.call runs it with options
        with pytest.raises(malla.CallTimeout):
            await malla.call(b.services.UserService.slow(5), timeout=50)
        coro = b.remote("UserService", "slow", [0])
        with pytest.raises(malla.InvalidOption):
            await malla.call(coro)
        coro.close()

    with_nodes(main)


def test_a_call_object_is_a_coroutine_for_tasks():
    """asyncio.create_task and TaskGroup take a proxy call as they take
    remote()'s coroutine; cancelling the task cancels the call on the
    serving node; a call closed unstarted sends nothing and never warns."""
    cancelled = []

    class Sleeper(malla.Service, global_=True):
        async def sleep(self, seconds):
            try:
                await asyncio.sleep(seconds)
            except asyncio.CancelledError:
                cancelled.append(seconds)
                raise

    async def main(make):
        a, b = await pair(make)
        await a.start_service(UserService)
        await a.start_service(Sleeper)
        assert await b.wait_for_services(["UserService", "Sleeper"], retries=5)
        proxy = b.services.UserService
        call = proxy.get_user_by_id(7)
        assert asyncio.iscoroutine(call)
        assert await asyncio.create_task(call) == {"id": 7, "full": False}
        task = asyncio.create_task(b.services.Sleeper.sleep(30))
        await wait_until(lambda: a.stats()["calls_in"] >= 2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: cancelled == [30])       # cancelled there too
        before = a.stats()["calls_in"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            unstarted = proxy.get_user_by_id(8)
            unstarted.close()
            del unstarted
            gc.collect()
        assert not any("never awaited" in str(w.message) for w in caught)
        assert a.stats()["calls_in"] == before

    with_nodes(main)


def test_proxy_follows_new_version_and_outlives_service():
    async def main(make):
        a, b = await pair(make)
        await a.start_service(UserService)
        assert await b.wait_for_services(["UserService"], retries=5)
        proxy = b.service("UserService")
        assert "get_user_by_id" in dir(proxy)
        await a.stop_service("UserService")
        await wait_until(lambda: not b.get_nodes("UserService"))
        assert "get_user_by_id" in dir(proxy)          # last announced signatures
        t0 = time.monotonic()
        with pytest.raises(malla.ServiceNotAvailable):     # sna_retries=0: at once
            await malla.call(proxy.get_user_by_id(1), sna_retries=0)
        assert time.monotonic() - t0 < 1.0
        await a.start_service(UserServiceV2)
        await wait_until(lambda: b.get_nodes("UserService") == ["a"])
        assert dir(proxy) == ["get_user"]
        assert await proxy.get_user(3) == {"id": 3, "v": 2}
        with pytest.raises(AttributeError):
            _ = proxy.get_user_by_id

    with_nodes(main)


def test_precompiled_stubs_before_and_after_discovery(tmp_path, monkeypatch):
    async def main(spec):
        make, made = node_factory()
        try:
            b = await make("b", precompile=spec).start()
            stub = b.services.UserService
            assert inspect.signature(stub.get_user_by_id).parameters.keys() == {"arg0"}
            t0 = time.monotonic()
            with pytest.raises(malla.ServiceNotAvailable):     # sna_retries=0: at once
                await malla.call(stub.get_user_by_id(1), sna_retries=0)
            assert time.monotonic() - t0 < 1.0
            a = await make("a").start()
            await a.start_service(UserService)
            await b.connect(seed_of(a))
            await wait_until(lambda: b.get_nodes("UserService") == ["a"])
            assert b.services.UserService is stub
            assert await stub.get_user_by_id(9) == {"id": 9, "full": False}
        finally:
            await stop_all(made)

    spec = {"UserService": {"get_user_by_id": 1}}
    run_async(main(spec))
    run_async(main(json.dumps(spec)))
    path = tmp_path / "stubs.json"
    path.write_text(json.dumps(spec))
    run_async(main(str(path)))
    monkeypatch.setenv("MALLA_PRECOMPILE", json.dumps(spec))
    run_async(main(None))


def test_call_cb_all_is_concurrent_and_ordered():
    class Sleeper(malla.Service, global_=True):
        def __init__(self, name):
            self.name = name

        async def nap(self, seconds):
            if self.name == "n2":
                raise ValueError("n2 refuses")
            await asyncio.sleep(seconds)
            return self.name

    async def main(make):
        first = await make("n0").start()
        nodes = [first] + [await make(f"n{i}", seeds=[seed_of(first)]).start()
                           for i in range(1, 4)]
        for node in nodes:
            await node.start_service(Sleeper(node.name))
        caller = await make("caller", seeds=[seed_of(first)]).start()
        await wait_until(lambda: len(caller.get_nodes("Sleeper")) == 4)
        t0 = time.monotonic()
        results = await caller.call_cb_all("Sleeper", "nap", [0.3])
        took = time.monotonic() - t0
        order = caller.get_nodes("Sleeper")
        assert len(results) == 4
        for node, result in zip(order, results, strict=False):
            if node == "n2":
                assert isinstance(result, malla.RemoteError)
            else:
                assert result == node
        assert took < 0.3 * 3          # concurrent: far less than the sum (1.2 s)

    with_nodes(main)


def test_module_level_api_on_the_standard_loop():
    async def main():
        make, made = node_factory()
        try:
            a = await make("a").start()
            await a.start_service(UserService)
            node = await malla.start("web", cookie=COOKIE, port=0, seeds=[seed_of(a)])
            assert await malla.wait_for_services(["UserService"], retries=5)
            assert malla.get_nodes("UserService") == ["a"]
            assert malla.get_instances("UserService")[0][1]["vsn"] == "1.0"
            assert "UserService" in malla.get_services()
            assert await malla.remote("UserService", "get_user_by_id", [1]) == \
                {"id": 1, "full": False}
            assert await malla.call_cb_all(UserService, "get_user_by_id", [2]) == \
                [{"id": 2, "full": False}]
            from malla.services import UserService as Users
            assert await Users.get_user_by_id(3) == {"id": 3, "full": False}
            with pytest.raises(ImportError, match="precompile"):
                from malla.services import NoSuchService  # noqa: F401
            await node.start_service(UserService)
            assert await malla.local("UserService", "get_user_by_id", [4]) == \
                {"id": 4, "full": False}
        finally:
            await malla.stop()
            await stop_all(made)
        assert api._default is None

    run_async(main(), loop="asyncio")


def test_fresh_subprocess_imports_a_proxy_and_calls():
    code = """
import sys, malla
async def main():
    await malla.start("client", port=0, seeds=[sys.argv[1]])
    assert await malla.wait_for_services(["UserService"], retries=10)
    from malla.services import UserService
    print(await UserService.get_user_by_id(42))
    await malla.stop()
malla.run(main())
"""

    async def main(make):
        a = await make("a").start()
        await a.start_service(UserService)
        proc = spawn_python(code, seed_of(a))
        out, err = await asyncio.get_running_loop().run_in_executor(
            None, lambda: proc.communicate(timeout=30))
        assert proc.returncode == 0, err
        assert out.strip() == "{'id': 42, 'full': False}"

    with_nodes(main)
