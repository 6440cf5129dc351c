"""The soak: many calls at high concurrency across subprocess nodes while
nodes are killed (-9) and restarted, stopped (SIGSTOP/SIGCONT), stopped
cleanly (SIGTERM) and restarted and, in network namespaces, cut off and
healed.

    python tests/soak.py --calls N --nodes K --concurrency C [--netns] [--json PATH]

K subprocess nodes (tests/nodeproc.py --ledger DIR: h1 is the seed and is
never faulted) host Ledger and Ledger_<name>.  Every function of Ledger
appends the call's id to DIR/<name>.ids with os.write on an O_APPEND fd
*before* it returns, so "ran" is on disk before a reply can leave, and it
survives kill -9.  This process runs one client node and C tasks calling
with deadline= and excp_retries=0, each call with a unique id, and keeps one
byte of outcome per id.  At the end the ledgers are read back and checked
against the outcomes:

* no id ran twice (excp_retries=0: a call executes at most once);
* every call answered ok ran exactly once, on the node that answered, and
  its answer is the right one for its id;
* every call answered "did not run" (ServiceNotAvailable, UnknownFunction,
  EncodeError, MessageTooLarge) is in no ledger; every RemoteError ran;
* every outcome is one its kind of call allows (no misclassification);
* no call outlived its deadline by more than `hang_slack_s` (the watchdog
  cancels one past deadline + 10 s and counts it hung);
* each fault kind was injected at least `min_each_fault` times, the client
  saw a faulted node go (at least once per kind), and each came back (a
  restarted one as a new incarnation);
* resident memory (client and the servers never restarted) grew less than
  `max_rss_growth_mib` between the end of the warm-up and the end.

`run_soak(SoakConfig(...))` returns the report (a dict); `failures(report)`
lists what broke.  The call mix (shared Ledger with failover, calls targeted
at one node, coroutines with think time, deadline sleepers, raising calls,
unknown functions, unencodable arguments, messages too large for the client
or for the server) is `SoakConfig.mix`.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import bisect
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for _p in (ROOT, HERE):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import uvloop

import malla

from netns import Topology

NODEPROC = os.path.join(HERE, "nodeproc.py")
COOKIE = "soak-cookie-0123456789abcdef"

# Kinds of call (one byte per call id).
(K_RUN, K_RUN_T, K_ARUN, K_ARUN_T, K_SLEEPER, K_BOOM, K_NOPE, K_ENCODE, K_MTL_C, K_MTL_S,
 K_BIG) = range(11)
KIND_NAMES = ["run", "run_targeted", "arun", "arun_targeted", "sleeper", "boom", "nope",
              "encode", "too_large_client", "too_large_server", "multi_frame"]

# Outcomes (one byte per call id).
(O_NONE, O_OK, O_WRONG, O_SNA, O_UNKNOWN, O_ENCODE, O_MTL, O_TIMEOUT, O_LOST, O_REMOTE,
 O_HUNG, O_OTHER) = range(12)
OUTCOME_NAMES = ["unissued", "ok", "wrong_answer", "ServiceNotAvailable", "UnknownFunction",
                 "EncodeError", "MessageTooLarge", "CallTimeout", "ConnectionLost",
                 "RemoteError", "hung", "other_exception"]
NOT_RUN = {O_SNA, O_UNKNOWN, O_ENCODE, O_MTL}
MAY_HAVE_RUN = {O_TIMEOUT, O_LOST}

_ROUTED = {O_OK, O_SNA, O_TIMEOUT, O_LOST}
ALLOWED: dict[int, set[int]] = {
    K_RUN: _ROUTED, K_RUN_T: _ROUTED, K_ARUN: _ROUTED, K_ARUN_T: _ROUTED, K_BIG: _ROUTED,
    K_SLEEPER: {O_TIMEOUT, O_LOST, O_SNA},
    K_BOOM: {O_REMOTE, O_SNA, O_TIMEOUT, O_LOST},
    # the client knows Ledger's functions: refused before sending
    K_NOPE: {O_UNKNOWN, O_SNA},
    K_ENCODE: {O_ENCODE, O_SNA},
    K_MTL_C: {O_MTL, O_SNA},
    K_MTL_S: {O_MTL, O_SNA, O_TIMEOUT, O_LOST},
}

# Servers: frames of 64 KiB, messages up to 128 KiB; the client: 1 MiB.
SERVER_MAX_FRAME = 64 << 10
SERVER_MAX_MESSAGE = 128 << 10
CLIENT_MAX_MESSAGE = 1 << 20
PAD_SERVER = b"s" * (200 << 10)      # too large for a server, fine for the client
PAD_BIG = b"b" * (100 << 10)         # fine for both: a message of two 64 KiB frames
PAD_CLIENT = b"c" * (1200 << 10)     # too large for the client itself

HANG_GUARD_S = 10.0   # past deadline + this, the watchdog cancels a call: "hung"

DEFAULT_MIX = {
    "run": 40.0, "run_targeted": 15.0, "arun": 25.0, "arun_targeted": 15.0,
    "sleeper": 0.02, "boom": 1.0, "nope": 1.0, "encode": 0.5,
    "too_large_client": 0.05, "too_large_server": 0.1, "multi_frame": 0.5,
}


@dataclass
class SoakConfig:
    calls: int = 25_000
    nodes: int = 4
    concurrency: int = 64
    netns: bool = False
    deadline_ms: int = 2000
    sna_retries: int = 3
    retries_sleep_msec: int = 200
    faults: tuple[str, ...] = ()          # default: kill9, sigstop, term (+ cut with netns)
    min_each_fault: int = 1                # calls go on past `calls` until each kind ran
    warmup: int = -1                       # calls before faults and the RSS baseline
    think_ms: float = 10.0                 # arun sleeps uniform(0, 2 * think_ms)
    server_max_concurrency: int = 0        # Ledger's max_concurrency (0: the default)
    spared: int = 1                        # h1..h<spared> are never faulted (h1: the seed)
    mix: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    stop_s: float = 1.5                    # SIGSTOP held this long
    cut_s: float = 2.0                     # link down this long
    kill_hold_s: tuple[float, float] = (0.2, 1.0)   # dead this long before the restart
    gap_s: tuple[float, float] = (0.3, 1.0)         # between faults
    rejoin_timeout_s: float = 20.0
    hb_interval: float = 0.2
    hb_timeout: float = 1.0
    hang_slack_s: float = 1.0              # overrun past the deadline counted as a hang
    max_rss_growth_mib: float = 64.0
    seed: int = 0
    keep_dir: bool = False
    progress: bool = False

    def __post_init__(self) -> None:
        if not self.faults:
            self.faults = ("kill9", "sigstop", "term") + (("cut",) if self.netns else ())
        if ("cut" in self.faults or "cutkill" in self.faults) and not self.netns:
            raise ValueError("the 'cut' and 'cutkill' faults need --netns")
        if self.warmup < 0:
            self.warmup = min(max(self.calls // 10, 1000), 20_000)
        if self.spared < 1 or self.nodes <= self.spared:
            raise ValueError("the soak needs nodes > spared >= 1 (h1, the seed, is never faulted)")
        if self.seed == 0:
            self.seed = random.randrange(1, 1 << 30)


def rss_kib(pid: int | str = "self") -> int | None:
    """Current resident set size of a process, KiB (None when gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    k = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[k]


class Cluster:
    """h1..hK as subprocesses of tests/nodeproc.py, on loopback or each in
    its own network namespace (then this process sits on the bridge)."""

    def __init__(self, cfg: SoakConfig, workdir: str, topo: Topology | None) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.topo = topo
        self.names = [f"h{i + 1}" for i in range(cfg.nodes)]
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.ports: dict[str, int] = {}
        self.starts: dict[str, int] = {n: 0 for n in self.names}

    def host(self, name: str) -> str:
        return self.topo.addr(name) if self.topo else "127.0.0.1"

    @property
    def client_host(self) -> str:
        return self.topo.gateway if self.topo else "127.0.0.1"

    def seed(self) -> str:
        return f"{self.host('h1')}:{self.ports['h1']}"

    def pid(self, name: str) -> int:
        return self.procs[name].pid

    def spawn(self, name: str, port: int = 0) -> None:
        """Start (or restart, same name and port) one node; blocks until READY."""
        cfg = self.cfg
        argv = [sys.executable, NODEPROC, name, "--host", self.host(name), "--port", str(port),
                "--hb-interval", str(cfg.hb_interval), "--hb-timeout", str(cfg.hb_timeout),
                "--check", "1.0", "--no-echo", "--ledger", self.workdir,
                "--max-frame-size", str(SERVER_MAX_FRAME),
                "--max-message-size", str(SERVER_MAX_MESSAGE)]
        if cfg.server_max_concurrency:
            argv += ["--ledger-max-concurrency", str(cfg.server_max_concurrency)]
        if name != "h1":
            argv += ["--seed", self.seed()]
        env = dict(os.environ, MALLA_COOKIE=COOKIE, PYTHONPATH=ROOT)
        with open(os.path.join(self.workdir, f"{name}.log"), "ab") as log:
            kw: dict[str, Any] = dict(stdout=subprocess.PIPE, stderr=log, env=env, text=True)
            for attempt in range(5):
                proc = (self.topo.run(name, argv, **kw) if self.topo
                        else subprocess.Popen(argv, **kw))
                assert proc.stdout is not None
                line = proc.stdout.readline()
                if line.startswith("READY "):
                    break
                proc.kill()
                proc.wait()
                if attempt == 4:
                    raise RuntimeError(f"{name} did not start: {line!r} (see {log.name})")
                time.sleep(0.2)   # the port may not be free yet
        self.procs[name] = proc
        self.ports[name] = int(line.split()[1])
        self.starts[name] += 1

    def kill9(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()

    def term(self, name: str) -> None:
        """SIGTERM: the node stops cleanly (goodbye, connections closed) and exits."""
        proc = self.procs[name]
        proc.terminate()
        try:
            proc.wait(10.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"{name} did not exit within 10 s of SIGTERM") from None
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGCONT)
                    proc.terminate()
        end = time.monotonic() + 5.0
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


class Soak:
    def __init__(self, cfg: SoakConfig, cluster: Cluster) -> None:
        self.cfg = cfg
        self.cluster = cluster
        self.rng = random.Random(cfg.seed)
        names = list(cfg.mix)
        unknown = set(names) - set(KIND_NAMES)
        if unknown:
            raise ValueError(f"unknown kinds of call in the mix: {sorted(unknown)}")
        self._mix_kinds = [KIND_NAMES.index(n) for n in names if cfg.mix[n] > 0]
        acc, cum = 0.0, []
        for n in names:
            if cfg.mix[n] > 0:
                acc += cfg.mix[n]
                cum.append(acc)
        self._mix_cum = [c / acc for c in cum]
        self.node_index = {n: i + 1 for i, n in enumerate(cluster.names)}
        cap = cfg.calls + 1024
        self.kinds = bytearray(cap)
        self.outcome = bytearray(cap)
        self.who = bytearray(cap)                    # node index that answered ok
        self.lat = array.array("f", bytes(4 * cap))  # seconds
        self.issued = 0
        self.phase_end = 0
        self.extend = False
        self.samples: dict[str, list[str]] = {}
        self.fault_counts = {k: 0 for k in cfg.faults}
        self.fault_observed = {k: 0 for k in cfg.faults}
        self.fault_log: list[dict[str, Any]] = []
        self.injector_errors: list[str] = []
        self.stop_faults = asyncio.Event()
        self.faulted: str | None = None
        self.rss_client_max = 0
        self.loop_lag = array.array("f")
        self.node: malla.Node | None = None
        self.t_start = time.monotonic()
        self.client_cpu = 0.0

    # -- ids and calls -------------------------------------------------------

    def _grow(self, need: int) -> None:
        extra = max(need - len(self.kinds), 4096)
        self.kinds.extend(bytes(extra))
        self.outcome.extend(bytes(extra))
        self.who.extend(bytes(extra))
        self.lat.frombytes(bytes(4 * extra))

    def _next_id(self) -> int:
        i = self.issued
        if i >= self.phase_end:
            if not self.extend or self._faults_done():
                return -1
        if i >= len(self.kinds):
            self._grow(i + 1)
        self.issued = i + 1
        return i

    def _faults_done(self) -> bool:
        return all(c >= self.cfg.min_each_fault for c in self.fault_counts.values())

    def _request(self, i: int, kind: int) -> tuple[str, str, list[Any]]:
        x = (i * 2654435761) & 0xFFFFFFFF
        rng = self.rng
        if kind == K_RUN:
            return "Ledger", "run", [i, x]
        if kind == K_RUN_T:
            return f"Ledger_{rng.choice(self.cluster.names)}", "run", [i, x]
        if kind == K_ARUN:
            return "Ledger", "arun", [i, x, rng.uniform(0, 2 * self.cfg.think_ms)]
        if kind == K_ARUN_T:
            return (f"Ledger_{rng.choice(self.cluster.names)}", "arun",
                    [i, x, rng.uniform(0, 2 * self.cfg.think_ms)])
        if kind == K_SLEEPER:
            return "Ledger", "arun", [i, x, 3.0 * self.cfg.deadline_ms]
        if kind == K_BOOM:
            return "Ledger", "boom", [i]
        if kind == K_NOPE:
            return "Ledger", "nope", [i]
        if kind == K_ENCODE:
            return "Ledger", "run", [i, x, object()]
        if kind == K_MTL_C:
            return "Ledger", "run", [i, x, PAD_CLIENT]
        if kind == K_BIG:
            return "Ledger", "run", [i, x, PAD_BIG]
        return "Ledger", "run", [i, x, PAD_SERVER]

    def _sample(self, what: str, text: str) -> None:
        got = self.samples.setdefault(what, [])
        if len(got) < 10:
            got.append(text)

    def _check_ok(self, i: int, kind: int, svc: str, result: Any) -> int:
        x = (i * 2654435761) & 0xFFFFFFFF
        if kind not in (K_RUN, K_RUN_T, K_ARUN, K_ARUN_T, K_BIG):
            self._sample("wrong_answer", f"id {i} ({KIND_NAMES[kind]}) answered {result!r:.200}")
            return O_WRONG
        try:
            node, cid, value = result
        except (TypeError, ValueError):
            node = cid = value = None
        idx = self.node_index.get(node) if isinstance(node, str) else None
        if (idx is None or cid != i or value != 2 * x + 1
                or (svc != "Ledger" and svc != f"Ledger_{node}")):
            self._sample("wrong_answer", f"id {i} via {svc} answered {result!r:.200}")
            return O_WRONG
        self.who[i] = idx
        return O_OK

    async def _worker(self, w: int, node: malla.Node, cur: list[float],
                      hung: list[bool]) -> None:
        cfg = self.cfg
        rng = self.rng
        mix_kinds, mix_cum = self._mix_kinds, self._mix_cum
        deadline = cfg.deadline_ms
        mono = time.monotonic
        while True:
            i = self._next_id()
            if i < 0:
                return
            kind = mix_kinds[bisect.bisect_left(mix_cum, rng.random())]
            self.kinds[i] = kind
            svc, fun, args = self._request(i, kind)
            t0 = mono()
            cur[w] = t0
            try:
                result = await node.remote(svc, fun, args, deadline=deadline, excp_retries=0,
                                           sna_retries=cfg.sna_retries,
                                           retries_sleep_msec=cfg.retries_sleep_msec)
                out = self._check_ok(i, kind, svc, result)
            except asyncio.CancelledError:
                if not hung[w]:
                    raise
                hung[w] = False
                task = asyncio.current_task()
                if task is not None and hasattr(task, "uncancel"):
                    task.uncancel()
                out = O_HUNG
                self._sample("hung", f"id {i} ({KIND_NAMES[kind]}) via {svc}.{fun}")
            except malla.ServiceNotAvailable:
                out = O_SNA
            except malla.UnknownFunction:
                out = O_UNKNOWN
            except malla.EncodeError:
                out = O_ENCODE
            except malla.MessageTooLarge:
                out = O_MTL
            except malla.CallTimeout:
                out = O_TIMEOUT
            except malla.ConnectionLost:
                out = O_LOST
            except malla.RemoteError as exc:
                out = O_REMOTE
                if kind == K_BOOM and (exc.exc_type != "builtins.RuntimeError"
                                       or exc.message != f"boom {i}"):
                    out = O_WRONG
                    self._sample("wrong_answer", f"id {i} boom raised {exc!r:.200}")
                elif kind != K_BOOM:
                    self._sample("misclassified", f"id {i} ({KIND_NAMES[kind]}): {exc!r:.300}")
            except Exception as exc:
                out = O_OTHER
                self._sample("other_exception", f"id {i} ({KIND_NAMES[kind]}): {exc!r:.300}")
            cur[w] = 0.0
            self.lat[i] = mono() - t0
            self.outcome[i] = out

    async def _watchdog(self, tasks: list[asyncio.Task[None]], cur: list[float],
                        hung: list[bool]) -> None:
        limit = self.cfg.deadline_ms / 1000.0 + HANG_GUARD_S
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for w, t0 in enumerate(cur):
                if t0 and now - t0 > limit and not hung[w] and not tasks[w].done():
                    hung[w] = True
                    tasks[w].cancel()
            self.rss_client_max = max(self.rss_client_max, rss_kib() or 0)

    async def _lag_monitor(self) -> None:
        """The client loop's lag: how late a 20 ms sleep wakes up (a deadline
        timer is as late as this, whatever malla does)."""
        mono = time.monotonic
        while True:
            t = mono()
            await asyncio.sleep(0.02)
            self.loop_lag.append(mono() - t - 0.02)

    async def _phase(self, node: malla.Node, end: int, extend: bool) -> None:
        self.phase_end = end
        self.extend = extend
        n = self.cfg.concurrency
        cur = [0.0] * n
        hung = [False] * n
        tasks = [asyncio.create_task(self._worker(w, node, cur, hung)) for w in range(n)]
        dog = asyncio.create_task(self._watchdog(tasks, cur, hung))
        try:
            await asyncio.gather(*tasks)
        finally:
            dog.cancel()
            for t in tasks:
                t.cancel()
            await asyncio.gather(dog, *tasks, return_exceptions=True)

    # -- faults -------------------------------------------------------------

    def _pick_target(self) -> str:
        candidates = self.cluster.names[self.cfg.spared:]
        assert self.node is not None
        first = self.node.get_nodes("Ledger")[:1]
        if first and first[0] in candidates and self.rng.random() < 0.5:
            return first[0]   # the node taking the shared calls: failover under fire
        return self.rng.choice(candidates)

    async def _sleep_or_stop(self, seconds: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.stop_faults.wait(), seconds)

    async def _hold(self, name: str, seconds: float) -> bool:
        """Wait `seconds`; True if the client lost `name` meanwhile."""
        assert self.node is not None
        end = time.monotonic() + seconds
        seen = False
        while True:
            if name not in self.node.peers():
                seen = True
            left = end - time.monotonic()
            if left <= 0:
                return seen
            await asyncio.sleep(min(0.05, left))

    async def _injector(self) -> None:
        cfg, cluster = self.cfg, self.cluster
        rng = self.rng
        k = 0
        while not self.stop_faults.is_set():
            kind = cfg.faults[k % len(cfg.faults)]
            k += 1
            target = self._pick_target()
            t0 = time.monotonic()
            rec: dict[str, Any] = {"kind": kind, "node": target,
                                   "at_s": round(t0 - self.t_start, 3)}
            self.faulted = target
            old_inc = self._incarnation(target)
            try:
                if kind == "kill9":
                    await asyncio.to_thread(cluster.kill9, target)
                    seen = await self._hold(target, rng.uniform(*cfg.kill_hold_s))
                    await asyncio.to_thread(cluster.spawn, target, cluster.ports[target])
                elif kind == "term":
                    await asyncio.to_thread(cluster.term, target)
                    seen = await self._hold(target, rng.uniform(*cfg.kill_hold_s))
                    await asyncio.to_thread(cluster.spawn, target, cluster.ports[target])
                elif kind == "sigstop":
                    os.kill(cluster.pid(target), signal.SIGSTOP)
                    try:
                        seen = await self._hold(target, cfg.stop_s)
                    finally:
                        os.kill(cluster.pid(target), signal.SIGCONT)
                elif kind == "cut":
                    assert cluster.topo is not None
                    await asyncio.to_thread(cluster.topo.cut, target)
                    try:
                        seen = await self._hold(target, cfg.cut_s)
                    finally:
                        await asyncio.to_thread(cluster.topo.heal, target)
                elif kind == "cutkill":
                    # Cut off, killed and restarted behind the cut, healed
                    # at once: peers may still hold the old incarnation's
                    # (half-open) connection when the new one says hello.
                    assert cluster.topo is not None
                    await asyncio.to_thread(cluster.topo.cut, target)
                    try:
                        await asyncio.to_thread(cluster.kill9, target)
                        await asyncio.to_thread(cluster.spawn, target, cluster.ports[target])
                        seen = await self._hold(target, 0.1)
                    finally:
                        await asyncio.to_thread(cluster.topo.heal, target)
                else:
                    raise ValueError(f"unknown fault {kind!r}")
                self.fault_counts[kind] += 1
                rec["healed_after_s"] = round(time.monotonic() - t0, 3)
                restarted = kind in ("kill9", "term", "cutkill")
                rejoin = await self._rejoined(target, cfg.rejoin_timeout_s,
                                              old_inc if restarted else None)
                if kind == "cutkill" and rejoin is not None:
                    seen = True   # the client now talks to the new incarnation
                self.fault_observed[kind] += int(seen)
                rec["client_saw_it_go"] = seen
                rec["rejoined_after_s"] = None if rejoin is None else round(rejoin, 3)
                if rejoin is None:
                    self.injector_errors.append(
                        f"{kind} on {target}: not back within {cfg.rejoin_timeout_s} s")
            except Exception as exc:   # counted and reported: the soak fails
                self.injector_errors.append(f"{kind} on {target}: {exc!r}")
                rec["error"] = repr(exc)
            finally:
                self.faulted = None
            self.fault_log.append(rec)
            if cfg.progress:
                print(f"[soak] {self.issued} calls, fault {rec}", file=sys.stderr, flush=True)
            await self._sleep_or_stop(rng.uniform(*cfg.gap_s))

    def _incarnation(self, name: str) -> int | None:
        """The incarnation of `name` the client is connected to."""
        assert self.node is not None
        conn = self.node._cluster.connected.get(name)
        return None if conn is None or conn.peer is None else conn.peer.incarnation

    async def _rejoined(self, name: str, timeout: float,
                        old_inc: int | None = None) -> float | None:
        """Seconds until the client routes to `name` again (None: never);
        with `old_inc`, to another incarnation than that one."""
        assert self.node is not None
        node = self.node
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if (name in node.get_nodes(f"Ledger_{name}") and name in node.get_nodes("Ledger")
                    and (old_inc is None or self._incarnation(name) not in (None, old_inc))):
                return time.monotonic() - t0
            await asyncio.sleep(0.05)
        return None

    # -- the run ---------------------------------------------------------------

    def _server_rss(self) -> dict[str, dict[str, Any]]:
        return {n: {"pid": self.cluster.pid(n), "rss_kib": rss_kib(self.cluster.pid(n))}
                for n in self.cluster.names}

    async def run(self) -> dict[str, Any]:
        cfg, cluster = self.cfg, self.cluster
        self.t_start = time.monotonic()
        for name in cluster.names:
            await asyncio.to_thread(cluster.spawn, name)
        node = malla.Node("soak-client", cookie=COOKIE, host=cluster.client_host, port=0,
                          seeds=[cluster.seed()], heartbeat_interval=cfg.hb_interval,
                          heartbeat_timeout=cfg.hb_timeout, check_interval=1.0,
                          redial_max=0.5, max_message_size=CLIENT_MAX_MESSAGE)
        self.node = node
        await node.start()
        try:
            wanted = ["Ledger"] + [f"Ledger_{n}" for n in cluster.names]
            t0 = time.monotonic()
            while not (all(node.get_nodes(s) for s in wanted)
                       and len(node.get_nodes("Ledger")) == cfg.nodes):
                if time.monotonic() - t0 > 30:
                    raise RuntimeError(f"cluster did not form: {node.get_services()}")
                await asyncio.sleep(0.05)
            setup_s = time.monotonic() - self.t_start

            # Warm-up: no faults; then the memory baseline.
            t_w = time.monotonic()
            await self._phase(node, min(cfg.warmup, cfg.calls), extend=False)
            warmup_s = time.monotonic() - t_w
            rss_client_before = rss_kib()
            servers_before = self._server_rss()
            self.rss_client_max = rss_client_before or 0

            # The soak: calls under faults.
            injector = asyncio.create_task(self._injector())
            lag = asyncio.create_task(self._lag_monitor())
            t_run = time.monotonic()
            cpu0 = time.process_time()
            warm_ids = self.issued
            try:
                await self._phase(node, cfg.calls, extend=True)
            finally:
                run_s = time.monotonic() - t_run
                self.client_cpu = (time.process_time() - cpu0) / run_s if run_s > 0 else 0.0
                self.stop_faults.set()
                lag.cancel()
                await injector
            # Let the last fault heal fully, then the memory at the end.
            for name in cluster.names:
                if await self._rejoined(name, cfg.rejoin_timeout_s) is None:
                    self.injector_errors.append(f"{name} not back at the end")
            await asyncio.sleep(0.5)
            rss_client_after = rss_kib()
            servers_after = self._server_rss()
            stats = node.stats()
        finally:
            await node.stop()
        return self._report(setup_s, warmup_s, run_s, warm_ids, rss_client_before,
                            rss_client_after, servers_before, servers_after, stats)

    # -- the verdict ---------------------------------------------------------------

    def _read_ledgers(self) -> tuple[bytearray, bytearray, dict[str, Any]]:
        n = self.issued
        counts = bytearray(n)
        ran_on = bytearray(n)
        info: dict[str, Any] = {"stray_ids": 0, "torn_files": 0, "records": {}}
        for idx, name in enumerate(self.cluster.names, 1):
            path = os.path.join(self.cluster.workdir, f"{name}.ids")
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                data = b""
            if len(data) % 8:
                info["torn_files"] += 1
                data = data[:len(data) // 8 * 8]
            ids = array.array("Q")
            ids.frombytes(data)
            if sys.byteorder != "little":
                ids.byteswap()
            info["records"][name] = len(ids)
            for cid in ids:
                if cid >= n:
                    info["stray_ids"] += 1
                    self._sample("stray_id", f"{name} ran id {cid}, never issued")
                    continue
                c = counts[cid]
                if c < 255:
                    counts[cid] = c + 1
                ran_on[cid] = idx
        return counts, ran_on, info

    def _report(self, setup_s: float, warmup_s: float, run_s: float, warm_ids: int,
                rss_client_before: int | None, rss_client_after: int | None,
                servers_before: dict[str, dict[str, Any]],
                servers_after: dict[str, dict[str, Any]], stats: dict[str, Any]) -> dict[str, Any]:
        cfg = self.cfg
        n = self.issued
        counts, ran_on, ledger = self._read_ledgers()
        names = self.cluster.names
        outcome, kinds, who, lat = self.outcome, self.kinds, self.who, self.lat
        deadline_s = cfg.deadline_ms / 1000.0

        by_outcome = [0] * len(OUTCOME_NAMES)
        by_kind: dict[str, dict[str, int]] = {}
        dup = ok_not_run = ok_wrong_node = notrun_ran = failed_not_run = misclassified = 0
        may_ran = may_not = 0
        over: list[float] = []
        ok_lat: list[float] = []
        all_lat: list[float] = []
        for i in range(n):
            o = outcome[i]
            k = kinds[i]
            c = counts[i]
            by_outcome[o] += 1
            row = by_kind.setdefault(KIND_NAMES[k], {})
            row[OUTCOME_NAMES[o]] = row.get(OUTCOME_NAMES[o], 0) + 1
            el = lat[i]
            all_lat.append(el)
            if o == O_OK:
                ok_lat.append(el)
            if el > deadline_s or o == O_TIMEOUT or o == O_HUNG:
                over.append(el - deadline_s)
            if c > 1:
                dup += 1
                self._sample("duplicate", f"id {i} ({KIND_NAMES[k]}, {OUTCOME_NAMES[o]}) "
                             f"ran {c} times")
            if o == O_OK:
                if c == 0:
                    ok_not_run += 1
                    self._sample("ok_not_run", f"id {i} ({KIND_NAMES[k]}) ok from "
                                 f"{names[who[i] - 1]} but in no ledger")
                elif ran_on[i] != who[i] and c == 1:
                    ok_wrong_node += 1
                    self._sample("ok_wrong_node", f"id {i} answered by {names[who[i] - 1]}, "
                                 f"ran on {names[ran_on[i] - 1]}")
            elif o in NOT_RUN:
                if c:
                    notrun_ran += 1
                    self._sample("not_run_but_ran", f"id {i} ({KIND_NAMES[k]}) "
                                 f"{OUTCOME_NAMES[o]} but ran on {names[ran_on[i] - 1]}")
            elif o == O_REMOTE:
                if c == 0:
                    failed_not_run += 1
                    self._sample("failed_not_run", f"id {i} RemoteError but in no ledger")
            elif o in MAY_HAVE_RUN:
                if c:
                    may_ran += 1
                else:
                    may_not += 1
            if o not in ALLOWED[k]:
                misclassified += 1
                self._sample("misclassified", f"id {i} ({KIND_NAMES[k]}) -> {OUTCOME_NAMES[o]}")
        ok_lat.sort()
        all_lat.sort()
        over.sort()
        lags = sorted(self.loop_lag)

        def ms(v: float | None) -> float | None:
            return None if v is None else round(v * 1000.0, 3)

        def growth(before: int | None, after: int | None) -> float | None:
            if before is None or after is None:
                return None
            return round((after - before) / 1024.0, 1)

        servers = {}
        for name in names:
            b, a = servers_before[name], servers_after[name]
            same = b["pid"] == a["pid"]
            servers[name] = {"rss_before_kib": b["rss_kib"], "rss_after_kib": a["rss_kib"],
                             "restarted": not same, "starts": self.cluster.starts[name],
                             "growth_mib": growth(b["rss_kib"], a["rss_kib"]) if same else None}
        total_s = run_s + warmup_s
        report: dict[str, Any] = {
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("keep_dir", "progress")},
            "python": sys.version.split()[0],
            "calls": n,
            "warmup_calls": warm_ids,
            "setup_s": round(setup_s, 2),
            "warmup_s": round(warmup_s, 2),
            "run_s": round(run_s, 2),
            "calls_per_s": round(n / total_s, 1) if total_s > 0 else None,
            "client_cpu_percent": round(100.0 * self.client_cpu, 1),
            "outcomes": {OUTCOME_NAMES[o]: c for o, c in enumerate(by_outcome) if c},
            "outcomes_by_kind": by_kind,
            "faults": dict(self.fault_counts),
            "faults_seen_by_client": dict(self.fault_observed),
            "fault_log": self.fault_log,
            "injector_errors": self.injector_errors,
            "latency_ms": {"ok": {"p50": ms(percentile(ok_lat, 0.5)),
                                  "p99": ms(percentile(ok_lat, 0.99)),
                                  "p100": ms(ok_lat[-1] if ok_lat else None)},
                           "all": {"p50": ms(percentile(all_lat, 0.5)),
                                   "p99": ms(percentile(all_lat, 0.99)),
                                   "p100": ms(all_lat[-1] if all_lat else None)}},
            "deadline_overrun_ms": {"count": len(over), "p50": ms(percentile(over, 0.5)),
                                    "p99": ms(percentile(over, 0.99)),
                                    "p100": ms(over[-1]) if over else None},
            "client_loop_lag_ms": {"p50": ms(percentile(lags, 0.5)),
                                   "p99": ms(percentile(lags, 0.99)),
                                   "p100": ms(lags[-1] if lags else None)},
            "checks": {
                "duplicate_executions": dup,
                "ok_but_not_run": ok_not_run,
                "ok_but_ran_elsewhere": ok_wrong_node,
                "not_run_but_ran": notrun_ran,
                "remote_error_but_not_run": failed_not_run,
                "wrong_answers": by_outcome[O_WRONG],
                "misclassified": misclassified,
                "other_exceptions": by_outcome[O_OTHER],
                "hung": by_outcome[O_HUNG],
                "stray_ids": ledger["stray_ids"],
                "torn_ledgers": ledger["torn_files"],
            },
            "may_have_run": {"ran": may_ran, "did_not_run": may_not},
            "ledger_records": ledger["records"],
            "rss": {"client": {"before_kib": rss_client_before, "after_kib": rss_client_after,
                               "max_kib": self.rss_client_max,
                               "growth_mib": growth(rss_client_before, rss_client_after)},
                    "servers": servers},
            "client_stats": {k: stats[k] for k in ("errors", "retries", "failovers")},
            "samples": self.samples,
            "workdir": self.cluster.workdir,
        }
        report["failures"] = failures(report)
        return report


def failures(report: dict[str, Any]) -> list[str]:
    """What the soak found wrong (empty: passed)."""
    cfg = report["config"]
    out = [f"{name}: {count}" for name, count in report["checks"].items() if count]
    for kind, count in report["faults"].items():
        if count < cfg["min_each_fault"]:
            out.append(f"fault {kind} injected {count} times (< {cfg['min_each_fault']})")
        seen = report["faults_seen_by_client"][kind]
        if count and not seen:
            # a fault that never took the node out of the client's view
            # was not really injected (a stall shorter than the heartbeat
            # timeout, say); once is enough: timing is not asserted
            out.append(f"fault {kind}: the client never saw the node go ({count} faults)")
    out += [f"injector: {e}" for e in report["injector_errors"]]
    limit_ms = cfg["hang_slack_s"] * 1000.0
    if (report["deadline_overrun_ms"]["p100"] or 0.0) > limit_ms:
        out.append(f"deadline overrun p100 {report['deadline_overrun_ms']['p100']} ms "
                   f"> {limit_ms:.0f} ms")
    limit = cfg["max_rss_growth_mib"]
    rss = report["rss"]
    g = rss["client"]["growth_mib"]
    if g is None or g > limit:
        out.append(f"client RSS grew {g} MiB (> {limit})")
    for name, s in rss["servers"].items():
        if s["growth_mib"] is not None and s["growth_mib"] > limit:
            out.append(f"server {name} RSS grew {s['growth_mib']} MiB (> {limit})")
    if report["calls"] < cfg["calls"]:
        out.append(f"only {report['calls']} calls of {cfg['calls']}")
    return out


def format_report(r: dict[str, Any]) -> str:
    cfg = r["config"]
    lines = [
        f"malla soak: {r['calls']} calls ({r['warmup_calls']} warm-up), {cfg['nodes']} nodes"
        f"{' in network namespaces' if cfg['netns'] else ' on loopback'}, "
        f"concurrency {cfg['concurrency']}, deadline {cfg['deadline_ms']} ms, "
        f"seed {cfg['seed']}",
        f"  time: setup {r['setup_s']} s, warm-up {r['warmup_s']} s, run {r['run_s']} s; "
        f"{r['calls_per_s']} calls/s (client CPU {r['client_cpu_percent']} % of a core)",
        "  outcomes: " + ", ".join(f"{k} {v}" for k, v in r["outcomes"].items()),
        f"  may have run: ran {r['may_have_run']['ran']}, "
        f"did not {r['may_have_run']['did_not_run']}",
        "  faults injected: " + ", ".join(
            f"{k} {v} (client saw {r['faults_seen_by_client'][k]})"
            for k, v in r["faults"].items()),
    ]
    rejoins = [f["rejoined_after_s"] for f in r["fault_log"]
               if f.get("rejoined_after_s") is not None]
    if rejoins:
        lines.append(f"  rejoined after heal: max {max(rejoins):.2f} s, "
                     f"mean {sum(rejoins) / len(rejoins):.2f} s")
    st = r["client_stats"]
    lines.append(f"  client node: {st['failovers']} failovers, {st['retries']} retry rounds")
    lat = r["latency_ms"]
    lines.append(f"  latency ok (ms): p50 {lat['ok']['p50']}, p99 {lat['ok']['p99']}, "
                 f"p100 {lat['ok']['p100']}; all: p50 {lat['all']['p50']}, "
                 f"p99 {lat['all']['p99']}, p100 {lat['all']['p100']}")
    ov = r["deadline_overrun_ms"]
    lines.append(f"  deadline overrun (ms, {ov['count']} calls at/past the deadline): "
                 f"p50 {ov['p50']}, p99 {ov['p99']}, p100 {ov['p100']} (target < 50)")
    lag = r["client_loop_lag_ms"]
    lines.append(f"  client loop lag (ms): p50 {lag['p50']}, p99 {lag['p99']}, p100 {lag['p100']}")
    c = r["rss"]["client"]
    lines.append(f"  RSS client: {c['before_kib']} -> {c['after_kib']} KiB "
                 f"(growth {c['growth_mib']} MiB, max {c['max_kib']} KiB)")
    for name, s in r["rss"]["servers"].items():
        extra = (f"restarted ({s['starts']} starts)" if s["restarted"]
                 else f"growth {s['growth_mib']} MiB")
        lines.append(f"  RSS {name}: {s['rss_before_kib']} -> {s['rss_after_kib']} KiB, {extra}")
    lines.append("  checks: " + ", ".join(f"{k} {v}" for k, v in r["checks"].items()))
    if r["failures"]:
        lines.append("  FAILED: " + "; ".join(r["failures"]))
        for what, texts in r["samples"].items():
            for t in texts:
                lines.append(f"    {what}: {t}")
        lines.append(f"  node logs and ledgers: {r['workdir']}")
    else:
        lines.append("  PASSED")
    return "\n".join(lines)


def run_soak(cfg: SoakConfig) -> dict[str, Any]:
    """Run one soak (its own uvloop loop and cluster) and return the report."""
    workdir = tempfile.mkdtemp(prefix="malla-soak-")
    log = logging.getLogger("malla")
    handler = logging.FileHandler(os.path.join(workdir, "client.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    old_propagate, old_level = log.propagate, log.level
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.INFO)
    report: dict[str, Any] | None = None
    try:
        with contextlib.ExitStack() as stack:
            topo = None
            if cfg.netns:
                topo = stack.enter_context(Topology([f"h{i + 1}" for i in range(cfg.nodes)]))
            cluster = Cluster(cfg, workdir, topo)
            stack.callback(cluster.stop)
            report = uvloop.run(Soak(cfg, cluster).run())
        return report
    finally:
        log.removeHandler(handler)
        handler.close()
        log.propagate = old_propagate
        log.setLevel(old_level)
        if not cfg.keep_dir and report is not None and not report["failures"]:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=25_000)
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--netns", action="store_true", help="each node in its own namespace")
    p.add_argument("--faults", default="", help="comma-separated: kill9,sigstop,term,cut,cutkill")
    p.add_argument("--min-each-fault", type=int, default=1)
    p.add_argument("--deadline-ms", type=int, default=2000)
    p.add_argument("--think-ms", type=float, default=10.0)
    p.add_argument("--warmup", type=int, default=-1)
    p.add_argument("--spared", type=int, default=1, help="h1..hN are never faulted")
    p.add_argument("--server-max-concurrency", type=int, default=0,
                   help="Ledger's max_concurrency on each node (Overloaded: callers fail over)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", default="", help='JSON object overriding kinds\' weights')
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("-v", "--verbose", action="store_true", help="progress on stderr")
    a = p.parse_args(argv)
    mix = dict(DEFAULT_MIX)
    if a.mix:
        mix.update(json.loads(a.mix))
    cfg = SoakConfig(calls=a.calls, nodes=a.nodes, concurrency=a.concurrency, netns=a.netns,
                     faults=tuple(f for f in a.faults.split(",") if f),
                     min_each_fault=a.min_each_fault, deadline_ms=a.deadline_ms,
                     think_ms=a.think_ms, warmup=a.warmup,
                     server_max_concurrency=a.server_max_concurrency, spared=a.spared,
                     seed=a.seed, mix=mix, keep_dir=a.keep, progress=a.verbose)
    report = run_soak(cfg)
    print(format_report(report))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(report, f, indent=2)
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
