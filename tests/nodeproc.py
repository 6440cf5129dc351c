"""A malla node in its own process, for tests where a process must die,
stop or be cut off.  Prints "READY <port>" once listening; stops on SIGTERM.

    python tests/nodeproc.py NAME [--host H] [--port P] [--seed S]...
        [--hb-interval S] [--hb-timeout S] [--check S] [--no-echo]
        [--ledger DIR] [--ledger-max-concurrency N] [--max-frame-size B]
        [--max-message-size B] [--max-pending-handshakes N] [--handshake-timeout S]

Hosts Echo (global) unless --no-echo, and always Probe (global), which
reports what this node sees, so a test can ask every survivor.
With --ledger DIR it also hosts Ledger and Ledger_<name> (global), which
append every call id they run to DIR/<name>.ids (the soak, tests/soak.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import malla


class Echo(malla.Service, global_=True):
    def __init__(self, node_name: str) -> None:
        self.node_name = node_name

    def echo(self, x):
        return x

    def whoami(self):
        return self.node_name

    async def sleep(self, seconds: float):
        await asyncio.sleep(seconds)
        return self.node_name


class Probe(malla.Service, global_=True):
    """Runs on every test node; named after the node so each can be asked."""

    node: malla.Node

    def nodes_of(self, service: str):
        return self.node.get_nodes(service)

    def peers(self):
        return self.node.peers()

    def stats(self):
        return {k: v for k, v in self.node.stats().items() if k != "latency"}


class Ledger(malla.Service, global_=True):
    """Records each call it runs: the call id, 8 bytes little-endian, written
    with os.write on an O_APPEND fd before the function returns, so "ran" is
    on disk (page cache: survives kill -9) before the reply can leave."""

    def __init__(self, node_name: str, fd: int) -> None:
        self.node_name = node_name
        self.fd = fd

    def run(self, call_id: int, x: int, pad: bytes = b""):
        os.write(self.fd, call_id.to_bytes(8, "little"))
        return [self.node_name, call_id, 2 * x + 1]

    async def arun(self, call_id: int, x: int, think_ms: float = 0.0):
        if think_ms > 0:
            await asyncio.sleep(think_ms / 1000.0)
        os.write(self.fd, call_id.to_bytes(8, "little"))
        return [self.node_name, call_id, 2 * x + 1]

    def boom(self, call_id: int):
        os.write(self.fd, call_id.to_bytes(8, "little"))
        raise RuntimeError(f"boom {call_id}")


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--seed", action="append", default=[])
    p.add_argument("--hb-interval", type=float, default=0.2)
    p.add_argument("--hb-timeout", type=float, default=1.0)
    p.add_argument("--check", type=float, default=1.0)
    p.add_argument("--no-echo", action="store_true")
    p.add_argument("--ledger", default=None)
    p.add_argument("--ledger-max-concurrency", type=int, default=0)
    p.add_argument("--max-frame-size", type=int, default=1 << 20)
    p.add_argument("--max-message-size", type=int, default=64 << 20)
    p.add_argument("--max-pending-handshakes", type=int, default=256)
    p.add_argument("--handshake-timeout", type=float, default=5.0)
    a = p.parse_args()
    node = malla.Node(a.name, host=a.host, port=a.port, seeds=a.seed,
                      heartbeat_interval=a.hb_interval, heartbeat_timeout=a.hb_timeout,
                      check_interval=a.check, redial_max=0.5,
                      max_frame_size=a.max_frame_size, max_message_size=a.max_message_size,
                      max_pending_handshakes=a.max_pending_handshakes,
                      handshake_timeout=a.handshake_timeout)
    await node.start()
    if not a.no_echo:
        await node.start_service(Echo(a.name))
    probe_cls = type(f"Probe_{a.name}", (Probe,), {}, name=f"Probe_{a.name}", global_=True)
    probe = probe_cls()
    probe.node = node
    await node.start_service(probe)
    if a.ledger:
        fd = os.open(os.path.join(a.ledger, f"{a.name}.ids"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        limit = {"max_concurrency": a.ledger_max_concurrency} if a.ledger_max_concurrency else {}
        shared = type("Ledger", (Ledger,), {}, name="Ledger", global_=True, **limit)
        await node.start_service(shared(a.name, fd))
        named = type(f"Ledger_{a.name}", (Ledger,), {}, name=f"Ledger_{a.name}", global_=True,
                     **limit)
        await node.start_service(named(a.name, fd))
    print(f"READY {node.address[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await node.stop()


if __name__ == "__main__":
    malla.run(main())
