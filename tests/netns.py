"""Test hosts in network namespaces joined by veth pairs to one bridge.

    with Topology(["h1", "h2", "h3"]) as topo:
        topo.addr("h1")        # the host's address, e.g. "10.213.7.11"
        topo.run("h1", argv)   # a process inside the host's namespace
        topo.cut("h2")         # link down: a partition, no TCP reset
        topo.heal("h2")

The test process sits in the root namespace on the bridge (topo.gateway).
Every namespace, link and bridge is deleted on exit, also after a failure.

    with Namespace("dns", resolv_conf="nameserver 127.0.0.1\n...") as ns:
        ns.run(argv)           # sees that text as its /etc/resolv.conf

A lone namespace with only its loopback up, and its own resolv.conf (what
`ip netns exec` mounts over /etc/resolv.conf): the system resolver of a pod.
Needs root and iproute2: without them `require()` fails with how to run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, TypeVar

__all__ = ["Namespace", "Topology", "require"]

SUBNET_PREFIX = "10.213"


def require() -> None:
    """Fail (not skip) with instructions when namespaces cannot be made here."""
    if shutil.which("ip") is None:
        raise RuntimeError("the network-namespace suite needs iproute2 ('ip'): "
                           "apt-get install iproute2, then run make test as root")
    if os.geteuid() != 0:
        raise RuntimeError("the network-namespace suite needs root (ip netns, veth): "
                           "run make test as root, e.g. sudo make test")


def _ip(*args: str, check: bool = True) -> None:
    subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def _exec(ns: str, argv: list[str], procs: list[subprocess.Popen[Any]],
          **kw: Any) -> subprocess.Popen[Any]:
    proc = subprocess.Popen(["ip", "netns", "exec", ns, *argv], **kw)
    procs.append(proc)
    return proc


def _kill_all(procs: list[subprocess.Popen[Any]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            try:
                os.kill(proc.pid, 18)  # SIGCONT, so that a stopped one can die
            except ProcessLookupError:
                pass
            proc.kill()
            proc.wait()


M = TypeVar("M", bound="_Made")


class _Made:
    """Made on enter (`_make`), unmade on exit (`_unmake`, after its
    processes are killed), and also when making fails half-way."""

    _procs: list[subprocess.Popen[Any]]

    def _make(self) -> None:
        raise NotImplementedError

    def _unmake(self) -> None:
        raise NotImplementedError

    def __enter__(self: M) -> M:
        try:
            self._make()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        _kill_all(self._procs)
        self._unmake()


class Topology(_Made):
    def __init__(self, hosts: list[str]) -> None:
        require()
        tag = os.getpid() % 200 + 20
        self.tag = f"m{os.getpid() % 100000}"
        self.subnet = f"{SUBNET_PREFIX}.{tag}"
        self.bridge = f"{self.tag}br"
        self.gateway = f"{self.subnet}.1"
        self.hosts = {h: i + 11 for i, h in enumerate(hosts)}
        self._procs: list[subprocess.Popen[Any]] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def link(self, host: str) -> str:
        return f"{self.tag}{host}"[:15]

    def addr(self, host: str) -> str:
        return f"{self.subnet}.{self.hosts[host]}"

    def _make(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for host in self.hosts:
            ns, outside = self.ns(host), self.link(host)
            _ip("netns", "add", ns)
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(host)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")

    def _unmake(self) -> None:
        for host in self.hosts:
            _ip("link", "del", self.link(host), check=False)
            _ip("netns", "del", self.ns(host), check=False)
        _ip("link", "del", self.bridge, check=False)

    def run(self, host: str, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return _exec(self.ns(host), argv, self._procs, **kw)

    def cut(self, host: str) -> None:
        """Take the host's link down: its packets vanish, nothing is reset."""
        _ip("link", "set", self.link(host), "down")

    def heal(self, host: str) -> None:
        _ip("link", "set", self.link(host), "up")


class Namespace(_Made):
    """A network namespace with its loopback up and `resolv_conf` as the
    /etc/resolv.conf its processes see; deleted (with that file) on exit."""

    def __init__(self, name: str, resolv_conf: str) -> None:
        require()
        self.name = f"m{os.getpid() % 100000}-{name}"
        self.resolv_conf = resolv_conf
        self.etc = os.path.join("/etc/netns", self.name)
        self._procs: list[subprocess.Popen[Any]] = []

    def _make(self) -> None:
        _ip("netns", "add", self.name)
        _ip("-n", self.name, "link", "set", "lo", "up")
        os.makedirs(self.etc, exist_ok=True)
        with open(os.path.join(self.etc, "resolv.conf"), "w") as f:
            f.write(self.resolv_conf)

    def _unmake(self) -> None:
        _ip("netns", "del", self.name, check=False)
        shutil.rmtree(self.etc, ignore_errors=True)

    def run(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        return _exec(self.name, argv, self._procs, **kw)
