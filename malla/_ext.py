"""The only importer of the compiled core: a missing build fails loudly here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from malla import _core as core
else:
    try:
        core = importlib.import_module("malla._core")
    except ImportError as exc:  # exercised by tests/test_package.py in a subprocess
        raise ImportError(
            "malla's compiled core (malla._core) is not built. Build it with "
            "`pip install -e .` (or `python setup.py build_ext --inplace`) "
            "in a checkout, or `make build`; it needs Cython>=3,<4 and a C compiler. "
            f"(import failed: {exc})"
        ) from exc

__all__ = ["core"]
