"""One error hierarchy for the whole server.

Every failure a client can cause or observe is a :class:`RaymsError` that carries its HTTP status. The
HTTP layer turns any of them into ``{"error": "<message>"}`` with that status, so no handler formats errors
itself. Errors travel between Ray processes (replica -> registry, agent -> replica), so each class keeps its
constructor arguments in ``args`` and formats its message in ``__str__``: that is what makes them survive
pickling unchanged; :func:`rayms.cluster.remote.as_rayms_error` gives them back on the calling side.
Standard library only.
"""

from __future__ import annotations


class RaymsError(Exception):
    """Base class. ``status_code`` is the HTTP status a client gets for it."""

    status_code = 500

    def __init__(self, *args: object) -> None:
        super().__init__(*args)

    @property
    def message(self) -> str:
        return str(self)

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class InvalidInput(RaymsError):
    """The request is malformed: bad JSON, wrong datatype, shape that does not match the data."""

    status_code = 400


class ModelNotFound(RaymsError):
    """No model of that name (or version) is registered."""

    status_code = 404

    def __init__(self, name: str, version: str | None = None) -> None:
        super().__init__(name, version)

    def __str__(self) -> str:
        name, version = self.args
        if version is not None:
            return f"Model {name} version {version} not found"
        return f"Model {name} not found"


class ModelNotReady(RaymsError):
    """The model is registered but cannot answer yet (downloading, loading, failed, unloading)."""

    status_code = 503

    def __init__(self, name: str, state: str, reason: str = "") -> None:
        super().__init__(name, state, reason)

    def __str__(self) -> str:
        name, state, reason = self.args
        text = f"Model {name} is not ready (state {state})"
        return f"{text}: {reason}" if reason else text


class Overloaded(RaymsError):
    """Too many requests are queued; the client should retry after a short pause."""

    status_code = 503


class NotSupported(RaymsError):
    """A feature of the protocol that this server does not implement."""

    status_code = 501


class PayloadTooLarge(RaymsError):
    """The request body is larger than the configured limit."""

    status_code = 413


class InvalidSpec(RaymsError):
    """A model spec cannot be accepted: unknown framework, bad storage URI, bad memory quantity."""

    status_code = 400


class UnsupportedFramework(InvalidSpec):
    """A spec names a framework rayms does not serve. Its own class so the Kubernetes bridge can report it
    under the ``FrameworkSupported`` condition."""

    def __init__(self, framework: object, supported: tuple[str, ...] = (), model: str = "") -> None:
        super().__init__(framework, tuple(supported), model)

    def __str__(self) -> str:
        framework, supported, model = self.args
        text = f"model {model}: " if model else ""
        text += f"framework {framework!r} is not supported"
        return f"{text}; use one of {', '.join(supported)}" if supported else text


class MemoryUnavailable(InvalidSpec):
    """The model declares more memory than one replica's model-memory budget."""


class StorageError(RaymsError):
    """Fetching an artifact failed. ``transient`` says whether a retry may succeed."""

    status_code = 500

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message, transient)

    @property
    def transient(self) -> bool:
        return bool(self.args[1]) if len(self.args) > 1 else False

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "storage error"


class ModelLoadError(RaymsError):
    """The framework could not load the artifact; the message is the framework's."""

    status_code = 500


class InferenceError(RaymsError):
    """The model raised while predicting."""

    status_code = 500


class InvalidMemory(InvalidSpec):
    """The spec's ``memory`` is not a byte quantity (a TrainedModel's ``MemoryResourceAvailable``)."""


class LoadTimedOut(RaymsError):
    """A load did not settle (READY or FAILED) within ``load_timeout_s``; it may still finish."""

    status_code = 504


class ModelLoadFailed(RaymsError):
    """A repository load ended FAILED. The repository extension answers load failures with 400."""

    status_code = 400


class PredictTimedOut(RaymsError):
    """A predict call ran longer than ``predict_timeout_s``; the request is answered without waiting for it."""

    status_code = 504


class Unauthorized(RaymsError):
    """The request needs a credential it did not carry (or carried a wrong one)."""

    status_code = 401


class Forbidden(RaymsError):
    """The request is understood and refused on this server: a storage location outside what is allowed,
    or loading through the API with the control API off."""

    status_code = 403


class Conflict(RaymsError):
    """The model belongs to another owner (a TrainedModel) and the request did not force the change."""

    status_code = 409


class RequestTimeout(RaymsError):
    """The client did not send its whole request body in time."""

    status_code = 408


class ScoringError(RaymsError):
    """Batch scoring stopped: a missing column, an unknown model, a row of the wrong width, or a model that
    cannot load or predict. The message names where (file and row) and which model."""

    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        # Ray Data appends its retry advice to the first argument of an error leaving a worker. The message
        # kept here travels in the instance's __dict__, which unpickling restores after the arguments.
        self.text = message

    def __str__(self) -> str:
        return getattr(self, "text", None) or super().__str__()
