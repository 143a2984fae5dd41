"""The Serve config in deployments/ is one Serve accepts, and its import path builds the rayms app."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve.schema import ServeDeploySchema

from rayms.config import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_serve_config_matches_serve_schema_and_builds():
    config = yaml.safe_load((ROOT / "deployments" / "serve-config.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    from ray.serve.config import gRPCOptions

    grpc_options = gRPCOptions(**schema.grpc_options.model_dump())
    assert callable(grpc_options.grpc_servicer_func_callable[0])  # the gRPC service's import path resolves
    for app in schema.applications:
        module_name, _, attr = app.import_path.partition(":")
        builder = getattr(importlib.import_module(module_name), attr)
        Settings(**app.args)  # every arg is a real setting
        application = builder(app.args)
        assert type(application).__name__ == "Application"
