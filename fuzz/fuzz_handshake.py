"""Fuzz target: the handshake (malla.handshake.Handshake and Hello).

Three modes, picked by the first byte:

0. raw: a dialer or an acceptor fed arbitrary frames (type byte, payload):
   HELLO, AUTH, ERROR or any other type;
1. structured: a valid HELLO with one key deleted, replaced by a value the
   input encodes, or added, fed to either side (then the honest rest);
2. man in the middle: two honest sides with the same (or, by a bit,
   different) cookies; the input alters, truncates, replaces or injects
   frames between them.

Every frame travels through the real framing (build_frame + FrameReader with
the pre-auth limit).  Checked:

* ``receive`` returns frames to send (HELLO or AUTH, as bytes) or raises a
  ``malla.MallaError`` (ProtocolError, AuthenticationError): nothing else;
  ``error_payload(exc)`` of that error, sent back, makes the other side raise
  the same class;
* a side that accepted a HELLO holds a well-typed peer Hello (non-empty name,
  32-byte nonce, frame size >= 1 KiB, port in 1..65535) and a version both
  ranges contain; the agreed frame size is the smaller of the two;
* authentication: without the cookie nothing completes (raw and structured
  modes); in the middle, a side completes only if every frame it was handed
  before completing was the honest one and both sides saw each other's
  HELLO exactly as sent; with different cookies nobody completes; an
  untouched exchange always completes.

Replayed without atheris by tests/test_fuzz_replay.py (``TestOneInput``).
"""

from __future__ import annotations

from _instrument import instrumenting

with instrumenting(__name__):
    import malla
    from malla import handshake as hs
    from malla._ext import core

COOKIE = b"fuzz-cookie-0123456789abcdef-0123"
OTHER_COOKIE = b"another-cookie-0123456789abcdef-x"
PREAUTH_MAX_FRAME = 65536
HELLO_KEYS = ("magic", "vmin", "vmax", "caps", "name", "inc", "hidden", "nonce", "mfs",
              "listen", "udp", "extra")
FRAME_TYPES = (core.FT_HELLO, core.FT_AUTH, core.FT_ERROR)


class Input:
    """A tiny FuzzedDataProvider: atheris's is not there when replaying."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.byte() << 8 | self.byte()

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def rest(self) -> bytes:
        return self.take(len(self.data))

    @property
    def left(self) -> int:
        return len(self.data) - self.pos


def local_hello(name: str, mfs: int = 1 << 20, **kw) -> hs.Hello:
    kw.setdefault("incarnation", 42)
    kw.setdefault("hidden", False)
    return hs.Hello(name=name, max_frame_size=mfs, **kw)


def make_side(dialer: bool, cookie: bytes = COOKIE, mfs: int = 1 << 20,
              nonce: bytes = b"") -> hs.Handshake:
    name = "dialer@fuzz" if dialer else "acceptor@fuzz"
    side = hs.Handshake(dialer, local_hello(name, mfs, listen=("127.0.0.1", 4370)), cookie)
    # a fixed nonce: the same input takes the same path every time
    side.local = hs.Hello(**{**side.local.__dict__,
                             "nonce": nonce or (b"D" if dialer else b"A") * hs.NONCE_SIZE})
    return side


def on_the_wire(ftype: int, payload: bytes) -> tuple[int, bytes] | None:
    """The frame as the peer's reader delivers it (None: refused by framing)."""
    try:
        frames = core.FrameReader(PREAUTH_MAX_FRAME).feed(core.build_frame(ftype, 0, 0, payload))
    except malla.ProtocolError:
        return None
    assert len(frames) == 1
    return frames[0][0], frames[0][3]


def receive(side: hs.Handshake, ftype: int, payload: bytes) -> list[tuple[int, bytes]] | None:
    """side.receive(), checked; None when it refused (a MallaError)."""
    was_waiting_hello = side.peer is None
    try:
        out = side.receive(ftype, payload)
    except malla.MallaError as exc:
        check_error_travels(exc, side.dialer)
        return None
    assert isinstance(out, list)
    for t, p in out:
        assert t in (core.FT_HELLO, core.FT_AUTH) and type(p) is bytes, (t, p)
    if was_waiting_hello and side.peer is not None:
        check_peer(side)
    return out


