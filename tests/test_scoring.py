"""Batch scoring's plain logic, without Ray: column plans, per-model groups, errors, the output folder.

Real models trained into ``tmp_path`` (tests/model_factory.py), real pyarrow tables and Parquet files; the
predictions are compared with the in-process models'. The Ray Data run is tests/test_score_e2e.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyarrow import fs as pafs

from rayms import scoring
from rayms.config import ModelSpec, Settings
from rayms.errors import ScoringError
from tests import model_factory as mf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    """Three per-segment models of three frameworks, and their in-process answers."""
    root = tmp_path_factory.mktemp("repo")
    return root, mf.make_segment_models(root)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=str(tmp_path / "cache"))


def table(n: int = 60, seed: int = 3, segments=("seg-a", "seg-b", "seg-c"), path: str | None = "in/part-0.parquet"):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, mf.N_FEATURES))
    columns = {"id": np.arange(n) + 1000, "segment": np.array(segments)[rng.integers(0, len(segments), n)],
               **{f"f{j}": x[:, j] for j in range(mf.N_FEATURES)}}
    if path:
        columns["path"] = [path] * n
    return pa.table(columns), x


def scorer(repo_root: Path, settings: Settings, batch: pa.Table, max_models: int = 1000, **request):
    specs = scoring.model_specs(model_repository=str(repo_root))
    request.setdefault("keys", ["id"])
    if "model" not in request:
        request.setdefault("model_column", "segment")
    plan = scoring.plan(batch.schema, source="in", specs=specs, extra_columns=["path"], **request)
    return scoring.BatchScorer(plan, scoring.ModelCache(specs, settings, max_models))


# ------------------------------------------------------------------------------------------ plans
def test_features_by_order_are_every_other_column_in_the_files_order(repo):
    batch, _ = table()
    plan = scoring.plan(batch.schema, source="in", keys=["id"], specs={"seg-a": None}, model_column="segment",
                        extra_columns=["path"])
    assert plan.features == ("f0", "f1", "f2", "f3") and plan.columns() == ["id", "f0", "f1", "f2", "f3", "segment"]
    named = scoring.plan(batch.schema, source="in", keys=["id"], specs={"seg-a": None}, model="seg-a",
                         features=["f3", "f1"])
    assert named.features == ("f3", "f1") and named.model == "seg-a"


@pytest.mark.parametrize("request_, words", [
    ({"keys": ["id", "customer"], "model_column": "segment"}, ["in.parquet has no column 'customer'", "f0"]),
    ({"keys": ["id"], "model_column": "segment", "features": ["f0", "f9"]}, ["no column 'f9'"]),
    ({"keys": ["id"], "model_column": "seg"}, ["no column 'seg'"]),
    ({"keys": ["id"], "model": "nope"}, ["model 'nope' is not among the models given (seg-a)"]),
    ({"keys": ["id"], "model": "seg-a", "model_column": "segment"}, ["either one model"]),
    ({"keys": [], "model": "seg-a"}, ["at least one key column"]),
])
def test_a_request_the_input_cannot_meet_is_refused_before_reading(request_, words):
    batch, _ = table()
    with pytest.raises(ScoringError) as caught:
        scoring.plan(batch.schema, source="in.parquet", specs={"seg-a": None}, **request_)
    for word in words:
        assert word in str(caught.value)


def test_a_list_column_of_features_must_be_the_only_feature():
    schema = pa.schema([("id", pa.int64()), ("x", pa.list_(pa.float64())), ("extra", pa.float64())])
    with pytest.raises(ScoringError, match="'x' holds lists: it must then be the only feature column"):
        scoring.plan(schema, source="in", keys=["id"], specs={"m": None}, model="m")
    plan = scoring.plan(schema, source="in", keys=["id"], specs={"m": None}, model="m", features=["x"])
    assert plan.list_features and plan.features == ("x",)


# ------------------------------------------------------------------------------------------ scoring batches
def test_each_row_gets_its_own_models_answer_in_its_own_place(repo, settings):
    root, expected = repo
    batch, x = table(n=90)
    out = scorer(root, settings, batch)(batch)
    assert out.column_names == ["id", "predict"] and out.column("id").to_pylist() == batch.column("id").to_pylist()
    segments = np.array(batch.column("segment").to_pylist())
    got = out.column("predict").to_numpy()
    assert out.schema.field("predict").type == pa.float64()  # class labels and regression values in one column
    for name, model in expected.items():
        rows = segments == name
        assert rows.any()
        np.testing.assert_allclose(got[rows], model(x[rows]), rtol=1e-6)


def test_probabilities_are_written_as_a_list_per_row(repo, settings):
    root, expected = repo
    batch, x = table(n=40, segments=("seg-a", "seg-b"))
    out = scorer(root, settings, batch, outputs=["predict", "predict_proba"])(batch)
    assert out.schema.field("predict_proba").type == pa.list_(pa.float64())
    segments = np.array(batch.column("segment").to_pylist())
    proba = out.column("predict_proba").to_pylist()  # three classes for seg-a, two for seg-b
    for name in ("seg-a", "seg-b"):
        rows = segments == name
        np.testing.assert_allclose(np.array([p for p, r in zip(proba, rows) if r]),
                                   expected[name](x[rows], proba=True), rtol=1e-5)
        np.testing.assert_array_equal(out.column("predict").to_numpy()[rows], expected[name](x[rows]))


def test_one_model_for_every_row_with_features_by_name(repo, settings):
    root, expected = repo
    batch, x = table(n=30)
    shuffled = batch.select(["f2", "id", "f0", "segment", "f3", "f1", "path"])
    out = scorer(root, settings, shuffled, model="seg-a", features=["f0", "f1", "f2", "f3"])(shuffled)
    np.testing.assert_array_equal(out.column("predict").to_numpy(), expected["seg-a"](x))


def test_a_list_column_of_feature_vectors(repo, settings):
    root, expected = repo
    _, x = table(n=25)
    batch = pa.table({"id": np.arange(25), "x": pa.array(list(x))}).slice(5)  # a slice: offsets not at 0
    out = scorer(root, settings, batch, model="seg-b", features=["x"])(batch)
    np.testing.assert_array_equal(out.column("predict").to_numpy(), expected["seg-b"](x[5:]))


def test_each_model_loads_once_per_worker_across_batches(repo, settings):
    root, _ = repo
    batch, _ = table(n=60)
    score = scorer(root, settings, batch)
    for seed in range(5):
        score(table(n=60, seed=seed)[0])
    assert score.models.loads == 3
    small = scorer(root, settings, batch, max_models=1)  # an LRU of one: every new model evicts the last
    small(batch)
    small(batch)
    assert small.models.loads == 6


def test_model_names_that_are_numbers(tmp_path, settings):
    mf.make_sklearn(tmp_path / "7", kind="linreg")
    batch, _ = table(n=10, path=None)
    batch = batch.set_column(1, "segment", pa.array([7] * 10))
    out = scorer(tmp_path, settings, batch)(batch)
    assert out.num_rows == 10


# ------------------------------------------------------------------------------------------ errors
def test_an_unknown_model_names_the_file_the_row_and_the_model(repo, settings):
    root, _ = repo
    batch, _ = table(n=20)
    names = batch.column("segment").to_pylist()
    names[13] = "seg-z"
    batch = batch.set_column(1, "segment", pa.array(names))
    with pytest.raises(ScoringError) as caught:
        scorer(root, settings, batch)(batch)
    assert str(caught.value).startswith("file in/part-0.parquet, row id=1013: model 'seg-z' is not among the models "
                                        "given (seg-a, seg-b, seg-c)")


def test_a_row_without_a_model_is_named(repo, settings):
    root, _ = repo
    batch, _ = table(n=20)
    names = batch.column("segment").to_pylist()
    names[4] = None
    batch = batch.set_column(1, "segment", pa.array(names))
    with pytest.raises(ScoringError, match=r"row id=1004: column 'segment' names no model \(null\)"):
        scorer(root, settings, batch)(batch)


def test_a_list_row_of_the_wrong_width_is_named_with_the_model(repo, settings):
    root, _ = repo
    rows = [[0.1, 0.2, 0.3, 0.4]] * 8
    rows[6] = [0.1, 0.2, 0.3]
    batch = pa.table({"id": np.arange(8) + 50, "x": pa.array(rows), "path": ["in/p.parquet"] * 8})
    with pytest.raises(ScoringError) as caught:
        scorer(root, settings, batch, model="seg-a", features=["x"])(batch)
    assert str(caught.value) == "file in/p.parquet, row id=56: 'x' holds 3 values; model 'seg-a' takes 4"


def test_too_few_feature_columns_for_the_model(repo, settings):
    root, _ = repo
    batch, _ = table(n=10)
    with pytest.raises(ScoringError, match=r"row id=1000: model 'seg-c' takes 4 features, the input gives 3 "
                                           r"\(f0, f1, f2\)"):
        scorer(root, settings, batch, model="seg-c", features=["f0", "f1", "f2"])(batch)


def test_a_file_without_a_column_is_named(repo, settings):
    root, _ = repo
    batch, _ = table(n=10)
    score = scorer(root, settings, batch)
    other, _ = table(n=10, path="in/part-7.parquet")
    with pytest.raises(ScoringError, match=r"^file in/part-7.parquet: no column 'f3'"):
        score(other.drop_columns(["f3"]))


def test_a_model_that_cannot_load_is_named_with_the_row_that_needed_it(repo, settings, tmp_path):
    root, _ = repo
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.joblib").write_bytes(b"not a pickle")
    specs = {"broken": ModelSpec(storage_uri=str(tmp_path / "broken"), framework="sklearn")}
    batch, _ = table(n=5)
    plan = scoring.plan(batch.schema, source="in", keys=["id"], specs=specs, model="broken", extra_columns=["path"])
    with pytest.raises(ScoringError) as caught:
        scoring.BatchScorer(plan, scoring.ModelCache(specs, settings))(batch)
    assert str(caught.value).startswith("model 'broken' cannot load (needed by file in/part-0.parquet, row id=1000): "
                                        "cannot load sklearn model model.joblib")


def test_a_model_that_refuses_its_rows_is_named(repo, settings):
    root, _ = repo
    batch, x = table(n=6)
    x[2, 1] = np.nan
    batch = batch.set_column(3, "f1", pa.array(x[:, 1])).drop_columns(["segment"])
    with pytest.raises(ScoringError, match=r"row id=1000 and the other 5 rows of model 'seg-a' in this batch: "
                                           r"sklearn: .*NaN"):
        scorer(root, settings, batch, model="seg-a")(batch)


# ------------------------------------------------------------------------------------------ model sources
def test_model_arguments(tmp_path):
    path, _ = mf.make_sklearn(tmp_path / "m")
    assert scoring.parse_model_arg("churn") == ("churn", None)
    assert scoring.parse_model_arg(f"churn={path}") == ("churn", ModelSpec(storage_uri=str(path), framework="sklearn"))
    assert scoring.parse_model_arg("b=s3://bucket/b/model.json:xgboost") == (
        "b", ModelSpec(storage_uri="s3://bucket/b/model.json", framework="xgboost"))
    with pytest.raises(ScoringError, match="add the framework as NAME=URI:FRAMEWORK"):
        scoring.parse_model_arg("b=s3://bucket/b/model")
    with pytest.raises(Exception, match="model name '../x' is invalid"):
        scoring.parse_model_arg("../x=/tmp/m")


def test_model_specs_from_a_repository_a_models_file_and_here(repo, tmp_path):
    root, _ = repo
    models_file = tmp_path / "models.json"
    models_file.write_text(json.dumps([{"modelName": "other", "modelSpec": {
        "storageUri": str(root / "seg-a"), "framework": "sklearn", "parameters": {"predict_proba": True}}}]))
    specs = scoring.model_specs(model_repository=str(root), models_file=str(models_file),
                                models={"seg-c": {"storageUri": str(root / "seg-b"), "framework": "xgboost"}})
    assert sorted(specs) == ["other", "seg-a", "seg-b", "seg-c"]
    assert specs["other"].parameters == {"predict_proba": True} and specs["seg-c"].framework == "xgboost"


# ------------------------------------------------------------------------------------------ the output folder
def test_the_output_folder_is_this_runs_alone(tmp_path):
    local = pafs.LocalFileSystem()
    out = tmp_path / "out"
    scoring.prepare_output(local, str(out), overwrite=False, uri="out/")
    assert out.is_dir()
    scoring.prepare_output(local, str(out), overwrite=False, uri="out/")  # empty: fine
    (out / "old.parquet").write_bytes(b"x")
    with pytest.raises(ScoringError, match="^out/ is not empty; choose another output or overwrite it$"):
        scoring.prepare_output(local, str(out), overwrite=False, uri="out/")
    scoring.prepare_output(local, str(out), overwrite=True, uri="out/")
    assert list(out.iterdir()) == []
    (tmp_path / "scores.txt").write_text("not a folder")
    with pytest.raises(ScoringError, match="^scores.txt is a file; the output is a folder$"):
        scoring.prepare_output(local, str(tmp_path / "scores.txt"), overwrite=True, uri="scores.txt")


def test_a_stopped_run_keeps_whole_files_and_says_why(tmp_path):
    local = pafs.LocalFileSystem()
    out = tmp_path / "out"
    out.mkdir()
    names = [scoring.write_part(pa.table({"id": np.arange(n)}), local, str(out)) for n in (30, 12)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names) and all(n.startswith("part-") for n in names)
    whole = (out / names[0]).read_bytes()
    (out / "part-cut.parquet").write_bytes(whole[: len(whole) // 2])  # cut short by a stop
    (out / f"{scoring.PARTIAL_PREFIX}part-x.parquet").write_bytes(whole[:10])  # still being written
    rows, files = scoring.settle_output(local, str(out), error="model 'x' is not among the models given")
    assert (rows, files) == (42, 2)
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "_FAILED"])
    assert (out / "_FAILED").read_text() == "model 'x' is not among the models given"
    assert pq.read_table(out).num_rows == 42  # readers skip the marker
    assert scoring.settle_output(local, str(tmp_path / "new")) == (0, 0) and (tmp_path / "new" / "_SUCCESS").exists()


def test_scoring_logic_imports_no_ray():
    code = "import sys, rayms.scoring; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_file_of_a_folder_without_a_column_is_named_though_the_reader_filled_it(repo, settings, tmp_path):
    root, _ = repo
    batch, _ = table(n=10, path=None)
    lacking = tmp_path / "part-1.parquet"
    pq.write_table(batch.drop_columns(["f3"]), lacking)
    filled = batch.set_column(5, "f3", pa.nulls(10, pa.float64())).append_column("path", pa.array([str(lacking)] * 10))
    specs = scoring.model_specs(model_repository=str(root))
    plan = scoring.plan(filled.schema, source="in", keys=["id"], specs=specs, model_column="segment",
                        extra_columns=["path"])
    score = scoring.BatchScorer(plan, scoring.ModelCache(specs, settings), scoring.FileColumns(pafs.LocalFileSystem()))
    with pytest.raises(ScoringError, match=rf"^file {lacking}: no column 'f3' \(its columns: id, segment, f0, f1, f2\)"):
        score(filled)


def test_a_scoring_error_keeps_its_message_through_ray_s_annotation_and_pickling():
    import pickle

    error = ScoringError("file a.parquet, row id=3: model 'x' is not among the models given (m)")
    error.args = (f"{error.args[0]}\nFailed to apply UDF transform after 1/1 attempts",)  # as Ray Data does
    again = pickle.loads(pickle.dumps(error))
    assert str(again) == "file a.parquet, row id=3: model 'x' is not among the models given (m)"
    assert again.status_code == 400


def test_where_datasets_are(tmp_path, monkeypatch):
    from rayms import storage

    settings = Settings(pvc_root=str(tmp_path / "pvc"))
    path, filesystem = storage.dataset_location(f"file://{tmp_path}/in", settings=settings)
    assert path == f"{tmp_path}/in" and isinstance(filesystem, pafs.LocalFileSystem)
    path, _ = storage.dataset_location("pvc://claim/data/in.parquet", settings=settings)
    assert path == str((tmp_path / "pvc" / "claim" / "data" / "in.parquet").resolve())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    path, filesystem = storage.dataset_location("s3://bucket/scores/", settings=settings)
    assert path == "bucket/scores" and isinstance(filesystem, pafs.PyFileSystem)
    # the endpoint travels with the filesystem to Ray's tasks (it is in the pickled options)
    assert filesystem.handler.fs.storage_options["endpoint_url"] == "http://127.0.0.1:9"
