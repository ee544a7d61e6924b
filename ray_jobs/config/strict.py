"""The strict pydantic base of every ``ray_jobs`` config model, and one error formatter."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Strict", "format_validation_error"]


class Strict(BaseModel):
    """Unknown keys are errors; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """One line ``invalid config: a.b: message (got value); ...`` naming each dotted key."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        key = ".".join(p for p in (prefix, loc) if p)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif "input" in err and not isinstance(err["input"], (dict, list)):
            msg = f"{msg} (got {err['input']!r})"
        parts.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(parts)
