"""User-facing errors: printed by the CLI as one line, no traceback."""
from __future__ import annotations


class UserError(Exception):
    """An error the user can fix (bad config, bad path, unreachable address...)."""


class ConfigError(UserError, ValueError):
    """A config file or ``--set`` override failed validation."""
