"""Every Python example in the README and docs/ runs, as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from recipes import blocks, doc_pages
from support import ROOT


def examples():
    # (the recipes' files and notebook cells run in tests/test_recipes.py)
    for path in doc_pages():
        for line, name, cell, code in blocks(path):
            if not name and not cell:
                yield pytest.param(code, id=f"{os.path.relpath(path, ROOT)}:{line}")


def test_every_page_has_its_examples_run():
    """The recipes and reference pages are found (the walk goes into
    docs/'s subdirectories) and every block is one of the three kinds."""
    pages = {os.path.relpath(p, ROOT) for p in doc_pages()}
    assert {"docs/recipes/taskgroup.md", "docs/recipes/fastapi.md",
            "docs/reference/node.md", "README.md"} <= pages
    with open(os.path.join(ROOT, "docs", "recipes", "fastapi.md"), encoding="utf-8") as fh:
        assert fh.read().count("```python") == len(blocks(os.path.join(
            ROOT, "docs", "recipes", "fastapi.md")))


@pytest.mark.parametrize("code", list(examples()))
def test_example_runs(code):
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MALLA_COOKIE", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, env=env, cwd=ROOT)
    assert proc.returncode == 0, f"example failed:\n{proc.stdout}\n{proc.stderr}"


def test_kubernetes_manifests_are_valid():
    """The manifests of docs/kubernetes.md parse and agree with each other
    (validated, not applied)."""
    import yaml

    with open(os.path.join(ROOT, "docs", "kubernetes.md"), encoding="utf-8") as fh:
        text = fh.read()
    docs = [yaml.safe_load(m.group(1)) for m in
            re.finditer(r"^```yaml\n(.*?)^```", text, re.S | re.M)]
    by_kind = {d["kind"]: d for d in docs}
    assert set(by_kind) == {"Secret", "Service", "Deployment"}
    for doc in docs:
        assert doc["apiVersion"] and doc["metadata"]["name"]
    secret, service, deploy = by_kind["Secret"], by_kind["Service"], by_kind["Deployment"]
    assert service["spec"]["clusterIP"] == "None"                    # headless
    port = service["spec"]["ports"][0]
    assert port["name"] == "malla" and port["protocol"] == "TCP"
    template = deploy["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"] == labels
    assert all(labels.get(k) == v for k, v in service["spec"]["selector"].items())
    container = template["spec"]["containers"][0]
    assert port["targetPort"] in [p["name"] for p in container["ports"]]
    assert container["ports"][0]["containerPort"] == port["port"]
    env = {e["name"]: e for e in container["env"]}
    ref = env["MALLA_COOKIE"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]
    # the command is a valid `malla node` command line
    cmd = container["command"]
    assert cmd[:2] == ["malla", "node"]
    from malla.cli import _parser

    args = _parser().parse_args(cmd[1:])
    assert args.command == "node" and args.port == port["port"]
    srv_name = args.connect[0]
    assert srv_name.startswith(f"_{port['name']}._tcp.{service['metadata']['name']}.")
    grace = template["spec"]["terminationGracePeriodSeconds"]
    assert args.grace < grace
    for var in re.findall(r"\$\((\w+)\)", " ".join(cmd)):
        assert var in env, var
