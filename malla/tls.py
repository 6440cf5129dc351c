"""TLS contexts for a node: `Node(ssl_server=server_context(...),
ssl_client=client_context(...))` (docs/security.md, "TLS").

Mutual TLS with one private CA: each side presents its certificate and
verifies the other's against the CA.  Host names are not checked
(`check_hostname` off): the mesh dials the addresses peers announce, mostly
IPs, and a pod's IP is not in its certificate; what admits a peer is a
certificate signed by the cluster's CA, and then the cookie.
"""

from __future__ import annotations

import ssl

__all__ = ["client_context", "server_context"]


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
