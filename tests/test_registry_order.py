"""The discovery table's call orders are derived lazily and kept in order as
peers come and go (malla.registry): after any sequence of joins, leaves,
service starts, stops, pauses and reshuffles, with reads anywhere between,
what it answers equals what an eager rebuild from scratch gives.  Entries
are stored by reference and compiled once per process."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from malla.registry import Registry

NODES = ["n0", "n1", "n2", "n3", "n4", "n5"]
SERVICES = ["A", "B", "C"]
LOCAL = "me"


def entry(paused: bool, global_: bool, allow: bool = False) -> dict[str, Any]:
    info: dict[str, Any] = {"vsn": "1", "functions": {"f": [["x", 1, False]]},
                            "paused": paused, "global": global_}
    if allow:
        info["allow"] = {"f": ["n*"]}
    return info


# a few distinct entries, each object used again and again (as a shared
# etcd watch hands every node the same decoded objects), and equal copies
ENTRIES = [entry(p, g) for p in (False, True) for g in (True, False)]
infos = st.one_of(st.sampled_from(ENTRIES),
                  st.builds(entry, st.booleans(), st.booleans()))
nodes, services = st.sampled_from(NODES), st.sampled_from(SERVICES)

ops = st.one_of(
    st.tuples(st.just("remote"), nodes, services, st.one_of(st.none(), infos)),
    st.tuples(st.just("local"), services, st.one_of(st.none(), infos)),
    st.tuples(st.just("table"), nodes, st.dictionaries(services, infos, max_size=3)),
    st.tuples(st.just("announce"), nodes, services, st.one_of(st.none(), infos)),
    st.tuples(st.just("drop"), nodes),
    st.tuples(st.just("reshuffle")),
    st.tuples(st.just("read"), services),
)


class Eager:
    """The model: every peer's table, the local one, and the orders built
    from scratch by the rule DESIGN.md states (local first when it runs the
    service unpaused; then the peers where it is global and unpaused, by the
    registry's shuffle)."""

    def __init__(self) -> None:
        self.tables: dict[str, dict[str, dict[str, Any]]] = {}
        self.local: dict[str, dict[str, Any]] = {}
        self.seen: set[str] = set()

    def apply(self, op: tuple[Any, ...]) -> None:
        kind = op[0]
        if kind in ("remote", "announce"):
            _, node, service, info = op
            if info is None:
                self.tables.get(node, {}).pop(service, None)
            else:
                self.tables.setdefault(node, {})[service] = info
                self.seen.add(service)
        elif kind == "local":
            _, service, info = op
            if info is None:
                self.local.pop(service, None)
            else:
                self.local[service] = info
                self.seen.add(service)
        elif kind == "table":
            self.tables[op[1]] = dict(op[2])
            self.seen.update(op[2])
        elif kind == "drop":
            self.tables.pop(op[1], None)

    def nodes(self, service: str, shuffle: dict[str, float]) -> list[str]:
        local = self.local.get(service)
        head = [LOCAL] if local is not None and not local["paused"] else []
        remote = [n for n, table in self.tables.items() if service in table
                  and not table[service]["paused"] and table[service]["global"]]
        return head + sorted(remote, key=lambda n: (shuffle[n], n))


def do(registry: Registry, op: tuple[Any, ...]) -> None:
    kind = op[0]
    if kind == "remote":
        registry.set_remote(op[1], op[2], op[3])
    elif kind == "local":
        registry.set_local(op[1], op[2])
    elif kind == "table":
        assert registry.apply_table(op[1], op[2]) == 0
    elif kind == "announce":
        assert registry.apply_announce(op[1], [op[2], op[3]]) == 0
    elif kind == "drop":
        registry.drop_node(op[1])
    elif kind == "reshuffle":
        registry.reshuffle()
    else:
        registry.nodes(op[1])


@settings(max_examples=300, deadline=None)
@given(st.lists(ops, max_size=60))
def test_lazily_derived_orders_equal_the_eager_ones(sequence: list[tuple[Any, ...]]) -> None:
    registry, model = Registry(LOCAL), Eager()
    for op in sequence:
        do(registry, op)
        model.apply(op)
        shuffle = registry._shuffle        # (the one random input of the order)
        for service in SERVICES:
            expected = model.nodes(service, shuffle)
            assert registry.nodes(service) == expected
            instances = registry.instances(service)
            assert [n for n, _ in instances] == expected
            for node, info in instances:
                source = model.local if node == LOCAL else model.tables[node]
                assert info == source[service]
            for node in NODES:
                known = model.tables.get(node, {}).get(service)
                # stored by reference: the very object applied
                assert registry.remote_info(service, node) is known
                assert (registry.checks(service, node) is None) == (known is None)
        assert registry.services() == {s: model.nodes(s, shuffle) for s in sorted(model.seen)}


def test_nodes_of_one_process_share_an_entrys_checkers_unless_it_has_allow_rules() -> None:
    first, second = Registry("n1"), Registry("x9")
    plain, ruled = entry(False, True), entry(False, True, allow=True)
    for registry in (first, second):
        assert registry.apply_table("peer", {"A": plain, "B": ruled}) == 0
    # compiled once for the process: the same checkers, by reference
    assert first.checks("A", "peer") is second.checks("A", "peer")
    # allow rules are each node's own: n1 may call f, x9 may not
    assert type(first.checks("B", "peer")["f"]) is not type(second.checks("B", "peer")["f"])
    assert type(first.checks("A", "peer")["f"]) is type(first.checks("B", "peer")["f"])


def test_a_malformed_entry_is_refused_by_every_node_it_reaches() -> None:
    bad = {"vsn": 1, "functions": {}}
    for name in ("n1", "n2"):
        registry = Registry(name)
        assert registry.apply_table("peer", {"A": bad, "B": entry(False, True)}) == 1
        assert registry.nodes("A") == [] and registry.nodes("B") == ["peer"]
