"""Ray Jobs submission: run ``localcl pretrain|finetune|run|tune`` on a remote Ray cluster.

The flow of ``localcl submit JOB --config FILE --address http://HOST:8265``:

1. the config is validated **locally** with the same function the job will use
   (:func:`ray_jobs.config.load_run_config` for pretrain/finetune/run,
   :func:`ray_jobs.campaign.run.load_campaign` for tune), before any connection is opened;
2. the validated config is shipped self-contained (``extends`` merged, ``--set`` applied, a
   campaign's ``base_config`` inlined; :func:`portable_config_text`) in the runtime-env
   variable :data:`CONFIG_ENV`;
3. the entrypoint is ``python -m ray_jobs.cluster.job_entry JOB``, which writes the shipped text to a
   file on the cluster and runs the same CLI verb there (``localcl JOB --config FILE``);
4. the code reaches the cluster either as a Ray ``working_dir`` (the repository, uploaded with
   :data:`DEFAULT_EXCLUDES`) or, with ``image_runtime=True``, is already installed in the
   cluster's image (``docker/Dockerfile``), in which case no ``working_dir`` is sent.

The Ray Jobs client talks HTTP to the head's dashboard (port 8265). Every failure a user can
fix (bad address, unreachable cluster, unknown job id, invalid config) is raised as a
:class:`ray_jobs.errors.UserError` with a one-line message.
"""

from __future__ import annotations

import datetime as _dt
import getpass
import hashlib
import os
import re
import secrets
import shlex
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ray_jobs.campaign.spec import load_campaign
from ray_jobs.config import load_config, overrides_to_tree, resolve_config_path
from ray_jobs.errors import UserError

JOB_STOP_WAIT_S = 60  # RAY_JOB_STOP_WAIT_TIME_S of submitted jobs (ray_jobs.train.stop)

JOBS = ("pretrain", "finetune", "run", "tune")
"""Job kinds that can be submitted; each is the ``localcl`` verb run on the cluster."""

CONFIG_ENV = "LOCALCL_SUBMITTED_CONFIG"
"""Runtime-env variable carrying the text of the submitted config file."""

CONFIG_NAME_ENV = "LOCALCL_SUBMITTED_CONFIG_NAME"
"""Runtime-env variable carrying the submitted config's file name (for messages and the copy)."""

DEFAULT_EXCLUDES = (
    ".venv/",
    ".git/",
    "runs/",
    "**/__pycache__/",
    "*.pyc",
    "*.egg-info/",
    ".pytest_cache/",
    "*.zarr/",
    "demo_out/",
    "build/",
    "benchmarks/results/",
)
"""Paths never uploaded with the ``working_dir`` (gitignore syntax; Ray also honours
``.gitignore`` and ``.rayignore``)."""

# Variables forwarded from the submitting shell to the job when set there: auth mode must agree
# between client and cluster; usage stats stay off.
FORWARDED_ENV = ("RAY_AUTH_MODE", "RAY_USAGE_STATS_ENABLED")

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})
DEFAULT_DASHBOARD_PORT = 8265
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------- config validation


def validate_config(job: str, config: str | os.PathLike[str], overrides: Sequence[str] = ()) -> tuple[Any, Path]:
    """Validate ``config`` for ``job`` locally, without Ray.

    ``config`` is a file, or for pretrain/finetune/run also the name of a shipped config
    (``ray_jobs/configs/<stage>/<name>.yaml``). Returns ``(validated object, config file)``.
    Raises :class:`UserError` (:class:`ray_jobs.errors.ConfigError` for an invalid config).
    """
    if job not in JOBS:
        raise UserError(f"unknown job {job!r}: choose one of {', '.join(JOBS)}")
    if job == "tune":
        path = Path(config)
        if not path.is_file():
            raise UserError(f"--config: no such campaign file: {path}")
        if overrides:
            return load_campaign(path, overrides=overrides_to_tree(overrides)), path
        return load_campaign(path), path
    path = resolve_config_path(config, job)
    return load_run_config(path, overrides), Path(path)


def load_run_config(path: str | os.PathLike[str], overrides: Sequence[str] = ()) -> Any:
    """The project's run-config validator (``ray_jobs.config.load_config``): file + ``--set``
    overrides -> validated config, raising :class:`ray_jobs.errors.ConfigError`."""
    return load_config(path, list(overrides))


def portable_config_text(validated: Any, path: Path) -> str:
    """Self-contained YAML of a validated config, so the job needs no other local file.

    A run config ships its resolved form (``extends`` chain merged, ``--set`` applied:
    ``to_yaml()``); a campaign ships its fields with ``base_config`` inlined into ``base``.
    Anything else ships the file's text.
    """
    if hasattr(validated, "to_yaml"):
        return str(validated.to_yaml())
    if hasattr(validated, "resolved_base") and hasattr(validated, "model_dump"):
        data = validated.model_dump(mode="json")
        data["base"] = validated.resolved_base()
        data["base_config"] = None
        text: str = yaml.safe_dump(data, sort_keys=False)  # no stream: returns the text
        return text
    return path.read_text(encoding="utf-8")


# --------------------------------------------------------------------------- submission spec


