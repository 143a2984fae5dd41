"""Kubernetes benchmark: many TrainedModels applied at once, until every one is Ready and answers correctly.

    .venv/bin/python benchmarks/k8s_bench.py --models 200

The API server is the in-repo fake (``tests/fake_apiserver``) serving the repo's TrainedModel CRD and a
RayService named ``rayms``; the server is a real rayms application with ``kubernetes=True``, started here on a
Ray instance of its own (``rayms.local.start``), whose bridge reaches the API server through a kubeconfig.
Every TrainedModel is created through the real ``kubernetes`` client, all at once from a thread pool, and has
its own storageUri (a local folder), so each is its own download, load and memory to rayms; the artifacts are
``--distinct`` tiny models over four frameworks (training 200 would take longer than the benchmark).

Measured: time from the first create until every TrainedModel reports ``Ready=True`` (and when each one did,
polled in-process every 50 ms), then one V2 infer per model at its ``status.url`` compared with the in-process
model's predictions, and the API server's request counts (writes split into creates, status writes and owner
references). ``--json`` also writes the result to a file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the fake API server and the model builders live with the tests
from tests.fake_apiserver import FakeApiServer  # noqa: E402
from tests.model_factory import make_data, make_lightgbm, make_onnx, make_sklearn, make_xgboost  # noqa: E402

CRD = REPO / "kuberay" / "trainedmodel-crd.yaml"
GROUP, VERSION, PLURAL, NS, SERVICE = "serving.rayms.io", "v1alpha1", "trainedmodels", "default", "rayms"
BUILDERS = {"sklearn": make_sklearn, "xgboost": make_xgboost, "lightgbm": make_lightgbm, "onnx": make_onnx}
ROWS = make_data(n=4, seed=5)[0]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_artifacts(root: Path, models: int, distinct: int) -> dict[str, tuple[str, Path, np.ndarray]]:
    """``name -> (framework, storage path, expected predictions)``: ``distinct`` models, one copy per name."""
    frameworks = list(BUILDERS)
    trained = []
    for i in range(distinct):
        framework = frameworks[i % len(frameworks)]
        path, expected = BUILDERS[framework](root / "trained" / f"d{i}")
        trained.append((framework, path, np.asarray(expected(ROWS), dtype=np.float64)))
    made = {}
    for i in range(models):
        framework, source, expected = trained[i % distinct]
        name = f"bench-{i:04d}"
        target = root / "models" / name / source.name
        target.parent.mkdir(parents=True)
        shutil.copyfile(source, target)
        made[name] = (framework, target, expected)
    return made


def trained_model(name: str, uri: str, framework: str, memory: str) -> dict:
    return {"apiVersion": f"{GROUP}/{VERSION}", "kind": "TrainedModel", "metadata": {"name": name, "namespace": NS},
            "spec": {"inferenceService": SERVICE, "model": {"storageUri": uri, "framework": framework,
                                                             "memory": memory}}}


def ready_names(apiserver: FakeApiServer) -> dict[str, str]:
    """``name -> status.url`` of every TrainedModel whose Ready condition is True."""
    ready = {}
    for obj in apiserver.objects(PLURAL, NS, group=GROUP):
        status = obj.get("status") or {}
        if any(c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", [])):
            ready[obj["metadata"]["name"]] = status["url"]
    return ready


def wait_all_ready(apiserver: FakeApiServer, names: set[str], started: float, timeout_s: float) -> dict:
    """Poll until every name is Ready; returns ``{"urls", "ready_at"}`` (seconds after ``started``)."""
    ready_at: dict[str, float] = {}
    urls: dict[str, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(ready_at) < len(names):
        if time.monotonic() > deadline:
            missing = sorted(names - set(ready_at))
            raise TimeoutError(f"{len(missing)} TrainedModels not Ready after {timeout_s}s, e.g. {missing[:5]}")
        now = time.monotonic() - started
        for name, url in ready_names(apiserver).items():
            if name in names and name not in ready_at:
                ready_at[name], urls[name] = now, url
        time.sleep(0.05)  # the poll interval of a condition polled against a deadline
    return {"urls": urls, "ready_at": ready_at}


def check_predictions(urls: dict[str, str], expected: dict[str, np.ndarray], threads: int) -> list[str]:
    """One V2 infer per model at its status.url; returns the problems found."""
    body = {"inputs": [{"name": "input-0", "shape": list(ROWS.shape), "datatype": "FP64",
                        "data": ROWS.ravel().tolist()}]}

    def check(name: str) -> str | None:
        response = requests.post(urls[name], json=body, timeout=300)
        if response.status_code != 200:
            return f"{name}: {response.status_code} {response.text[:200]}"
        output = next(o for o in response.json()["outputs"] if o["name"] == "predict")
        got = np.asarray(output["data"], dtype=np.float64).reshape(output["shape"])  # [N, classes] for boosters
        return None if np.allclose(got, expected[name]) else f"{name}: predicted {got.tolist()}"

    with ThreadPoolExecutor(max_workers=threads) as pool:
        return [problem for problem in pool.map(check, sorted(urls)) if problem]


def request_counts(apiserver: FakeApiServer) -> dict[str, int]:
    counts: Counter[str] = Counter()
    for record in apiserver.requests:
        if record.method == "POST" and record.path.endswith(f"/{PLURAL}"):
            counts["creates"] += 1
        elif record.method == "PATCH" and record.path.endswith("/status"):
            counts["status_writes"] += 1
        elif record.method == "PATCH":
            counts["owner_patches"] += 1
        elif record.method in ("PUT", "POST", "DELETE"):
            counts["other_writes"] += 1
        else:
            counts["reads"] += 1
    counts["writes"] = apiserver.write_count
    return dict(counts)


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3)


def apiserver_client(apiserver: FakeApiServer):
    from kubernetes import client

    return client.CustomObjectsApi(apiserver.api_client())


def run(args: argparse.Namespace, work: Path) -> dict:
    import ray
    from ray import serve

    from rayms import local
    from rayms.config import Settings

    made = make_artifacts(work, args.models, args.distinct)
    apiserver = FakeApiServer([CRD])
    apiserver.start()
    settings = None
    try:
        objects = apiserver_client(apiserver)
        objects.create_namespaced_custom_object(
            "ray.io", "v1", NS, "rayservices",
            {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": {"name": SERVICE}, "spec": {}})
        port = free_port()
        settings = Settings(
            app_name="rayms-k8s-bench", port=port, num_replicas=args.replicas, max_models_per_replica=args.models,
            cache_dir=str(work / "cache"), state_uri=str(work / "state" / "models.json"),
            kubernetes=True, kubeconfig=str(apiserver.write_kubeconfig(work / "kubeconfig")), namespace=NS,
            inference_service=SERVICE, external_url=f"http://127.0.0.1:{port}",
        )
        begun = time.monotonic()
        local.start(settings, num_cpus=args.num_cpus)  # a fresh Ray instance of its own, stopped below
        app_start_s = time.monotonic() - begun

        apiserver.reset_request_log()
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=args.client_threads) as pool:
            list(pool.map(lambda item: objects.create_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, trained_model(item[0], str(item[1][1]), item[1][0], args.memory)),
                made.items()))
        applied_s = time.monotonic() - started
        ready = wait_all_ready(apiserver, set(made), started, args.timeout_s)
        all_ready_s = max(ready["ready_at"].values())
        at_ready = request_counts(apiserver)

        checked_at = time.monotonic()
        problems = check_predictions(ready["urls"], {n: e for n, (_, _, e) in made.items()}, args.client_threads)
        predict_s = time.monotonic() - checked_at
        bridge = serve.get_deployment_handle("KubernetesBridge", settings.app_name).stats.remote().result()
        index = requests.post(f"http://127.0.0.1:{port}/v2/repository/index", timeout=60).json()
        times = list(ready["ready_at"].values())
        return {
            "models": args.models, "distinct_artifacts": args.distinct, "replicas": args.replicas,
            "num_cpus": args.num_cpus, "app_start_s": round(app_start_s, 2), "apply_s": round(applied_s, 3),
            "all_ready_s": round(all_ready_s, 3), "first_ready_s": round(min(times), 3),
            "ready_p50_s": percentile(times, 50), "ready_p90_s": percentile(times, 90),
            "predictions_checked": len(ready["urls"]), "prediction_failures": len(problems),
            "prediction_problems": problems[:10], "predict_all_s": round(predict_s, 3),
            "apiserver_at_all_ready": at_ready, "apiserver_after_predictions": request_counts(apiserver),
            "bridge": bridge, "index_states": dict(Counter(row["state"] for row in index)),
        }
    finally:
        if settings is not None and ray.is_initialized():
            local.stop(settings)
        apiserver.stop()


def report(result: dict, say: Callable[[str], None] = print) -> None:
    at_ready = result["apiserver_at_all_ready"]
    say(f"{result['models']} TrainedModels ({result['distinct_artifacts']} distinct artifacts, "
        f"{result['replicas']} replicas, Ray num_cpus={result['num_cpus']}); app started in {result['app_start_s']} s")
    say(f"  applied in {result['apply_s']} s; all Ready=True after {result['all_ready_s']} s "
        f"(first {result['first_ready_s']} s, p50 {result['ready_p50_s']} s, p90 {result['ready_p90_s']} s)")
    say(f"  predictions at status.url: {result['predictions_checked']} checked, "
        f"{result['prediction_failures']} wrong or failed, in {result['predict_all_s']} s")
    say(f"  API server writes until all Ready: {at_ready['writes']} (creates {at_ready.get('creates', 0)}, "
        f"status {at_ready.get('status_writes', 0)}, owner references {at_ready.get('owner_patches', 0)}, "
        f"other {at_ready.get('other_writes', 0)}); reads {at_ready.get('reads', 0)}")
    after = result["apiserver_after_predictions"]
    say(f"  API server writes after the prediction check: {after['writes']}; bridge {result['bridge']}")
    say(f"  registry states: {result['index_states']}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=200)
    parser.add_argument("--distinct", type=int, default=8, help="different artifacts behind the models")
    parser.add_argument("--replicas", type=int, default=2, help="model replicas of the rayms app")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the Ray instance started here")
    parser.add_argument("--memory", default="4Mi", help="spec.model.memory of every TrainedModel")
    parser.add_argument("--client-threads", type=int, default=16, help="threads creating objects and predicting")
    parser.add_argument("--timeout-s", type=float, default=900.0)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="rayms-k8s-bench-"))
    try:
        result = run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["prediction_failures"] == 0 and result["predictions_checked"] == args.models else 1


if __name__ == "__main__":
    sys.exit(main())
