"""What each scenario measures, and its budget in a full and a --short run.

Every measurement is bounded twice: by a call count and by a time limit,
whichever comes first (see bench.measure).  ``--short`` shrinks both so the
whole run fits in about a minute on a 2-core machine; its figures are for
checking that the harness works, not for quoting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Scenario:
    name: str
    # How the runner drives it:
    #   load   - server(s) + client processes making timed calls;
    #   idle   - a client opens idle connections, the server reports RSS;
    #   custom - a system's own client routine (malla's fanout8...).
    kind: str
    description: str
    payload_size: int = 16
    concurrency: int = 1  # calls in flight per client process
    clients: int = 1  # client processes
    servers: int = 1  # server processes
    tasks_baseline: bool = False  # also measure bare asyncio tasks (memory_inflight)
    full: dict[str, Any] = field(default_factory=dict)
    short: dict[str, Any] = field(default_factory=dict)

    def params(self, short: bool) -> dict[str, Any]:
        """The parameters every child of this scenario is given."""
        return {
            "scenario": self.name,
            "payload_size": self.payload_size,
            "concurrency": self.concurrency,
            **(self.short if short else self.full),
        }


def _budget(max_calls: int, max_seconds: float, warmup_calls: int) -> dict[str, Any]:
    return {"max_calls": max_calls, "max_seconds": max_seconds, "warmup_calls": warmup_calls}


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "seq",
            "load",
            "sequential round trips, 1 in flight, 16 B (also the 16 B point of the payload series)",
            full=_budget(50_000, 2.0, 1_000),
            short=_budget(20_000, 0.25, 200),
        ),
        Scenario(
            "inflight128",
            "load",
            "128 calls in flight over one client connection (threads+proxies for Pyro5/rpyc), 16 B",
            concurrency=128,
            full=_budget(300_000, 2.0, 5_000),
            short=_budget(100_000, 0.3, 1_000),
        ),
        Scenario(
            "payload_1k",
            "load",
            "sequential round trips, 1 KiB payload",
            payload_size=KIB,
            full=_budget(50_000, 2.0, 500),
            short=_budget(20_000, 0.2, 100),
        ),
        Scenario(
            "payload_64k",
            "load",
            "sequential round trips, 64 KiB payload",
            payload_size=64 * KIB,
            full=_budget(20_000, 2.0, 100),
            short=_budget(5_000, 0.2, 20),
        ),
        Scenario(
            "payload_1m",
            "load",
            "sequential round trips, 1 MiB payload",
            payload_size=MIB,
            full=_budget(2_000, 2.0, 10),
            short=_budget(500, 0.2, 3),
        ),
        Scenario(
            "clients16",
            "load",
            "16 client processes, 1 in flight each, against one server (aggregate calls/s)",
            clients=16,
            full=_budget(50_000, 2.0, 200),
            short=_budget(20_000, 0.3, 20),
        ),
        Scenario(
            "fanout8",
            "custom",
            "call_cb_all over 8 server processes vs 8 sequential calls; "
            "and with a 50 ms handler vs one call",
            servers=8,
            full=_budget(5_000, 2.0, 50),
            short=_budget(2_000, 0.2, 5),
        ),
        Scenario(
            "inprocess",
            "custom",
            "node.remote to a service on the calling node vs awaiting the method directly",
            servers=0,
            full=_budget(50_000, 2.0, 1_000),
            short=_budget(50_000, 0.2, 100),
        ),
        Scenario(
            "memory_inflight",
            "custom",
            "client RSS growth per outstanding call (handler parked on an asyncio.Event), "
            "vs bare asyncio tasks awaiting futures",
            tasks_baseline=True,
            full={"inflight_calls": 100_000},
            short={"inflight_calls": 10_000},
        ),
        Scenario(
            "memory_idle",
            "idle",
            "server RSS growth per idle client connection; again after an 8 MiB message "
            "has passed through each",
            full={"conns": 200, "big_size": 8 * MIB},
            short={"conns": 8, "big_size": 8 * MIB},
        ),
    ]
}

# Names accepted by --scenarios that stand for several scenarios.
ALIASES: dict[str, list[str]] = {
    "payload": ["seq", "payload_1k", "payload_64k", "payload_1m"],
    "memory": ["memory_inflight", "memory_idle"],
}
