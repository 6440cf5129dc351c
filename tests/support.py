"""The tests' helpers: nodes on loopback (on uvloop, or the standard loop),
subprocess nodes, a hand-driven raw peer.  Imported by the tests as
``from support import ...``; conftest.py keeps only the fixtures."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import uvloop

import malla

COOKIE = "test-cookie-0123456789abcdef"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    """A TCP port free on loopback now (for a process that must be told its
    port before it starts; port=0 is better wherever it can be used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_tool(binary: str, package: str, *, needed_by: str) -> str:
    """The path of a system tool, installed with apt-get when missing and we
    are root (CI starts from a fresh machine, as .ci/run says); else fails
    (never skips) saying how to get it."""
    path = shutil.which(binary)
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            # the package lists may be missing or stale: refresh once
            subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
            subprocess.run(install, env=env, capture_output=True, check=True)
        path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{needed_by} need {binary}: apt-get install {package} "
                           "(or run make test as root, which installs it)")
    return path


def run_async(coro, *, loop: str = "uvloop", timeout: float = 60.0):
    """Run a test coroutine on a fresh loop, bounded in time."""
    async def bounded():
        return await asyncio.wait_for(coro, timeout)

    if loop == "uvloop":
        return uvloop.run(bounded())
    return asyncio.run(bounded())


def node_factory() -> tuple[Callable[..., malla.Node], list[malla.Node]]:
    made: list[malla.Node] = []

    def make(name: str, **kw) -> malla.Node:
        kw.setdefault("cookie", COOKIE)
        kw.setdefault("port", 0)
        node = malla.Node(name, **kw)
        made.append(node)
        return node

    return make, made


async def stop_all(nodes: list[malla.Node]) -> None:
    for node in nodes:
        await node.stop()


def seed_of(node: malla.Node) -> str:
    return f"127.0.0.1:{node.address[1]}"


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Poll `predicate` until true; fail the test past `timeout` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


def redials(node: malla.Node, name: str) -> bool:
    """Whether `node` keeps peer `name` to redial: in its cluster's peer
    table, with an address (not hidden, no goodbye, not forgotten)."""
    peer = node._cluster.peer(name)
    return peer is not None and peer.address is not None


def dialling(node: malla.Node, name: str) -> bool:
    """Whether a task of `node` (re)dials peer `name`."""
    peer = node._cluster.peer(name)
    return peer is not None and peer.dial is not None


def spawn_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """A Python subprocess running `code` (with the tests' malla on its path)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, MALLA_COOKIE=COOKIE)
    if env:
        full_env.update(env)
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=full_env, text=True)


class RawPeer:
    """A hand-driven malla peer over a raw TCP socket: the sans-IO handshake
    (malla.handshake) and frames built by hand, no Node.  For tests that must
    send what a well-behaved node never would (unexported names, bad frames)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from malla._ext import core

        self.reader = reader
        self.writer = writer
        self.frames = core.FrameReader(1 << 20)
        self._queue: list[tuple[int, int, int, bytes]] = []
        self._next_sid = 1          # the dialling side's streams are odd

    @classmethod
    async def connect(cls, node: malla.Node, name: str = "raw",
                      cookie: str = COOKIE) -> RawPeer:
        import random

        from malla._ext import core
        from malla.handshake import Handshake, Hello

        reader, writer = await asyncio.open_connection("127.0.0.1", node.address[1])
        peer = cls(reader, writer)
        hs = Handshake(True, Hello(name=name, incarnation=random.getrandbits(64), hidden=True),
                       cookie.encode())
        for ftype, payload in hs.start():
            writer.write(core.build_frame(ftype, 0, 0, payload))
        while not hs.done:
            ftype, _flags, _sid, payload = await peer.next_frame()
            for out_type, out in hs.receive(ftype, payload):
                writer.write(core.build_frame(out_type, 0, 0, out))
        await writer.drain()
        await wait_until(lambda: name in node.peers(), timeout=5)
        return peer

    async def next_frame(self, timeout: float = 5.0) -> tuple[int, int, int, bytes]:
        while not self._queue:
            data = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not data:
                raise ConnectionError("the node closed the raw connection")
            self._queue.extend(self.frames.feed(data))
        return self._queue.pop(0)

    async def call(self, service: str, fun: str, args: list | None = None,
                   kwargs: dict | None = None, timeout_ms: int = 5000,
                   timeout: float = 5.0) -> tuple[int, object]:
        """Send a CALL frame; return (frame type, decoded payload) of its answer."""
        from malla._ext import core

        sid = self._next_sid
        self._next_sid += 2
        payload = core.packb([service, fun, list(args or []), kwargs, timeout_ms, None, None])
        self.writer.write(core.build_frame(core.FT_CALL, 0, sid, payload))
        await self.writer.drain()
        while True:
            ftype, _flags, got_sid, body = await self.next_frame(timeout)
            if got_sid == sid and ftype in (core.FT_REPLY, core.FT_ERROR):
                return ftype, core.unpackb(body)

    def close(self) -> None:
        self.writer.close()


