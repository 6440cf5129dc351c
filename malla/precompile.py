"""Precompiled stubs: proxies that exist before their service is discovered."""

from __future__ import annotations

import json
import os
from typing import Any

__all__ = ["load_precompile"]


def load_precompile(spec: Any) -> dict[str, dict[str, int]]:
    """Stubs to create before discovery: {service: {function: arity}}.

    `spec` is that dict, a JSON text, or the path of a JSON file; None reads
    MALLA_PRECOMPILE (JSON text or a file path).
    """
    if spec is None:
        spec = os.environ.get("MALLA_PRECOMPILE")
        if not spec:
            return {}
    if isinstance(spec, str):
        text = spec
        if not spec.lstrip().startswith("{"):
            with open(spec, encoding="utf-8") as fh:
                text = fh.read()
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"precompile spec is not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or not all(
            isinstance(funs, dict) and all(isinstance(n, int) and n >= 0 for n in funs.values())
            for funs in spec.values()):
        raise ValueError("precompile must map service -> {function: arity}")
    return {str(s): {str(f): int(n) for f, n in funs.items()} for s, funs in spec.items()}
