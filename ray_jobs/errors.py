"""User-facing errors: printed by the CLI as one line, no traceback."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """An error the user can fix (bad config, bad path, unreachable address...)."""


class ConfigError(UserError, ValueError):
    """A config file or ``--set`` override failed validation."""


@contextmanager
def storage_errors_as_user_errors() -> Iterator[None]:
    """Re-raise :class:`storage.errors.StorageError` (bad input file or folder, one-line
    message) as a :class:`UserError` with the same message."""
    try:
        yield
    except ValueError as exc:
        # deferred: importing the storage package loads zarr, which most CLI paths (and
        # ``localcl --help``) never need; a StorageError means storage is loaded already
        from storage.errors import StorageError

        if isinstance(exc, StorageError):
            raise UserError(str(exc)) from None
        raise
