"""The `malla` command line (also `python -m malla`).

    malla node NAME --service module:Class [--seed host:port] ...
    malla services [--seed host:port] [--json]
    malla call Service.fun ARG... [--seed host:port] [--timeout ms]
    malla ping NODE [--ready] [--seed host:port] [--timeout ms]
    malla top [--once] [--interval s] [--seed host:port]
    malla demo
    malla bench [--seconds S] [--json]

The CLI is a thin shell over the library: argument parsing, a hidden node
for the client commands, output.  A user mistake prints one line and exits
non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import base64
import datetime
import decimal
import importlib
import json
import os
import signal
import sys
import uuid
from typing import Any

import malla
from malla.arguments import signature_from_wire
from malla.dns import DEFAULT_PORT, format_address
from malla.exceptions import DID_NOT_RUN, EXIT_CODES, UNREACHABLE
from malla.handshake import PROTOCOL_VERSION

__all__ = ["main"]

# DESIGN.md's table of error families (malla.exceptions.EXIT_CODES)
EXIT_USAGE, EXIT_ERROR = 2, 1
EXIT_UNREACHABLE = EXIT_CODES[UNREACHABLE]


class UserError(Exception):
    """A mistake or an unreachable cluster: one line, non-zero exit."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.code = code


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="malla",
        description="malla: call functions of services running anywhere in a cluster of "
                    "Python processes.",
        epilog="The cookie (the cluster's shared secret) comes from --cookie-file or the "
               "MALLA_COOKIE environment variable. Try `malla demo` first.")
    parser.add_argument("--version", action="version",
                        version=f"malla {malla.__version__} (protocol {PROTOCOL_VERSION})")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    node = sub.add_parser(
        "node", help="run a node hosting services until SIGTERM/SIGINT (then drain)",
        description="Run a node hosting the given services until SIGTERM or SIGINT, then "
                    "drain: stop advertising, finish calls in flight, leave.",
        epilog="example: malla node storage1 --port 4370 --service myapp.services:Storage "
               "--seed 10.0.0.5:4370")
    node.add_argument("name", help="the node's name, unique in the cluster")
    node.add_argument("--host", default="127.0.0.1", help="address to listen on "
                      "(default 127.0.0.1; 0.0.0.0 for every interface)")
    node.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"port to listen on (default {DEFAULT_PORT}; 0: any free port)")
    node.add_argument("--service", action="append", default=[], metavar="MODULE:CLASS",
                      help="a malla.Service subclass to host (repeatable)")
    node.add_argument("--seed", action="append", default=[], metavar="HOST:PORT",
                      help="a member to join through (repeatable)")
    node.add_argument("--connect", action="append", default=[], metavar="TARGET",
                      help="a DNS target re-resolved periodically: name@domain or an SRV name")
    node.add_argument("--cookie-file", help="file holding the cluster's cookie")
    node.add_argument("--grace", type=float, default=10.0,
                      help="seconds to finish calls in flight when draining (default 10)")

    services = sub.add_parser(
        "services", help="print the cluster's service table",
        description="Join the cluster as a short-lived hidden node and print every service "
                    "with its nodes, version and functions.",
        epilog="example: malla services --seed 127.0.0.1:4370 --json")
    _client_options(services)
    services.add_argument("--json", action="store_true", help="print JSON instead of a table")

    call = sub.add_parser(
        "call", help="call a service's function and print the result as JSON",
        description="Call Service.fun with the given arguments from the shell. Each ARG is "
                    "read as JSON, else as a Python literal (parsed, never evaluated), else "
                    "as a plain string.",
        epilog="example: malla call Calculator.add 1 2 --seed 127.0.0.1:4370")
    call.add_argument("target", metavar="Service.fun")
    call.add_argument("args", nargs="*", metavar="ARG")
    call.add_argument("--kwargs", default=None, metavar="JSON",
                      help='keyword arguments as a JSON object, e.g. \'{"full": true}\'')
    call.add_argument("--timeout", type=int, default=15000, help="ms (default 15000)")
    _client_options(call)

    ping = sub.add_parser(
        "ping", help="does that node answer? (--ready: and host all its services)",
        description="Call the built-in Malla service of NODE. Exit 0 when it answers; "
                    "with --ready, 1 when a service it should host is not started or is "
                    "paused; 3 when it is not in the cluster or does not answer within "
                    "--timeout; 5 when the cluster cannot be reached. Made for Kubernetes "
                    "liveness and readiness exec probes.",
        epilog="example: malla ping storage1 --ready --seed 127.0.0.1:4370")
    ping.add_argument("node", metavar="NODE", help="the node's name")
    ping.add_argument("--ready", action="store_true",
                      help="also require every service it should host to be started")
    ping.add_argument("--timeout", type=int, default=2000,
                      help="ms, for joining and for the call (default 2000)")
    _client_options(ping)

    top = sub.add_parser(
        "top", help="a live table of the nodes: calls/s, p99, errors, services",
        description="Ask every node's built-in Malla service for its stats and show a "
                    "table refreshed in place (Ctrl-C quits). --once samples twice a second "
                    "apart and prints one table. p99 needs metrics on at the node.",
        epilog="example: malla top --once --seed 127.0.0.1:4370")
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument("--json", action="store_true", help="with --once: the rows as JSON")
    top.add_argument("--interval", type=float, default=1.0,
                     help="seconds between refreshes (default 1)")
    top.add_argument("--timeout", type=int, default=2000, help="ms per node (default 2000)")
    _client_options(top)

    sub.add_parser("demo", help="start a small cluster on loopback, call it, kill a node, "
                                "and watch the calls fail over")
    bench = sub.add_parser("bench", help="measure malla on this machine: sequential and "
                                         "128-in-flight calls between two local processes")
    bench.add_argument("--seconds", type=float, default=3.0,
                       help="per measurement (default 3)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser


def _client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", action="append", default=[], metavar="HOST:PORT",
                   help=f"a member of the cluster (default 127.0.0.1:{DEFAULT_PORT})")
    p.add_argument("--cookie-file", help="file holding the cluster's cookie")
    p.add_argument("--wait", type=float, default=10.0,
                   help="seconds to wait for the cluster and the service (default 10)")


