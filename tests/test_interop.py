"""Nodes of adjacent protocol versions and capability sets interoperate.

MALLA_PROTOCOL_LIMIT (a test setting) makes a subprocess node speak as an
older release would ("1..1:0": version 1, no capabilities: no UDP
heartbeats, no trace field, no large-message window) or as a newer one
("1..2:7": versions up to 2).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from support import COOKIE, ROOT, node_factory, run_async, stop_all

import malla
from malla.handshake import CAP_WINDOW, CAPABILITIES

NODEPROC = os.path.join(ROOT, "tests", "nodeproc.py")


class Here(malla.Service, global_=True):
    def hello(self, who):
        return f"hello {who}"


@pytest.mark.parametrize("limit, version, caps", [("1..1:0", 1, 0), ("1..2:3", 1, 3),
                                                    ("1..2:7", 1, 7)])
def test_adjacent_versions_interoperate(limit, version, caps):
    env = dict(os.environ, MALLA_COOKIE=COOKIE, PYTHONPATH=ROOT, MALLA_PROTOCOL_LIMIT=limit)
    proc = subprocess.Popen([sys.executable, NODEPROC, "other", "--hb-interval", "0.2",
                             "--hb-timeout", "1.0"], stdout=subprocess.PIPE, env=env, text=True)

    async def main():
        port = int(proc.stdout.readline().split()[1])
        make, made = node_factory()
        try:
            node = await make("current", seeds=[f"127.0.0.1:{port}"], tracing=True,
                              heartbeat_interval=0.2, heartbeat_timeout=1.0).start()
            await node.start_service(Here)
            assert await node.wait_for_services(["Echo", "Probe_other"], retries=10)
            conn = node._cluster.connected["other"]
            assert conn.handshake.version == version
            assert conn.peer.caps == caps
            assert conn.handshake.local.caps == CAPABILITIES
            # calls both ways, with and without the trace field
            assert await node.remote("Echo", "echo", [{"k": (1, 2)}]) == {"k": (1, 2)}
            assert await node.remote("Probe_other", "peers") == ["current"]
            # large messages both ways (frames, detached bytes), paced by
            # acknowledgements only when both announced CAP_WINDOW
            big = os.urandom(3 << 20)
            assert await node.remote("Echo", "echo", [[big, "tail"]]) == [big, "tail"]
            assert bool(conn.handshake.caps & CAP_WINDOW) == bool(caps & CAP_WINDOW)
            # heartbeats keep it connected, whichever channels the peer has
            await asyncio.sleep(3 * 1.0)
            assert node.peers() == ["other"]
            assert await node.remote("Probe_other", "nodes_of", ["Here"]) == ["current"]
        finally:
            await stop_all(made)
            proc.kill()
            proc.wait()

    run_async(main())