def check_peer(side: hs.Handshake) -> None:
    peer = side.peer
    assert peer is not None
    assert type(peer.name) is str and peer.name
    assert type(peer.nonce) is bytes and len(peer.nonce) == hs.NONCE_SIZE
    assert isinstance(peer.max_frame_size, int) and peer.max_frame_size >= 1024
    assert isinstance(peer.incarnation, int) and type(peer.hidden) is bool
    if peer.listen is not None:
        host, port = peer.listen
        assert type(host) is str and type(port) is int and 0 < port < 65536
    if peer.udp is not None:
        assert type(peer.udp) is int and 0 < peer.udp < 65536
    assert max(peer.vmin, side.local.vmin) <= side.version <= min(peer.vmax, side.local.vmax)
    assert side.max_frame_size == min(side.local.max_frame_size, peer.max_frame_size)
    assert 1024 <= side.max_frame_size < 2**32   # what Protocol.set_ready takes


def check_error_travels(exc: malla.MallaError, from_dialer: bool) -> None:
    """The ERROR frame a refusing side sends makes the other side raise the same kind."""
    assert isinstance(exc, (malla.ProtocolError, malla.AuthenticationError)), repr(exc)
    other = make_side(not from_dialer)
    other.start()
    try:
        other.receive(core.FT_ERROR, hs.error_payload(exc))
    except malla.MallaError as back:
        assert type(back) is type(exc), (exc, back)
    else:
        raise AssertionError("an ERROR frame did not end the handshake")


# -- mode 0: raw frames ------------------------------------------------------------------

def raw(inp: Input) -> None:
    side = make_side(bool(inp.byte() & 1))
    side.start()
    while inp.left:
        sel = inp.byte()
        ftype = FRAME_TYPES[sel % 3] if sel < 240 else inp.byte()
        payload = inp.take(inp.u16())
        wire = on_the_wire(ftype, payload)
        if wire is None:
            return
        if receive(side, *wire) is None:
            return
        assert not side.done, "authenticated without the cookie"


# -- mode 1: one HELLO key changed --------------------------------------------------------

def _fuzz_value(raw_bytes: bytes, how: int):
    if how == 0:
        try:
            return core.unpackb(raw_bytes)
        except Exception:
            return raw_bytes
    if how == 1:
        return raw_bytes
    if how == 2:
        return raw_bytes.decode("utf-8", "replace")
    return int.from_bytes(raw_bytes[:9], "big", signed=True) if raw_bytes else -1


def structured(inp: Input) -> None:
    flags = inp.byte()
    to_dialer = bool(flags & 1)
    peer_name = "acceptor@fuzz" if to_dialer else "dialer@fuzz"
    fields = {"magic": hs.MAGIC, "vmin": 1, "vmax": 1, "caps": 0, "name": peer_name,
              "inc": 7, "hidden": False, "nonce": b"N" * hs.NONCE_SIZE, "mfs": 65536,
              "listen": ["10.0.0.1", 4370], "udp": None}
    for _ in range(1 + (flags >> 1 & 3)):
        key = HELLO_KEYS[inp.byte() % len(HELLO_KEYS)]
        op = inp.byte()
        if op % 4 == 0:
            fields.pop(key, None)
        else:
            fields[key] = _fuzz_value(inp.take(inp.byte() % 64), op % 4)
    try:
        payload = core.packb(fields)
    except malla.EncodeError:
        return
    side = make_side(to_dialer)
    sent = side.start()
    wire = on_the_wire(core.FT_HELLO, payload)
    if wire is None:
        return
    out = receive(side, *wire)
    if out is None:
        return
    # accepted: what it answers is right, and the rest needs the cookie
    assert [t for t, _ in out] == [core.FT_AUTH if to_dialer else core.FT_HELLO]
    if not to_dialer:
        assert out[0][1] == side.transcript[-1] and not sent
    proof = inp.take(32)
    if receive(side, core.FT_AUTH, proof) is not None:
        raise AssertionError("authenticated with a made-up proof")


