"""Turning connect targets into addresses, as Malla.Cluster does.

* ``host:port`` — that address (the host resolved when dialling);
* ``name@domain`` — every A and AAAA record of ``domain`` (both asked at
  once), on the default port (``name@domain:port`` for another port);
* a bare domain (``_malla._tcp.example.com``) — its SRV records: targets and
  ports, in RFC 2782 order (targets' A and AAAA records looked up).

Names are completed as the system's resolver completes them: resolv.conf's
``search`` list and ``ndots`` (Kubernetes pods have ``ndots:5`` and
``search <ns>.svc.cluster.local svc.cluster.local cluster.local``, so
``storage@storage`` finds the headless service of the pod's namespace); a
trailing dot makes a name absolute.

For Kubernetes, point ``Node(connect=[...])`` at a headless service: its A
or SRV records list every pod, and the node re-resolves them periodically.
Queries go to ``dns_servers`` when given (``"127.0.0.1:5353"``), else to the
system's resolver.  dnspython does the queries.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
from typing import Any, TypeVar

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.resolver

from malla import exceptions as mexc

__all__ = ["DEFAULT_PORT", "Resolver", "format_address", "parse_address", "search_names",
           "srv_order"]

log = logging.getLogger("malla.dns")

DEFAULT_PORT = 4370
# where the system's resolver reads its nameservers, search list and ndots
# (`ip netns exec` mounts /etc/netns/NAME/resolv.conf over it)
RESOLV_CONF = "/etc/resolv.conf"

T = TypeVar("T")


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
    """Resolves connect targets to (host, port) lists, as the system's
    resolver would (resolv.conf(5)): a name with fewer dots than ``ndots``
    is tried with each ``search`` domain first, then as it is; one with at
    least ``ndots`` dots as it is first; a name ending in a dot only as it
    is.  ``dns_servers`` replace only the ``nameserver`` lines: the search
    list and ``ndots`` still come from /etc/resolv.conf (as c-ares does), so
    a short name means the same whoever is asked."""

    def __init__(self, dns_servers: list[str] | None = None,
                 default_port: int = DEFAULT_PORT, timeout: float = 5.0) -> None:
        self.default_port = default_port
        self.timeout = timeout
        # why no query can be made (no nameserver at all, a bad server)
        self._broken: str | None = None
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        try:
            self._resolver.read_resolv_conf(RESOLV_CONF)
        except dns.resolver.NoResolverConfiguration as exc:
            # read_resolv_conf took the search list and options before it
            # found no nameserver line: only the nameservers are missing
            if not dns_servers:
                self._broken = f"the system resolver has no nameserver ({RESOLV_CONF}: {exc})"
        if dns_servers:
            self.source = "DNS servers " + ", ".join(dns_servers)
            try:
                self._resolver.nameservers = [_nameserver(s) for s in dns_servers]
            except ValueError as exc:
                self._broken = str(exc)
        else:
            servers = ", ".join(str(s) for s in self._resolver.nameservers)
            self.source = f"the system resolver, nameserver {servers or 'none'} in {RESOLV_CONF}"

    def names_to_try(self, name: str) -> list[dns.name.Name]:
        """The absolute names a lookup of `name` asks for, in order."""
        search = list(self._resolver.search)
        if not search and self._resolver.domain != dns.name.root:
            search = [self._resolver.domain]     # resolv.conf's "domain" line
        ndots = self._resolver.ndots
        return search_names(name, search, 1 if ndots is None else ndots)

    async def resolve(self, target: str) -> list[tuple[str, int]]:
        """Addresses for `target`: a name@domain's A and AAAA records sorted,
        a bare domain's SRV targets in RFC 2782 order (see `srv_order`).
        Raises Unreachable, naming the target and who was asked, when it
        does not resolve or no answer comes within `timeout`."""
        kind = kind_of(target)
        if kind == "address":
            return [parse_address(target, self.default_port)]
        if self._broken is not None:
            raise mexc.Unreachable(f"cannot resolve {target!r}: {self._broken}")
        deadline = asyncio.get_running_loop().time() + self.timeout
        try:
            if kind == "a":
                domain, port = parse_address(target.split("@", 1)[1], self.default_port)
                return [(ip, port) for ip in await self._addresses(domain, deadline)]
            return await self._srv(target, deadline)
        except _NotFound as exc:
            raise mexc.Unreachable(f"cannot resolve {target!r}: {exc}; asked {self.source}"
                                   ) from None
        except (dns.exception.Timeout, TimeoutError) as exc:
            raise mexc.Unreachable(f"cannot resolve {target!r}: no answer within "
                                   f"{self.timeout:g} s; asked {self.source}") from exc
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            raise mexc.Unreachable(f"cannot resolve {target!r}: {exc}; asked {self.source}"
                                   ) from exc

    async def _srv(self, name: str, deadline: float) -> list[tuple[str, int]]:
        records = await self._first_found(name, ("SRV",), deadline)
        # a target of "." says the service is not offered there (RFC 2782)
        ordered = [r for r in srv_order([(r.priority, r.weight, r) for r in records])
                   if r.target != dns.name.root]
        found = await asyncio.gather(
            *(self._target_addresses(r.target, deadline) for r in ordered))
        out: dict[tuple[str, int], None] = {}     # in order, without repeats
        for record, ips in zip(ordered, found, strict=True):
            for ip in ips:
                out[(ip, int(record.port))] = None
        if not out:
            raise _NotFound(f"no target of the SRV records of {name!r} resolves")
        return list(out)

    async def _target_addresses(self, target: dns.name.Name, deadline: float) -> list[str]:
        text = target.to_text()
        if _is_ip(text.rstrip(".")):
            return [text.rstrip(".")]
        try:
            return await self._addresses(text, deadline)
        except _NotFound as exc:
            # the other targets still count: one pod's name may lag behind
            log.debug("malla: SRV target skipped: %s", exc)
            return []

    async def _addresses(self, name: str, deadline: float) -> list[str]:
        """Every A and AAAA address of `name`, asked for together."""
        if _is_ip(name):
            return [name]
        records = await self._first_found(name, ("A", "AAAA"), deadline)
        return sorted({str(r) for r in records}, key=_address_order)

    async def _first_found(self, name: str, rdtypes: tuple[str, ...],
                           deadline: float) -> list[Any]:
        """The records of the first name of `names_to_try(name)` that has
        any of `rdtypes`; a name that does not exist (or has none of them,
        or whose servers fail it) moves on to the next, as getaddrinfo does,
        but a timeout ends the lookup: there is no time left to go on."""
        tried = self.names_to_try(name)
        failed: BaseException | None = None    # the servers' last failure
        answered = False                       # some name definitely has none
        for qname in tried:
            answers = await self._ask(qname, rdtypes, deadline)
            records = [r for a in answers if isinstance(a, dns.resolver.Answer) for r in a]
            if records:
                return records
            for answer in answers:
                if isinstance(answer, _NO_SUCH):
                    answered = True
                elif isinstance(answer, dns.resolver.NoNameservers):
                    failed = answer
                elif isinstance(answer, BaseException):
                    raise answer
            log.debug("malla: no %s records for %s", "/".join(rdtypes), qname)
        names = ", ".join(q.to_text() for q in tried)
        if failed is not None and not answered:
            raise _NotFound(f"the DNS servers failed {name!r} (tried {names}): {failed}")
        raise _NotFound(f"no {' or '.join(rdtypes)} records for {name!r} (tried {names})")

    async def _ask(self, qname: dns.name.Name, rdtypes: tuple[str, ...],
                   deadline: float) -> list[Any]:
        """The answers (or errors) for each of `rdtypes`, asked at once; one
        still unanswered at `deadline` is a Timeout, the others count."""
        loop = asyncio.get_running_loop()
        remaining = max(deadline - loop.time(), 0.001)
        tasks = [asyncio.ensure_future(self._resolver.resolve(
            qname, rdtype, search=False, lifetime=remaining)) for rdtype in rdtypes]
        try:
            # dnspython may overrun its lifetime by its retry back-off: the
            # deadline is ours to keep
            _, late = await asyncio.wait(tasks, timeout=remaining)
        finally:
            # also when the lookup itself is cancelled (a connect() given up)
            for task in tasks:
                task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        return [TimeoutError() if t in late
                else t.exception() or t.result() for t in tasks]


class _NotFound(Exception):
    """No name tried has the records looked for."""


# the answers saying a name has no records of a type
_NO_SUCH = (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer)


def search_names(name: str, search: list[dns.name.Name], ndots: int) -> list[dns.name.Name]:
    """resolv.conf(5)'s order: `name` itself first when it ends in a dot
    (then only itself) or has at least `ndots` dots; otherwise after the
    names made with each search domain."""
    if name.endswith("."):
        return [dns.name.from_text(name)]
    relative = dns.name.from_text(name, origin=None)
    searched = [relative.concatenate(domain) for domain in search]
    absolute = relative.concatenate(dns.name.root)
    if name.count(".") >= ndots:
        return [absolute, *searched]
    return [*searched, absolute]


def srv_order(records: list[tuple[int, int, T]], rng: random.Random | None = None) -> list[T]:
    """RFC 2782's order of (priority, weight, item): lowest priority first;
    within a priority, each next one drawn at random in proportion to its
    weight; weight-0 ones (RFC 2782: "a very small chance") after the
    weighted ones, in random order.  Go's net.LookupSRV orders them so."""
    draw = rng or random
    out: list[T] = []
    for priority in sorted({p for p, _, _ in records}):
        group = [(w, item) for p, w, item in records if p == priority]
        draw.shuffle(group)
        total = sum(w for w, _ in group)
        while total > 0:
            point = draw.randrange(total)
            running = 0
            for i, (weight, _) in enumerate(group):
                running += weight
                if running > point:
                    total -= weight
                    out.append(group.pop(i)[1])
                    break
        out.extend(item for _, item in group)    # the weight-0 ones
    return out


def _nameserver(server: str) -> dns.nameserver.Do53Nameserver:
    host, port = parse_address(server, 53)
    if not _is_ip(host):
        raise ValueError(f"a DNS server is an IP address with an optional port, not {server!r}")
    return dns.nameserver.Do53Nameserver(host, port)


def _address_order(ip: str) -> tuple[int, bytes]:
    # IPv4 before IPv6, each in numeric order
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    return family, socket.inet_pton(family, ip)


async def resolve_all(resolver: Resolver, targets: list[str]) -> list[tuple[str, int]]:
    """Every address of every target; targets that fail to resolve are
    skipped (logged at DEBUG: the next round tries them again)."""
    results = await asyncio.gather(*(resolver.resolve(t) for t in targets),
                                   return_exceptions=True)
    out: set[tuple[str, int]] = set()
    for target, result in zip(targets, results, strict=True):
        if isinstance(result, BaseException):
            log.debug("malla: %s", result if isinstance(result, mexc.Unreachable)
                      else f"cannot resolve {target!r}: {result!r}")
        else:
            out.update(result)
    return sorted(out)
