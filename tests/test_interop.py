"""Nodes of adjacent protocol versions and capability sets interoperate.

MALLA_PROTOCOL_LIMIT (a test setting) makes a subprocess node speak as an
older release would ("1..1:0": version 1, no capabilities: no UDP
heartbeats, no trace field, no large-message window) or as a newer one
("1..3:7": versions up to 3).  That version 1 is the released one, byte for
byte, the known-answer tests below show: tests/vectors/handshake_v1.json is
a handshake the released version-1 code sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
from support import COOKIE, ROOT, node_factory, run_async, stop_all

import malla
from malla._core import FT_AUTH, FT_HELLO
from malla.handshake import CAP_WINDOW, CAPABILITIES, Handshake, Hello

NODEPROC = os.path.join(ROOT, "tests", "nodeproc.py")


class Here(malla.Service, global_=True):
    def hello(self, who):
        return f"hello {who}"


@pytest.mark.parametrize("limit, version, caps", [("1..1:0", 1, 0), ("1..1:7", 1, 7),
                                                    ("1..2:3", 2, 3), ("1..3:7", 2, 7)])
def test_adjacent_versions_interoperate(limit, version, caps, tmp_path):
    env = dict(os.environ, MALLA_COOKIE=COOKIE, PYTHONPATH=ROOT, MALLA_PROTOCOL_LIMIT=limit)
    proc = subprocess.Popen([sys.executable, NODEPROC, "other", "--hb-interval", "0.2",
                             "--hb-timeout", "1.0", "--ledger", str(tmp_path),
                             "--ledger-max-concurrency", "1"],
                            stdout=subprocess.PIPE, env=env, text=True)

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
            # Overloaded: the serving node's retry_after_ms from version 2 on
            held = asyncio.ensure_future(node.remote("Ledger", "arun", [1, 1, 3000]))
            hint: object = "not overloaded"
            for _ in range(200):        # (until the held call has the one place)
                try:
                    await node.remote("Ledger", "arun", [2, 1], sna_retries=0)
                except malla.Overloaded as exc:
                    hint = exc.retry_after_ms
                    break
                await asyncio.sleep(0.01)
            assert hint is None if version == 1 else type(hint) is int and hint >= 1
            # streams need version 2 and CAP_STREAM on both sides: a peer
            # without them is refused for streams only, before sending, and
            # at once (no retry rounds: it never will take one)
            assert not conn.handshake.streams
            with pytest.raises(malla.ServiceNotAvailable, match="without streams"):
                await node.stream("Echo", "echo", [1]).__anext__()
            assert await node.remote("Echo", "echo", [2]) == 2
            # heartbeats keep it connected, whichever channels the peer has
            await asyncio.sleep(3 * 1.0)
            assert await held == ["other", 1, 3]
            assert node.peers() == ["other"]
            assert await node.remote("Probe_other", "nodes_of", ["Here"]) == ["current"]
        finally:
            await stop_all(made)
            proc.kill()
            proc.wait()

    run_async(main())


# -- version 1 as released, byte for byte --------------------------------------------

with open(os.path.join(ROOT, "tests", "vectors", "handshake_v1.json")) as f:
    V1 = json.load(f)


def v1_side(role: str) -> Handshake:
    """This release's handshake in `role`, pinned to version 1 and set up as
    the recorded node was (its nonce included)."""
    spec = dict(V1[role])
    nonce = bytes.fromhex(spec.pop("nonce"))
    listen = spec.pop("listen")
    local = Hello(**spec, listen=tuple(listen) if listen else None)
    return Handshake(role == "dialer", local, V1["cookie"].encode(), nonce=nonce)


@pytest.mark.parametrize("role", ["dialer", "acceptor"])
def test_version_1_handshake_is_the_released_one_byte_for_byte(role):
    side = v1_side(role)
    mine = "d->a" if role == "dialer" else "a->d"
    recorded = [(f["direction"], f["type"], bytes.fromhex(f["payload"])) for f in V1["frames"]]
    assert [t for _, t, _ in recorded] == [FT_HELLO, FT_HELLO, FT_AUTH, FT_AUTH]
    sent = list(side.start())
    for direction, ftype, payload in recorded:
        if direction == mine:
            # what this release sends is what the released version 1 sent
            assert sent.pop(0) == (ftype, payload)
        else:
            # and what the released version 1 sent, it takes
            sent.extend(side.receive(ftype, payload))
    assert sent == [] and side.done and side.version == 1
    other = "acceptor" if role == "dialer" else "dialer"
    assert side.peer.name == V1[other]["name"]
    assert side.peer.incarnation == V1[other]["incarnation"]


def test_a_version_2_node_answers_a_version_1_dialer_with_a_whole_hello():
    # the released dialler's HELLO (range 1..1) to an acceptor of this
    # release (1..2): a version-1 HELLO comes back, name and all, no challenge
    acceptor = Handshake(False, Hello(name="now", incarnation=1, hidden=False), b"c")
    acceptor.start()
    [(ftype, payload)] = acceptor.receive(FT_HELLO, bytes.fromhex(V1["frames"][0]["payload"]))
    assert ftype == FT_HELLO and acceptor.version == 1
    assert Hello.decode(payload).name == "now"


@pytest.mark.parametrize("limit", ["garbage", "0..2", "2..1", "1..2:-1", "1..x"])
def test_a_malformed_protocol_limit_is_refused_when_the_node_is_made(monkeypatch, limit):
    monkeypatch.setenv("MALLA_PROTOCOL_LIMIT", limit)
    with pytest.raises(malla.InvalidOption, match="MALLA_PROTOCOL_LIMIT"):
        malla.Node("a")
