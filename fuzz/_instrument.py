"""The fuzz targets' first import: when a target runs as a fuzzer (not when
the tests replay it, nor when it writes its seeds), atheris instruments the
malla modules imported inside ``instrumenting(__name__)``.  It imports
nothing of malla, so it can come before them (fuzz/_target.py imports
malla, so the targets import it after).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any


def instrumenting(module_name: str) -> contextlib.AbstractContextManager[Any]:
    if module_name == "__main__" and "--write-seeds" not in sys.argv:
        import atheris

        return atheris.instrument_imports(include=["malla"])
    return contextlib.nullcontext()
