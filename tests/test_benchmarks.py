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
                                    "gen_models.py", "grpc_bench.py", "grpc_load.py", "score_bench.py"])
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


def test_the_grpc_load_generator_runs_a_tiny_load_and_counts_failures(tmp_path):
    """grpc_load.py against a gRPC server in this process that answers every other call UNAVAILABLE."""
    from concurrent import futures

    import grpc

    sys.path.insert(0, str(BENCH))
    try:
        import grpc_load
    finally:
        sys.path.remove(str(BENCH))
    calls = []

    def infer(request: bytes, context) -> bytes:
        calls.append(request)
        if len(calls) % 2 == 0:
            context.abort(grpc.StatusCode.UNAVAILABLE, "every other call")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)})])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        grpc_load.write_bodies(tmp_path / "bodies.bin", [b"first", b"second body"])
        assert grpc_load.read_bodies(tmp_path / "bodies.bin") == [b"first", b"second body"]
        done = subprocess.run([sys.executable, str(BENCH / "grpc_load.py"), "--target", f"127.0.0.1:{port}",
                               "--bodies", str(tmp_path / "bodies.bin"), "--concurrency", "2", "--duration", "0.5"],
                              capture_output=True, text=True, timeout=120)
    finally:
        server.stop(None)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout.split("GRPC_LOAD_JSON ", 1)[1])
    assert summary["requests"] > 0 and summary["failures"]["UNAVAILABLE"] > 0
    assert summary["requests"] + summary["failures"]["UNAVAILABLE"] == len(calls)
    assert set(calls) <= {b"first", b"second body"} and 0 < summary["p50_us"] <= summary["max_us"]


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
