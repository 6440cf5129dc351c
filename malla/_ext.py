"""The only importer of the compiled core: a missing build fails loudly here."""

from __future__ import annotations

try:
    from malla import _core as core
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "malla's compiled core (malla._core) is not built. Build it with "
        "`pip install -e .` (or `python setup.py build_ext --inplace`) "
        "in a checkout, or `make build`; it needs Cython>=3,<4 and a C compiler. "
        f"(import failed: {exc})"
    ) from exc

__all__ = ["core"]
