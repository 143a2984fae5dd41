"""The one rule for errors that cross a Ray process boundary.

A :class:`~rayms.errors.RaymsError` raised in another process (a replica, the registry, an agent) arrives
wrapped by Ray (``RayTaskError``, whose ``cause`` is the original, pickled with its arguments). Serve's own
refusals and a dead actor arrive as Ray's exceptions. Every handle and actor call in :mod:`rayms.cluster`
goes through :func:`call`, so what leaves this package is always a RaymsError a client can be shown.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError

from rayms.errors import Overloaded, RaymsError

T = TypeVar("T")


def as_rayms_error(exc: BaseException) -> RaymsError:
    """The rayms error that ``exc``, raised by a call into another Ray process, stands for."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RaymsError):  # first: Ray raises RayTaskError(<cause's class>), a RaymsError whose
        return cause                   # text is Ray's traceback
    if isinstance(exc, RaymsError):
        return exc
    if isinstance(exc, BackPressureError):
        return Overloaded("too many requests in flight; retry shortly")
    if isinstance(exc, (ActorDiedError, ActorUnavailableError, RayActorError)):
        return Overloaded("a rayms replica is restarting; retry shortly")
    if isinstance(exc, RayTaskError) and isinstance(cause, BaseException):
        # Something that is not a rayms error failed over there: its type and message, not Ray's traceback.
        return RaymsError(f"{type(cause).__name__}: {cause}")
    return RaymsError(f"{type(exc).__name__}: {exc}")


async def call(awaitable: Awaitable[T]) -> T:
    """Await a handle or actor call; whatever it raises leaves as :func:`as_rayms_error` of it."""
    try:
        return await awaitable
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise as_rayms_error(exc) from exc
