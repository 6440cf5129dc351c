"""What the run was measured on: machine, interpreter, library versions, commit."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.cfloor_sys import find_compiler

# Distributions whose versions shape the figures; the children run the same
# interpreter and environment as the parent, so the parent's view is theirs.
_PACKAGES = ("uvloop", "Cython", "msgpack", "grpcio", "Pyro5", "rpyc", "malla")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Processor", "cpu model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def compiler_version() -> str:
    """The first line of ``cc --version`` (the C floor's compiler), or why not."""
    compiler = find_compiler()
    if compiler is None:
        return "not found"
    try:
        out = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    lines = out.stdout.splitlines()
    return lines[0].strip() if lines else "unknown"


def git_commit(repo: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=repo,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def collect(repo: Path) -> dict[str, Any]:
    return {
        "machine": {
            "cpu": cpu_model(),
            "cores": os.cpu_count(),
            "platform": platform.platform(),
        },
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "versions": {
            **{name: package_version(name) for name in _PACKAGES},
            "compiler": compiler_version(),
        },
        "git_commit": git_commit(repo),
    }
