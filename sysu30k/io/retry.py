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
# errno values of transient faults; s3fs turns SlowDown, 503 and ServiceUnavailable into EBUSY, 500 into EREMOTEIO
_TRANSIENT_ERRNO = {errno.ECONNRESET, errno.ECONNABORTED, errno.ECONNREFUSED, errno.EPIPE, errno.ETIMEDOUT,
                    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EIO, errno.EAGAIN, errno.EBUSY,
                    getattr(errno, "EREMOTEIO", errno.EIO)}
# S3 error codes worth retrying (a botocore ClientError's response["Error"]["Code"])
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestThrottled", "RequestLimitExceeded",
                    "TooManyRequestsException", "RequestTimeout", "InternalError", "ServiceUnavailable"}
# Exception classes of the HTTP stacks under fsspec (botocore, aiohttp, urllib3, http.client), by name so that
# none of them has to be imported: dropped or refused connections, timeouts, truncated bodies.
_TRANSIENT_CLASSES = {"EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
                      "ResponseStreamingError", "IncompleteReadError", "IncompleteRead", "ClientConnectionError",
                      "ClientPayloadError", "ServerDisconnectedError", "ServerTimeoutError", "ProtocolError"}


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``attempts`` tries per operation, sleeping base·2^k (capped, jittered) in between."""

    attempts: int = 6
    base: float = 0.25
    cap: float = 20.0


def is_transient(exc: BaseException) -> bool:
    """True for faults worth retrying (connection drops, timeouts, 5xx, 429, throttling), judged by the
    exception's type, errno and HTTP status or S3 error code, never by its message (which can hold paths
    such as ``.../0000000500/...``). Follows the chain of causes (s3fs wraps botocore's errors)."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, _PERMANENT):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNO:
            return True
        if _TRANSIENT_CLASSES & {c.__name__ for c in type(exc).__mro__}:
            return True
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = response.get("Error", {}).get("Code")
            if code in _TRANSIENT_CODES or (isinstance(status, int) and (status >= 500 or status == 429)):
                return True
        exc, seen = exc.__cause__, seen + 1
    return False


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
