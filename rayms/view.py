"""A local, pushed copy of the registry's model table.

The router and every replica keep one, so answering "does this model exist, which version, is it ready"
costs a dict lookup instead of a round-trip to the registry actor. The copy is kept current by a long
poll (:meth:`rayms.registry.ModelRegistry.watch`): the registry answers as soon as something changes,
or after a timeout with nothing. If the registry restarts, the next answer carries a new epoch and
the whole table, and the copy is replaced.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

logger = logging.getLogger("rayms.view")

WatchFn = Callable[[str | None, int], Awaitable[dict[str, Any]]]


class RegistryView:
    """``models[name]`` is the registry's status dict for ``name``; absent means not registered."""

    def __init__(self, watch: WatchFn, *, on_update: Callable[[list[str], list[str]], None] | None = None) -> None:
        self._watch = watch
        self._on_update = on_update
        self.models: dict[str, dict[str, Any]] = {}
        self._epoch: str | None = None
        self._change = 0
        self.synced = asyncio.Event()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def apply(self, answer: dict[str, Any]) -> None:
        """Fold one watch answer into the table."""
        if answer["reset"]:
            removed = [n for n in self.models if n not in {m["name"] for m in answer["models"]}]
            self.models = {}
        else:
            removed = [n for n in answer["deleted"] if n in self.models]
        for name in answer["deleted"]:
            self.models.pop(name, None)
        for name in removed:
            self.models.pop(name, None)
        for status in answer["models"]:
            self.models[status["name"]] = status
        self._epoch, self._change = answer["epoch"], answer["change"]
        self.synced.set()
        if self._on_update is not None:
            self._on_update([m["name"] for m in answer["models"]], removed)

    def note(self, status: dict[str, Any]) -> None:
        """Take one model's status learnt directly from the registry, unless the view already has newer."""
        current = self.models.get(status["name"])
        if current is None or status.get("updatedAt", 0) >= current.get("updatedAt", 0):
            self.models[status["name"]] = status

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
