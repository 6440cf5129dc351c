"""What the `malla` command prints and the status it exits with: results as
JSON (any value malla can carry, never a traceback), one-line errors, and
the exit code of each error family (DESIGN.md "Calls", the table below).
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
import sys
import traceback
import uuid
from typing import Any

from malla import exceptions as mexc

__all__ = ["EXIT_TABLE", "EXIT_USAGE", "UserError", "dumps", "exit_code", "to_json"]

EXIT_OK, EXIT_USAGE = 0, 2

# printed by `malla call --help`; the codes are mexc.EXIT_CODES
EXIT_TABLE = """\
exit status, by the error's family (DESIGN.md "Calls"):
  0  ok: the result is printed as JSON on stdout
  1  failed: the function raised (RemoteError; --traceback shows where)
  2  usage: a bad command line
  3  did not run: ServiceNotAvailable, Overloaded, UnknownFunction,
     BadArguments, InvalidOption, EncodeError, MessageTooLarge, Forbidden,
     NodeStopped, NameInUse, CallTimeout before anything was sent
  4  may have run: CallTimeout after the request was sent, ConnectionLost
  5  cluster unreachable: Unreachable, AuthenticationError, ProtocolError"""


class UserError(Exception):
    """A mistake or a failed call: one line on stderr, the exit `code`.

    `error` is the malla error behind it (its traceback is what
    ``--traceback`` shows)."""

    def __init__(self, message: str, code: int = EXIT_USAGE,
                 error: BaseException | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.error = error

    @classmethod
    def of(cls, exc: mexc.MallaError, context: str = "") -> UserError:
        """The UserError for a malla error: `Class: [context: ]message`,
        exiting with its family's code."""
        name = "RemoteError" if isinstance(exc, mexc.RemoteError) else type(exc).__name__
        text = f"{context}: {exc}" if context else str(exc)
        return cls(f"{name}: {text}", exit_code(exc), exc)

    def report(self, command: str, show_traceback: bool = False) -> int:
        """Print the error (after its traceback when asked); the exit code."""
        if show_traceback and self.error is not None:
            sys.stderr.write(_traceback_of(self.error))
        prefix = f"malla {command}" if command else "malla"
        print(f"{prefix}: {self}", file=sys.stderr)
        return self.code


def _traceback_of(exc: BaseException) -> str:
    """The remote traceback of a RemoteError, else the local one."""
    if isinstance(exc, mexc.RemoteError) and exc.traceback:
        return exc.traceback if exc.traceback.endswith("\n") else exc.traceback + "\n"
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def exit_code(exc: BaseException) -> int:
    """`malla call`'s exit status for an error (its family's code; 1 for an
    error outside malla's families)."""
    return mexc.EXIT_CODES.get(mexc.family(exc) or "", 1)


# -- results as JSON -----------------------------------------------------------

_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def to_json(value: Any) -> Any:
    """`value` as plain JSON data (docs/operations.md, "Results as JSON"):
    tuples as arrays, sets as sorted arrays, bytes as {"$bytes": base64},
    non-finite floats as "NaN"/"Infinity"/"-Infinity", dates and times in
    ISO 8601, timedeltas in seconds, Decimal and UUID as strings, complex as
    [real, imag], a dict key that is not a string as the JSON text of the
    key, and any other value (a registered user type) as its repr."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        return _NON_FINITE.get(value, value)
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k if isinstance(k, str) else _key(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted((to_json(v) for v in value), key=_text)
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": base64.b64encode(bytes(value)).decode()}
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, complex):
        return [to_json(value.real), to_json(value.imag)]
    return repr(value)


def _text(data: Any) -> str:
    return json.dumps(data, sort_keys=True, allow_nan=False)


def _key(key: Any) -> str:
    # a number, bool or None key reads as JSON itself would write it ("1",
    # "true", "null"); a tuple (1, 2) as "[1, 2]"
    converted = to_json(key)
    return converted if isinstance(converted, str) else _text(converted)


def dumps(value: Any) -> str:
    """One line of valid JSON (RFC 8259: no NaN) for any value malla carries."""
    return json.dumps(to_json(value), allow_nan=False)
