"""Batch scoring end to end on real Ray Data: Parquet files in tmp_path and on moto's S3, models trained into
tmp_path or served by a running rayms, predictions compared with the models in-process; and ``rayms score``
as a user runs it, in its own process with its own Ray."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import rayms
from rayms.config import Settings
from rayms.errors import ScoringError
from tests import model_factory as mf
from tests.servers import MotoS3, credentials

ROOT = Path(__file__).resolve().parents[1]
SEGMENTS = ("seg-a", "seg-b", "seg-c")

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    """Three per-segment models of three frameworks (a model repository folder) and their in-process answers."""
    root = tmp_path_factory.mktemp("score-repo")
    return root, mf.make_segment_models(root)


def write_input(folder: Path, *, files: int = 3, rows: int = 1000, seed: int = 0) -> dict[int, tuple]:
    """``files`` Parquet files of ``rows`` rows each (row groups of 250); returns id -> (segment, features)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truth = {}
    for number in range(files):
        ids = np.arange(number * rows, (number + 1) * rows)
        x = rng.normal(size=(rows, mf.N_FEATURES))
        segments = np.array(SEGMENTS, dtype=object)[rng.integers(0, len(SEGMENTS), rows)]
        pq.write_table(pa.table({"id": ids, "segment": segments, **{f"f{j}": x[:, j] for j in range(mf.N_FEATURES)}}),
                       folder / f"part-{number}.parquet", row_group_size=250)
        truth |= {int(i): (s, row) for i, s, row in zip(ids, segments, x)}
    return truth


def assert_predictions(table: pa.Table, truth: dict, expected: dict) -> None:
    """Every output row holds its own model's in-process answer for its own features."""
    ids = table.column("id").to_numpy()
    got = table.column("predict").to_numpy()
    assert len(set(ids.tolist())) == len(ids)
    for segment, model in expected.items():
        rows = np.array([truth[int(i)][0] == segment for i in ids])
        if rows.any():
            features = np.array([truth[int(i)][1] for i in ids[rows]])
            np.testing.assert_allclose(got[rows], model(features), rtol=1e-6)


def test_per_segment_models_score_a_folder(ray_instance, repo, tmp_path):
    root, expected = repo
    truth = write_input(tmp_path / "in")
    summary = rayms.score(str(tmp_path / "in"), str(tmp_path / "out"),
                          models=rayms.model_specs(model_repository=str(root)), keys=["id"], model_column="segment",
                          settings=Settings(cache_dir=str(tmp_path / "cache")), batch_size=500)
    assert summary.rows == 3000 and summary.files >= 1 and summary.rows_per_s > 0
    assert (tmp_path / "out" / "_SUCCESS").exists()
    out = pq.read_table(tmp_path / "out")
    assert out.column_names == ["id", "predict"] and out.num_rows == 3000
    assert_predictions(out, truth, expected)
    with pytest.raises(ScoringError, match="is not empty; choose another output or overwrite it"):
        rayms.score(str(tmp_path / "in"), str(tmp_path / "out"), models=rayms.model_specs(model_repository=str(root)),
                    keys=["id"], model_column="segment")


def test_a_model_registered_with_a_running_server(rayms_server, repo, tmp_path):
    """The spec comes from the server's repository index; the answers are the model's and the server's."""
    root, expected = repo
    assert rayms_server.load("score-b", str(root / "seg-b"), "xgboost").status_code == 200
    truth = write_input(tmp_path / "in", files=1, rows=800, seed=5)
    specs = rayms.model_specs(url=rayms_server.url)
    assert specs["score-b"].storage_uri == str(root / "seg-b") and specs["score-b"].framework == "xgboost"
    rayms.score(str(tmp_path / "in" / "part-0.parquet"), str(tmp_path / "out"), models=specs, model="score-b",
                keys=["id"], features=["f0", "f1", "f2", "f3"], outputs=["predict", "predict_proba"])
    out = pq.read_table(tmp_path / "out").sort_by("id")
    x = np.array([truth[int(i)][1] for i in out.column("id").to_numpy()])
    np.testing.assert_array_equal(out.column("predict").to_numpy(), expected["seg-b"](x))
    np.testing.assert_allclose(np.array(out.column("predict_proba").to_pylist()), expected["seg-b"](x, proba=True),
                               rtol=1e-6)
    served = rayms_server.post("/v2/models/score-b/infer", json={"inputs": [
        {"name": "input-0", "shape": [5, 4], "datatype": "FP64", "data": x[:5].ravel().tolist()}]}).json()
    # the same float32 values (JSON writes a float32's shortest form, Parquet holds it widened to float64)
    np.testing.assert_array_equal(np.float32(next(o for o in served["outputs"] if o["name"] == "predict")["data"]),
                                  np.float32(out.column("predict").to_pylist()[:5]))


