"""Hardened handshake and TLS, on real sockets."""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from support import COOKIE, node_factory, run_async, seed_of, stop_all, with_nodes

import malla
from malla.guard import HandshakeThrottle, cookie_weakness


class Echo(malla.Service, global_=True):
    def echo(self, x):
        return x


class Token:
    def __init__(self, raw: bytes) -> None:
        self.raw = raw


DECODED: list[bytes] = []


def _decode_token(raw: bytes) -> Token:
    DECODED.append(raw)
    return Token(raw)


def test_no_decoder_runs_on_what_a_peer_sends_before_it_authenticated():
    """Before authentication a HELLO is plain msgpack: an extension value in
    it (here a registered user type) refuses the handshake and reaches no
    decoder, malla's or the user's."""
    import msgpack

    from malla._ext import core

    malla.register_type(Token, lambda t: t.raw, _decode_token, name="test.Token")
    token = msgpack.ExtType(core.EXT_USER, core.packb(["test.Token", b"secret"]))
    assert malla.codec.unpackb(msgpack.packb(token)).raw == b"secret"   # registered
    DECODED.clear()

    async def main(make):
        a = await make("a").start()
        hello = msgpack.packb({"magic": b"MALLA\x00", "name": token})
        reader, writer = await asyncio.open_connection(*a.address)
        writer.write(core.build_frame(core.FT_HELLO, 0, 0, hello))
        while await asyncio.wait_for(reader.read(65536), 5):
            pass                                 # refused: the node closes
        writer.close()
        assert DECODED == []
        assert a.peers() == []

    with_nodes(main)


def test_a_hostile_hello_nested_deep_is_refused_and_the_node_lives():
    """Before authentication, a HELLO holding 300 nested tuples (3 KB) once
    overflowed the C stack of the node decoding it: a crash any host that
    could reach the port could cause.  Now it is a refused handshake."""
    import msgpack

    from malla._ext import core

    async def main(make):
        a = await make("a").start()
        await a.start_service(Echo)
        deep = msgpack.packb(None)
        for _ in range(300):
            deep = msgpack.packb(msgpack.ExtType(core.EXT_TUPLE, b"\x91" + deep))
        reader, writer = await asyncio.open_connection(*a.address)
        writer.write(core.build_frame(core.FT_HELLO, 0, 0, b"\x81\xa5magic" + deep))
        while await asyncio.wait_for(reader.read(65536), 5):
            pass                                 # refused: the node closes
        writer.close()
        b = await make("b", seeds=[seed_of(a)]).start()
        assert await b.wait_for_services(["Echo"], retries=5)
        assert await b.remote("Echo", "echo", [1]) == 1

    with_nodes(main)


def test_weak_cookies_are_named(caplog):
    assert cookie_weakness(b"short") is not None
    assert cookie_weakness(b"aaaaaaaaaaaaaaaaaaaa") is not None
    assert cookie_weakness(b"secret0000000000000") is not None
    assert cookie_weakness(b"1234567890123456789") is not None
    assert cookie_weakness(COOKIE.encode()) is None
    with caplog.at_level(logging.WARNING, logger="malla"):
        malla.Node("x", cookie="s3cret")
    assert "weak cookie" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="malla"):
        malla.Node("y", cookie=COOKIE)
    assert "weak cookie" not in caplog.text


def test_throttle_backs_off_and_a_success_resets():
    t = HandshakeThrottle(free=2, base=10.0)
    for _ in range(2):
        assert not t.blocked("10.0.0.1")
        t.failed("10.0.0.1")
    assert t.blocked("10.0.0.1")
    assert not t.blocked("10.0.0.2")            # other addresses are not slowed
    t.succeeded("10.0.0.1")
    assert not t.blocked("10.0.0.1")


def _garbage_from(host: str, port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5,
                                  source_address=(host, 0)) as s:
        s.sendall(b"GET / HTTP/1.1\r\n\r\n" * 4)
        s.settimeout(5)
        try:
            return s.recv(1024)
        except (TimeoutError, ConnectionResetError):
            return b""


