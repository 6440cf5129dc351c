"""malla's exception hierarchy and the error codes that carry it across the wire.

Every error malla raises is a MallaError mixed with the builtin a Python user
would catch.  An error's *family* tells a caller what happened to its call
(docs/remote-calls.md has the table; `family()` below is it):

* did not run: ServiceNotAvailable (and Overloaded), UnknownFunction,
  BadArguments, InvalidOption, EncodeError, MessageTooLarge, Forbidden,
  NodeStopped, NameInUse, CallTimeout with ``sent=False``;
* may have run: CallTimeout (``sent=True``), ConnectionLost;
* failed: RemoteError (the remote function raised);
* cluster unreachable: Unreachable, AuthenticationError, ProtocolError.
"""

from __future__ import annotations

import builtins
import traceback as _traceback
from typing import Any

__all__ = [
    "AuthenticationError",
    "BadArguments",
    "CallTimeout",
    "ConnectionLost",
    "EncodeError",
    "Forbidden",
    "InternalError",
    "InvalidOption",
    "MallaError",
    "MessageTooLarge",
    "NameInUse",
    "NodeStopped",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "ServiceNotAvailable",
    "UnknownFunction",
    "Unreachable",
    "family",
    "remote_error",
    "remote_fields",
    "type_name",
]


class MallaError(Exception):
    """Root of every error malla raises."""


class ServiceNotAvailable(MallaError):
    """No node could take the call: it did not run."""


class Overloaded(ServiceNotAvailable):
    """The service's max_concurrency was reached on that node: it did not run.

    ``retry_after_ms`` is the serving node's estimate, in ms, of when it has
    room (None: it sent none, as a protocol-version-1 peer does).
    """

    def __init__(self, message: str = "", retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.retry_after_ms))


class RemoteError(MallaError):
    """The remote function raised.

    ``exc_type`` is the qualified class name (``"builtins.RuntimeError"``),
    ``message`` is ``str(exc)`` and ``traceback`` the remote
    ``traceback.format_exception`` text.  When the remote class is a builtin
    exception, the instance is also one of that builtin (see remote_error),
    so ``except KeyError:`` catches a remote KeyError.
    """

    def __init__(self, exc_type: str, message: str, traceback: str = "") -> None:
        # (Exception's own __init__: a builtin mixed in may want other
        # arguments, and gets only the text)
        Exception.__init__(self, f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback

    def __str__(self) -> str:
        # builtins such as KeyError format their args their own way
        return f"{self.exc_type}: {self.message}"

    def __reduce__(self) -> tuple[Any, ...]:
        return (remote_error, (self.exc_type, self.message, self.traceback))


class CallTimeout(MallaError, TimeoutError):
    """The attempt's timeout (or the call's deadline) passed.

    ``sent`` is True when an attempt was sent, so the call may have run;
    False when the time ran out before any attempt was sent (or the serving
    node refused it unstarted because its budget was spent): it did not run.
    """

    def __init__(self, message: str = "", sent: bool = True) -> None:
        super().__init__(message)
        self.sent = sent

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.sent))


class ConnectionLost(MallaError, ConnectionError):
    """The connection closed after the request was sent: it may have run."""


class Unreachable(MallaError, ConnectionError):
    """connect() could not resolve or reach a target."""


class UnknownFunction(MallaError, AttributeError):
    """The service does not export that function: nothing ran."""


class EncodeError(MallaError, TypeError):
    """A value cannot travel on the wire; ``path`` names where it sits."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{message} at {path}" if path else message)
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self),))


class BadArguments(MallaError, TypeError):
    """The arguments do not fit the function's announced signature: nothing ran."""


class InvalidOption(MallaError, ValueError):
    """A call option that does not exist or does not apply: nothing ran."""


class MessageTooLarge(MallaError, ValueError):
    """A message is larger than max_message_size: it did not run."""


class Forbidden(MallaError, PermissionError):
    """The caller may not call that function: nothing ran."""


class NodeStopped(MallaError, RuntimeError):
    """The node is not running."""


class NameInUse(MallaError, RuntimeError):
    """Another live node holds this name in the discovery source."""


class AuthenticationError(MallaError):
    """The peer did not prove it knows the cookie (or we failed to)."""


class ProtocolError(MallaError):
    """Malformed frame, msgpack or handshake: the connection is closed."""


class InternalError(MallaError):
    """A bug in malla."""


# -- families -------------------------------------------------------------------

DID_NOT_RUN = "did not run"
MAY_HAVE_RUN = "may have run"
FAILED = "failed"
UNREACHABLE = "cluster unreachable"

# `malla call`'s exit status per family (DESIGN.md's table); 2 is usage
EXIT_CODES = {FAILED: 1, DID_NOT_RUN: 3, MAY_HAVE_RUN: 4, UNREACHABLE: 5}


def family(exc: BaseException) -> str | None:
    """The family of a malla error (the constants above); None for others."""
    if isinstance(exc, CallTimeout):
        return MAY_HAVE_RUN if exc.sent else DID_NOT_RUN
    if isinstance(exc, ConnectionLost):
        return MAY_HAVE_RUN
    if isinstance(exc, RemoteError):
        return FAILED
    if isinstance(exc, (Unreachable, AuthenticationError, ProtocolError)):
        return UNREACHABLE
    if isinstance(exc, MallaError):
        return DID_NOT_RUN
    return None


# -- remote exceptions caught by their builtin type -------------------------------

_remote_classes: dict[str, type[RemoteError]] = {}