# A node in its own process (for kill -9 and SIGSTOP): hosts the global
# service "Echo" (pid(), hang() which prints ENTERED), connects to a seed,
# prints "READY <pid>".  argv: name seed heartbeat_timeout.
SUBPROCESS_NODE = r"""
import asyncio, os, sys
import malla

class Echo(malla.Service, global_=True):
    def pid(self):
        return os.getpid()

    async def hang(self):
        print("ENTERED", flush=True)
        await asyncio.sleep(3600)

async def main():
    name, seed, hb_timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
    node = malla.Node(name, port=0, heartbeat_interval=0.2, heartbeat_timeout=hb_timeout,
                      redial_max=0.2)
    await node.start()
    await node.start_service(Echo())
    await node.connect(seed)
    print("READY", os.getpid(), flush=True)
    await asyncio.Event().wait()

malla.run(main())
"""


async def read_line(proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """The subprocess's next stdout line (without blocking the loop)."""
    return await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), timeout)


async def spawn_node(name: str, seed: str, hb_timeout: float = 10.0) -> subprocess.Popen:
    """SUBPROCESS_NODE as `name`, connected to `seed`; returns once READY."""
    proc = spawn_python(SUBPROCESS_NODE, name, seed, str(hb_timeout))
    try:
        line = await read_line(proc)
    except BaseException:
        kill_process(proc)
        raise
    if not line.startswith("READY"):
        kill_process(proc)
        raise AssertionError(f"subprocess node {name} did not start: {line!r} "
                             f"{proc.stderr.read()}")
    return proc


def kill_process(proc: subprocess.Popen) -> None:
    """kill -9 (after SIGCONT, in case it is stopped), reap, close pipes."""
    import signal

    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


def with_nodes(test: Callable[..., Any], *, loop: str = "uvloop", timeout: float = 60.0) -> Any:
    """Run `await test(make)` on a fresh loop, where `make(name, **options)`
    makes a node on loopback; every node it made is stopped afterwards,
    whether the test passed or failed."""
    async def main() -> Any:
        make, made = node_factory()
        try:
            return await test(make)
        finally:
            await stop_all(made)

    return run_async(main(), loop=loop, timeout=timeout)


# -- fakes of the cluster's interfaces (tests/test_cluster_state.py) ------------------------

class FakeProto:
    """What the cluster reads and calls on a connection's core."""

    def __init__(self, peer_host: str = "127.0.0.9") -> None:
        self.sent: list[tuple[int, object]] = []
        self.closed = False
        self.running = 0
        self.in_flight = 0
        self.calls_in = self.calls_out = 0
        self.last_sent = self.last_heard = 0.0
        self._peer_host = peer_host

    def send_message(self, ftype: int, body: object) -> None:
        self.sent.append((ftype, body))

    def get_extra_info(self, key: str) -> object:
        return (self._peer_host, 40000) if key == "peername" else ("127.0.0.1", 4370)

    @property
    def transport(self) -> FakeProto:
        return self

    def sent_of(self, ftype: int) -> list[object]:
        return [body for t, body in self.sent if t == ftype]


class FakeConnection:
    """A malla.connection.Connection as the cluster sees it, authenticated
    as `name`: no socket, no core; records what the cluster does to it."""

    def __init__(self, name: str, *, incarnation: int = 1, dialer: bool = False,
                 listen: tuple[str, int] | None = ("127.0.0.1", 5000), hidden: bool = False,
                 alive: bool = True, port: int = 40000) -> None:
        from malla.handshake import Hello

        self.peer = Hello(name=name, incarnation=incarnation, hidden=hidden, listen=listen)
        self.proto = FakeProto()
        self.dialer = dialer
        self.alive = alive              # what ping() answers
        self.port = port
        self.serving: object = None     # what admit() was told
        self.refused: str | None = None
        self.closed_by_cluster = False
        self.closed = asyncio.get_running_loop().create_future()

    @property
    def name(self) -> str:
        return self.peer.name

    def admit(self, serving: object) -> None:
        self.serving = serving

    def refuse(self, message: str) -> None:
        self.refused = message

    async def retire(self, idle: float = 0.1) -> None:
        self.close()

    async def ping(self, timeout: float) -> bool:
        return self.alive

    def dialer_port(self) -> int:
        return self.port

    def close(self) -> None:
        self.closed_by_cluster = True

    abort = close


def make_cluster(name: str = "b", **settings):
    """A malla.cluster.Cluster over real small parts (config, registry,
    hosting, stats, liveness) and no socket; dials are recorded, never made
    (`cluster.dialled`).  Call inside a running loop."""
    from malla.cluster import Cluster
    from malla.config import NodeConfig
    from malla.hosting import Hosting
    from malla.liveness import Liveness
    from malla.metrics import Stats
    from malla.registry import Registry

    config = NodeConfig(name=name, **settings)
    registry, stats = Registry(name), Stats()
    hosting = Hosting(config, registry, stats, None, lambda ftype, body: None)
    cluster = Cluster(config, COOKIE.encode(), registry, hosting, stats, Liveness(),
                      asyncio.get_running_loop().create_task)
    cluster.running = True
    cluster.dialled = []

    async def connect(target: str):
        cluster.dialled.append(target)
        await asyncio.sleep(3600)       # a peer that never answers

    cluster._connect = connect
    return cluster
