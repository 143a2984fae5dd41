"""The bridge pipeline: watch events -> one sequential queue per TrainedModel -> validated spec -> registry,
and registry changes -> coalesced status writes.

Level-based on purpose: each object's queue keeps only its newest state, so a burst of updates to one
TrainedModel is applied once, in order, and an object never goes back to an older state. Every relist
(start-up, 410 Gone) is diffed against what the bridge knew, and against what the registry holds from
Kubernetes, so deletions missed while the bridge was away are still applied. No finalizer is used: a
TrainedModel can always be deleted, even with the bridge gone; its parent RayService owns it, so
Kubernetes garbage collection removes it with the service.

Nothing waits forever, and nothing failed is forgotten. Every API call has a time limit, and the watch's
last sign of life is a liveness check (:meth:`TrainedModelBridge.check_health`). An object whose apply fails
for a reason that may pass (registry restarting, a call timing out) is applied again with capped backoff,
and counts as applied only once that succeeded; a refusal (invalid spec, not enough memory) is final and
shows in its status. Status writes run a few at a time, each object on its own schedule: 429, 5xx and
timeouts are retried with capped backoff or after the server's ``Retry-After``, while other objects' writes
go on; a write the API server refuses for good (400, 403, 422) is not repeated until the status changes.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Protocol

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from rayms.config import ModelSpec, Settings
from rayms.errors import ModelNotFound, RaymsError
from rayms.k8s.client import call_timeout, watch_timeout
from rayms.k8s.resources import (
    SOURCE, Coordinates, comparable, condition_for, desired_status, parse, with_transition_times,
)
from rayms.k8s.retry import Backoff, retry_after_s, retryable, status_of
from rayms.k8s.watcher import TrainedModelWatcher
from rayms.redact import redact
from rayms.status import Changes, ModelStatus, Source
from rayms.view import RegistryView

logger = logging.getLogger("rayms.k8s")

STATUS_COALESCE_S = 0.05
STATUS_WRITERS = 8                     # status writes in flight at once (the client's pool holds a few more)
STATUS_BACKOFF = Backoff(first_s=0.2, cap_s=30.0)
APPLY_BACKOFF = Backoff(first_s=0.2, cap_s=30.0)
REGISTRY_CALL_TIMEOUT_S = 60.0         # a registry that does not answer a register/unregister in this is retried


class RegistryClient(Protocol):
    """The registry as the bridge uses it; errors arrive as :class:`~rayms.errors.RaymsError`."""

    async def register(self, name: str, spec: ModelSpec, source: Source) -> ModelStatus: ...
    async def unregister(self, name: str, source: Source | None = None) -> None: ...
    async def list(self, source: Source | None = None) -> list[ModelStatus]: ...
    async def watch(self, epoch: str | None, since: int, timeout_s: float = 30.0) -> Changes: ...


class TrainedModelBridge:
    def __init__(self, settings: Settings, *, registry: RegistryClient, api: client.ApiClient, namespace: str) -> None:
        self._settings = settings
        self._registry = registry
        self._api = api
        self._objects_api = client.CustomObjectsApi(api)
        self._coords = Coordinates.for_mode(settings.kserve_compat)
        self._namespace = namespace
        self._service = settings.inference_service or ""
        self._known: dict[str, dict[str, Any]] = {}      # selected TrainedModels by name (newest seen)
        self._applied: dict[str, str] = {}               # "<uid>/<generation>" last applied per object
        self._pending: dict[str, dict[str, Any] | None] = {}
        self._busy: set[str] = set()
        self._refusals: dict[str, tuple[str, str]] = {}
        self._written: dict[str, dict[str, Any]] = {}
        self._dirty: set[str] = set()
        self._dirty_event = asyncio.Event()
        self._writing: set[str] = set()                  # names with a status write in flight
        self._status_attempts: dict[str, int] = {}       # failed writes in a row, per name
        self._status_due: dict[str, float] = {}          # loop time a name's next write waits for
        self._apply_attempts: dict[str, int] = {}        # failed applies in a row, per name
        self._apply_timers: dict[str, asyncio.TimerHandle] = {}
        self._timeout = call_timeout(settings)
        self._owner: dict[str, Any] | None = None
        self._owner_lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._view = RegistryView(registry.watch, on_update=self._registry_changed)
        self._watcher = TrainedModelWatcher(api, coords=self._coords, namespace=namespace, emit=self._from_thread,
                                            call_timeout=self._timeout, watch_timeout=watch_timeout(settings),
                                            watch_timeout_s=settings.bridge_watch_timeout_s)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.status_writes = 0
        self.status_retries = 0
        self.status_refused = 0
        self.apply_retries = 0
        self.synced = asyncio.Event()

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._view.start()
        self._tasks.append(self._loop.create_task(self._write_statuses()))
        self._thread = threading.Thread(target=self._watcher.run, name="trainedmodel-watch", daemon=True)
        self._thread.start()
        logger.info("watching %s/%s TrainedModels in namespace %s for inferenceService %r",
                    self._coords.group, self._coords.version, self._namespace, self._service)

    async def stop(self) -> None:
        self._stopping = True
        self._watcher.stop()
        await self._view.stop()
        for timer in self._apply_timers.values():
            timer.cancel()
        for task in self._tasks:
            task.cancel()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 5)

    def close(self) -> None:
        """Stop watching (synchronous: safe from ``__del__``)."""
        self._watcher.stop()

    def stats(self) -> dict[str, Any]:
        return {"known": len(self._known), "status_writes": self.status_writes,
                "status_retries": self.status_retries, "status_refused": self.status_refused,
                "apply_retries": self.apply_retries, "relists": self._watcher.relists,
                "reconnects": self._watcher.reconnects, "watch_age_s": round(self._watcher.contact_age_s, 3)}

    def check_health(self) -> None:
        """Raise when the watch is stuck: its thread is gone, or the API server has sent no list, event or
        bookmark for ``bridge_stale_after_s``. Serve's health check calls this and restarts the bridge."""
        if self._thread is not None and not self._thread.is_alive() and not self._stopping:
            raise RuntimeError("the TrainedModel watch thread has stopped")
        age, bound = self._watcher.contact_age_s, self._settings.bridge_stale_after_s
        if age > bound:
            raise RuntimeError(f"the TrainedModel watch has had no list, event or bookmark for {age:.0f}s "
                               f"(bound: {bound:.0f}s)")

    # ---------------------------------------------------------------- events in
    def _from_thread(self, kind: str, payload: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, kind, payload)

    def _selected(self, obj: dict[str, Any]) -> bool:
        return str((obj.get("spec") or {}).get("inferenceService") or "") == self._service

    def _dispatch(self, kind: str, payload: Any) -> None:
        if kind == "SYNC":
            listed = {o["metadata"]["name"]: o for o in payload if self._selected(o)}
            for name in set(self._known) - set(listed):
                self._enqueue(name, None)
            for name, obj in listed.items():
                self._enqueue(name, obj)
            self._loop.create_task(self._reconcile_registry(set(listed)))
            return
        name = payload["metadata"]["name"]
        if kind == "DELETED" or not self._selected(payload):
            if name in self._known or kind == "DELETED":
                self._enqueue(name, None)
            return
        self._enqueue(name, payload)

    def _enqueue(self, name: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self._known.pop(name, None)
        else:
            self._known[name] = obj
        self._pending[name] = obj
        if name not in self._busy:
            self._busy.add(name)
            self._loop.create_task(self._drain(name))

    async def _drain(self, name: str) -> None:
        """The per-object queue: apply the newest pending state until none is left."""
        try:
            while name in self._pending:
                obj = self._pending.pop(name)
                try:
                    await self._apply(name, obj)
                except Exception as exc:  # one object's trouble never stops the others; it is tried again
                    self._apply_later(name, exc)
                else:
                    self._apply_attempts.pop(name, None)
        finally:
            self._busy.discard(name)

    def _apply_later(self, name: str, exc: Exception) -> None:
        """Schedule the object's newest state to be applied again, with capped backoff."""
        attempt = self._apply_attempts.get(name, 0) + 1
        self._apply_attempts[name] = attempt
        delay = APPLY_BACKOFF.delay_s(attempt)
        self.apply_retries += 1
        logger.warning("TrainedModel %s: could not apply (%s: %s); trying again in %.1fs", name,
                       type(exc).__name__, exc, delay, exc_info=attempt == 1)
        if (timer := self._apply_timers.pop(name, None)) is not None:
            timer.cancel()
        self._apply_timers[name] = self._loop.call_later(delay, self._apply_again, name)

    def _apply_again(self, name: str) -> None:
        self._apply_timers.pop(name, None)
        if name not in self._pending and not self._stopping:  # a newer state already queued is applied anyway
            self._enqueue(name, self._known.get(name))

    async def _reconcile_registry(self, listed: set[str]) -> None:
        """Models the registry got from Kubernetes whose TrainedModel is gone are unloaded."""
        try:
            models = await self._registry.list(SOURCE)
        except Exception as exc:
            logger.warning("cannot reconcile with the registry yet: %s", exc)
            return
        for model in models:
            if model.name not in listed and model.name not in self._known:
                logger.info("model %s: its TrainedModel is gone; unloading", model.name)
                await self._unregister(model.name)
        self.synced.set()

    # ---------------------------------------------------------------- applying
    async def _apply(self, name: str, obj: dict[str, Any] | None) -> None:
        if obj is None:
            self._applied.pop(name, None)
            self._refusals.pop(name, None)
            self._written.pop(name, None)
            await self._unregister(name)
            logger.info("model %s: TrainedModel deleted; unloaded", name)
            return
        # Every selected TrainedModel, valid or not, gets its owner, so deleting the RayService removes all of
        # them. Checked on every event (a no-op once owned): the RayService may appear after the TrainedModel.
        await self._adopt(obj)
        # Act on spec changes only. Our own status writes and owner references bump the resourceVersion but
        # not the generation; re-applying on them would re-register a FAILED model and retry it in a loop.
        meta = obj["metadata"]
        applied = f"{meta.get('uid', '')}/{meta.get('generation', '')}"
        if self._applied.get(name) == applied:
            return
        parsed = parse(obj)
        self._refusals.pop(name, None)
        if parsed.problem:
            self._refusals[name] = (parsed.problem, parsed.problem_condition)
            await self._unregister(name)
        else:
            try:
                await asyncio.wait_for(self._registry.register(name, parsed.spec, SOURCE), REGISTRY_CALL_TIMEOUT_S)
            except RaymsError as error:
                if error.status_code >= 500:
                    raise  # the registry failed, not the spec (unreachable, state not written): retried
                self._refusals[name] = (redact(str(error)), condition_for(error))
        # Applied only now: a call that failed above leaves the object to be applied again (see _drain).
        self._applied[name] = applied
        self._mark_dirty(name)

    async def _unregister(self, name: str) -> None:
        try:
            await asyncio.wait_for(self._registry.unregister(name, SOURCE), REGISTRY_CALL_TIMEOUT_S)
        except ModelNotFound:
            pass

    async def _adopt(self, obj: dict[str, Any]) -> None:
        """Give the TrainedModel an ownerReference to its RayService, so deleting the service deletes it."""
        owner = await self._owner_reference()
        if owner is None:
            return
        refs = obj["metadata"].get("ownerReferences") or []
        if any(r.get("uid") == owner["uid"] for r in refs):
            return
        patch = ([{"op": "add", "path": "/metadata/ownerReferences/-", "value": owner}] if refs
                 else [{"op": "add", "path": "/metadata/ownerReferences", "value": [owner]}])
        try:
            await asyncio.to_thread(self._objects_api.patch_namespaced_custom_object, group=self._coords.group,
                                    version=self._coords.version, namespace=self._namespace,
                                    plural=self._coords.plural, name=obj["metadata"]["name"], body=patch,
                                    _content_type="application/json-patch+json", _request_timeout=self._timeout)
        except ApiException as exc:
            logger.warning("TrainedModel %s: cannot set its owner: %s", obj["metadata"]["name"], exc.reason)

    async def _owner_reference(self) -> dict[str, Any] | None:
        async with self._owner_lock:  # a burst of new TrainedModels shares one read of the RayService
            return await self._read_owner()

    async def _read_owner(self) -> dict[str, Any] | None:
        if self._owner is None:
            try:
                service = await asyncio.to_thread(
                    self._objects_api.get_namespaced_custom_object, group="ray.io", version="v1",
                    namespace=self._namespace, plural="rayservices", name=self._service,
                    _request_timeout=self._timeout)
            except ApiException as exc:
                if exc.status not in (403, 404):
                    logger.warning("cannot read RayService %s: %s", self._service, exc.reason)
                return None
            self._owner = {"apiVersion": "ray.io/v1", "kind": "RayService", "name": self._service,
                           "uid": service["metadata"]["uid"], "blockOwnerDeletion": False}
        return self._owner

    # ---------------------------------------------------------------- status out
    def _registry_changed(self, changed: list[str], removed: list[str]) -> None:
        for name in [*changed, *removed]:
            if name in self._known:
                self._mark_dirty(name)

    def _mark_dirty(self, name: str) -> None:
        self._dirty.add(name)
        self._dirty_event.set()

    def _urls(self, name: str) -> tuple[str, str]:
        path = f"/v1/models/{name}:predict" if self._settings.status_protocol == "v1" else f"/v2/models/{name}/infer"
        internal = self._settings.cluster_url or (
            f"http://{self._service}-serve-svc.{self._namespace}.svc.cluster.local:8000")
        external = self._settings.external_url or internal
        return external.rstrip("/") + path, internal.rstrip("/") + path

    async def _write_statuses(self) -> None:
        """Start a write for every dirty object that is due, at most ``STATUS_WRITERS`` at once.

        An object waiting out its backoff, or with a write in flight, stays dirty and is picked up when that
        ends; the others are written meanwhile.
        """
        slots = asyncio.Semaphore(STATUS_WRITERS)
        while True:
            await self._dirty_event.wait()
            await asyncio.sleep(STATUS_COALESCE_S)  # coalesce a burst of changes into one write per object
            self._dirty_event.clear()
            now = self._loop.time()
            for name in sorted(self._dirty):
                if name in self._writing or self._status_due.get(name, 0.0) > now:
                    continue
                self._dirty.discard(name)
                self._writing.add(name)
                task = self._loop.create_task(self._write_one(name, slots))
                self._tasks.append(task)
                task.add_done_callback(self._tasks.remove)

    async def _write_one(self, name: str, slots: asyncio.Semaphore) -> None:
        try:
            async with slots:
                await self._write_status(name)
        except Exception as exc:
            self._status_failed(name, exc)
        else:
            self._status_attempts.pop(name, None)
            self._status_due.pop(name, None)
        finally:
            self._writing.discard(name)
            if name in self._dirty:
                self._dirty_event.set()

    def _status_failed(self, name: str, exc: Exception) -> None:
        """Retry later (after ``Retry-After`` when the server sent one), or give up on a final refusal."""
        status = status_of(exc)
        if not retryable(exc):
            # Not repeated: the same body would be refused the same way. A later status change tries again.
            self.status_refused += 1
            self._status_attempts.pop(name, None)
            self._status_due.pop(name, None)
            logger.warning("TrainedModel %s: the API server refused the status write (%s %s); not retrying",
                           name, status, getattr(exc, "reason", exc))
            return
        attempt = self._status_attempts.get(name, 0) + 1
        self._status_attempts[name] = attempt
        wait = retry_after_s(exc)
        delay = wait if wait is not None else STATUS_BACKOFF.delay_s(attempt)
        self._status_due[name] = self._loop.time() + delay
        self._dirty.add(name)
        self._loop.call_later(delay, self._dirty_event.set)
        self.status_retries += 1
        logger.warning("TrainedModel %s: status write failed (%s); retrying in %.1fs", name,
                       f"{status} {exc.reason}" if status else f"{type(exc).__name__}: {exc}", delay)

    async def _write_status(self, name: str) -> None:
        obj = self._known.get(name)
        if obj is None:
            return
        refusal, where = self._refusals.get(name, ("", ""))
        url, address = self._urls(name)
        desired = desired_status(parsed=parse(obj), model=self._view.models.get(name), refusal=refusal,
                                 refusal_condition=where, url=url, address_url=address)
        previous = self._written.get(name, obj.get("status"))
        if comparable(desired) == comparable(previous):
            return
        body = {"status": with_transition_times(desired, previous)}
        try:
            await asyncio.to_thread(self._objects_api.patch_namespaced_custom_object_status,
                                    group=self._coords.group, version=self._coords.version,
                                    namespace=self._namespace, plural=self._coords.plural, name=name, body=body,
                                    _request_timeout=self._timeout)
        except ApiException as exc:
            if exc.status == 404:  # deleted meanwhile
                return
            raise
        self._written[name] = body["status"]
        self.status_writes += 1
