"""List, then watch, TrainedModels with the official client, never losing or repeating an event.

The watch resumes from the last resourceVersion it saw (bookmarks keep that fresh on quiet streams). A
410 Gone means the API server compacted that history: relist, and let the consumer diff the full list
against what it knew. A dropped stream reconnects with exponential backoff. The client is synchronous,
so this runs in a thread and hands events to the caller's callback.

Nothing here can wait forever: every list has a connect and read time limit, and a watch's read limit is
its server-side ``timeoutSeconds`` plus that, so a connection that stops passing data (a black-holed path)
ends in an error and is replaced by a new watch from the last resourceVersion. The time of the last list,
event or bookmark is kept (:attr:`TrainedModelWatcher.contact_age_s`) for the bridge's liveness check.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from rayms.k8s.resources import Coordinates

logger = logging.getLogger("rayms.k8s")

PAGE_SIZE = 500
MAX_BACKOFF_S = 10.0

# emit("SYNC", [objects]) after every (re)list; emit("ADDED"|"MODIFIED"|"DELETED", object) per event.
Emit = Callable[[str, Any], None]


class TrainedModelWatcher:
    def __init__(self, api: client.ApiClient, *, coords: Coordinates, namespace: str, emit: Emit,
                 call_timeout: tuple[float, float], watch_timeout: tuple[float, float], watch_timeout_s: int) -> None:
        self._objects = client.CustomObjectsApi(api)
        self._coords = coords
        self._namespace = namespace
        self._emit = emit
        self._call_timeout = call_timeout
        self._watch_timeout = watch_timeout
        self._watch_timeout_s = watch_timeout_s
        self._last_contact = time.monotonic()
        self._stop = threading.Event()
        self._watch: watch.Watch | None = None
        self.relists = 0
        self.reconnects = 0

    @property
    def contact_age_s(self) -> float:
        """Seconds since the API server last answered a list or sent an event or bookmark."""
        return time.monotonic() - self._last_contact

    def _heard_from_server(self) -> None:
        self._last_contact = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.stop()

    def _kwargs(self) -> dict[str, Any]:
        return {"group": self._coords.group, "version": self._coords.version,
                "namespace": self._namespace, "plural": self._coords.plural}

    def list_all(self) -> tuple[list[dict[str, Any]], str]:
        """Every TrainedModel, page by page; returns the objects and the list's resourceVersion."""
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            extra = {"_continue": token} if token else {}
            page = self._objects.list_namespaced_custom_object(**self._kwargs(), limit=PAGE_SIZE,
                                                               _request_timeout=self._call_timeout, **extra)
            self._heard_from_server()
            items.extend(page.get("items", []))
            token = (page.get("metadata") or {}).get("continue")
            if not token:
                return items, page["metadata"]["resourceVersion"]

    def run(self) -> None:
        backoff = 0.1
        resource_version: str | None = None
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    items, resource_version = self.list_all()
                    self.relists += 1
                    self._emit("SYNC", items)
                resource_version = self._watch_from(resource_version)
                backoff = 0.1
            except ApiException as exc:
                if exc.status == 410:
                    logger.info("TrainedModel watch expired (410 Gone); relisting")
                    resource_version = None
                    continue
                logger.warning("TrainedModel API error %s; retrying in %.1fs", exc.status, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)
            except Exception as exc:  # connection dropped or silent past its read limit, server restarting...
                if self._stop.is_set():
                    break
                self.reconnects += 1
                logger.warning("TrainedModel watch dropped (%s); reconnecting in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _watch_from(self, resource_version: str) -> str:
        self._watch = watch.Watch()
        stream = self._watch.stream(
            self._objects.list_namespaced_custom_object, **self._kwargs(),
            resource_version=resource_version, allow_watch_bookmarks=True, timeout_seconds=self._watch_timeout_s,
            _request_timeout=self._watch_timeout)
        for event in stream:
            self._heard_from_server()
            if self._stop.is_set():
                break
            kind, obj = event["type"], event["object"]
            if kind == "ERROR":
                code = obj.get("code") if isinstance(obj, dict) else None
                raise ApiException(status=code or 500, reason=str(obj))
            resource_version = (obj.get("metadata") or {}).get("resourceVersion") or resource_version
            if kind != "BOOKMARK":
                self._emit(kind, obj)
        self._heard_from_server()  # the server ended the stream at its timeout: it is there
        return resource_version
