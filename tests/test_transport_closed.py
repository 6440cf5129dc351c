"""A transport that closed under the core before connection_lost told it
(uvloop marks it closed at once and calls connection_lost a loop turn
later): what is sent meanwhile is dropped, never raised (a task sending a
service table then died of uvloop's RuntimeError, in a 1,000-node probe)."""

from __future__ import annotations

import asyncio

from support import seed_of, wait_until, with_nodes

from malla._ext import core


def test_a_message_sent_on_a_transport_closed_under_the_core_is_dropped():
    async def main(make):
        a = await make("a").start()
        b = await make("b", seeds=[seed_of(a)]).start()
        await wait_until(lambda: "a" in b.peers())
        conn = b._cluster.connected["a"]
        conn.proto.transport.close()         # (as a reset seen by uvloop would)
        conn.proto.send_message(core.FT_TABLE, {})     # raised RuntimeError
        # the connection is lost as any other (and dialled again)
        await wait_until(lambda: b._cluster.connected.get("a") is not conn)
        await asyncio.sleep(0)
        return True

    assert with_nodes(main)
