"""A hostile peer against one node, and a legitimate one calling it meanwhile
(DESIGN.md "Identity and authorization", bounded unauthenticated load).

`run_flood(FloodConfig(...))` starts the attacked node in its own process
(tests/nodeproc.py, so its resident memory is its own), a legitimate node in
this process, connected before the flood, and the attacker in a third
process (this file run as a script):

    python tests/flood.py PORT REPLAY_HEX ONE_ADDRESS MANY CONCURRENCY HOLD_S

The attacker makes ONE_ADDRESS attempts from 127.0.0.2 alone (garbage and
replayed handshakes: they fail, so the per-address throttle closes that
address's later ones at once), then MANY from 2,000 other loopback addresses
(127.0.10.2 to 127.0.17.251: no one of them fails often enough to be
throttled), of four kinds in turn:

* idle: connect, send nothing;
* slowloris: a valid-looking HELLO frame header (16 bytes, docs/protocol.md)
  announcing 4 KiB, then one byte every half second;
* garbage: bytes no frame starts with;
* replay: the HELLO and AUTH frames a real node sent on a real handshake
  (recorded by a TCP relay between it and the attacked node), verbatim: the
  AUTH proves over the acceptor's nonce of that handshake, not this one's,
  so the cookie check refuses it.

At most CONCURRENCY attempts are open at once; each stays until the node
closes it (HOLD_S at most: one still open then counts as `outlived`).  It
prints its tally as JSON.  The legitimate node calls the attacked one, one
call after another, before (the idle latencies) and during the flood; every
call must succeed.  The report holds the attacker's tally, the node's
handshake counters (before and after), the most connections it held pending,
its resident memory (before, peak, after) and the two latency distributions.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
NODEPROC = os.path.join(HERE, "nodeproc.py")
COOKIE = "flood-cookie-0123456789abcdef"

HEADER = 16                 # every frame's header (docs/protocol.md, "Frame")
FT_HELLO, FT_AUTH, FT_ERROR = 1, 2, 6
AUTH_FAILED = 9             # the ERROR code of a failed proof
SLOW_GAP_S = 0.5
ONE_ADDRESS = "127.0.0.2"
ONE_AT_ONCE = 4
KINDS = ("idle", "slowloris", "garbage", "replay")


def many_address(i: int) -> str:
    return f"127.0.{10 + i // 250 % 8}.{2 + i % 250}"


def frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """The whole frames at the start of `data`, as (type, payload)."""
    out, at = [], 0
    while len(data) - at >= HEADER:
        length = int.from_bytes(data[at + 4:at + 8], "big")
        if len(data) - at - HEADER < length:
            break
        out.append((data[at], data[at + HEADER:at + HEADER + length]))
        at += HEADER + length
    return out


# -- the attacker (its own process) ----------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.attempts: collections.Counter[str] = collections.Counter()
        self.connected: collections.Counter[str] = collections.Counter()
        self.answered: collections.Counter[str] = collections.Counter()   # got any byte
        self.replies: collections.Counter[str] = collections.Counter()    # replay's frames
        self.outlived: collections.Counter[str] = collections.Counter()
        self.connect_failed = 0

    def as_dict(self) -> dict[str, Any]:
        return {"attempts": sum(self.attempts.values()), "connected": sum(self.connected.values()),
                "by_kind": {k: {"attempts": self.attempts[k], "connected": self.connected[k],
                                "answered": self.answered[k]} for k in sorted(self.attempts)},
                "replay_replies": dict(self.replies), "connect_failed": self.connect_failed,
                "outlived": sum(self.outlived.values()), "outlived_by_kind": dict(self.outlived)}


async def attempt(port: int, source: str, kind: str, group: str, replay: bytes,
                  hold_s: float, tally: Tally) -> None:
    key = f"{group}:{kind}"
    tally.attempts[key] += 1
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source, 0)), hold_s)
    except (OSError, asyncio.TimeoutError):
        tally.connect_failed += 1
        return
    tally.connected[key] += 1
    got = b""
    try:
        if kind == "garbage":
            writer.write(b"GET / HTTP/1.1\r\nHost: malla\r\n\r\n" + os.urandom(64))
        elif kind == "replay":
            writer.write(replay)
        elif kind == "slowloris":
            writer.write(bytes([FT_HELLO, 0, 0, 0]) + (4096).to_bytes(4, "big") + bytes(8))
        end = time.monotonic() + hold_s
        while True:
            left = end - time.monotonic()
            if left <= 0:
                tally.outlived[key] += 1
                break
            try:
                data = await asyncio.wait_for(reader.read(65536),
                                              min(left, SLOW_GAP_S))
            except asyncio.TimeoutError:
                if kind == "slowloris":
                    writer.write(b"\x00")
                continue
            if not data:
                break
            got += data
    except (ConnectionError, OSError):
        pass                    # reset by the node: closed, as it should be
    finally:
        writer.close()
    if got:
        tally.answered[key] += 1
    if kind == "replay" and got:
        for ftype, payload in frames_of(got):
            tally.replies[str(ftype)] += 1
            if ftype == FT_ERROR and error_code(payload) == AUTH_FAILED:
                tally.replies["auth_failed"] += 1


def error_code(payload: bytes) -> int | None:
    """An ERROR frame's code: `[code, exc_type, message, traceback]`."""
    import msgpack
    try:
        body = msgpack.unpackb(payload)
    except ValueError:
        return None
    return body[0] if isinstance(body, list) and body and isinstance(body[0], int) else None


