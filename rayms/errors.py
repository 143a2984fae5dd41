"""One error hierarchy for the whole server.

Every failure a client can cause or observe is a :class:`RaymsError` that carries its HTTP status. The
router turns any of them into ``{"error": "<message>"}`` with that status, so no handler formats errors
itself. Errors travel between Ray processes (replica -> router, agent -> replica), so each class keeps its
constructor arguments in ``args`` and formats its message in ``__str__``: that is what makes them survive
pickling unchanged. Standard library only.
"""

from __future__ import annotations


class RaymsError(Exception):
    """Base class. ``status_code`` is the HTTP status the router answers with."""

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


class MemoryUnavailable(RaymsError):
    """The model declares more memory than one replica's model-memory budget."""

    status_code = 400


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
