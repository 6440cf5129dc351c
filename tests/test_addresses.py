"""Addresses as targets: IPv4, names and IPv6 literals parsed right, and a
cluster over IPv6 loopback (real TCP on ::1)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from support import wait_until, with_nodes

import malla
from malla.dns import DEFAULT_PORT, format_address, parse_address

ports = st.integers(1, 65535)
v4 = st.ip_addresses(v=4).map(str)
v6 = st.ip_addresses(v=6).map(str)
names = st.from_regex(r"[a-z][a-z0-9-]{0,20}(\.[a-z][a-z0-9-]{0,20}){0,3}", fullmatch=True)


@given(host=st.one_of(v4, v6, names), port=ports)
def test_a_formatted_address_parses_back(host, port):
    assert parse_address(format_address(host, port)) == (host, port)


@given(host=v6)
def test_a_bare_ipv6_literal_is_a_host_on_the_default_port(host):
    assert parse_address(host) == (host, DEFAULT_PORT)
    assert parse_address(f"[{host}]") == (host, DEFAULT_PORT)


@pytest.mark.parametrize(("target", "expected"), [
    ("::1", ("::1", DEFAULT_PORT)),
    ("[::1]:5000", ("::1", 5000)),
    ("::1:5000", ("::1:5000", DEFAULT_PORT)),    # itself an IPv6 address
    ("10.0.0.1:99", ("10.0.0.1", 99)),
    ("db.example", ("db.example", DEFAULT_PORT)),
])
def test_the_targets_users_write(target, expected):
    assert parse_address(target) == expected


@pytest.mark.parametrize("target", ["1:2:3", "[::1", "[::1]5000", "[::1]:x", "host:port"])
def test_a_malformed_target_is_refused_saying_how_to_write_it(target):
    with pytest.raises(ValueError, match="bad address"):
        parse_address(target)


def test_a_cluster_meshes_and_calls_over_ipv6_loopback():
    class Echo(malla.Service, global_=True):
        def echo(self, x):
            return x

    async def main(make):
        a = await make("a", host="::1").start()
        assert a.address[0] == "::1"
        await a.start_service(Echo)
        b = await make("b", host="::1", seeds=[f"[::1]:{a.address[1]}"]).start()
        # c knows only b: it meets a through the mesh, at a's IPv6 address
        c = await make("c", host="::1", seeds=[f"[::1]:{b.address[1]}"]).start()
        await wait_until(lambda: sorted(c.peers()) == ["a", "b"])
        assert c.members()["a"] == ("::1", a.address[1])
        assert await c.remote("Echo", "echo", ["over v6"]) == "over v6"
        with pytest.raises(malla.InvalidOption, match=r"\[v6\]:port"):
            await c.connect(f"::1:{a.address[1]}x")
        return True

    assert with_nodes(main) is True
