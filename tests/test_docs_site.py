"""The docs site builds with `mkdocs build --strict` (mkdocs-material, the
API reference by mkdocstrings from the docstrings): every page in the nav,
no broken link or anchor, no docstring the handler cannot read."""

from __future__ import annotations

import html
import os
import re
import shutil
import subprocess
import sys

from support import ROOT


def mkdocs(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def text_of(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        page = fh.read()
    page = page[page.find("<article"):]
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page)))


def test_the_site_builds_strict_with_the_api_reference(tmp_path):
    site = tmp_path / "site"
    proc = mkdocs("--site-dir", str(site))
    assert proc.returncode == 0, proc.stderr
    node = text_of(str(site / "reference" / "node" / "index.html"))
    # signatures and docstrings from the source, not from a hand-written page
    assert "malla.Node" in node and "heartbeat_timeout : float = 3.0" in node
    assert "Listen, then dial the seeds in the background" in node
    errors = text_of(str(site / "reference" / "errors" / "index.html"))
    for cls in ("ServiceNotAvailable", "CallTimeout", "ConnectionLost", "Forbidden"):
        assert cls in errors
    calls = text_of(str(site / "reference" / "calls" / "index.html"))
    assert "malla.current_call" in calls and "malla.remaining_ms" in calls
    assert "cluster" in text_of(str(site / "reference" / "testing" / "index.html"))
    recipe = text_of(str(site / "recipes" / "fastapi" / "index.html"))
    assert "lifespan" in recipe
    # the benchmark results, kept beside the harness, are on the site too
    assert (site / "bench" / "RESULTS" / "index.html").exists()


def test_strict_mode_fails_on_a_broken_link(tmp_path):
    """The negative control: the project's own configuration (its hooks and
    validation settings), on a copy of the docs with one link to nowhere,
    refuses to build (so the build above proves the links hold)."""
    shutil.copytree(os.path.join(ROOT, "docs"), tmp_path / "docs")
    shutil.copy(os.path.join(ROOT, "mkdocs.yml"), tmp_path)
    shutil.copytree(os.path.join(ROOT, "bench"), tmp_path / "bench",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    page = tmp_path / "docs" / "recipes" / "jupyter.md"
    page.write_text(page.read_text() + "\nSee [nowhere](missing.md).\n")
    proc = mkdocs("--site-dir", str(tmp_path / "site"), cwd=str(tmp_path))
    assert proc.returncode != 0 and "missing.md" in proc.stderr, proc.stderr
