"""The handshake, sans-IO: HELLO both ways, then mutual HMAC proofs.

Dialler -> HELLO; acceptor -> HELLO (or ERROR: incompatible versions);
dialler -> AUTH(proof); acceptor checks it -> AUTH(proof) (or ERROR);
dialler checks that.  A proof is HMAC-SHA256 over both HELLO payloads as
sent (so nonces, names, incarnations, versions and capabilities are all
bound to it) keyed by the cookie, with a different label per role: the
cookie never crosses the wire, and a recorded handshake proves nothing
against a fresh nonce.  See docs/protocol.md.

During a cookie rotation (``Node(cookie=[first, other])``) a node proves
with its first cookie and accepts a proof under any of its cookies; the
acceptor answers under the cookie the dialler proved with.  The frames are
those of one cookie: a rotation changes nothing on the wire.  See
docs/security.md "Rotating the cookie".
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any

import msgpack

from malla import exceptions as mexc
from malla._ext import core
from malla.guard import accepted_cookies

__all__ = ["MAGIC", "PROTOCOL_VERSION", "Handshake", "Hello"]

MAGIC = b"MALLA\x00"
PROTOCOL_VERSION = 1
# Capability bits (docs/protocol.md); a bit a peer does not know is ignored.
CAP_TRACE = 1            # CALLs may carry the trace-context field
CAP_UDP_HEARTBEAT = 2    # heartbeats also come by UDP (HELLO "udp")
CAP_WINDOW = 4           # large messages are paced by WINDOW acknowledgements
CAPABILITIES = CAP_TRACE | CAP_UDP_HEARTBEAT | CAP_WINDOW


def protocol_limits() -> tuple[int, int, int]:
    """(vmin, vmax, caps) this node speaks.  MALLA_PROTOCOL_LIMIT="1..1:0"
    (a test setting) makes a node behave as an older or newer version would,
    for the suite's interoperability tests."""
    spec = os.environ.get("MALLA_PROTOCOL_LIMIT")
    if not spec:
        return PROTOCOL_VERSION, PROTOCOL_VERSION, CAPABILITIES
    versions, _, caps = spec.partition(":")
    vmin, _, vmax = versions.partition("..")
    return int(vmin), int(vmax or vmin), int(caps) if caps else CAPABILITIES
NONCE_SIZE = 32
PROOF_SIZE = 32          # HMAC-SHA256

_LABEL_DIALER = b"malla-v1 dialer proof"
_LABEL_ACCEPTOR = b"malla-v1 acceptor proof"


@dataclass(frozen=True)
class Hello:
    name: str
    incarnation: int
    hidden: bool
    vmin: int = PROTOCOL_VERSION
    vmax: int = PROTOCOL_VERSION
    caps: int = CAPABILITIES
    max_frame_size: int = 1 << 20
    listen: tuple[str, int] | None = None
    nonce: bytes = b""
    udp: int | None = None

    def encode(self) -> bytes:
        return core.packb({
            "magic": MAGIC, "vmin": self.vmin, "vmax": self.vmax, "caps": self.caps,
            "name": self.name, "inc": self.incarnation, "hidden": self.hidden,
            "nonce": self.nonce, "mfs": self.max_frame_size,
            "listen": list(self.listen) if self.listen else None,
            "udp": self.udp,
        })

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        try:
            d = unauthenticated_unpackb(payload)
        except Exception as exc:
            raise mexc.ProtocolError(f"not a malla peer (undecodable HELLO: {exc})") from None
        if not isinstance(d, dict) or d.get("magic") != MAGIC:
            raise mexc.ProtocolError("not a malla peer (bad magic in HELLO)")
        try:
            listen = d.get("listen")
            hello = cls(
                name=_typed(d["name"], str), incarnation=_typed(d["inc"], int),
                hidden=_typed(d["hidden"], bool), vmin=_typed(d["vmin"], int),
                vmax=_typed(d["vmax"], int), caps=_typed(d["caps"], int),
                max_frame_size=_typed(d["mfs"], int),
                listen=_address(listen) if listen else None,
                nonce=_typed(d["nonce"], bytes),
                udp=_port(d["udp"]) if d.get("udp") is not None else None)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as exc:
            raise mexc.ProtocolError(f"malformed HELLO: {exc!r}") from None
        if not hello.name or len(hello.nonce) != NONCE_SIZE or hello.max_frame_size < 1024:
            raise mexc.ProtocolError("malformed HELLO: empty name, bad nonce or frame size")
        return hello


def _no_extensions(code: int, data: bytes) -> Any:
    raise ValueError(f"extension type {code} before authentication")


def unauthenticated_unpackb(payload: bytes) -> Any:
    """Decode what a peer sends before it has authenticated: plain msgpack,
    no extension types, so no codec or registered decoder ever runs on it."""
    return msgpack.unpackb(payload, raw=False, strict_map_key=False, ext_hook=_no_extensions)


def _port(value: Any) -> int:
    if type(value) is not int or not 0 < value < 65536:
        raise ValueError(f"bad port {value!r}")
    return value


def plain_host(host: Any) -> bool:
    """A host a peer may tell us to dial: a DNS name or an IP address of
    plain ASCII (nothing an encoder or resolver would choke on)."""
    return (type(host) is str and 0 < len(host) <= 253 and host.isascii()
            and all(c.isalnum() or c in ".-:_[]%" for c in host)
            and all(len(label) <= 63 for label in host.split(".")))


