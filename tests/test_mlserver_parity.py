"""rayms's ``answer_as: mlserver`` against MLServer's own runtimes, run in-process in a Python that has them.

MLServer cannot share the project venv (its pins clash with Ray's), so this test needs one of its own and
is skipped without it::

    python3.11 -m venv /tmp/mlserver-venv
    /tmp/mlserver-venv/bin/pip install mlserver==1.7.1 mlserver-sklearn==1.7.1 mlserver-xgboost==1.7.1 \\
        mlserver-lightgbm==1.7.1 'uvloop<0.22' scikit-learn==<project's> xgboost==<project's> lightgbm==<project's>
    RAYMS_MLSERVER_PYTHON=/tmp/mlserver-venv/bin/python .venv/bin/python -m pytest -q tests/test_mlserver_parity.py

The same artifacts go to both; every default answer must agree in values, datatype and shape.
"""

from __future__ import annotations

import json
import os
import subprocess

import numpy as np
import pytest

from rayms.frameworks import load_runtime, v2_datatype
from tests import model_factory as mf

PYTHON = os.environ.get("RAYMS_MLSERVER_PYTHON")
pytestmark = pytest.mark.skipif(not PYTHON, reason="RAYMS_MLSERVER_PYTHON names no Python with MLServer's runtimes")

MLSERVER_ANSWERS = '''
import asyncio, importlib, json, sys
import numpy as np
from mlserver.codecs import NumpyCodec
from mlserver.settings import ModelParameters, ModelSettings
from mlserver.types import InferenceRequest, RequestInput

cases, x, target = json.loads(sys.argv[1]), np.asarray(json.loads(sys.argv[2])), sys.argv[3]

async def answers():
    found = {}
    for name, (folder, implementation) in cases.items():
        module, cls = implementation.rsplit(".", 1)
        runtime = getattr(importlib.import_module(module), cls)
        model = runtime(ModelSettings(name=name, implementation=runtime, parameters=ModelParameters(uri=folder)))
        await model.load()
        request = InferenceRequest(inputs=[RequestInput(name="input-0", shape=list(x.shape), datatype="FP64",
                                                        data=x.ravel().tolist())])
        output = (await model.predict(request)).outputs[0]
        found[name] = {"name": output.name, "datatype": output.datatype, "shape": output.shape,
                       "data": NumpyCodec.decode_output(output).ravel().tolist()}
    return found

json.dump(asyncio.run(answers()), open(target, "w"))
'''


def test_answer_as_mlserver_matches_mlservers_runtimes(tmp_path):
    cases, frameworks = {}, {}
    for task in ("multiclass", "softmax", "binary", "regression"):
        for save in ("booster", "sklearn"):
            name = f"xgb-{task}-{save}"
            mf.make_xgboost(tmp_path / name, task=task, save=save)
            cases[name], frameworks[name] = (str(tmp_path / name), "mlserver_xgboost.XGBoostModel"), "xgboost"
    for task in ("multiclass", "binary", "regression"):
        name = f"lgb-{task}"
        mf.make_lightgbm(tmp_path / name, task=task, ext=".bst")
        cases[name], frameworks[name] = (str(tmp_path / name), "mlserver_lightgbm.LightGBMModel"), "lightgbm"
    for kind in ("logreg", "rf_regressor"):
        name = f"sk-{kind}"
        mf.make_sklearn(tmp_path / name, kind=kind)
        cases[name], frameworks[name] = (str(tmp_path / name), "mlserver_sklearn.SKLearnModel"), "sklearn"
    x = mf.make_data(n=7, seed=21)[0]
    target = tmp_path / "mlserver.json"
    done = subprocess.run([PYTHON, "-c", MLSERVER_ANSWERS, json.dumps(cases), json.dumps(x.tolist()), str(target)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = json.loads(target.read_text())
    for name, (folder, _) in cases.items():
        ours = load_runtime(frameworks[name], folder, {"answer_as": "mlserver"}).predict([x])["predict"]
        answer = theirs[name]
        assert (answer["name"], answer["datatype"], answer["shape"]) == ("predict", v2_datatype(ours.dtype),
                                                                          list(ours.shape)), name
        assert np.array_equal(np.asarray(answer["data"], dtype=ours.dtype), ours.ravel()), name
