"""The handshake, sans-IO: HELLO both ways, then mutual HMAC proofs.

Version 1: dialler -> HELLO; acceptor -> HELLO (or ERROR: incompatible
versions); dialler -> AUTH(proof); acceptor checks it -> AUTH(proof) (or
ERROR); dialler checks that.

Version 2 splits the acceptor's HELLO, so that a stranger who has not
proved the cookie learns nothing about the node it reached: the acceptor
first answers with a *challenge* (magic, version range, capabilities, its
nonce); only once the dialler's proof checks out does it send its
*identity* (name, incarnation, addresses, frame size) and then its proof.

A proof is HMAC-SHA256 over every handshake message sent so far, each as
sent (so nonces, names, incarnations, versions and capabilities are all
bound to it), keyed by the cookie, with a different label per role and
version: the cookie never crosses the wire, and a recorded handshake proves
nothing against a fresh nonce.  See docs/protocol.md.

During a cookie rotation (``Node(cookie=[first, other])``) a node proves
with its first cookie and accepts a proof under any of its cookies; the
acceptor answers under the cookie the dialler proved with.  The frames are
those of one cookie: a rotation changes nothing on the wire.  See
docs/security.md "Rotating the cookie".

With ``identity="tls"`` the connection passes a `verify` callable that
checks the peer's claimed name against its certificate as soon as the name
is known: the acceptor before it answers at all, the dialler before it
trusts the acceptor's identity.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from malla import exceptions as mexc
from malla._ext import core
from malla.guard import accepted_cookies

__all__ = ["MAGIC", "PROTOCOL_VERSION", "Handshake", "Hello"]

MAGIC = b"MALLA\x00"
PROTOCOL_VERSION = 2
OLDEST_VERSION = 1       # the oldest version this release still speaks
SPLIT_HELLO = 2          # from this version on, the acceptor's HELLO is split
RETRY_AFTER = 2          # from this version on, Overloaded ERRORs carry retry_after_ms
# Capability bits (docs/protocol.md); a bit a peer does not know is ignored.
CAP_TRACE = 1            # CALLs may carry the trace-context field
CAP_UDP_HEARTBEAT = 2    # heartbeats also come by UDP (HELLO "udp")
CAP_WINDOW = 4           # large messages are paced by WINDOW acknowledgements
CAP_STREAM = 8           # streaming calls: STREAM, ITEM and CREDIT frames (version 2)
CAPABILITIES = CAP_TRACE | CAP_UDP_HEARTBEAT | CAP_WINDOW | CAP_STREAM
STREAM_VERSION = 2       # streams need this version and CAP_STREAM on both sides


def protocol_limits(identity: str = "cookie") -> tuple[int, int, int]:
    """(vmin, vmax, caps) a node of that identity setting speaks.
    MALLA_PROTOCOL_LIMIT="1..1:0" (a test setting) makes a node behave as an
    older or newer version would, for the suite's interoperability tests;
    InvalidOption when it is malformed or names no version this release has
    the proofs of (checked when a node is made, NodeConfig)."""
    spec = os.environ.get("MALLA_PROTOCOL_LIMIT")
    vmin, vmax, caps = OLDEST_VERSION, PROTOCOL_VERSION, CAPABILITIES
    if spec:
        versions, _, cap_bits = spec.partition(":")
        low, _, high = versions.partition("..")
        try:
            vmin, vmax = int(low), int(high or low)
            caps = int(cap_bits) if cap_bits else CAPABILITIES
        except ValueError:
            raise mexc.InvalidOption(
                f"MALLA_PROTOCOL_LIMIT is vmin..vmax[:caps], not {spec!r}") from None
        if not OLDEST_VERSION <= vmin <= vmax or caps < 0:
            raise mexc.InvalidOption(
                f"MALLA_PROTOCOL_LIMIT {spec!r}: versions from {OLDEST_VERSION} up, "
                "vmin <= vmax, caps >= 0")
    if identity == "tls":
        # version-1 peers are refused (DESIGN.md): they know nothing of names
        # bound to certificates, and one accepting us would tell its name to
        # whoever connects, before any proof
        vmin = max(vmin, SPLIT_HELLO)
        if vmax < vmin:
            raise mexc.InvalidOption(
                f'identity="tls" needs protocol version {SPLIT_HELLO}, '
                f"and MALLA_PROTOCOL_LIMIT={spec!r} stops at {vmax}")
    return vmin, vmax, caps


NONCE_SIZE = 32
PROOF_SIZE = 32          # HMAC-SHA256

# (version, role) -> the label of that role's proof
_LABELS = {
    (1, "dialer"): b"malla-v1 dialer proof", (1, "acceptor"): b"malla-v1 acceptor proof",
    (2, "dialer"): b"malla-v2 dialer proof", (2, "acceptor"): b"malla-v2 acceptor proof",
}
# keys of a version-2 challenge, and of the identity that follows the proof
_CHALLENGE_KEYS = ("magic", "vmin", "vmax", "caps", "nonce")
_IDENTITY_KEYS = ("name", "inc", "hidden", "mfs", "listen", "udp")


@dataclass(frozen=True)
class Hello:
    name: str
    incarnation: int
    hidden: bool
    vmin: int = OLDEST_VERSION
    vmax: int = PROTOCOL_VERSION
    caps: int = CAPABILITIES
    max_frame_size: int = 1 << 20
    listen: tuple[str, int] | None = None
    nonce: bytes = b""
    udp: int | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "magic": MAGIC, "vmin": self.vmin, "vmax": self.vmax, "caps": self.caps,
            "name": self.name, "inc": self.incarnation, "hidden": self.hidden,
            "nonce": self.nonce, "mfs": self.max_frame_size,
            "listen": list(self.listen) if self.listen else None,
            "udp": self.udp,
        }

    def encode(self, keys: tuple[str, ...] | None = None) -> bytes:
        """The HELLO payload: every field (version 1, and a dialler's), or
        only `keys` (a version-2 acceptor's challenge or identity)."""
        fields = self.fields()
        return core.packb(fields if keys is None else {k: fields[k] for k in keys})

    @classmethod
    def decode(cls, payload: bytes) -> Hello:
        """A whole HELLO: a dialler's, or a version-1 acceptor's."""
        d = _hello_map(payload)
        _check_magic(d)
        return _build(d)


def _hello_map(payload: bytes) -> dict[Any, Any]:
    try:
        d = unauthenticated_unpackb(payload)
    except Exception as exc:
        raise mexc.ProtocolError(f"not a malla peer (undecodable HELLO: {exc})") from None
    if not isinstance(d, dict):
        raise mexc.ProtocolError("not a malla peer (bad magic in HELLO)")
    return d


def _check_magic(d: dict[Any, Any]) -> None:
    if d.get("magic") != MAGIC:
        raise mexc.ProtocolError("not a malla peer (bad magic in HELLO)")


def _build(d: dict[Any, Any]) -> Hello:
    try:
        listen = d.get("listen")
        hello = Hello(
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


def pick_version(ours: Hello, vmin: int, vmax: int) -> int:
    """The highest version both speak, or ProtocolError naming both ranges."""
    common = min(ours.vmax, vmax)
    if common < max(ours.vmin, vmin):
        raise mexc.ProtocolError(
            f"incompatible protocol versions: this node speaks {ours.vmin}..{ours.vmax}, "
            f"the peer {vmin}..{vmax}")
    return common


def _proof(cookie: bytes, label: bytes, *messages: bytes) -> bytes:
    # each message length-prefixed, so no two sequences of messages hash alike
    # (with two messages: version 1's D || A exactly)
    parts = [label]
    for message in messages:
        parts += [len(message).to_bytes(4, "big"), message]
    return hmac.new(cookie, b"".join(parts), hashlib.sha256).digest()


def _cookie_refusal(who: str) -> mexc.AuthenticationError:
    return mexc.AuthenticationError(f"peer {who} failed the cookie check")


# What the handshake does with each frame, by (role, state, frame type): the
# handler's name.  Anything else (but ERROR, which any state takes) is a
# protocol violation.  States: start -> wait_hello -> [wait_identity] ->
# wait_auth -> done; wait_identity only for a version-2 dialler.
TRANSITIONS: dict[tuple[str, str, int], str] = {
    ("dialer", "wait_hello", core.FT_HELLO): "_dialer_on_hello",
    ("dialer", "wait_identity", core.FT_HELLO): "_dialer_on_identity",
    ("dialer", "wait_auth", core.FT_AUTH): "_dialer_on_auth",
    ("acceptor", "wait_hello", core.FT_HELLO): "_acceptor_on_hello",
    ("acceptor", "wait_auth", core.FT_AUTH): "_acceptor_on_auth",
}

Frames = list[tuple[int, bytes]]


class Handshake:
    """One side's handshake state machine.  Feed it frames, send what it returns.

    `start()` and `receive()` return a list of (frame type, payload) to send.
    Errors raise AuthenticationError or ProtocolError; `error_payload(exc)`
    gives the ERROR frame to send the peer first, when it should get one.
    `verify(name)`, when given, raises AuthenticationError if the peer may
    not use that name (certificate identity).
    """

    def __init__(self, dialer: bool, local: Hello, cookie: bytes,
                 verify: Callable[[str], None] | None = None,
                 nonce: bytes | None = None) -> None:
        self.dialer = dialer
        self.role = "dialer" if dialer else "acceptor"
        # (`nonce` fixed only by known-answer tests: fresh for every handshake)
        self.local = replace(local, nonce=nonce or os.urandom(NONCE_SIZE))
        self._cookies = accepted_cookies(cookie)
        self._verify = verify
        # every handshake message as sent, in order: what the proofs cover
        self._transcript: list[bytes] = []
        self._peer_fields: dict[Any, Any] = {}
        self._matched = self._cookies[0]
        self.peer: Hello | None = None
        self.version = 0
        self.max_frame_size = local.max_frame_size
        self.caps = 0                    # the capabilities both sides announced
        self.done = False
        self._state = "start"

    @property
    def streams(self) -> bool:
        """Both sides speak streaming calls (docs/protocol.md "Streams of items")."""
        return self.version >= STREAM_VERSION and bool(self.caps & CAP_STREAM)

    @property
    def transcript(self) -> tuple[bytes, ...]:
        """Every handshake message so far, as sent: what the proofs cover."""
        return tuple(self._transcript)

    def start(self) -> Frames:
        self._state = "wait_hello"
        return self._send_hello() if self.dialer else []

    def receive(self, ftype: int, payload: bytes) -> Frames:
        if ftype == core.FT_ERROR:
            raise _peer_error(payload)
        handler = TRANSITIONS.get((self.role, self._state, ftype))
        if handler is None:
            raise mexc.ProtocolError(
                f"unexpected frame type {ftype} in handshake state {self._state}")
        frames: Frames = getattr(self, handler)(payload)
        return frames

    # -- the dialler -------------------------------------------------------------

    def _dialer_on_hello(self, payload: bytes) -> Frames:
        d = _hello_map(payload)
        _check_magic(d)
        try:
            vmin, vmax = _typed(d["vmin"], int), _typed(d["vmax"], int)
        except (KeyError, TypeError) as exc:
            raise mexc.ProtocolError(f"malformed HELLO: {exc!r}") from None
        self.version = pick_version(self.local, vmin, vmax)
        self._transcript.append(payload)
        if self.version >= SPLIT_HELLO:
            # a challenge: the acceptor's identity comes after our proof
            self._check_challenge(d)
            self._peer_fields = d
            self._state = "wait_identity"
        else:
            self._learn(_build(d))
            self._state = "wait_auth"
        return [self._auth()]

    def _dialer_on_identity(self, payload: bytes) -> Frames:
        d = _hello_map(payload)
        # the challenge's fields stand: an identity cannot change them
        self._learn(_build({**d, **self._peer_fields}))
        self._transcript.append(payload)
        self._state = "wait_auth"
        return []

    def _dialer_on_auth(self, payload: bytes) -> Frames:
        self._check_proof(payload)
        self._finish()
        return []

    # -- the acceptor ------------------------------------------------------------

    def _acceptor_on_hello(self, payload: bytes) -> Frames:
        peer = Hello.decode(payload)
        self.version = pick_version(self.local, peer.vmin, peer.vmax)
        self._learn(peer)
        self._transcript.append(payload)
        self._state = "wait_auth"
        keys = _CHALLENGE_KEYS if self.version >= SPLIT_HELLO else None
        return self._send_hello(keys)

    def _acceptor_on_auth(self, payload: bytes) -> Frames:
        self._matched = self._check_proof(payload)
        # the dialler proved it: now it may know who we are
        out = self._send_hello(_IDENTITY_KEYS) if self.version >= SPLIT_HELLO else []
        out.append(self._auth())
        self._finish()
        return out

    # -- both --------------------------------------------------------------------

    def _send_hello(self, keys: tuple[str, ...] | None = None) -> Frames:
        payload = self.local.encode(keys)
        self._transcript.append(payload)
        return [(core.FT_HELLO, payload)]

    def _check_challenge(self, d: dict[Any, Any]) -> None:
        try:
            nonce, caps = _typed(d["nonce"], bytes), _typed(d["caps"], int)
        except (KeyError, TypeError) as exc:
            raise mexc.ProtocolError(f"malformed HELLO: {exc!r}") from None
        if len(nonce) != NONCE_SIZE or caps < 0:
            raise mexc.ProtocolError("malformed HELLO: bad nonce or capabilities")

    def _learn(self, peer: Hello) -> None:
        if self._verify is not None:
            self._verify(peer.name)
        self.peer = peer
        self.max_frame_size = min(self.local.max_frame_size, peer.max_frame_size)
        self.caps = self.local.caps & peer.caps

    def _auth(self) -> tuple[int, bytes]:
        return core.FT_AUTH, self._proof(self._matched, self.role)

    def _check_proof(self, payload: bytes) -> bytes:
        """The cookie the peer's proof was made with; AuthenticationError if none."""
        peer_role = "acceptor" if self.dialer else "dialer"
        matched = None
        if len(payload) == PROOF_SIZE:
            # each cookie compared in constant time, no early exit: the time
            # taken says no more than how many cookies there are
            for cookie in self._cookies:
                if (hmac.compare_digest(payload, self._proof(cookie, peer_role))
                        and matched is None):
                    matched = cookie
        if matched is None:
            raise _cookie_refusal(self.peer.name if self.peer else "?")
        return matched

    def _proof(self, cookie: bytes, role: str) -> bytes:
        # a dialler's proof covers what was sent before it; the acceptor's,
        # everything (in version 2 its identity too)
        upto = 2 if role == "dialer" else len(self._transcript)
        return _proof(cookie, _LABELS[(min(self.version, PROTOCOL_VERSION), role)],
                      *self._transcript[:upto])

    def _finish(self) -> None:
        self.done = True
        self._state = "done"


def error_payload(exc: BaseException) -> bytes:
    """The ERROR a handshake reports to the peer before closing (a cookie
    failure says no more than that the cookies differ; a certificate that
    does not name the peer says so, since the peer knows its own)."""
    refusal: mexc.MallaError
    if isinstance(exc, mexc.AuthenticationError):
        refusal = mexc.AuthenticationError(
            getattr(exc, "peer_message", "authentication failed: the cookies differ"))
    else:
        refusal = mexc.ProtocolError(str(exc))
    return core.packb(mexc.error_body(refusal))


def _peer_error(payload: bytes) -> mexc.MallaError:
    try:
        code, _kind, message = unauthenticated_unpackb(payload)[:3]
    except Exception:
        return mexc.ProtocolError("the peer refused the handshake (undecodable ERROR)")
    if code == mexc.ERR_AUTH:
        return mexc.AuthenticationError(f"the peer refused us: {message}")
    return mexc.ProtocolError(f"the peer refused the handshake: {message}")
