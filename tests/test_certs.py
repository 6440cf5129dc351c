"""Certificates for development (docs/security.md, "Certificates for
development"): what `malla cert` writes, read back with cryptography; nodes
calling each other over real TLS sockets with them, in process and through
the CLI; a certificate of another CA refused; the documented openssl recipe
run as written and its certificates working beside `malla cert`'s."""

from __future__ import annotations

import datetime
import json
import os
import re
import stat
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from support import ROOT, require_tool, seed_of, with_nodes
from test_cli import ENV, malla
from test_cli_ops import nodes  # noqa: F401  (a fixture)

import malla as pkg
from malla import certs, tls
from malla.cli import main as cli_main

NAMES = ["n1", "n2", "cli", "worker_1", "billing eu", "Zürich", "x" * 70]
# what docs/security.md says each gets, written out
DOCUMENTED = {
    "n1": ["DNS:n1", "URI:malla://n1"],
    "worker_1": ["URI:malla://worker_1"],
    "billing eu": ["URI:malla://billing%20eu"],
    "Zürich": ["URI:malla://Z%C3%BCrich"],
}


class EchoA(pkg.Service, global_=True):
    def echo(self, x):
        return ["a", x]


class EchoB(pkg.Service, global_=True):
    def echo(self, x):
        return ["b", x]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """`malla cert` run as a user runs it: a CA and NAMES in one directory,
    another CA with an intruder in another."""
    root = tmp_path_factory.mktemp("pki")
    ours, other = str(root / "ours"), str(root / "other")
    for out, names in ((ours, NAMES), (other, ["intruder"])):
        made = malla("cert", "ca", "--out", out)
        assert made.returncode == 0, made.stderr
        made = malla("cert", "node", *names, "--ca", out, "--out", out)
        assert made.returncode == 0, made.stderr
        assert made.stdout.splitlines() == [
            f"wrote {out}/{n}.pem and {out}/{n}-key.pem (the key 0600)" for n in names]
    return ours, other


def files(folder: str, name: str) -> tuple[str, str, str]:
    """(certificate, key, CA) of node `name` in a directory `malla cert` wrote."""
    return (os.path.join(folder, f"{name}.pem"), os.path.join(folder, f"{name}-key.pem"),
            os.path.join(folder, "ca.pem"))


def load(path: str) -> x509.Certificate:
    with open(path, "rb") as fh:
        return x509.load_pem_x509_certificate(fh.read())


def sans(cert: x509.Certificate) -> list[str]:
    """The SANs as openssl prints them (`DNS:n1`, `URI:malla://n1`), in order."""
    prefix = {x509.DNSName: "DNS", x509.UniformResourceIdentifier: "URI"}
    return [f"{prefix[type(g)]}:{g.value}"
            for g in cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value]


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def check_node_cert(path: str, name: str, ca: x509.Certificate) -> None:
    """A node certificate for `name` as docs/security.md's table says."""
    cert = load(path)
    assert sans(cert) == certs.sans_of(name)
    assert name in [certs.name_of_uri(s[4:]) for s in sans(cert) if s.startswith("URI:")]
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    usage = ext.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign
    assert set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    cert.verify_directly_issued_by(ca)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"


def check_ca_cert(path: str) -> x509.Certificate:
    cert = load(path)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.value.ca is True and constraints.critical
    assert cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    cert.verify_directly_issued_by(cert)          # self-signed
    return cert


def test_malla_cert_writes_what_the_docs_say(pki):
    ours, _ = pki
    ca = check_ca_cert(os.path.join(ours, "ca.pem"))
    assert ca.not_valid_after_utc - ca.not_valid_before_utc >= datetime.timedelta(days=3650)
    assert mode(os.path.join(ours, "ca-key.pem")) == 0o600
    for name in NAMES:
        cert_path, key_path, _ = files(ours, name)
        check_node_cert(cert_path, name, ca)
        assert mode(key_path) == 0o600
        if name in DOCUMENTED:
            assert sans(load(cert_path)) == DOCUMENTED[name]
    n1 = load(files(ours, "n1")[0])
    assert n1.not_valid_after_utc - n1.not_valid_before_utc == datetime.timedelta(
        days=365, minutes=5)
    long_name = load(files(ours, "x" * 70)[0])    # too long for a CN: SANs critical
    assert len(long_name.subject) == 0
    assert long_name.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_help_teaches():
    out = malla("cert", "node", "--help")
    assert out.returncode == 0 and "example:" in out.stdout and "malla[cert]" in out.stdout


