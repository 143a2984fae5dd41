"""The Ray and Ray Serve environment rayms runs with: ``rayms serve`` and notebooks (``rayms.local``), the
KubeRay RayService (``kuberay/rayservice.yaml`` sets the HAProxy variables on its pods), rayms's deployments
(:mod:`rayms.cluster.deployments`) and the test suite.

Plain data, importable before Ray: Serve reads these variables when it is imported.
"""

from __future__ import annotations

import os

# Serve's own bundle of per-request savings: user code and the handle router on the replica's main event loop
# (no hand-off between threads per request), request logs buffered, gRPC between deployments. On this
# project's benchmark (benchmarks/README.md): c=1 p50 2.0x -> 1.5x the floor, CPU per request 2.1x -> 1.8x,
# repository loads 41 -> 29 ms each. Given to rayms's own deployments only (their runtime_env), never to the
# whole cluster: in a driver it would make handles usable only from inside an event loop, so a script's
# ``handle.infer.remote(...).result()`` would fail. A value set in the environment when the application is
# built wins (``RAY_SERVE_THROUGHPUT_OPTIMIZED=0`` turns it off).
SERVE_TUNING = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # ...but calls between deployments keep Ray's actor transport. With gRPC, one of four runs of the
    # replica-death test saw a request in flight to the killed replica hang until its client gave up (60 s);
    # with the actor transport none of the next eight did. The measured gains hold without it.
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "0",
}

LOCAL_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    # Ray nices its workers to 15; here the workers are the server.
    "RAY_worker_niceness": "0",
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0",
    # No idle worker processes kept warm for tasks rayms never runs (about 45 MB each).
    "RAY_enable_worker_prestart": "0",
    "RAY_prestart_worker_first_driver": "0",
}

# How requests reach replicas in HAProxy mode, here and on KubeRay (kuberay/rayservice.yaml sets the same).
HAPROXY_ROUTING = {
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_BALANCE_ALGORITHM": "uri depth 3",
    "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # one HAProxy thread forwards far more than a Python replica serves
    # Replay a request on another replica only when no byte of it reached a replica (the connection failed),
    # HAProxy's own safe default. Replaying after a replica took the request (empty-response, response-timeout)
    # sends a request that killed or hung one replica on to the next, and the next.
    "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure",
    "RAY_SERVE_HAPROXY_RETRIES": "3",
}


def deployment_env() -> dict[str, str]:
    """The environment variables of rayms's deployments: :data:`SERVE_TUNING`, unless set otherwise here."""
    return {key: os.environ.get(key, value) for key, value in SERVE_TUNING.items()}
