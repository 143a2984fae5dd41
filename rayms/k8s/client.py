"""Connecting to the API server: in-cluster service account first, else a kubeconfig; and a connection that
notices when the network path dies.

Kubeconfig resolution is the usual one: ``--kubeconfig``/``RAYMS_KUBECONFIG``, else ``$KUBECONFIG``, else
``~/.kube/config``; the namespace is ``--namespace``, else the in-cluster namespace, else the
kubeconfig context's, else ``default``.

Every connection of the client has TCP keepalive on, so a peer that vanished (node gone, NAT entry dropped)
is found by the kernel within about a minute even on a silent watch. A path that still answers TCP but
passes no data is caught by the read time limits the bridge puts on every call (see :func:`call_timeout`).
"""

from __future__ import annotations

import socket
from pathlib import Path

from kubernetes import client, config
from urllib3.connection import HTTPConnection

from rayms.config import Settings

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")

# Keepalive probes after 30 s of silence, every 10 s, 3 unanswered probes mark the connection dead.
KEEPALIVE_IDLE_S, KEEPALIVE_INTERVAL_S, KEEPALIVE_PROBES = 30, 10, 3
# Connections kept per host: the watch, the list, and the status writes in flight at once.
POOL_SIZE = 12


def keepalive_socket_options() -> list[tuple[int, int, int]]:
    """urllib3's default socket options plus TCP keepalive (the tuning options where the platform has them)."""
    options = [*HTTPConnection.default_socket_options, (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    for name, value in (("TCP_KEEPIDLE", KEEPALIVE_IDLE_S), ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_S),
                        ("TCP_KEEPCNT", KEEPALIVE_PROBES)):
        if hasattr(socket, name):
            options.append((socket.IPPROTO_TCP, getattr(socket, name), value))
    return options


def call_timeout(settings: Settings) -> tuple[float, float]:
    """``_request_timeout`` (connect, read) for one API call."""
    return settings.bridge_request_timeout_s, settings.bridge_request_timeout_s


def watch_timeout(settings: Settings) -> tuple[float, float]:
    """``_request_timeout`` for a watch: its read limit is the server-side ``timeoutSeconds`` plus a call's, so a
    quiet but healthy stream is never cut, and a dead one is given up a little after the server would have
    ended it."""
    connect, read = call_timeout(settings)
    return connect, settings.bridge_watch_timeout_s + read


def connect(settings: Settings) -> tuple[client.ApiClient, str]:
    """An API client (keepalive on every connection) and the namespace to watch."""
    configuration = client.Configuration()
    if not settings.kubeconfig and SERVICE_ACCOUNT_NAMESPACE.exists():
        config.load_incluster_config(client_configuration=configuration)
        namespace = settings.namespace or SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    else:
        config.load_kube_config(config_file=settings.kubeconfig, client_configuration=configuration)
        namespace = settings.namespace
        if not namespace:
            _, active = config.list_kube_config_contexts(config_file=settings.kubeconfig)
            namespace = (active or {}).get("context", {}).get("namespace") or "default"
    configuration.socket_options = keepalive_socket_options()
    configuration.connection_pool_maxsize = POOL_SIZE
    # One immediate retry covers a pooled connection the server had closed; every other retry is the
    # bridge's own, with backoff, so a dead path costs at most two read limits per call.
    configuration.retries = 1
    return client.ApiClient(configuration), namespace
