"""Lifecycle benchmark: how fast rayms brings many models to READY when they are registered at once.

    .venv/bin/python benchmarks/lifecycle_bench.py --models 1000

Every model is a real download: a local HTTP file server (``tests/servers.py``) serves each artifact under its
own URL, optionally after ``--latency-ms`` to stand in for an object store's first-byte latency, and counts the
GETs it is answering at once. Two runs, each on a fresh ``rayms serve`` with an empty artifact cache:

* concurrent: every ``POST /v2/repository/models/{name}/load`` sent at once (each answers when its model is
  READY); time until all are READY, the peak of concurrent downloads the file server saw, and how the states
  moved (sampled from ``/v2/repository/index``);
* sequential: the same loads one after the other, as a client that waits for each would do.

After each run every model must answer one V2 infer with scikit-learn's predictions. The artifacts are
``--distinct`` different models repeated under different names and URLs (training 1,000 forests would take
longer than the benchmark); to rayms each is its own model: its own download, load and memory.
"""

from __future__ import annotations

from datetime import datetime

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import aiohttp

import gen_models
import procs
from serve_bench import environment, v2_body

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # tests/servers.py holds the file server the storage tests use
from tests.servers import FileServer  # noqa: E402


class CountingFileServer(FileServer):
    """The tests' file server, also counting GETs (downloads) apart from HEADs."""

    def __init__(self) -> None:
        super().__init__()
        self.gets = self.heads = self.get_in_flight = self.get_peak = 0
        self._count_lock = threading.Lock()

    def _answer(self, handler, *, body: bool) -> None:
        if not body:
            with self._count_lock:
                self.heads += 1
            return super()._answer(handler, body=body)
        with self._count_lock:
            self.gets += 1
            self.get_in_flight += 1
            self.get_peak = max(self.get_peak, self.get_in_flight)
        try:
            super()._answer(handler, body=body)
        finally:
            with self._count_lock:
                self.get_in_flight -= 1

    def reset(self) -> None:
        with self._count_lock:
            self.gets = self.heads = self.get_peak = 0


async def load_all(url: str, specs: dict[str, dict], *, in_flight: int, files: CountingFileServer,
                   stall_s: float) -> tuple[list[str], dict[str, float]]:
    """Send every load with at most ``in_flight`` waiting at once (0: all at once, 1: one after the other);
    returns the failures and each load's latency. Raises TimeoutError when, for ``stall_s``, no load was
    answered and nothing was downloaded (the server is stuck; waiting longer would only hide it)."""
    failures: list[str] = []
    latency: dict[str, float] = {}
    slots = asyncio.Semaphore(in_flight or len(specs))
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:

        async def one(name: str) -> None:
            async with slots:
                started = time.monotonic()
                try:
                    async with session.post(f"{url}/v2/repository/models/{name}/load", json=specs[name]) as response:
                        text = await response.text()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    failures.append(f"{name}: {type(exc).__name__}: {exc}")
                    return
                finally:
                    latency[name] = time.monotonic() - started
                if response.status != 200:
                    failures.append(f"{name}: {response.status} {text[:200]}")

        everything = asyncio.gather(*(one(name) for name in specs))
        seen, moved = (0, 0), time.monotonic()
        while not everything.done():
            await asyncio.wait([everything], timeout=1.0)
            if (len(latency), files.gets) != seen:
                seen, moved = (len(latency), files.gets), time.monotonic()
            elif time.monotonic() - moved > stall_s:
                everything.cancel()
                raise TimeoutError(f"stalled: no load answered and nothing downloaded for {stall_s:.0f} s "
                                   f"({len(latency)} of {len(specs)} loads answered, {len(failures)} failed)")
        await everything
    return failures, latency


