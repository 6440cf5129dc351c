"""mkdocs hooks: the site shows bench/RESULTS.md (and its chart), which
live beside the benchmark harness rather than under docs/, so that the
docs' relative links work both on the site and when reading the
repository."""

from __future__ import annotations

import os
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# files outside docs/ that the site carries, under the same relative path
EXTERNAL = ["bench/RESULTS.md", "bench/README.md", "bench/results.png"]


def on_files(files: Files, config: Any) -> Files:
    for rel in EXTERNAL:
        if os.path.exists(os.path.join(ROOT, rel)):
            files.append(File(rel, ROOT, config["site_dir"], config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    # docs/x.md links ../bench/RESULTS.md (right in the repository); on the
    # site the file sits at bench/RESULTS.md beside the docs
    if not page.file.src_uri.startswith("bench/"):
        markdown = markdown.replace("](../bench/", "](bench/")
    return markdown
