"""docs/security.md's threat model names, for each row, the tests that show
it: every one named must exist, so the table cannot point at a test that
was renamed or removed."""

from __future__ import annotations

import ast
import os
import re

from support import ROOT

SECURITY = os.path.join(ROOT, "docs", "security.md")


def table_rows() -> list[str]:
    with open(SECURITY, encoding="utf-8") as fh:
        text = fh.read()
    section = text.split("## Threat model", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| **")]


def named_tests(row: str) -> list[tuple[str, str]]:
    """(file, test) for each `file.py::test` and `::test` (the file before it)
    in the row's last cell."""
    shown_by = row.rstrip(" |").rsplit("|", 1)[1]
    out, current = [], None
    for file, name in re.findall(r"`(?:([\w/]+\.py))?(?:::(\w+))?`", shown_by):
        current = file or current
        if name:
            out.append((current, name))
    return out


def defined_tests(path: str) -> set[str]:
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    return {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef,
                                                             ast.AsyncFunctionDef))}


def test_every_row_names_tests_that_exist():
    rows = table_rows()
    assert len(rows) >= 8
    for row in rows:
        tests = named_tests(row)
        assert tests, f"a row without a test: {row[:60]}"
        for file, name in tests:
            path = os.path.join(ROOT, "tests", file) if "/" not in file else os.path.join(
                ROOT, file)
            assert os.path.exists(path), f"{file} named by {row[:40]} does not exist"
            assert name in defined_tests(path), f"{file}::{name} does not exist"


def test_the_parser_reads_continued_references():
    row = "| **x** | a | b | c | `test_a.py::one`, `::two`, `test_b.py::three` |"
    assert named_tests(row) == [("test_a.py", "one"), ("test_a.py", "two"),
                                ("test_b.py", "three")]
