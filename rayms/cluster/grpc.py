"""The gRPC endpoint on Ray Serve: ``inference.GRPCInferenceService`` answered by rayms's ingress deployments.

Serve runs the gRPC server; rayms gives it the service (:data:`SERVICER_FUNCTION`, through
:func:`serve_grpc_options`) and the ingress deployment a method per RPC (:class:`GrpcIngress`), which Serve calls
with the decoded request. Under ``rayms serve`` (Serve's HAProxy mode) HAProxy listens on the gRPC port and hands
each call to a model replica's own gRPC server, which answers it in-process, as for HTTP; without HAProxy,
Serve's gRPC proxy forwards each call to an ingress replica.

Unlike HTTP, gRPC calls are not routed by model: the model's name is inside the message, and HAProxy balances
Serve's gRPC backends round-robin. Each replica serves any model, loading it the first time it is asked for it,
as HTTP does behind Serve's own proxy.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from rayms.config import Settings
from rayms.dataplane import DataPlane
from rayms.errors import RaymsError
from rayms.grpc_api import RPCS, InferenceService, grpc_status
from rayms.protos import inference_pb2 as pb

SERVICER_FUNCTION = "rayms.protos.inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server"


def serve_grpc_options(settings: Settings) -> Any | None:
    """Serve's ``gRPCOptions`` for ``settings.grpc_port`` (None when gRPC is off)."""
    if settings.grpc_port is None:
        return None
    from ray.serve.config import gRPCOptions

    return gRPCOptions(port=settings.grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION])


def _rpc(name: str):
    empty = getattr(pb, f"{name}Response")

    async def method(self, request: Any, grpc_context: Any) -> Any:
        try:
            return await self._grpc_service.call(name, request)
        except RaymsError as exc:
            code, message = grpc_status(exc)
            grpc_context.set_code(code)
            grpc_context.set_details(message)
            return empty()

    method.__name__ = method.__qualname__ = name
    method.__doc__ = f"The ``{name}`` RPC (Serve calls deployment methods by the RPC's name)."
    return method


class GrpcIngress:
    """Mixin for an ingress deployment holding ``_plane`` (its DataPlane) and ``_settings``: one method per RPC,
    each answering a failure with the status :func:`~rayms.grpc_api.grpc_status` gives."""

    _plane: DataPlane
    _settings: Settings

    @cached_property
    def _grpc_service(self) -> InferenceService:
        return InferenceService(self._plane, max_in_flight=self._settings.max_ongoing_requests,
                                max_request_bytes=self._settings.max_request_bytes)

    locals().update({name: _rpc(name) for name in RPCS})
