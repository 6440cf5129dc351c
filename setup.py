"""Builds malla's one compiled module, malla._core, from malla/_core.pyx
(which includes the fragments in malla/core/).

There is no pure-Python fallback: without Cython (>=3, <4) and a C compiler
the build refuses, as asyncpg's and uvloop's do.
"""

import os

from setuptools import Extension, setup

CYTHON_REQUIREMENT = "Cython>=3.0,<4"

try:
    import Cython
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - build-time guard
    raise RuntimeError(
        f"please install {CYTHON_REQUIREMENT} to compile malla from source"
    ) from exc

if not Cython.__version__.startswith("3."):
    raise RuntimeError(
        f"malla needs {CYTHON_REQUIREMENT}, found Cython {Cython.__version__}"
    )

DEBUG = os.environ.get("MALLA_DEBUG") == "1"

directives = {
    "language_level": 3,
    "embedsignature": True,
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
}
macros = []
if DEBUG:
    # the core's invariant checks and leak counters (malla/core/debug.pyx)
    macros += [("MALLA_DEBUG", "1")]

extra_compile_args = ["-O2"] if not DEBUG else ["-O0", "-g"]
if os.environ.get("MALLA_FUZZ") == "1":
    extra_compile_args += ["-fsanitize=fuzzer-no-link"]

ext = Extension(
    "malla._core",
    ["malla/_core.pyx"],
    define_macros=macros,
    extra_compile_args=extra_compile_args,
)

setup(
    ext_modules=cythonize(
        [ext],
        compiler_directives=directives,
        annotate=os.environ.get("MALLA_ANNOTATE") == "1",
        force=os.environ.get("MALLA_BUILD_CYTHON_ALWAYS") == "1",
    ),
)
