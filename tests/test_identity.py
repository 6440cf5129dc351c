"""Certificate identity, Node(identity="tls"), on real TLS sockets
(DESIGN.md "Identity and authorization"; docs/security.md).

Each node gets a certificate from one test CA whose SANs name it; a node
with a valid certificate for another name, a wildcard, a wrong cookie or a
version-1 handshake is refused; nodes without identity="tls" behave as
before.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import re
import ssl
from urllib.parse import quote

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from support import COOKIE, seed_of, wait_until, with_nodes

import malla
from malla import tls
from malla.handshake import Hello


class Echo(malla.Service, global_=True):
    def echo(self, x):
        return x


class Pki:
    """A test CA issuing node certificates with the SANs a test asks for."""

    def __init__(self, tmp_path) -> None:
        self.dir = tmp_path
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "malla test CA")])
        self.cert = self._builder(name, name, self.key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True,
        ).sign(self.key, hashes.SHA256())
        self.ca_path = str(tmp_path / "ca.pem")
        with open(self.ca_path, "wb") as f:
            f.write(self.cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject, issuer, public_key) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer)
                .public_key(public_key).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1)))

    def issue(self, label: str, dns: tuple[str, ...] = (), uri: tuple[str, ...] = ()) -> list[str]:
        """cert and key paths of a certificate with these DNS and malla:// URI SANs."""
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier("malla://" + quote(u, safe="")) for u in uri]
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, label)])
        cert = (self._builder(subject, self.cert.subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), False)
                .sign(self.key, hashes.SHA256()))
        paths = [str(self.dir / f"{label}.pem"), str(self.dir / f"{label}-key.pem")]
        with open(paths[0], "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(paths[1], "wb") as f:
            f.write(key.private_bytes(serialization.Encoding.PEM,
                                      serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
        return paths

    def node_settings(self, label: str, dns=(), uri=(), identity="tls") -> dict:
        cert, key = self.issue(label, dns, uri)
        return {"ssl_server": tls.server_context(cert, key, self.ca_path),
                "ssl_client": tls.client_context(cert, key, self.ca_path),
                "identity": identity}


@pytest.fixture
def pki(tmp_path) -> Pki:
    return Pki(tmp_path)


# -- settings ------------------------------------------------------------------------

def test_identity_tls_needs_both_contexts_with_certificates_verified(pki, monkeypatch):
    settings = pki.node_settings("a", uri=("a",))
    with pytest.raises(malla.InvalidOption, match="both ssl_server and ssl_client"):
        malla.Node("a", identity="tls")
    with pytest.raises(malla.InvalidOption, match="both ssl_server and ssl_client"):
        malla.Node("a", identity="tls", ssl_server=settings["ssl_server"])
    lax = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)    # no client certificates
    with pytest.raises(malla.InvalidOption, match="require client certificates"):
        malla.Node("a", identity="tls", ssl_server=lax, ssl_client=settings["ssl_client"])
    trusting = ssl.create_default_context()
    trusting.check_hostname = False
    trusting.verify_mode = ssl.CERT_NONE
    with pytest.raises(malla.InvalidOption, match="verify the server"):
        malla.Node("a", identity="tls", ssl_server=settings["ssl_server"], ssl_client=trusting)
    with pytest.raises(malla.InvalidOption, match='"cookie" or "tls"'):
        malla.Node("a", identity="spiffe")
    assert malla.Node("a", **settings).identity == "tls"
    # a node bound to certificates speaks version 2 or nothing
    monkeypatch.setenv("MALLA_PROTOCOL_LIMIT", "1..1")
    with pytest.raises(malla.InvalidOption, match="needs protocol version 2"):
        malla.Node("a", **settings)
    assert malla.Node("b").identity == "cookie"


# -- the names a certificate vouches for -------------------------------------------------

@pytest.mark.parametrize("sans, name, ok", [
    ([("DNS", "api-1")], "api-1", True),
    ([("DNS", "API-1.Example")], "api-1.example", True),      # DNS: case-insensitive
    ([("URI", "malla://worker%401")], "worker@1", True),      # URI: percent-decoded
    ([("URI", "malla://Worker")], "worker", False),           # ... and exact
    ([("DNS", "*.example")], "a.example", False),             # wildcards never match
    ([("DNS", "*.example")], "*.example", False),
    ([("URI", "https://api-1")], "api-1", False),             # another scheme
    ([("IP Address", "127.0.0.1")], "127.0.0.1", False),      # addresses name no node
    ([("email", "api-1")], "api-1", False),
    ([("DNS", "api-10")], "api-1", False),
    # DNS case rules are ASCII's: no Unicode case folding (U+212A KELVIN SIGN
    # lowercases to "k"), and a non-ASCII DNS SAN names nothing
    ([("DNS", "kafka")], "\u212aafka", False),
    ([("DNS", "\u212a")], "k", False),
    ([("URI", "malla://%E2%84%AAafka")], "\u212aafka", True),
    ([("DNS", "api_1")], "api_1", False),                     # not a host name: URI only
    ([], "api-1", False),
])
def test_name_matching(sans, name, ok):
    class Transport:
        def get_extra_info(self, key):
            assert key == "peercert"
            return {"subjectAltName": tuple(sans)}

    verify = tls.name_verifier(Transport(), "dialler")
    if ok:
        verify(name)
    else:
        claim = re.escape(f"claims to be node '{name}'")
        with pytest.raises(malla.AuthenticationError, match=claim):
            verify(name)


# -- on real TLS sockets -------------------------------------------------------------------

def test_nodes_named_by_their_certificates_mesh_and_call(pki):
    async def main(make):
        a = await make("alpha", **pki.node_settings("alpha", uri=("alpha",))).start()
        b = await make("Beta.Example", seeds=[seed_of(a)],
                       **pki.node_settings("beta", dns=("beta.example",))).start()
        c = await make("gamma@pod-7", seeds=[seed_of(a)],
                       **pki.node_settings("gamma", uri=("gamma@pod-7",))).start()
        await a.start_service(Echo)
        for node in (b, c):
            assert await node.wait_for_services(["Echo"], retries=20)
            assert await node.remote("Echo", "echo", [node.name]) == node.name
        # the mesh: each dialled the others at the addresses it learnt
        await wait_until(lambda: sorted(c.peers()) == ["Beta.Example", "alpha"])
        assert sorted(b.peers()) == ["alpha", "gamma@pod-7"]
        conn = a._cluster.connected["gamma@pod-7"]
        assert conn.handshake.version == 2

    with_nodes(main)


@pytest.mark.parametrize("direction", ["impostor dials", "impostor is dialled"])
def test_a_valid_certificate_for_another_name_is_refused(pki, caplog, direction):
    async def main(make):
        honest = make("billing", **pki.node_settings("billing", uri=("billing",)))
        # a certificate the CA really issued, but for "batch", claiming "billing-2"
        impostor = make("billing-2", **pki.node_settings("batch", uri=("batch",)))
        await honest.start()
        await impostor.start()
        await honest.start_service(Echo)
        dialler, target = (impostor, honest) if direction == "impostor dials" else (
            honest, impostor)
        with caplog.at_level(logging.WARNING, logger="malla"):
            with pytest.raises(malla.AuthenticationError) as info:
                await dialler.connect(seed_of(target))
        # the dialler is told why (it learns only its own certificate's fault,
        # or that the acceptor's does not name it)
        assert "billing-2" in str(info.value)
        assert honest.peers() == []
        # (an acceptor is done before its dialler checks it: the impostor may
        # have had the honest node for a moment, until the refusal closed it)
        await wait_until(lambda: impostor.peers() == [])
        # the refusing side logged both names: the claimed one and the certificate's
        assert "claims to be node 'billing-2', but its certificate names batch" in caplog.text
        assert not await impostor.wait_for_services(["Echo"], retries=2)

    with_nodes(main)


def test_a_wildcard_certificate_names_no_node(pki):
    async def main(make):
        a = await make("a.example", **pki.node_settings("a", dns=("a.example",))).start()
        b = await make("b.example", **pki.node_settings("wild", dns=("*.example",))).start()
        with pytest.raises(malla.AuthenticationError, match=r"does not name node 'b\.example'"):
            await b.connect(seed_of(a))
        assert a.peers() == []

    with_nodes(main)


def test_the_cookie_is_still_checked(pki):
    async def main(make):
        a = await make("a", **pki.node_settings("a", uri=("a",))).start()
        b = make("b", cookie=COOKIE + "-other", **pki.node_settings("b", uri=("b",)))
        await b.start()
        with pytest.raises(malla.AuthenticationError, match="cookies differ"):
            await b.connect(seed_of(a))
        assert a.peers() == []

    with_nodes(main)


def test_version_1_peers_are_refused(pki):
    async def main(make):
        a = await make("a", **pki.node_settings("a", uri=("a",))).start()
        # a peer with a right certificate and cookie that speaks version 1
        # only (as the first release did; without identity="tls" it would be
        # served: tests/test_interop.py)
        old = make("old", **pki.node_settings("old", uri=("old",), identity="cookie"))
        await old.start()
        hello = old._cluster.hello
        old._cluster.hello = lambda sockname=None: Hello(
            **{**hello(sockname).__dict__, "vmin": 1, "vmax": 1})
        with pytest.raises(malla.ProtocolError, match=r"this node speaks 2\.\.2, the peer 1\.\.1"):
            await old.connect(seed_of(a))
        assert a.peers() == []

    with_nodes(main)


def test_identity_tls_and_cookie_identity_nodes_with_certificates_interoperate(pki):
    # identity="tls" is about what a node accepts: a peer that does not bind
    # names itself is still served, as long as its certificate names it
    async def main(make):
        a = await make("a", **pki.node_settings("a", uri=("a",))).start()
        b = await make("b", seeds=[seed_of(a)],
                       **pki.node_settings("b", uri=("b",), identity="cookie")).start()
        await a.start_service(Echo)
        assert await b.wait_for_services(["Echo"], retries=20)
        assert await b.remote("Echo", "echo", [7]) == 7

    with_nodes(main)


class Refunds(malla.Service, global_=True, allow="batch-*"):
    def refund(self, amount):
        return -amount

    @malla.allow("ops")
    def audit(self):
        return "audited"


def test_allow_with_certificate_identity_trusts_the_names_it_checks(pki, caplog):
    # allow= matches the caller's name; with identity="tls" that name is the
    # one its certificate names, so the rules hold against any cookie holder
    async def main(make):
        with caplog.at_level(logging.WARNING, logger="malla"):
            billing = await make("billing", **pki.node_settings("billing", uri=("billing",)))\
                .start()
            await billing.start_service(Refunds)
        assert "self-asserted" not in caplog.text       # no warning: names are bound
        seed = [seed_of(billing)]
        batch = await make("batch-7", seeds=seed,
                           **pki.node_settings("batch-7", uri=("batch-7",))).start()
        ops = await make("ops", seeds=seed, **pki.node_settings("ops", uri=("ops",))).start()
        for node in (batch, ops):
            assert await node.wait_for_services(["Refunds"], retries=20)
        assert await batch.remote("Refunds", "refund", [5]) == -5
        assert await ops.remote("Refunds", "audit") == "audited"
        with pytest.raises(malla.Forbidden):
            await ops.remote("Refunds", "refund", [5])
        with pytest.raises(malla.Forbidden):
            await batch.remote("Refunds", "audit")

    with_nodes(main)
