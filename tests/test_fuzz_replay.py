"""Replay of the fuzzers' corpus and crash reproducers (fuzz/README.md).

Every file in fuzz/corpus/<target>/ and fuzz/crashes/<target>/ goes through
the matching fuzz/fuzz_<target>.py's TestOneInput, which raises on anything
the target's checks forbid; so a crash that `make fuzz` once found stays
fixed.  atheris is not needed: the targets import it only when run as
fuzzers.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType

import pytest
from support import ROOT

FUZZ = os.path.join(ROOT, "fuzz")
sys.path.insert(0, FUZZ)   # the targets import their shared _target module
TARGETS = ("frames", "decode", "handshake")


def _load(target: str) -> ModuleType:
    name = f"fuzz_{target}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(FUZZ, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _inputs() -> list[tuple[str, str]]:
    out = []
    for target in TARGETS:
        for kind in ("corpus", "crashes"):
            folder = os.path.join(FUZZ, kind, target)
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(folder)):
                if not name.startswith("."):
                    out.append((target, os.path.join(kind, target, name)))
    return out


INPUTS = _inputs()


def test_every_target_has_a_corpus():
    for target in TARGETS:
        assert any(t == target and "corpus" in p for t, p in INPUTS), target


@pytest.mark.parametrize(("target", "path"), INPUTS, ids=[p for _, p in INPUTS])
def test_replay(target: str, path: str):
    with open(os.path.join(FUZZ, path), "rb") as fh:
        data = fh.read()
    _load(target).TestOneInput(data)


@pytest.mark.parametrize("target", TARGETS)
def test_seeds(target: str):
    """The seeds each target writes (--write-seeds) pass, files or not."""
    module = _load(target)
    for name, data in module.seeds().items():
        assert len(data) < 4096, name
        module.TestOneInput(data)


def test_atheris_not_needed():
    # imported as modules (not as __main__), the targets leave atheris alone
    for target in TARGETS:
        assert not hasattr(_load(target), "atheris")
