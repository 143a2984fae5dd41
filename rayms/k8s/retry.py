"""When the bridge tries a failed call again, and when it does not.

Kubernetes tells a client how to behave in its answers: 429 (API Priority and Fairness) and 503 come with a
``Retry-After`` to wait at least that long; 5xx, timeouts and broken connections are worth another try;
the other 4xx say the request itself is wrong (400, 422), not allowed (403) or aimed at nothing (404), and
repeating it cannot help. Retries back off exponentially to a cap, with jitter so that many objects failing
together do not come back together. Pure functions: no client, no I/O.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

from kubernetes.client.exceptions import ApiException

MAX_RETRY_AFTER_S = 300.0  # a Retry-After beyond this is taken as this (a clock or proxy gone wrong)

# 401: a rotated service-account token is re-read on the next call. 408/409/429: try again; a 409 on a status
# merge patch (which carries no resourceVersion) means the object changed meanwhile, and the patch still holds.
_RETRIED_4XX = frozenset({401, 408, 409, 429})


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: ``first_s``, doubling per attempt, never above ``cap_s``."""

    first_s: float
    cap_s: float

    def delay_s(self, attempt: int) -> float:
        """The wait before retry number ``attempt`` (1 for the first retry), between half and all of the step."""
        step = min(self.cap_s, self.first_s * 2 ** max(0, attempt - 1))
        return step * random.uniform(0.5, 1.0)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an API error; ``None`` for timeouts and connection errors."""
    return exc.status if isinstance(exc, ApiException) and exc.status else None


def retryable(exc: BaseException) -> bool:
    """Whether the same call may succeed later: timeouts, connection errors, 5xx, 401, 408, 409 and 429."""
    status = status_of(exc)
    return status is None or status >= 500 or status in _RETRIED_4XX


def retry_after_s(exc: BaseException, *, now: datetime | None = None) -> float | None:
    """The server's ``Retry-After`` in seconds (delta-seconds or an HTTP date), if the answer carried one."""
    headers = getattr(exc, "headers", None) if isinstance(exc, ApiException) else None
    value = headers.get("Retry-After") if headers else None
    if not value:
        return None
    value = str(value).strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        seconds = (when - (now or datetime.now(timezone.utc))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)