def _remote_class(exc_type: str) -> type[RemoteError]:
    """RemoteError, or a cached subclass of RemoteError and the builtin
    exception `exc_type` names.  Only names found in `builtins` qualify:
    nothing named by wire data is ever imported."""
    cls = _remote_classes.get(exc_type)
    if cls is not None:
        return cls
    cls = RemoteError
    module, _, name = exc_type.rpartition(".")
    base = getattr(builtins, name, None) if module == "builtins" else None
    # Exception subclasses only (a remote KeyboardInterrupt or SystemExit
    # must not stop this process), and none that steers control flow
    if (isinstance(base, type) and issubclass(base, Exception)
            and not issubclass(base, (StopIteration, StopAsyncIteration))):
        try:
            cls = type(f"Remote{name}", (RemoteError, base), {"__module__": __name__})
            cls("builtins." + name, "probe")
        except Exception:   # a builtin whose layout or constructor will not mix
            cls = RemoteError
    if len(_remote_classes) < 1024:
        _remote_classes[exc_type] = cls
    return cls


def remote_error(exc_type: str, message: str, traceback: str = "") -> RemoteError:
    """The RemoteError for a remote exception of class `exc_type`."""
    return _remote_class(exc_type)(exc_type, message, traceback)


def type_name(exc: BaseException) -> str:
    """The qualified class name an ERROR frame carries (``"builtins.KeyError"``)."""
    cls = type(exc)
    return f"{cls.__module__}.{cls.__qualname__}"


def remote_fields(exc: BaseException) -> tuple[str, str, str]:
    """(exc_type, message, traceback) of an exception a handler raised: what
    its caller's RemoteError carries, over the network or in-process."""
    tb = "".join(_traceback.format_exception(type(exc), exc, exc.__traceback__))
    return type_name(exc), str(exc), tb


# Error codes of ERROR frames.  Frozen with the wire protocol (docs/protocol.md):
# new codes may be added; a receiver maps an unknown code to RemoteError.
ERR_SERVICE_NOT_AVAILABLE = 1
ERR_OVERLOADED = 2
ERR_UNKNOWN_FUNCTION = 3
ERR_REMOTE = 4
ERR_MESSAGE_TOO_LARGE = 5
ERR_DEADLINE = 6
ERR_BAD_REQUEST = 7
ERR_UNDECODABLE = 8
ERR_AUTH = 9
ERR_BAD_ARGUMENTS = 10
ERR_FORBIDDEN = 11

_CODE_CLASSES: dict[int, type[MallaError]] = {
    ERR_SERVICE_NOT_AVAILABLE: ServiceNotAvailable,
    ERR_OVERLOADED: Overloaded,
    ERR_UNKNOWN_FUNCTION: UnknownFunction,
    ERR_MESSAGE_TOO_LARGE: MessageTooLarge,
    ERR_BAD_REQUEST: ProtocolError,
    ERR_UNDECODABLE: EncodeError,
    ERR_AUTH: AuthenticationError,
    ERR_BAD_ARGUMENTS: BadArguments,
    ERR_FORBIDDEN: Forbidden,
}
_CLASS_CODES: dict[type[MallaError], int] = {cls: code for code, cls in _CODE_CLASSES.items()}


def error_body(exc: MallaError, tb: str | None = None) -> list[Any]:
    """The ERROR frame body ``[code, exc_type, message, traceback]`` that
    makes the peer raise `exc`'s class (docs/protocol.md, "Error codes").
    The one builder of ERROR bodies in Python (the core's own refusals are
    built by its _queue_error, on the hot path)."""
    cls = type(exc)
    code = ERR_DEADLINE if isinstance(exc, CallTimeout) else ERR_REMOTE
    for klass in cls.__mro__:
        if klass in _CLASS_CODES:
            code = _CLASS_CODES[klass]
            break
    return [code, f"{cls.__module__}.{cls.__qualname__}", str(exc), tb]


# The largest retry_after_ms hint taken from a peer (a day): anything else is
# no hint (docs/protocol.md)
MAX_RETRY_AFTER_MS = 86_400_000


def error_from_wire(code: int, exc_type: str, message: str, tb: str | None,
                    retry_after_ms: Any = None) -> MallaError:
    """Build the caller-side exception for an ERROR frame's fields
    (`retry_after_ms`: the 5th field of a version-2 peer's Overloaded, an
    int of 1 to MAX_RETRY_AFTER_MS ms; anything else is ignored)."""
    if code == ERR_DEADLINE:
        # the serving node refused it unstarted: its budget was spent
        return CallTimeout(message, sent=False)
    cls = _CODE_CLASSES.get(code)
    if cls is None:
        return remote_error(exc_type, message, tb or "")
    if cls is Overloaded and type(retry_after_ms) is int:
        return Overloaded(message, retry_after_ms
                          if 0 < retry_after_ms <= MAX_RETRY_AFTER_MS else None)
    return cls(message)


def sooner(hint: int | None, other: int | None) -> int | None:
    """The smaller of two retry_after_ms hints (None: no hint)."""
    return other if hint is None or (other is not None and other < hint) else hint


def refused(why: tuple[Any, ...]) -> MallaError:
    """The caller's exception for the serving side's own refusal of a call:
    (code, exc_type, message), with Overloaded's retry_after_ms as a 4th
    element (malla/core/dispatch.pyx, ServiceEntry.refusal)."""
    return error_from_wire(why[0], why[1], why[2], None, why[3] if len(why) > 3 else None)