# -- mode 2: man in the middle ------------------------------------------------------------

def middle(inp: Input) -> None:
    flags = inp.byte()
    same_cookie = not flags & 1
    dialer = make_side(True, mfs=[1 << 20, 4096, 1024, 65536][flags >> 1 & 3])
    acceptor = make_side(False, COOKIE if same_cookie else OTHER_COOKIE)
    sides = {True: dialer, False: acceptor}
    refused = {True: False, False: False}
    tainted = {True: False, False: False}     # handed a changed frame before done
    changed = False
    # (to_dialer, ftype, payload) in flight
    queue = [(False, t, p) for t, p in dialer.start()] + [(True, t, p) for t, p in acceptor.start()]
    steps = 0
    while queue and steps < 16:
        steps += 1
        to_dialer, ftype, payload = queue.pop(0)
        op = inp.byte() if inp.left else 0
        kind = op & 7
        new_type, new_payload = ftype, payload
        if kind == 1 and payload:           # flip a byte
            i = inp.u16() % len(payload)
            new_payload = payload[:i] + bytes([payload[i] ^ (inp.byte() | 1)]) + payload[i + 1:]
        elif kind == 2:                     # truncate
            new_payload = payload[:inp.u16() % (len(payload) + 1)]
        elif kind == 3:                     # replace
            new_payload = inp.take(inp.byte())
        elif kind == 4:                     # change the frame type
            new_type = FRAME_TYPES[inp.byte() % 3]
        elif kind == 5:                     # inject a frame before it
            queue.insert(0, (to_dialer, ftype, payload))
            new_type, new_payload = FRAME_TYPES[inp.byte() % 3], inp.take(inp.byte())
        receiver = sides[to_dialer]
        if refused[to_dialer]:
            continue
        if new_payload != payload or new_type != ftype or kind == 5:
            changed = True
            if not receiver.done:
                tainted[to_dialer] = True
        wire = on_the_wire(new_type, new_payload)
        if wire is None:
            refused[to_dialer] = True
            continue
        out = receive(receiver, *wire)
        if out is None:
            refused[to_dialer] = True
            continue
        queue.extend((not to_dialer, t, p) for t, p in out)
    for is_dialer, side in sides.items():
        if side.done:
            assert same_cookie, "authenticated with the wrong cookie"
            assert not tainted[is_dialer], "completed after a changed frame"
            # the proof it checked binds every HELLO it covers, as sent: for
            # the dialler all of them, for the acceptor the first two (its
            # version-2 identity goes out after the dialler's proof)
            covered = len(acceptor.transcript) if is_dialer else 2
            assert dialer.transcript[:covered] == acceptor.transcript[:covered], \
                "the sides saw other HELLOs"
    if same_cookie and not changed:
        # nothing changed on the way: it completes, each side knowing the other
        assert dialer.done and acceptor.done, "an untouched handshake did not complete"
        assert dialer.peer == acceptor.local and acceptor.peer == dialer.local
        assert dialer.max_frame_size == acceptor.max_frame_size == dialer.local.max_frame_size


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    inp = Input(data)
    mode = inp.byte() % 3
    (raw, structured, middle)[mode](inp)


# -- seeds ------------------------------------------------------------------------------

