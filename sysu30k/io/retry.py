"""Retrying storage operations: transient faults are retried with backoff, permanent ones fail fast.

Object stores drop connections, answer 5xx and throttle; a 29.6 M-image run must ride through that.
Bad credentials, a missing bucket or a missing file are not going to get better and are raised at once.
"""

from __future__ import annotations

import errno
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger("sysu30k")
T = TypeVar("T")

_PERMANENT = (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
              ValueError, TypeError, KeyError)
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ETIMEDOUT,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO, errno.EAGAIN}
_TRANSIENT_WORDS = ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable",
                    "503", "500", "502", "504", "Connection", "connection", "timed out", "Timeout",
                    "IncompleteRead", "reset by peer", "Server disconnected", "Broken pipe")


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``attempts`` tries per operation, sleeping base·2^k (capped, jittered) in between."""

    attempts: int = 6
    base: float = 0.25
    cap: float = 20.0


def is_transient(exc: BaseException) -> bool:
    """True for faults worth retrying (connection drops, timeouts, 5xx, throttling)."""
    if isinstance(exc, _PERMANENT):
        return False
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
        return True
    return any(w in f"{type(exc).__name__} {exc}" for w in _TRANSIENT_WORDS)


def retry(fn: Callable[[], T], what: str, policy: RetryPolicy = RetryPolicy()) -> T:
    """``fn()`` with retries of transient failures; the last failure (or a permanent one) is raised."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == policy.attempts or not is_transient(exc):
                raise
            delay = min(policy.cap, policy.base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            log.warning("retrying %s in %.1fs after %s: %s (%d/%d)", what, delay, type(exc).__name__,
                        str(exc).splitlines()[0] if str(exc) else "", attempt, policy.attempts - 1)
            time.sleep(delay)
    raise AssertionError("unreachable")
