"""malla's exception hierarchy and the error codes that carry it across the wire.

Every error malla raises is a MallaError mixed with the builtin a Python user
would catch.  The three families tell a caller what happened to its call:

* did not run: ServiceNotAvailable (and Overloaded), UnknownFunction,
  EncodeError, MessageTooLarge;
* may have run: CallTimeout, ConnectionLost;
* failed: RemoteError (the remote function raised).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "CallTimeout",
    "ConnectionLost",
    "EncodeError",
    "InternalError",
    "MallaError",
    "MessageTooLarge",
    "Overloaded",
    "ProtocolError",
    "RemoteError",
    "ServiceNotAvailable",
    "UnknownFunction",
]


class MallaError(Exception):
    """Root of every error malla raises."""


class ServiceNotAvailable(MallaError):
    """No node could take the call: it did not run."""


class Overloaded(ServiceNotAvailable):
    """The service's max_concurrency was reached on that node: it did not run."""


class RemoteError(MallaError):
    """The remote function raised.

    ``exc_type`` is the qualified class name (``"builtins.RuntimeError"``),
    ``message`` is ``str(exc)`` and ``traceback`` the remote
    ``traceback.format_exception`` text.
    """

    def __init__(self, exc_type: str, message: str, traceback: str = "") -> None:
        super().__init__(f"{exc_type}: {message}")
        self.exc_type = exc_type
        self.message = message
        self.traceback = traceback

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.exc_type, self.message, self.traceback))


class CallTimeout(MallaError, TimeoutError):
    """The attempt's timeout (or the call's deadline) passed: it may have run."""


class ConnectionLost(MallaError, ConnectionError):
    """The connection closed after the request was sent: it may have run."""


class UnknownFunction(MallaError, AttributeError):
    """The service does not export that function: nothing ran."""


class EncodeError(MallaError, TypeError):
    """A value cannot travel on the wire; ``path`` names where it sits."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(f"{message} at {path}" if path else message)
        self.path = path


class MessageTooLarge(MallaError, ValueError):
    """A message is larger than max_message_size: it did not run."""


class AuthenticationError(MallaError):
    """The peer did not prove it knows the cookie (or we failed to)."""


class ProtocolError(MallaError):
    """Malformed frame, msgpack or handshake: the connection is closed."""


class InternalError(MallaError):
    """A bug in malla."""


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

_CODE_CLASSES: dict[int, type[MallaError]] = {
    ERR_SERVICE_NOT_AVAILABLE: ServiceNotAvailable,
    ERR_OVERLOADED: Overloaded,
    ERR_UNKNOWN_FUNCTION: UnknownFunction,
    ERR_MESSAGE_TOO_LARGE: MessageTooLarge,
    ERR_DEADLINE: CallTimeout,
    ERR_BAD_REQUEST: ProtocolError,
    ERR_UNDECODABLE: EncodeError,
    ERR_AUTH: AuthenticationError,
}


def error_from_wire(code: int, exc_type: str, message: str, tb: str | None) -> MallaError:
    """Build the caller-side exception for an ERROR frame's fields."""
    cls = _CODE_CLASSES.get(code)
    if cls is None:
        return RemoteError(exc_type, message, tb or "")
    return cls(message)
