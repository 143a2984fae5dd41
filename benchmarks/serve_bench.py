"""Serving benchmark: rayms, MLServer and KServe against a bare FastAPI+uvicorn floor on the same small models,
one server at a time.

    .venv/bin/python benchmarks/serve_bench.py --models 100 --rounds 3

MLServer, KServe's model server and rayms itself run from venvs of their own under ``benchmarks/.venvs/`` that
the first run creates (``peers.py``). Each round starts each server, measures it, and stops it before the next starts:

* startup: spawn until ``GET /v2/health/ready`` is 200 and an infer on the last model is 200;
* correctness: one request per model with every probe row, compared with scikit-learn in this process;
* memory: RSS and PSS summed over every process of the server once all models answered;
* latency and throughput: wrk with ``wrk_v2.lua`` (random model, random probe row per request), at 1 and at 16
  connections, after a discarded warm-up; CPU of the server's processes during the measured run.

A second phase starts each server empty and loads every model through ``POST /v2/repository/models/{name}/load``
one after the other. A third times cold requests: to rayms, requests whose model is registered but was evicted
(each replica keeps 5 models, asked for in turn); to the others, a load followed by the first infer. The table shows medians over rounds and the ratios to the floor and to MLServer of the same
round; raw records go to ``benchmarks/results/``. See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path

import requests

import gen_models
import peers
import procs

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
# rayms as ``rayms serve`` runs it, and with the two-hop layout (Serve proxy -> Router -> model replica).
RAYMS = {"rayms": {}, "rayms-router": {"RAYMS_INGRESS": "router"},
         # every model batching whatever requests for it wait together (adaptive: no added wait)
         "rayms-batch": {"RAYMS_MAX_BATCH_SIZE": "32"},
         # one model replica instead of one per core: what the second core buys
         "rayms-1": {"RAYMS_NUM_REPLICAS": "1"},
         # without Serve's throughput-optimized settings, which rayms turns on (rayms/ray_env.py)
         "rayms-serve-defaults": {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"},
         # predict on the event loop instead of in a thread with a deadline (no isolation): what isolation costs
         "rayms-inline": {"RAYMS_PREDICT_THREADS": "0"}}
SERVERS = ["floor", *peers.SERVERS, *RAYMS]
DEFAULT_SERVERS = "floor,mlserver,kserve,rayms"


def v2_body(rows: list[list[float]]) -> dict:
    flat = [value for row in rows for value in row]
    return {"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP32", "data": flat}]}


def predictions(response) -> list:
    """The class labels of a V2 answer: the output named ``predict``. Every server here names it so by default
    (MLServer's scikit-learn runtime answers ``predict`` alone unless asked for more, with shape [n, 1] and the
    same flat data); the first output stands in only if none is."""
    outputs = response.json()["outputs"]
    return next((o for o in outputs if o["name"] == "predict"), outputs[0])["data"]


# ------------------------------------------------------------------------------------------ servers
def make_server(kind: str, work: Path, models: Path, *, preload: bool, rayms_args: tuple[str, ...] = ()) -> procs.Server:
    """``preload`` False starts the server with no models: rayms and the floor are then told where each model is
    when asked to load it; MLServer and KServe still get ``models`` as their repository and load by name from
    it. ``work`` stays short: Ray puts unix sockets under it, and their paths may not exceed 107 bytes.
    ``rayms_args`` go to ``rayms serve`` only."""
    if kind in RAYMS:
        args = [*(["--model-repository", str(models)] if preload else []), *rayms_args]
        return procs.rayms_server(REPO, work, args=args, name=kind, env=RAYMS[kind], venv=peers.VENVS / "rayms")
    if kind in peers.SERVERS:
        return peers.make_server(kind, work, models, preload=preload)
    port = procs.free_port()
    cmd = [sys.executable, str(BENCH / "floor_server.py"), "--port", str(port)]
    if preload:
        cmd += ["--model-repository", str(models)]
    work.mkdir(parents=True, exist_ok=True)
    return procs.Server(name="floor", cmd=cmd, port=port, log_path=work / "floor.log")


def all_ready(server: procs.Server, count: int) -> bool:
    rows = server.post("/v2/repository/index", json={}).json()
    return sum(row["state"] == "READY" for row in rows) >= count


def load_body(kind: str, model: dict) -> dict | None:
    """The body of ``POST /v2/repository/models/{name}/load``: where the model is for rayms and the floor; none
    for MLServer and KServe, whose repository API loads ``name`` from the folder they were started with."""
    if kind in peers.SERVERS:
        return None
    return {"storageUri": str(Path(model["path"]).parent), "framework": "sklearn"}


def check_predictions(server: procs.Server, manifest: dict) -> dict:
    """One request per model carrying every probe row; any answer unlike scikit-learn's is a mismatch."""
    body = v2_body(manifest["probes"])
    mismatches = failures = 0
    for model in manifest["models"]:
        response = server.post(f"/v2/models/{model['name']}/infer", json=body)
        if response.status_code != 200:
            failures += 1
        elif predictions(response) != model["expected"]:
            mismatches += 1
    return {"requests": len(manifest["models"]), "rows": len(manifest["probes"]), "mismatches": mismatches,
            "failures": failures}


