"""Batch scoring benchmark: ``rayms score`` against a plain pandas loop and against the HTTP server, on one
Parquet file of per-segment rows and the same per-segment models.

    .venv/bin/python benchmarks/score_bench.py --rows 1000000 --models 100

The models are ``gen_models.py``'s (model ``i`` a LogisticRegression or a small RandomForest on iris, saved as
``<dir>/m-XXXX/model.joblib``). The input has ``--rows`` rows: an ``id``, a ``segment`` naming one of the models
(uniformly at random) and the 4 iris features as float32 (iris rows plus noise), written as one file in row
groups of 65,536. Three ways to score it, one after the other:

* pandas: one process reads the file with pandas, loads every model with joblib and predicts each segment's
  rows with a groupby, then writes the predictions to Parquet. Its predictions are the models' in-process
  answers that the other two are checked against, row by row.
* rayms score: the command as a user runs it (its own local Ray, ``--model-repository``, ``--model-column``);
  wall time of the whole command and the scoring time it reports (Ray Data's run, without Ray's start). A
  first run over ``--probe-rows`` rows of the same models measures what a run costs whatever its size
  (worker processes, imports, every model loaded on every worker); the rate beyond it is
  ``(rows - probe rows) / (scoring time - probe's scoring time)``.
* HTTP: a ``rayms serve --model-repository`` started as the other benchmarks start it (``procs.py``); the file
  is read batch by batch (``--batch-size`` rows), each batch's rows are grouped by segment and each group is
  one V2 infer request (FP32 JSON) to its model, ``--http-concurrency`` requests at a time. Time from the
  first request to the last answer (the server's start and model loads are not counted).

Throughputs are rows per second. Raw records go to ``benchmarks/results/score-<stamp>.json``, with the
command's and the server's logs beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import requests
from sklearn.datasets import load_iris

import gen_models
import procs
from serve_bench import environment

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
FEATURES = ["f0", "f1", "f2", "f3"]


def write_input(path: Path, *, rows: int, models: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    iris = load_iris().data.astype(np.float32)
    x = iris[rng.integers(0, len(iris), rows)] + rng.normal(0, 0.2, size=(rows, 4)).astype(np.float32)
    segments = np.array([gen_models.model_name(i) for i in range(models)], dtype=object)[rng.integers(0, models, rows)]
    table = pa.table({"id": np.arange(rows, dtype=np.int64), "segment": segments,
                      **{name: x[:, j] for j, name in enumerate(FEATURES)}})
    pq.write_table(table, path, row_group_size=65536)


def pandas_loop(source: Path, models: Path, target: Path) -> dict:
    """The baseline a user would write by hand; returns its timing and its predictions (by row id)."""
    started = time.perf_counter()
    frame = pd.read_parquet(source)
    loaded = {folder.name: joblib.load(folder / "model.joblib") for folder in sorted(models.iterdir())
              if (folder / "model.joblib").exists()}
    predictions = np.empty(len(frame), dtype=np.int64)
    for segment, rows in frame.groupby("segment").indices.items():
        predictions[rows] = loaded[segment].predict(frame[FEATURES].to_numpy()[rows])
    pd.DataFrame({"id": frame["id"], "predict": predictions}).to_parquet(target)
    seconds = time.perf_counter() - started
    order = np.argsort(frame["id"].to_numpy())
    return {"seconds": round(seconds, 2), "rows": len(frame), "truth": predictions[order]}


def rayms_score(source: Path, models: Path, target: Path, work: Path, *, batch_size: int, workers: int | None) -> dict:
    cmd = [*procs.rayms_command(REPO / ".venv"), "score", str(source), str(target), "--model-column", "segment",
           "--key", "id", "--features", ",".join(FEATURES), "--model-repository", str(models),
           "--batch-size", str(batch_size), "--cache-dir", str(work / "cache")]
    if workers:
        cmd += ["--workers", str(workers)]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "RAY_TMPDIR": str(work)},
                          timeout=3600)
    wall = time.perf_counter() - started
    (work / "score.log").write_text(done.stdout + done.stderr)  # kept next to the raw record
    if done.returncode != 0:
        raise RuntimeError(f"rayms score failed ({done.returncode}): {done.stderr[-3000:]}")
    found = re.search(r"scored (\d+) rows into (\d+) files in .* in ([\d.]+) s", done.stdout)
    return {"wall_s": round(wall, 2), "seconds": float(found.group(3)), "rows": int(found.group(1)),
            "files": int(found.group(2)), "command": " ".join(cmd[1:])}


def http_batches(source: Path, models: Path, work: Path, *, batch_size: int, concurrency: int) -> dict:
    server = procs.rayms_server(REPO, work / "serve", args=["--model-repository", str(models)])
    count = sum(1 for folder in models.iterdir() if (folder / "model.joblib").exists())
    try:
        server.start()
        startup = server.wait_ready(lambda: _all_ready(server, count), timeout_s=900)
        session = requests.Session()
        session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=concurrency))

        def infer(segment: str, ids: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, list]:
            body = {"inputs": [{"name": "input-0", "shape": list(x.shape), "datatype": "FP32",
                                "data": x.ravel().tolist()}]}
            response = session.post(f"{server.url}/v2/models/{segment}/infer", json=body, timeout=120)
            response.raise_for_status()
            outputs = response.json()["outputs"]
            return ids, next(o for o in outputs if o["name"] == "predict")["data"]

        got_ids, got = [], []
        requests_sent = 0
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for batch in pq.ParquetFile(source).iter_batches(batch_size=batch_size):
                frame = batch.to_pandas()
                x = frame[FEATURES].to_numpy()
                ids = frame["id"].to_numpy()
                futures = [pool.submit(infer, segment, ids[rows], x[rows])
                           for segment, rows in frame.groupby("segment").indices.items()]
                requests_sent += len(futures)
                for future in futures:
                    batch_ids, labels = future.result()
                    got_ids.append(batch_ids)
                    got.append(np.asarray(labels, dtype=np.int64))
        seconds = time.perf_counter() - started
    finally:
        stopped = server.stop()
    ids = np.concatenate(got_ids)
    return {"seconds": round(seconds, 2), "rows": len(ids), "requests": requests_sent, "startup_s": round(startup, 1),
            "stop": stopped, "predictions": np.concatenate(got)[np.argsort(ids)], "ids": np.sort(ids)}


def _all_ready(server: procs.Server, count: int) -> bool:
    rows = server.post("/v2/repository/index", json={}).json()
    return sum(row["state"] == "READY" for row in rows) >= count


def mismatches(table: pa.Table, truth: np.ndarray) -> int:
    """Rows whose prediction differs from the in-process one (a missing or repeated row counts too)."""
    ids = table.column("id").to_numpy()
    got = table.column("predict").to_numpy()
    order = np.argsort(ids)
    if len(ids) != len(truth) or not np.array_equal(ids[order], np.arange(len(truth))):
        return max(len(truth), len(ids))
    return int((got[order] != truth).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=131072, help="rows per batch, for rayms score and HTTP")
    parser.add_argument("--workers", type=int, help="rayms score --workers (default: every CPU)")
    parser.add_argument("--http-concurrency", type=int, default=4, help="HTTP requests in flight at once")
    parser.add_argument("--probe-rows", type=int, default=1000, help="rows of the run that measures fixed costs")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sb-", dir="/tmp"))  # short: Ray's socket paths live under it
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"score-{stamp}.json"
    record: dict = {"command": " ".join(sys.argv), "started": stamp, "cpus": os.cpu_count(),
                    "load_average_before": os.getloadavg(), "environment": environment("")}
    try:
        models = work / "models"
        gen_models.generate(models, args.models)
        source = work / "input.parquet"
        write_input(source, rows=args.rows, models=args.models)
        print(f"{args.rows} rows, {args.models} models in {work}", flush=True)

        baseline = pandas_loop(source, models, work / "pandas.parquet")
        truth = baseline.pop("truth")
        record["pandas"] = baseline
        print(f"pandas loop: {baseline['seconds']} s", flush=True)

        probe = work / "probe.parquet"
        write_input(probe, rows=args.probe_rows, models=args.models, seed=1)
        record["rayms_score_probe"] = rayms_score(probe, models, work / "probe-scored", work,
                                                  batch_size=args.batch_size, workers=args.workers)
        print(f"rayms score, {args.probe_rows} rows: {record['rayms_score_probe']['seconds']} s scoring", flush=True)
        scored = rayms_score(source, models, work / "scored", work, batch_size=args.batch_size, workers=args.workers)
        scored["mismatches"] = mismatches(pq.read_table(work / "scored"), truth)
        record["rayms_score"] = scored
        print(f"rayms score: {scored['wall_s']} s wall, {scored['seconds']} s scoring, "
              f"{scored['mismatches']} mismatches", flush=True)

        served = http_batches(source, models, work, batch_size=args.batch_size, concurrency=args.http_concurrency)
        answers, ids = served.pop("predictions"), served.pop("ids")
        served["mismatches"] = mismatches(pa.table({"id": ids, "predict": answers}), truth)
        record["http"] = served
        print(f"HTTP: {served['seconds']} s for {served['requests']} requests, {served['mismatches']} mismatches",
              flush=True)
        record["load_average_after"] = os.getloadavg()
    finally:
        out.write_text(json.dumps(record, indent=1, default=str))
        for log in ("score.log", "serve/server.log"):
            if (work / log).exists():
                shutil.copy(work / log, args.results / f"score-{stamp}-{Path(log).name}")
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{table(record, args)}\n\nraw record: {out}")
    if record["rayms_score"]["mismatches"] or record["http"]["mismatches"]:
        raise SystemExit("predictions differ from the models' in-process answers")


def table(record: dict, args: argparse.Namespace) -> str:
    rows = args.rows

    def rate(seconds: float) -> str:
        return f"{rows / seconds:,.0f}" if seconds else "-"

    pandas_s = record["pandas"]["seconds"]
    lines = [f"{rows:,} rows, {args.models} models, batch {args.batch_size:,} rows, {record['cpus']} CPUs, load "
             f"average {record['load_average_before'][0]:.1f} before / {record['load_average_after'][0]:.1f} after",
             "", "| way | seconds | rows/s | vs pandas | mismatches |", "|---|---:|---:|---:|---:|",
             f"| pandas loop (1 process) | {pandas_s:.1f} | {rate(pandas_s)} | 1.00x | - |"]
    score = record["rayms_score"]
    for label, seconds in (("rayms score, scoring", score["seconds"]), ("rayms score, whole command", score["wall_s"])):
        lines.append(f"| {label} | {seconds:.1f} | {rate(seconds)} | {pandas_s / seconds:.2f}x | {score['mismatches']} |")
    probe = record["rayms_score_probe"]
    extra = score["seconds"] - probe["seconds"]
    beyond = f"{(rows - args.probe_rows) / extra:,.0f}" if extra > 0 else "-"
    lines.append(f"| rayms score, {args.probe_rows:,} rows (fixed cost) | {probe['seconds']:.1f} | | | |")
    lines.append(f"| rayms score, beyond the fixed cost | {max(extra, 0):.1f} | {beyond} | "
                 f"{pandas_s / extra if extra > 0 else 0:.2f}x | |")
    http = record["http"]
    lines.append(f"| HTTP, {http['requests']:,} requests, {args.http_concurrency} in flight | {http['seconds']:.1f} | "
                 f"{rate(http['seconds'])} | {pandas_s / http['seconds']:.2f}x | {http['mismatches']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
