"""Adaptive batching: requests for one model that are waiting at the same moment run as one predict call.

A small tabular model spends little of a request's time in its own arithmetic; much of a predict call is the
library's fixed cost per call (input checks, thread-pool dispatch, building the output). Under concurrency a
replica receives requests for the same model while it is busy with another one, and running those together
pays that fixed cost once.

"Adaptive" means that a request never waits for company it is not going to get: with
``max_batch_latency_ms`` 0 (the default) a batch is whatever queued up for the model while the replica was
busy, gathered within a few turns of the event loop. A positive latency lets the first request of a batch
wait up to that long for more, for models where one call on many rows is much cheaper than many calls.

Only requests that agree on input names, dtypes, trailing shapes, parameters and requested outputs share a
batch; each request's rows stay whole. Outputs are split back by row counts, so a model whose outputs do not
have one row per input row is run request by request instead, and so is a batch that fails: a bad request
never fails its neighbours.

A model asks for batching with parameters in its spec (``{"max_batch_size": 32}``); ``Settings`` holds the
default for models that say nothing (off: a model that cannot take rows from several clients at once must
never see them).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from rayms.errors import InvalidSpec

logger = logging.getLogger("rayms.replica")

BATCH_PARAMETERS = ("max_batch_size", "max_batch_latency_ms")
MAX_LATENCY_MS = 1000.0
GATHER_TURNS = 4  # event-loop turns a batch keeps gathering while requests are still arriving

Predict = Callable[[list[np.ndarray], Mapping[str, Any], "Sequence[str] | None", "Sequence[str] | None"],
                   Awaitable[dict[str, np.ndarray]]]
"""One predict call of the model (the host runs it off the event loop, with a deadline)."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 1
    """Most rows one predict call takes; 1 turns batching off."""
    max_latency_s: float = 0.0
    """Longest the first request of a batch waits for others (0: only those already waiting join)."""

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1


def split_parameters(parameters: Mapping[str, Any], default: BatchPolicy) -> tuple[BatchPolicy, dict[str, Any]]:
    """The batching policy a model's parameters ask for (over ``default``), and its other parameters."""
    rest = {k: v for k, v in parameters.items() if k not in BATCH_PARAMETERS}
    size = parameters.get("max_batch_size", default.max_batch_size)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InvalidSpec(f"parameter 'max_batch_size' must be a whole number of rows, at least 1; got {size!r}")
    latency_ms = parameters.get("max_batch_latency_ms", default.max_latency_s * 1000)
    if isinstance(latency_ms, bool) or not isinstance(latency_ms, int | float) or not 0 <= latency_ms <= MAX_LATENCY_MS:
        raise InvalidSpec(f"parameter 'max_batch_latency_ms' must be a number of milliseconds from 0 to "
                          f"{MAX_LATENCY_MS:.0f}; got {latency_ms!r}")
    return BatchPolicy(max_batch_size=size, max_latency_s=latency_ms / 1000), rest


@dataclass(slots=True)
class _Waiting:
    inputs: list[np.ndarray]
    rows: int
    future: asyncio.Future


