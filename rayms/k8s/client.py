"""Connecting to the API server: in-cluster service account first, else a kubeconfig.

Kubeconfig resolution is the usual one: ``--kubeconfig``/``RAYMS_KUBECONFIG``, else ``$KUBECONFIG``, else
``~/.kube/config``; the namespace is ``--namespace``, else the in-cluster namespace, else the
kubeconfig context's, else ``default``.
"""

from __future__ import annotations

from pathlib import Path

from kubernetes import client, config

from rayms.config import Settings

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def connect(settings: Settings) -> tuple[client.ApiClient, str]:
    """An API client and the namespace to watch."""
    if not settings.kubeconfig and SERVICE_ACCOUNT_NAMESPACE.exists():
        config.load_incluster_config()
        namespace = settings.namespace or SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
        return client.ApiClient(), namespace
    configuration = client.Configuration()
    config.load_kube_config(config_file=settings.kubeconfig, client_configuration=configuration)
    namespace = settings.namespace
    if not namespace:
        _, active = config.list_kube_config_contexts(config_file=settings.kubeconfig)
        namespace = (active or {}).get("context", {}).get("namespace") or "default"
    return client.ApiClient(configuration), namespace
