"""Predict calls off the replica's event loop, each with a deadline, so one slow or hung model cannot stall
the others on its replica, its health check or its registry watch.

Every predict runs in a small thread pool of the replica's (``predict_threads``). A model may hold at most
half of those threads at once, so a model whose calls hang can never take all of them. A request whose
predict runs longer than ``predict_timeout_s`` is answered 504 at that moment; the thread finishes (or hangs)
on its own, still counted against its model's share, because Python cannot stop a running thread. A model
whose calls overrun ``quarantine_after`` times in a row is quarantined: ``on_quarantine`` is told (the host
marks it FAILED with the reason) and it is refused from then on, instead of hanging thread after thread.

A request that waits that long for one of its model's threads is answered 503 (retryable): the model is busy,
not broken. Plain asyncio and :mod:`concurrent.futures`; no Ray.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from rayms.errors import ModelNotReady, Overloaded, PredictTimedOut

logger = logging.getLogger("rayms.replica")

T = TypeVar("T")
QuarantineFn = Callable[[str, str], None]


class PredictRunner:
    """Runs the predict calls of one replica's models in threads, with a deadline per call."""

    def __init__(self, *, threads: int, timeout_s: float, quarantine_after: int,
                 on_quarantine: QuarantineFn | None = None) -> None:
        # threads=0: predict inline, on the event loop (no deadline, no isolation: the operator's choice)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rayms-predict") if threads else None
        self._per_model = max(1, threads // 2)
        self._timeout_s = timeout_s
        self._quarantine_after = quarantine_after
        self._on_quarantine = on_quarantine
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._overruns: dict[str, int] = {}
        self.quarantined: dict[str, str] = {}  # model -> why

    async def run(self, model: str, call: Callable[[], T]) -> T:
        """``call()`` in a thread; :class:`PredictTimedOut` (504) when it overruns the deadline."""
        self.check(model)
        if self._executor is None:
            return call()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        slots = self._slots.get(model)
        if slots is None:
            slots = self._slots[model] = asyncio.Semaphore(self._per_model)
        if slots.locked():  # all of the model's threads busy: wait for one, up to the deadline
            try:
                async with asyncio.timeout_at(deadline):
                    await slots.acquire()
            except TimeoutError:
                raise Overloaded(f"model {model}: all {self._per_model} of its predict threads are busy; "
                                 "retry shortly") from None
        else:
            await slots.acquire()  # free: no wait
        try:
            work = self._executor.submit(call)
        except BaseException:
            slots.release()
            raise
        # The model's thread is given back when the call really ends, not when the caller stops waiting.
        work.add_done_callback(lambda _: loop.call_soon_threadsafe(slots.release))
        try:
            async with asyncio.timeout_at(deadline):
                result = await asyncio.wrap_future(work)
        except TimeoutError:
            raise self._overran(model) from None
        self._overruns.pop(model, None)
        return result

    def check(self, model: str) -> None:
        """Refuse a quarantined model (before anything is loaded for it)."""
        if model in self.quarantined:
            raise ModelNotReady(model, "FAILED", self.quarantined[model])

    def forget(self, model: str) -> None:
        """A model loaded again (or unloaded) starts with a clean record."""
        self.quarantined.pop(model, None)
        self._overruns.pop(model, None)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _overran(self, model: str) -> PredictTimedOut:
        count = self._overruns.get(model, 0) + 1
        self._overruns[model] = count
        logger.warning("model %s: predict overran %.3gs (%d in a row)", model, self._timeout_s, count)
        if count >= self._quarantine_after and model not in self.quarantined:
            reason = (f"quarantined: {count} predict calls in a row ran longer than {self._timeout_s:g}s; "
                      "load it again to retry")
            self.quarantined[model] = reason
            logger.error("model %s: %s", model, reason)
            if self._on_quarantine is not None:
                self._on_quarantine(model, reason)
        return PredictTimedOut(f"model {model}: predict did not finish within {self._timeout_s:g}s")