def test_what_is_a_dns_name_and_the_uri_round_trip():
    assert [certs.is_dns_name(n) for n in ("n1", "a-b.c9", "-a", "a_b", "*.x", "a.", "é",
                                           "a" * 64, "a" * 63)] == [
        True, True, False, False, False, False, False, False, True]
    for name in ("n1", "a b", "%41", "a/b?c#d", "Zürich", "😀", "malla://x"):
        uri = certs.node_uri(name)
        assert uri.isascii() and certs.name_of_uri(uri) == name
    assert certs.node_uri("%41") == "malla://%2541"     # never read back as "A"
    assert [certs.name_of_uri(u) for u in ("https://n1", "malla://", "malla://%FF")] == [
        None, None, None]


def test_mistakes_write_nothing_and_exit_2(pki, tmp_path, capsys):
    ours, _ = pki

    def cert(*args: str) -> tuple[int, str]:
        code = cli_main(["cert", *args])
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1, err
        return code, err

    out = str(tmp_path / "out")
    # n1 exists: not even the new n9 is written
    os.makedirs(out)
    with open(os.path.join(out, "n1.pem"), "w") as fh:
        fh.write("mine")
    assert cert("node", "n9", "n1", "--ca", ours, "--out", out) == (
        2, f"malla cert: {out}/n1.pem exists (never overwritten: remove it first)\n")
    assert sorted(os.listdir(out)) == ["n1.pem"]
    code, err = cert("node", "a/b", "--ca", ours, "--out", out)
    assert code == 2 and "'a/b' cannot name a file" in err
    code, err = cert("node", "n9", "n9", "--ca", ours, "--out", out)
    assert code == 2 and "given twice" in err
    code, err = cert("node", "n9", "--ca", str(tmp_path), "--out", out)
    assert code == 2 and "cannot read the CA" in err
    code, err = cert("ca", "--out", ours)
    assert code == 2 and "ca.pem exists" in err
    # a node's certificate and key are not a CA
    fake = tmp_path / "fake"
    fake.mkdir()
    cert_path, key_path, _ = files(ours, "n2")
    os.symlink(cert_path, fake / "ca.pem")
    os.symlink(key_path, fake / "ca-key.pem")
    code, err = cert("node", "n9", "--ca", str(fake), "--out", out)
    assert code == 2 and "are not a CA certificate" in err
    assert sorted(os.listdir(out)) == ["n1.pem"]


