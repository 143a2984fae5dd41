"""A local, pushed copy of the registry's model table.

Every ingress replica and the Kubernetes bridge keep one, so answering "does this model exist, which version,
is it ready" costs a dict lookup instead of a round-trip to the registry. The copy is kept current by a long
poll (:meth:`rayms.registry.ModelRegistry.watch`): the registry answers as soon as something changes, or after
a timeout with nothing. If the registry restarts, the next answer carries a new epoch and the whole table,
and the copy is replaced. While the registry is unreachable the copy keeps its last state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from rayms.status import Changes, ModelStatus

logger = logging.getLogger("rayms.view")

WatchFn = Callable[[str | None, int, float], Awaitable[Changes]]
UpdateFn = Callable[[list[str], list[str]], None]


class RegistryView:
    """``models[name]`` is the registry's :class:`~rayms.status.ModelStatus` of ``name``; absent means not
    registered. ``on_update(changed, removed)`` is called with the names each answer touched."""

    def __init__(self, watch: WatchFn, *, on_update: UpdateFn | None = None) -> None:
        self._watch = watch
        self._listeners: list[UpdateFn] = [on_update] if on_update is not None else []
        self.models: dict[str, ModelStatus] = {}
        self._epoch: str | None = None
        self._change = 0
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None

    def add_listener(self, on_update: UpdateFn) -> None:
        """Also call ``on_update(changed, removed)`` after every answer."""
        self._listeners.append(on_update)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def apply(self, answer: Changes) -> None:
        """Fold one watch answer into the table (work proportional to the answer, except on a reset)."""
        if answer.reset:
            present = {status.name for status in answer.models}
            removed = [name for name in self.models if name not in present]
            self.models = {}
        else:
            removed = [name for name in answer.deleted if name in self.models]
            for name in removed:
                del self.models[name]
        for status in answer.models:
            self.models[status.name] = status
        self._epoch, self._change = answer.epoch, answer.change
        self.synced.set()
        if self._listeners:
            changed = [status.name for status in answer.models]
            for listener in self._listeners:
                listener(changed, removed)

    def note(self, status: ModelStatus) -> None:
        """Take one model's status learnt directly from the registry, unless the view already has newer."""
        current = self.models.get(status.name)
        if current is None or status.updated_at >= current.updated_at:
            self.models[status.name] = status

    def forget(self, name: str) -> None:
        """Drop a model the registry confirmed it removed (the long poll will say so too)."""
        self.models.pop(name, None)

    async def refresh(self) -> None:
        """Fetch whatever changed since the last answer, without waiting for news."""
        self.apply(await self._watch(self._epoch, self._change, 0.0))

    async def _run(self) -> None:
        backoff = 0.05
        while True:
            try:
                answer = await self._watch(self._epoch, self._change, 30.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the registry is restarting: keep the last view, retry
                logger.warning("registry watch failed (%s); retrying in %.2fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            self.apply(answer)
