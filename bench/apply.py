"""What applying one peer's record costs a node's discovery table (issue 17,
docs/scale.md "Applying a peer's record"): N records of 3 services each, as
an etcd watch hands them to the nodes of a process (the same objects for
every node), applied to R registries, reading the changed service's call
order after each application (a node calling it).

    python -m bench.apply [--records 1000] [--registries 20]

Prints µs per application (one record, one node), steady state: a first
pass compiles each entry once for the process, the timed pass applies
new records of the same entries to fresh registries.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from malla.registry import Registry


def _entry(function: str) -> dict[str, Any]:
    return {"vsn": "1", "functions": {function: []}, "paused": False, "global": True}


def _records(n: int, entries: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"Malla": entries["Malla"], "Probe": entries["Probe"],
             f"S{i % 8}": entries[f"S{i % 8}"]} for i in range(n)]


def measure(records: int, registries: int) -> float:
    """µs per application."""
    entries = {"Malla": _entry("info"), "Probe": _entry("ping")}
    entries.update({f"S{k}": _entry("ping") for k in range(8)})
    tables = _records(records, entries)
    for _ in range(2):     # (the first pass compiles each entry, once per process)
        nodes = [Registry(f"local-{j}") for j in range(registries)]
        began = time.perf_counter()
        for i, table in enumerate(tables):
            peer, service = f"peer-{i}", f"S{i % 8}"
            for registry in nodes:
                registry.apply_table(peer, table)
                registry.nodes(service)
        took = time.perf_counter() - began
    return took / (records * registries) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.apply")
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--registries", type=int, default=20)
    args = parser.parse_args()
    print(f"{measure(args.records, args.registries):.1f} µs per application "
          f"({args.records} records x {args.registries} registries)")


if __name__ == "__main__":
    main()
