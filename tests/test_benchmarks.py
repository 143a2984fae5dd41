"""The benchmark scripts stay runnable: each parses its arguments, and the shared record helpers work.

Running a benchmark takes minutes and a quiet machine, so the suite does not; this catches what breaks
them between runs (a moved helper, a changed signature)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("script", ["serve_bench.py", "lifecycle_bench.py", "profile_rayms.py", "k8s_bench.py",
                                    "gen_models.py", "score_bench.py"])
def test_each_benchmark_script_starts(script):
    done = subprocess.run([sys.executable, str(BENCH / script), "--help"], cwd=BENCH, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout


def test_the_peer_venvs_are_described_without_building_them():
    done = subprocess.run([sys.executable, "-c", "import peers; print(peers.requirements('mlserver'))"], cwd=BENCH,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "mlserver==" in done.stdout, done.stderr[-2000:]


def test_the_record_helpers_the_benchmarks_share():
    sys.path.insert(0, str(BENCH))
    try:
        import serve_bench

        environment = serve_bench.environment("")  # as lifecycle_bench and profile_rayms call it
        assert environment["commit"] and environment["ray"]
        records = [
            {"phase": "cold", "server": "floor", "round": 1, "p50_ms": 5.0, "p90_ms": 6.0, "max_ms": 9.0,
             "requests": 100, "failures": []},
            {"phase": "cold", "server": "rayms", "round": 1, "p50_ms": 15.0, "p90_ms": 20.0, "max_ms": 30.0,
             "requests": 200, "failures": [], "evictions": 200},
        ]
        table = serve_bench.table(records, ["floor", "rayms"])
        assert "infer, model evicted" in table and "15.0" in table
    finally:
        sys.path.remove(str(BENCH))


def test_the_scoring_benchmark_runs_on_a_tiny_table(tmp_path):
    """All three ways (pandas, rayms score, HTTP) on 2,000 rows and 3 models, each checked row by row."""
    done = subprocess.run([sys.executable, str(BENCH / "score_bench.py"), "--rows", "2000", "--models", "3",
                           "--batch-size", "500", "--results", str(tmp_path)], cwd=BENCH, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "| rayms score, scoring |" in done.stdout and "| HTTP, " in done.stdout
    record = json.loads(next(tmp_path.glob("score-*.json")).read_text())
    assert record["rayms_score"]["rows"] == record["http"]["rows"] == record["pandas"]["rows"] == 2000
    assert record["rayms_score"]["mismatches"] == record["http"]["mismatches"] == 0
