"""Errors raised by :mod:`storage`.

All derive from :class:`ValueError` so callers that do not know this package still treat them
as bad-input errors; ``ray_jobs`` turns them into one-line CLI messages (no traceback).
"""

from __future__ import annotations

import os


class StorageError(ValueError):
    """A problem the user can fix: a bad source file, a bad store path, an unknown case."""


class InputError(StorageError):
    """One source file (or ``dataset.json`` entry) cannot be ingested.

    The message is always ``"<path>: <problem>"`` on one line, so a summary of many failures
    stays readable and names the file to fix.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # force one line
        super().__init__(f"{self.path}: {self.problem}")


class StoreError(StorageError):
    """The store itself is missing, not a localcl store, or lacks the requested case/array."""


class CorruptDataError(StorageError):
    """Bytes read from a store fail their checksum (a chunk's CRC32C or the shard index's).

    The message names the store, the case, the array and the slice (``z``) so the damaged object
    can be found and re-ingested. Never retried: reading the same bytes again gives the same
    mismatch.
    """


class StorageUnavailableError(StorageError):
    """Object storage did not answer for the whole retry budget (``LOCALCL_STORAGE_RETRY_S``,
    see :mod:`storage.retry`); the message names the URL and the last connection error."""