def test_a_bad_row_stops_the_run_and_what_was_written_stays(ray_instance, repo, tmp_path):
    root, expected = repo
    truth = write_input(tmp_path / "in", files=6, rows=500, seed=2)
    last = tmp_path / "in" / "part-5.parquet"
    table = pq.read_table(last)
    segments = table.column("segment").to_pylist()
    segments[400] = "seg-zz"
    pq.write_table(table.set_column(1, "segment", pa.array(segments)), last)
    with pytest.raises(ScoringError) as caught:
        # One worker takes the blocks in order: the unknown model is met last, after blocks already written.
        rayms.score(str(tmp_path / "in"), str(tmp_path / "out"), models=rayms.model_specs(model_repository=str(root)),
                    keys=["id"], model_column="segment", batch_size=250, workers=1,
                    settings=Settings(cache_dir=str(tmp_path / "cache")))
    message = str(caught.value)
    assert message.startswith(f"file {last}, row id=2900: model 'seg-zz' is not among the models given "
                              "(seg-a, seg-b, seg-c) (the run stopped there;"), message
    kept = int(re.search(r"keeps the (\d+) rows", message).group(1))
    out = pq.read_table(tmp_path / "out")
    assert out.num_rows == kept > 0
    assert_predictions(out, truth, expected)
    assert "model 'seg-zz' is not among the models given" in (tmp_path / "out" / "_FAILED").read_text()
    assert not (tmp_path / "out" / "_SUCCESS").exists()


@pytest.fixture
def moto():
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()


def run_cli(*args: str, env: dict | None = None, timeout_s: float = 400) -> subprocess.CompletedProcess:
    """``rayms score ARGS`` with a Ray of its own (never the tests' instance)."""
    inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.run([sys.executable, "-m", "rayms.cli", "score", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout_s, env={**inherited, **(env or {})})


def test_the_score_command_on_s3_shows_progress_and_its_throughput(repo, tmp_path, moto):
    """Input, output and models on S3; the command starts a Ray of its own, whose workers have the shell's
    environment (the endpoint and the credentials)."""
    root, expected = repo
    truth = write_input(tmp_path / "in", files=2, rows=1000, seed=4)
    moto.bucket("data", {f"in/{p.name}": p.read_bytes() for p in (tmp_path / "in").iterdir()})
    moto.bucket("models", {f"{n}/{p.name}": p.read_bytes() for n in SEGMENTS for p in (root / n).iterdir()})
    models = [f"--model={n}=s3://models/{n}:{fw}" for n, fw in zip(SEGMENTS, ("sklearn", "xgboost", "lightgbm"))]
    done = run_cli("s3://data/in", "s3://data/out", "--model-column", "segment", "--key", "id", *models,
                   "--num-cpus", "2", "--batch-size", "500", "--cache-dir", str(tmp_path / "cache"),
                   env={**credentials(), "AWS_ENDPOINT_URL_S3": moto.endpoint,
                        "RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"scored 2000 rows into \d+ files in s3://data/out in [\d.]+ s \([\d,]+ rows/s\)",
                     done.stdout), done.stdout
    assert "Total Progress" in done.stdout + done.stderr  # Ray Data's progress, logged off a terminal
    client = moto.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="data", Prefix="out/")["Contents"]]
    assert "out/_SUCCESS" in keys
    (tmp_path / "got").mkdir()
    for key in (k for k in keys if k.endswith(".parquet")):
        client.download_file("data", key, str(tmp_path / "got" / key.split("/")[-1]))
    assert_predictions(pq.read_table(tmp_path / "got"), truth, expected)


def run_cli_in_terminal(*args: str, timeout_s: float = 400) -> tuple[int, str]:
    """``rayms score ARGS`` with a pseudo-terminal as its stdout and stderr, as a user at a shell sees it."""
    import pty
    import threading

    leader, follower = pty.openpty()
    inherited = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "rayms.cli", "score", *args], cwd=ROOT, env=inherited,
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=follower)
    os.close(follower)
    chunks: list[bytes] = []

    def drain() -> None:  # read as it comes: a full terminal buffer would block the command
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the command exited and closed the terminal
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        os.close(leader)
    return code, b"".join(chunks).decode(errors="replace")


def test_the_score_command_draws_progress_bars_on_a_terminal(repo, tmp_path):
    root, expected = repo
    truth = write_input(tmp_path / "in", files=2, rows=1000, seed=6)
    code, screen = run_cli_in_terminal(str(tmp_path / "in"), str(tmp_path / "out"), "--model-column", "segment",
                                       "--key", "id", "--model-repository", str(root), "--num-cpus", "2",
                                       "--batch-size", "500", "--cache-dir", str(tmp_path / "cache"))
    assert code == 0, screen[-3000:]
    assert re.search(r"MapBatches\(_Worker\)\s+100%", screen), screen[-3000:]  # Ray Data's bar per operator
    assert "scored 2000 rows into" in screen
    assert_predictions(pq.read_table(tmp_path / "out"), truth, expected)


def test_the_score_command_refuses_a_missing_column_before_starting_ray(repo, tmp_path):
    root, _ = repo
    write_input(tmp_path / "in", files=1, rows=10)
    done = run_cli(str(tmp_path / "in"), str(tmp_path / "out"), "--model", "seg-a", "--key", "id",
                   "--features", "f0,f1,f9", "--model-repository", str(root), timeout_s=60)
    assert done.returncode == 1
    assert done.stderr.strip() == (f"rayms score: {tmp_path / 'in'} has no column 'f9' "
                                   "(its columns: id, segment, f0, f1, f2, f3)")
    assert not (tmp_path / "out").exists()
