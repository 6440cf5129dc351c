"""`malla ping NODE [--ready]`: does that node answer its built-in `Malla`
service (malla.builtin)?  Made for Kubernetes exec probes: it dials the
seed and that node only (not the whole cluster, as other client commands
do), makes one call to that node, and is bounded by `--timeout`.

Exit status: 0 it answered (with `--ready`: and every service it should
host is started and not paused); 1 it answered but is not ready; 3 it is
not in the cluster, cannot be reached, or did not answer in time
(DESIGN.md's "did not run" family: nothing ran there); 5 the cluster
cannot be reached at all (from joining, as every client command).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from malla.dns import format_address
from malla.exceptions import DID_NOT_RUN, EXIT_CODES, MallaError
from malla.registry import BUILTIN

__all__ = ["EXIT_NOT_READY", "ping"]

EXIT_NOT_READY = 1
EXIT_NO_ANSWER = EXIT_CODES[DID_NOT_RUN]


def _fail(message: str, code: int) -> int:
    print(f"malla: {message}", file=sys.stderr)
    return code


async def ping(args: argparse.Namespace, join: Callable[[], Awaitable[Any]]) -> int:
    """The command: `join()` gives the connected hidden client node."""
    # a probe is bounded by its timeout: joining too
    args.wait = min(args.wait, args.timeout / 1000.0)
    node = await join()
    try:
        target = args.node
        if target not in node.peers():
            address = node.members().get(target)
            if address is None:
                return _fail(f"node {target} is not in the cluster", EXIT_NO_ANSWER)
            try:
                await node.connect(format_address(*address))
            except (MallaError, OSError) as exc:
                return _fail(f"node {target} cannot be reached: {exc}", EXIT_NO_ANSWER)
        try:
            answer = await node._caller.call_node(target, BUILTIN, "info" if args.ready else "ping",
                                                  timeout=args.timeout)
        except MallaError as exc:
            return _fail(f"node {target} did not answer: {type(exc).__name__}: {exc}",
                         EXIT_NO_ANSWER)
    finally:
        await node.stop()
    if not args.ready:
        print(f"{target}: alive")
        return 0
    missing = {s: state for s, state in answer["expected"].items() if state != "running"}
    if not answer["ready"] or missing:
        return _fail(f"node {target} is not ready: " +
                     ", ".join(f"{s} {state}" for s, state in sorted(missing.items())),
                     EXIT_NOT_READY)
    print(f"{target}: ready ({', '.join(answer['expected']) or 'no services expected'})")
    return 0
