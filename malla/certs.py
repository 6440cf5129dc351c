"""Certificates for development: a CA and per-node certificates that bind a
node's name (`malla cert`, docs/security.md "Certificates for development").

    make_ca("certs")                       # certs/ca.pem, certs/ca-key.pem
    issue("n1", ca_dir="certs", out="certs")   # certs/n1.pem, certs/n1-key.pem

A node's certificate names it in its subject alternative names (SANs):
`DNS:<name>` when the name is a DNS host name (RFC 1123 letters, digits and
hyphens, labels of 1-63, at most 253 in all), and always the URI
`malla://<name>`, the name percent-encoded as UTF-8 except for the
unreserved characters of RFC 3986 (letters, digits, `-._~`), so any node
name fits; `name_of_uri()` is its inverse.  That is what `identity="tls"`
matches a peer's name against.

Needs the `cryptography` package (`pip install malla[cert]`), imported when
a certificate is made, so the rest of this module (the naming rules) and of
malla work without it.  Keys are EC P-256, unencrypted PKCS#8 PEM, written
0600; a file that exists is never overwritten.
"""

from __future__ import annotations

import datetime
import os
import re
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote

from malla.exceptions import InvalidOption

if TYPE_CHECKING:
    from typing import TypeAlias

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    _CAKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

__all__ = ["CA_DAYS", "NODE_DAYS", "URI_SCHEME", "is_dns_name", "issue", "issue_all", "make_ca",
           "name_of_uri", "node_files", "node_uri", "sans_of"]

URI_SCHEME = "malla://"
CA_DAYS, NODE_DAYS = 3650, 365
CA_CERT, CA_KEY = "ca.pem", "ca-key.pem"
# some clock skew between the machine that issues and the nodes that verify
_BACKDATE = datetime.timedelta(minutes=5)
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_CN_MAX = 64   # X.520's upper bound on a common name


def is_dns_name(name: str) -> bool:
    """Whether `name` can be a `DNS:` SAN: an RFC 1123 host name (no
    wildcard, no trailing dot, no underscore)."""
    return (0 < len(name) <= 253 and name.isascii()
            and all(_LABEL.match(label) for label in name.split(".")))


def node_uri(name: str) -> str:
    """The URI SAN naming node `name`: `malla://` and the name, percent-encoded
    (UTF-8) but for RFC 3986's unreserved characters."""
    return URI_SCHEME + quote(name, safe="", encoding="utf-8", errors="strict")


def name_of_uri(uri: str) -> str | None:
    """The node name a `malla://` URI SAN names (the inverse of node_uri);
    None for another URI or an encoding that is not UTF-8."""
    if not uri.startswith(URI_SCHEME) or len(uri) == len(URI_SCHEME):
        return None
    try:
        return unquote(uri[len(URI_SCHEME):], encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        return None


def sans_of(name: str) -> list[str]:
    """The SANs a node certificate for `name` carries, as openssl prints
    them (`DNS:n1`, `URI:malla://n1`)."""
    return ([f"DNS:{name}"] if is_dns_name(name) else []) + [f"URI:{node_uri(name)}"]


def node_files(name: str, out: str) -> tuple[str, str]:
    """(certificate, key) paths of node `name` under `out`: `<name>.pem`
    and `<name>-key.pem`; InvalidOption for a name that cannot be a file
    name (empty, `.`, `..`, or holding `/` or NUL)."""
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise InvalidOption(f"node name {name!r} cannot name a file: issue its "
                            "certificate with openssl (docs/security.md)")
    return os.path.join(out, f"{name}.pem"), os.path.join(out, f"{name}-key.pem")


def make_ca(out: str, *, days: int = CA_DAYS,
            common_name: str = "malla development CA") -> tuple[str, str]:
    """A self-signed CA in `out` (made if missing): (`ca.pem`, `ca-key.pem`)."""
    _require_cryptography()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    _check_days(days)
    cert_path, key_path = os.path.join(out, CA_CERT), os.path.join(out, CA_KEY)
    _refuse_existing([cert_path, key_path])
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE).not_valid_after(now + datetime.timedelta(days))
            # signs node certificates only, never another CA
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(out, [(key_path, _key_pem(key), 0o600), (cert_path, _cert_pem(cert), 0o644)])
    return cert_path, key_path


