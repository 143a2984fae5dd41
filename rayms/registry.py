"""The registry: the one source of truth for which models should exist and what state each is in.

Every way of adding a model (repository API, models file, Kubernetes, Python) ends in
:meth:`ModelRegistry.register`; every way of removing one ends in :meth:`ModelRegistry.unregister`.
The registry persists the desired set (see :mod:`rayms.statestore`), drives each model through its
lifecycle by asking a replica to load it, and pushes every change to subscribers through
:meth:`ModelRegistry.watch` (a long poll), so the ingress replicas and the bridge keep a local view and never
ask per request.

This module is plain asyncio. Ray appears only behind the :class:`Placer` seam (how a load reaches a
replica), implemented in :mod:`rayms.cluster`, which also wraps the registry in a Serve deployment.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

from rayms.access import check_storage
from rayms.redact import redact
from rayms.config import ModelSpec, Settings, validate_model_name
from rayms.errors import Conflict, LoadTimedOut, MemoryUnavailable, ModelLoadFailed, ModelNotFound, Overloaded, RaymsError
from rayms.status import Changes, LoadReport, ModelState, ModelStatus, ReplicaReport, Source
from rayms.statestore import StateStore

logger = logging.getLogger("rayms.registry")

SEEDED = (Source.REPOSITORY_FOLDER, Source.MODELS_FILE)
"""The sources a server declares itself at every start."""

LOAD_WAIT_GRACE_S = 1.0
MAX_LOAD_BACKOFF_S = 30.0


class Placer(Protocol):
    """How the registry reaches replicas. The Ray implementation lives in :mod:`rayms.cluster.handles`.

    Errors raised behind it arrive as :class:`~rayms.errors.RaymsError` (the seam unwraps Ray's wrappers)."""

    async def load(self, name: str, spec: ModelSpec, version: int) -> LoadReport:
        """Load ``name`` on a replica and say what it cost there."""

    async def unload(self, name: str, spec: ModelSpec | None) -> None:
        """Drop ``name`` from every replica and, given its spec, its artifact from every node's cache."""


@dataclass
class ModelRecord:
    name: str
    spec: ModelSpec | None  # None only for a FAILED model that never had a valid spec
    source: Source
    version: int = 1
    state: ModelState = ModelState.PENDING
    reason: str = ""
    updated_at: float = field(default_factory=time.time)
    measured_bytes: int = 0
    load_time_s: float | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    replicas: set[str] = field(default_factory=set)
    change: int = 0
    serving: tuple[ModelSpec, int] | None = None
    """While a new version loads: the spec and version that is READY and keeps serving if the new one fails."""

    def status(self) -> ModelStatus:
        """The record as subscribers and the repository index see it."""
        return ModelStatus(
            name=self.name, version=self.version, state=self.state, source=self.source, spec=self.spec,
            reason=redact(self.reason), measured_bytes=self.measured_bytes, load_time_s=self.load_time_s,
            replicas=tuple(sorted(self.replicas)), metadata=self.metadata, updated_at=self.updated_at,
        )


class ModelRegistry:
    """Desired set of models, their lifecycle, and change notification."""

    def __init__(self, settings: Settings, *, store: StateStore, placer: Placer) -> None:
        self._settings = settings
        self._store = store
        self._placer = placer
        self._records: dict[str, ModelRecord] = {}
        self._tombstones: dict[str, int] = {}
        # Models a server declares at start (repository folder, models file) that a user unloaded: they stay
        # unloaded across restarts until loaded again. Persisted with the desired set.
        self._declined: dict[str, Source] = {}
        self._change = 0
        self._epoch = uuid.uuid4().hex
        self._changed = asyncio.Condition()
        self._load_slots = asyncio.Semaphore(settings.max_concurrent_loads)
        self._tasks: dict[str, asyncio.Task] = {}
        self._settle_waiters: dict[str, set[asyncio.Future]] = {}
        self._flush_lock = asyncio.Lock()
        self._dirty = 0
        self._flushed = 0

    # ---------------------------------------------------------------- start-up
    async def restore(self) -> int:
        """Re-register every model of the persisted desired set; return how many."""
        entries = await asyncio.to_thread(self._store.read)
        for entry in entries:
            try:
                name = validate_model_name(entry["modelName"])
                if entry.get("unloaded"):
                    self._declined[name] = Source.parse(entry["source"])
                    continue
                spec = ModelSpec.parse(entry["modelSpec"], name=name)
                check_storage(self._settings, spec.storage_uri)  # a state file edited to point elsewhere
                source, version = Source.parse(entry.get("source", Source.API)), int(entry.get("version", 1))
                if entry.get("ready"):
                    # It loaded before, at this version: READY at once, no reload. Replicas that outlived the
                    # registry still hold it and serve on; the others load it on its next request.
                    record = ModelRecord(name=name, spec=spec, source=source, version=version,
                                         state=ModelState.READY, measured_bytes=int(entry.get("measuredBytes", 0)))
                    self._records[name] = record
                    self._touch(record)
                else:
                    self._put(name, spec, source, version=version)
            except (RaymsError, KeyError, TypeError, ValueError) as exc:
                logger.error("model %s: cannot restore from %s: %s", entry.get("modelName"), self._store.uri, exc)
        await self._notify()
        logger.info("restored %d models from %s", len(self._records), self._store.uri)
        return len(self._records)

    async def seed(self, declared: list[tuple[str, ModelSpec | str, Source]]) -> None:
        """Apply what the server's own sources declare at start (``spec`` or, for a model rayms cannot read,
        the reason). Run after :meth:`restore` on every start, so a second run on another repository serves
        that repository. A declared model a user unloaded stays unloaded; one registered by hand or by
        Kubernetes under the same name is left alone; a model its source no longer declares is removed."""
        names = set()
        for name, spec, source in declared:
            names.add(name)
            current = self._records.get(name)
            if name in self._declined or (current is not None and current.source not in SEEDED):
                continue
            reason = spec if isinstance(spec, str) else ""
            if isinstance(spec, ModelSpec):
                try:
                    await self.register(name, spec, source)
                except RaymsError as exc:
                    reason = str(exc)
            if reason:
                logger.error("model %s: cannot serve it from %s: %s", name, source.value, reason)
                try:
                    await self.register_failed(name, reason, source)
                except RaymsError as exc:  # not even a valid model name: the log is all there is
                    logger.error("model %r: %s", name, exc)
        for record in [r for r in self._records.values() if r.source in SEEDED and r.name not in names]:
            logger.info("model %s: no longer declared by %s; unloading", record.name, record.source.value)
            await self.unregister(record.name, decline=False)
        if set(self._declined) - names:  # declined models whose source dropped them need no memory
            self._declined = {n: s for n, s in self._declined.items() if n in names}
            await self._persist()

    # ---------------------------------------------------------------- desired state
    async def register(self, name: str, spec: ModelSpec, source: Source = Source.API, *,
                       force: bool = False) -> ModelStatus:
        """Add a model or change its spec. Returns its status at once; loading goes on in the background.

        Registering the same spec again is a no-op unless the model FAILED (then it retries). A model a
        TrainedModel declares is replaced by another source only with ``force``; storage this server may not
        load from is refused (:func:`rayms.access.check_storage`).
        """
        validate_model_name(name)
        source = Source.parse(source)
        check_storage(self._settings, spec.storage_uri)
        self._check_owner(name, source, force)
        budget = self._settings.model_budget_bytes()
        if spec.memory_bytes > budget:
            raise MemoryUnavailable(
                f"model {name}: declared memory {spec.memory} ({spec.memory_bytes} bytes) exceeds the "
                f"model-memory budget of one replica ({budget} bytes)"
            )
        current = self._records.get(name)
        if current and current.spec == spec and current.source == source and current.state != ModelState.FAILED:
            return current.status()
        before = _snapshot(current)
        declined = self._declined.get(name)
        record = self._put(name, spec, source)
        registered = record.status()  # as registered: the load may settle before the write below returns
        await self._notify()
        try:
            await self._persist()
        except RaymsError:
            # Memory and disk must agree: what could not be written did not happen.
            self._restore_record(name, before)
            if declined is not None:
                self._declined[name] = declined
            await self._notify()
            raise
        return registered

    async def load(self, name: str, spec: ModelSpec, source: Source = Source.API, *,
                   force: bool = False) -> ModelStatus:
        """Register and wait until READY or FAILED (the repository API's load), within ``load_timeout_s``."""
        asked = await self.register(name, spec, source, force=force)
        # A little longer than the load's own bound, so a load that runs out of time ends as FAILED with its
        # reason; the wait itself times out only for a load still queued behind max_concurrent_loads.
        status = await self.wait_settled(name, self._settings.load_timeout_s + LOAD_WAIT_GRACE_S)
        if status.version != asked.version:  # the new version failed; the old one still serves
            raise ModelLoadFailed(f"model {name}: {status.reason}")
        return status

    async def register_failed(self, name: str, reason: str, source: Source) -> ModelStatus:
        """Record a model that a source declares but rayms cannot read (e.g. a repository folder with no
        model file): it shows in the index as FAILED with ``reason`` and is not persisted or loaded. A model
        that serves under that name is never replaced by it (its source may be broken now; it still serves)."""
        validate_model_name(name)
        source = Source.parse(source)
        current = self._records.get(name)
        if current is not None and current.spec is not None:
            logger.error("model %s: %s; the version registered before keeps serving", name, reason)
            return current.status()
        record = ModelRecord(name=name, spec=None, source=source, state=ModelState.FAILED, reason=reason)
        self._records[name] = record
        self._tombstones.pop(name, None)
        self._touch(record)
        await self._notify()
        return record.status()

    def _check_owner(self, name: str, source: Source, force: bool) -> None:
        """One owner per model: what a TrainedModel declares, the HTTP API changes only when forced (the
        TrainedModel would still say Ready while serving something else)."""
        current = self._records.get(name)
        if current is not None and current.source is Source.KUBERNETES and source is not Source.KUBERNETES \
                and not force:
            raise Conflict(f"model {name} is declared by a TrainedModel (source kubernetes): change or delete the "
                           "TrainedModel, or send \"force\": true")

    def _put(self, name: str, spec: ModelSpec, source: Source, version: int = 1) -> ModelRecord:
        current = self._records.get(name)
        self._declined.pop(name, None)  # loaded again: no longer declined
        if current is None or current.spec is None:
            record = ModelRecord(name=name, spec=spec, source=source, version=version)
            self._records[name] = record
            self._tombstones.pop(name, None)
        elif current.spec != spec:
            # A new version: the old one keeps serving (state stays READY) until the new one has loaded, and
            # goes on serving if the new one fails.
            record = current
            if record.state == ModelState.READY and record.serving is None:
                record.serving = (record.spec, record.version)
            record.spec, record.source, record.version = spec, source, current.version + 1
            if record.state != ModelState.READY:
                record.state, record.reason = ModelState.PENDING, ""
        else:
            record = current
            record.source = source
            record.state, record.reason = ModelState.PENDING, ""
        self._touch(record)
        self._start_load(record)
        return record

    async def unregister(self, name: str, source: Source | None = None, *, decline: bool = True,
                         force: bool = False) -> None:
        """Remove a model: from the desired set, from every replica, and from the artifact caches.

        A model the server's own sources declare is remembered as declined (``decline``), so a restart does
        not bring it back. ``source`` None (the HTTP API) removes a TrainedModel's model only with ``force``."""
        record = self._records.get(name)
        if record is None or (source is not None and record.source != source):
            raise ModelNotFound(name)
        if source is None:
            self._check_owner(name, Source.API, force)
        if decline and record.source in SEEDED:
            self._declined[name] = record.source
        task = self._tasks.pop(name, None)
        if task:
            task.cancel()
        before = _snapshot(record)
        record.state, record.reason = ModelState.UNLOADING, ""
        self._touch(record)
        await self._notify()
        # Forget it first so a restart during the unload does not bring it back.
        del self._records[name]
        self._tombstones[name] = self._next_change()
        try:
            await self._persist()
        except RaymsError:
            self._restore_record(name, before)
            self._declined.pop(name, None)
            await self._notify()
            raise
        self._wake_waiters(name)  # a load waiting on it learns that it is gone
        try:
            if record.spec is not None:
                await self._placer.unload(name, record.spec)
        except Exception as exc:  # the model is gone from the desired set whatever a replica says
            logger.warning("model %s: unload on replicas reported: %s", name, exc)
        await self._notify()
        logger.info("model %s: unloaded", name)

    # ---------------------------------------------------------------- lifecycle
    def _start_load(self, record: ModelRecord) -> None:
        previous = self._tasks.pop(record.name, None)
        if previous:
            previous.cancel()
        task = asyncio.get_running_loop().create_task(self._load(record.name, record.version))
        self._tasks[record.name] = task
        task.add_done_callback(lambda t, n=record.name: self._tasks.pop(n, None) if self._tasks.get(n) is t else None)

    async def _load(self, name: str, version: int) -> None:
        async with self._load_slots:
            record = self._records.get(name)
            if record is None or record.version != version:
                return
            if record.state != ModelState.READY:
                record.state = ModelState.DOWNLOADING
                self._touch(record)
                await self._notify()
            started = time.monotonic()
            try:
                result = await self._load_with_retries(record, version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._records.get(name) is record and record.version == version:
                    await self._failed(record, version, str(exc) or type(exc).__name__)
                return
            if self._records.get(name) is not record or record.version != version:
                return
            # Settled: leave the task table before notifying, or a waiter woken by this READY still sees
            # the load running and sleeps until some unrelated change (or its timeout) wakes it again.
            if self._tasks.get(name) is asyncio.current_task():
                del self._tasks[name]
            record.state, record.reason, record.serving = ModelState.READY, "", None
            record.measured_bytes = result.measured_bytes
            record.load_time_s = round(time.monotonic() - started, 4)
            record.metadata = result.metadata
            record.replicas.add(result.replica)
            self._touch(record)
            await self._notify()
            logger.info("model %s: version %d READY in %.3fs", name, version, record.load_time_s)
            await self._persist_quietly()  # READY is remembered: a restart serves it without reloading

    async def _load_with_retries(self, record: ModelRecord, version: int) -> LoadReport:
        """One placed load, retried with capped backoff while the failure is transient (the replica died or
        was restarting, or never answered). Each attempt is bounded by ``load_timeout_s``."""
        name, attempts = record.name, self._settings.load_attempts
        for attempt in range(1, attempts + 1):
            try:
                # Bounded: a load that never answers (a stuck replica) ends instead of hanging forever.
                return await asyncio.wait_for(self._placer.load(name, record.spec, version),
                                              timeout=self._settings.load_timeout_s)
            except asyncio.TimeoutError:
                error: Exception = LoadTimedOut(f"model {name}: no replica finished loading it within "
                                                f"{self._settings.load_timeout_s:g}s")
            except (Overloaded, LoadTimedOut) as exc:
                error = exc
            if attempt == attempts or self._records.get(name) is not record or record.version != version:
                raise error
            delay = min(self._settings.load_backoff_s * 2 ** (attempt - 1), MAX_LOAD_BACKOFF_S)
            logger.warning("model %s: load attempt %d/%d failed (%s); retrying in %.1fs",
                           name, attempt, attempts, error, delay)
            record.reason = f"attempt {attempt} of {attempts} failed: {error}; retrying"
            self._touch(record)
            await self._notify()
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _failed(self, record: ModelRecord, version: int, reason: str) -> None:
        """A load ended in failure. Not retried further: a failed model waits for the next register."""
        if record.serving is not None:
            # The version that was serving goes on serving; the failure is in the model's status.
            spec, old = record.serving
            record.spec, record.version, record.serving = spec, old, None
            record.state = ModelState.READY
            record.reason = f"version {version} failed to load: {reason}; version {old} is still serving"
            logger.error("model %s: %s", record.name, record.reason)
            await self._persist_quietly()  # before waiters hear of it: the file says what serves
            if self._tasks.get(record.name) is asyncio.current_task():
                del self._tasks[record.name]  # settled: a waiter woken by the change below must see it so
            self._touch(record)
            await self._notify()
            return
        record.state, record.reason = ModelState.FAILED, reason
        self._touch(record)
        await self._notify()
        logger.error("model %s: version %d failed: %s", record.name, version, reason)

    async def _persist_quietly(self) -> None:
        """Persist a change that the registry can live without on disk (a READY flag, a kept version)."""
        try:
            await self._persist()
        except RaymsError as exc:
            logger.error("model state %s could not be written: %s", self._store.uri, exc)

    async def report(self, name: str, version: int, state: ModelState) -> None:
        """A replica tells how a load it runs is going (LOADING once the artifact is local)."""
        record = self._records.get(name)
        if record is None or record.version != version or record.state == ModelState.READY:
            return
        if record.state in (ModelState.FAILED, ModelState.UNLOADING):
            return
        record.state, record.reason = ModelState(state), ""
        self._touch(record)
        await self._notify()

    async def quarantine(self, name: str, version: int, reason: str) -> None:
        """A replica found the model unfit to serve (its predict calls kept hanging): FAILED with the reason
        until it is registered again. Not persisted as such: a restart tries the model again."""
        record = self._records.get(name)
        if record is None or record.version != version or record.state is ModelState.FAILED:
            return
        record.state, record.reason = ModelState.FAILED, reason
        self._touch(record)
        await self._notify()
        logger.error("model %s: version %d %s", name, version, reason)
        try:
            await self._placer.unload(name, None)
        except Exception as exc:  # replicas restarting: they refuse a FAILED model anyway
            logger.warning("model %s: unload after quarantine reported: %s", name, exc)

    async def report_residency(self, replica: str, loaded: list[str], evicted: list[str]) -> None:
        """A replica tells which models it now holds in memory (for the index)."""
        touched = False
        for name in loaded:
            if (record := self._records.get(name)) and replica not in record.replicas:
                record.replicas.add(replica)
                self._touch(record)
                touched = True
        for name in evicted:
            if (record := self._records.get(name)) and replica in record.replicas:
                record.replicas.discard(replica)
                self._touch(record)
                touched = True
        if touched:
            await self._notify()

    async def reconcile(self, reports: list[ReplicaReport]) -> None:
        """Take which replica holds which model from the replicas' own reports (at start, and now and then):
        a restored registry learns what replicas that outlived it hold, and one that died holds nothing."""
        holders: dict[str, set[str]] = {}
        for report in reports:
            for name, resident in report.models.items():
                record = self._records.get(name)
                if record is not None and resident.version == record.version:
                    holders.setdefault(name, set()).add(report.replica)
        touched = False
        for name, record in self._records.items():
            held = holders.get(name, set())
            if record.replicas != held:
                record.replicas = held
                self._touch(record)
                touched = True
        if touched:
            await self._notify()

    # ---------------------------------------------------------------- reading
    def get(self, name: str) -> ModelStatus:
        record = self._records.get(name)
        if record is None:
            raise ModelNotFound(name)
        return record.status()

    def list(self, source: Source | None = None) -> list[ModelStatus]:
        return [r.status() for r in self._records.values() if source is None or r.source == source]

    async def wait_settled(self, name: str, timeout_s: float) -> ModelStatus:
        """Wait until ``name`` is READY or FAILED at its current version, then return its status.

        Raises :class:`~rayms.errors.ModelNotFound` when it is unregistered meanwhile and
        :class:`~rayms.errors.LoadTimedOut` when it has not settled after ``timeout_s``. Each waiter waits
        on its own model: a thousand loads in flight are not all woken by every change."""
        record = self._records.get(name)
        if record is None:
            raise ModelNotFound(name)
        if not self._settled(record):
            waiter = asyncio.get_running_loop().create_future()
            self._settle_waiters.setdefault(name, set()).add(waiter)
            try:
                await asyncio.wait_for(waiter, timeout=timeout_s)
            except asyncio.TimeoutError:
                pass
            finally:
                waiters = self._settle_waiters.get(name)
                if waiters is not None:
                    waiters.discard(waiter)
                    if not waiters:
                        del self._settle_waiters[name]
        record = self._records.get(name)
        if record is None:
            raise ModelNotFound(name)
        if not self._settled(record):
            raise LoadTimedOut(f"model {name}: not READY within {timeout_s:g}s (state {record.state.value}); "
                               "it is still being loaded, see the repository index")
        return record.status()

    def _settled(self, record: ModelRecord) -> bool:
        return record.state == ModelState.FAILED or (
            record.state == ModelState.READY and record.name not in self._tasks)

    def _wake_waiters(self, name: str) -> None:
        for waiter in self._settle_waiters.get(name, ()):
            if not waiter.done():
                waiter.set_result(None)

    async def watch(self, epoch: str | None, since: int, timeout_s: float = 30.0) -> Changes:
        """Long poll: return what changed after change number ``since``, waiting up to ``timeout_s``.

        A subscriber from another registry lifetime (``epoch`` differs) gets the full set with
        ``reset: True`` and must replace its view.
        """
        reset = epoch != self._epoch
        if not reset and since >= self._change:
            async with self._changed:
                try:
                    await asyncio.wait_for(
                        self._changed.wait_for(lambda: self._change > since), timeout=timeout_s)
                except asyncio.TimeoutError:
                    pass
        if reset:
            models = [r.status() for r in self._records.values()]
            deleted: list[str] = []
        else:
            models = [r.status() for r in self._records.values() if r.change > since]
            deleted = [n for n, c in self._tombstones.items() if c > since]
        return Changes(epoch=self._epoch, change=self._change, reset=reset, models=models, deleted=deleted)

    # ---------------------------------------------------------------- internals
    def _next_change(self) -> int:
        self._change += 1
        return self._change

    def _touch(self, record: ModelRecord) -> None:
        record.updated_at = time.time()
        record.change = self._next_change()
        if record.name in self._settle_waiters and self._settled(record):
            self._wake_waiters(record.name)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _persist(self) -> None:
        """Write the desired set; concurrent callers share one write (group commit)."""
        self._dirty += 1
        target = self._dirty
        async with self._flush_lock:
            if self._flushed >= target:
                return
            snapshot_at = self._dirty
            entries = [_entry(r) for r in self._records.values() if r.spec is not None] + [
                {"modelName": n, "source": source.value, "unloaded": True} for n, source in self._declined.items()]
            await asyncio.to_thread(self._store.write, entries)
            self._flushed = snapshot_at

    async def close(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()

    def _restore_record(self, name: str, before: ModelRecord | None) -> None:
        """Put ``name`` back as it was before a change that could not be persisted."""
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
        if before is None:
            if self._records.pop(name, None) is not None:
                self._tombstones[name] = self._next_change()
            self._wake_waiters(name)
            return
        self._records[name] = before
        self._tombstones.pop(name, None)
        self._touch(before)


def _snapshot(record: ModelRecord | None) -> ModelRecord | None:
    """A copy of ``record`` to put back if a change cannot be persisted."""
    if record is None:
        return None
    clone = copy.copy(record)
    clone.replicas = set(record.replicas)
    return clone


def _entry(record: ModelRecord) -> dict[str, Any]:
    """A record as the state file keeps it: the desired spec and its version (replicas that outlive a registry
    restart hold models by version, and a restored model restarting at 1 would look older than what they
    hold), and ``ready`` when that version has loaded, so a restart serves it at once."""
    entry = {"modelName": record.name, "modelSpec": record.spec.to_wire(), "source": record.source.value,
             "version": record.version}
    if record.state is ModelState.READY and record.serving is None:
        entry |= {"ready": True, "measuredBytes": record.measured_bytes}
    return entry
