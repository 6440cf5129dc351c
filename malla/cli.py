"""The `malla` command line (also `python -m malla`)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="malla",
        description="malla: remote calls between Python processes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="start a small cluster on loopback, call it, kill a node, "
                                "and watch the calls fail over")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from malla.demo import main as demo_main
        return demo_main()
    _parser().print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