def test_failed_handshakes_from_one_address_are_rate_limited():
    async def main(make):
        a = await make("a").start()
        await a.start_service(Echo)
        port = a.address[1]
        loop = asyncio.get_running_loop()
        for _ in range(5):
            await loop.run_in_executor(None, _garbage_from, "127.0.0.2", port)
        assert a._cluster.throttle.blocked("127.0.0.2")
        # a peer from another address authenticates as fast as ever
        b = await make("b", seeds=[seed_of(a)]).start()
        assert await b.wait_for_services(["Echo"], retries=5)
        assert await b.remote("Echo", "echo", [1]) == 1
        assert not a._cluster.throttle.blocked("127.0.0.1")

    with_nodes(main)


def test_incompatible_version_is_refused_naming_both_ranges(monkeypatch):
    async def main():
        make, made = node_factory()
        try:
            a = await make("a").start()
            b = make("b")
            await b.start()
            original = b._cluster.hello

            def future_hello(sockname=None):
                h = original(sockname)
                return malla.handshake.Hello(**{**h.__dict__, "vmin": 7, "vmax": 9})

            b._cluster.hello = future_hello
            with pytest.raises(malla.ProtocolError, match=r"1\.\.2.*7\.\.9|7\.\.9.*1\.\.2"):
                await b.connect(seed_of(a))
            assert a.peers() == []
        finally:
            await stop_all(made)

    import malla.handshake
    run_async(main())


def _make_ca_and_cert(tmp_path, name: str, ca=None):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    issuer_key, issuer = (key, subject) if ca is None else ca
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(days=1))
               .not_valid_after(now + datetime.timedelta(days=1)))
    if ca is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                         x509.IPAddress(__import__("ipaddress")
                                                        .ip_address("127.0.0.1"))]), False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    cert_path = tmp_path / f"{name}.pem"
    key_path = tmp_path / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return (key, subject), str(cert_path), str(key_path)


@pytest.fixture
def pki(tmp_path):
    ca, ca_cert, _ = _make_ca_and_cert(tmp_path, "ca")
    _, srv_cert, srv_key = _make_ca_and_cert(tmp_path, "server", ca)
    _, cli_cert, cli_key = _make_ca_and_cert(tmp_path, "client", ca)
    other_ca, _other_ca_cert, _ = _make_ca_and_cert(tmp_path, "other-ca")
    _, bad_cert, bad_key = _make_ca_and_cert(tmp_path, "intruder", other_ca)

    def server_ctx(require_client=True):
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca_cert)
        ctx.load_cert_chain(srv_cert, srv_key)
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client else ssl.CERT_NONE
        return ctx

    def client_ctx(cert=cli_cert, key=cli_key):
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_cert)
        ctx.load_cert_chain(cert, key)
        return ctx

    return server_ctx, client_ctx, (bad_cert, bad_key)


def test_mutual_tls_with_the_cookie_check_inside(pki):
    server_ctx, client_ctx, (bad_cert, bad_key) = pki

    async def main(make):
        a = await make("a", ssl_server=server_ctx(), ssl_client=client_ctx()).start()
        await a.start_service(Echo)
        b = await make("b", ssl_server=server_ctx(), ssl_client=client_ctx()).start()
        await b.connect(seed_of(a))
        assert await b.wait_for_services(["Echo"], retries=5)
        assert await b.remote("Echo", "echo", [b"over tls"]) == b"over tls"
        conn = b._cluster.connected["a"]
        assert conn.proto.transport.get_extra_info("ssl_object") is not None
        # a client certificate from another CA is refused by TLS
        c = await make("c", ssl_client=client_ctx(bad_cert, bad_key)).start()
        with pytest.raises((ssl.SSLError, ConnectionError, malla.MallaError)):
            await c.connect(seed_of(a))
        # the right certificate but the wrong cookie: refused by the handshake
        d = await make("d", cookie="another-cookie-entirely-x",
                       ssl_client=client_ctx()).start()
        with pytest.raises(malla.AuthenticationError):
            await d.connect(seed_of(a))
        # plain TCP to a TLS node fails cleanly, and the node keeps serving
        e = await make("e").start()
        with pytest.raises((malla.MallaError, ConnectionError)):
            await e.connect(seed_of(a))
        assert await b.remote("Echo", "echo", [2]) == 2
        assert a.peers() == ["b"]

    with_nodes(main)
