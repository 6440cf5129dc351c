"""The `malla` command line (also `python -m malla`).

    malla node NAME --service module:Class [--seed host:port] [--log-level L] ...
    malla services [--seed host:port] [--json]
    malla call Service.fun ARG... [--seed host:port] [--timeout ms]
    malla ping NODE [--ready] [--seed host:port] [--timeout ms]
    malla top [--once] [--interval s] [--seed host:port]
    malla cert ca --out DIR | malla cert node NAME... --ca DIR --out DIR
    malla demo
    malla bench [--seconds S] [--json]

Every command that reaches a cluster takes the cluster options (`--seed` or
MALLA_SEEDS, `--cookie-file` or MALLA_COOKIE, `--tls-cert/--tls-key/--tls-ca`,
`--dns-server`, `--discovery` or MALLA_DISCOVERY).  The CLI is a thin shell
over the library: argument parsing (here), what the options and arguments read (malla.cli_input), a
hidden node for the client commands, output (malla.cli_output).
A user mistake prints one line and exits non-zero, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import malla
from malla import certs
from malla.arguments import signature_from_wire
from malla.cli_input import call_arguments, node_options, seeds_of
from malla.cli_output import EXIT_TABLE, EXIT_USAGE, UserError, dumps
from malla.dns import DEFAULT_PORT, format_address
from malla.handshake import PROTOCOL_VERSION

__all__ = ["main"]

EXIT_FAILED = 1
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s: %(message)s"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="malla",
        description="malla: call functions of services running anywhere in a cluster of "
                    "Python processes.",
        epilog="The cookie (the cluster's shared secret) comes from --cookie-file or the "
               "MALLA_COOKIE environment variable; the seeds from --seed or MALLA_SEEDS. "
               "Try `malla demo` first.")
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
    node.add_argument("--connect", action="append", default=[], metavar="TARGET",
                      help="a DNS target re-resolved periodically: name@domain or an SRV name")
    node.add_argument("--grace", type=float, default=10.0, metavar="S",
                      help="seconds to finish calls in flight when draining (default 10)")
    node.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                      help="serve Prometheus metrics at http://HOST:PORT/metrics "
                           "(needs prometheus_client: pip install malla[metrics])")
    node.add_argument("--mesh", choices=("full", "on_demand"), default=None,
                      help="full: connect to every member; on_demand: connect when a call "
                           "needs it (needs --discovery; its default)")
    node.add_argument("--max-pending-handshakes", type=_positive("a number of connections"),
                      default=256, metavar="N",
                      help="connections in their handshake at once; past that, new ones are "
                           "closed at once and counted (default 256)")
    _log_option(node, "MALLA_LOG_LEVEL, else INFO")
    _cluster_options(node)

    services = sub.add_parser(
        "services", help="print the cluster's service table",
        description="Join the cluster as a short-lived hidden node and print every service "
                    "with its nodes, version and functions.",
        epilog="example: malla services --seed 127.0.0.1:4370 --json")
    _client_options(services)
    services.add_argument("--json", action="store_true", help="print JSON instead of a table")

    call = sub.add_parser(
        "call", help="call a service's function and print the result as JSON",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Call Service.fun with the given arguments from the shell. Each ARG is\n"
                    "read as JSON, else as a Python literal (parsed, never evaluated), else\n"
                    "as a plain string. A single ARG `-` reads the arguments from stdin as\n"
                    "a JSON array; `--kwargs -` reads the keyword arguments from stdin as a\n"
                    "JSON object (with both, stdin holds the array, then the object).",
        epilog="example: malla call Calculator.add 1 2 --seed 127.0.0.1:4370\n"
               "         echo '[1, 2]' | malla call Calculator.add -\n\n" + EXIT_TABLE)
    call.add_argument("target", metavar="Service.fun")
    call.add_argument("args", nargs="*", metavar="ARG")
    call.add_argument("--kwargs", default=None, metavar="JSON",
                      help='keyword arguments as a JSON object, e.g. \'{"full": true}\' '
                           "(- : from stdin)")
    call.add_argument("--timeout", type=int, default=15000, metavar="MS",
                      help="ms for the call's attempt (default 15000)")
    call.add_argument("--sna-retries", type=int, default=0, metavar="N",
                      help="rounds to retry when no node can take the call (default 0: the "
                           "CLI already waits --wait seconds for the service)")
    call.add_argument("--traceback", action="store_true",
                      help="on failure, print the remote traceback (or the local one)")
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
    ping.add_argument("--timeout", type=_positive_ms, default=2000, metavar="MS",
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
    top.add_argument("--timeout", type=_positive_ms, default=2000, metavar="MS",
                     help="ms per node (default 2000)")
    _client_options(top)

    _cert_parser(sub)
    sub.add_parser("demo", help="start a small cluster on loopback, call it, kill a node, "
                                "and watch the calls fail over")
    bench = sub.add_parser("bench", help="measure malla on this machine: sequential and "
                                         "128-in-flight calls between two local processes")
    bench.add_argument("--seconds", type=float, default=3.0,
                       help="per measurement (default 3)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    return parser


def _cluster_options(p: argparse.ArgumentParser) -> None:
    """What every command that reaches a cluster takes."""
    p.add_argument("--seed", action="append", default=[], metavar="HOST:PORT",
                   help="a member to join through (repeatable; default: MALLA_SEEDS, "
                        "comma- or space-separated)")
    p.add_argument("--cookie-file", metavar="FILE", help="file holding the cluster's cookie "
                                         "(default: MALLA_COOKIE)")
    _tls_options(p)
    p.add_argument("--dns-server", action="append", default=[], metavar="HOST[:PORT]",
                   help="DNS server for name@domain and SRV targets (repeatable; default: "
                        "the system's resolver)")
    p.add_argument("--discovery", metavar="URL",
                   help="membership from etcd: etcd://HOST:PORT[,HOST:PORT...]/PREFIX "
                        "(etcds:// for TLS; default: MALLA_DISCOVERY); no seed needed")
    p.add_argument("--discovery-ca", metavar="PEM",
                   help="the CA etcds:// trusts (default: MALLA_DISCOVERY_CA, else the "
                        "system's)")


def _tls_options(p: argparse.ArgumentParser) -> None:
    """Mutual TLS (read by malla.cli_input.tls_options)."""
    p.add_argument("--tls-cert", metavar="PEM", help="this node's certificate (mutual TLS; "
                   "with --tls-key and --tls-ca; `malla cert` makes them)")
    p.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    p.add_argument("--tls-ca", metavar="PEM", help="the CA that signs every node's certificate")
    p.add_argument("--identity", choices=("cookie", "tls"), default=None,
                   help="cookie: node names are self-asserted; tls: each node's name must be "
                        "one its certificate names (needs the --tls-* files; default: "
                        "MALLA_IDENTITY, else cookie)")


def _cert_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cert = sub.add_parser(
        "cert", help="make a development CA and node certificates for TLS",
        description="Make a development CA, then a certificate and key per node, signed by "
                    "it, naming the node in its SANs (DNS:NAME when NAME is a DNS name, and "
                    "URI:malla://NAME, percent-encoded): the files --tls-cert, --tls-key and "
                    "--tls-ca read. EC P-256 keys, written 0600; existing files are never "
                    "overwritten. Needs cryptography: pip install malla[cert].",
        epilog="example: malla cert ca --out certs && "
               "malla cert node n1 n2 cli --ca certs --out certs")
    what = cert.add_subparsers(dest="cert_command", metavar="WHAT", required=True)
    ca = what.add_parser("ca", help="a self-signed development CA: DIR/ca.pem, DIR/ca-key.pem",
                         description="Make a self-signed CA (CA:TRUE, keyCertSign; an EC "
                                     "P-256 key written 0600) in DIR. Needs cryptography: "
                                     "pip install malla[cert].",
                         epilog="example: malla cert ca --out certs")
    ca.add_argument("--out", required=True, metavar="DIR",
                    help="where to write ca.pem and ca-key.pem (made if missing)")
    ca.add_argument("--days", type=int, default=certs.CA_DAYS, metavar="N",
                    help=f"days it is valid (default {certs.CA_DAYS})")
    node = what.add_parser(
        "node", help="a certificate per node name: DIR/NAME.pem, DIR/NAME-key.pem",
        description="Issue a certificate and key for each NAME, signed by the CA in --ca, "
                    "for serverAuth and clientAuth (a node both accepts and dials), naming "
                    "it in its SANs: DNS:NAME when NAME is a DNS host name, and "
                    "URI:malla://NAME (percent-encoded) always. EC P-256 keys written 0600; "
                    "nothing is written if a file exists. Needs cryptography: "
                    "pip install malla[cert].",
        epilog="example: malla cert node n1 n2 cli --ca certs --out certs")
    node.add_argument("names", nargs="+", metavar="NAME", help="a node name (repeatable)")
    node.add_argument("--ca", required=True, metavar="DIR",
                      help="the directory `malla cert ca` wrote")
    node.add_argument("--out", required=True, metavar="DIR",
                      help="where to write the files (made if missing)")
    node.add_argument("--days", type=int, default=certs.NODE_DAYS, metavar="N",
                      help=f"days each is valid (default {certs.NODE_DAYS})")


def _client_options(p: argparse.ArgumentParser) -> None:
    _cluster_options(p)
    p.add_argument("--name", default=None,
                   help="this client's (hidden) node name (default malla-cli-PID); the "
                        "identity its certificate names")
    p.add_argument("--wait", type=float, default=10.0, metavar="S",
                   help="seconds to wait for the cluster and the service (default 10)")
    _log_option(p, "ERROR: the one-line error says what failed")


def _log_option(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--log-level", type=str.upper, choices=LEVELS, default=None,
                   metavar="LEVEL", help=f"{', '.join(LEVELS)} (default {default})")


def _configure_logging(level: str | None, node: bool) -> None:
    """Log lines on stderr with a UTC timestamp, the level and the logger:
    at `level` (--log-level), else for a node MALLA_LOG_LEVEL or INFO, else
    (a client: its one-line error says what failed) ERROR."""
    if level is None:
        level = os.environ.get("MALLA_LOG_LEVEL", "INFO").upper() if node else "ERROR"
    if level not in LEVELS:
        raise UserError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler()
    formatter = logging.Formatter(LOG_FORMAT, datefmt="%Y-%m-%dT%H:%M:%S")
    formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)


def _make_node(name: str, **settings: Any) -> malla.Node:
    try:
        return malla.Node(name, **settings)
    except malla.InvalidOption as exc:   # a flag's value the node refuses
        raise UserError(str(exc)) from None


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
    node = _make_node(args.name or f"malla-cli-{os.getpid()}", port=0, hidden=True,
                      handshake_timeout=getattr(args, "handshake_timeout", max(args.wait, 2.0)),
                      **node_options(args))
    try:
        await node.start()
        if node._discovery is not None and not seeds_of(args):
            await _read_members(node, args)
            mesh = False      # (a call dials the node it needs)
        else:
            await _reach_seeds(node, args, progress)
    except asyncio.CancelledError:      # a probe's timeout: leave nothing open
        await node.stop()
        raise
    if mesh:
        await _connect_members(node, progress)
        await asyncio.sleep(0.1)  # TABLEs arrive right after each handshake
    progress.done()
    return node


async def _reach_seeds(node: malla.Node, args: argparse.Namespace, progress: Progress) -> None:
    """Dial the seeds until one answers (within --wait); UserError when none
    does (the node is then stopped)."""
    seeds = seeds_of(args) or [f"127.0.0.1:{DEFAULT_PORT}"]
    errors: dict[str, str] = {}
    end = asyncio.get_running_loop().time() + args.wait
    while not node.peers():
        for seed in seeds:
            progress.show(f"joining {seed} ...")
            try:
                await node.connect(seed)
            except (malla.AuthenticationError, malla.ProtocolError) as exc:
                # refused, not missed: retrying will not help
                await node.stop()
                raise UserError.of(exc, f"cannot join {seed}") from None
            except (malla.MallaError, OSError) as exc:
                errors[seed] = str(exc)
        if node.peers() or asyncio.get_running_loop().time() > end:
            break
        await asyncio.sleep(0.2)
    if not node.peers():
        await node.stop()
        raise UserError.of(malla.Unreachable("cannot join the cluster: " + "; ".join(
            f"{k}: {v}" for k, v in errors.items())))
    await asyncio.sleep(0.1)  # PEERS arrives right after the handshake


async def _read_members(node: malla.Node, args: argparse.Namespace) -> None:
    """The membership read from etcd (within --wait); UserError when etcd
    cannot be read (the node is then stopped)."""
    assert node._discovery is not None
    try:
        await asyncio.wait_for(node._discovery.synced.wait(), args.wait)
    except asyncio.TimeoutError:
        await node.stop()
        raise UserError.of(malla.Unreachable(
            f"cannot read the cluster from {node.discovery} within {args.wait} s")) from None


async def _connect_members(node: malla.Node, progress: Progress) -> None:
    """A hidden node meshes with nobody by itself: dial every member heard
    of (with discovery=, none: a call dials the node it needs)."""
    if node._discovery is not None:
        return
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


async def _cmd_call(args: argparse.Namespace) -> int:
    service, dot, fun = args.target.rpartition(".")
    if not dot or not service or not fun:
        raise UserError(f"expected Service.fun, got {args.target!r}")
    call_args, kwargs = call_arguments(args)
    progress = Progress()
    node = await _join(args, progress)
    try:
        if not await _wait_for(node, service, args.wait, progress):
            raise UserError.of(malla.ServiceNotAvailable(
                f"service {service} is not available in the cluster"))
        progress.done()
        result = await node.remote(service, fun, call_args, kwargs, timeout=args.timeout,
                                   sna_retries=args.sna_retries)
    except malla.MallaError as exc:
        # the exit status tells the error's family (DESIGN.md "Calls")
        raise UserError.of(exc) from None
    finally:
        progress.done()
        await node.stop()
    print(dumps(result))
    return 0


async def _cmd_ping(args: argparse.Namespace) -> int:
    from malla.cli_probe import ping
    # (a probe dials the seed and its target only, not the whole cluster)
    return await ping(args, lambda: _join(args, Progress(), mesh=False))


async def _cmd_top(args: argparse.Namespace) -> int:
    from malla.top import run
    if args.json and not args.once:
        raise UserError("--json needs --once (the live view is a table)", EXIT_USAGE)
    progress = Progress()
    return await run(args, lambda: _join(args, progress),
               lambda node: _connect_members(node, progress))


def _positive(what: str) -> Callable[[str], int]:
    """An argparse type: a whole number above 0 (anything else is the
    usage error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{what} above 0, not {text!r}")
        return value

    return parse


# a probe's timeout: a whole number of ms above 0 (0 would be a cast)
_positive_ms = _positive("a timeout in ms")


def _load_service(spec: str) -> type[malla.Service]:
    module_name, colon, class_name = spec.partition(":")
    if not colon or not module_name or not class_name:
        raise UserError(f"--service expects module:Class, got {spec!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"cannot import {module_name}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, malla.Service)):
        raise UserError(f"{spec} is not a malla.Service subclass")
    return cls