async def attack(port: int, replay: bytes, one_address: int, many: int, concurrency: int,
                 hold_s: float) -> dict[str, Any]:
    tally = Tally()
    slots = asyncio.Semaphore(concurrency)
    tasks: set[asyncio.Task[None]] = set()
    started = time.monotonic()

    async def bounded(source: str, kind: str, group: str) -> None:
        try:
            await attempt(port, source, kind, group, replay, hold_s, tally)
        finally:
            slots.release()

    # one address first, a few at a time: its failures must be in before
    # its next attempts for the throttle to be seen
    async def from_one(count: int) -> None:
        for i in range(count):
            await attempt(port, ONE_ADDRESS, ("garbage", "replay")[i % 2], "one", replay,
                          hold_s, tally)

    await asyncio.gather(*(from_one(len(range(w, one_address, ONE_AT_ONCE)))
                           for w in range(ONE_AT_ONCE)))
    for i in range(many):
        await slots.acquire()
        task = asyncio.create_task(bounded(many_address(i), KINDS[i % 4], "many"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    used = resource.getrusage(resource.RUSAGE_SELF)
    # (its CPU: the attack's pace is the attacker's own, a Python process)
    return {**tally.as_dict(), "seconds": round(time.monotonic() - started, 2),
            "cpu_s": round(used.ru_utime + used.ru_stime, 2)}


def attacker_main(argv: list[str]) -> None:
    port, replay_hex, one, many, concurrency, hold_s = argv
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    import uvloop
    result = uvloop.run(attack(int(port), bytes.fromhex(replay_hex), int(one), int(many),
                               int(concurrency), float(hold_s)))
    print(json.dumps(result), flush=True)


# -- the scenario (the test's process) --------------------------------------------------------


@dataclass
class FloodConfig:
    one_address: int = 1_000
    many: int = 19_000
    concurrency: int = 400
    max_pending_handshakes: int = 256
    handshake_timeout: float = 5.0
    idle_calls: int = 2_000            # the idle latencies: calls before the flood
    sample_s: float = 0.1              # how often the node's RSS and counters are read
    # CPUs to pin the attacker to, and the attacked and legitimate nodes to
    # (None: wherever the kernel puts them).  On a 2-core machine an attacker
    # sharing the node's CPU measures CPU contention as much as the node
    pin_attacker: tuple[int, ...] | None = None
    pin_nodes: tuple[int, ...] | None = None


async def record_handshake(port: int) -> bytes:
    """The handshake frames (HELLO, AUTH) a real node sends dialling the node
    on `port`, read off the wire by a TCP relay between them: the leading
    frames it sent, up to the first that is neither (the handshake is over)."""
    import malla

    sent = bytearray()

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   keep: bytearray | None) -> None:
        try:
            while data := await reader.read(65536):
                if keep is not None:
                    keep.extend(data)
                writer.write(data)
        except ConnectionError:
            pass                # either side went: the relay ends
        finally:
            writer.close()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_writer, sent), pipe(up_reader, writer, None))

    server = await asyncio.start_server(relay, "127.0.0.1", 0)
    relay_port = server.sockets[0].getsockname()[1]
    recorder = malla.Node("recorded", port=0, cookie=COOKIE, hidden=True)
    await recorder.start()
    try:
        await recorder.connect(f"127.0.0.1:{relay_port}")
    finally:
        await recorder.stop()
        server.close()
    end, types = 0, []
    for ftype, payload in frames_of(bytes(sent)):
        if ftype not in (FT_HELLO, FT_AUTH):
            break
        end += HEADER + len(payload)
        types.append(ftype)
    if FT_AUTH not in types:
        raise AssertionError(f"no AUTH in the recorded handshake: {bytes(sent[:64])!r}")
    return bytes(sent[:end])      # verbatim


