"""Every Python example in the README and docs/ runs, as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from support import ROOT

DOCS = [os.path.join(ROOT, "README.md"),
        *sorted(os.path.join(ROOT, "docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                if f.endswith(".md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def examples():
    for path in DOCS:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        for _i, match in enumerate(BLOCK.finditer(text)):
            line = text[:match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{os.path.basename(path)}:{line}")


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
