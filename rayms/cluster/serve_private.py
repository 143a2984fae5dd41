"""The one place rayms touches Ray Serve internals.

Serve routes a handle call made with ``multiplexed_model_id`` to a replica that reported holding that
model. Serve's own reporter lives inside ``@serve.multiplexed``, whose LRU counts models, takes one lock
per replica and evicts before a load that may fail. rayms keeps its own memory-aware cache
(:mod:`rayms.model_cache`) and reports the resident set itself, through the same internal call the
multiplexing wrapper uses. ``tests/test_serve_private.py`` fails loudly if Ray changes it.
"""

from __future__ import annotations

import logging

from ray.serve._private.common import RequestRoutingInfo
from ray.serve.context import _get_global_client, _get_internal_replica_context

logger = logging.getLogger("rayms.replica")


def report_model_ids(model_ids: list[str]) -> None:
    """Tell Serve's routers that this replica holds (or is loading) ``model_ids``."""
    context = _get_internal_replica_context()
    if context is None:
        return
    try:
        _get_global_client().record_request_routing_info(
            RequestRoutingInfo(replica_id=context.replica_id, multiplexed_model_ids=sorted(model_ids))
        )
    except Exception as exc:  # routing falls back to any replica; serving still works
        logger.warning("could not report resident models to Serve: %s", exc)
