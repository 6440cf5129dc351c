"""Keyed calls' rendezvous score (malla.rendezvous): DESIGN.md's bytes, the
same from any implementation, and the properties keyed routing relies on."""

from __future__ import annotations

import enum
import hashlib
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

import malla
from malla.rendezvous import key_prefix, rank, score

keys = st.one_of(st.text(), st.binary(), st.integers(-(1 << 80), 1 << 80))
names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20)
node_sets = st.lists(names, min_size=1, max_size=12, unique=True)


def expected_score(key: object, node: str) -> int:
    # DESIGN.md's definition, written out independently of the module
    if isinstance(key, str):
        kind, data = b"s", key.encode("utf-8")
    elif isinstance(key, bytes):
        kind, data = b"b", key
    else:
        assert isinstance(key, int)
        kind, data = b"i", str(key).encode("ascii")
    digest = hashlib.blake2b(kind + data + b"\0" + node.encode("utf-8"), digest_size=16).digest()
    return int.from_bytes(digest[:8], "big")


@given(key=keys, node=names)
def test_the_score_is_designs_hash(key, node):
    assert score(key, node) == expected_score(key, node)


# computed with coreutils' b2sum, another BLAKE2b:
#   printf 's%s\0%s' user-1 a | b2sum -l 128 | cut -c1-16
@pytest.mark.parametrize(("key", "node", "hex16"), [
    ("user-1", "a", "044a64bd398dccf8"),
    (b"x", "n1", "2c50f5b86d1b3ede"),
    (-5, "n1", "d0178df93b24f96e"),
    (0, "node-0", "4106422c1958673d"),
    ("ключ", "узел", "082f7a50b7997a1f"),
])
def test_known_answers(key, node, hex16):
    assert score(key, node) == int(hex16, 16)


def test_the_key_bytes_of_each_kind():
    assert key_prefix("é") == b"s\xc3\xa9\0"
    assert key_prefix(b"\0\xff") == b"b\0\xff\0"
    assert key_prefix(42) == b"i42\0"
    assert key_prefix(-42) == b"i-42\0"       # a negative int: decimal with '-'
    assert key_prefix(1 << 70) == b"i1180591620717411303424\0"


class Shard(enum.IntEnum):
    A = 7


class Colour(str, enum.Enum):
    RED = "red"


def test_subclasses_hash_as_their_value():
    assert score(Shard.A, "n") == score(7, "n")
    assert score(Colour.RED, "n") == score("red", "n")


@pytest.mark.parametrize("key", [True, False, 1.0, None, bytearray(b"x"), memoryview(b"x"),
                                 ("a",), "\udc80"])
def test_other_keys_are_refused(key):
    with pytest.raises(malla.InvalidOption):
        score(key, "n")
    with pytest.raises(ValueError):        # InvalidOption is a ValueError
        rank(key, ["n"])


@given(key=keys, nodes=node_sets)
def test_rank_orders_by_score_and_is_a_permutation(key, nodes):
    ranked = rank(key, nodes)
    assert sorted(ranked) == sorted(nodes)
    scores = [expected_score(key, n) for n in ranked]
    assert scores == sorted(scores, reverse=True)


@given(key=keys, nodes=node_sets, data=st.data())
def test_rank_is_stable_whatever_the_order_given(key, nodes, data):
    shuffled = data.draw(st.permutations(nodes))
    assert rank(key, shuffled) == rank(key, nodes) == rank(key, list(nodes))


def test_equal_scores_rank_by_name():
    # only a repeated name can tie in practice: they sit together, and the
    # ranking is still ordered the same way from any input order
    assert rank("k", ["b", "a", "b"]) == rank("k", ["b", "b", "a"])
    assert rank("k", ["b", "a", "b"]).count("b") == 2


@given(key=keys, nodes=node_sets.filter(lambda ns: len(ns) >= 2), data=st.data())
def test_removing_a_node_moves_only_its_keys(key, nodes, data):
    gone = data.draw(st.sampled_from(nodes))
    before = rank(key, nodes)
    after = rank(key, [n for n in nodes if n != gone])
    # the whole ranking stays, minus the node: a key moves only if it was its top
    assert after == [n for n in before if n != gone]


@given(key=keys, nodes=node_sets, new=names)
def test_adding_a_node_moves_keys_only_to_it(key, nodes, new):
    if new in nodes:
        return
    before = rank(key, nodes)
    after = rank(key, [*nodes, new])
    assert after[0] in (before[0], new)
    assert [n for n in after if n != new] == before


def test_ten_thousand_keys_spread_evenly_over_eight_nodes():
    nodes = [f"node-{i}" for i in range(8)]
    keys_ = [f"user:{i}" for i in range(10_000)]
    home = {k: rank(k, nodes)[0] for k in keys_}
    load = Counter(home.values())
    assert set(load) == set(nodes)
    assert max(load.values()) / (len(keys_) / len(nodes)) <= 1.25
    # removing one node moves exactly the keys it held
    rest = nodes[:3] + nodes[4:]
    moved = {k for k in keys_ if rank(k, rest)[0] != home[k]}
    assert moved == {k for k, n in home.items() if n == "node-3"}
