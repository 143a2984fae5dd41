"""HTTP layer of the fake API server: routing, discovery, and watch streams.

One :class:`Handler` instance serves one TCP connection (HTTP/1.1 keep-alive)
in its own thread (``ThreadingHTTPServer``), so any number of long-lived
watch streams can be open at once.  The handler parses the URL, applies
injected failures, then calls :class:`~.store.Store`; ``ApiError`` becomes a
``Status`` response.  Watch responses are chunked, one JSON event per line,
ending with a clean terminating chunk (or an abrupt close if requested by
``drop_watches(abrupt=True)``).
"""

from __future__ import annotations

import json
import logging
import re
import select
import socket
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import yaml

from . import errors as E
from .schema import ResourceType
from .selectors import field_selector, label_selector
from .store import Event, meta, with_version

if TYPE_CHECKING:
    from .server import FakeApiServer

log = logging.getLogger("fake_apiserver")

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")
CLIENT_CHECK_INTERVAL = 0.2  # seconds between checks that an idle watcher is still connected
_REASONS = {400: "BadRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound",
            405: "MethodNotAllowed", 409: "Conflict", 410: "Expired", 415: "UnsupportedMediaType",
            422: "Invalid", 429: "TooManyRequests", 500: "InternalError",
            503: "ServiceUnavailable", 504: "Timeout"}


def parse_bool(value: str | None) -> bool:
    """Go's strconv.ParseBool truths, as the apiserver accepts them (the Python client
    sends ``watch=True``)."""
    return value in ("1", "t", "T", "true", "TRUE", "True")


def reason_for(code: int) -> str:
    return _REASONS.get(code, "Unknown")


