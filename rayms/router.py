"""The HTTP layer: KServe V1 and the Open Inference Protocol V2 as an ASGI application.

Routes only translate HTTP to :class:`~rayms.dataplane.DataPlane` calls and back; each protocol's route
table is one function. Every error leaves as ``{"error": "..."}`` with the status its
:class:`~rayms.errors.RaymsError` carries; FastAPI's own ``{"detail": ...}`` bodies never do. Which process
serves this application (a model replica, or the two-hop router) is decided in :mod:`rayms.cluster`; nothing
here knows about Ray.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from rayms.codecs import (
    InferRequest, InferResult, Tensor, decode_v1_request, decode_v2_request, encode_v1_response, encode_v2_response,
)
from rayms.access import CHANGE, CONTROL, AccessPolicy, route_kind
from rayms.config import Settings
from rayms.dataplane import DataPlane, naming_model
from rayms.errors import InvalidInput, Overloaded, PayloadTooLarge, RaymsError, RequestTimeout
from rayms.redact import redact
from rayms.protocol import RepositoryIndexItem, replica_entry

logger = logging.getLogger("rayms.router")

JSON = "application/json"


# ------------------------------------------------------------------------------------------ errors
def as_rayms_error(exc: BaseException) -> RaymsError:
    """The error the client should see for anything raised while answering (remote errors arrive as
    :class:`~rayms.errors.RaymsError` already: :mod:`rayms.cluster` unwraps them)."""
    if isinstance(exc, RaymsError):
        return exc
    if isinstance(exc, RequestValidationError):
        return InvalidInput("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))
    return RaymsError(f"internal error: {exc.__class__.__name__}: {exc}")


def error_response(exc: BaseException, request: Request | None = None) -> Response:
    if isinstance(exc, StarletteHTTPException):
        message = str(exc.detail)
        if request is not None and exc.status_code in (404, 405):  # no route: say which one was asked for
            message = f"{message}: {request.method} {request.url.path}"
        return Response(orjson.dumps({"error": message}), status_code=exc.status_code, media_type=JSON)
    error = as_rayms_error(exc)
    if error.status_code >= 500 and not isinstance(error, Overloaded):
        logger.error("request failed: %s", error, exc_info=exc)
    headers = {"retry-after": "1"} if error.status_code == 503 else None
    if error.status_code == 401:
        headers = {"www-authenticate": 'Bearer realm="rayms"'}
    return Response(orjson.dumps({"error": redact(str(error))}), status_code=error.status_code, media_type=JSON,
                    headers=headers)


class Limits:
    """The bounds on reading request bodies, shared by every request of one replica: the largest body (JSON
    bodies smaller, bodies with binary tensors up to ``max_request_bytes``), the time a client has to send it,
    and the bytes the replica holds across all bodies being read at once."""

    def __init__(self, settings: Settings) -> None:
        self.max_bytes = settings.max_request_bytes
        self.max_json_bytes = min(settings.max_json_bytes, settings.max_request_bytes)
        self.timeout_s = settings.body_timeout_s
        self.max_buffered = settings.max_buffered_bytes
        self.buffered = 0

    async def read(self, scope: dict, receive: Any, limit: int | None = None) -> bytes:
        """The request body straight from ASGI, refusing more than ``limit`` bytes without reading it all;
        raises Starlette's ``ClientDisconnect`` when the client goes away first."""
        limit = self.max_json_bytes if limit is None else limit
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > limit:
                raise PayloadTooLarge(f"request body of {value.decode()} bytes exceeds the limit of {limit} bytes")
        held = 0
        try:
            async with asyncio.timeout(self.timeout_s):
                chunks, size = [], 0
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientDisconnect()
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                    if self.buffered + len(chunk) > self.max_buffered:
                        raise Overloaded(f"this replica holds {self.max_buffered} bytes of request bodies "
                                         "already; retry shortly")
                    self.buffered += len(chunk)
                    held += len(chunk)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        except TimeoutError:
            raise RequestTimeout(f"the request body did not arrive within {self.timeout_s:g}s") from None
        finally:
            self.buffered -= held


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status_code,
                    media_type=JSON)


