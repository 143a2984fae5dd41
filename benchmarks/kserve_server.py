"""KServe's Python model server serving the benchmark's scikit-learn models; run with the KServe venv's python.

    benchmarks/.venvs/kserve/bin/python benchmarks/kserve_server.py --port 9000 --model-dir DIR [--preload]

Every ``DIR/<name>/model.joblib`` is a model called ``<name>``. With ``--preload`` all of them are loaded
before the port opens (as KServe's own predictors do at startup); without it the server starts empty and
``POST /v2/repository/models/{name}/load`` loads ``DIR/<name>/model.joblib`` through KServe's model
repository extension (the request body is ignored). Inference is the V2 protocol: the first input tensor
goes to the estimator's ``predict`` and comes back as the output ``predict``.

KServe's defaults are kept (one uvicorn worker, FastAPI app, Prometheus histograms per request) except:
HTTP binds 127.0.0.1 instead of 0.0.0.0, gRPC is off, and per-request log lines (uvicorn's access log,
KServe's latency and timing lines) are not written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

MODEL_FILE = "model.joblib"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-dir", type=Path, required=True, help="folder of <name>/model.joblib")
    parser.add_argument("--preload", action="store_true", help="load every model before serving")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    # kserve.model_server parses sys.argv when imported; keep our options out of its parser.
    sys.argv = sys.argv[:1]

    import joblib
    import kserve
    import kserve.model_server
    from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse
    from kserve.protocol.rest.server import RESTServer

    out_types = {"i": "INT64", "u": "UINT64", "f": "FP64", "b": "BOOL"}

    class JoblibModel(kserve.Model):
        """One scikit-learn estimator read with joblib."""

        def __init__(self, name: str, path: Path):
            super().__init__(name)
            self.path = path
            self.estimator = None

        def load(self) -> bool:
            self.estimator = joblib.load(self.path)
            self.ready = True
            return self.ready

        def predict(self, payload: InferRequest, headers=None, response_headers=None) -> InferResponse:
            rows = payload.inputs[0].as_numpy()
            predicted = self.estimator.predict(rows)
            output = InferOutput(name="predict", shape=list(predicted.shape),
                                 datatype=out_types.get(predicted.dtype.kind, "FP64"), data=predicted)
            return InferResponse(response_id=payload.id or "", model_name=self.name, infer_outputs=[output])

    class FolderRepository(kserve.ModelRepository):
        """KServe's model repository over ``<model_dir>/<name>/model.joblib``: what the load endpoint calls."""

        def model(self, name: str) -> JoblibModel:
            path = Path(self.models_dir) / name / MODEL_FILE
            if not path.is_file():
                raise FileNotFoundError(f"no {MODEL_FILE} for model {name} under {self.models_dir}")
            model = JoblibModel(name, path)
            model.load()
            return model

        def load(self, name: str) -> bool:
            self.update(self.model(name))
            return True

        def load_model(self, name: str) -> bool:
            return self.load(name)

    class LoopbackRESTServer(RESTServer):
        """KServe's REST server, bound to 127.0.0.1 (upstream hard-codes 0.0.0.0)."""

        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.config.host = "127.0.0.1"

    kserve.model_server.RESTServer = LoopbackRESTServer  # what ModelServer.start builds its HTTP server from

    repository = FolderRepository(models_dir=str(args.model_dir))
    models = []
    if args.preload:
        names = sorted(p.name for p in args.model_dir.iterdir() if (p / MODEL_FILE).is_file())
        models = [repository.model(name) for name in names]
    server = kserve.ModelServer(http_port=args.port, registered_models=repository, enable_grpc=False,
                                enable_latency_logging=False)
    # Logging is configured by now (ModelServer's constructor): drop the lines written per request.
    for name in ("uvicorn.access", "kserve.trace"):
        logging.getLogger(name).setLevel(logging.WARNING)
    server.start(models)


if __name__ == "__main__":
    main()