async def _cmd_node(args: argparse.Namespace) -> int:
    classes = [_load_service(spec) for spec in args.service]
    node = _make_node(args.name, host=args.host, port=args.port, seeds=seeds_of(args),
                      connect=args.connect, metrics_port=args.metrics_port, mesh=args.mesh,
                      max_pending_handshakes=args.max_pending_handshakes,
                      **node_options(args))
    try:
        node._hosting.expect([c._malla_name for c in classes])   # not ready until started
    except ValueError as exc:            # a reserved name (InvalidOption)
        raise UserError(f"--service: {exc}") from None
    try:
        await node.start()
    except ImportError as exc:
        await node.stop()
        raise UserError(f"--metrics-port needs prometheus_client "
                        f"(pip install malla[metrics]): {exc}") from None
    except malla.NameInUse as exc:      # (the node stopped itself)
        raise UserError(str(exc), EXIT_FAILED) from None
    except OSError as exc:
        await node.stop()
        raise UserError(f"cannot listen on {args.host}:{args.port}: {exc}",
                        EXIT_FAILED) from None
    for cls in classes:
        try:
            await node.start_service(cls)
        except (ValueError, TypeError) as exc:     # twice the same, a bad __init__
            await node.stop()
            raise UserError(f"cannot start {cls._malla_name}: {exc}", EXIT_FAILED) from None
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


def _cmd_cert(args: argparse.Namespace) -> int:
    """`malla cert ca|node`: each file written, one line each."""
    try:
        if args.cert_command == "ca":
            written = [certs.make_ca(args.out, days=args.days)]
        else:
            written = certs.issue_all(args.names, ca_dir=args.ca, out=args.out, days=args.days)
    except (ImportError, malla.InvalidOption, OSError) as exc:   # cryptography missing too
        raise UserError(str(exc)) from None
    for cert, key in written:
        print(f"wrote {cert} and {key} (the key 0600)")
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
        raise UserError(str(exc)) from None
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
        if args.command == "cert":
            return _cmd_cert(args)
        commands = {"node": _cmd_node, "services": _cmd_services, "call": _cmd_call,
                    "ping": _cmd_ping, "top": _cmd_top}
        if args.command not in commands:
            parser.print_help()
            return EXIT_USAGE
        _configure_logging(getattr(args, "log_level", None), node=args.command == "node")
        return malla.run(commands[args.command](args))
    except UserError as exc:
        return exc.report(args.command or "", getattr(args, "traceback", False))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `malla services | head`: the reader left
        sys.stdout = open(os.devnull, "w")
        return 0


if __name__ == "__main__":
    sys.exit(main())
