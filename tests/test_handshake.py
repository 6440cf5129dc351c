"""The handshake, sans-IO: malla.handshake.Handshake and Hello (docs/protocol.md, "Handshake")."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import malla
from malla import exceptions as mexc
from malla._core import FT_AUTH, FT_CALL, FT_ERROR, FT_HEARTBEAT, FT_HELLO, FrameReader, build_frame
from malla.codec import packb, unpackb
from malla.handshake import MAGIC, NONCE_SIZE, Handshake, Hello, error_payload

COOKIE = b"test-cookie-0123456789abcdef-secret"
PREAUTH_MAX_FRAME = 65536


def hello(name: str, **kw) -> Hello:
    kw.setdefault("incarnation", 12345)
    kw.setdefault("hidden", False)
    return Hello(name=name, **kw)


def on_the_wire(ftype: int, payload: bytes) -> tuple[int, bytes]:
    """Send one handshake frame through the real framing, as the peer sees it."""
    frames = FrameReader(max_frame_size=PREAUTH_MAX_FRAME).feed(build_frame(ftype, 0, 0, payload))
    assert len(frames) == 1
    t, _flags, _sid, p = frames[0]
    return t, p


def pump(dialer: Handshake, acceptor: Handshake, log: list | None = None,
         tamper=None) -> None:
    """Run both sides to completion; every frame sent goes into `log` as
    (direction, type, payload).  `tamper(direction, type, payload)` may
    rewrite a payload in flight."""
    to_acceptor = list(dialer.start())
    to_dialer = list(acceptor.start())
    rounds = 0
    while to_acceptor or to_dialer:
        rounds += 1
        assert rounds < 10, "handshake does not terminate"
        sending, to_acceptor = to_acceptor, []
        for ftype, payload in sending:
            if log is not None:
                log.append(("d->a", ftype, payload))
            if tamper:
                payload = tamper("d->a", ftype, payload)
            to_dialer.extend(acceptor.receive(*on_the_wire(ftype, payload)))
        sending, to_dialer = to_dialer, []
        for ftype, payload in sending:
            if log is not None:
                log.append(("a->d", ftype, payload))
            if tamper:
                payload = tamper("a->d", ftype, payload)
            to_acceptor.extend(dialer.receive(*on_the_wire(ftype, payload)))


def pair(d_hello: Hello | None = None, a_hello: Hello | None = None,
         d_cookie: bytes = COOKIE, a_cookie: bytes = COOKIE,
         version: int | None = None) -> tuple[Handshake, Handshake]:
    """A dialler and an acceptor; `version` pins both to that one version."""
    pin = {} if version is None else {"vmin": version, "vmax": version}
    d_hello = d_hello or hello("dialer@host", listen=("127.0.0.1", 4000), **pin)
    a_hello = a_hello or hello("acceptor@host", listen=("10.0.0.2", 4001), **pin)
    return Handshake(True, d_hello, d_cookie), Handshake(False, a_hello, a_cookie)


# the frames of each version's handshake, in order
ORDER = {
    1: [("d->a", FT_HELLO), ("a->d", FT_HELLO), ("d->a", FT_AUTH), ("a->d", FT_AUTH)],
    # version 2: the acceptor's HELLO is split, its identity after the proof
    2: [("d->a", FT_HELLO), ("a->d", FT_HELLO), ("d->a", FT_AUTH), ("a->d", FT_HELLO),
        ("a->d", FT_AUTH)],
}
versions = pytest.mark.parametrize("version", sorted(ORDER))


# -- success -------------------------------------------------------------------

@versions
def test_success(version):
    pin = {"vmin": version, "vmax": version}
    d_local = hello("dialer@host", incarnation=1 << 63, hidden=True, max_frame_size=1 << 20,
                    **pin)
    a_local = hello("acceptor@host", incarnation=7, listen=("10.0.0.2", 4001),
                    max_frame_size=65536, **pin)
    dialer, acceptor = pair(d_local, a_local)
    log: list = []
    pump(dialer, acceptor, log)
    assert dialer.done and acceptor.done
    assert [(d, t) for d, t, _ in log] == ORDER[version]
    # each side got the other's Hello
    assert dialer.peer is not None and acceptor.peer is not None
    assert dialer.peer.name == "acceptor@host" and dialer.peer.incarnation == 7
    assert dialer.peer.hidden is False and dialer.peer.listen == ("10.0.0.2", 4001)
    assert acceptor.peer.name == "dialer@host" and acceptor.peer.incarnation == 1 << 63
    assert acceptor.peer.hidden is True and acceptor.peer.listen is None
    assert dialer.peer == acceptor.local and acceptor.peer == dialer.local
    # the agreed version and the smaller max_frame_size, on both sides
    assert dialer.version == acceptor.version == version
    assert dialer.max_frame_size == acceptor.max_frame_size == 65536
    # AUTH carries a raw 32-byte HMAC-SHA256 proof, different per role
    proofs = [p for _, t, p in log if t == FT_AUTH]
    assert all(len(p) == 32 for p in proofs) and proofs[0] != proofs[1]


@versions
@pytest.mark.parametrize("small", ["dialer", "acceptor"])
def test_max_frame_size_is_the_minimum_either_way(version, small):
    sizes = (4096, 1 << 20) if small == "dialer" else (1 << 20, 4096)
    dialer, acceptor = pair(hello("d", max_frame_size=sizes[0], vmin=version, vmax=version),
                            hello("a", max_frame_size=sizes[1], vmin=version, vmax=version))
    pump(dialer, acceptor)
    assert dialer.max_frame_size == acceptor.max_frame_size == 4096


def test_hello_fits_in_a_preauth_frame():
    dialer, _ = pair(hello("d" * 1000, listen=("h" * 255, 65535)))
    [(ftype, payload)] = dialer.start()
    assert ftype == FT_HELLO and len(payload) < PREAUTH_MAX_FRAME


def test_acceptor_waits_for_the_dialer():
    dialer, acceptor = pair()
    assert acceptor.start() == []                 # the dialling side speaks first
    out = dialer.start()
    assert [t for t, _ in out] == [FT_HELLO]
    assert not dialer.done and not acceptor.done


@versions
def test_cookie_never_on_the_wire(version):
    cookie = b"very-secret-cookie-" + os.urandom(16)
    dialer, acceptor = pair(d_cookie=cookie, a_cookie=cookie, version=version)
    log: list = []
    pump(dialer, acceptor, log)
    assert dialer.done and acceptor.done
    assert len(log) == len(ORDER[version])
    for _, _, payload in log:
        assert cookie not in payload
        assert cookie[:16] not in payload
        assert cookie.hex().encode() not in payload


# -- authentication ------------------------------------------------------------

@versions
def test_wrong_cookie_fails_at_the_acceptor(version):
    dialer, acceptor = pair(d_cookie=b"cookie-one", a_cookie=b"cookie-two", version=version)
    to_acceptor = dialer.start()
    acceptor.start()
    [(t, a_hello)] = acceptor.receive(*to_acceptor[0])
    assert t == FT_HELLO
    [(t, d_auth)] = dialer.receive(t, a_hello)
    assert t == FT_AUTH
    with pytest.raises(malla.AuthenticationError):
        acceptor.receive(FT_AUTH, d_auth)         # no acceptor AUTH comes back
    assert not acceptor.done and not dialer.done


@versions
def test_wrong_cookie_through_pump_never_yields_an_acceptor_auth(version):
    dialer, acceptor = pair(d_cookie=b"x" * 32, a_cookie=b"y" * 32, version=version)
    log: list = []
    with pytest.raises(malla.AuthenticationError):
        pump(dialer, acceptor, log)
    assert ("a->d", FT_AUTH) not in [(d, t) for d, t, _ in log]
    # from the acceptor, one HELLO only: in version 2 its challenge, which
    # names nothing (no name, incarnation or address reaches a stranger)
    from_acceptor = [p for d, _, p in log if d == "a->d"]
    assert len(from_acceptor) == 1
    if version == 2:
        assert set(unpackb(from_acceptor[0])) == {"magic", "vmin", "vmax", "caps", "nonce"}
        assert b"acceptor@host" not in from_acceptor[0]
    assert not dialer.done and not acceptor.done


FORGERIES = {
    "zeros": lambda real, d_auth: bytes(32),
    "bit flipped": lambda real, d_auth: real[:-1] + bytes([real[-1] ^ 1]),
    "truncated": lambda real, d_auth: real[:31],
    "extended": lambda real, d_auth: real + b"\x00",
    "empty": lambda real, d_auth: b"",
    "reflected dialer proof": lambda real, d_auth: d_auth,
}


@versions
@pytest.mark.parametrize("forgery", sorted(FORGERIES))
def test_dialer_rejects_a_wrong_acceptor_proof(forgery, version):
    sent: dict = {}

    def tamper(direction, ftype, payload):
        if ftype == FT_AUTH:
            if direction == "d->a":
                sent["d_auth"] = payload
            else:
                return FORGERIES[forgery](payload, sent["d_auth"])
        return payload

    dialer, acceptor = pair(version=version)
    with pytest.raises(malla.AuthenticationError):
        pump(dialer, acceptor, tamper=tamper)
    assert acceptor.done and not dialer.done


def test_nonces_are_fresh_per_handshake():
    local = hello("same-node", nonce=b"\x00" * NONCE_SIZE)
    hs = [Handshake(True, local, COOKIE) for _ in range(3)] + \
         [Handshake(False, local, COOKIE) for _ in range(3)]
    nonces = [h.local.nonce for h in hs]
    assert all(len(n) == NONCE_SIZE for n in nonces)
    assert len(set(nonces)) == len(nonces)
    assert b"\x00" * NONCE_SIZE not in nonces
    # and they are what goes on the wire
    d1, d2 = hs[0], hs[1]
    [(_, p1)] = d1.start()
    [(_, p2)] = d2.start()
    assert p1 != p2
    assert unpackb(p1)["nonce"] == d1.local.nonce


@versions
def test_two_handshakes_between_the_same_nodes_differ(version):
    logs = []
    for _ in range(2):
        dialer, acceptor = pair(version=version)
        log: list = []
        pump(dialer, acceptor, log)
        logs.append([p for _, _, p in log])
    differ = [a != b for a, b in zip(*logs, strict=True)]
    # every frame differs (fresh nonces, so fresh proofs) but version 2's
    # acceptor identity, the same node's each time, bound by the proof after it
    assert differ == [True, True, True, False, True] if version == 2 else all(differ)


@versions
def test_replayed_dialer_hello_and_auth_fail(version):
    dialer, acceptor = pair(version=version)
    log: list = []
    pump(dialer, acceptor, log)
    assert acceptor.done
    recorded = [(t, p) for d, t, p in log if d == "d->a"]
    assert [t for t, _ in recorded] == [FT_HELLO, FT_AUTH]
    # an eavesdropper without the cookie replays them to a new acceptor
    _, new_acceptor = pair(version=version)
    new_acceptor.start()
    out = new_acceptor.receive(*recorded[0])
    assert [t for t, _ in out] == [FT_HELLO]      # a fresh nonce goes out...
    with pytest.raises(malla.AuthenticationError):
        new_acceptor.receive(*recorded[1])        # ...so the old proof is worthless
    assert not new_acceptor.done


@versions
def test_replayed_acceptor_hello_and_auth_fail(version):
    dialer, acceptor = pair(version=version)
    log: list = []
    pump(dialer, acceptor, log)
    recorded = [(t, p) for d, t, p in log if d == "a->d"]
    new_dialer, _ = pair(version=version)
    new_dialer.start()
    for frame in recorded[:-1]:
        new_dialer.receive(*frame)
    with pytest.raises(malla.AuthenticationError):
        new_dialer.receive(*recorded[-1])
    assert not new_dialer.done


@versions
def test_reflected_dialer_proof_does_not_pass_as_the_acceptors(version):
    dialer, _acceptor = pair(version=version)
    [(_, d_hello)] = dialer.start()
    # a fake acceptor without the cookie answers (and, in version 2, gives an
    # identity as if the dialer had proved itself), then sends the dialer's
    # own proof back
    fake = Handshake(False, hello("fake", vmin=version, vmax=version), b"no-cookie")
    fake.start()
    [(_, a_hello)] = fake.receive(FT_HELLO, d_hello)
    [(_, d_auth)] = dialer.receive(FT_HELLO, a_hello)
    if version == 2:
        assert dialer.receive(FT_HELLO, fake.local.encode(("name", "inc", "hidden", "mfs",
                                                             "listen", "udp"))) == []
    with pytest.raises(malla.AuthenticationError):
        dialer.receive(FT_AUTH, d_auth)


@versions
@pytest.mark.parametrize("direction", ["d->a", "a->d"])
def test_tampered_hello_fails_authentication(direction, version):
    def tamper(d, ftype, payload):
        if d == direction and ftype == FT_HELLO:
            m = unpackb(payload)
            # e.g. a MITM shrinking frames, or lowering the capabilities
            # of a version-2 challenge (which has no frame size)
            m["mfs" if "mfs" in m else "caps"] = 2048
            return packb(m)
        return payload

    dialer, acceptor = pair(version=version)
    with pytest.raises(malla.AuthenticationError):
        pump(dialer, acceptor, tamper=tamper)
    assert not (dialer.done and acceptor.done)


# -- versions --------------------------------------------------------------------

def test_incompatible_versions_name_both_ranges():
    dialer, acceptor = pair(hello("d", vmin=2, vmax=3), hello("a", vmin=1, vmax=1))
    [(t, d_hello)] = dialer.start()
    acceptor.start()
    with pytest.raises(malla.ProtocolError) as info:
        acceptor.receive(t, d_hello)
    message = str(info.value)
    assert "2..3" in message and "1..1" in message
    assert "version" in message
    # the dialer learns it through the ERROR frame, with both ranges too
    refusal = error_payload(info.value)
    with pytest.raises(malla.ProtocolError) as info:
        dialer.receive(*on_the_wire(FT_ERROR, refusal))
    assert "2..3" in str(info.value) and "1..1" in str(info.value)
    assert not isinstance(info.value, malla.AuthenticationError)


def test_incompatible_versions_the_other_way():
    dialer, acceptor = pair(hello("d", vmin=1, vmax=1), hello("a", vmin=4, vmax=9))
    with pytest.raises(malla.ProtocolError) as info:
        pump(dialer, acceptor)
    assert "1..1" in str(info.value) and "4..9" in str(info.value)


@settings(max_examples=60, deadline=None)
@given(d=st.tuples(st.integers(1, 8), st.integers(0, 4)),
       a=st.tuples(st.integers(1, 8), st.integers(0, 4)))
def test_version_negotiation(d, a):
    dmin, dmax = d[0], d[0] + d[1]
    amin, amax = a[0], a[0] + a[1]
    dialer, acceptor = pair(hello("d", vmin=dmin, vmax=dmax), hello("a", vmin=amin, vmax=amax))
    common = set(range(dmin, dmax + 1)) & set(range(amin, amax + 1))
    if common:
        pump(dialer, acceptor)
        assert dialer.version == acceptor.version == max(common)
    else:
        with pytest.raises(malla.ProtocolError) as info:
            pump(dialer, acceptor)
        assert f"{dmin}..{dmax}" in str(info.value) and f"{amin}..{amax}" in str(info.value)


def test_future_hello_with_unknown_keys_is_accepted():
    dialer, acceptor = pair(hello("d", vmin=1, vmax=5, caps=0xFF00))
    [(t, d_hello)] = dialer.start()
    m = unpackb(d_hello)
    m["some_v5_field"] = {"x": [1, 2]}
    acceptor.start()
    # an extended HELLO breaks the dialer's proof, so only check it is understood
    out = acceptor.receive(t, packb(m))
    assert [t for t, _ in out] == [FT_HELLO]
    assert acceptor.version == 2 and acceptor.peer.caps == 0xFF00


# -- malformed input ------------------------------------------------------------------

def valid_hello_map() -> dict:
    dialer, _ = pair()
    [(_, payload)] = dialer.start()
    return unpackb(payload)


@pytest.mark.parametrize("payload", [
    b"", b"\xc1", b"garbage", b"\x92\x01", packb([MAGIC]), packb("MALLA"), packb(None),
    packb({"magic": b"MALLB\x00"}), packb({}),
])
@pytest.mark.parametrize("dialer_side", [False, True])
def test_garbage_hello_raises_protocol_error(payload, dialer_side):
    dialer, acceptor = pair()
    side = dialer if dialer_side else acceptor
    side.start()
    with pytest.raises(malla.ProtocolError):
        side.receive(FT_HELLO, payload)
    assert not side.done


@pytest.mark.parametrize("key,value", [
    ("magic", b"HTTP/1"), ("magic", "MALLA\x00"), ("magic", None),
    ("name", ""), ("name", 5), ("name", None), ("inc", "1"), ("inc", 1.5),
    ("hidden", 0), ("hidden", "yes"), ("vmin", "1"), ("vmax", None), ("caps", 1.0),
    ("nonce", b"short"), ("nonce", b"x" * 33), ("nonce", "x" * 32), ("nonce", bytearray(32)),
    ("mfs", 100), ("mfs", "big"), ("listen", [1]), ("listen", "ab"), ("listen", 5),
    ("listen", ["h", "port"]), ("listen", ["h", math.inf]), ("listen", ["h", math.nan]),
])
def test_malformed_hello_fields_raise_protocol_error(key, value):
    m = valid_hello_map()
    m[key] = value
    _, acceptor = pair()
    acceptor.start()
    with pytest.raises(malla.ProtocolError):
        acceptor.receive(FT_HELLO, packb(m))


@pytest.mark.parametrize("key", ["magic", "vmin", "vmax", "caps", "name", "inc", "hidden",
                                 "nonce", "mfs"])
def test_missing_hello_fields_raise_protocol_error(key):
    m = valid_hello_map()
    del m[key]
    _, acceptor = pair()
    acceptor.start()
    with pytest.raises(malla.ProtocolError):
        acceptor.receive(FT_HELLO, packb(m))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_arbitrary_bytes_as_hello_raise_protocol_error(payload):
    _, acceptor = pair()
    acceptor.start()
    with pytest.raises(malla.ProtocolError):
        acceptor.receive(FT_HELLO, payload)


wire_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5),
              st.binary(max_size=40), st.sampled_from([math.inf, -math.inf, math.nan,
                                                        2**64, -1, 0, 65536, b"x" * 32,
                                                        ["h", math.inf], ["h", -math.inf],
                                                        ["h", 2**70], [b"h", 1.5]])),
    lambda c: st.one_of(st.lists(c, max_size=3), st.lists(c, max_size=3).map(tuple),
                        st.dictionaries(st.text(max_size=3), c, max_size=3)),
    max_leaves=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(edits=st.dictionaries(
    st.sampled_from(["magic", "vmin", "vmax", "caps", "name", "inc", "hidden", "nonce",
                     "mfs", "listen", "udp", "extra"]),
    st.one_of(st.just("<delete>"), wire_values), min_size=1, max_size=3))
def test_mutated_hello_is_accepted_or_a_protocol_error(edits):
    m = valid_hello_map()
    for key, value in edits.items():
        if value == "<delete>":
            m.pop(key, None)
        else:
            m[key] = value
    _, acceptor = pair()
    acceptor.start()
    try:
        out = acceptor.receive(FT_HELLO, packb(m))
    except malla.ProtocolError:
        assert not acceptor.done
        return
    assert [t for t, _ in out] == [FT_HELLO]
    assert acceptor.peer is not None and acceptor.peer.name


# -- state machine --------------------------------------------------------------------

def test_auth_before_hello_is_a_protocol_error():
    dialer, acceptor = pair()
    acceptor.start()
    with pytest.raises(malla.ProtocolError):
        acceptor.receive(FT_AUTH, b"\x00" * 32)
    dialer.start()
    with pytest.raises(malla.ProtocolError):
        dialer.receive(FT_AUTH, b"\x00" * 32)


def test_second_hello_is_a_protocol_error():
    dialer, acceptor = pair(version=1)
    [(_, d_hello)] = dialer.start()
    acceptor.start()
    [(_, a_hello)] = acceptor.receive(FT_HELLO, d_hello)
    with pytest.raises(malla.ProtocolError):
        acceptor.receive(FT_HELLO, d_hello)
    dialer.receive(FT_HELLO, a_hello)
    with pytest.raises(malla.ProtocolError):
        dialer.receive(FT_HELLO, a_hello)


def test_a_hello_after_the_version_2_identity_is_a_protocol_error():
    dialer, acceptor = pair(version=2)
    [(_, d_hello)] = dialer.start()
    acceptor.start()
    [(_, challenge)] = acceptor.receive(FT_HELLO, d_hello)
    [(_, d_auth)] = dialer.receive(FT_HELLO, challenge)
    [(_, identity), _] = acceptor.receive(FT_AUTH, d_auth)
    assert dialer.receive(FT_HELLO, identity) == []
    with pytest.raises(malla.ProtocolError):
        dialer.receive(FT_HELLO, identity)


# -- version 2: the split acceptor HELLO -------------------------------------------------

IDENTITY_KEYS = ("name", "inc", "hidden", "mfs", "listen", "udp")


def v2_up_to_identity(tamper_identity=None):
    """A version-2 handshake up to the acceptor's identity, which
    `tamper_identity(map)` may rewrite; returns (dialer, identity, a_auth)."""
    dialer, acceptor = pair(version=2)
    [(_, d_hello)] = dialer.start()
    acceptor.start()
    [(_, challenge)] = acceptor.receive(FT_HELLO, d_hello)
    [(_, d_auth)] = dialer.receive(FT_HELLO, challenge)
    [(_, identity), (_, a_auth)] = acceptor.receive(FT_AUTH, d_auth)
    if tamper_identity is not None:
        identity = packb(tamper_identity(unpackb(identity)))
    return dialer, identity, a_auth


def test_version_2_identity_holds_the_rest_of_the_acceptors_hello():
    dialer, identity, a_auth = v2_up_to_identity()
    assert set(unpackb(identity)) == set(IDENTITY_KEYS)
    assert dialer.peer is None                   # nothing known before the identity
    dialer.receive(FT_HELLO, identity)
    dialer.receive(FT_AUTH, a_auth)
    assert dialer.done and dialer.peer.name == "acceptor@host"
    assert dialer.peer.listen == ("10.0.0.2", 4001)


@pytest.mark.parametrize("key,value", [("nonce", b"n" * 32), ("caps", 0), ("vmax", 1)])
def test_version_2_identity_cannot_change_the_challenge(key, value):
    # the challenge's fields stand; adding them to the identity changes the
    # bytes the acceptor's proof covered, so it fails as well
    dialer, identity, a_auth = v2_up_to_identity(lambda m: {**m, key: value})
    dialer.receive(FT_HELLO, identity)
    assert getattr(dialer.peer, key) != value
    with pytest.raises(malla.AuthenticationError):
        dialer.receive(FT_AUTH, a_auth)


@pytest.mark.parametrize("key", IDENTITY_KEYS[:4])
def test_version_2_identity_without_a_field_is_a_protocol_error(key):
    dialer, identity, _ = v2_up_to_identity(lambda m: {k: v for k, v in m.items() if k != key})
    with pytest.raises(malla.ProtocolError):
        dialer.receive(FT_HELLO, identity)
    assert not dialer.done


@pytest.mark.parametrize("key,value", [("nonce", b"short"), ("nonce", None), ("caps", "7"),
                                       ("vmin", None), ("magic", b"HTTP/1")])
def test_malformed_version_2_challenge_is_a_protocol_error(key, value):
    dialer, acceptor = pair(version=2)
    [(_, d_hello)] = dialer.start()
    acceptor.start()
    [(_, challenge)] = acceptor.receive(FT_HELLO, d_hello)
    with pytest.raises(malla.ProtocolError):
        dialer.receive(FT_HELLO, packb({**unpackb(challenge), key: value}))


def refuse(name: str) -> None:
    raise mexc.AuthenticationError(f"no certificate for {name}")


def test_the_acceptor_verifies_the_dialers_name_before_answering():
    seen: list[str] = []
    dialer, _ = pair(version=2)
    acceptor = Handshake(False, hello("a"), COOKIE, verify=lambda n: (seen.append(n), refuse(n)))
    [(_, d_hello)] = dialer.start()
    acceptor.start()
    with pytest.raises(malla.AuthenticationError, match="no certificate for dialer@host"):
        acceptor.receive(FT_HELLO, d_hello)       # nothing sent: not even a challenge
    assert seen == ["dialer@host"] and not acceptor.done


def test_the_dialer_verifies_the_acceptors_name_from_its_identity():
    seen: list[str] = []
    dialer = Handshake(True, hello("d", vmin=2, vmax=2), COOKIE,
                       verify=lambda n: (seen.append(n), refuse(n)))
    acceptor = Handshake(False, hello("acceptor@host", vmin=2, vmax=2), COOKIE)
    with pytest.raises(malla.AuthenticationError, match="no certificate for acceptor@host"):
        pump(dialer, acceptor)
    assert seen == ["acceptor@host"] and not dialer.done


def test_a_verified_name_completes_the_handshake():
    seen: list[str] = []
    dialer = Handshake(True, hello("d"), COOKIE, verify=seen.append)
    acceptor = Handshake(False, hello("a"), COOKIE, verify=seen.append)
    pump(dialer, acceptor)
    assert dialer.done and acceptor.done and sorted(seen) == ["a", "d"]


@pytest.mark.parametrize("ftype", [FT_CALL, FT_HEARTBEAT, 200])
def test_other_frames_during_the_handshake_are_protocol_errors(ftype):
    dialer, acceptor = pair()
    [(_, d_hello)] = dialer.start()
    acceptor.start()
    with pytest.raises(malla.ProtocolError):
        acceptor.receive(ftype, b"")
    acceptor2 = Handshake(False, hello("a"), COOKIE)
    acceptor2.start()
    acceptor2.receive(FT_HELLO, d_hello)
    with pytest.raises(malla.ProtocolError):
        acceptor2.receive(ftype, packb([1, 2]))


def test_frames_after_done_are_protocol_errors():
    dialer, acceptor = pair()
    log: list = []
    pump(dialer, acceptor, log)
    for side, (t, p) in ((acceptor, (FT_AUTH, log[2][2])), (dialer, (FT_AUTH, log[3][2])),
                         (acceptor, (FT_HELLO, log[0][2])), (dialer, (FT_HELLO, log[1][2]))):
        with pytest.raises(malla.ProtocolError):
            side.receive(t, p)


def test_frames_before_start_are_protocol_errors():
    _dialer, acceptor = pair()
    [(_, d_hello)] = Handshake(True, hello("x"), COOKIE).start()
    with pytest.raises(malla.ProtocolError):
        acceptor.receive(FT_HELLO, d_hello)


# -- ERROR frames during the handshake -------------------------------------------------------

def _error_sides():
    dialer, acceptor = pair()
    [(_, d_hello)] = dialer.start()
    acceptor.start()
    mid_acceptor = Handshake(False, hello("a"), COOKIE)
    mid_acceptor.start()
    mid_acceptor.receive(FT_HELLO, d_hello)
    return [dialer, acceptor, mid_acceptor]


@pytest.mark.parametrize("which", [0, 1, 2])
def test_error_frame_with_auth_code_raises_authentication_error(which):
    side = _error_sides()[which]
    payload = error_payload(malla.AuthenticationError("x"))
    with pytest.raises(malla.AuthenticationError):
        side.receive(*on_the_wire(FT_ERROR, payload))
    with pytest.raises(malla.AuthenticationError):
        side.receive(FT_ERROR, packb([mexc.ERR_AUTH, "malla.exceptions.AuthenticationError",
                                      "the cookies differ", None]))
    assert not side.done


@pytest.mark.parametrize("payload", [
    error_payload(malla.ProtocolError("incompatible protocol versions")),
    packb([mexc.ERR_BAD_REQUEST, "x", "bad", None]),
    packb([12345, "x", "unknown code", None]),
    b"", b"\xc1", packb(None), packb([9]), packb({"code": 9}), packb("abc"),
])
def test_other_error_frames_raise_protocol_error(payload):
    for side in _error_sides():
        with pytest.raises(malla.MallaError) as info:
            side.receive(FT_ERROR, payload)
        assert isinstance(info.value, malla.ProtocolError)
        assert not side.done


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.binary(max_size=64), wire_values.map(packb)))
def test_any_error_payload_raises_a_malla_error(payload):
    dialer, _ = pair()
    dialer.start()
    with pytest.raises(malla.MallaError) as info:
        dialer.receive(FT_ERROR, payload)
    assert isinstance(info.value, (malla.ProtocolError, malla.AuthenticationError))


def test_error_payload_is_an_error_frame_body():
    code, kind, message, _tb = unpackb(error_payload(malla.AuthenticationError("secret detail")))
    assert code == mexc.ERR_AUTH and "AuthenticationError" in kind
    code, kind, message, _tb = unpackb(error_payload(malla.ProtocolError("bad magic")))
    assert code == mexc.ERR_BAD_REQUEST and "bad magic" in message
