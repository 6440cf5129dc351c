"""The Kubernetes manifests in docs/ are valid for a real Kubernetes version:
each YAML block that is a manifest is validated strictly (no unknown field)
by kubernetes-validate against the API's own OpenAPI schemas, shipped with
it (offline)."""

from __future__ import annotations

import copy
import os
import re

import kubernetes_validate
import pytest
import yaml
from support import ROOT

# A version kubernetes-validate ships schemas for; a recent stable release
KUBERNETES = "1.33.0"
DOCS = os.path.join(ROOT, "docs")
BLOCK = re.compile(r"^```ya?ml\n(.*?)^```", re.S | re.M)


def manifests() -> list[tuple[str, dict]]:
    """(where, manifest) for each Kubernetes object in a docs YAML block (a
    block of something else -- no apiVersion and kind -- is not one)."""
    found = []
    for name in sorted(os.listdir(DOCS)):
        if not name.endswith(".md"):
            continue
        with open(os.path.join(DOCS, name), encoding="utf-8") as fh:
            text = fh.read()
        for match in BLOCK.finditer(text):
            line = text[:match.start()].count("\n") + 1
            for doc in yaml.safe_load_all(match.group(1)):
                if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc:
                    found.append((f"{name}:{line}:{doc['kind']}", doc))
    return found


MANIFESTS = manifests()


def test_the_kubernetes_page_has_its_manifests():
    # (so the validation below cannot pass by finding nothing)
    kinds = {doc["kind"] for where, doc in MANIFESTS if where.startswith("kubernetes.md:")}
    assert {"Secret", "Service", "Deployment"} <= kinds


@pytest.mark.parametrize("manifest", [m for _, m in MANIFESTS], ids=[w for w, _ in MANIFESTS])
def test_manifest_is_valid_kubernetes(manifest):
    kubernetes_validate.validate(manifest, KUBERNETES, strict=True)


def test_a_wrong_field_or_type_is_rejected():
    # the negative control: the validation does check fields and types
    [deployment] = [m for w, m in MANIFESTS if m["kind"] == "Deployment"
                    and w.startswith("kubernetes.md:")]
    kubernetes_validate.validate(deployment, KUBERNETES, strict=True)
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = typo["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError, match="replica"):
        kubernetes_validate.validate(typo, KUBERNETES, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "x"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES, strict=True)
