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