def _cookie(path: str | None) -> str | None:
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip()
        except OSError as exc:
            raise UserError(f"cannot read the cookie file: {exc}", EXIT_USAGE) from None
    return os.environ.get("MALLA_COOKIE")


class Progress:
    """A one-line status on a terminal's stderr; silent otherwise."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()

    def show(self, text: str) -> None:
        if self.tty:
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()

    def done(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


async def _join(args: argparse.Namespace, progress: Progress, mesh: bool = True) -> malla.Node:
    """A hidden client node connected to the seeds and (`mesh`) every member
    they know."""
    node = malla.Node(f"malla-cli-{os.getpid()}", cookie=_cookie(args.cookie_file), port=0,
                      hidden=True, handshake_timeout=max(args.wait, 2.0))
    await node.start()
    seeds = args.seed or [f"127.0.0.1:{DEFAULT_PORT}"]
    errors: dict[str, str] = {}
    end = asyncio.get_running_loop().time() + args.wait
    while not node.peers():
        for seed in seeds:
            progress.show(f"joining {seed} ...")
            try:
                await node.connect(seed)
            except malla.AuthenticationError as exc:   # retrying will not help
                await node.stop()
                raise UserError(f"cannot join {seed}: {exc}", EXIT_UNREACHABLE) from None
            except (malla.MallaError, OSError) as exc:
                errors[seed] = str(exc)
        if node.peers() or asyncio.get_running_loop().time() > end:
            break
        await asyncio.sleep(0.2)
    if not node.peers():
        await node.stop()
        raise UserError("cannot join the cluster: " +
                        "; ".join(f"{k}: {v}" for k, v in errors.items()), EXIT_UNREACHABLE)
    await asyncio.sleep(0.1)  # PEERS arrives right after the handshake
    if mesh:
        await _connect_members(node, progress)
        await asyncio.sleep(0.1)  # TABLEs arrive right after each handshake
    progress.done()
    return node


async def _connect_members(node: malla.Node, progress: Progress) -> None:
    """A hidden node meshes with nobody by itself: dial every member heard of."""
    for name, (host, port) in sorted(node.members().items()):
        if name not in node.peers():
            progress.show(f"connecting to {name} at {host}:{port} ...")
            try:
                await node.connect(format_address(host, port))
            except (malla.MallaError, OSError):
                pass


async def _wait_for(node: malla.Node, service: str, seconds: float, progress: Progress) -> bool:
    """Wait for `service`, dialling members that join meanwhile."""
    end = asyncio.get_running_loop().time() + seconds
    while not node.get_nodes(service):
        if asyncio.get_running_loop().time() > end:
            return False
        progress.show(f"waiting for {service} ...")
        await _connect_members(node, progress)
        await asyncio.sleep(0.2)
    return True


def _describe(params: list[list[Any]]) -> str:
    return str(signature_from_wire(params))


def _service_table(node: malla.Node) -> list[dict[str, Any]]:
    rows = []
    for service in sorted(node.get_services()):
        instances = node.get_instances(service)
        rows.append({
            "service": service,
            "nodes": [n for n, _ in instances],
            "vsn": sorted({str(info.get("vsn")) for _, info in instances}),
            "functions": {f: _describe(p) for _, info in instances[:1]
                          for f, p in sorted(info.get("functions", {}).items())},
        })
    return rows


async def _cmd_services(args: argparse.Namespace) -> int:
    progress = Progress()
    node = await _join(args, progress)
    try:
        rows = _service_table(node)
    finally:
        await node.stop()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no services in the cluster")
        return 0
    for row in rows:
        nodes = ", ".join(row["nodes"]) or "(no node now)"
        print(f"{row['service']}  vsn {', '.join(row['vsn']) or '-'}  on {nodes}")
        for fun, sig in row["functions"].items():
            print(f"    {fun}{sig}")
    return 0


def parse_arg(text: str) -> Any:
    """JSON, else a Python literal (ast.literal_eval never evaluates code),
    else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return text


