"""The puller: one per node, it makes model artifacts local before a replica loads them.

What KServe's agent got wrong is the list of what this does: its puller had no global concurrency cap, never
retried a failed download, reported nothing, and its success marker could be written next to a half-finished
model. Here downloads are capped (``max_concurrent_downloads``), deduplicated (concurrent fetches of one spec
share one download), retried with jittered exponential backoff on transient errors only, bounded per attempt
(``download_timeout_s``), and published through ``on_event`` (downloading/downloaded/failed per model; on a
cluster they become Prometheus metrics, :mod:`rayms.cluster.agent`). The registry shows a model as
DOWNLOADING from the moment it asks a replica to load it until the replica reports LOADING.

Cache layout, per node, keyed by :meth:`ModelSpec.digest` so a restarted agent or a second replica on the node
reuses a finished download::

    <cache_dir>/artifacts/<digest>/model        the artifact (file or folder), renamed into place
    <cache_dir>/artifacts/<digest>/.complete    JSON {uri, path, bytes, seconds, completed_at[, sha256]},
                                                written last; its modification time is the last fetch
    <cache_dir>/artifacts/<digest>/.lock        flock held while filling the entry (agents in two processes)

What stays in the cache, and for how long (the disk quota is ``artifact_cache_bytes``):

* An entry is *in use* while it is being downloaded, and from the moment a model asks for it until that load
  calls :meth:`ArtifactAgent.release` (at most ``load_timeout_s`` after the download, for a caller that never
  does). An entry in use is never removed.
* A *replaced* entry (every model that fetched it on this node has since fetched another spec, or was
  unloaded with :meth:`ArtifactAgent.evict`) is removed as soon as it is not in use.
* Above the quota, entries are removed least recently fetched first (the marker's modification time records
  the last fetch), skipping entries in use, until the cache fits. A model resident in a replica's memory does
  not need its file (the built-in frameworks read it whole at load; custom models are told to read what they
  need in ``load``), so its entry may go; the replica fetches it again only if it ever reloads the model. The
  cache exceeds the quota only by entries in use.

Plain asyncio with no Ray import: the node's actor is this class under ``ray.remote``
(:mod:`rayms.cluster.agent`). Blocking fsspec work runs in threads (``asyncio.to_thread``); each download
builds its own filesystem object, so none is shared. One agent per node keeps this bookkeeping; an entry
being filled by another process (its lock is held) is never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from rayms import storage
from rayms.config import ModelSpec, Settings
from rayms.errors import StorageError

try:
    import fcntl
except ImportError:  # not POSIX: one agent per node is then the only guard
    fcntl = None

logger = logging.getLogger(__name__)

MARKER = ".complete"
EventCallback = Callable[[str, str, dict], Any]


class ArtifactAgent:
    """Fetches, caches and evicts model artifacts on this node. Construct it from :class:`Settings`."""

    def __init__(self, settings: Settings, on_event: EventCallback | None = None) -> None:
        self._settings = settings
        self._on_event = on_event
        # Resolved on the agent's own node: "~" and "$VARS" take that node's home and environment.
        self._root = Path(os.path.expandvars(settings.cache_dir)).expanduser() / "artifacts"
        self._slots = asyncio.Semaphore(settings.max_concurrent_downloads)
        self._inflight: dict[str, asyncio.Task] = {}
        self._names: dict[str, set[str]] = {}  # digest -> models waiting on that download
        self._started: set[str] = set()  # digests whose "downloading" event has gone out
        # What the cache may remove (see the module docstring): loads in progress per (digest, model), each a
        # one-item list holding its deadline; the digest each model last fetched here; digests that have been
        # some model's (removed once no model's any more); removals running now.
        self._pins: dict[tuple[str, str], list[list[float]]] = {}
        self._current: dict[str, str] = {}
        self._known: set[str] = set()
        self._removing: dict[str, asyncio.Task] = {}
        self._cache_bytes: int | None = None  # bytes of complete entries as last counted (None: not yet)
        self._active = 0
        self._stats = dict.fromkeys(
            ("downloads_started", "downloads_completed", "bytes", "peak_concurrent", "cache_hits",
             "deduplicated", "retries", "failures", "entries_removed"), 0)

    def stats(self) -> dict[str, int]:
        """Counters since start, plus downloads running now (``active``)."""
        return {**self._stats, "active": self._active}

    def entry(self, spec: ModelSpec) -> Path:
        return self._root / spec.digest()

    async def fetch(self, name: str, spec: ModelSpec) -> str:
        """The local path of ``spec``'s artifact, downloading it unless this node already has it."""
        try:
            local = await asyncio.to_thread(storage.in_place, spec.storage_uri, settings=self._settings)
        except StorageError as exc:
            self._stats["failures"] += 1
            logger.error("model %s: %s", name, exc)
            await self._emit(name, "failed", {"reason": str(exc), "attempts": 1, "transient": exc.transient})
            raise
        if local is not None:
            logger.info("model %s: using %s in place", name, local)
            await self._emit(name, "downloaded", {"bytes": 0, "seconds": 0.0, "cached": True, "path": str(local)})
            return str(local)
        key = spec.digest()
        pin = self._pin(key, name)  # in use from now on: no removal may start
        try:
            removal = self._removing.get(key)
            if removal is not None:  # started before the pin: let it finish, then download afresh
                await asyncio.wait({removal})
            path = await self._join(name=name, key=key, spec=spec)
        except BaseException:
            self._unpin(key, name, pin)
            raise
        pin[0] = time.monotonic() + self._settings.load_timeout_s  # the load has this long to release it
        previous, self._current[name] = self._current.get(name), key
        self._known.add(key)
        if previous is not None and previous != key:
            logger.info("model %s: now uses %s; the artifact it used before goes once no load needs it",
                        name, spec.storage_uri)
        await self._sweep()
        return path

    async def release(self, name: str, spec: ModelSpec) -> None:
        """The load of ``name`` that fetched ``spec`` has ended (loaded or failed): its entry is no longer in
        use by it. Replicas call this after every load that got its path from :meth:`fetch`."""
        self._unpin(spec.digest(), name)
        await self._sweep()

    async def evict(self, name: str, spec: ModelSpec) -> None:
        """``name`` is unloaded: remove ``spec``'s cache entry unless another model on this node uses it or a
        load of another model reads it (after any download of it ends). Never touches in-place sources."""
        key = spec.digest()
        self._pins.pop((key, name), None)  # a load of an unloaded model is moot
        if self._current.get(name) == key:
            del self._current[name]
        self._known.add(key)
        task = self._inflight.get(key)
        if task is not None:
            await asyncio.wait({task})
        await self._sweep()

    async def _join(self, *, name: str, key: str, spec: ModelSpec) -> str:
        task = self._inflight.get(key)
        if task is None:
            self._names[key] = {name}
            task = asyncio.ensure_future(self._fetch_shared(key=key, spec=spec))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        else:
            self._stats["deduplicated"] += 1
            logger.info("model %s: joining the download already running for %s", name, spec.storage_uri)
            if name not in self._names[key]:
                self._names[key].add(name)
                if key in self._started:  # otherwise the first attempt tells every waiting name
                    await self._emit(name, "downloading", {"uri": spec.storage_uri, "shared": True})
        # One caller giving up must not cancel the download the others wait for.
        return await asyncio.shield(task)

    # -- what the cache keeps ----------------------------------------------------------------------------

    def _pin(self, key: str, name: str) -> list[float]:
        pin = [math.inf]
        self._pins.setdefault((key, name), []).append(pin)
        return pin

    def _unpin(self, key: str, name: str, pin: list[float] | None = None) -> None:
        pins = self._pins.get((key, name), [])
        if pin is None and pins:
            pin = min(pins, key=lambda p: p[0])  # the load that has been running longest
        if pin in pins:
            pins.remove(pin)
        if not pins:
            self._pins.pop((key, name), None)

    def _in_use(self, key: str) -> bool:
        now = time.monotonic()
        for (digest, name), pins in list(self._pins.items()):
            pins[:] = [p for p in pins if p[0] > now]  # a load that never released: its time is up
            if not pins:
                del self._pins[(digest, name)]
            elif digest == key:
                return True
        return key in self._inflight or key in self._removing

    async def _sweep(self) -> None:
        """Remove replaced entries, then the least recently fetched while over the quota (module docstring)."""
        wanted = set(self._current.values())
        for key in sorted(self._known - wanted):
            if not self._in_use(key):
                self._known.discard(key)
                await self._remove(key)
        quota = self._settings.artifact_cache_bytes
        if self._cache_bytes is not None and self._cache_bytes <= quota:
            return  # counted under the quota, plus what was downloaded since: no need to list the disk
        entries = await asyncio.to_thread(self._usage)
        self._cache_bytes = sum(size for _, _, size in entries)
        for _, key, _ in sorted(entries):
            if self._cache_bytes <= quota:
                break
            if not self._in_use(key):
                await self._remove(key)

    async def _remove(self, key: str) -> bool:
        if self._in_use(key):  # checked and registered with no await between: no fetch can slip in
            return False
        task = asyncio.ensure_future(asyncio.to_thread(self._remove_entry, self._root / key))
        self._removing[key] = task
        try:
            removed = await task
        finally:
            del self._removing[key]
        if removed is None:
            return False
        self._stats["entries_removed"] += 1
        if self._cache_bytes is not None:
            self._cache_bytes -= removed
        logger.info("removed cached artifact %s (%d bytes)", key, removed)
        return True

    def _usage(self) -> list[tuple[int, str, int]]:
        """(last fetch in ns, digest, bytes) of every complete entry; clears leftovers of removals."""
        rows = []
        try:
            entries = list(self._root.iterdir())
        except FileNotFoundError:
            return rows
        for entry in entries:
            if entry.name.startswith(".evicted-"):  # a removal interrupted after its rename
                shutil.rmtree(entry, ignore_errors=True)
                continue
            try:
                marker = entry / MARKER
                used = marker.stat().st_mtime_ns
                size = int(json.loads(marker.read_text())["bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            rows.append((used, entry.name, size))
        return rows

    # -- one download, shared by every caller of the same spec --------------------------------------------

    def _forget(self, key: str, task: asyncio.Task) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
            self._names.pop(key, None)
            self._started.discard(key)
        if not task.cancelled():
            task.exception()  # retrieved: the callers saw it, or nobody was left to care

    async def _fetch_shared(self, *, key: str, spec: ModelSpec) -> str:
        uri, entry = spec.storage_uri, self._root / key
        hit = await asyncio.to_thread(_read_marker, entry, touch=True)
        if hit is not None:
            self._stats["cache_hits"] += 1
            await self._emit_all(key, "downloaded", {"bytes": hit["bytes"], "seconds": 0.0, "cached": True})
            return hit["local_path"]
        attempts, started = self._settings.download_attempts, time.monotonic()
        for attempt in range(1, attempts + 1):
            cancel = threading.Event()
            try:
                async with self._slots:  # hold a slot only while transferring, not while backing off
                    result = await self._attempt(key=key, spec=spec, attempt=attempt, cancel=cancel)
                break
            except asyncio.TimeoutError:
                cancel.set()  # the abandoned thread stops at its next chunk and never renames into place
                error = StorageError(f"{uri}: attempt {attempt} timed out after "
                                     f"{self._settings.download_timeout_s}s", transient=True)
            except Exception as exc:  # StorageError as is; anything else (disk, marker) via the classifier
                error = storage.classify(exc, uri=uri)
            if not error.transient or attempt == attempts:
                self._stats["failures"] += 1
                reason = str(error) if attempt == 1 else f"{error} (after {attempt} attempts)"
                for name in self._names.get(key, ()):
                    logger.error("model %s: download failed: %s", name, reason)
                await self._emit_all(key, "failed", {"reason": reason, "attempts": attempt,
                                                     "transient": error.transient})
                raise StorageError(reason, transient=error.transient) from error
            delay = self._settings.download_backoff_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            self._stats["retries"] += 1
            for name in self._names.get(key, ()):
                logger.warning("model %s: attempt %d/%d failed (%s); retrying in %.2fs",
                               name, attempt, attempts, error, delay)
            await asyncio.sleep(delay)
        seconds = round(time.monotonic() - started, 3)
        cached = result["cached"]
        self._stats["cache_hits" if cached else "downloads_completed"] += 1
        self._stats["bytes"] += 0 if cached else result["bytes"]
        if not cached and self._cache_bytes is not None:
            self._cache_bytes += result["bytes"]
        for name in self._names.get(key, ()):
            logger.info("model %s: artifact ready at %s (%d bytes, %.3fs, cached=%s)",
                        name, result["local_path"], result["bytes"], seconds, cached)
        await self._emit_all(key, "downloaded", {"bytes": result["bytes"], "seconds": seconds, "cached": cached})
        return result["local_path"]

    async def _attempt(self, *, key: str, spec: ModelSpec, attempt: int, cancel: threading.Event) -> dict:
        self._stats["downloads_started"] += 1
        self._active += 1
        self._stats["peak_concurrent"] = max(self._stats["peak_concurrent"], self._active)
        try:
            if attempt == 1:
                self._started.add(key)
                await self._emit_all(key, "downloading", {"uri": spec.storage_uri})
            for name in self._names.get(key, ()):
                logger.info("model %s: downloading %s (attempt %d)", name, spec.storage_uri, attempt)
            return await asyncio.wait_for(
                asyncio.to_thread(self._fill_entry, spec=spec, entry=self._root / key, cancel=cancel),
                timeout=self._settings.download_timeout_s)
        finally:
            self._active -= 1

    def _fill_entry(self, *, spec: ModelSpec, entry: Path, cancel: threading.Event) -> dict:
        """Thread body: download into ``entry`` and write the marker last. Returns the marker (+cached)."""
        uri = spec.storage_uri
        entry.mkdir(parents=True, exist_ok=True)
        with _locked(entry / ".lock"):
            hit = _read_marker(entry, touch=True)  # another process may have filled it while we waited
            if hit is not None:
                return {**hit, "cached": True}
            (entry / MARKER).unlink(missing_ok=True)
            for leftover in entry.glob(".model*"):  # of an attempt killed mid-way; the lock says none runs now
                shutil.rmtree(leftover, ignore_errors=True)
            started = time.monotonic()
            path = storage.fetch(uri, entry / "model", settings=self._settings, cancel=cancel,
                                 sha256=spec.sha256)
            size = sum(f.stat().st_size for f in [path, *path.rglob("*")] if f.is_file())
            marker = {"uri": uri, "path": str(path.relative_to(entry)), "bytes": size,
                      "seconds": round(time.monotonic() - started, 3), "completed_at": time.time()}
            if spec.sha256:
                marker["sha256"] = spec.sha256
            tmp = entry / f"{MARKER}.{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, entry / MARKER)
            _touch(entry / MARKER)
            return {**marker, "local_path": str(path), "cached": False}

    def _remove_entry(self, entry: Path) -> int | None:
        """Thread body: remove ``entry`` unless another process holds its lock (it is filling it). Returns
        the bytes its marker counted (0 for an incomplete entry), ``None`` when nothing was removed."""
        if not entry.exists():
            return None
        with _locked(entry / ".lock", wait=False) as held:
            if not held:
                return None
            marker = _read_marker(entry)
            (entry / MARKER).unlink(missing_ok=True)  # first: a half-removed entry never looks complete
            trash = entry.with_name(f".evicted-{entry.name}-{uuid.uuid4().hex[:8]}")
            os.replace(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return int(marker.get("bytes", 0)) if marker else 0

    # -- events ----------------------------------------------------------------------------------------------

    async def _emit_all(self, key: str, event: str, detail: dict) -> None:
        for name in sorted(self._names.get(key, ())):
            await self._emit(name, event, detail)

    async def _emit(self, name: str, event: str, detail: dict) -> None:
        if self._on_event is None:
            return
        try:
            result = self._on_event(name, event, detail)
            if inspect.isawaitable(result):
                await result
        except Exception:  # a broken listener must not fail the download
            logger.exception("model %s: on_event(%s) raised", name, event)


def _read_marker(entry: Path, *, touch: bool = False) -> dict | None:
    """The marker of a complete entry whose artifact still exists, else ``None``. ``touch`` records a use
    (the marker's modification time orders entries for removal above the quota)."""
    try:
        marker = json.loads((entry / MARKER).read_text())
        path = entry / marker["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not path.exists():
        return None
    if touch:
        _touch(entry / MARKER)
    return {**marker, "local_path": str(path)}


def _touch(marker: Path) -> None:
    """Record a use: the marker's modification time, from the nanosecond clock (the file system's own
    timestamps can be milliseconds coarse, which would leave entries fetched in a row unordered)."""
    now = time.time_ns()
    with contextlib.suppress(OSError):
        os.utime(marker, ns=(now, now))


@contextlib.contextmanager
def _locked(path: Path, *, wait: bool = True):
    """Hold ``path``'s flock; yields whether it is held (``wait=False`` gives up at once when it is taken)."""
    with open(path, "a") as handle:
        if fcntl is None:
            yield True
            return
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
