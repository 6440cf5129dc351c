"""The systems under test: where each lives and what it can do."""

from __future__ import annotations

from dataclasses import dataclass

# The scenarios every system can run: plain calls through ``connect``.
COMMON_SCENARIOS = frozenset(
    {"seq", "inflight128", "payload_1k", "payload_64k", "payload_1m", "clients16", "memory_idle"}
)
# The common scenarios that are load (timed calls, no Python connection object).
LOAD_SCENARIOS = COMMON_SCENARIOS - {"memory_idle"}


@dataclass(frozen=True)
class System:
    name: str
    module: str  # imported in the child processes only
    package: str  # distribution name (or tool), for its version in the report
    # Attributes the module must have after import; a missing one makes the
    # system "missing" (malla's API is still being written).
    required_attrs: tuple[str, ...] = ()
    # The common scenarios it runs: all of them, unless it cannot do some.
    common_scenarios: frozenset[str] = COMMON_SCENARIOS
    # Scenarios beyond the common ones that every system runs.
    extra_scenarios: frozenset[str] = frozenset()


SYSTEMS: dict[str, System] = {
    s.name: s
    for s in [
        System("floor", "bench.floor", "msgpack"),
        # A C program, not a Python one: no idle client (memory_idle's
        # client holds connections through a Python connect()).
        System("cfloor", "bench.cfloor_sys", "cc", common_scenarios=LOAD_SCENARIOS),
        System("grpc", "bench.peers_grpc", "grpcio"),
        System("pyro5", "bench.peers_pyro5", "Pyro5"),
        System("rpyc", "bench.peers_rpyc", "rpyc"),
        System(
            "malla",
            "bench.malla_sys",
            "malla",
            required_attrs=(
                "malla.Node.start",
                "malla.Node.stop",
                "malla.Node.start_service",
                "malla.Node.wait_for_services",
                "malla.Node.get_nodes",
                "malla.Node.remote",
                "malla.Node.call_cb_all",
            ),
            extra_scenarios=frozenset({"fanout8", "inprocess", "memory_inflight"}),
        ),
    ]
}

# The system every figure is divided by.
FLOOR = "floor"
# The C floor: every figure is also given as a ratio to its figure.
CFLOOR = "cfloor"


def supports(system: str, scenario: str) -> bool:
    s = SYSTEMS[system]
    return scenario in s.common_scenarios or scenario in s.extra_scenarios
