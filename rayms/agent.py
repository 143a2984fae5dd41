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
    <cache_dir>/artifacts/<digest>/.complete    JSON {uri, path, bytes, seconds, completed_at}, written last
    <cache_dir>/artifacts/<digest>/.lock        flock held while filling the entry (agents in two processes)

Plain asyncio with no Ray import: the node's actor is this class under ``ray.remote`` (:mod:`rayms.cluster.agent`). Blocking fsspec work runs in
threads (``asyncio.to_thread``); each download builds its own filesystem object, so none is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
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
        self._active = 0
        self._stats = dict.fromkeys(
            ("downloads_started", "downloads_completed", "bytes", "peak_concurrent", "cache_hits",
             "deduplicated", "retries", "failures"), 0)

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

    async def evict(self, name: str, spec: ModelSpec) -> None:
        """Remove ``spec``'s cache entry (after any download of it ends). Never touches in-place sources."""
        task = self._inflight.get(spec.digest())
        if task is not None:
            await asyncio.wait({task})
        if await asyncio.to_thread(self._remove_entry, self.entry(spec)):
            logger.info("model %s: removed cached artifact of %s", name, spec.storage_uri)

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
        hit = await asyncio.to_thread(_read_marker, entry)
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
                asyncio.to_thread(self._fill_entry, uri=spec.storage_uri, entry=self._root / key, cancel=cancel),
                timeout=self._settings.download_timeout_s)
        finally:
            self._active -= 1

    def _fill_entry(self, *, uri: str, entry: Path, cancel: threading.Event) -> dict:
        """Thread body: download into ``entry`` and write the marker last. Returns the marker (+cached)."""
        entry.mkdir(parents=True, exist_ok=True)
        with _locked(entry / ".lock"):
            hit = _read_marker(entry)  # another process may have filled it while we waited for the lock
            if hit is not None:
                return {**hit, "cached": True}
            (entry / MARKER).unlink(missing_ok=True)
            started = time.monotonic()
            path = storage.fetch(uri, entry / "model", settings=self._settings, cancel=cancel)
            size = sum(f.stat().st_size for f in [path, *path.rglob("*")] if f.is_file())
            marker = {"uri": uri, "path": str(path.relative_to(entry)), "bytes": size,
                      "seconds": round(time.monotonic() - started, 3), "completed_at": time.time()}
            tmp = entry / f"{MARKER}.{uuid.uuid4().hex[:8]}"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, entry / MARKER)
            return {**marker, "local_path": str(path), "cached": False}

    def _remove_entry(self, entry: Path) -> bool:
        if not entry.exists():
            return False
        with _locked(entry / ".lock"):
            (entry / MARKER).unlink(missing_ok=True)  # first: a half-removed entry never looks complete
            trash = entry.with_name(f".evicted-{entry.name}-{uuid.uuid4().hex[:8]}")
            os.replace(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
        return True

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


def _read_marker(entry: Path) -> dict | None:
    """The marker of a complete entry whose artifact still exists, else ``None``."""
    try:
        marker = json.loads((entry / MARKER).read_text())
        path = entry / marker["path"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return {**marker, "local_path": str(path)} if path.exists() else None


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as handle:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield
