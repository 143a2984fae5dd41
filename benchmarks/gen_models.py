"""Small real models for the benchmarks: a model repository folder plus the answers to expect from it.

Model ``i`` is trained on a bootstrap sample of iris (seed ``i``): even ``i`` a LogisticRegression, odd ``i`` a
RandomForest of 10 trees with depth at most 4, both on the 4 iris features as float32. Each lands in
``<root>/<name>/model.joblib``, the layout ``rayms serve --model-repository`` reads. ``manifest.json`` next to
them records, per model, what scikit-learn predicts in this process for a fixed set of probe rows, so a
server's answers can be checked against it.

    .venv/bin/python benchmarks/gen_models.py /tmp/models --models 100
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import joblib
import numpy as np
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

PROBE_ROWS = 6
MANIFEST = "manifest.json"


def model_name(index: int) -> str:
    return f"m-{index:04d}"


def train(index: int, x: np.ndarray, y: np.ndarray):
    """The model of number ``index``: fitted on its own bootstrap sample of iris."""
    rng = np.random.default_rng(index)
    rows = rng.integers(0, len(x), size=len(x))
    if index % 2 == 0:
        # lbfgs (the default) takes up to seconds per fit on a busy 2-core box; Newton converges in a few steps.
        model = LogisticRegression(solver="newton-cholesky", max_iter=200)
    else:
        model = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=index)
    return model.fit(x[rows], y[rows])


def probe_rows(x: np.ndarray) -> np.ndarray:
    """A fixed spread of iris rows (two per class), float32 as the clients send them."""
    picks = np.linspace(0, len(x) - 1, PROBE_ROWS).astype(int)
    return x[picks].astype(np.float32)


def generate(root: Path, count: int) -> dict:
    """Write ``count`` models under ``root`` and return the manifest (also written to ``root/manifest.json``)."""
    root.mkdir(parents=True, exist_ok=True)
    iris = load_iris()
    x, y = iris.data.astype(np.float32), iris.target
    probes = probe_rows(x)
    started = time.perf_counter()
    models = []
    for index in range(count):
        name = model_name(index)
        model = train(index, x, y)
        path = root / name / "model.joblib"
        path.parent.mkdir(exist_ok=True)
        joblib.dump(model, path)
        models.append({"name": name, "kind": type(model).__name__, "path": str(path),
                       "expected": model.predict(probes).tolist()})
    manifest = {"count": count, "features": int(x.shape[1]), "probes": probes.tolist(), "models": models,
                "seconds": round(time.perf_counter() - started, 2)}
    (root / MANIFEST).write_text(json.dumps(manifest))
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="model repository folder to write")
    parser.add_argument("--models", type=int, default=100)
    args = parser.parse_args()
    manifest = generate(args.root, args.models)
    print(f"{manifest['count']} models in {args.root} ({manifest['seconds']} s)")


if __name__ == "__main__":
    main()
