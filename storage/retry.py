"""Retry of object-storage reads through transient outages: the one place that decides what is
retried, for how long, and what is raised when storage stays away.

botocore and s3fs already retry a few times within about a second; an object store that is
restarting, failing over or behind a flapping network is away for much longer. :func:`with_retry`
re-runs a read while it fails with a *connection* error (refused, reset, timed out, server
disconnected) with exponential backoff (0.2 s doubling, at most 5 s apart) for up to
``LOCALCL_STORAGE_RETRY_S`` seconds (default 120; ``0`` disables retrying), then raises
:class:`storage.errors.StorageUnavailableError` naming the URL. Anything else is raised at once:
a missing object, bad credentials, and above all :class:`storage.errors.CorruptDataError` (the
same bytes would fail their checksum again).

No retry library is a dependency of ``storage`` (tenacity is not installed; botocore's retry
config covers one request, not a minute-long outage), so this is a small loop.
"""

from __future__ import annotations

import os
import ssl
import time
from collections.abc import Callable
from typing import TypeVar

from storage.errors import StorageError, StorageUnavailableError

T = TypeVar("T")

#: Environment variable: seconds to keep retrying an unreachable object store.
RETRY_ENV = "LOCALCL_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 120.0
FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0


def retry_budget_s() -> float:
    """Seconds of retrying allowed by ``LOCALCL_STORAGE_RETRY_S`` (default 120)."""
    raw = os.environ.get(RETRY_ENV, "").strip()
    if not raw:
        return DEFAULT_RETRY_S
    try:
        value = float(raw)
    except ValueError:
        raise StorageError(f"{RETRY_ENV}={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise StorageError(f"{RETRY_ENV}={raw!r}: must be >= 0")
    return value


def transient_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the storage endpoint did not answer" (built-in connection
    errors and timeouts, and those of botocore, aiohttp and fsspec where installed)."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore import exceptions as bx

        found += [bx.ConnectionError, bx.HTTPClientError]  # endpoint refused/closed/timed out
    except ImportError:  # pragma: no cover - the s3 extra is not installed
        pass
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        found.append(FSTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(found)


def server_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` is an S3 error response that means "try later": HTTP 5xx (503 Service
    Unavailable from a restarting server or load balancer) or ``SlowDown``/``RequestTimeout``."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = response.get("Error", {}).get("Code")
    return (isinstance(status, int) and status >= 500) or code in ("SlowDown", "RequestTimeout", "ServiceUnavailable")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) is a connection error, a timeout or
    a "try later" response (:func:`server_unavailable`). A
    :class:`~storage.errors.StorageError` (corrupt data, missing case) never is, nor is a TLS
    error (a certificate problem does not heal by waiting)."""
    if isinstance(exc, StorageError):
        return False
    kinds = transient_types()
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError) or type(cur).__name__ == "SSLError":
            return False
        if isinstance(cur, kinds) or server_unavailable(cur):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def with_retry(
    fn: Callable[[], T],
    url: str,
    budget_s: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``fn()``, re-run while it raises a transient error (:func:`is_transient`) for up to
    ``budget_s`` seconds (default :func:`retry_budget_s`); then
    :class:`~storage.errors.StorageUnavailableError` naming ``url``. Other errors propagate
    unchanged on the first attempt."""
    budget = retry_budget_s() if budget_s is None else budget_s
    start = time.monotonic()
    delay = FIRST_DELAY_S
    attempts = 0
    while True:
        attempts += 1
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc):
                raise
            waited = time.monotonic() - start
            if waited + delay > budget:
                raise StorageUnavailableError(
                    f"{url}: object storage unavailable for {waited:.1f} s ({attempts} attempts, "
                    f"{RETRY_ENV}={budget:g}); last error: {type(exc).__name__}: {exc}"
                ) from exc
            sleep(delay)
            delay = min(2 * delay, MAX_DELAY_S)