def wait_settled(server: procs.Server, files: CountingFileServer, *, stall_s: float) -> Counter:
    """Wait until no model is on its way (all READY or FAILED); give up when nothing moved for ``stall_s``."""
    last, moved = None, time.monotonic()
    while True:
        counts = state_counts(server)
        if not {"PENDING", "DOWNLOADING", "LOADING"} & set(counts):
            return counts
        if (counts, files.gets) != last:
            last, moved = (counts, files.gets), time.monotonic()
        elif time.monotonic() - moved > stall_s:
            raise TimeoutError(f"stalled: no state change and no download for {stall_s:.0f} s; states {dict(counts)}")
        threading.Event().wait(0.5)


def state_counts(server: procs.Server) -> Counter:
    return Counter(row["state"] for row in server.post("/v2/repository/index", json={}).json())


def check_all(server: procs.Server, expected: dict[str, list], probes: list) -> dict:
    body = v2_body(probes)
    failures = mismatches = 0
    for name, want in expected.items():
        response = server.post(f"/v2/models/{name}/infer", json=body)
        if response.status_code != 200:
            failures += 1
            continue
        outputs = response.json()["outputs"]
        got = next((o for o in outputs if o["name"] == "predict"), outputs[0])["data"]
        mismatches += got != want
    return {"requests": len(expected), "failures": failures, "mismatches": mismatches}


