"""Where a rayms request spends its time: py-spy on the processes of the request path under load.

    .venv/bin/python benchmarks/profile_rayms.py --models 100 --duration 10

Starts ``rayms serve`` on generated models and drives V2 infer with wrk at 16 connections (``wrk_v2.lua``).
Meanwhile it reads the CPU time of every process of the server (so the cost of a request splits by process)
and samples the Serve proxy, the Router replica and the ModelReplica with ``py-spy record --gil --format raw``:
100 samples per second of whichever thread holds the GIL, i.e. where Python itself spends CPU. Each sample
counts for the deepest frame that is not plumbing (threading, asyncio, ...), grouped by area; the raw
collapsed stacks stay in ``benchmarks/results/profile-*/`` for a flame graph (speedscope reads them).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import gen_models
import procs
from serve_bench import environment, v2_body

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
PY_SPY = REPO / ".venv" / "bin" / "py-spy"
TARGETS = {"proxy": "ray::ProxyActor", "router": "ray::ServeReplica:rayms:Router",
           "replica": "ray::ServeReplica:rayms:ModelReplica"}
# A sample counts for the deepest frame that is not plumbing (threading, asyncio, contextlib...), by area.
AREAS = [
    ("sklearn/numpy predict", ("sklearn/", "numpy/", "scipy/", "joblib/", "narwhals/")),
    ("rayms (routes, data plane, codecs, replica)", ("rayms/",)),
    ("uvicorn / h11 / httptools", ("uvicorn/", "h11/", "httptools/")),
    ("FastAPI / Starlette / pydantic", ("fastapi/", "starlette/", "pydantic")),
    ("metrics / tracing / logging", ("ray/util/metrics", "ray/util/tracing", "opentelemetry", "prometheus",
                                     "logging/", "_metrics", "metrics_utils")),
    ("Serve (proxy, request router, replica wrapper)", ("ray/serve/",)),
    ("Ray core (actor calls, object refs, serialization)", ("ray/", "cloudpickle", "pickle")),
]
PLUMBING = ("threading.py", "asyncio/", "concurrent/", "contextlib.py", "functools.py", "inspect.py", "weakref",
            "enum.py", "copy.py", "dataclasses.py", "typing.py", "<frozen", "<string>", "warnings.py", "uuid.py",
            "queue.py", "selectors.py", "abc.py", "anyio/")
# Which thread a sample is on, recognised by a frame near the bottom of its stack.
ROLES = [
    ("user-code event loop", "_run_user_code_event_loop"), ("handle router event loop", "_run_router_event_loop"),
    ("core worker main loop", "Worker.main_loop"), ("thread pool", "concurrent/futures/thread.py"),
    ("proxy event loop", "ray/serve/_private/proxy"), ("other thread", ""),
]


def area(stack: list[str]) -> str:
    for frame in reversed(stack):
        if any(p in frame for p in PLUMBING):
            continue
        for name, needles in AREAS:
            if any(needle in frame for needle in needles):
                return name
        return "other Python"
    return "Cython / native (no Python frame: Ray's core worker, mostly)"


def role(stack: list[str]) -> str:
    return next(name for name, marker in ROLES if any(marker in frame for frame in stack))


def summarize(raw: Path, top: int) -> dict:
    """Samples per thread role, per area, with rayms on the stack, and the hottest non-plumbing functions."""
    roles: Counter = Counter()
    areas: Counter = Counter()
    functions: Counter = Counter()
    total = with_rayms = 0
    for line in raw.read_text().splitlines():
        text, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stack, n = text.split(";"), int(count)
        total += n
        roles[role(stack)] += n
        areas[area(stack)] += n
        with_rayms += n if any("rayms/" in frame for frame in stack) else 0
        leaf = next((f for f in reversed(stack) if not any(p in f for p in PLUMBING)), stack[-1])
        functions[leaf] += n
    return {"total": total, "roles": roles.most_common(), "areas": areas.most_common(),
            "with_rayms": with_rayms, "functions": functions.most_common(top)}


def find_pids(server: procs.Server) -> dict[str, int]:
    """The request path's Python processes present in this layout (no Router with replica ingress)."""
    pids = server.processes()
    named = dict(zip(sorted(pids), procs.describe(pids)))
    found = {}
    for key, prefix in TARGETS.items():
        pid = next((pid for pid, name in named.items() if name.startswith(prefix)), None)
        if pid is not None:
            found[key] = pid
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=100)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--ingress", choices=["default", "router"], default="default",
                        help="router: the two-hop layout (RAYMS_INGRESS=router)")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
    out = args.results / f"profile-{time.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    manifest = gen_models.generate(work / "models", args.models)
    names, bodies = work / "names.txt", work / "bodies.txt"
    names.write_text("\n".join(m["name"] for m in manifest["models"]) + "\n")
    bodies.write_text("\n".join(json.dumps(v2_body([row])) for row in manifest["probes"]) + "\n")
    env = {**os.environ, "WRK_NAMES": str(names), "WRK_BODIES": str(bodies)}
    env_extra = {"RAYMS_INGRESS": "router"} if args.ingress == "router" else {}
    server = procs.rayms_server(REPO, work / "rayms", args=["--model-repository", str(work / "models")],
                                env=env_extra).start()
    try:
        last = manifest["models"][-1]["name"]
        server.wait_ready(lambda: server.post(f"/v2/models/{last}/infer", json=v2_body(manifest["probes"][:1]))
                          .status_code == 200, timeout_s=300)
        for model in manifest["models"]:  # every model resident before sampling
            server.post(f"/v2/models/{model['name']}/infer", json=v2_body(manifest["probes"][:1]))
        pids = find_pids(server)
        listeners = subprocess.run(["ss", "-ltnpH", f"sport = :{server.port}"], capture_output=True,
                                   text=True).stdout.split()
        wrk = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", f"-d{args.duration + 4}s", "--timeout", "10s",
                                "-s", str(BENCH / "wrk_v2.lua"), server.url], env=env, stdout=subprocess.PIPE,
                               text=True)
        everyone = server.processes()
        names = dict(zip(sorted(everyone), procs.describe(everyone)))
        before = {pid: procs.cpu_seconds({pid}) for pid in everyone}
        spies = {key: subprocess.Popen([str(PY_SPY), "record", "-d", str(args.duration), "-r", "100", "-p", str(pid),
                                        "--format", "raw", "-o", str(out / f"{key}.txt"), "--nonblocking", "--gil"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for key, pid in pids.items()}
        for spy in spies.values():
            spy.wait(timeout=args.duration + 60)
        cpu = {pid: procs.cpu_seconds({pid}) - before[pid] for pid in everyone}
        wrk_out = wrk.communicate(timeout=60)[0]
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    line = next((l for l in wrk_out.splitlines() if l.startswith("WRK_JSON ")), "")
    result = json.loads(line.removeprefix("WRK_JSON ") or "{}")
    rps = result.get("requests", 0) / max(result.get("duration_us", 1) / 1e6, 1e-9)
    print(f"rayms at {environment('')['commit']} ({environment('')['uncommitted'] or 'no uncommitted change'})")
    print(f"load during the profile: {rps:.0f} req/s at c={args.connections}, p50 {result.get('p50_us', 0) / 1000:.1f} "
          f"ms, p99 {result.get('p99_us', 0) / 1000:.1f} ms, errors {result.get('non_2xx', 0)}\n")
    print(f"port {server.port} is answered by: {' '.join(w for w in listeners if w.startswith('users:'))}")
    print(f"CPU per request by process (over the {args.duration} s sampling window, "
          f"{rps * args.duration:.0f} requests):")
    for pid, seconds in sorted(cpu.items(), key=lambda item: -item[1]):
        if seconds > 0:
            print(f"  {1000 * seconds / max(rps * args.duration, 1):6.2f} ms  {seconds / args.duration:4.2f} cores  "
                  f"{names[pid]}")
    print(f"  {1000 * sum(cpu.values()) / max(rps * args.duration, 1):6.2f} ms  total\n")
    for key in pids:
        summary = summarize(out / f"{key}.txt", args.top)
        total = max(summary["total"], 1)
        print(f"## {key} ({TARGETS[key]}): GIL held {summary['total'] / args.duration:.0f}% of the time; "
              f"{100 * summary['with_rayms'] / total:.0f}% of samples have rayms code on the stack")
        for title in ("roles", "areas", "functions"):
            print(f"  by {'innermost non-plumbing function' if title == 'functions' else title[:-1]}:")
            for name, count in summary[title]:
                print(f"  {100 * count / total:5.1f}%  {name}")
        print()
    print(f"raw stacks: {out}")


if __name__ == "__main__":
    sys.exit(main())