def _to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, complex):
        return [value.real, value.imag]
    return repr(value)


async def _cmd_call(args: argparse.Namespace) -> int:
    service, dot, fun = args.target.rpartition(".")
    if not dot or not service or not fun:
        raise UserError(f"expected Service.fun, got {args.target!r}", EXIT_USAGE)
    call_args = [parse_arg(a) for a in args.args]
    kwargs = None
    if args.kwargs is not None:
        kwargs = parse_arg(args.kwargs)
        if not isinstance(kwargs, dict):
            raise UserError("--kwargs must be a JSON object", EXIT_USAGE)
    progress = Progress()
    node = await _join(args, progress)
    try:
        if not await _wait_for(node, service, args.wait, progress):
            raise UserError(f"service {service} is not available in the cluster",
                            EXIT_CODES[DID_NOT_RUN])
        progress.done()
        result = await node.remote(service, fun, call_args, kwargs, timeout=args.timeout,
                                   sna_retries=0)
    except malla.MallaError as exc:
        # the exit status tells the error's family (DESIGN.md "Calls")
        raise UserError(f"{type(exc).__name__}: {exc}",
                        EXIT_CODES.get(malla.family(exc) or "", 1)) from None
    finally:
        progress.done()
        await node.stop()
    print(json.dumps(result, default=_to_json))
    return 0


async def _cmd_ping(args: argparse.Namespace) -> int:
    from malla.cli_probe import ping
    # (a probe dials the seed and its target only, not the whole cluster)
    return await ping(args, lambda: _join(args, Progress(), mesh=False))


async def _cmd_top(args: argparse.Namespace) -> int:
    from malla.top import run
    progress = Progress()
    return await run(args, lambda: _join(args, progress),
               lambda node: _connect_members(node, progress))


def _load_service(spec: str) -> type[malla.Service]:
    module_name, colon, class_name = spec.partition(":")
    if not colon or not module_name or not class_name:
        raise UserError(f"--service expects module:Class, got {spec!r}", EXIT_USAGE)
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import {module_name}: {exc}", EXIT_USAGE) from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, malla.Service)):
        raise UserError(f"{spec} is not a malla.Service subclass", EXIT_USAGE)
    return cls


async def _cmd_node(args: argparse.Namespace) -> int:
    classes = [_load_service(spec) for spec in args.service]
    node = malla.Node(args.name, cookie=_cookie(args.cookie_file), host=args.host,
                      port=args.port, seeds=args.seed, connect=args.connect)
    node._hosting.expect([c._malla_name for c in classes])   # not ready until started
    try:
        await node.start()
    except OSError as exc:
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc}") from None
    for cls in classes:
        await node.start_service(cls)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = node.address
    names = ", ".join(c._malla_name for c in classes) or "no services"
    print(f"malla node {args.name} listening on {host}:{port}, hosting {names}", flush=True)
    await stop.wait()
    print(f"malla node {args.name} draining", flush=True)
    await node.drain(grace=args.grace)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    # malla's own self-benchmark (malla/selfbench.py): it works from a wheel;
    # the comparison with other systems is the repository's `make bench`
    from malla import selfbench

    def progress(line: str) -> None:
        print(f"malla bench: {line}", file=sys.stderr, flush=True)

    try:
        results = selfbench.run(args.seconds, progress)
    except malla.InvalidOption as exc:
        raise UserError(str(exc), EXIT_USAGE) from None
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"{'scenario':<12} {'calls/s':>10} {'p50 us':>9}")
    for name, figures in results.items():
        print(f"{name:<12} {figures['calls_per_s']:>10,.0f} {figures['p50_us']:>9.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from malla.demo import main as demo_main
            return demo_main()
        if args.command == "bench":
            return _cmd_bench(args)
        commands = {"node": _cmd_node, "services": _cmd_services, "call": _cmd_call,
                    "ping": _cmd_ping, "top": _cmd_top}
        if args.command not in commands:
            parser.print_help()
            return EXIT_USAGE
        return malla.run(commands[args.command](args))
    except UserError as exc:
        print(f"malla: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `malla services | head`: the reader left
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