def run(mode: str, *, files: CountingFileServer, manifest: dict, count: int, work: Path, args) -> dict:
    """One fresh server, every model loaded in ``mode`` (``concurrent`` or ``sequential``), then checked."""
    distinct = manifest["models"]
    names = [f"lc-{mode[:3]}-{i:04d}" for i in range(count)]
    specs, expected = {}, {}
    for i, name in enumerate(names):
        source = distinct[i % len(distinct)]
        url = files.add(f"{mode}/{name}/model.joblib", Path(source["path"]).read_bytes())
        specs[name] = {"storageUri": url, "framework": "sklearn"}
        expected[name] = source["expected"]
    files.reset()
    env = {"RAYMS_INGRESS": "router"} if args.ingress == "router" else {}
    server = procs.rayms_server(REPO, work / mode, args=["--max-models-per-replica", str(count + 10)], env=env).start()
    in_flight = args.concurrency if mode == "concurrent" else 1
    record: dict = {"mode": mode, "models": count, "in_flight": in_flight or count, "ingress": args.ingress,
                    "latency_ms": args.latency_ms}
    timeline: list[dict] = []
    done = threading.Event()
    try:
        record["startup_s"] = round(server.wait_ready(lambda: server.get("/v2/health/ready").status_code == 200,
                                                      timeout_s=300), 2)

        def sample() -> None:  # how the states move, seen from the index every half second
            while not done.wait(0.5):
                try:
                    counts = state_counts(server)
                except Exception:  # the index may be slow to answer under load; skip a sample
                    continue
                timeline.append({"t": round(time.monotonic() - started, 1), **counts})

        sampler = threading.Thread(target=sample, daemon=True)  # ends with ``done``
        started, started_wall = time.monotonic(), time.time()
        sampler.start()
        failures, latency = asyncio.run(load_all(server.url, specs, in_flight=in_flight, files=files,
                                                 stall_s=args.stall_s))
        record["all_loads_answered_s"] = round(time.monotonic() - started, 2)
        record["load_failures"] = failures[:20]
        record["load_failure_count"] = len(failures)
        record["downloads"] = {"gets": files.gets, "heads": files.heads, "peak_concurrent_gets": files.get_peak}
        record["timeline"] = timeline
        # A load whose connection failed may still have registered its model: wait until every one settled.
        wait_settled(server, files, stall_s=args.stall_s)
        done.set()
        rows = server.post("/v2/repository/index", json={}).json()
        # When the last model turned READY, by the registry's own clock (same machine): its last state change.
        last = max(datetime.fromisoformat(row["updatedAt"]).timestamp() for row in rows)
        record["all_ready_s"] = round(last - started_wall, 2)
        load_times = sorted(row["loadTimeS"] or 0.0 for row in rows)
        record["registry_load_time_s"] = {"p50": load_times[len(load_times) // 2], "max": load_times[-1]}
        record["states_at_end"] = dict(Counter(row["state"] for row in rows))
        waits = sorted(latency.values())
        record["load_latency_s"] = {"p50": round(waits[len(waits) // 2], 3), "max": round(waits[-1], 3)}
        record["correctness"] = check_all(server, expected, manifest["probes"])
        pids = server.processes()
        record["memory"] = procs.memory(pids)
        record["memory_by_process"] = procs.memory_by_process(pids)
    except Exception as exc:  # keep what was measured, say what went wrong, still stop the server
        record["error"] = f"{type(exc).__name__}: {exc}"
        record["downloads"] = {"gets": files.gets, "heads": files.heads, "peak_concurrent_gets": files.get_peak}
    finally:
        done.set()
        if record.get("error") or record.get("load_failure_count"):
            record["server_log_tail"] = server.log_path.read_text(errors="replace")[-4000:]
        record["stop"] = server.stop()
    return record


def report(records: list[dict]) -> str:
    lines = ["| registration | in flight | models | all READY s | all loads answered s | per model ms | models/s | "
             "registry load time p50 / max s | peak concurrent downloads | GETs | load failures | "
             "infer failures / mismatches | PSS MB after | startup s |", "|---" * 14 + "|"]
    for r in records:
        if "all_ready_s" not in r:
            lines.append(f"| {r['mode']} | {r.get('in_flight')} | {r['models']} | **{r.get('error', 'no result')}** "
                         f"(load failures {r.get('load_failure_count')}, downloads {r.get('downloads')}) |")
            continue
        lines.append("| " + " | ".join(str(v) for v in [
            r["mode"], r["in_flight"], r["models"], r["all_ready_s"], r["all_loads_answered_s"],
            round(1000 * r["all_ready_s"] / r["models"], 1), round(r["models"] / r["all_ready_s"], 1),
            f"{r['registry_load_time_s']['p50']} / {r['registry_load_time_s']['max']}",
            r["downloads"]["peak_concurrent_gets"], r["downloads"]["gets"],
            r["load_failure_count"], f"{r['correctness']['failures']} / {r['correctness']['mismatches']}",
            round(r["memory"]["pss_mb"]), r["startup_s"]]) + " |")
    by = {r["mode"]: r for r in records if "all_ready_s" in r}
    if len(by) == 2:
        speedup = by["sequential"]["all_ready_s"] / by["concurrent"]["all_ready_s"]
        lines.append(f"\nconcurrent registration is {speedup:.1f}"
                     "x faster than loading one by one")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--distinct", type=int, default=100, help="different artifacts behind the models")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="file server delay before each answer")
    parser.add_argument("--modes", default="concurrent,sequential")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="loads in flight at once in the concurrent mode (0: all of them)")
    parser.add_argument("--ingress", choices=["default", "router"], default="default",
                        help="router: the two-hop layout (RAYMS_INGRESS=router)")
    parser.add_argument("--stall-s", type=float, default=60.0,
                        help="give up when no load was answered (or no model changed state) and nothing was "
                        "downloaded for this long")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rl-", dir="/tmp"))
    args.results.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.results / f"lifecycle-{stamp}.json"
    records: list[dict] = []
    files = CountingFileServer().start()
    files.delay_s = args.latency_ms / 1000
    try:
        manifest = gen_models.generate(work / "models", min(args.distinct, args.models))
        print(f"{len(manifest['models'])} distinct models generated; work folder {work}", flush=True)
        for mode in args.modes.split(","):
            record = run(mode, files=files, manifest=manifest, count=args.models, work=work, args=args)
            records.append(record)
            print(f"{mode}: all READY in {record.get('all_ready_s')} s, downloads {record.get('downloads')}, "
                  f"stop {record['stop']}", flush=True)
    finally:
        files.stop()
        out.write_text(json.dumps({"command": " ".join(sys.argv), "started": stamp, "args": {
            k: str(v) for k, v in vars(args).items()}, "environment": environment(""), "records": records}, indent=1))
        shutil.rmtree(work, ignore_errors=True)
    print(f"\n{report(records)}\n\nraw records: {out}")


if __name__ == "__main__":
    main()
