"""Custom models: the user's class, loaded only when allowed, behaving like a built-in runtime (no Ray)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest

from rayms.config import ModelSpec, Settings
from rayms.errors import InferenceError, InvalidInput, InvalidSpec, ModelLoadError
from rayms.frameworks import ModelRuntime, load_runtime

MODEL_PY = '''
import json
from pathlib import Path

import numpy as np

from scaling_helper import double  # a helper module beside it


class Scaler:
    """Multiplies every feature by the factor in factor.json and sums each row."""

    @classmethod
    def load(cls, path, parameters):
        model = cls()
        model.factor = json.loads((Path(path) / "factor.json").read_text())["factor"]
        model.offset = parameters.get("offset", 0)
        return model

    def predict(self, inputs, parameters):
        x = np.asarray(next(iter(inputs.values())), dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"expected rows, got shape {list(x.shape)}")
        if parameters.get("explode"):
            raise RuntimeError("kaboom")
        total = double(x * self.factor).sum(axis=1) / 2 + self.offset
        if parameters.get("both"):
            return {"predict": total, "names": np.array(list(inputs), dtype=object)}
        return total

    def metadata(self):
        return {"inputs": [{"name": "x", "datatype": "FP64", "shape": [-1, -1]}],
                "outputs": [{"name": "predict", "datatype": "FP64", "shape": [-1]}]}
'''


@pytest.fixture
def custom_folder(tmp_path):
    folder = tmp_path / "scaler"
    folder.mkdir()
    (folder / "scaler_model.py").write_text(MODEL_PY)
    (folder / "scaling_helper.py").write_text("def double(x):\n    return x * 2\n")
    (folder / "factor.json").write_text('{"factor": 3}')
    return folder


def test_setting_defaults_to_refusing_user_code(monkeypatch):
    assert Settings().allow_custom_code is False
    monkeypatch.setenv("RAYMS_ALLOW_CUSTOM_CODE", "true")
    assert Settings().allow_custom_code is True


def test_a_custom_class_beside_the_artifact_is_refused_unless_allowed(custom_folder):
    parameters = {"implementation": "scaler_model.Scaler", "offset": 1}
    with pytest.raises(ModelLoadError, match="RAYMS_ALLOW_CUSTOM_CODE"):
        load_runtime("custom", custom_folder, parameters)
    runtime = load_runtime("custom", custom_folder, parameters, allow_code=True)
    assert isinstance(runtime, ModelRuntime) and runtime.framework == "custom"
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    out = runtime.predict([x], input_names=["x"])
    assert list(out) == ["predict"] and out["predict"].tolist() == [3 * 3 + 1, 3 * 12 + 1]
    both = runtime.predict([x], {"both": True}, input_names=["x"])
    assert both["names"].tolist() == ["x"]
    assert list(runtime.predict([x], {"both": True}, requested=["names"])) == ["names"]
    with pytest.raises(InvalidInput, match="unknown output.*proba.*answers predict"):
        runtime.predict([x], requested=["proba"])
    with pytest.raises(InvalidInput, match="expected rows"):
        runtime.predict([x[0]])
    with pytest.raises(InferenceError, match="kaboom"):
        runtime.predict([x], {"explode": True})
    assert runtime.input_metadata()[0]["name"] == "x" and runtime.output_metadata()[0]["name"] == "predict"
    assert runtime.size_bytes() == sum(p.stat().st_size for p in custom_folder.rglob("*") if p.is_file())


def test_two_models_may_each_have_a_module_of_the_same_name(tmp_path):
    for factor in (2, 5):
        folder = tmp_path / f"m{factor}"
        folder.mkdir()
        (folder / "model.py").write_text(textwrap.dedent(f'''
            class Model:
                @classmethod
                def load(cls, path, parameters):
                    return cls()

                def predict(self, inputs, parameters):
                    return next(iter(inputs.values())) * {factor}
        '''))
    a = load_runtime("custom", tmp_path / "m2", {"implementation": "model.Model"}, allow_code=True)
    b = load_runtime("custom", tmp_path / "m5", {"implementation": "model.Model"}, allow_code=True)
    ones = np.ones((1, 2))
    assert a.predict([ones])["predict"].tolist() == [[2, 2]] and b.predict([ones])["predict"].tolist() == [[5, 5]]


def test_an_installed_class_loads_by_its_import_path(tmp_path):
    # json.JSONDecoder has no load(): the error says what the interface needs
    with pytest.raises(ModelLoadError, match=r"json\.JSONDecoder has no load\(path, parameters\)"):
        load_runtime("custom", tmp_path, {"implementation": "json.JSONDecoder"}, allow_code=True)
    with pytest.raises(ModelLoadError, match="cannot import no_such_package"):
        load_runtime("custom", tmp_path, {"implementation": "no_such_package.Model"}, allow_code=True)
    with pytest.raises(InvalidSpec, match="needs parameters.implementation"):
        load_runtime("custom", tmp_path, {}, allow_code=True)
    with pytest.raises(InvalidSpec, match="module.ClassName"):
        load_runtime("custom", tmp_path, {"implementation": "Model"}, allow_code=True)


def test_a_failing_load_is_a_model_load_error(tmp_path):
    (tmp_path / "broken.py").write_text("class Model:\n    @classmethod\n    def load(cls, path, parameters):\n"
                                        "        raise OSError('weights missing')\n")
    with pytest.raises(ModelLoadError, match="load failed: OSError: weights missing"):
        load_runtime("custom", tmp_path, {"implementation": "broken.Model"}, allow_code=True)


def test_custom_is_a_framework_a_spec_may_name():
    spec = ModelSpec.parse({"storageUri": "/m", "framework": "Custom", "parameters": {"implementation": "a.B"}})
    assert spec.framework == "custom"