@dataclass(frozen=True)
class Submission:
    """Everything sent to ``JobSubmissionClient.submit_job`` for one job."""

    job: str
    entrypoint: str
    submission_id: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    entrypoint_num_cpus: float | None = None
    entrypoint_num_gpus: float | None = None

    def submit_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :meth:`JobSubmissionClient.submit_job`."""
        kw: dict[str, Any] = {
            "entrypoint": self.entrypoint,
            "submission_id": self.submission_id,
            "runtime_env": self.runtime_env,
            "metadata": self.metadata,
        }
        if self.entrypoint_num_cpus is not None:
            kw["entrypoint_num_cpus"] = self.entrypoint_num_cpus
        if self.entrypoint_num_gpus is not None:
            kw["entrypoint_num_gpus"] = self.entrypoint_num_gpus
        return kw


def parse_pairs(pairs: Iterable[str], option: str) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``; a pair without ``=`` or with an empty key is an
    error naming ``option``."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UserError(f"{option}: expected KEY=VALUE, got {pair!r}")
        out[key.strip()] = value
    return out


def repo_root() -> Path | None:
    """The source checkout this package runs from (has ``pyproject.toml``), else ``None``."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "ray_jobs").is_dir() else None


def _git_sha(root: Path | None) -> str | None:
    if root is None or not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _package_version() -> str:
    try:
        from importlib.metadata import version

        return version("localcl")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def new_submission_id(job: str) -> str:
    """``localcl-<job>-<UTC yyyymmdd-hhmmss>-<6 hex>``: sortable, unique, DNS-safe."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"localcl-{job}-{stamp}-{secrets.token_hex(3)}"


def build_submission(
    job: str,
    config: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    working_dir: str | os.PathLike[str] | None = None,
    image_runtime: bool = False,
    entrypoint_num_cpus: float | None = None,
    entrypoint_num_gpus: float | None = None,
    metadata: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    preflight: bool = False,
    expand_env: bool = False,
) -> Submission:
    """Validate the config locally and build the job to submit (no network access).

    ``working_dir`` defaults to the repository this package runs from; ``image_runtime=True``
    sends no ``working_dir`` (the cluster image has localcl installed). ``preflight=True``
    makes the job only re-validate the config on the cluster and print the environment
    (versions, GPUs, cluster resources) instead of training. ``expand_env=True`` makes the job
    substitute ``${VAR}`` references in the config from the cluster's environment (secrets).
    """
    if job not in JOBS:
        raise UserError(f"unknown job {job!r}: choose one of {', '.join(JOBS)}")
    if image_runtime and working_dir is not None:
        raise UserError("--working-dir and --image-runtime are mutually exclusive")
    for name, amount in (
        ("--entrypoint-num-cpus", entrypoint_num_cpus),
        ("--entrypoint-num-gpus", entrypoint_num_gpus),
    ):
        if amount is not None and amount < 0:
            raise UserError(f"{name} must be >= 0, got {amount}")
    validated, path = validate_config(job, config, overrides)
    text = portable_config_text(validated, path)

    runtime_env: dict[str, Any] = {}
    root = repo_root()
    uploaded_root = None
    if not image_runtime:
        wd = Path(working_dir) if working_dir is not None else root
        if wd is None:
            raise UserError(
                "no source checkout to upload: pass --working-dir DIR (the localcl repository) "
                "or --image-runtime when the cluster runs the localcl image"
            )
        if not wd.is_dir():
            raise UserError(f"--working-dir: not a directory: {wd}")
        runtime_env["working_dir"] = str(wd.resolve())
        uploaded_root = wd.resolve()
        runtime_env["excludes"] = list(DEFAULT_EXCLUDES)

    env_vars = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    env_vars.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's job supervisor reads this from the job's env: how long `jobs stop` waits after its
    # SIGTERM before SIGKILL (default 3 s); the driver uses it to checkpoint the step in flight
    env_vars.setdefault("RAY_JOB_STOP_WAIT_TIME_S", str(JOB_STOP_WAIT_S))
    env_vars["PYTHONUNBUFFERED"] = "1"
    for key, value in (env or {}).items():
        if not _ENV_KEY.match(key):
            raise UserError(f"--env: invalid variable name {key!r}")
        env_vars[key] = value
    env_vars[CONFIG_ENV] = text
    env_vars[CONFIG_NAME_ENV] = path.name
    runtime_env["env_vars"] = env_vars

    # The shipped text already has the overrides applied: the entrypoint takes none.
    args = ["python", "-m", "ray_jobs.cluster.job_entry", job]
    if expand_env:
        args.append("--expand-env")
    if preflight:
        args.append("--preflight")
    entrypoint = " ".join(shlex.quote(a) for a in args)

    meta = {
        "localcl.job": job,
        "localcl.config": path.name,
        "localcl.config_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "localcl.version": _package_version(),
        "localcl.user": _user(),
        "localcl.code": "image" if image_runtime else "working_dir",
    }
    sha = _git_sha(uploaded_root)  # the code that runs: only known for an uploaded checkout
    if sha:
        meta["localcl.git_sha"] = sha
    if overrides:
        meta["localcl.overrides"] = " ".join(overrides)
    if preflight:
        meta["localcl.preflight"] = "true"
    meta.update(metadata or {})
    return Submission(
        job=job,
        entrypoint=entrypoint,
        submission_id=new_submission_id(job),
        runtime_env=runtime_env,
        metadata=meta,
        entrypoint_num_cpus=entrypoint_num_cpus,
        entrypoint_num_gpus=entrypoint_num_gpus,
    )


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # pragma: no cover - no passwd entry in some containers
        return "unknown"
