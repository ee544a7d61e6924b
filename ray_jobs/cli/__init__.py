"""The ``localcl`` command line: the parser (:func:`build_parser`), :func:`main`, and one module
per verb.

Each verb lives in its own module under :mod:`ray_jobs.cli` and exposes
``register(subparsers)`` which adds an ``argparse`` sub-parser whose ``func`` attribute is
called with the parsed namespace and returns an exit code. Errors the user can fix
(:class:`ray_jobs.errors.UserError` and its subclasses, plus ``storage``'s and ``localcl``'s
``ValueError``-derived input errors) are printed as one line on stderr, no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from ray_jobs.errors import UserError

# Verbs in the order ``localcl --help`` lists them. A module that is missing (a part not built
# yet) is skipped so the rest of the CLI keeps working.
COMMAND_MODULES = (
    "ingest",
    "info",
    "pretrain",
    "finetune",
    "evaluate",
    "predict",
    "run",
    "demo",
    "tune",
    "study",
    "submit",
    "jobs",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localcl",
        description="Label-efficient medical image segmentation: dense contrastive "
        "pretraining and semi-supervised fine-tuning on Ray.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(f"ray_jobs.cli.{name}")
        except ModuleNotFoundError as exc:  # pragma: no cover - only while a part is missing
            if exc.name and exc.name.startswith("ray_jobs.cli"):
                continue
            raise
        mod.register(sub)
    return parser


def _version() -> str:
    try:
        from importlib.metadata import version

        return f"localcl {version('localcl')}"
    except Exception:  # pragma: no cover
        return "localcl (not installed)"


def main(argv: Sequence[str] | None = None) -> int:
    # Loopback only, no token auth for local clusters (see README "Ray settings").
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"localcl: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("localcl: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