def _address(value: Any) -> tuple[str, int]:
    # a listen address a peer announces, which the mesh will dial
    if not isinstance(value, list) or len(value) != 2 or not plain_host(value[0]):
        raise ValueError(f"bad address {value!r}")
    return value[0], _port(value[1])


def member(value: Any) -> tuple[str, str, int]:
    """A PEERS entry ``[name, host, port]``, checked as a HELLO's listen
    address is; ValueError when malformed."""
    if (not isinstance(value, list) or len(value) != 3 or type(value[0]) is not str
            or not value[0]):
        raise ValueError(f"bad member {value!r}")
    host, port = _address(value[1:])
    return value[0], host, port


def _typed(value: Any, kind: type) -> Any:
    if not isinstance(value, kind):
        raise TypeError(f"expected {kind.__name__}, got {type(value).__name__}")
    return value


def pick_version(ours: Hello, theirs: Hello) -> int:
    """The highest version both speak, or ProtocolError naming both ranges."""
    common = min(ours.vmax, theirs.vmax)
    if common < max(ours.vmin, theirs.vmin):
        raise mexc.ProtocolError(
            f"incompatible protocol versions: this node speaks {ours.vmin}..{ours.vmax}, "
            f"the peer {theirs.vmin}..{theirs.vmax}")
    return common


def _proof(cookie: bytes, label: bytes, dialer_hello: bytes, acceptor_hello: bytes) -> bytes:
    msg = b"".join([label, len(dialer_hello).to_bytes(4, "big"), dialer_hello,
                    len(acceptor_hello).to_bytes(4, "big"), acceptor_hello])
    return hmac.new(cookie, msg, hashlib.sha256).digest()


class Handshake:
    """One side's handshake state machine.  Feed it frames, send what it returns.

    `start()` and `receive()` return a list of (frame type, payload) to send.
    Errors raise AuthenticationError or ProtocolError; `error_payload(exc)`
    gives the ERROR frame to send the peer first, when it should get one.
    """

    def __init__(self, dialer: bool, local: Hello, cookie: bytes) -> None:
        self.dialer = dialer
        self.local = Hello(**{**local.__dict__, "nonce": os.urandom(NONCE_SIZE)})
        self._cookies = accepted_cookies(cookie)
        self._local_bytes = self.local.encode()
        self._peer_bytes = b""
        self.peer: Hello | None = None
        self.version = 0
        self.max_frame_size = local.max_frame_size
        self.caps = 0                    # the capabilities both sides announced
        self.done = False
        self._state = "start"

    def start(self) -> list[tuple[int, bytes]]:
        self._state = "wait_hello"
        return [(core.FT_HELLO, self._local_bytes)] if self.dialer else []

    def receive(self, ftype: int, payload: bytes) -> list[tuple[int, bytes]]:
        if ftype == core.FT_ERROR:
            raise _peer_error(payload)
        if self._state == "wait_hello" and ftype == core.FT_HELLO:
            return self._on_hello(payload)
        if self._state == "wait_auth" and ftype == core.FT_AUTH:
            return self._on_auth(payload)
        raise mexc.ProtocolError(f"unexpected frame type {ftype} in handshake state {self._state}")

    def _on_hello(self, payload: bytes) -> list[tuple[int, bytes]]:
        peer = Hello.decode(payload)
        self.version = pick_version(self.local, peer)
        self.peer = peer
        self._peer_bytes = payload
        self.max_frame_size = min(self.local.max_frame_size, peer.max_frame_size)
        self.caps = self.local.caps & peer.caps
        self._state = "wait_auth"
        if self.dialer:
            # proven with the first cookie (the one this node is moving to)
            return [(core.FT_AUTH, self._proof(self._cookies[0], _LABEL_DIALER))]
        return [(core.FT_HELLO, self._local_bytes)]

    def _on_auth(self, payload: bytes) -> list[tuple[int, bytes]]:
        label = _LABEL_ACCEPTOR if self.dialer else _LABEL_DIALER
        matched = None
        if len(payload) == PROOF_SIZE:
            # each cookie compared in constant time, no early exit: the time
            # taken says no more than how many cookies there are
            for cookie in self._cookies:
                if hmac.compare_digest(payload, self._proof(cookie, label)) and matched is None:
                    matched = cookie
        if matched is None:
            raise mexc.AuthenticationError(
                f"peer {self.peer.name if self.peer else '?'} failed the cookie check")
        self.done = True
        self._state = "done"
        return [] if self.dialer else [(core.FT_AUTH, self._proof(matched, _LABEL_ACCEPTOR))]

    def _proof(self, cookie: bytes, label: bytes) -> bytes:
        d, a = ((self._local_bytes, self._peer_bytes) if self.dialer
                else (self._peer_bytes, self._local_bytes))
        return _proof(cookie, label, d, a)


def error_payload(exc: BaseException) -> bytes:
    """The ERROR a handshake reports to the peer before closing (an
    authentication failure says no more than that the cookies differ)."""
    refusal: mexc.MallaError = (
        mexc.AuthenticationError("authentication failed: the cookies differ")
        if isinstance(exc, mexc.AuthenticationError) else mexc.ProtocolError(str(exc)))
    return core.packb(mexc.error_body(refusal))


def _peer_error(payload: bytes) -> mexc.MallaError:
    try:
        code, _kind, message = unauthenticated_unpackb(payload)[:3]
    except Exception:
        return mexc.ProtocolError("the peer refused the handshake (undecodable ERROR)")
    if code == mexc.ERR_AUTH:
        return mexc.AuthenticationError(f"the peer refused us: {message}")
    return mexc.ProtocolError(f"the peer refused the handshake: {message}")
