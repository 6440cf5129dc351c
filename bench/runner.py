"""Orchestration: probe the systems, run every measurement, round-robin.

Repetitions are the outer loop and systems the inner one, rotated each
repetition, so that slow drifts of the machine (heat, other load) spread
over all systems instead of favouring whichever runs first.  Each
measurement starts fresh server and client processes and ends them all.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from bench import report, sysinfo
from bench.measure import merged_percentile
from bench.procs import REPO_ROOT, Child, ChildError, ChildSet
from bench.report import Measurement
from bench.scenarios import SCENARIOS, Scenario
from bench.systems import supports

log = logging.getLogger("bench")

# Seconds allowed beyond a measurement's own time bound: process start-up
# (16 clients importing grpc on 2 cores), connection set-up, reporting.
_START_TIMEOUT_S = 60.0
_SLACK_S = 60.0
_MEMORY_TIMEOUT_S = 600.0


PIN_MODES = ("same", "split", "none")


@dataclass(frozen=True)
class Placement:
    """Which CPUs servers and clients may run on (None: wherever the OS likes).

    Left to itself, the scheduler sometimes puts a client and its server on
    one core and sometimes on two, and on a VM a cross-core wake-up alone can
    add tens of microseconds (and milliseconds at p99) to a round trip: the
    figures then flip between runs.  So by default ("same") every process of
    a measurement shares one CPU: each figure is then the CPU cost of the
    system, the same placement for every system and run, and the other CPUs
    are left to the OS and the parent.  "split" puts servers on one CPU and
    clients on the others (parallel, but exposed to wake-up latency);
    "none" does not pin.
    """

    server: list[int] | None
    client: list[int] | None

    @classmethod
    def make(cls, mode: str) -> Placement:
        # The last CPU: the first one usually takes more of the interrupts.
        cpus = sorted(os.sched_getaffinity(0))
        if mode == "none":
            return cls(None, None)
        if mode == "same" or len(cpus) < 2:
            return cls(cpus[-1:], cpus[-1:])
        return cls(cpus[-1:], cpus[:-1])


def run(
    systems: list[str], scenarios: list[str], repeat: int, short: bool, pin: str = "same"
) -> dict[str, Any]:
    """Run everything; return the JSON document (see bench/README.md)."""
    placement = Placement.make(pin)
    started = time.monotonic()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    unavailable = probe(systems)
    supported = {(sy, sc): supports(sy, sc) for sy in systems for sc in scenarios}
    # One cookie per run: malla nodes of this run trust each other only.
    cookie = secrets.token_hex(16)
    outcomes: dict[tuple[str, str], list[Measurement | str]] = {}
    runnable = [s for s in systems if unavailable[s] is None]
    for rep in range(repeat):
        shift = rep % len(runnable) if runnable else 0
        order = runnable[shift:] + runnable[:shift]
        for scenario in scenarios:
            for system in order:
                if not supported[system, scenario]:
                    continue
                t0 = time.monotonic()
                try:
                    outcome: Measurement | str = measure(
                        system, SCENARIOS[scenario], short, cookie, placement
                    )
                except ChildError as exc:  # a child failed: this row's "error: ..."
                    outcome = str(exc)
                except Exception as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                log.info(
                    "rep %d/%d  %-16s %-6s %5.1f s",
                    rep + 1,
                    repeat,
                    scenario,
                    system,
                    time.monotonic() - t0,
                )
                outcomes.setdefault((system, scenario), []).append(outcome)
    results = report.aggregate(systems, scenarios, unavailable, supported, outcomes)
    meta = {
        **sysinfo.collect(REPO_ROOT),
        "started_at": started_at,
        "duration_s": round(time.monotonic() - started, 1),
        "repeat": repeat,
        "short": short,
        "pin": {"mode": pin, "server_cpus": placement.server, "client_cpus": placement.client},
        "systems": systems,
        "scenarios": scenarios,
        "params": {name: SCENARIOS[name].params(short) for name in scenarios},
    }
    return {"meta": meta, "results": results}


def probe(systems: list[str]) -> dict[str, str | None]:
    """Import each system in a child process: None if it works, else why not."""
    with ChildSet() as children:
        probes = {s: children.start({"role": "probe", "system": s}, f"{s} probe") for s in systems}
        verdict: dict[str, str | None] = {}
        for system, child in probes.items():
            try:
                answer = child.expect("probe", _START_TIMEOUT_S)
                verdict[system] = None if answer["ok"] else answer["reason"]
            except ChildError as exc:
                verdict[system] = str(exc)
    return verdict


def measure(
    system: str, scenario: Scenario, short: bool, cookie: str, placement: Placement
) -> Measurement:
    """One repetition of one (system, scenario), in fresh processes."""
    params: dict[str, Any] = {**scenario.params(short), "cookie": cookie}
    with ChildSet() as children:
        servers = [
            children.start(
                {
                    "role": "server",
                    "system": system,
                    "params": {**params, "index": i},
                    "cpus": placement.server,
                },
                f"{system} server {i}",
            )
            for i in range(scenario.servers)
        ]
        clients = _Clients(children, system, params, placement.client)
        ports = [s.expect("ready", _START_TIMEOUT_S)["port"] for s in servers]
        params["ports"] = ports
        params["port"] = ports[0] if ports else None
        if scenario.kind == "load":
            return _measure_load(clients, scenario, params, servers)
        if scenario.kind == "idle":
            return _measure_idle(clients, params, servers)
        if scenario.kind == "custom":
            return _measure_custom(clients, scenario, params, servers)
        raise ValueError(f"unknown scenario kind {scenario.kind!r}")


@dataclass
class _Clients:
    """Starts the client processes of one measurement."""

    children: ChildSet
    system: str
    params: dict[str, Any]
    cpus: list[int] | None

    def start(self, mode: str, label: str) -> Child:
        return self._start(self.system, mode, f"{self.system} {label}")

    def start_tasks_baseline(self) -> Child:
        # Not a system's client: bare asyncio, the reference of memory_inflight.
        return self._start(None, "tasks_baseline", "asyncio tasks baseline")

    def _start(self, system: str | None, mode: str, label: str) -> Child:
        spec = {
            "role": "client",
            "system": system,
            "mode": mode,
            "params": self.params,
            "cpus": self.cpus,
        }
        return self.children.start(spec, label)


def _server_peak_kib(servers: list[Child]) -> float | None:
    peaks = [s.ask_rss()["peak_kib"] for s in servers]
    return max(peaks) if peaks else None


def _call_figures(
    results: list[dict[str, Any]], payload_size: int | None
) -> dict[str, float | None]:
    """calls/s (summed over clients), merged p50/p99, MB/s of payload."""
    rate = sum(r["calls"] / r["elapsed_s"] for r in results if r["elapsed_s"] > 0)
    sketches = [(r["calls"], r["sketch_ns"]) for r in results]
    p50 = merged_percentile(sketches, 0.50)
    p99 = merged_percentile(sketches, 0.99)
    return {
        "calls_per_s": rate,
        "p50_us": p50 / 1000 if p50 is not None else None,
        "p99_us": p99 / 1000 if p99 is not None else None,
        # Payload bytes per second, counted once per call (the echo carries
        # them both ways).
        "mb_per_s": rate * payload_size / 1e6 if payload_size is not None else None,
    }


def _measure_load(
    starter: _Clients, scenario: Scenario, params: dict[str, Any], servers: list[Child]
) -> Measurement:
    clients = [starter.start("load", f"client {i}") for i in range(scenario.clients)]
    # All clients connect and warm up first; then they measure together, so
    # clients16's aggregate is over one common window.
    for c in clients:
        c.expect("ready", _START_TIMEOUT_S + params["max_seconds"])
    for c in clients:
        c.send("go")
    results = [c.expect("result", params["max_seconds"] + _SLACK_S) for c in clients]
    figures = _call_figures(results, scenario.payload_size)
    figures["rss_client_kib"] = max(r["peak_rss_kib"] for r in results)
    figures["rss_server_kib"] = _server_peak_kib(servers)
    return Measurement(figures)


_IDLE_SETTLE_S = 1.0


def _measure_idle(starter: _Clients, params: dict[str, Any], servers: list[Child]) -> Measurement:
    """Server RSS growth per idle connection, before and after one big message each."""
    (server,) = servers
    n = params["conns"]
    client = starter.start("idle", "idle client")
    client.expect("ready", _START_TIMEOUT_S)
    base = server.ask_rss()["current_kib"]
    client.send("open")
    client.expect("opened", _MEMORY_TIMEOUT_S)
    opened = server.ask_rss()["current_kib"]
    client.send("big")
    result = client.expect("result", _MEMORY_TIMEOUT_S)
    # "idle after a large message": let every system be idle for a second
    # (malla gives grown buffers back after half a second without any)
    time.sleep(_IDLE_SETTLE_S)
    after = server.ask_rss()
    extra: dict[str, float | None] = {}
    if base is not None and opened is not None and after["current_kib"] is not None:
        extra["kib_per_conn"] = (opened - base) / n
        extra["kib_per_conn_after_8mib"] = (after["current_kib"] - base) / n
    figures: dict[str, float | None] = {
        "rss_client_kib": result["peak_rss_kib"],
        "rss_server_kib": after["peak_kib"],
    }
    return Measurement(figures, extra)


def _measure_custom(
    starter: _Clients, scenario: Scenario, params: dict[str, Any], servers: list[Child]
) -> Measurement:
    """A system's own client routine (malla: fanout8, inprocess, memory_inflight)."""
    client = starter.start("custom", f"{scenario.name} client")
    if "max_seconds" in params:
        # Up to four timed loops (fanout8), each with a warm-up as long.
        timeout = 4 * 2 * params["max_seconds"] + _SLACK_S
    else:
        timeout = _MEMORY_TIMEOUT_S
    result = client.expect("result", timeout)
    figures: dict[str, float | None] = (
        _call_figures([result], None) if "sketch_ns" in result else {}
    )
    figures["rss_client_kib"] = result["peak_rss_kib"]
    figures["rss_server_kib"] = _server_peak_kib(servers)
    extra: dict[str, float | None] = dict(result.get("extra", {}))
    if scenario.tasks_baseline:
        # Measured in its own fresh process, after the system's client is
        # done, so that neither reuses memory the other freed.
        baseline = starter.start_tasks_baseline()
        per_task = baseline.expect("result", _MEMORY_TIMEOUT_S)["extra"]["bytes_per_task"]
        extra["tasks_bytes_per_task"] = per_task
        per_call = extra.get("bytes_per_call")
        extra["ratio_to_tasks"] = per_call / per_task if per_call is not None and per_task else None
    return Measurement(figures, extra)