def _parse_json_object(body: bytes, what: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidInput(f"{what}: body is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidInput(f"{what}: body must be a JSON object")
    return value


# ------------------------------------------------------------------------------------------ route tables
def add_v1_routes(api: FastAPI, plane: DataPlane, limits: Limits) -> None:
    """KServe V1: list, readiness, ``:predict``."""

    @api.get("/")
    async def root() -> Response:
        return _json({"status": "alive"})

    @api.get("/v1/models")
    async def v1_models() -> Response:
        return _json({"models": plane.list_models()})

    @api.get("/v1/models/{name}")
    async def v1_model_ready(name: str) -> Response:
        ready = plane.model_ready(name)
        if not ready:
            state = plane.status(name).state.value
            return _json({"name": name, "ready": False,
                          "error": f"Model {name} is not ready (state {state})"}, status_code=503)
        return _json({"name": name, "ready": True})

    @api.post("/v1/models/{name}:predict")
    async def v1_predict(name: str, request: Request) -> Response:
        """Served by :class:`GuardMiddleware` before routing; declared here for the OpenAPI schema."""
        body, headers = await serve_inference(plane, ("v1", name, None), request.scope, request.receive, limits)
        return Response(body, headers=headers)


def add_v2_routes(api: FastAPI, plane: DataPlane, limits: Limits) -> None:
    """Open Inference Protocol V2: health, metadata, readiness, inference (JSON and binary tensors)."""

    @api.get("/v2/health/live")
    async def live() -> Response:
        return _json({"live": plane.live()})

    @api.get("/v2/health/ready")
    async def ready() -> Response:
        if plane.ready():
            return _json({"ready": True})
        return _json({"ready": False, "error": "model registry not reachable yet"}, status_code=503)

    @api.get("/v2")
    @api.get("/v2/")
    async def server_metadata() -> Response:
        return _json(plane.server_metadata().model_dump())

    @api.get("/v2/models")
    async def models() -> Response:
        return _json({"models": plane.list_models()})

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{model_version}")
    async def model_metadata(name: str, model_version: str | None = None) -> Response:
        return _json((await plane.model_metadata(name, model_version)).model_dump())

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{model_version}/ready")
    async def model_ready(name: str, model_version: str | None = None) -> Response:
        if plane.model_ready(name, model_version):
            return _json({"name": name, "ready": True})
        state = plane.status(name, model_version).state.value
        return _json({"name": name, "ready": False, "error": f"Model {name} is not ready (state {state})"},
                     status_code=503)

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{model_version}/infer")
    async def infer(name: str, request: Request, model_version: str | None = None) -> Response:
        """Served by :class:`GuardMiddleware` before routing; declared here for the OpenAPI schema."""
        route = ("v2", name, model_version)
        body, headers = await serve_inference(plane, route, request.scope, request.receive, limits)
        return Response(body, headers=headers)


# ------------------------------------------------------------------------------------------ inference
Route = tuple[str, str, str | None]  # protocol ("v1" or "v2"), model name, model version


def inference_route(scope: dict) -> Route | None:
    """``POST /v2/models/{name}[/versions/{v}]/infer`` and ``POST /v1/models/{name}:predict``, else None."""
    if scope["method"] != "POST":
        return None
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    parts = path.split("/")
    if len(parts) == 5 and parts[4] == "infer" and parts[1] == "v2" and parts[2] == "models" and parts[3]:
        return "v2", parts[3], None
    if (len(parts) == 7 and parts[6] == "infer" and parts[1] == "v2" and parts[2] == "models"
            and parts[4] == "versions" and parts[3] and parts[5]):
        return "v2", parts[3], parts[5]
    if len(parts) == 4 and parts[1] == "v1" and parts[2] == "models" and parts[3].endswith(":predict"):
        name = parts[3][: -len(":predict")]
        return ("v1", name, None) if name else None
    return None


async def serve_inference(plane: DataPlane, route: Route, scope: dict, receive: Any,
                          limits: Limits) -> tuple[bytes, dict[str, str]]:
    """Answer one inference request: the response body and its headers."""
    protocol, name, model_version = route
    plane.status(name, model_version)  # an unknown model or version is 404 whatever the body holds
    header_length = next((v for k, v in scope["headers"] if k == b"inference-header-content-length"), None)
    # JSON bodies cost several times their size once decoded; binary tensors may be larger.
    raw = await limits.read(scope, receive, limits.max_bytes if header_length is not None else None)
    if protocol == "v1":
        with naming_model(name):
            tensor = Tensor.from_numpy("input-0", decode_v1_request(raw))
        _, result = await plane.infer(name, InferRequest(id=None, inputs=[tensor]))
        with naming_model(name):
            return encode_v1_response(_first_output(result)), {"content-type": JSON}
    with naming_model(name):
        try:
            header_length_int = int(header_length) if header_length is not None else None
        except ValueError as exc:
            raise InvalidInput(f"Inference-Header-Content-Length {header_length.decode(errors='replace')!r} "
                               "is not an integer") from exc
        infer_request = decode_v2_request(raw, header_length_int)
    answered, result = await plane.infer(name, infer_request, model_version)
    with naming_model(name):
        return encode_v2_response(model_name=name, model_version=answered, request=infer_request, result=result)


def add_repository_routes(api: FastAPI, plane: DataPlane, limits: Limits) -> None:
    """The V2 model repository extension, plus a view of what each replica holds."""

    @api.post("/v2/repository/index")
    @api.get("/v2/repository/index")
    async def index(request: Request) -> Response:
        body = _parse_json_object(await limits.read(request.scope, request.receive), "repository index")
        statuses = plane.repository_index(ready_only=bool(body.get("ready", False)))
        return _json([RepositoryIndexItem.from_status(status).model_dump() for status in statuses])

    @api.post("/v2/repository/models/{name}/load")
    async def load(name: str, request: Request) -> Response:
        body = _parse_json_object(await limits.read(request.scope, request.receive), f"load {name}")
        force = body.pop("force", False) is True
        status = await plane.load(name, body or None, force=force)
        return _json({"name": name, "load": True, "state": status.state.value, "version": str(status.version)})

    @api.post("/v2/repository/models/{name}/unload")
    async def unload(name: str, request: Request) -> Response:
        body = _parse_json_object(await limits.read(request.scope, request.receive), f"unload {name}")
        force = body.get("force") is True or (body.get("parameters") or {}).get("force") is True
        await plane.unload(name, force=force)
        return _json({"name": name, "unload": True})

    @api.get("/v2/repository/replicas")
    async def replicas() -> Response:
        return _json([replica_entry(report) for report in await plane.replicas()])


class GuardMiddleware:
    """Plain ASGI in front of FastAPI. Every request is checked against the access rule first
    (:mod:`rayms.access`). Inference requests are then answered here, without FastAPI's routing, validation
    and response objects (a quarter of a replica's CPU per request when they went through it); beyond
    ``max_in_flight`` of them get 503 with Retry-After at once. Control requests have a limit of their own
    (``max_control_in_flight``), so a load that waits for READY never counts against inference, nor
    inference against the registry's own calls. Errors raised anywhere become ``{"error"}`` responses."""

    def __init__(self, app: Any, plane: DataPlane, settings: Settings, limits: Limits) -> None:
        self.app = app
        self.plane = plane
        self.access = AccessPolicy(settings)
        self.limits = limits
        self.max_in_flight = settings.max_ongoing_requests
        self.max_control = settings.max_control_in_flight
        self.in_flight = 0
        self.control_in_flight = 0

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        kind = route_kind(scope["method"], _path(scope))
        authorization = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        refusal = self.access.refuse(kind, authorization)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        route = inference_route(scope)
        if route is None:
            if kind in (CONTROL, CHANGE):
                await self._control(scope, receive, send)
            else:
                await self._pass_on(scope, receive, send)
            return
        if self.in_flight >= self.max_in_flight:
            await error_response(Overloaded(
                f"this replica is at its limit of {self.max_in_flight} inference requests in flight; retry shortly"
            ))(scope, receive, send)
            return
        self.in_flight += 1
        try:
            body, headers = await serve_inference(self.plane, route, scope, receive, self.limits)
        except ClientDisconnect:
            return
        except Exception as exc:
            await error_response(exc)(scope, receive, send)
            return
        finally:
            self.in_flight -= 1
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-length", str(len(body)).encode()),
            *((key.encode(), value.encode()) for key, value in headers.items())]})
        await send({"type": "http.response.body", "body": body})

    async def _control(self, scope: dict, receive: Any, send: Any) -> None:
        if self.control_in_flight >= self.max_control:
            await error_response(Overloaded(
                f"this replica is at its limit of {self.max_control} control requests in flight; retry shortly"
            ))(scope, receive, send)
            return
        self.control_in_flight += 1
        try:
            await self._pass_on(scope, receive, send)
        finally:
            self.control_in_flight -= 1

    async def _pass_on(self, scope: dict, receive: Any, send: Any) -> None:
        started = False

        async def tracked(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                raise
            await error_response(exc)(scope, receive, send)


def _path(scope: dict) -> str:
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def build_api(plane: DataPlane, settings: Settings) -> FastAPI:
    api = FastAPI(title="rayms", version=plane.server_metadata().version, docs_url="/docs", redoc_url=None)
    api.add_exception_handler(Exception, lambda _request, exc: error_response(exc))
    api.add_exception_handler(StarletteHTTPException, lambda request, exc: error_response(exc, request))
    api.add_exception_handler(RequestValidationError, lambda _request, exc: error_response(exc))
    limits = Limits(settings)
    add_v1_routes(api, plane, limits)
    add_v2_routes(api, plane, limits)
    add_repository_routes(api, plane, limits)
    api.add_middleware(GuardMiddleware, plane=plane, settings=settings, limits=limits)
    return api


def _first_output(result: InferResult) -> np.ndarray:
    for tensor in result.outputs:
        if tensor.name == "predict":
            return tensor.data
    return result.outputs[0].data
