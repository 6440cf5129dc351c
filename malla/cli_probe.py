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
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from malla.dns import format_address
from malla.exceptions import DID_NOT_RUN, EXIT_CODES, UNREACHABLE, MallaError
from malla.registry import BUILTIN

__all__ = ["EXIT_NOT_READY", "ping"]

EXIT_NOT_READY = 1
EXIT_NO_ANSWER = EXIT_CODES[DID_NOT_RUN]
EXIT_UNREACHABLE = EXIT_CODES[UNREACHABLE]
# how long the seed's list of members may take to name the target (s)
MEMBERS_WAIT = 1.0


def _fail(message: str, code: int) -> int:
    print(f"malla: {message}", file=sys.stderr)
    return code


async def ping(args: argparse.Namespace, join: Callable[[], Awaitable[Any]]) -> int:
    """The command: `join()` gives the connected hidden client node.  The
    whole of it (joining, dialling the node, the call) is bounded by
    `--timeout`: past it the node did not answer."""
    seconds = args.timeout / 1000.0
    # joining waits no longer than the probe, and neither does a handshake
    args.wait = min(args.wait, seconds)
    args.handshake_timeout = seconds
    joined: list[Any] = []
    try:
        return await asyncio.wait_for(_probe(args, join, joined), seconds)
    except asyncio.TimeoutError:
        if not joined:       # no seed answered: the cluster, not the node
            return _fail(f"cannot join the cluster within {args.timeout} ms", EXIT_UNREACHABLE)
        return _fail(f"node {args.node} did not answer within {args.timeout} ms",
                     EXIT_NO_ANSWER)


async def _probe(args: argparse.Namespace, join: Callable[[], Awaitable[Any]],
                 joined: list[Any]) -> int:
    node = await join()
    joined.append(node)
    try:
        target = args.node
        if target not in node.peers():
            address = await _member(node, target)
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


async def _member(node: Any, name: str) -> Any:
    """`name`'s address once the seed's list of members (PEERS, sent right
    after the handshake) names it; None when it does not within MEMBERS_WAIT
    (or the probe's own timeout, whichever ends first)."""
    end = asyncio.get_running_loop().time() + MEMBERS_WAIT
    while True:
        address = node.members().get(name)
        if address is not None or asyncio.get_running_loop().time() >= end:
            return address
        await asyncio.sleep(0.02)