# ------------------------------------------------------------------------------------------ load generation
def wrk_check() -> str:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: run `apt-get install -y wrk` (Debian/Ubuntu) and try again")
    return subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split("\n")[0].strip()


def wrk(url: str, *, connections: int, duration_s: int, env: dict) -> dict:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s", "--latency",
           "-s", str(BENCH / "wrk_v2.lua"), url]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=duration_s + 60)
    line = next((l for l in done.stdout.splitlines() if l.startswith("WRK_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary: {done.stdout}\n{done.stderr}")
    return json.loads(line.removeprefix("WRK_JSON "))


def measure_load(server: procs.Server, *, connections: int, args, env: dict) -> dict:
    """A discarded warm-up, then a measured wrk run with the CPU every party used meanwhile."""
    wrk(server.url, connections=connections, duration_s=args.warmup, env=env)
    pids = server.processes()
    server_cpu, machine_cpu = procs.cpu_seconds(pids), procs.busy_cpu_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = wrk(server.url, connections=connections, duration_s=args.duration, env=env)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    server_cpu = procs.cpu_seconds(pids) - server_cpu
    wrk_cpu = (after.ru_utime + after.ru_stime) - (children.ru_utime + children.ru_stime)
    other_cpu = procs.busy_cpu_seconds() - machine_cpu - server_cpu - wrk_cpu
    requests_done = max(result["requests"], 1)
    errors = sum(result[k] for k in ("connect_errors", "read_errors", "write_errors", "non_2xx", "timeouts"))
    return {
        "connections": connections,
        "rps": round(result["requests"] / (result["duration_us"] / 1e6), 1),
        "p50_ms": result["p50_us"] / 1000, "p99_ms": result["p99_us"] / 1000, "max_ms": result["max_us"] / 1000,
        "errors": errors, "requests": result["requests"],
        "server_cpu_ms_per_req": round(1000 * server_cpu / requests_done, 3),
        "server_cores": round(server_cpu / wall, 2), "wrk_cores": round(wrk_cpu / wall, 2),
        "other_cores": round(other_cpu / wall, 2), "raw": result,
    }


# ------------------------------------------------------------------------------------------ phases
@contextlib.contextmanager
def running(server: procs.Server, record: dict) -> Iterator[procs.Server]:
    """Start ``server`` for one measurement and always stop it. A failure goes into ``record`` with the
    server's log tail instead of being raised, so the other servers' measurements are kept."""
    server.start()
    try:
        yield server
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["log_tail"] = server.log_tail()
    finally:
        record["stop"] = server.stop()


def serving_run(kind: str, *, round_no: int, models: Path, manifest: dict, work: Path, args, env: dict) -> dict:
    last = manifest["models"][-1]["name"]
    one_row = v2_body(manifest["probes"][:1])
    server = make_server(kind, work / f"s{round_no}-{kind}", models, preload=True)
    record: dict = {"phase": "serve", "server": kind, "round": round_no}
    with running(server, record):
        record["startup_s"] = round(server.wait_ready(
            lambda: server.get("/v2/health/ready").status_code == 200
            and server.post(f"/v2/models/{last}/infer", json=one_row).status_code == 200,
            timeout_s=args.start_timeout), 2)
        if kind in RAYMS:  # rayms's repository index; the others load every model before the probe can pass
            record["all_ready_s"] = round(server.wait_ready(lambda: all_ready(server, len(manifest["models"])),
                                                            timeout_s=args.start_timeout), 2)
        started = time.monotonic()
        record["warm_failures"] = sum(server.post(f"/v2/models/{m['name']}/infer", json=one_row).status_code != 200
                                      for m in manifest["models"])
        record["warm_s"] = round(time.monotonic() - started, 2)
        record["correctness"] = check_predictions(server, manifest)
        pids = server.processes()
        record["memory"] = procs.memory(pids)
        record["memory_by_process"] = procs.memory_by_process(pids)
        record["c1"] = measure_load(server, connections=1, args=args, env=env)
        record["c16"] = measure_load(server, connections=16, args=args, env=env)
    return record


def load_run(kind: str, *, rep: int, models: Path, manifest: dict, work: Path, args) -> dict:
    """Start empty, then load every model through the repository API, one after the other."""
    server = make_server(kind, work / f"l{rep}-{kind}", models, preload=False)
    record: dict = {"phase": "load", "server": kind, "round": rep}
    with running(server, record):
        record["startup_empty_s"] = round(server.wait_ready(
            lambda: server.get("/v2/health/ready").status_code == 200, timeout_s=args.start_timeout), 2)
        record["memory_empty"] = procs.memory(server.processes())
        failed = []
        started = time.monotonic()
        for model in manifest["models"]:
            response = server.post(f"/v2/repository/models/{model['name']}/load", json=load_body(kind, model),
                                   timeout=600)
            if response.status_code != 200:
                failed.append(f"{model['name']}: {response.status_code} {response.text[:200]}")
        record["loads_s"] = round(time.monotonic() - started, 2)
        record["load_failures"] = failed
        record["memory_loaded"] = procs.memory(server.processes())
        record["correctness"] = check_predictions(server, manifest)
    return record


def evictions(server: procs.Server) -> int:
    """Models rayms's replicas have evicted so far, all together."""
    return sum(r["evictions"] for r in server.get("/v2/repository/replicas").json())


COLD_RESIDENT = 5  # models one rayms replica keeps in the cold phase: far fewer than it is asked for in turn


def cold_run(kind: str, *, rep: int, models: Path, manifest: dict, work: Path, args) -> dict:
    """What a request costs when its model is not in memory.

    rayms: every model registered and READY, but each replica keeps only ``COLD_RESIDENT`` of them, and the
    models are asked for in turn, twice over, so every request finds its model evicted and loads it from
    the node's disk first. The other servers keep every model they load, so for them the cold request is
    the closest thing they have: a repository load followed by the first infer, model after model."""
    one_row = v2_body(manifest["probes"][:1])
    record: dict = {"phase": "cold", "server": kind, "round": rep}
    server = make_server(kind, work / f"c{rep}-{kind}", models, preload=kind in RAYMS,
                         rayms_args=("--max-models-per-replica", str(COLD_RESIDENT)))
    with running(server, record):
        server.wait_ready(lambda: server.get("/v2/health/ready").status_code == 200, timeout_s=args.start_timeout)
        latencies, failures = [], []
        with requests.Session() as session:
            if kind in RAYMS:
                server.wait_ready(lambda: all_ready(server, len(manifest["models"])), timeout_s=args.start_timeout)
                evicted_before = evictions(server)
                for model in manifest["models"] * 2:
                    started = time.perf_counter()
                    response = session.post(f"{server.url}/v2/models/{model['name']}/infer", json=one_row, timeout=60)
                    latencies.append(time.perf_counter() - started)
                    if response.status_code != 200:
                        failures.append(f"{model['name']}: {response.status_code} {response.text[:200]}")
                record["evictions"] = evictions(server) - evicted_before
            else:
                for model in manifest["models"]:
                    started = time.perf_counter()
                    loaded = session.post(f"{server.url}/v2/repository/models/{model['name']}/load",
                                          json=load_body(kind, model), timeout=60)
                    response = session.post(f"{server.url}/v2/models/{model['name']}/infer", json=one_row, timeout=60)
                    latencies.append(time.perf_counter() - started)
                    if loaded.status_code != 200 or response.status_code != 200:
                        failures.append(f"{model['name']}: {loaded.status_code}/{response.status_code}")
        latencies.sort()
        record |= {"requests": len(latencies), "failures": failures,
                   "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
                   "p90_ms": round(1000 * latencies[int(len(latencies) * 0.9)], 2),
                   "max_ms": round(1000 * latencies[-1], 2)}
    return record


# ------------------------------------------------------------------------------------------ report
def joined(values) -> str:
    """Per-round values as ``a/b/c``."""
    return "/".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in values)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def per_round_ratio(records: list[dict], value, kind: str, base: str = "floor") -> float:
    """Median over rounds of value(kind's record) / value(base's record) of the same round."""
    by = {(r["server"], r["round"]): r for r in records}
    ratios = [value(by[(kind, n)]) / value(by[(base, n)]) for (s, n) in by if s == kind and (base, n) in by]
    return median(ratios)


def row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def header(names: list[str]) -> list[str]:
    return [row(names), "|---" * len(names) + "|"]


def table(records: list[dict], servers: list[str]) -> str:
    serve = [r for r in records if r["phase"] == "serve" and "c16" in r]
    load = [r for r in records if r["phase"] == "load" and "correctness" in r]
    # Ratios to MLServer only when it was measured; each is against MLServer's record of the same round.
    vs_mlserver = "mlserver" in servers
    rps, p50 = (lambda r: r["c16"]["rps"]), (lambda r: r["c1"]["p50_ms"])
    p99, cpu = (lambda r: r["c16"]["p99_ms"]), (lambda r: r["c16"]["server_cpu_ms_per_req"])
    pss = lambda r: r["memory"]["pss_mb"]  # noqa: E731
    columns = [  # (header, cell of a kind's records)
        ("startup s", lambda k, rs: f"{median([r['startup_s'] for r in rs]):.1f}"),
        ("c=1 p50 ms", lambda k, rs: f"{median([p50(r) for r in rs]):.2f}"),
        ("c=1 p99 ms", lambda k, rs: f"{median([r['c1']['p99_ms'] for r in rs]):.2f}"),
        ("c=16 req/s", lambda k, rs: f"{median([rps(r) for r in rs]):.0f}"),
        ("c=16 p99 ms", lambda k, rs: f"{median([p99(r) for r in rs]):.1f}"),
        ("c=16 req/s ÷ floor", lambda k, rs: f"{per_round_ratio(serve, rps, k):.2f}"),
        ("c=1 p50 × floor", lambda k, rs: f"{per_round_ratio(serve, p50, k):.1f}"),
        ("CPU ms/req (c=16)", lambda k, rs: f"{median([cpu(r) for r in rs]):.2f}"),
        ("CPU/req × floor", lambda k, rs: f"{per_round_ratio(serve, cpu, k):.1f}"),
        *([("c=16 req/s ÷ MLServer", lambda k, rs: f"{per_round_ratio(serve, rps, k, 'mlserver'):.2f}"),
           ("c=1 p50 × MLServer", lambda k, rs: f"{per_round_ratio(serve, p50, k, 'mlserver'):.1f}"),
           ("c=16 p99 × MLServer", lambda k, rs: f"{per_round_ratio(serve, p99, k, 'mlserver'):.1f}"),
           ("CPU/req × MLServer", lambda k, rs: f"{per_round_ratio(serve, cpu, k, 'mlserver'):.1f}"),
           ("PSS × MLServer", lambda k, rs: f"{per_round_ratio(serve, pss, k, 'mlserver'):.1f}")]
          if vs_mlserver else []),
        ("server cores (c=16)", lambda k, rs: f"{median([r['c16']['server_cores'] for r in rs]):.2f}"),
        ("PSS MB", lambda k, rs: f"{median([pss(r) for r in rs]):.0f}"),
        ("RSS MB", lambda k, rs: f"{median([r['memory']['rss_mb'] for r in rs]):.0f}"),
        ("processes", lambda k, rs: f"{median([r['memory']['processes'] for r in rs]):.0f}"),
        ("probe mismatches / failures", lambda k, rs: f"{sum(r['correctness']['mismatches'] for r in rs)} / "
                                                      f"{sum(r['correctness']['failures'] for r in rs)}"),
        ("wrk errors", lambda k, rs: f"{sum(r['c1']['errors'] + r['c16']['errors'] for r in rs)}"),
        ("other load on the box, cores (c=16)", lambda k, rs: joined(r["c16"]["other_cores"] for r in rs)),
    ]
    by_kind = {kind: sorted((r for r in serve if r["server"] == kind), key=lambda r: r["round"]) for kind in servers}
    lines: list[str] = []
    if serve:
        lines += header(["server", *(name for name, _ in columns)])
        lines += [row([kind, *(cell(kind, rs) for _, cell in columns)]) for kind, rs in by_kind.items() if rs]
        lines += ["", *header(["server", "c=16 req/s per round", "startup s per round", "all models READY s",
                               "stop s", "leftover processes killed"])]
        lines += [row([kind, joined(rps(r) for r in rs), joined(r["startup_s"] for r in rs),
                       joined(r.get("all_ready_s", r["startup_s"]) for r in rs),
                       joined(r["stop"].get("stop_s") for r in rs),
                       str(sum(len(r["stop"].get("leftovers_killed", [])) for r in rs))])
                  for kind, rs in by_kind.items() if rs]
    if load:
        loads = lambda r: r["loads_s"]  # noqa: E731
        lines += ["", *header(["server", "startup, empty s", "load all s", "per model ms", "load × floor",
                               *(["load × MLServer"] if vs_mlserver else []), "PSS MB empty → loaded",
                               "load failures", "probe mismatches / failures", "load s per round"])]
        for kind in servers:
            rs = sorted((r for r in load if r["server"] == kind), key=lambda r: r["round"])
            if not rs:
                continue
            seconds = median([loads(r) for r in rs])
            count = rs[0]["correctness"]["requests"]
            lines.append(row([
                kind, f"{median([r['startup_empty_s'] for r in rs]):.1f}", f"{seconds:.2f}",
                f"{1000 * seconds / count:.0f}", f"{per_round_ratio(load, loads, kind):.1f}",
                *([f"{per_round_ratio(load, loads, kind, 'mlserver'):.1f}"] if vs_mlserver else []),
                f"{median([r['memory_empty']['pss_mb'] for r in rs]):.0f} → "
                f"{median([r['memory_loaded']['pss_mb'] for r in rs]):.0f}",
                f"{sum(len(r['load_failures']) for r in rs)}",
                f"{sum(r['correctness']['mismatches'] for r in rs)} / {sum(r['correctness']['failures'] for r in rs)}",
                joined(loads(r) for r in rs),
            ]))
    cold = [r for r in records if r["phase"] == "cold" and "p50_ms" in r]
    if cold:
        lines += ["", *header(["server", "cold request", "p50 ms", "p90 ms", "max ms", "requests",
                               "evictions during the run", "failures", "p50 ms per round"])]
        for kind in servers:
            rs = sorted((r for r in cold if r["server"] == kind), key=lambda r: r["round"])
            if rs:
                lines.append(row([
                    kind, "infer, model evicted" if kind in RAYMS else "load, then infer",
                    f"{median([r['p50_ms'] for r in rs]):.1f}", f"{median([r['p90_ms'] for r in rs]):.1f}",
                    f"{max(r['max_ms'] for r in rs):.0f}", str(sum(r["requests"] for r in rs)),
                    joined(r.get("evictions", "-") for r in rs), str(sum(len(r["failures"]) for r in rs)),
                    joined(r["p50_ms"] for r in rs)]))
    return "\n".join(lines)


def environment(wrk_version: str, venvs: dict[str, dict] | None = None) -> dict:
    """Versions (the peers' read from their venvs), and which rayms code ran: the commit plus any uncommitted
    change to ``rayms/``."""
    packages = ("ray", "fastapi", "uvicorn", "scikit-learn", "numpy", "orjson")
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "wrk": wrk_version,
            **{name: version(name) for name in packages},
            "peers": {kind: info | {"versions": peers.installed(info["python"], peers.REPORTED[kind])}
                      for kind, info in (venvs or {}).items()},
            "commit": git("rev-parse", "--short", "HEAD"), "uncommitted": git("status", "--porcelain", "rayms")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=10, help="seconds of each measured wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of the discarded run before each")
    parser.add_argument("--phases", default="serve,load,cold", help="any of serve, load, cold (comma-separated)")
    parser.add_argument("--servers", default=DEFAULT_SERVERS,
                        help=f"from {', '.join(SERVERS)} (comma-separated; the floor is required)")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    wrk_version = wrk_check()
    phases = set(args.phases.split(","))
    servers = args.servers.split(",")
    if "floor" not in servers or set(servers) - set(SERVERS):
        raise SystemExit(f"--servers: the floor plus any of {', '.join(SERVERS)}")
    venvs = {}
    # created on the first run, reused afterwards
    for kind in dict.fromkeys("rayms" if k in RAYMS else k for k in servers if k in peers.SERVERS or k in RAYMS):
        venvs[kind] = peers.ensure_venv(kind)
        info = venvs[kind]
        print(f"{kind} venv {'reused' if info['reused'] else 'created'} (installed in {info['install_s']} s): "
              + " ".join(info["requirements"]), flush=True)

    work = Path(tempfile.mkdtemp(prefix="rb-", dir="/tmp"))  # short: Ray's socket paths live under it
    records: list[dict] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / f"serve-{stamp}.json"
    try:
        models = work / "models"
        manifest = gen_models.generate(models, args.models)
        names, bodies = work / "names.txt", work / "bodies.txt"
        names.write_text("\n".join(m["name"] for m in manifest["models"]) + "\n")
        bodies.write_text("\n".join(json.dumps(v2_body([row])) for row in manifest["probes"]) + "\n")
        env = {**os.environ, "WRK_NAMES": str(names), "WRK_BODIES": str(bodies)}
        print(f"{args.models} models generated in {manifest['seconds']} s; work folder {work}", flush=True)
        runs = {  # phase -> (run one server once, what the progress line shows)
            "serve": (lambda kind, n: serving_run(kind, round_no=n, models=models, manifest=manifest, work=work,
                                                  args=args, env=env),
                      lambda r: f"startup {r.get('startup_s')} s, c16 {r.get('c16', {}).get('rps')} req/s"),
            "load": (lambda kind, n: load_run(kind, rep=n, models=models, manifest=manifest, work=work, args=args),
                     lambda r: f"{r.get('loads_s')} s"),
            "cold": (lambda kind, n: cold_run(kind, rep=n, models=models, manifest=manifest, work=work, args=args),
                     lambda r: f"p50 {r.get('p50_ms')} ms"),
        }
        for phase, (run, summary) in runs.items():
            for round_no in range(1, args.rounds + 1) if phase in phases else ():
                for kind in servers:
                    record = run(kind, round_no)
                    records.append(record)
                    print(f"{phase} round {round_no} {kind}: {summary(record)}, stop {record['stop']}"
                          + (f"\n  FAILED: {record['error']}" if "error" in record else ""), flush=True)
    finally:
        out.write_text(json.dumps({"command": " ".join(sys.argv), "started": stamp, "args": vars(args) | {
            "results": str(args.results)}, "environment": environment(wrk_version, venvs), "records": records},
            indent=1))
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{table(records, servers)}\n\nraw records: {out}")


if __name__ == "__main__":
    main()
