"""The docs' recipes as files: a ```python block after a `<!-- file: NAME -->`
line is a file of the recipe (written out and run the way the recipe says,
by tests/test_recipes.py); blocks after `<!-- cell -->` lines are the cells
of a notebook.  tests/test_docs.py runs every other block as a script."""

from __future__ import annotations

import os
import re

from support import ROOT

DOCS_DIR = os.path.join(ROOT, "docs")
# a marker line, then the block it names
BLOCK = re.compile(r"^(?:<!-- (file: (?P<file>[\w.]+)|cell) -->\n)?```python\n(?P<code>.*?)^```",
                   re.S | re.M)


def doc_pages() -> list[str]:
    """README.md and every page under docs/."""
    pages = [os.path.join(ROOT, "README.md")]
    for top, _dirs, files in sorted(os.walk(DOCS_DIR)):
        pages += [os.path.join(top, f) for f in sorted(files) if f.endswith(".md")]
    return pages


def blocks(path: str) -> list[tuple[int, str | None, bool, str]]:
    """(line, file name or None, is a notebook cell, code) of each block."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    return [(text[:m.start()].count("\n") + 1, m.group("file"),
             m.group(1) == "cell", m.group("code")) for m in BLOCK.finditer(text)]


def write_files(page: str, into: str) -> list[str]:
    """Write the recipe files of a docs page into a directory."""
    names = []
    for _line, name, _cell, code in blocks(os.path.join(DOCS_DIR, page)):
        if name:
            with open(os.path.join(into, name), "w", encoding="utf-8") as fh:
                fh.write(code)
            names.append(name)
    return names


def cells(page: str) -> list[str]:
    return [code for _l, _n, cell, code in blocks(os.path.join(DOCS_DIR, page)) if cell]
