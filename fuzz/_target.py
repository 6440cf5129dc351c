"""What every fuzz target shares: writing its seeds, and running under atheris.

    if __name__ == "__main__":
        _target.main(TestOneInput, seeds)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable


def write_seeds(seeds: Callable[[], dict[str, bytes]], directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    for name, data in seeds().items():
        assert len(data) < 4096, name
        with open(os.path.join(directory, f"seed-{name}"), "wb") as fh:
            fh.write(data)


def main(test_one_input: Callable[[bytes], None],
         seeds: Callable[[], dict[str, bytes]]) -> None:
    """`--write-seeds DIR`, or fuzz with libFuzzer's command line."""
    if sys.argv[1:2] == ["--write-seeds"]:
        write_seeds(seeds, sys.argv[2])
        return
    import logging

    import atheris

    from malla._ext import core

    logging.disable(logging.CRITICAL)
    print(f"INFO: malla core from {core.__file__}", flush=True)
    # libFuzzer's -merge=1 re-runs argv[0] through the shell: make it a
    # command line that starts this interpreter on this file.
    argv = [f"{sys.executable} {os.path.abspath(sys.argv[0])}", *sys.argv[1:]]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