def issue(name: str, *, ca_dir: str, out: str, days: int = NODE_DAYS) -> tuple[str, str]:
    """A certificate and key for node `name`, signed by the CA in `ca_dir`,
    written in `out` (made if missing): (`<name>.pem`, `<name>-key.pem`)."""
    _require_cryptography()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    _check_days(days)
    cert_path, key_path = node_files(name, out)
    ca_cert, ca_key = _load_ca(ca_dir)
    _refuse_existing([cert_path, key_path])
    key = ec.generate_private_key(ec.SECP256R1())
    # the common name is for people reading the certificate; SANs identify
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]
                        if len(name) <= _CN_MAX else [])
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(node_uri(name))]
    if is_dns_name(name):
        sans.insert(0, x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    try:   # the issuer's own key identifier, which chain building matches
        aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
            ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value)
    except x509.ExtensionNotFound:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + datetime.timedelta(days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            # a node both accepts (server) and dials (client)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            # RFC 5280: critical when the subject is empty
            .add_extension(x509.SubjectAlternativeName(sans), critical=not subject)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(aki, critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(out, [(key_path, _key_pem(key), 0o600), (cert_path, _cert_pem(cert), 0o644)])
    return cert_path, key_path


def issue_all(names: list[str], *, ca_dir: str, out: str,
              days: int = NODE_DAYS) -> list[tuple[str, str]]:
    """issue() for each name, once every name is known to be a file name
    whose files do not exist yet (so a mistake writes nothing)."""
    for name in names:
        _refuse_existing(list(node_files(name, out)))
    if len(set(names)) < len(names):
        raise InvalidOption("a node name is given twice")
    return [issue(name, ca_dir=ca_dir, out=out, days=days) for name in names]


# -- helpers -------------------------------------------------------------------


def _require_cryptography() -> None:
    """ImportError saying how to get cryptography, when it is missing."""
    try:
        import cryptography.x509  # noqa: F401
    except ImportError as exc:
        raise ImportError("making certificates needs the cryptography package: "
                          "pip install malla[cert]") from exc


def _check_days(days: int) -> None:
    if isinstance(days, bool) or not isinstance(days, int) or days < 1:
        raise InvalidOption(f"a certificate's validity is a whole number of days above 0, "
                            f"not {days!r}")


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    from cryptography import x509
    # ECDHE_ECDSA signs the handshake (digital_signature); a CA signs certificates
    return x509.KeyUsage(digital_signature=not cert_sign, content_commitment=False,
                         key_encipherment=False, data_encipherment=False,
                         key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         encipher_only=False, decipher_only=False)


def _load_ca(ca_dir: str) -> tuple[x509.Certificate, _CAKey]:
    """The CA of `ca_dir` (what make_ca wrote); InvalidOption when it
    cannot be read or is not one."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    cert_path, key_path = os.path.join(ca_dir, CA_CERT), os.path.join(ca_dir, CA_KEY)
    try:
        with open(cert_path, "rb") as fh:
            cert_pem = fh.read()
        with open(key_path, "rb") as fh:
            key_pem = fh.read()
    except OSError as exc:
        raise InvalidOption(f"cannot read the CA (made by `malla cert ca`): "
                            f"{exc.strerror}: {exc.filename}") from None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise InvalidOption(f"{ca_dir} does not hold a CA made by `malla cert ca`: "
                            f"{exc}") from None
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca or not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)) or (
            key.public_key() != cert.public_key()):
        raise InvalidOption(f"{cert_path} and {key_path} are not a CA certificate and its "
                            "EC or RSA key (as `malla cert ca` makes)")
    return cert, key


def _refuse_existing(paths: list[str]) -> None:
    for path in paths:
        if os.path.lexists(path):
            raise FileExistsError(f"{path} exists (never overwritten: remove it first)")


def _write(out: str, files: list[tuple[str, bytes, int]]) -> None:
    """Create each file exclusively with its mode from the start (a key is
    never readable by others, not even for a moment)."""
    os.makedirs(out, exist_ok=True)
    for path, data, mode in files:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(path, mode)   # the umask may have narrowed a certificate's


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return cert.public_bytes(serialization.Encoding.PEM)
