"""What the `malla` command reads: the cluster options turned into Node
settings (seeds, the cookie, TLS contexts, DNS servers) and a call's
arguments from the command line or stdin.  A value that cannot work is a
UserError (usage, exit 2)."""

from __future__ import annotations

import argparse
import ast
import json
import os
import ssl
import sys
from typing import Any

from malla import tls
from malla.cli_output import UserError

__all__ = ["call_arguments", "cookie", "discovery_options", "node_options", "parse_arg",
           "seeds_of", "stdin_json", "tls_options"]


def seeds_of(args: argparse.Namespace) -> list[str]:
    """--seed, else MALLA_SEEDS (comma- or space-separated)."""
    if args.seed:
        return list(args.seed)
    return os.environ.get("MALLA_SEEDS", "").replace(",", " ").split()


def cookie(path: str | None) -> str | list[str] | None:
    """The cookie file's cookies, one a line (blank lines skipped; during a
    rotation the first proves, all are accepted), else MALLA_COOKIE."""
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = [line.strip() for line in fh.read().splitlines() if line.strip()]
        except OSError as exc:
            raise UserError(f"cannot read the cookie file: {exc}") from None
        if not lines:
            raise UserError(f"the cookie file {path} is empty")
        return lines[0] if len(lines) == 1 else lines
    return os.environ.get("MALLA_COOKIE")


def node_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Node settings the cluster options give."""
    options: dict[str, Any] = {"cookie": cookie(args.cookie_file),
                               "dns_servers": list(args.dns_server) or None}
    options.update(tls_options(args))
    options.update(discovery_options(args))
    return options


def discovery_options(args: argparse.Namespace) -> dict[str, Any]:
    """--discovery (else MALLA_DISCOVERY) and --discovery-ca (else
    MALLA_DISCOVERY_CA): the etcd the cluster's membership comes from."""
    url = args.discovery or os.environ.get("MALLA_DISCOVERY")
    if not url:
        return {}
    options: dict[str, Any] = {"discovery": url}
    ca = args.discovery_ca or os.environ.get("MALLA_DISCOVERY_CA")
    if ca:
        try:
            options["discovery_ssl"] = ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"cannot load the etcd CA {ca}: {exc}") from None
    return options


def tls_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Node's TLS settings from --tls-cert/--tls-key/--tls-ca and
    --identity (none without the files)."""
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if any(files) and not all(files):
        raise UserError("--tls-cert, --tls-key and --tls-ca go together")
    # (argparse checks the flag's choices, not an environment default's)
    identity = args.identity or os.environ.get("MALLA_IDENTITY") or "cookie"
    if identity not in ("cookie", "tls"):
        raise UserError(f"MALLA_IDENTITY is cookie or tls, not {identity!r}")
    if identity == "tls":
        if not all(files):
            raise UserError("--identity tls needs --tls-cert, --tls-key and --tls-ca")
        if getattr(args, "name", "") is None:
            # (a client's default name, malla-cli-PID, is in no certificate)
            raise UserError("--identity tls needs --name: the node name your certificate names")
    if not all(files):
        return {}
    try:
        return {"ssl_server": tls.server_context(*files),
                "ssl_client": tls.client_context(*files), "identity": identity}
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load the TLS files: {exc}") from None


def parse_arg(text: str) -> Any:
    """JSON, else a Python literal (ast.literal_eval never evaluates code),
    else the text itself."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        return ast.literal_eval(text)
    # (TypeError: an unhashable key, as in "{[1]: 2}")
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return text


def call_arguments(args: argparse.Namespace) -> tuple[list[Any], dict[str, Any] | None]:
    """The positional and keyword arguments, from the command line or stdin
    (`-`: a JSON array of arguments, then a JSON object of keywords)."""
    from_stdin = args.args == ["-"], args.kwargs == "-"
    documents = iter(stdin_json(sum(from_stdin)))
    if from_stdin[0]:
        call_args = next(documents)
        if not isinstance(call_args, list):
            raise UserError("the arguments on stdin must be a JSON array")
    else:
        call_args = [parse_arg(a) for a in args.args]
    kwargs = None
    if args.kwargs is not None:
        kwargs = next(documents) if from_stdin[1] else parse_arg(args.kwargs)
        if not isinstance(kwargs, dict):
            raise UserError("--kwargs must be a JSON object")
    return call_args, kwargs


def stdin_json(count: int) -> list[Any]:
    """`count` JSON documents, one after the other, from stdin."""
    if not count:
        return []
    text, documents, at = sys.stdin.read(), [], 0
    decoder = json.JSONDecoder()
    for _ in range(count):
        while at < len(text) and text[at].isspace():
            at += 1
        try:
            value, at = decoder.raw_decode(text, at)
        except ValueError as exc:
            raise UserError(f"stdin is not {count} JSON document(s): {exc}") from None
        documents.append(value)
    if text[at:].strip():
        raise UserError("stdin holds more than the expected JSON")
    return documents
