"""Adaptive batching in-process: which requests share a predict call, and what each caller gets back."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from rayms.batching import Batcher, BatchPolicy, split_parameters
from rayms.errors import InvalidInput, InvalidSpec


class Model:
    """Predicts each row's sum; records the row count of every call. Rows holding -1 are refused."""

    def __init__(self, per_row: bool = True) -> None:
        self.calls: list[int] = []
        self.per_row = per_row

    async def __call__(self, inputs, parameters, requested, input_names):
        matrix = inputs[0]
        self.calls.append(len(matrix))
        if (matrix == -1).any():
            raise InvalidInput("row holds -1")
        scale = parameters.get("scale", 1)
        if not self.per_row:
            return {"total": np.asarray(matrix.sum() * scale)}
        return {"predict": matrix.sum(axis=1) * scale}


def rows(*values: float, dtype=np.float64) -> list[np.ndarray]:
    return [np.array([[v, v] for v in values], dtype=dtype)]


async def together(batcher: Batcher, *requests, parameters=None):
    """Send every request in the same turn of the event loop, as concurrent clients would arrive."""
    return await asyncio.gather(*(batcher.predict(r, parameters or {}, None, ["x"]) for r in requests),
                                return_exceptions=True)


async def test_requests_waiting_together_share_one_call_and_get_their_own_rows():
    model = Model()
    answers = await together(Batcher(model, BatchPolicy(max_batch_size=32)), rows(1), rows(2, 3), rows(4))
    assert model.calls == [4]
    assert [a["predict"].tolist() for a in answers] == [[2.0], [4.0, 6.0], [8.0]]


async def test_a_batch_never_exceeds_the_row_limit_nor_splits_a_request():
    model = Model()
    batcher = Batcher(model, BatchPolicy(max_batch_size=4))
    answers = await together(batcher, *[rows(i) for i in range(9)], rows(10, 11, 12))
    assert model.calls == [4, 4, 4]  # in arrival order: 4 singles, 4 singles, the last single + the 3-row request
    assert [a["predict"].tolist() for a in answers][-1] == [20.0, 22.0, 24.0]
    assert (batcher.batches, batcher.batched_requests) == (3, 10)


async def test_only_requests_that_agree_share_a_batch():
    model = Model()
    batcher = Batcher(model, BatchPolicy(max_batch_size=32))
    answers = await asyncio.gather(
        batcher.predict(rows(1), {}, None, ["x"]), batcher.predict(rows(2), {"scale": 10}, None, ["x"]),
        batcher.predict(rows(3, dtype=np.float32), {}, None, ["x"]), batcher.predict(rows(4), {}, None, ["x"]))
    assert sorted(model.calls) == [1, 1, 2]  # parameters or dtype differ: separate calls
    assert [a["predict"].tolist() for a in answers] == [[2.0], [40.0], [6.0], [8.0]]


async def test_a_bad_request_fails_alone_and_its_neighbours_are_answered():
    model = Model()
    answers = await together(Batcher(model, BatchPolicy(max_batch_size=32)), rows(1), rows(-1), rows(3))
    assert [a["predict"].tolist() for a in (answers[0], answers[2])] == [[2.0], [6.0]]
    assert isinstance(answers[1], InvalidInput)


async def test_outputs_without_a_row_per_input_row_are_computed_request_by_request():
    model = Model(per_row=False)
    answers = await together(Batcher(model, BatchPolicy(max_batch_size=32)), rows(1), rows(2, 3))
    assert [a["total"].tolist() for a in answers] == [2.0, 10.0]


async def test_a_request_as_large_as_a_batch_and_a_lone_request_are_not_delayed_or_merged():
    model = Model()
    batcher = Batcher(model, BatchPolicy(max_batch_size=2))
    assert (await batcher.predict(rows(1, 2), {}, None, ["x"]))["predict"].tolist() == [2.0, 4.0]
    assert (await batcher.predict(rows(5), {}, None, ["x"]))["predict"].tolist() == [10.0]
    assert model.calls == [2, 1] and batcher.batches == 0


async def test_a_latency_window_waits_for_requests_that_arrive_later():
    model = Model()
    batcher = Batcher(model, BatchPolicy(max_batch_size=3, max_latency_s=5.0))
    first = asyncio.ensure_future(batcher.predict(rows(1), {}, None, ["x"]))
    await asyncio.sleep(0.01)
    second = asyncio.ensure_future(batcher.predict(rows(2), {}, None, ["x"]))
    await asyncio.sleep(0.01)
    assert model.calls == [] and not first.done()
    third = asyncio.ensure_future(batcher.predict(rows(3), {}, None, ["x"]))  # the batch is full: runs at once
    answers = await asyncio.wait_for(asyncio.gather(first, second, third), timeout=2)
    assert model.calls == [3] and [a["predict"].tolist() for a in answers] == [[2.0], [4.0], [6.0]]


async def test_a_caller_that_goes_away_does_not_disturb_the_others():
    model = Model()
    batcher = Batcher(model, BatchPolicy(max_batch_size=32, max_latency_s=5.0))
    gone = asyncio.ensure_future(batcher.predict(rows(1), {}, None, ["x"]))
    kept = asyncio.ensure_future(batcher.predict(rows(2), {}, None, ["x"]))
    await asyncio.sleep(0.01)
    gone.cancel()
    filler = [asyncio.ensure_future(batcher.predict(rows(9), {}, None, ["x"])) for _ in range(30)]
    answers = await asyncio.wait_for(asyncio.gather(kept, *filler), timeout=2)
    assert answers[0]["predict"].tolist() == [4.0] and model.calls == [31]


@pytest.mark.parametrize(("parameters", "policy"), [
    ({}, BatchPolicy()),
    ({"max_batch_size": 16, "predict_proba": True}, BatchPolicy(max_batch_size=16)),
    ({"max_batch_size": 8, "max_batch_latency_ms": 2.5}, BatchPolicy(max_batch_size=8, max_latency_s=0.0025)),
])
def test_batch_settings_come_out_of_the_model_parameters(parameters, policy):
    assert split_parameters(parameters, BatchPolicy()) == (policy, {k: v for k, v in parameters.items()
                                                                   if not k.startswith("max_batch")})


@pytest.mark.parametrize("parameters", [
    {"max_batch_size": 0}, {"max_batch_size": "8"}, {"max_batch_size": True}, {"max_batch_size": 2.5},
    {"max_batch_latency_ms": -1}, {"max_batch_latency_ms": 5000}, {"max_batch_latency_ms": "soon"},
])
def test_bad_batch_settings_are_refused_with_the_parameter_named(parameters):
    with pytest.raises(InvalidSpec, match=next(iter(parameters))):
        split_parameters(parameters, BatchPolicy())
