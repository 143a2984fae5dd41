"""Errors and statuses cross Ray process boundaries pickled: each must come back equal, with its message and
status; and the one rule for remote exceptions gives back the rayms error a client should see."""

from __future__ import annotations

import inspect
import pickle

import pytest
from ray.exceptions import ActorDiedError, RayTaskError
from ray.serve.exceptions import BackPressureError

from rayms import errors
from rayms.cluster.remote import as_rayms_error
from rayms.config import ModelSpec
from rayms.status import Changes, LoadReport, ModelState, ModelStatus, ReplicaReport, ResidentModel, Source

ERROR_CLASSES = [c for _, c in inspect.getmembers(errors, inspect.isclass)
                 if issubclass(c, errors.RaymsError) and c.__module__ == errors.__name__]
ARGUMENTS = {errors.ModelNotFound: ("m", "3"), errors.ModelNotReady: ("m", "LOADING", "downloading"),
             errors.StorageError: ("s3://b/k: 503", True)}


def test_every_error_class_is_covered():
    assert len(ERROR_CLASSES) >= 15 and errors.RaymsError in ERROR_CLASSES


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_every_error_survives_pickling(cls):
    error = cls(*ARGUMENTS.get(cls, ("model m: something went wrong",)))
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls
    assert (str(again), again.args, again.status_code) == (str(error), error.args, error.status_code)
    assert 400 <= again.status_code < 600


def test_statuses_survive_pickling():
    spec = ModelSpec(storage_uri="s3://b/m.joblib", framework="sklearn", memory="64Mi", parameters={"x": 1})
    status = ModelStatus(name="m", version=3, state=ModelState.READY, source=Source.KUBERNETES, spec=spec,
                         replicas=("r1",), metadata={"inputs": []}, updated_at=1.5)
    changes = Changes(epoch="e", change=7, reset=False, models=[status], deleted=["gone"])
    report = ReplicaReport(replica="r1", node="n", models={"m": ResidentModel(version=3, charged_bytes=1,
                                                                            measured_bytes=1)},
                           used_bytes=1, budget_bytes=2, evictions=0)
    for value in (status, changes, report, LoadReport(replica="r1", measured_bytes=1, load_time_s=0.1, metadata={})):
        assert pickle.loads(pickle.dumps(value)) == value
    assert pickle.loads(pickle.dumps(status)).version == 3


def test_a_rayms_error_raised_in_another_process_comes_back_as_itself():
    original = errors.ModelNotFound("m")
    wrapped = RayTaskError("load_model", "Traceback ...", original)
    assert as_rayms_error(wrapped) is original
    # What an awaited call raises: Ray's subclass of both RayTaskError and the original's class.
    assert as_rayms_error(wrapped.as_instanceof_cause()) is original


def test_ray_refusals_and_deaths_are_retryable_and_foreign_errors_lose_ray_traceback():
    assert as_rayms_error(BackPressureError(num_queued_requests=5, max_queued_requests=5)).status_code == 503
    assert as_rayms_error(ActorDiedError()).status_code == 503
    foreign = as_rayms_error(RayTaskError("predict", "Traceback (most recent call last): ...", KeyError("x")))
    assert type(foreign) is errors.RaymsError and str(foreign) == "KeyError: 'x'"
    assert as_rayms_error(errors.InvalidInput("bad")).status_code == 400
