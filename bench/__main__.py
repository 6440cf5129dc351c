"""Command line: ``python -m bench [--short] [--systems ...] [--scenarios ...]
[--repeat N] [--json PATH] [--pin MODE] [-v]``.

Prints one table and writes the JSON document (schema in bench/README.md).
The exit status is 0 whenever the harness itself ran: a system that is
missing or failed is reported in its rows' ``status``, not by the exit code.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path
from typing import NoReturn

from bench import runner
from bench.procs import REPO_ROOT
from bench.report import format_table
from bench.scenarios import ALIASES, SCENARIOS
from bench.systems import SYSTEMS

DEFAULT_JSON = REPO_ROOT / "bench" / "results" / "latest.json"
DEFAULT_REPEAT = 5
SHORT_REPEAT = 1


def _names(text: str, known: list[str], aliases: dict[str, list[str]], what: str) -> list[str]:
    """Parse a comma list, expand aliases, keep the canonical order, reject unknowns."""
    wanted: set[str] = set()
    for name in (n.strip() for n in text.split(",") if n.strip()):
        if name in aliases:
            wanted.update(aliases[name])
        elif name in known:
            wanted.add(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {name!r} (known: {', '.join([*known, *aliases])})"
            )
    if not wanted:
        raise argparse.ArgumentTypeError(f"no {what} given")
    return [n for n in known if n in wanted]


def parse_args(argv: list[str]) -> argparse.Namespace:
    systems = list(SYSTEMS)
    scenarios = list(SCENARIOS)
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark malla against a plain-Python floor, a C floor, gRPC, Pyro5 "
        "and rpyc: one run, one table (see bench/README.md).",
    )
    parser.add_argument(
        "--short",
        action="store_true",
        help="small call counts and one repetition: checks the harness in ~1 min",
    )
    parser.add_argument(
        "--systems",
        default=",".join(systems),
        type=lambda t: _names(t, systems, {}, "system"),
        help=f"comma list (default all: {','.join(systems)})",
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(scenarios),
        type=lambda t: _names(t, scenarios, ALIASES, "scenario"),
        help=f"comma list (default all: {','.join(scenarios)}; aliases: {', '.join(ALIASES)})",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=None,
        help=f"repetitions per figure (default {DEFAULT_REPEAT}, {SHORT_REPEAT} with --short)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"where to write the JSON results (default {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--pin",
        choices=runner.PIN_MODES,
        default="same",
        help="CPU placement of a measurement's processes: all on one CPU "
        "(same, default), servers on one and clients on the others "
        "(split), or unpinned (none)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = SHORT_REPEAT if args.short else DEFAULT_REPEAT
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    # Turn SIGTERM into SystemExit so that the children get killed on the
    # way out (ChildSet.__exit__ and procs' atexit hook).
    raise SystemExit(128 + signum)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(message)s",
        stream=sys.stderr,
    )
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    doc = runner.run(args.systems, args.scenarios, args.repeat, args.short, args.pin)
    doc["meta"]["json_path"] = str(args.json)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(doc, indent=2) + "\n")
    print(format_table(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
