"""Composition root: settings in, a Serve application out.

``build_app(...)`` validates the settings and returns the application that :mod:`rayms.cluster.deployments`
wires: the Registry (one replica, the source of truth), the model replicas (which are also the HTTP ingress by
default), and the TrainedModel bridge when ``kubernetes`` is on. It is usable with ``serve.run`` and from a
Serve config file (``import_path: rayms.app:app_builder``, whose ``args`` are :class:`~rayms.config.Settings`
fields).
"""

from __future__ import annotations

from typing import Any

from rayms.cluster.deployments import build_application
from rayms.config import Settings


def resolve_settings(settings: Settings | None = None, **overrides: Any) -> Settings:
    """``settings`` (default: from the environment) with ``overrides`` applied and validated like the rest:
    ``build_app(num_replicas=-3)`` is refused here, not inside a replica."""
    base = settings or Settings()
    if not overrides:
        return base
    return Settings(**(base.model_dump() | overrides))


def build_app(settings: Settings | None = None, **overrides: Any):
    """The rayms Serve application (a ``serve.Application``). ``overrides`` are Settings fields."""
    return build_application(resolve_settings(settings, **overrides))


def app_builder(args: dict[str, Any]):
    """Entry point for Serve config files: ``import_path: rayms.app:app_builder``."""
    return build_application(Settings(**(args or {})))