def test_without_cryptography_it_says_how_to_get_it(tmp_path):
    out = str(tmp_path / "ca")
    code = ("import sys; sys.modules['cryptography'] = None\n"
            "import malla.certs, malla.tls\n"     # the rest imports without it
            "print(malla.certs.sans_of('n1'))\n"
            "from malla.cli import main\n"
            f"sys.exit(main(['cert', 'ca', '--out', {out!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=ENV, cwd=ROOT, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "['DNS:n1', 'URI:malla://n1']\n"
    assert proc.stderr == ("malla cert: making certificates needs the cryptography package: "
                           "pip install malla[cert]\n")
    assert not os.path.exists(out)


async def call_each_other(make, first: str, second: str, folder: str) -> None:
    """Nodes `first` and `second` (their certificates in `folder`) call
    each other over mutual TLS, each seeing the other's SANs."""
    made = []
    for name in (first, second):
        paths = files(folder, name)
        made.append(await make(name, ssl_server=tls.server_context(*paths),
                               ssl_client=tls.client_context(*paths)).start())
    a, b = made
    await a.start_service(EchoA)
    await b.start_service(EchoB)
    await b.connect(seed_of(a))
    assert await a.wait_for_services(["EchoB"], retries=5)
    assert await b.wait_for_services(["EchoA"], retries=5)
    assert await b.remote("EchoA", "echo", [1]) == ["a", 1]
    assert await a.remote("EchoB", "echo", [2]) == ["b", 2]
    for me, peer in ((a, second), (b, first)):
        transport = me._cluster.connected[peer].proto.transport
        assert transport.get_extra_info("ssl_object") is not None
        # what a matcher reads from the socket: the SANs as written
        seen = transport.get_extra_info("peercert")["subjectAltName"]
        assert [f"{kind}:{value}" for kind, value in seen] == certs.sans_of(peer)


def test_two_nodes_call_each_other_over_tls_and_another_ca_is_refused(pki):
    ours, other = pki

    async def main(make):
        await call_each_other(make, "n1", "billing eu", ours)
        n2 = await make("n2", ssl_server=tls.server_context(*files(ours, "n2")),
                        ssl_client=tls.client_context(*files(ours, "n2"))).start()
        # the intruder's certificate is of another CA; it trusts ours, to get
        # as far as presenting it
        cert, key, _ = files(other, "intruder")
        ca = os.path.join(ours, "ca.pem")
        intruder = await make("intruder", ssl_server=tls.server_context(cert, key, ca),
                              ssl_client=tls.client_context(cert, key, ca)).start()
        # n2 refuses its certificate, as acceptor (the dialler sees the
        # connection closed) and as dialler
        with pytest.raises(pkg.MallaError):
            await intruder.connect(seed_of(n2))
        with pytest.raises(pkg.MallaError, match="TLS handshake"):
            await n2.connect(seed_of(intruder))
        assert n2.peers() == [] and intruder.peers() == []

    with_nodes(main)


def test_malla_node_reached_by_malla_call_with_them(pki, nodes):  # noqa: F811
    ours, _ = pki

    def flags(name: str) -> list[str]:
        cert, key, ca = files(ours, name)
        return ["--tls-cert", cert, "--tls-key", key, "--tls-ca", ca]

    n1 = nodes("n1", "--service", "examples.calculator:Calculator", *flags("n1"))
    out = malla("call", "Calculator.add", "1", "2", "--seed", n1.seed, "--name", "cli",
                *flags("cli"))
    assert out.returncode == 0 and json.loads(out.stdout) == 3, out.stderr


def openssl_recipe() -> list[str]:
    """The ```sh blocks of docs/security.md's openssl recipe, as written."""
    with open(os.path.join(ROOT, "docs", "security.md"), encoding="utf-8") as fh:
        section = fh.read().split("## Certificates for development", 1)[1].split("\n## ")[0]
    blocks = re.findall(r"^```sh\n(.*?)^```", section, re.S | re.M)
    recipe = [b for b in blocks if "openssl" in b]
    assert len(recipe) == 2, blocks       # the CA, then a node
    return recipe


def test_the_documented_openssl_recipe_makes_equivalent_certificates(tmp_path):
    openssl = require_tool("openssl", "openssl", needed_by="the certificate tests")
    env = dict(os.environ, PATH=f"{os.path.dirname(openssl)}{os.pathsep}{os.environ['PATH']}")
    for block in openssl_recipe():
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    folder = str(tmp_path)
    assert sorted(os.listdir(folder)) == ["ca-key.pem", "ca.pem", "n1-key.pem", "n1.pem"]
    ca = check_ca_cert(os.path.join(folder, "ca.pem"))
    check_node_cert(os.path.join(folder, "n1.pem"), "n1", ca)
    assert mode(os.path.join(folder, "ca-key.pem")) == mode(
        os.path.join(folder, "n1-key.pem")) == 0o600
    # openssl's CA is one `malla cert node` issues from, and the two
    # certificates work together
    assert cli_main(["cert", "node", "n2", "--ca", folder, "--out", folder]) == 0
    check_node_cert(os.path.join(folder, "n2.pem"), "n2", ca)
    with_nodes(lambda make: call_each_other(make, "n1", "n2", folder))
