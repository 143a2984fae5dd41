"""gRPC serving benchmark: rayms's ``inference.GRPCInferenceService`` beside MLServer's gRPC server, on the same
small models as ``serve_bench.py``, one server at a time.

    .venv/bin/python benchmarks/grpc_bench.py --models 100 --rounds 1

rayms runs as ``rayms serve --model-repository DIR --grpc-port P`` (2 model replicas on a 2-core machine, HAProxy
in front) from ``benchmarks/.venvs/rayms``; MLServer as ``mlserver start`` from ``benchmarks/.venvs/mlserver``
with its gRPC server on a free port (``peers.py`` builds both venvs, as for ``serve_bench.py``). For each server:

* correctness: one ``ModelInfer`` per model carrying every probe row, compared with scikit-learn in this process;
* latency and throughput: ``grpc_load.py`` (a random model and probe row per call, each sent as a raw FP32
  ``[1, 4]`` tensor, as tritonclient sends it) at 1 and at 16 concurrent calls, each worker on a connection of
  its own, after a discarded warm-up; CPU of the server's processes and of the client during the measured run.

The table shows medians over rounds and the ratios to MLServer of the same round; raw records go to
``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import numpy as np

import gen_models
import grpc_load
import peers
import procs
import serve_bench

from rayms.protos import inference_pb2 as pb
from rayms.protos import inference_pb2_grpc as pb_grpc

BENCH = Path(__file__).resolve().parent
SERVERS = ("rayms", "mlserver")


def infer_request(name: str, rows: list[list[float]]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="input-0", datatype="FP32", shape=[len(rows), len(rows[0])])
    request.raw_input_contents.append(np.asarray(rows, dtype="<f4").tobytes())
    return request


def predictions(response: pb.ModelInferResponse) -> list:
    """The ``predict`` output (else the first), raw or typed: rayms answers raw requests raw, MLServer typed."""
    position = next((n for n, o in enumerate(response.outputs) if o.name == "predict"), 0)
    output = response.outputs[position]
    if response.raw_output_contents:
        dtype = {"INT64": "<i8", "INT32": "<i4", "FP32": "<f4", "FP64": "<f8"}[output.datatype]
        return np.frombuffer(response.raw_output_contents[position], dtype=dtype).tolist()
    contents = output.contents
    return list(contents.int64_contents or contents.int_contents or contents.fp64_contents or contents.fp32_contents)


def check_predictions(target: str, manifest: dict) -> dict:
    mismatches = failures = 0
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for model in manifest["models"]:
            try:
                response = stub.ModelInfer(infer_request(model["name"], manifest["probes"]), timeout=60)
            except grpc.RpcError:
                failures += 1
                continue
            mismatches += [int(v) for v in predictions(response)] != model["expected"]
    return {"requests": len(manifest["models"]), "rows": len(manifest["probes"]), "mismatches": mismatches,
            "failures": failures}


def grpc_ready(target: str, last: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return (stub.ServerReady(pb.ServerReadyRequest(), timeout=5).ready
                and stub.ModelReady(pb.ModelReadyRequest(name=last), timeout=5).ready)


def measure(server: procs.Server, target: str, bodies: Path, *, concurrency: int, args) -> dict:
    """A discarded warm-up, then a measured run with the CPU the server and the client used meanwhile."""
    def load(duration: float) -> dict:
        cmd = [sys.executable, str(BENCH / "grpc_load.py"), "--target", target, "--bodies", str(bodies),
               "--concurrency", str(concurrency), "--duration", str(duration)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120)
        line = next((l for l in done.stdout.splitlines() if l.startswith("GRPC_LOAD_JSON ")), None)
        if line is None:
            raise RuntimeError(f"grpc_load gave no summary: {done.stdout[-2000:]}\n{done.stderr[-2000:]}")
        return json.loads(line.removeprefix("GRPC_LOAD_JSON "))

    load(args.warmup)
    pids = server.processes()
    server_cpu, machine_cpu = procs.cpu_seconds(pids), procs.busy_cpu_seconds()
    started = time.monotonic()
    result = load(args.duration)
    wall = time.monotonic() - started
    server_cpu = procs.cpu_seconds(pids) - server_cpu
    other_cpu = procs.busy_cpu_seconds() - machine_cpu - server_cpu - result["client_cpu_s"]
    answered = max(result["requests"], 1)
    return {"concurrency": concurrency, "rps": round(result["requests"] / (result["duration_us"] / 1e6), 1),
            "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000, "max_ms": result["max_us"] / 1000,
            "failures": result["failures"], "requests": result["requests"],
            "server_cpu_ms_per_req": round(1000 * server_cpu / answered, 3),
            "server_cores": round(server_cpu / wall, 2), "client_cores": round(result["client_cpu_s"] / wall, 2),
            "other_cores": round(other_cpu / wall, 2), "raw": result}


def serving_run(kind: str, *, round_no: int, models: Path, manifest: dict, bodies: Path, work: Path, args) -> dict:
    folder = work / f"g{round_no}-{kind}"
    record: dict = {"phase": "grpc", "server": kind, "round": round_no}
    if kind == "rayms":
        grpc_port = procs.free_port()
        server = serve_bench.make_server("rayms", folder, models, preload=True,
                                         rayms_args=("--grpc-port", str(grpc_port)))
    else:
        server = peers.make_server(kind, folder, models, preload=True)
        grpc_port = json.loads((folder / "mlserver-repository" / "settings.json").read_text())["grpc_port"]
    target = f"127.0.0.1:{grpc_port}"
    last = manifest["models"][-1]["name"]
    with serve_bench.running(server, record):
        record["startup_s"] = round(server.wait_ready(lambda: grpc_ready(target, last),
                                                      timeout_s=args.start_timeout), 2)
        if kind == "rayms":
            server.wait_ready(lambda: serve_bench.all_ready(server, len(manifest["models"])),
                              timeout_s=args.start_timeout)
        check_predictions(target, manifest)  # warms every model on the replica it reaches first
        record["correctness"] = check_predictions(target, manifest)
        record["memory"] = procs.memory(server.processes())
        record["c1"] = measure(server, target, bodies, concurrency=1, args=args)
        record["c16"] = measure(server, target, bodies, concurrency=16, args=args)
    return record


def table(records: list[dict], servers: list[str]) -> str:
    done = [r for r in records if "c16" in r]
    by = {(r["server"], r["round"]): r for r in done}

    def med(kind: str, value) -> float:
        values = [value(r) for r in done if r["server"] == kind]
        return statistics.median(values) if values else float("nan")

    def vs_mlserver(kind: str, value) -> str:
        ratios = [value(r) / value(by[("mlserver", r["round"])]) for r in done
                  if r["server"] == kind and ("mlserver", r["round"]) in by]
        return f"{statistics.median(ratios):.2f}" if ratios else "-"

    p50, p99 = (lambda r: r["c1"]["p50_ms"]), (lambda r: r["c1"]["p99_ms"])
    rps, p99_16 = (lambda r: r["c16"]["rps"]), (lambda r: r["c16"]["p99_ms"])
    cpu = lambda r: r["c16"]["server_cpu_ms_per_req"]  # noqa: E731
    columns = ["server", "c=1 p50 ms", "c=1 p99 ms", "c=16 req/s", "c=16 p99 ms", "CPU ms/req (c=16)",
               "c=1 p50 × MLServer", "c=16 req/s ÷ MLServer", "CPU/req × MLServer", "PSS MB",
               "probe mismatches / failures", "failed calls", "client cores (c=16)", "other load, cores (c=16)"]
    lines = [serve_bench.row(columns), "|---" * len(columns) + "|"]
    for kind in servers:
        rs = [r for r in done if r["server"] == kind]
        if not rs:
            continue
        lines.append(serve_bench.row([
            kind, f"{med(kind, p50):.2f}", f"{med(kind, p99):.2f}", f"{med(kind, rps):.0f}",
            f"{med(kind, p99_16):.1f}", f"{med(kind, cpu):.2f}", vs_mlserver(kind, p50), vs_mlserver(kind, rps),
            vs_mlserver(kind, cpu), f"{med(kind, lambda r: r['memory']['pss_mb']):.0f}",
            f"{sum(r['correctness']['mismatches'] for r in rs)} / {sum(r['correctness']['failures'] for r in rs)}",
            str(sum(sum(r[c]["failures"].values()) for r in rs for c in ("c1", "c16"))),
            serve_bench.joined(r["c16"]["client_cores"] for r in rs),
            serve_bench.joined(r["c16"]["other_cores"] for r in rs)]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of each measured run")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of the discarded run before each")
    parser.add_argument("--servers", default=",".join(SERVERS), help=f"any of {', '.join(SERVERS)}")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    servers = args.servers.split(",")
    if set(servers) - set(SERVERS):
        raise SystemExit(f"--servers: any of {', '.join(SERVERS)}")
    venvs = {kind: peers.ensure_venv(kind) for kind in servers}
    for kind, info in venvs.items():
        print(f"{kind} venv {'reused' if info['reused'] else 'created'}: " + " ".join(info["requirements"]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="gb-", dir="/tmp"))  # short: Ray's socket paths live under it
    records: list[dict] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"grpc-{stamp}.json"
    try:
        models = work / "models"
        manifest = gen_models.generate(models, args.models)
        bodies = work / "bodies.bin"
        grpc_load.write_bodies(bodies, [infer_request(m["name"], [row]).SerializeToString()
                                        for m in manifest["models"] for row in manifest["probes"]])
        for round_no in range(1, args.rounds + 1):
            for kind in servers:
                record = serving_run(kind, round_no=round_no, models=models, manifest=manifest, bodies=bodies,
                                     work=work, args=args)
                records.append(record)
                print(f"round {round_no} {kind}: c1 p50 {record.get('c1', {}).get('p50_ms')} ms, "
                      f"c16 {record.get('c16', {}).get('rps')} req/s, stop {record['stop']}"
                      + (f"\n  FAILED: {record['error']}" if "error" in record else ""), flush=True)
    finally:
        environment = serve_bench.environment("", venvs) | {"grpcio": grpc.__version__}
        out.write_text(json.dumps({"command": " ".join(sys.argv), "started": stamp, "args": vars(args) | {
            "results": str(args.results)}, "environment": environment, "records": records}, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{table(records, servers)}\n\nraw records: {out}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
