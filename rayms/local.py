"""Running rayms on a Ray instance started here: the ``rayms serve`` command and notebooks.

Ray's defaults suit a cluster, not a laptop or a 2-core box: the dashboard alone is about half of Ray's
memory, workers are niced, and access logs cost CPU per request. ``start`` picks lean settings for a
local instance (each can be overridden with the usual ``RAY_*`` variables set before calling it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray import serve

from rayms.app import build_app, resolve_settings
from rayms.cluster.agent import AGENT_NAMESPACE
from rayms.config import Settings
from rayms.cluster.grpc import serve_grpc_options
from rayms.ports import free_port
from rayms.ray_env import HAPROXY_ROUTING, LOCAL_RAY_ENV

HAPROXY_STATE_PREFIX = "rayms-haproxy-"


def haproxy_env(host: str = "127.0.0.1") -> dict[str, str]:
    """Ray Serve's HAProxy mode, hashing the first three URL segments (``/v2/models/<name>``).

    Each model then has a home replica, which answers its requests in-process (direct ingress: no Serve
    proxy, no Ray call per request). Its files and admin ports are private to this instance, so several
    instances can share a machine."""
    state = tempfile.mkdtemp(prefix=HAPROXY_STATE_PREFIX)
    return {
        **HAPROXY_ROUTING,
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
        # HAProxy logs every request; by default to UDP 127.0.0.1:514, i.e. into the machine's syslog if one
        # listens there. A socket path nobody binds keeps the access log off the machine's logs (set
        # RAY_SERVE_HAPROXY_LOG_TARGET before starting to send it somewhere).
        "RAY_SERVE_HAPROXY_LOG_TARGET": f"{state}/access-log.sock",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(host)),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(host)),
        # Serve keeps an idle proxy beside HAProxy for when no replica is up; by default it takes the fixed
        # ports 8500 and 9500, which a second instance on the machine (or anything else) may hold.
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port(host)),
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port(host)),
    }


def start(settings: Settings | None = None, *, num_cpus: int | None = None, **overrides: Any):
    """Start Ray (unless already connected) and Serve, deploy rayms, and return the app handle."""
    settings = resolve_settings(settings, **overrides)
    env = dict(LOCAL_RAY_ENV)
    if settings.haproxy and settings.ingress == "replica" and not ray.is_initialized():
        env |= haproxy_env(settings.host)
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(
            # "local" always starts a fresh instance here, never joins another Ray found on the machine.
            address="local",
            num_cpus=num_cpus or os.cpu_count(),
            include_dashboard=False,
            logging_level="warning",
            log_to_driver=False,
            runtime_env={"env_vars": {k: os.environ[k] for k in env}},
        )
    serve.start(http_options={"host": settings.host, "port": settings.port},
                grpc_options=serve_grpc_options(settings))
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
        state = os.environ.pop("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "")
        if os.path.basename(state).startswith(HAPROXY_STATE_PREFIX):
            stop_haproxy(state)
            shutil.rmtree(state, ignore_errors=True)  # HAProxy's config and sockets of this instance
            for key in [k for k in os.environ if k.startswith("RAY_SERVE_HAPROXY_") or k == "RAY_SERVE_ENABLE_HA_PROXY"]:
                del os.environ[key]


def haproxy_pids(state: str) -> list[int]:
    """HAProxy processes of one instance: their command line names its private folder (``-f <state>/...``)."""
    marker = (state.rstrip("/") + "/").encode()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if marker in Path(f"/proc/{entry}/cmdline").read_bytes():
                    pids.append(int(entry))
            except OSError:  # exited meanwhile
                pass
    return pids


def stop_haproxy(state: str, timeout_s: float = 10.0) -> list[int]:
    """Stop the HAProxy processes of this instance that outlived Ray, by pid; returns their pids.

    Serve's HAProxy manager reloads HAProxy by starting a new process; one started while Ray shuts down
    (replicas leaving trigger a reload) is left without its manager, still holding the port."""
    pids = haproxy_pids(state)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while (alive := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return pids


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def kill_agents(app_name: str) -> None:
    """Node agents are detached actors (they outlive replica restarts); remove them with the app."""
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry["namespace"] == AGENT_NAMESPACE and entry["name"].startswith(f"{app_name}-agent-"):
            try:
                ray.kill(ray.get_actor(entry["name"], namespace=AGENT_NAMESPACE))
            except ValueError:  # gone meanwhile
                pass