async def spawn_target(cfg: FloodConfig, log: Any) -> tuple[asyncio.subprocess.Process, int]:
    """The attacked node, "a" (hosting Echo and Probe_a), in its own process."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, NODEPROC, "a", "--hb-timeout", "10",
        "--max-pending-handshakes", str(cfg.max_pending_handshakes),
        "--handshake-timeout", str(cfg.handshake_timeout),
        stdout=subprocess.PIPE, stderr=log, env=dict(os.environ, MALLA_COOKIE=COOKIE,
                                                     PYTHONPATH=ROOT))
    assert proc.stdout is not None
    line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
    if not line.startswith("READY "):
        proc.kill()
        await proc.wait()
        raise AssertionError(f"the attacked node did not start: {line!r}")
    return proc, int(line.split()[1])


async def keep_calling(node: Any, latencies: list[float], stop: asyncio.Event | None = None,
                       count: int = 0) -> None:
    """Echo calls one after another (a millisecond apart), `count` of them or
    until `stop`; each must succeed, first time."""
    n = 0
    while (n < count) if stop is None else not stop.is_set():
        started = time.perf_counter()
        assert await node.remote("Echo", "echo", [n], timeout=10_000, sna_retries=0) == n
        latencies.append(time.perf_counter() - started)
        n += 1
        await asyncio.sleep(0.001)


HANDSHAKE_KEYS = ("handshakes_pending", "handshakes_refused", "handshakes_throttled",
                  "handshakes_failed")


async def node_stats(node: Any) -> dict[str, int]:
    stats = await node.remote("Probe_a", "stats", timeout=10_000, sna_retries=0)
    return {k: int(stats[k]) for k in HANDSHAKE_KEYS}


def summary(latencies: list[float]) -> dict[str, Any]:
    from soak import percentile

    ordered = sorted(latencies)
    ms = {f"p{q}_ms": round(1000 * (percentile(ordered, q / 100) or 0.0), 3) for q in (50, 99)}
    return {"count": len(ordered), **ms}


async def flood_scenario(cfg: FloodConfig, log: Any) -> dict[str, Any]:
    allowed = os.sched_getaffinity(0)
    if cfg.pin_nodes is not None:
        os.sched_setaffinity(0, cfg.pin_nodes)        # (the target inherits it)
    try:
        return await pinned_scenario(cfg, log)
    finally:
        os.sched_setaffinity(0, allowed)


async def pinned_scenario(cfg: FloodConfig, log: Any) -> dict[str, Any]:
    import malla

    from soak import rss_kib

    target, port = await spawn_target(cfg, log)
    legit = malla.Node("legit", port=0, cookie=COOKIE, seeds=[f"127.0.0.1:{port}"],
                       heartbeat_timeout=10.0)
    try:
        await legit.start()
        assert await legit.wait_for_services(["Echo", "Probe_a"], retries=20)
        replay = await record_handshake(port)
        idle: list[float] = []
        await keep_calling(legit, idle, count=cfg.idle_calls)
        before, rss_before = await node_stats(legit), rss_kib(target.pid)
        assert rss_before is not None
        rss_peak, max_pending = rss_before, before["handshakes_pending"]
        stop = asyncio.Event()
        during: list[float] = []
        caller = asyncio.create_task(keep_calling(legit, during, stop))

        async def sample() -> None:
            nonlocal rss_peak, max_pending
            while not stop.is_set():
                rss_peak = max(rss_peak, rss_kib(target.pid) or 0)
                max_pending = max(max_pending, (await node_stats(legit))["handshakes_pending"])
                await asyncio.sleep(cfg.sample_s)

        sampler = asyncio.create_task(sample())
        attacker = await asyncio.create_subprocess_exec(
            sys.executable, os.path.abspath(__file__), str(port), replay.hex(),
            str(cfg.one_address), str(cfg.many), str(cfg.concurrency),
            str(cfg.handshake_timeout + 10.0), stdout=subprocess.PIPE, stderr=log,
            env=dict(os.environ, PYTHONPATH=ROOT))
        if cfg.pin_attacker is not None:
            os.sched_setaffinity(attacker.pid, cfg.pin_attacker)
        out, _ = await attacker.communicate()
        stop.set()
        await asyncio.gather(caller, sampler)
        assert attacker.returncode == 0, attacker.returncode
        tally = json.loads(out)
        # every attacker's connection closed: nothing is pending any more
        deadline = time.monotonic() + cfg.handshake_timeout + 10.0
        while (after := await node_stats(legit))["handshakes_pending"] and \
                time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        rss_after = rss_kib(target.pid)
        # and a call after it all
        assert await legit.remote("Echo", "echo", ["after"], sna_retries=0) == "after"
    finally:
        await legit.stop()
        if target.returncode is None:
            target.terminate()
            await target.wait()
    calls = {"idle": summary(idle), "flood": summary(during)}
    ratio = (calls["flood"]["p99_ms"] / calls["idle"]["p99_ms"]
             if calls["idle"]["p99_ms"] else None)
    return {"config": asdict(cfg), "attacker": tally, "replay_bytes": len(replay),
            "node": {"before": before, "after": after, "max_pending": max_pending},
            "rss_kib": {"before": rss_before, "peak": rss_peak, "after": rss_after},
            "calls": calls, "p99_ratio": round(ratio, 2) if ratio is not None else None}


def run_flood(cfg: FloodConfig, timeout: float = 300.0) -> dict[str, Any]:
    """The scenario on a fresh loop; the attacked node's log goes to a
    temporary file, its last lines shown if it fails."""
    import uvloop

    with tempfile.TemporaryFile() as log:
        try:
            return uvloop.run(asyncio.wait_for(flood_scenario(cfg, log), timeout))
        except BaseException:
            log.seek(0)
            tail = log.read().decode(errors="replace").splitlines()[-30:]
            sys.stderr.write("\n".join(tail) + "\n")
            raise


def format_report(r: dict[str, Any]) -> str:
    a, n, rss, c = r["attacker"], r["node"], r["rss_kib"], r["calls"]
    delta = {k: n["after"][k] - n["before"][k] for k in HANDSHAKE_KEYS[1:]}
    cfg = r["config"]
    pins = (f"attacker on CPU {cfg['pin_attacker']}, nodes on CPU {cfg['pin_nodes']}"
            if cfg["pin_attacker"] is not None else "the three processes sharing the CPUs")
    return "\n".join([
        f"flood: {a['attempts']} attempts ({a['connected']} connected) in {a['seconds']} s "
        f"(the attacker's CPU: {a.get('cpu_s')} s), at most {cfg['concurrency']} open at once "
        f"({pins})",
        "  " + ", ".join(f"{k} {v['attempts']}" for k, v in a["by_kind"].items()),
        f"  replayed handshakes' replies: {a['replay_replies']}",
        f"  node: refused {delta['handshakes_refused']}, throttled "
        f"{delta['handshakes_throttled']}, failed {delta['handshakes_failed']}; "
        f"at most {n['max_pending']} pending (limit {r['config']['max_pending_handshakes']})",
        f"  node RSS: {rss['before'] // 1024} MiB before, peak {rss['peak'] // 1024} MiB "
        f"(+{(rss['peak'] - rss['before']) / 1024:.1f} MiB), after {(rss['after'] or 0) // 1024}"
        " MiB",
        f"  legitimate calls: idle p50 {c['idle']['p50_ms']} ms p99 {c['idle']['p99_ms']} ms "
        f"({c['idle']['count']} calls); during the flood p50 {c['flood']['p50_ms']} ms "
        f"p99 {c['flood']['p99_ms']} ms ({c['flood']['count']} calls)",
        f"  p99 during the flood / idle p99: {r['p99_ratio']}x (target <= 5x)",
    ])


if __name__ == "__main__":
    attacker_main(sys.argv[1:])
