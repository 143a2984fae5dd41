"""``FakeApiServer``: lifecycle, test hooks and in-process accessors.

Typical use in a test::

    with FakeApiServer() as srv:                  # TrainedModel + RayService CRDs
        api = kubernetes.client.CustomObjectsApi(srv.api_client())
        api.create_namespaced_custom_object("serving.rayms.io", "v1alpha1", "default",
                                            "trainedmodels", body)
        srv.wait_for(lambda: srv.get_object("trainedmodels", "iris"))

See the package docstring for what is and is not implemented.
"""

from __future__ import annotations

import copy
import functools
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import yaml

from . import errors as E
from .handler import WRITE_METHODS, Discovery, Handler, Route, reason_for
from .store import CRD_KEY, Event, Store, meta

REPO_ROOT = Path(__file__).resolve().parents[2]
TRAINEDMODEL_CRD = REPO_ROOT / "kuberay" / "trainedmodel-crd.yaml"
RAYSERVICE_CRD_REFERENCE = Path(os.environ.get(
    "RAYMS_RAYSERVICE_CRD", "/work/shared/reference/kuberay-rayservice-crd.yaml"))

#: Used when the real KubeRay RayService CRD file is not available: enough to
#: create, watch and set the status of RayServices, with no spec validation.
BUILTIN_RAYSERVICE_CRD: dict[str, Any] = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "rayservices.ray.io"},
    "spec": {
        "group": "ray.io",
        "names": {"kind": "RayService", "listKind": "RayServiceList", "plural": "rayservices",
                  "singular": "rayservice", "categories": ["all"]},
        "scope": "Namespaced",
        "versions": [{
            "name": "v1", "served": True, "storage": True, "subresources": {"status": {}},
            "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                "apiVersion": {"type": "string"}, "kind": {"type": "string"},
                "metadata": {"type": "object"},
                "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            }}},
        }],
    },
}

T = TypeVar("T")


@functools.lru_cache(maxsize=16)
def _load_yaml_docs(path: str, mtime_ns: int) -> tuple[dict, ...]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: the RayService CRD is 1 MB
    with open(path, encoding="utf-8") as fh:
        return tuple(d for d in yaml.load_all(fh, Loader=loader) if isinstance(d, dict))


def load_crds(path: str | os.PathLike) -> list[dict]:
    """The ``CustomResourceDefinition`` documents of a YAML file (cached, deep-copied)."""
    path = os.fspath(path)
    docs = _load_yaml_docs(path, os.stat(path).st_mtime_ns)
    return [copy.deepcopy(d) for d in docs if d.get("kind") == "CustomResourceDefinition"]


def default_crd_paths() -> list[Path]:
    """The repo's TrainedModel CRD, plus KubeRay's RayService CRD if it is on this machine."""
    paths = [TRAINEDMODEL_CRD]
    if RAYSERVICE_CRD_REFERENCE.is_file():
        paths.append(RAYSERVICE_CRD_REFERENCE)
    return paths


@dataclass
class Injection:
    """An injected failure; fields left as ``None`` match anything."""

    verb: str | None
    plural: str | None
    status: int
    times: int | None  # None: forever
    name: str | None = None
    namespace: str | None = None
    subresource: str | None = None
    reason: str | None = None
    message: str | None = None
    retry_after: int | None = None
    hits: int = 0

    def matches(self, route: Route) -> bool:
        return ((self.times is None or self.hits < self.times)
                and self.verb in (None, route.verb)
                and self.plural in (None, route.rt.plural)
                and self.name in (None, route.name)
                and self.namespace in (None, route.namespace)
                and self.subresource in (None, route.subresource))


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: dict = field(hash=False)
    status: int
    at: float = field(default=0.0, compare=False)  # time.monotonic() when the response was sent


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64


