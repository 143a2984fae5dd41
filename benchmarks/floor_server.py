"""The floor: the least a Python server can do to answer V2 infer for many models, one process, no framework.

A dict of scikit-learn models behind FastAPI and uvicorn, nothing else: no registry, no replicas, no
validation beyond what a request needs to be answered. rayms is measured against it, so every figure in the
benchmark reads "how much does rayms add to the work that has to be done anyway".

    .venv/bin/python benchmarks/floor_server.py --port 9000 [--model-repository DIR]

``--model-repository`` loads every ``DIR/<name>/model.joblib`` before the port opens; without it the server
starts empty and ``POST /v2/repository/models/{name}/load`` with ``{"storageUri": "<folder or file>"}`` loads one.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import joblib
import numpy as np
import orjson
import uvicorn
from fastapi import FastAPI, Request, Response

DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT32": np.int32, "INT64": np.int64}
OUT_TYPES = {"i": "INT64", "u": "UINT64", "f": "FP64", "b": "BOOL"}


def reply(content: dict, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code=status, media_type="application/json")


def model_file(uri: str) -> Path:
    path = Path(uri)
    return path / "model.joblib" if path.is_dir() else path


def build(models: dict) -> FastAPI:
    api = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @api.get("/v2/health/ready")
    async def ready() -> Response:
        return reply({"ready": True})

    @api.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        model = models.get(name)
        if model is None:
            return reply({"error": f"model {name} not found"}, 404)
        try:
            body = orjson.loads(await request.body())
            tensor = body["inputs"][0]
            rows = np.asarray(tensor["data"], dtype=DTYPES[tensor["datatype"]]).reshape(tensor["shape"])
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            return reply({"error": f"bad request: {exc!r}"}, 400)
        predicted = model.predict(rows)
        output = {"name": "predict", "datatype": OUT_TYPES.get(predicted.dtype.kind, "FP64"),
                  "shape": list(predicted.shape), "data": predicted.tolist()}
        return reply({"model_name": name, "id": body.get("id", ""), "outputs": [output]})

    @api.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> Response:
        try:
            uri = orjson.loads(await request.body())["storageUri"]
            models[name] = joblib.load(model_file(uri))
        except (ValueError, KeyError, TypeError, OSError) as exc:
            return reply({"error": f"cannot load {name}: {exc!r}"}, 400)
        return reply({"name": name, "load": True})

    return api


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--model-repository", type=Path)
    args = parser.parse_args()
    models = {}
    if args.model_repository:
        for folder in sorted(p for p in args.model_repository.iterdir() if (p / "model.joblib").exists()):
            models[folder.name] = joblib.load(folder / "model.joblib")
    uvicorn.run(build(models), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
