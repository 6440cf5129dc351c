"""TLS contexts for a node: `Node(ssl_server=server_context(...),
ssl_client=client_context(...))` (docs/security.md, "TLS").

Mutual TLS with one private CA: each side presents its certificate and
verifies the other's against the CA.  Host names are not checked
(`check_hostname` off): the mesh dials the addresses peers announce, mostly
IPs, and a pod's IP is not in its certificate; what admits a peer is a
certificate signed by the cluster's CA, and then the cookie.

With ``Node(identity="tls")`` the certificate also says who the peer is:
the name a peer claims in its HELLO must be one its certificate vouches for
(`name_verifier`), so a node holding a valid certificate for another name
cannot pose as this one.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

from malla import exceptions as mexc
from malla.certs import is_dns_name, name_of_uri

__all__ = ["certificate_names", "client_context", "name_verifier", "server_context"]


def server_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The context a node accepts connections with: presents `cert`/`key`
    and requires a client certificate signed by `ca` (PEM file paths)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """The context a node dials with: presents `cert`/`key` and requires the
    peer's certificate to be signed by `ca`; host names not checked."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.load_cert_chain(cert, key)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


# -- certificate identity (Node(identity="tls"), docs/security.md) ----------------------

def _vouched(peercert: Any) -> list[tuple[str, str]]:
    # (kind, node name) for each SAN that can name a node
    out: list[tuple[str, str]] = []
    sans = peercert.get("subjectAltName", ()) if isinstance(peercert, dict) else ()
    for kind, value in sans:
        # only host names (ASCII, no wildcard): DNS's case rule is ASCII's
        if kind == "DNS" and is_dns_name(value):
            out.append(("DNS", value))
        elif kind == "URI" and (name := name_of_uri(value)) is not None:
            out.append(("URI", name))
    return out


def certificate_names(peercert: Any) -> list[str]:
    """The node names a peer's certificate (``getpeercert()``'s dict) vouches
    for: each DNS SAN, and each URI SAN ``malla://<name>`` (percent-decoded).
    A DNS SAN that is not a plain host name (a wildcard, non-ASCII) vouches
    for nothing: a node name is matched exactly."""
    return [name for _, name in _vouched(peercert)]


def _matches(name: str, peercert: Any) -> bool:
    # DNS names are case-insensitive in ASCII only (RFC 4343: Unicode's
    # lowercasing would let DNS:kafka vouch for "\u212aafka", Kelvin sign);
    # a URI's path is compared exactly
    return any((name.isascii() and vouched.lower() == name.lower()) if kind == "DNS"
               else vouched == name for kind, vouched in _vouched(peercert))


def name_verifier(transport: Any, role: str) -> Callable[[str], None]:
    """The check a handshake runs on the name its peer claims: the name must
    be one the peer's certificate vouches for (DNS SANs case-insensitively,
    ``malla://`` URI SANs exactly), else AuthenticationError naming both."""
    def verify(name: str) -> None:
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        if peercert and _matches(name, peercert):
            return
        vouched = ", ".join(certificate_names(peercert)) or "no node name"
        exc = mexc.AuthenticationError(
            f"the {role} claims to be node {name!r}, but its certificate names {vouched}")
        # what the refused peer is told (it knows its own certificate)
        exc.peer_message = f"your certificate does not name node {name!r}"  # type: ignore[attr-defined]
        raise exc
    return verify


def check_identity_contexts(ssl_server: Any, ssl_client: Any) -> str | None:
    """Why Node(identity="tls") cannot work with these contexts, or None:
    both must be given, the server must require client certificates and the
    client must verify the server's."""
    if not isinstance(ssl_server, ssl.SSLContext) or not isinstance(ssl_client, ssl.SSLContext):
        return 'identity="tls" needs both ssl_server and ssl_client (ssl.SSLContext)'
    if ssl_server.verify_mode != ssl.CERT_REQUIRED:
        return ('identity="tls" needs ssl_server to require client certificates '
                "(verify_mode CERT_REQUIRED; malla.tls.server_context does)")
    if ssl_client.verify_mode != ssl.CERT_REQUIRED:
        return ('identity="tls" needs ssl_client to verify the server '
                "(verify_mode CERT_REQUIRED; malla.tls.client_context does)")
    return None