def seeds() -> dict[str, bytes]:
    """Seed inputs (fuzz/corpus/handshake)."""
    def frame(ftype_sel: int, payload: bytes) -> bytes:
        return bytes([ftype_sel]) + len(payload).to_bytes(2, "big") + payload

    good = local_hello("acceptor@fuzz", nonce=b"N" * 32, listen=("10.0.0.1", 4370)).encode()
    dialer_hello = local_hello("dialer@fuzz", nonce=b"M" * 32).encode()
    out = {
        "raw-dialer-hello": bytes([0, 1]) + frame(0, good),
        "raw-acceptor-hello": bytes([0, 0]) + frame(0, dialer_hello),
        "raw-acceptor-hello-then-auth": bytes([0, 0]) + frame(0, dialer_hello)
        + frame(1, b"\x00" * 32),
        "raw-dialer-hello-then-auth": bytes([0, 1]) + frame(0, good) + frame(1, b"p" * 32),
        "raw-error": bytes([0, 1]) + frame(2, hs.error_payload(malla.ProtocolError("x"))),
        "raw-error-auth": bytes([0, 0]) + frame(2, hs.error_payload(
            malla.AuthenticationError("x"))),
        "raw-error-garbage": bytes([0, 1]) + frame(2, b"\xc1"),
        "raw-auth-first": bytes([0, 0]) + frame(1, b"p" * 32),
        "raw-other-type": bytes([0, 0, 240, 3]) + b"\x00\x02" + b"\x90\x90",
        "raw-truncated-hello": bytes([0, 0]) + frame(0, dialer_hello[:40]),
        "raw-empty-hello": bytes([0, 1]) + frame(0, b""),
        "raw-not-a-map": bytes([0, 1]) + frame(0, core.packb([hs.MAGIC])),
        "raw-bad-magic": bytes([0, 1]) + frame(0, good.replace(hs.MAGIC, b"MALLB\x00")),
        "raw-versions-disjoint": bytes([0, 0]) + frame(0, local_hello(
            "d", vmin=2, vmax=3, nonce=b"M" * 32).encode()),
        "raw-versions-wide": bytes([0, 0]) + frame(0, local_hello(
            "d", vmin=0, vmax=9, nonce=b"M" * 32).encode()),
        "raw-small-mfs": bytes([0, 0]) + frame(0, local_hello(
            "d", 512, nonce=b"M" * 32).encode()),
        "raw-hidden-udp": bytes([0, 0]) + frame(0, local_hello(
            "d", hidden=True, udp=4371, nonce=b"M" * 32).encode()),
    }
    for i, key in enumerate(HELLO_KEYS):
        out[f"structured-del-{key}"] = bytes([1, i % 2, i, 0])
        out[f"structured-set-{key}"] = bytes([1, (i + 1) % 2, i, 1, 3]) + b"abc"
    # a HELLO of 300 nested tuples once overflowed the stack (before any auth)
    deep = core.packb(None)
    for _ in range(300):
        deep = bytes([0xC9]) + (len(deep) + 1).to_bytes(4, "big") + bytes([core.EXT_TUPLE,
                                                                          0x91]) + deep
    out["raw-hello-nested-deep"] = bytes([0, 0]) + frame(0, b"\x81\xa5magic" + deep)
    out["structured-listen-list"] = bytes([1, 0, 9, 4, 6]) + core.packb(["h", 70000])
    out["structured-mfs-huge"] = bytes([1, 0, 8, 4, 10]) + core.packb(2**70)
    out["structured-udp-zero"] = bytes([1, 0, 10, 4, 1]) + core.packb(0)
    out["structured-nonce-short"] = bytes([1, 1, 7, 1, 5]) + b"short"
    out["middle-clean"] = bytes([2, 0])
    out["middle-clean-small-frames"] = bytes([2, 4])
    out["middle-wrong-cookie"] = bytes([2, 1])
    out["middle-flip-hello"] = bytes([2, 0, 1, 0, 20, 1])
    out["middle-flip-acceptor-auth"] = bytes([2, 0, 0, 0, 0, 1, 0, 3, 1])
    out["middle-truncate-auth"] = bytes([2, 0, 0, 0, 2, 0, 10])
    out["middle-replace-hello"] = bytes([2, 0, 3, 4]) + b"\x80\x80\x80\x80"
    out["middle-retype"] = bytes([2, 0, 0, 4, 1])
    out["middle-inject-error"] = bytes([2, 0, 0, 5, 2, 4]) + hs.error_payload(
        malla.ProtocolError("x"))[:4]
    out["middle-inject-hello"] = bytes([2, 0, 5, 0, 8]) + b"\x81\xa5magic\xc0"
    return out


if __name__ == "__main__":
    import _target

    _target.main(TestOneInput, seeds)