def _version_priority(version: str) -> tuple:
    """Kubernetes version ordering: GA > beta > alpha, then higher numbers first."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (3, version)
    major, stage, minor = m.groups()
    rank = {None: 0, "beta": 1, "alpha": 2}[stage]
    return (rank, -int(major), -int(minor or 0))


@dataclass
class Route:
    rt: ResourceType
    version: str
    namespace: str | None  # None: cluster-scoped resource or cluster-wide list/watch
    name: str | None
    subresource: str | None
    verb: str


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rayms-fake-apiserver"

    @property
    def fake(self) -> "FakeApiServer":
        return self.server.fake  # type: ignore[attr-defined]

    # -------------------------------------------------------------- plumbing

    def setup(self) -> None:
        super().setup()
        # headers and body go out in separate writes: without this, Nagle + delayed ACK
        # add ~40 ms to every response
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fake._track_connection(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.fake._track_connection(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("%s " + format, self.address_string(), *args)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(data)
                data += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send_json(self, code: int, body: Any, headers: dict[str, str] | None = None,
                   warnings: list[str] | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        for warning in warnings or []:
            self.send_header("Warning", '299 - "%s"' % warning.replace('"', '\\"'))
        self.end_headers()
        self.wfile.write(data)

    # -------------------------------------------------------------- dispatch

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        code = 500
        self._streaming = False  # the handler object lives for the whole keep-alive connection
        self._pending_record: tuple | None = (method, url.path, query)
        try:
            raw = self._read_body()
            if self.fake._stopping:
                raise E.ApiError(503, "ServiceUnavailable", "the fake apiserver is shutting down")
            route = self._route(method, url.path, query)
            if route is None:
                code = 200
                return  # discovery, already answered
            self.fake._check_injection(route)  # raises ApiError for an injected failure
            code = self._serve(route, method, query, raw)
        except E.ApiError as exc:
            code = exc.code
            self._send_json(exc.code, exc.status(), headers=exc.headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the fake: make it loud but keep serving
            log.exception("fake apiserver: unhandled error for %s %s", method, self.path)
            self.fake._internal_errors.append(f"{method} {self.path}: {exc!r}")
            code = 500
            if getattr(self, "_streaming", False):  # a response is already under way
                self.close_connection = True
            else:
                self._send_json(500, E.failure_status(500, "InternalError",
                                                      f"fake apiserver bug: {exc!r}"))
        finally:
            if self._pending_record:  # nothing was sent (e.g. the client went away)
                self.fake._record(method, url.path, query, code)
                self._pending_record = None

    def send_response(self, code: int, message: str | None = None) -> None:
        # record the request *before* the client can see the response, so a test that
        # checks the request log right after a call never races the handler thread
        if getattr(self, "_pending_record", None):
            self.fake._record(*self._pending_record, code)
            self._pending_record = None
        super().send_response(code, message)

    def _route(self, method: str, path: str, query: dict) -> Route | None:
        parts = [p for p in path.split("/") if p]
        disco = self.fake._discovery
        if parts in (["version"], ["healthz"], ["livez"], ["readyz"]):
            if parts == ["version"]:
                self._send_json(200, disco.version())
            else:
                self._send_text(200, "ok")
            return None
        if parts[:1] == ["api"]:
            if len(parts) == 1:
                self._send_json(200, disco.core_versions(self.headers.get("Host", "")))
                return None
            if parts[1] != "v1":
                raise E.no_such_resource()
            group, version, rest = "", "v1", parts[2:]
        elif parts[:1] == ["apis"]:
            if len(parts) == 1:
                self._send_json(200, disco.group_list())
                return None
            if len(parts) == 2:
                self._send_json(200, disco.group(parts[1]))
                return None
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise E.no_such_resource()
        if not rest:
            self._send_json(200, disco.resource_list(group, version))
            return None
        namespace = None
        if rest[0] == "namespaces" and len(rest) >= 3 and rest[2] not in ("status", "finalize"):
            namespace, rest = rest[1], rest[2:]
        if len(rest) > 3:
            raise E.no_such_resource()
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        rt = self.fake.store.find_type(group, version, plural)
        if rt.namespaced and namespace is None:
            if name is not None:
                raise E.no_such_resource()
            if method != "GET":
                raise E.method_not_allowed()
        if not rt.namespaced and namespace is not None:
            raise E.no_such_resource()
        if sub is not None and (sub != "status" or not rt.has_status(version)):
            raise E.no_such_resource()
        if name is None:
            verb = {"GET": "watch" if parse_bool(query.get("watch")) else "list",
                    "POST": "create", "DELETE": "deletecollection"}.get(method)
        else:
            verb = {"GET": "get", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}.get(method)
        if verb is None:
            raise E.method_not_allowed()
        return Route(rt, version, namespace, name, sub, verb)

    def _send_text(self, code: int, text: str) -> None:
        data = text.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _parse_body(self, raw: bytes) -> Any:
        if not raw.strip():
            return None
        content_type = self.headers.get("Content-Type", "application/json").split(";")[0].strip()
        try:
            if content_type in ("application/yaml", "application/apply-patch+yaml"):
                return yaml.safe_load(raw)
            return json.loads(raw)
        except (ValueError, yaml.YAMLError) as exc:
            raise E.bad_request(f"couldn't decode the request body: {exc}")

    # -------------------------------------------------------------- verbs

    def _serve(self, route: Route, method: str, query: dict, raw: bytes) -> int:
        store, rt, version = self.fake.store, route.rt, route.version
        ns = route.namespace or ""
        dry_run = query.get("dryRun") == "All"
        validation = query.get("fieldValidation", "Warn")
        warnings: list[str] = []
        write_kw = dict(dry_run=dry_run, field_validation=validation, warnings=warnings)
        if route.verb in ("list", "watch", "deletecollection"):
            lsel = label_selector(query.get("labelSelector"))
            fsel = field_selector(query.get("fieldSelector"))

            def predicate(obj: dict) -> bool:
                return lsel(obj) and fsel(obj)
        if route.verb == "get":
            self._send_json(200, with_version(store.get(rt, ns, route.name), rt, version))
        elif route.verb == "list":
            limit = int(query["limit"]) if query.get("limit", "").isdigit() else None
            items, rv, cont, remaining = store.list(
                rt, route.namespace, predicate, limit=limit or None,
                continue_token=query.get("continue") or None,
                selectors_used=bool(query.get("labelSelector") or query.get("fieldSelector")))
            list_meta: dict[str, Any] = {"resourceVersion": rv}
            if cont:
                list_meta["continue"] = cont
            if remaining is not None:
                list_meta["remainingItemCount"] = remaining
            self._send_json(200, {"apiVersion": rt.api_version(version), "kind": rt.list_kind,
                                  "metadata": list_meta,
                                  "items": [with_version(i, rt, version) for i in items]})
        elif route.verb == "watch":
            self._serve_watch(route, query, predicate)
        elif route.verb == "create":
            obj = store.create(rt, version, ns, self._parse_body(raw), **write_kw)
            self._send_json(201, with_version(obj, rt, version), warnings=warnings)
            return 201
        elif route.verb == "update":
            obj = store.update(rt, version, ns, route.name, self._parse_body(raw),
                               subresource=route.subresource, **write_kw)
            self._send_json(200, with_version(obj, rt, version), warnings=warnings)
        elif route.verb == "patch":
            content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
            obj = store.patch(rt, version, ns, route.name, content_type, self._parse_body(raw),
                              subresource=route.subresource, **write_kw)
            self._send_json(200, with_version(obj, rt, version), warnings=warnings)
        elif route.verb in ("delete", "deletecollection"):
            options = self._parse_body(raw) or {}
            if not isinstance(options, dict):
                raise E.bad_request("DeleteOptions must be a JSON object")
            if "propagationPolicy" in query:
                options["propagationPolicy"] = query["propagationPolicy"]
            if "orphanDependents" in query:
                options["orphanDependents"] = parse_bool(query["orphanDependents"])
            if route.verb == "delete":
                result = store.delete(rt, ns, route.name, options, dry_run=dry_run)
                if result.get("kind") != "Status":
                    result = with_version(result, rt, version)
                self._send_json(200, result)
            else:
                items = store.delete_collection(rt, route.namespace, predicate, options,
                                                dry_run=dry_run)
                self._send_json(200, {"apiVersion": rt.api_version(version),
                                      "kind": rt.list_kind,
                                      "metadata": {"resourceVersion": str(store.rv)},
                                      "items": [with_version(i, rt, version) for i in items]})
        return 200

    # -------------------------------------------------------------- watch

    def _client_gone(self) -> bool:
        """True once the client closed its end (it sends nothing while watching)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _serve_watch(self, route: Route, query: dict, predicate) -> None:
        fake, store, rt, version = self.fake, self.fake.store, route.rt, route.version
        rv_param = query.get("resourceVersion") or ""
        if rv_param not in ("", "0") and not rv_param.isdigit():
            raise E.bad_request(f'resourceVersion: Invalid value: "{rv_param}": must be an integer')
        try:
            timeout = float(query["timeoutSeconds"]) if "timeoutSeconds" in query \
                else fake.default_watch_timeout
        except ValueError:
            raise E.bad_request("timeoutSeconds must be a number")
        bookmarks = parse_bool(query.get("allowWatchBookmarks"))
        send_initial = parse_bool(query.get("sendInitialEvents"))
        namespace = route.namespace

        def visible(obj: dict | None) -> bool:
            return obj is not None and (namespace is None or meta(obj).get("namespace") == namespace) \
                and predicate(obj)

        def translate(event: Event) -> tuple[str, dict] | None:
            now_in, before_in = visible(event.obj), visible(event.prev)
            if event.type == "ADDED":
                kind = "ADDED" if now_in else None
            elif event.type == "DELETED":
                kind = "DELETED" if before_in else None
            else:
                kind = ("MODIFIED" if before_in else "ADDED") if now_in else \
                    ("DELETED" if before_in else None)
            return (kind, event.obj) if kind else None

        def line(kind: str, obj: dict) -> bytes:
            return json.dumps({"type": kind, "object": with_version(obj, rt, version)},
                              separators=(",", ":")).encode() + b"\n"

        def bookmark(rv: int, initial_end: bool = False) -> bytes:
            md: dict[str, Any] = {"resourceVersion": str(rv)}
            if initial_end:
                md["annotations"] = {"k8s.io/initial-events-end": "true"}
            return json.dumps({"type": "BOOKMARK", "object": {
                "kind": rt.kind, "apiVersion": rt.api_version(version), "metadata": md}},
                separators=(",", ":")).encode() + b"\n"

        with store.cond:
            drop_generation = fake._drop_generation
            if rv_param in ("", "0") or send_initial:
                cursor = store.rv
                initial = [o for (ns, _), o in sorted(store.objects[rt.key].items())
                           if visible(o)]
            else:
                cursor, initial = int(rv_param), []
            fake._active_watches += 1
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self._streaming = True
        deadline = time.monotonic() + timeout
        next_bookmark = time.monotonic() + fake.bookmark_interval
        abrupt = False
        try:
            for obj in initial:
                self._write_chunk(line("ADDED", obj))
            if send_initial and bookmarks:
                self._write_chunk(bookmark(cursor, initial_end=True))
            while True:
                out: list[bytes] = []
                finished = False
                with store.cond:
                    while True:
                        now = time.monotonic()
                        if fake._stopping or fake._drop_generation != drop_generation:
                            abrupt = fake._drop_abrupt and not fake._stopping
                            finished = True
                            break
                        if now >= deadline or self._client_gone():
                            finished = True
                            break
                        try:
                            events, head = store.events_after(rt, cursor)
                        except E.ApiError as exc:  # compacted: ERROR event with a 410 Status
                            out.append(json.dumps({"type": "ERROR", "object": exc.status()},
                                                  separators=(",", ":")).encode() + b"\n")
                            finished = True
                            break
                        cursor = max(cursor, head)
                        out.extend(line(*t) for t in map(translate, events) if t)
                        if bookmarks and now >= next_bookmark:
                            out.append(bookmark(cursor))
                            next_bookmark = now + fake.bookmark_interval
                        if out:
                            break
                        wake = min(deadline, next_bookmark if bookmarks else deadline,
                                   now + CLIENT_CHECK_INTERVAL)
                        store.cond.wait(timeout=max(0.0, wake - now))
                for data in out:
                    self._write_chunk(data)
                if finished:
                    break
            if abrupt:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
            else:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        finally:
            with store.cond:
                fake._active_watches -= 1
                store.cond.notify_all()


