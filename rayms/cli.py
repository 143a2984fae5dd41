"""The ``rayms`` command: argument parsing only.

``rayms serve`` starts Ray and the application here; ``rayms models list|load|unload`` and
``rayms predict`` talk to a running server over HTTP (no Ray needed on the client side); ``rayms score``
scores a Parquet dataset with the same models on Ray Data (:mod:`rayms.cluster.batch`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import requests

from rayms import framework_table

DEFAULT_URL = "http://127.0.0.1:8000"


class UsageError(Exception):
    """A flag's value cannot be used; ``rayms serve`` prints it and exits with 2 before starting anything."""


def serve_settings(args: argparse.Namespace):
    """The :class:`~rayms.config.Settings` of ``rayms serve``: each flag given overrides the environment
    (``RAYMS_*``), a flag not given leaves it alone. Raises :class:`UsageError` for a bad value."""
    from pydantic import ValidationError

    from rayms.config import Settings, parse_quantity
    from rayms.errors import InvalidSpec

    flags = {"host": args.host, "port": args.port, "num_replicas": args.replicas,
             "max_models_per_replica": args.max_models_per_replica, "max_batch_size": args.max_batch_size,
             "model_repository": args.model_repository, "models_file": args.models_file, "state_uri": args.state_uri,
             "cache_dir": args.cache_dir, "namespace": args.namespace, "inference_service": args.inference_service,
             "kubeconfig": args.kubeconfig, "kubernetes": args.kubernetes or None,
             "kserve_compat": args.kserve_compat or None, "allow_storage": args.allow_storage,
             "control_token_file": args.control_token_file, "model_control": args.model_control,
             "grpc_port": args.grpc_port}
    overrides: dict[str, Any] = {field: value for field, value in flags.items() if value not in (None, "")}
    if args.replica_memory:
        try:
            overrides["replica_memory_bytes"] = parse_quantity(args.replica_memory)
        except InvalidSpec as exc:
            raise UsageError(f"--replica-memory: {exc}") from exc
    if args.demo:
        from rayms.demo import write_demo_models

        demo_dir = write_demo_models(args.demo_dir)
        overrides["model_repository"] = str(demo_dir)
        overrides.setdefault("state_uri", str(demo_dir / ".rayms-state.json"))
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise UsageError("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())) from exc


def _serve(args: argparse.Namespace) -> int:
    from rayms import local

    try:
        settings = serve_settings(args)
    except UsageError as exc:
        print(f"rayms serve: {exc}", file=sys.stderr)
        return 2

    print(f"starting rayms on http://{settings.host}:{settings.port} ...", flush=True)
    local.start(settings)
    stop = threading.Event()
    # Installed once Ray has started (it sets handlers of its own), before waiting for the models: Ctrl-C and
    # SIGTERM stop cleanly from here on, also while the first models load.
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    base = f"http://{settings.host}:{settings.port}"
    control = settings.control_token.get_secret_value() if settings.control_token else None
    if control is None and settings.control_token_file:
        control = Path(settings.control_token_file).expanduser().read_text().strip()
    _wait_for_models(base, stop, control)
    if not stop.is_set():
        if args.demo:
            from rayms.demo import print_demo_commands

            print_demo_commands(base)
        grpc = f" and gRPC on {settings.host}:{settings.grpc_port}" if settings.grpc_port is not None else ""
        print(f"rayms is serving on {base}{grpc} (Ctrl-C stops it)", flush=True)
    while not stop.wait(timeout=1.0):
        pass
    print("stopping rayms ...", flush=True)
    local.stop(settings)
    return 0


def _wait_for_models(base: str, stop: threading.Event, token: str | None, timeout_s: float = 300.0) -> None:
    """Wait until every model registered at start is READY or FAILED (or ``stop``), then print their states."""
    deadline = time.monotonic() + timeout_s
    rows: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not stop.is_set():
        try:
            rows = requests.post(f"{base}/v2/repository/index", timeout=10, headers=_auth(token)).json()
        except (requests.RequestException, ValueError):
            rows = []
        if isinstance(rows, list) and all(r.get("state") in ("READY", "FAILED") for r in rows):
            break
        stop.wait(0.5)
    for row in rows if isinstance(rows, list) else []:
        reason = f" ({row['reason']})" if row.get("reason") else ""
        print(f"  model {row['name']}: {row.get('state')}{reason}", flush=True)


def _auth(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client_token(args: argparse.Namespace) -> str | None:
    """The bearer token a client command sends: --token-file, else RAYMS_CONTROL_TOKEN."""
    if getattr(args, "token_file", None):
        return Path(args.token_file).expanduser().read_text().strip()
    return os.environ.get("RAYMS_CONTROL_TOKEN") or None


def _request(method: str, url: str, body: Any = None, token: str | None = None) -> Any:
    try:
        response = requests.request(method, url, json=body, timeout=660, headers=_auth(token))
    except requests.ConnectionError as exc:
        raise SystemExit(f"error: cannot reach {url}: {exc}") from exc
    try:
        payload = response.json()
    except ValueError:
        payload = {"error": response.text}
    if response.status_code >= 400:
        raise SystemExit(f"error ({response.status_code}): {payload.get('error', payload)}")
    return payload


def _models(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    if args.action == "list":
        rows = _request("POST", f"{base}/v2/repository/index", {}, _client_token(args))
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'NAME':<28} {'VERSION':<8} {'STATE':<12} {'FRAMEWORK':<10} {'DECLARED':>10} {'MEASURED':>10} "
              f"{'LOAD S':>7} REPLICAS  REASON")
        for row in rows:
            load_time = row.get("loadTimeS")
            print(f"{row['name']:<28} {row.get('version', ''):<8} {row.get('state', ''):<12} "
                  f"{row.get('framework', ''):<10} {_size(row.get('declaredMemory')):>10} "
                  f"{_size(row.get('measuredMemory')):>10} {'' if load_time is None else f'{load_time:.2f}':>7} "
                  f"{len(row.get('replicas', [])):<9} {row.get('reason', '')}")
        return 0
    if not args.name:
        raise SystemExit(f"error: 'rayms models {args.action}' needs a model name")
    if args.action == "load":
        parameters = {"max_batch_size": args.max_batch_size} if args.max_batch_size else None
        body = {k: v for k, v in {"storageUri": args.storage_uri, "framework": args.framework,
                                  "memory": args.memory, "parameters": parameters}.items() if v}
        print(json.dumps(_request("POST", f"{base}/v2/repository/models/{args.name}/load", body or None,
                                  _client_token(args))))
    else:
        print(json.dumps(_request("POST", f"{base}/v2/repository/models/{args.name}/unload", None,
                                  _client_token(args))))
    return 0


def _predict(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    rows = json.loads(args.data)
    if args.protocol == "v1":
        print(json.dumps(_request("POST", f"{base}/v1/models/{args.name}:predict", {"instances": rows},
                                  _client_token(args))))
        return 0
    flat = [x for row in rows for x in (row if isinstance(row, list) else [row])]
    shape = [len(rows), len(rows[0])] if rows and isinstance(rows[0], list) else [len(rows)]
    body = {"inputs": [{"name": "input-0", "shape": shape, "datatype": "FP64", "data": flat}]}
    print(json.dumps(_request("POST", f"{base}/v2/models/{args.name}/infer", body, _client_token(args))))
    return 0


def _score(args: argparse.Namespace) -> int:
    from rayms import scoring
    from rayms.config import Settings
    from rayms.errors import RaymsError

    try:
        named = [scoring.parse_model_arg(text) for text in args.model or []]
        defined = {name: spec for name, spec in named if spec is not None}
        specs = scoring.model_specs(url=args.url, model_repository=args.model_repository,
                                    models_file=args.models_file, models=defined)
        if not args.model_column and len(named) != 1:
            raise SystemExit("rayms score: give --model-column, or exactly one --model for every row")
        if args.model_column and len(defined) != len(named):
            raise SystemExit("rayms score: with --model-column, --model defines a model: NAME=URI[:FRAMEWORK]")
        settings = Settings(**({"cache_dir": args.cache_dir} if args.cache_dir else {}))
    except RaymsError as exc:
        print(f"rayms score: {exc}", file=sys.stderr)
        return 2
    from rayms.cluster import batch

    try:
        summary = batch.score(
            args.input, args.output, models=specs, keys=_names(args.key), features=_names(args.features) or None,
            model=None if args.model_column else named[0][0], model_column=args.model_column,
            outputs=_names(args.outputs) or None, settings=settings, batch_size=args.batch_size,
            workers=args.workers, max_models_per_worker=args.max_models_per_worker, overwrite=args.overwrite,
            address=args.address, num_cpus=args.num_cpus)
    except RaymsError as exc:
        print(f"rayms score: {exc}", file=sys.stderr)
        return 1
    finally:
        batch.disconnect()
    print(f"scored {summary.rows} rows into {summary.files} files in {summary.output} in {summary.seconds:.1f} s "
          f"({summary.rows_per_s:,.0f} rows/s)", flush=True)
    return 0


def _names(values: list[str] | None) -> list[str]:
    """Column names given as repeated flags and/or comma-separated lists."""
    return [name.strip() for value in values or [] for name in value.split(",") if name.strip()]


def _size(value: Any) -> str:
    if not value:
        return "-"
    for unit in ("B", "Ki", "Mi", "Gi"):
        if value < 1024 or unit == "Gi":
            return f"{value:.0f}{unit}" if unit == "B" else f"{value:.1f}{unit}"
        value /= 1024
    return str(value)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="rayms", description="Multi-model serving on Ray Serve.")
    commands = root.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="start Ray and serve models here")
    serve.add_argument("--demo", action="store_true", help="train small sklearn/XGBoost/LightGBM models and serve them")
    serve.add_argument("--demo-dir", default=None, help="where --demo writes its models (default: a temp folder)")
    serve.add_argument("--model-repository", help="serve every sub-folder of this folder as a model")
    serve.add_argument("--models", dest="models_file", help="KServe models.json to register at start")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1, or RAYMS_HOST)")
    serve.add_argument("--port", type=int, help="HTTP port (default 8000, or RAYMS_PORT)")
    serve.add_argument("--grpc-port", type=int, default=None,
                       help="also serve the Open Inference Protocol over gRPC on this port (default: no gRPC)")
    serve.add_argument("--replicas", type=int, help="number of model replicas")
    serve.add_argument("--max-models-per-replica", type=int, help="models one replica keeps loaded")
    serve.add_argument("--replica-memory", help="model-memory budget per replica, e.g. 2Gi")
    serve.add_argument("--max-batch-size", type=int,
                       help="batch up to this many rows of requests waiting for the same model (default 1: off), "
                            "for models that do not set max_batch_size themselves")
    serve.add_argument("--state", dest="state_uri", help="where the registry persists models (path or fsspec URI)")
    serve.add_argument("--cache-dir", help="per-node artifact cache folder")
    serve.add_argument("--kubernetes", action="store_true", help="serve TrainedModel resources from Kubernetes")
    serve.add_argument("--namespace", help="namespace of the TrainedModels")
    serve.add_argument("--inference-service", help="serve TrainedModels whose spec.inferenceService is this")
    serve.add_argument("--kubeconfig", help="kubeconfig path (default: $KUBECONFIG or ~/.kube/config)")
    serve.add_argument("--kserve-compat", action="store_true", help="watch serving.kserve.io TrainedModels")
    serve.add_argument("--allow-storage", action="append", dest="allow_storage", metavar="PREFIX",
                       help="a storage prefix models may come from (repeatable), e.g. s3://models/")
    serve.add_argument("--control-token-file", help="file holding the control API's bearer token "
                                                    "(or set RAYMS_CONTROL_TOKEN)")
    serve.add_argument("--model-control", choices=["api", "none"],
                       help="none: serve only what the repository, models file or TrainedModels declare")
    serve.set_defaults(func=_serve)

    models = commands.add_parser("models", help="list, load or unload models of a running server")
    models.add_argument("action", choices=["list", "load", "unload"])
    models.add_argument("name", nargs="?")
    models.add_argument("--storage-uri", help="artifact location (omit to load NAME from the server's repository)")
    models.add_argument("--framework", help=f"one of {', '.join(framework_table.NAMES)}")
    models.add_argument("--memory", help="declared memory, e.g. 256Mi")
    models.add_argument("--max-batch-size", type=int, help="let this model batch waiting requests, up to N rows")
    models.add_argument("--json", action="store_true", help="print raw JSON")
    models.add_argument("--url", default=DEFAULT_URL)
    models.add_argument("--token-file", help="file holding the control token (default: $RAYMS_CONTROL_TOKEN)")
    models.set_defaults(func=_models)

    predict = commands.add_parser("predict", help="send rows to a model of a running server")
    predict.add_argument("name")
    predict.add_argument("--data", required=True, help="JSON rows, e.g. '[[5.1, 3.5, 1.4, 0.2]]'")
    predict.add_argument("--protocol", choices=["v1", "v2"], default="v2")
    predict.add_argument("--url", default=DEFAULT_URL)
    predict.add_argument("--token-file", help="file holding the token (default: $RAYMS_CONTROL_TOKEN)")
    predict.set_defaults(func=_predict)

    score = commands.add_parser(
        "score", help="score a Parquet dataset with one model or a model per row, on Ray Data",
        description="Score the Parquet file or folder INPUT (a local path, or a file://, pvc://, s3://, gs:// or az:// "
                    "URI) and write the key columns and the predictions as Parquet into the folder OUTPUT.")
    score.add_argument("input")
    score.add_argument("output")
    score.add_argument("--model", action="append", metavar="NAME[=URI[:FRAMEWORK]]",
                       help="the model for every row (NAME from the sources below), or, with --model-column, a "
                            "model defined here (repeatable)")
    score.add_argument("--model-column", help="the column naming each row's model")
    score.add_argument("--key", action="append", required=True,
                       help="key column(s) copied to the output next to the predictions (repeatable or a,b)")
    score.add_argument("--features", action="append",
                       help="feature columns by name, in the model's order (default: every other column, in "
                            "the file's order; or one list column holding each row's features)")
    score.add_argument("--outputs", action="append",
                       help="model outputs to write, e.g. predict,predict_proba (default: what serving answers)")
    score.add_argument("--url", help="take the models a running rayms lists (its /v2/repository/index)")
    score.add_argument("--model-repository", help="take every sub-folder of this folder as a model")
    score.add_argument("--models", dest="models_file", help="take the models of a KServe models.json")
    score.add_argument("--overwrite", action="store_true", help="replace what OUTPUT holds")
    score.add_argument("--batch-size", type=int, default=131072,
                       help="rows per batch, block and output file (default 131072; see README, Batch scoring)")
    score.add_argument("--workers", type=int, help="most scoring workers, one CPU each (default: all CPUs)")
    score.add_argument("--max-models-per-worker", type=int, default=1000,
                       help="models one worker keeps loaded, least recently used evicted first (default 1000)")
    score.add_argument("--address", help="Ray cluster to run on (auto: the one running here; default: start one)")
    score.add_argument("--num-cpus", type=int, help="CPUs of the local Ray started without --address")
    score.add_argument("--cache-dir", help="per-node artifact cache folder (default: the one rayms serve uses)")
    score.set_defaults(func=_score)
    return root


def main(argv: list[str] | None = None) -> int:
    from rayms.redact import install_log_redaction

    install_log_redaction()
    args = parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
