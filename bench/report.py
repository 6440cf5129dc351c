"""From repetitions to results: medians, spread warnings, ratios, the table."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.systems import CFLOOR, FLOOR

# The figures every result row carries (None where they do not apply).
FIGURES = ("calls_per_s", "p50_us", "p99_us", "mb_per_s", "rss_client_kib", "rss_server_kib")

# Repetitions whose max/min - 1 exceeds this are flagged.
SPREAD_WARNING = 0.10


@dataclass
class Measurement:
    """One repetition of one (system, scenario)."""

    figures: dict[str, float | None]
    extra: dict[str, float | None] = field(default_factory=dict)


def aggregate(
    systems: list[str],
    scenarios: list[str],
    unavailable: dict[str, str | None],
    supported: dict[tuple[str, str], bool],
    outcomes: dict[tuple[str, str], list[Measurement | str]],
) -> list[dict[str, Any]]:
    """One row per requested (system, scenario), in scenario-major order.

    ``unavailable`` maps a system to why it is missing (None if present);
    ``outcomes`` holds each repetition's Measurement or error text.
    """
    rows = [
        _row(
            system,
            scenario,
            unavailable[system],
            supported[system, scenario],
            outcomes.get((system, scenario), []),
        )
        for scenario in scenarios
        for system in systems
    ]
    _add_ratios(rows, FLOOR, "ratio_to_floor")
    _add_ratios(rows, CFLOOR, "ratio_to_cfloor")
    for row in rows:
        _round_floats(row)
    return rows


def _round_floats(obj: dict[str, Any]) -> None:
    # Four significant digits are more than any of these figures can claim.
    for key, value in obj.items():
        if isinstance(value, dict):
            _round_floats(value)
        elif isinstance(value, float):
            obj[key] = float(f"{value:.4g}")


def _row(
    system: str,
    scenario: str,
    missing: str | None,
    supported: bool,
    outcomes: list[Measurement | str],
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "system": system,
        "scenario": scenario,
        **{name: None for name in FIGURES},
        "extra": {},
        "ratio_to_floor": {},
        "ratio_to_cfloor": {},
        "reps": 0,
        "spread": {},
        "warnings": [],
    }
    # n/a first: a scenario a system cannot do is n/a whether or not it is installed.
    if not supported:
        row["status"] = "n/a"
        return row
    if missing is not None:
        row["status"] = f"missing: {_one_line(missing)}"
        return row
    done = [m for m in outcomes if isinstance(m, Measurement)]
    errors = [e for e in outcomes if isinstance(e, str)]
    row["reps"] = len(done)
    for name in FIGURES:
        row[name], spread = _median_and_spread([m.figures.get(name) for m in done])
        if spread is not None:
            row["spread"][name] = spread
    extra_keys = sorted({k for m in done for k in m.extra})
    for key in extra_keys:
        row["extra"][key], spread = _median_and_spread([m.extra.get(key) for m in done])
        if spread is not None:
            row["spread"][key] = spread
    row["warnings"] = [
        f"{name} varies {spread:.0%} across {len(done)} repetitions"
        for name, spread in row["spread"].items()
        if spread > SPREAD_WARNING
    ]
    row["status"] = "ok" if not errors else f"error: {_one_line(errors[0])}"
    return row


def _median_and_spread(values: list[float | None]) -> tuple[float | None, float | None]:
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    median = float(statistics.median(present))
    # max/min - 1 only means something for positive figures (an RSS growth
    # can be zero or negative); one repetition has no spread.
    if len(present) < 2 or min(present) <= 0:
        return median, None
    return median, max(present) / min(present) - 1


def _add_ratios(rows: list[dict[str, Any]], divisor: str, field: str) -> None:
    """``row[field]``: every figure divided by the ``divisor`` system's figure."""
    floors = {r["scenario"]: r for r in rows if r["system"] == divisor}
    for row in rows:
        floor = floors.get(row["scenario"])
        if floor is None:
            continue
        ours = {**{n: row[n] for n in FIGURES}, **row["extra"]}
        theirs = {**{n: floor[n] for n in FIGURES}, **floor["extra"]}
        row[field] = {
            key: value / theirs[key]
            for key, value in ours.items()
            if value is not None and theirs.get(key)
        }


def _one_line(text: str) -> str:
    return " ".join(text.split())


# ---------------------------------------------------------------- table


def _fmt_rate(v: float) -> str:
    return f"{v:,.0f}"


