"""Draw a benchmark run as a chart for bench/RESULTS.md:
``python -m bench.chart [RESULTS_JSON] [-o bench/results.png]``.

One panel per measure that the harness compares across systems (calls per
second, p50 latency), one group of bars per scenario, one bar per system;
each bar is that system's figure as a ratio to the Python floor of the same
run, so scenarios of very different scales share an axis.  The title names
the commit and machine of the run, as the tables do.  Needs matplotlib (the
bench extra)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.__main__ import DEFAULT_JSON

DEFAULT_PNG = Path(__file__).resolve().parent / "results.png"
# (measure, label, higher is better)
PANELS = [("calls_per_s", "calls/s, × the Python floor (higher is better)"),
          ("p50_us", "p50 latency, × the Python floor (lower is better)")]
ORDER = ["floor", "cfloor", "malla", "grpc", "pyro5", "rpyc"]


def series(doc: dict[str, Any], measure: str) -> tuple[list[str], dict[str, list[float]]]:
    """Scenarios that have `measure` for the floor, and per system its
    ratios to the floor in that order (nan where it was not measured)."""
    ratios: dict[tuple[str, str], float] = {}
    for row in doc["results"]:
        value = (row.get("ratio_to_floor") or {}).get(measure)
        if row.get("status") == "ok" and value is not None:
            ratios[(row["system"], row["scenario"])] = float(value)
    scenarios = [s for s in doc["meta"]["scenarios"] if ("floor", s) in ratios]
    systems = [s for s in ORDER if s in doc["meta"]["systems"]]
    systems += [s for s in doc["meta"]["systems"] if s not in systems]
    return scenarios, {sys_: [ratios.get((sys_, sc), float("nan")) for sc in scenarios]
                       for sys_ in systems}


def draw(doc: dict[str, Any], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")              # no screen: render to a file
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(PANELS), 1, figsize=(10, 4.2 * len(PANELS)))
    for ax, (measure, label) in zip(axes, PANELS, strict=True):
        scenarios, by_system = series(doc, measure)
        width = 0.8 / max(1, len(by_system))
        for i, (system, values) in enumerate(by_system.items()):
            xs = [k + (i - (len(by_system) - 1) / 2) * width for k in range(len(scenarios))]
            ax.bar(xs, values, width, label=system)
        ax.axhline(1.0, color="black", linewidth=0.6)
        ax.set_yscale("log")
        ax.set_xticks(range(len(scenarios)), scenarios, rotation=20)
        ax.set_ylabel(label)
        ax.legend(ncols=len(by_system), fontsize="small")
    meta = doc["meta"]
    fig.suptitle(f"python -m bench at {str(meta.get('git_commit', '?'))[:7]}, "
                 f"{meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
                 f"median of {meta['repeat']}, pin={meta['pin']['mode']}")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chart", description=__doc__)
    parser.add_argument("json", nargs="?", type=Path, default=DEFAULT_JSON)
    parser.add_argument("-o", "--out", type=Path, default=DEFAULT_PNG)
    args = parser.parse_args(argv)
    draw(json.loads(args.json.read_text()), args.out)
    print(f"chart: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
