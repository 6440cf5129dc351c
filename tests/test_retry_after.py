"""Overloaded.retry_after_ms: the serving node's estimate of when it has
room (DESIGN.md "Overloaded.retry_after_ms"), carried in the ERROR of
protocol version 2 only: a version-1 peer gets the bytes version 1 sent."""

from __future__ import annotations

import asyncio

import msgpack
import pytest
from support import RawPeer, seed_of, wait_until, with_nodes

import malla
from malla._ext import core
from malla.service import RunningService


class Held(malla.Service, global_=True, max_concurrency=1):
    async def hold(self, seconds):
        await asyncio.sleep(seconds)
        return seconds


class Wide(malla.Service, max_concurrency=4):
    async def f(self):
        return None


OVERLOADED = "service Held is at max_concurrency 1"


def test_the_estimate_is_the_calls_beyond_the_limit_times_the_mean_over_the_limit():
    entry = RunningService(Wide())
    entry.running = 4
    # no handler has finished yet: no history, the least hint
    assert entry.refusal("f", [])[3] == 1
    entry.handled(0.2)                      # the first time is the mean
    assert entry.refusal("f", [])[3] == 50          # 1 x 200 ms / 4
    entry.running = 6                       # (in-process casts may go past it)
    assert entry.refusal("f", [])[3] == 150         # 3 x 200 ms / 4
    entry.handled(1.0)                      # recent: the newest weighs 1/8
    assert entry.mean_time == pytest.approx(0.3)
    entry.running = 4
    assert entry.refusal("f", [])[3] == 75
    entry.mean_time = 1e-6                  # under a millisecond: at least 1
    assert entry.refusal("f", [])[3] == 1
    entry.running = 3                       # a place is free: no refusal
    assert entry.refusal("f", []) is None


async def held(make):
    """Node s serving Held with its one place taken by a 5 s call of c's."""
    s = await make("s").start()
    await s.start_service(Held)
    c = await make("c", seeds=[seed_of(s)]).start()
    await wait_until(lambda: c.get_nodes("Held") == ["s"])
    holder = asyncio.ensure_future(c.remote("Held", "hold", [5]))
    await wait_until(lambda: s._hosting.entries["Held"].running == 1)
    return s, c, holder


def test_a_version_2_caller_gets_the_hint_and_in_process_too():
    async def main(make):
        s, c, holder = await held(make)
        with pytest.raises(malla.Overloaded) as over:
            await c.remote("Held", "hold", [0], sna_retries=0)
        assert type(over.value.retry_after_ms) is int and over.value.retry_after_ms >= 1
        with pytest.raises(malla.Overloaded) as here:
            await s.remote("Held", "hold", [0], sna_retries=0)
        assert type(here.value.retry_after_ms) is int and here.value.retry_after_ms >= 1
        holder.cancel()
        # a class of its own, built by hand: no hint unless given
        assert malla.Overloaded("busy").retry_after_ms is None

    with_nodes(main)


@pytest.mark.parametrize("version", [1, 2])
def test_the_error_frame_is_version_1_s_bytes_for_a_version_1_peer(version):
    async def main(make):
        s, _c, holder = await held(make)
        peer = await RawPeer.connect(s, vmin=1, vmax=version)
        try:
            sid = peer.send_call("Held", "hold", [0])
            ftype, raw = await peer.answer(sid)
        finally:
            peer.close()
            holder.cancel()
        assert ftype == core.FT_ERROR
        body = msgpack.unpackb(raw)
        v1 = msgpack.packb([2, "malla.exceptions.Overloaded", OVERLOADED, None])
        if version == 1:
            assert raw == v1         # exactly what version 1 sends
        else:
            assert body[:4] == msgpack.unpackb(v1)
            assert len(body) == 5 and type(body[4]) is int and body[4] >= 1

    with_nodes(main)


@pytest.mark.parametrize(("fifth", "hint"), [
    (None, None), (250, 250), (0, None), (-3, None), (True, None), ("5", None), (1.5, None),
    (malla.exceptions.MAX_RETRY_AFTER_MS + 1, None)])
def test_a_received_hint_is_taken_only_as_a_whole_number_of_ms(fifth, hint):
    err = malla.exceptions.error_from_wire(2, "malla.exceptions.Overloaded", "busy", None, fifth)
    assert type(err) is malla.Overloaded and err.retry_after_ms == hint
    # a fifth element on another code is not a hint of anything
    assert type(malla.exceptions.error_from_wire(1, "x", "gone", None, 5)) is \
        malla.ServiceNotAvailable
