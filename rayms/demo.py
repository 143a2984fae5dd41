"""The embedded demo: three small iris models (scikit-learn, XGBoost, LightGBM) in a model repository.

``rayms serve --demo`` writes them to a folder, serves the folder, and prints curl commands that work
against it. The ML libraries are imported inside the function: importing rayms never pulls them in.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

SAMPLE = [[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]]
DEMO_MODELS = ("iris-sklearn", "iris-xgboost", "iris-lightgbm")


def write_demo_models(target: str | None = None) -> Path:
    """Train the demo models into ``target`` (a new temporary folder by default); return the folder."""
    import joblib
    import lightgbm
    import xgboost
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    root = Path(target) if target else Path(tempfile.mkdtemp(prefix="rayms-demo-"))
    x, y = load_iris(return_X_y=True)
    for name in DEMO_MODELS:
        (root / name).mkdir(parents=True, exist_ok=True)
    sk = LogisticRegression(max_iter=500).fit(x, y)
    joblib.dump(sk, root / "iris-sklearn" / "model.joblib")
    xgb = xgboost.XGBClassifier(n_estimators=10, max_depth=3, nthread=1).fit(x, y)
    xgb.save_model(root / "iris-xgboost" / "model.json")
    lgb = lightgbm.LGBMClassifier(n_estimators=10, num_leaves=7, verbose=-1, n_jobs=1).fit(x, y)
    lgb.booster_.save_model(str(root / "iris-lightgbm" / "model.txt"))
    return root


def print_demo_commands(base: str) -> None:
    v2 = {"inputs": [{"name": "input-0", "shape": [2, 4], "datatype": "FP64",
                      "data": [v for row in SAMPLE for v in row]}]}
    print("\nTry it:")
    print(f"  curl -s {base}/v1/models")
    for name in DEMO_MODELS:
        print(f"  curl -s {base}/v1/models/{name}:predict -d '{json.dumps({'instances': SAMPLE})}'")
        print(f"  curl -s {base}/v2/models/{name}/infer -d '{json.dumps(v2)}'")
    print(f"  curl -s -X POST {base}/v2/repository/index")
    print()
