"""Turning connect targets into addresses, as Malla.Cluster does.

* ``host:port`` — that address (the host resolved when dialling);
* ``name@domain`` — every A record of ``domain``, on the default port
  (``name@domain:port`` for another port);
* a bare domain (``_malla._tcp.example.com``) — its SRV records: targets and
  ports (targets' A records looked up).

For Kubernetes, point ``Node(connect=[...])`` at a headless service: its A
or SRV records list every pod, and the node re-resolves them periodically.
Queries go to ``dns_servers`` when given (``"127.0.0.1:5353"``), else to the
system's resolver.  dnspython does the queries.
"""

from __future__ import annotations

import asyncio
import socket

import dns.asyncresolver
import dns.exception
import dns.resolver

__all__ = ["DEFAULT_PORT", "Resolver", "parse_address"]

DEFAULT_PORT = 4370


def parse_address(target: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """'host:port', '[v6]:port', '[v6]', a bare host or a bare IPv6 literal
    ('::1') -> (host, port)."""
    if target.startswith("["):
        host, closed, rest = target[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise ValueError(f"bad address {target!r}: an IPv6 address with a port "
                             "is written [v6]:port")
        return host, _port(rest[1:], target) if rest else default_port
    if target.count(":") > 1:
        # more than one colon: an IPv6 literal, which has no port unless
        # bracketed ('::1:4370' is itself an IPv6 address)
        if _is_ip(target):
            return target, default_port
        raise ValueError(f"bad address {target!r}: an IPv6 address with a port "
                         "is written [v6]:port")
    host, sep, port = target.rpartition(":")
    if not sep:
        return target, default_port
    return host, _port(port, target)


def format_address(host: str, port: int) -> str:
    """The target `parse_address` reads back as (host, port): an IPv6
    host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _port(text: str, target: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"bad address {target!r}: the port must be a number") from None


def kind_of(target: str) -> str:
    """'address', 'a' (name@domain) or 'srv' (a bare domain)."""
    if "@" in target:
        return "a"
    if ":" in target or _is_ip(target) or target == "localhost":
        return "address"
    return "srv"


def _is_ip(text: str) -> bool:
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.inet_pton(family, text)
            return True
        except OSError:
            pass
    return False


class Resolver:
    """Resolves connect targets to (host, port) lists."""

    def __init__(self, dns_servers: list[str] | None = None,
                 default_port: int = DEFAULT_PORT, timeout: float = 2.0) -> None:
        self.default_port = default_port
        if dns_servers:
            self._resolver = dns.asyncresolver.Resolver(configure=False)
            self._resolver.nameservers = []
            self._resolver.nameserver_ports = {}
            for server in dns_servers:
                host, port = parse_address(server, 53)
                self._resolver.nameservers.append(host)
                self._resolver.nameserver_ports[host] = port
        else:
            self._resolver = dns.asyncresolver.Resolver()
        self._resolver.lifetime = timeout

    async def resolve(self, target: str) -> list[tuple[str, int]]:
        """Addresses for `target`, sorted; raises ConnectionError when the
        name does not resolve."""
        kind = kind_of(target)
        if kind == "address":
            return [parse_address(target, self.default_port)]
        try:
            if kind == "a":
                domain, port = parse_address(target.split("@", 1)[1], self.default_port)
                return sorted((ip, port) for ip in await self._a(domain))
            answer = await self._resolver.resolve(target, "SRV")
            out: list[tuple[str, int]] = []
            for record in answer:
                host = str(record.target).rstrip(".")
                ips = [host] if _is_ip(host) else await self._a(host)
                out.extend((ip, int(record.port)) for ip in ips)
            return sorted(set(out))
        except (dns.exception.DNSException, OSError) as exc:
            raise ConnectionError(f"cannot resolve {target!r}: {exc}") from exc

    async def _a(self, name: str) -> list[str]:
        answer = await self._resolver.resolve(name, "A")
        return [str(record) for record in answer]


async def resolve_all(resolver: Resolver, targets: list[str]) -> list[tuple[str, int]]:
    """Every address of every target; targets that fail to resolve are skipped."""
    results = await asyncio.gather(*(resolver.resolve(t) for t in targets),
                                   return_exceptions=True)
    out: set[tuple[str, int]] = set()
    for result in results:
        if not isinstance(result, BaseException):
            out.update(result)
    return sorted(out)
