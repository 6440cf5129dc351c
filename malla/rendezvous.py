"""Rendezvous (highest-random-weight) hashing for keyed calls.

`remote(..., key=k)` must send the same key to the same node from every
process and every version of malla, and when a node leaves only the keys it
held may move.  Rendezvous hashing gives both with no shared state: each
node's score for a key is a hash of (key, node name); the key goes to the
highest score, and failover walks the scores downwards.  Removing a node
deletes one score per key, so only keys whose top score it was move; adding
one moves a key only if the newcomer's score beats the old top.

The score is DESIGN.md's, byte for byte, so that it can never change:
the first 8 bytes, big-endian, of
``blake2b(kind + key_bytes + b"\\0" + node_name_utf8, digest_size=16)``,
kind ``b"s"`` (key_bytes: the str's UTF-8), ``b"b"`` (the bytes themselves)
or ``b"i"`` (the int in decimal ASCII).  Where DESIGN.md is silent:

- a negative int is its decimal with a leading ``-`` (``-5`` -> ``b"-5"``);
- subclasses count as their base type, by value: an IntEnum member hashes as
  its int, a StrEnum member as its str; bool (an int subclass) and every
  other type (bytearray, float, None...) raise InvalidOption;
- a str that is not valid Unicode (lone surrogates) raises InvalidOption;
- two nodes with equal scores (a 2**-64 chance) rank by name, ascending,
  so the order is still a function of the key and the names alone.

Cost: one blake2b of the key prefix, then one copy-and-update per node; a
keyed call pays O(n) hashes (about a microsecond each) plus a sort.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from malla import exceptions as mexc

__all__ = ["key_prefix", "rank", "score"]


def key_prefix(key: Any) -> bytes:
    """kind + key_bytes + b"\\0": the part of the hashed message the key decides."""
    if isinstance(key, str):
        try:
            return b"s" + str.encode(key, "utf-8") + b"\0"
        except UnicodeEncodeError:
            raise mexc.InvalidOption(f"key {key!r} is not valid Unicode") from None
    if isinstance(key, bytes):
        return b"b" + bytes(key) + b"\0"
    if isinstance(key, int) and not isinstance(key, bool):
        return b"i" + b"%d" % int(key) + b"\0"
    raise mexc.InvalidOption(f"key must be a str, bytes or int, not {type(key).__name__}")


def _score(prefix: Any, node: str) -> int:
    h = prefix.copy()
    h.update(node.encode("utf-8"))
    return int.from_bytes(h.digest()[:8], "big")


def score(key: Any, node: str) -> int:
    """The node's score for the key: a 64-bit unsigned int, higher wins."""
    return _score(hashlib.blake2b(key_prefix(key), digest_size=16), node)


def rank(key: Any, nodes: Iterable[str]) -> list[str]:
    """`nodes` in the key's order: highest score first, equal scores by name."""
    prefix = hashlib.blake2b(key_prefix(key), digest_size=16)
    scored = sorted((-_score(prefix, node), node) for node in nodes)
    return [node for _, node in scored]
