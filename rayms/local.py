"""Running rayms on a Ray instance started here: the ``rayms serve`` command and notebooks.

Ray's defaults suit a cluster, not a laptop or a 2-core box: the dashboard alone is about half of Ray's
memory, workers are niced, and access logs cost CPU per request. ``start`` picks lean settings for a
local instance (each can be overridden with the usual ``RAY_*`` variables set before calling it).
"""

from __future__ import annotations

import os
from typing import Any

import ray
from ray import serve

from rayms.app import build_app
from rayms.config import Settings

LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_worker_niceness": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
}


def start(settings: Settings | None = None, *, num_cpus: int | None = None, **overrides: Any):
    """Start Ray (unless already connected) and Serve, deploy rayms, and return the app handle."""
    settings = (settings or Settings()).model_copy(update=overrides)
    for key, value in LOCAL_RAY_ENV.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(
            # "local" always starts a fresh instance here, never joins another Ray found on the machine.
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level="warning",
            log_to_driver=False,
            runtime_env={"env_vars": {k: os.environ[k] for k in LOCAL_RAY_ENV}},
        )
    serve.start(http_options={"host": settings.host, "port": settings.port})
    return serve.run(build_app(settings), name=settings.app_name, route_prefix="/")


def stop(settings: Settings | None = None, *, shutdown_ray: bool = True) -> None:
    """Delete the app, its node agents, then Serve and (optionally) Ray."""
    settings = settings or Settings()
    try:
        serve.delete(settings.app_name)
    except Exception:  # already gone
        pass
    kill_agents(settings.app_name)
    if shutdown_ray:
        serve.shutdown()
        ray.shutdown()


def kill_agents(app_name: str) -> None:
    """Node agents are detached actors (they outlive replica restarts); remove them with the app."""
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == "rayms" and entry["name"].startswith(f"{app_name}-agent-"):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace="rayms"))
            except ValueError:  # gone meanwhile
                pass