def _fmt_us(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 1000 else f"{v:,.0f}"


def _fmt_mb(v: float) -> str:
    return f"{v:,.1f}" if v >= 1 else f"{v:.3f}"


def _fmt_kib_as_mib(v: float) -> str:
    return f"{v / 1024:,.1f}"


def _fmt_any(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


_COLUMNS: list[tuple[str, str, Callable[[float], str]]] = [
    ("calls/s", "calls_per_s", _fmt_rate),
    ("p50 µs", "p50_us", _fmt_us),
    ("p99 µs", "p99_us", _fmt_us),
    ("MB/s", "mb_per_s", _fmt_mb),
    ("client RSS MiB", "rss_client_kib", _fmt_kib_as_mib),
    ("server RSS MiB", "rss_server_kib", _fmt_kib_as_mib),
]


def _cell(row: dict[str, Any], key: str, fmt: Callable[[float], str]) -> str:
    value = row[key]
    if value is None:
        return "-"
    ratio = row["ratio_to_floor"].get(key)
    if row["system"] == FLOOR or ratio is None:
        return fmt(value)
    return f"{fmt(value)} ×{ratio:.2f}"


def _notes(row: dict[str, Any]) -> str:
    parts = [] if row["status"] == "ok" else [row["status"]]
    for key, value in row["extra"].items():
        if value is not None:
            parts.append(f"{key}={_fmt_any(value)}")
    if row["warnings"]:
        parts.append("(!) spread, see below")
    return "; ".join(parts)


def _grid(titles: list[str], body: list[list[str]]) -> list[str]:
    """Left-aligned scenario and system, right-aligned figures, notes last."""
    widths = [max(len(r[i]) for r in [titles, *body]) for i in range(len(titles) - 1)]

    def line(cells: list[str]) -> str:
        left = [cells[0].ljust(widths[0]), cells[1].ljust(widths[1])]
        nums = [c.rjust(w) for c, w in zip(cells[2:-1], widths[2:], strict=True)]
        return "  ".join([*left, *nums, cells[-1]]).rstrip()

    rule = "-" * (sum(widths) + 2 * len(widths) + len(titles[-1]))
    table = [line(titles), rule]
    for cells in body:
        if cells[0] and len(table) > 2:
            table.append("")
        table.append(line(cells))
    return table


def _cfloor_table(results: list[dict[str, Any]]) -> list[str]:
    """Every system's figures as ratios to the C floor's (none without it)."""
    body: list[list[str]] = []
    for scenario in dict.fromkeys(r["scenario"] for r in results):
        rows = [
            r
            for r in results
            if r["scenario"] == scenario and r["system"] != CFLOOR and r["ratio_to_cfloor"]
        ]
        for i, row in enumerate(rows):
            ratios = row["ratio_to_cfloor"]
            cells = [f"×{ratios[key]:.2f}" if key in ratios else "-" for _, key, _ in _COLUMNS]
            body.append([scenario if i == 0 else "", row["system"], *cells, ""])
    if not body:
        return []
    titles = ["scenario", "system", *(c[0] for c in _COLUMNS), ""]
    return [
        "",
        f"vs the C floor ({CFLOOR}, bench/cfloor/cfloor.c): ×c = figure / the C floor's, "
        "same scenario, same run",
        "",
        *_grid(titles, body),
    ]


def format_table(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    header = [
        (
            f"machine: {meta['machine']['cpu']} ({meta['machine']['cores']} cores), "
            f"{meta['machine']['platform']}"
        ),
        f"python: {meta['python']}; {versions}",
        (
            f"git commit: {meta['git_commit']}; repeat {meta['repeat']}"
            f"{' (--short)' if meta['short'] else ''}; pinning {meta['pin']['mode']}; "
            f"medians shown; run took {meta['duration_s']:.0f} s"
        ),
        "×r = ratio to floor (calls/s, MB/s: higher is better; µs, RSS: lower is better)",
        "",
    ]
    titles = ["scenario", "system", *(c[0] for c in _COLUMNS), "status / notes"]
    body: list[list[str]] = []
    for scenario in dict.fromkeys(r["scenario"] for r in doc["results"]):
        rows = [r for r in doc["results"] if r["scenario"] == scenario]
        first = True
        for row in rows:
            if row["status"] == "n/a":
                continue  # gathered into one line below
            cells = (
                [_cell(row, key, fmt) for _, key, fmt in _COLUMNS]
                if row["status"] == "ok" or row["status"].startswith("error")
                else [""] * len(_COLUMNS)
            )
            body.append([scenario if first else "", row["system"], *cells, _notes(row)])
            first = False
        not_applicable = [r["system"] for r in rows if r["status"] == "n/a"]
        if not_applicable:
            body.append(
                [
                    scenario if first else "",
                    "-",
                    *[""] * len(_COLUMNS),
                    f"n/a for {', '.join(not_applicable)}",
                ]
            )
    table = _grid(titles, body) + _cfloor_table(doc["results"])
    warned = [r for r in doc["results"] if r["warnings"]]
    footer = [""]
    if warned:
        footer.append("warnings (repetitions disagree by more than 10%):")
        footer += [
            f"  {r['scenario']}/{r['system']}: "
            + ", ".join(f"{k} {v:.0%}" for k, v in r["spread"].items() if v > SPREAD_WARNING)
            for r in warned
        ]
    footer.append(f"json: {meta.get('json_path', '-')}")
    return "\n".join(header + table + footer)
