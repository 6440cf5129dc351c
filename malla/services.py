"""`from malla.services import UserService`: proxies bound to the default node.

A name resolves once the default node has discovered the service, or when it
is precompiled (Node(precompile=...) or MALLA_PRECOMPILE, which also works
for imports at module load, before malla.start()).
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    from malla import api

    proxy = api.default_proxy(name)
    if proxy is None:
        raise ImportError(
            f"malla service {name!r} is not known: it has not been discovered by the "
            "default node (await malla.start(...) and malla.wait_for_services([...]) "
            "first) and is not precompiled (for imports at module load, precompile it: "
            "MALLA_PRECOMPILE='{\"" + name + "\": {\"fun\": arity}}')")
    return proxy


def __dir__() -> list[str]:
    from malla import api

    return api.known_services()