class Batcher:
    """Batches the predict calls of one loaded model (see the module's description). Not thread-safe: all
    calls come from the replica's event loop (the predict calls themselves may run elsewhere)."""

    def __init__(self, predict: Predict, policy: BatchPolicy) -> None:
        self._predict = predict
        self._policy = policy
        self._queues: dict[Hashable, list[_Waiting]] = {}
        self._full: dict[Hashable, asyncio.Event] = {}
        self.batches = 0  # predict calls that served more than one request
        self.batched_requests = 0  # requests served by those calls

    async def predict(self, inputs: list[np.ndarray], parameters: Mapping[str, Any],
                      requested: Sequence[str] | None, input_names: Sequence[str] | None) -> dict[str, np.ndarray]:
        key = _batch_key(inputs, parameters, requested, input_names)
        rows = inputs[0].shape[0] if key is not None else 0
        if key is None or rows >= self._policy.max_batch_size:
            return await self._predict(inputs, parameters, requested, input_names)
        loop = asyncio.get_running_loop()
        waiting = _Waiting(inputs=inputs, rows=rows, future=loop.create_future())
        queue = self._queues.get(key)
        if queue is None:
            self._queues[key] = [waiting]
            self._full[key] = asyncio.Event()
            loop.create_task(self._drain(key, parameters, requested, input_names))
        else:
            queue.append(waiting)
            if sum(w.rows for w in queue) >= self._policy.max_batch_size:
                self._full[key].set()
        return await waiting.future

    async def _drain(self, key: Hashable, parameters: Mapping[str, Any], requested: Sequence[str] | None,
                     input_names: Sequence[str] | None) -> None:
        try:
            await self._gather(key)
            while True:
                queue = self._queues[key]
                batch, rows = [], 0
                for waiting in queue:
                    if batch and rows + waiting.rows > self._policy.max_batch_size:
                        break
                    batch.append(waiting)
                    rows += waiting.rows
                await self._run(batch, parameters, requested, input_names)
                rest = queue[len(batch):]
                if not rest:
                    return
                self._queues[key] = rest
                await asyncio.sleep(0)  # let the loop breathe between batches
        except BaseException as exc:  # never leave a caller waiting
            for waiting in self._queues.get(key, ()):
                if not waiting.future.done():
                    waiting.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(str(exc)))
            if not isinstance(exc, Exception):
                raise
        finally:
            self._queues.pop(key, None)
            self._full.pop(key, None)

    async def _gather(self, key: Hashable) -> None:
        """Let requests that are already on their way join the first one."""
        full = self._full[key]
        if self._policy.max_latency_s > 0:
            try:
                await asyncio.wait_for(full.wait(), timeout=self._policy.max_latency_s)
            except asyncio.TimeoutError:
                pass
            return
        seen = 0
        for _ in range(GATHER_TURNS):
            queue = self._queues[key]
            if full.is_set() or (len(queue) == seen and seen > 1):
                return
            seen = len(queue)
            await asyncio.sleep(0)

    async def _run(self, batch: list[_Waiting], parameters: Mapping[str, Any], requested: Sequence[str] | None,
                   input_names: Sequence[str] | None) -> None:
        live = [w for w in batch if not w.future.done()]  # a client that went away is not predicted for
        if len(live) > 1:
            total = sum(w.rows for w in live)
            try:
                stacked = [np.concatenate([w.inputs[i] for w in live]) for i in range(len(live[0].inputs))]
                outputs = await self._predict(stacked, parameters, requested, input_names)
                if any(np.ndim(v) == 0 or len(v) != total for v in outputs.values()):
                    raise ValueError("outputs do not have one row per input row")
            except Exception as exc:
                logger.debug("batch of %d requests runs one by one: %s", len(live), exc)
            else:
                self.batches += 1
                self.batched_requests += len(live)
                offset = 0
                for waiting in live:
                    end = offset + waiting.rows
                    waiting.future.set_result({name: value[offset:end] for name, value in outputs.items()})
                    offset = end
                return
        for waiting in live:
            try:
                result = await self._predict(waiting.inputs, parameters, requested, input_names)
            except Exception as exc:
                if not waiting.future.done():
                    waiting.future.set_exception(exc)
            else:
                if not waiting.future.done():
                    waiting.future.set_result(result)


def _batch_key(inputs: list[np.ndarray], parameters: Mapping[str, Any], requested: Sequence[str] | None,
               input_names: Sequence[str] | None) -> Hashable | None:
    """What requests must agree on to share a batch; None when this one cannot be batched at all."""
    if not inputs or any(not isinstance(a, np.ndarray) or a.ndim == 0 for a in inputs):
        return None
    rows = inputs[0].shape[0]
    if rows == 0 or any(a.shape[0] != rows for a in inputs):
        return None
    try:
        frozen = orjson.dumps(dict(parameters), option=orjson.OPT_SORT_KEYS) if parameters else b""
    except TypeError:
        return None
    return (tuple(input_names or ()), tuple((a.dtype.str, a.shape[1:]) for a in inputs), frozen,
            tuple(requested or ()))