class FakeApiServer:
    """An in-process Kubernetes API server good enough for controller tests.

    Parameters:
        crd_paths: CRD YAML files to serve; ``None`` means :func:`default_crd_paths`.
        crds: extra CRD objects (dicts).
        builtin_rayservice: register :data:`BUILTIN_RAYSERVICE_CRD` if no loaded
            CRD defines ``rayservices.ray.io``.
        bookmark_interval: seconds between BOOKMARK events on watches that asked for them.
        gc_delay: seconds an owner must be gone before its dependents are collected.
        gc_interval: how often the garbage collector sweeps.
        max_events: size of the event history kept for watch resume.
        default_watch_timeout: watch duration when the client sends no ``timeoutSeconds``.
    """

    def __init__(self, crd_paths: Iterable[str | os.PathLike] | None = None, *,
                 crds: Iterable[dict] = (), builtin_rayservice: bool = True,
                 host: str = "127.0.0.1", port: int = 0, bookmark_interval: float = 1.0,
                 gc_delay: float = 0.2, gc_interval: float = 0.05, max_events: int = 10000,
                 default_watch_timeout: float = 1800.0):
        self.host, self._port = host, port
        self.bookmark_interval = bookmark_interval
        self.gc_interval = gc_interval
        self.default_watch_timeout = default_watch_timeout
        self.store = Store(max_events=max_events, gc_delay=gc_delay)
        self._discovery = Discovery(self)
        self._lock = threading.Lock()  # requests log, injections, connections
        self._requests: list[RequestRecord] = []
        self._injections: list[Injection] = []
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._stopping = False
        self._drop_generation = 0
        self._drop_abrupt = False
        self._active_watches = 0
        self._internal_errors: list[str] = []
        self._httpd: _HTTPServer | None = None
        self._threads: list[threading.Thread] = []
        paths = default_crd_paths() if crd_paths is None else list(crd_paths)
        for path in paths:
            for crd in load_crds(path):
                self.register_crd(crd)
        for crd in crds:
            self.register_crd(crd)
        if builtin_rayservice and ("ray.io", "rayservices") not in self.store.types:
            self.register_crd(copy.deepcopy(BUILTIN_RAYSERVICE_CRD))
        self.store.compact()  # the history starts now: resourceVersion=1 gets 410, as on a cluster

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> str:
        """Bind, start serving and garbage collecting; returns the base URL."""
        if self._httpd is not None:
            return self.url
        self._httpd = _HTTPServer((self.host, self._port), Handler)
        self._httpd.fake = self  # type: ignore[attr-defined]
        self._port = self._httpd.server_address[1]
        self._threads = [
            threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                             name=f"fake-apiserver-{self._port}", daemon=True),
            threading.Thread(target=self._gc_loop, name=f"fake-apiserver-gc-{self._port}",
                             daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """End all watches, close all connections and join the server's threads."""
        if self._httpd is None:
            return
        with self.store.cond:
            self._stopping = True
            self.store.cond.notify_all()
        self._httpd.shutdown()
        self.store.wait_for(lambda: self._active_watches == 0, timeout)
        with self._lock:
            connections = dict(self._connections)
        for conn in connections:  # idle keep-alive connections
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._httpd.server_close()
        for thread in self._threads + list(connections.values()):
            thread.join(timeout)
        self._httpd, self._threads = None, []

    def __enter__(self) -> "FakeApiServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def client_configuration(self):
        """A fresh ``kubernetes.client.Configuration`` pointing at this server."""
        from kubernetes import client
        config = client.Configuration(host=self.url)
        config.verify_ssl = False
        return config

    def api_client(self):
        from kubernetes import client
        return client.ApiClient(self.client_configuration())

    def write_kubeconfig(self, path: str | os.PathLike) -> Path:
        """A kubeconfig for kubectl (``kubectl --kubeconfig=<path> --validate=false``)."""
        doc = {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
               "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
               "users": [{"name": "fake", "user": {}}],
               "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake",
                                                         "namespace": "default"}}]}
        Path(path).write_text(yaml.safe_dump(doc))
        return Path(path)

    def _gc_loop(self) -> None:
        while not self._stopping:
            self.store.gc_pass()
            with self.store.cond:
                if not self._stopping:
                    self.store.cond.wait(self.gc_interval)

    def _track_connection(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._connections[conn] = threading.current_thread()
            else:
                self._connections.pop(conn, None)

    # ------------------------------------------------------------------ test hooks

    def compact(self) -> int:
        """Forget the event history: watches from any older resourceVersion get 410.
        Returns the new floor (the current resourceVersion)."""
        return self.store.compact()

    def drop_watches(self, *, abrupt: bool = False, timeout: float = 5.0) -> int:
        """End every open watch stream, as an apiserver restart would; returns how many.

        By default a stream ends cleanly (the client may re-watch from its last
        resourceVersion); ``abrupt=True`` resets the connection mid-stream."""
        with self.store.cond:
            dropped = self._active_watches
            self._drop_abrupt = abrupt
            self._drop_generation += 1
            self.store.cond.notify_all()
        self.store.wait_for(lambda: self._active_watches == 0, timeout)
        return dropped

    @property
    def internal_errors(self) -> list[str]:
        """Unexpected exceptions inside the fake (answered with 500); should stay empty."""
        return list(self._internal_errors)

    @property
    def active_watches(self) -> int:
        """Watch streams open right now."""
        with self.store.cond:
            return self._active_watches

    def inject_failure(self, verb: str | None = None, plural: str | None = None, *,
                       status: int = 500, times: int | None = 1, name: str | None = None,
                       namespace: str | None = None, subresource: str | None = None,
                       reason: str | None = None, message: str | None = None,
                       retry_after: int | None = None) -> Injection:
        """Answer the next ``times`` matching requests with ``status`` (a Status body).

        ``verb`` is a Kubernetes verb: get, list, watch, create, update, patch,
        delete, deletecollection.  ``retry_after`` adds a Retry-After header
        (use with 429).  Returns the :class:`Injection`; its ``hits`` counts uses."""
        injection = Injection(verb, plural, status, times, name, namespace, subresource,
                              reason, message, retry_after)
        with self._lock:
            self._injections.append(injection)
        return injection

    def clear_failures(self) -> None:
        with self._lock:
            self._injections.clear()

    def _check_injection(self, route: Route) -> None:
        with self._lock:
            for inj in self._injections:
                if inj.matches(route):
                    inj.hits += 1
                    headers = {"Retry-After": str(inj.retry_after)} if inj.retry_after else None
                    raise E.ApiError(inj.status, inj.reason or reason_for(inj.status),
                                     inj.message or f"injected failure ({route.verb} "
                                                    f"{route.rt.plural})", {}, headers)

    # ------------------------------------------------------------------ request log

    def _record(self, method: str, path: str, query: dict, status: int) -> None:
        with self._lock:
            self._requests.append(RequestRecord(method, path, query, status, time.monotonic()))

    @property
    def requests(self) -> list[RequestRecord]:
        """Every HTTP request received (method, path, query, response code, monotonic time of the answer)."""
        with self._lock:
            return list(self._requests)

    @property
    def write_count(self) -> int:
        """How many POST/PUT/PATCH/DELETE requests were received (including failed ones)."""
        with self._lock:
            return sum(1 for r in self._requests if r.method in WRITE_METHODS)

    def reset_request_log(self) -> None:
        with self._lock:
            self._requests.clear()

    # ------------------------------------------------------------------ in-process access

    @property
    def resource_version(self) -> int:
        """The current global resourceVersion."""
        with self.store.cond:
            return self.store.rv

    def get_object(self, plural: str, name: str, namespace: str = "default",
                   group: str | None = None) -> dict | None:
        """A deep copy of the stored object, or None.  ``plural`` may be ``plural.group``."""
        rt = self.store.type_by_plural(plural, group)
        with self.store.cond:
            obj = self.store.objects[rt.key].get((namespace if rt.namespaced else "", name))
            return copy.deepcopy(obj)

    def objects(self, plural: str, namespace: str | None = None,
                group: str | None = None) -> list[dict]:
        """Deep copies of the stored objects of a resource, sorted by namespace/name."""
        rt = self.store.type_by_plural(plural, group)
        with self.store.cond:
            return [copy.deepcopy(o) for k, o in sorted(self.store.objects[rt.key].items())
                    if namespace is None or k[0] == namespace]

    def events(self, plural: str | None = None, since: int = 0) -> list[Event]:
        """The retained event history (after the last compaction), oldest first."""
        key = self.store.type_by_plural(plural).key if plural else None
        with self.store.cond:
            return [e for e in self.store.log if e.rv > since and (key is None or e.key == key)]

    def register_crd(self, crd: dict | str | os.PathLike) -> dict:
        """Create a CRD (a dict, or every CRD in a YAML file) as if POSTed."""
        if not isinstance(crd, dict):
            created = [self.register_crd(c) for c in load_crds(crd)]
            return created[-1]
        return copy.deepcopy(self.store.create(self.store.types[CRD_KEY], "v1", "", crd))

    def create_object(self, obj: dict, namespace: str | None = None) -> dict:
        """Create through the same code path as POST (validation included)."""
        group, _, version = obj["apiVersion"].rpartition("/")
        with self.store.cond:
            matches = [rt for (g, _), rt in self.store.types.items()
                       if g == group and rt.kind == obj["kind"]]
        if not matches:
            raise KeyError(f"no resource for {obj['apiVersion']} {obj['kind']}")
        ns = namespace or meta(obj).get("namespace") or "default"
        return copy.deepcopy(self.store.create(matches[0], version, ns, obj))

    def patch_object(self, plural: str, name: str, patch: dict, namespace: str = "default",
                     group: str | None = None, subresource: str | None = None) -> dict:
        """Merge-patch an object (``subresource="status"`` to set status as a controller would)."""
        rt = self.store.type_by_plural(plural, group)
        return copy.deepcopy(self.store.patch(rt, rt.storage_version, namespace, name,
                                              "application/merge-patch+json", patch,
                                              subresource=subresource))

    def delete_object(self, plural: str, name: str, namespace: str = "default",
                      group: str | None = None, propagation_policy: str | None = None) -> dict:
        """Delete as DELETE would; returns the terminating object or a Success Status."""
        rt = self.store.type_by_plural(plural, group)
        options = {"propagationPolicy": propagation_policy} if propagation_policy else {}
        return copy.deepcopy(self.store.delete(rt, namespace, name, options))

    def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0) -> T:
        """Wait until ``predicate()`` is truthy and return its value; TimeoutError otherwise.

        Re-evaluated on every store change (and at least every 50 ms)."""
        result = self.store.wait_for(predicate, timeout, poll=0.05)
        if not result:
            raise TimeoutError(f"condition not met within {timeout}s")
        return result
