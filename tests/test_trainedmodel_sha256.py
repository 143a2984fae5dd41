"""A TrainedModel can pin its artifact's digest: ``spec.model.sha256`` (a rayms extension) passes the CRD,
reaches the spec the bridge registers, and a malformed one is refused by the API server and by the bridge."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import yaml

from rayms.k8s.resources import parse
from tests.crd_schema import crd_problems, load_crd

KUBERAY = Path(__file__).resolve().parent.parent / "kuberay"


def test_a_trainedmodel_carries_its_artifacts_sha256_to_the_spec() -> None:
    crd = load_crd(KUBERAY / "trainedmodel-crd.yaml")
    doc = yaml.safe_load((KUBERAY / "examples" / "sklearn.yaml").read_text())
    doc["metadata"]["namespace"] = "default"
    digest = hashlib.sha256(b"weights").hexdigest()
    pinned = copy.deepcopy(doc)
    pinned["spec"]["model"]["sha256"] = digest
    assert crd_problems(pinned, crd) == []
    assert parse(pinned).spec.sha256 == digest
    malformed = copy.deepcopy(doc)
    malformed["spec"]["model"]["sha256"] = "abc"
    assert crd_problems(malformed, crd)
    parsed = parse(malformed)
    assert parsed.spec is None and "sha256: must be 64 hexadecimal digits" in parsed.problem