class Discovery:
    """Discovery documents built from the store's resource types."""

    def __init__(self, fake: "FakeApiServer", kube_minor: str = "30"):
        self.fake = fake
        self.kube_minor = kube_minor

    def version(self) -> dict:
        return {"major": "1", "minor": self.kube_minor,
                "gitVersion": f"v1.{self.kube_minor}.0-rayms-fake", "gitCommit": "fake",
                "gitTreeState": "clean", "buildDate": "2024-01-01T00:00:00Z",
                "goVersion": "go1.22.0", "compiler": "gc", "platform": "linux/amd64"}

    def core_versions(self, host: str) -> dict:
        return {"kind": "APIVersions", "versions": ["v1"],
                "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = {}
        with self.fake.store.cond:
            for (group, _), rt in self.fake.store.types.items():
                if group:
                    groups.setdefault(group, set()).update(rt.versions)
        return {g: sorted(vs, key=_version_priority) for g, vs in sorted(groups.items())}

    def _group_doc(self, group: str, versions: list[str]) -> dict:
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}

    def group_list(self) -> dict:
        return {"kind": "APIGroupList", "apiVersion": "v1",
                "groups": [self._group_doc(g, vs) for g, vs in self._groups().items()]}

    def group(self, group: str) -> dict:
        versions = self._groups().get(group)
        if not versions:
            raise E.no_such_resource()
        return {"kind": "APIGroup", "apiVersion": "v1", **self._group_doc(group, versions)}

    def resource_list(self, group: str, version: str) -> dict:
        resources = []
        with self.fake.store.cond:
            types = [rt for (g, _), rt in sorted(self.fake.store.types.items())
                     if g == group and version in rt.versions]
        if not types:
            raise E.no_such_resource()
        for rt in types:
            entry: dict[str, Any] = {"name": rt.plural, "singularName": rt.singular,
                                     "namespaced": rt.namespaced, "kind": rt.kind,
                                     "verbs": VERBS}
            if rt.short_names:
                entry["shortNames"] = rt.short_names
            if rt.categories:
                entry["categories"] = rt.categories
            resources.append(entry)
            if rt.has_status(version):
                resources.append({"name": f"{rt.plural}/status", "singularName": "",
                                  "namespaced": rt.namespaced, "kind": rt.kind,
                                  "verbs": ["get", "patch", "update"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version,
                "resources": resources}
