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

import asyncio
import datetime as _dt
import getpass
import hashlib
import os
import re
import secrets
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence, TextIO
from urllib.parse import urlparse

import yaml

from ray_jobs.campaign.spec import load_campaign
from ray_jobs.config import load_config, overrides_to_tree, resolve_config_path
from ray_jobs.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobDetails, JobSubmissionClient

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


def validate_config(
    job: str, config: str | os.PathLike[str], overrides: Sequence[str] = ()
) -> tuple[Any, Path]:
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
        return yaml.safe_dump(data, sort_keys=False)
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
            capture_output=True, text=True, timeout=5, check=True,
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
    for name, value in (("--entrypoint-num-cpus", entrypoint_num_cpus),
                        ("--entrypoint-num-gpus", entrypoint_num_gpus)):
        if value is not None and value < 0:
            raise UserError(f"{name} must be >= 0, got {value}")
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


# --------------------------------------------------------------------------- connection


def resolve_address(address: str | None) -> str:
    """The dashboard URL to use: ``address``, else ``$RAY_API_SERVER_ADDRESS``, else an http
    ``$RAY_ADDRESS``. Must be ``http(s)://HOST[:PORT]``."""
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or ""
        ray_address = os.environ.get("RAY_ADDRESS", "")
        if not address and ray_address.startswith(("http://", "https://")):
            address = ray_address
    if not address:
        raise UserError(
            "--address is required (e.g. http://127.0.0.1:8265), or set RAY_API_SERVER_ADDRESS"
        )
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(
            f"--address: expected http://HOST:PORT (the Ray dashboard, default port "
            f"{DEFAULT_DASHBOARD_PORT}), got {address!r}"
        )
    try:
        parsed.port
    except ValueError as exc:
        raise UserError(f"--address: bad port in {address!r}") from exc
    return address.rstrip("/")


def _probe(address: str, timeout: float) -> None:
    parsed = urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UserError(
            f"cannot reach the Ray dashboard at {address} ({reason}): is the cluster running, "
            "and on Kubernetes is `kubectl port-forward svc/<cluster>-head-svc 8265:8265` active?"
        ) from exc


def connect(address: str | None, timeout: float = 10.0) -> "JobSubmissionClient":
    """A :class:`JobSubmissionClient` for ``address`` after a TCP probe bounded by ``timeout``
    seconds (the Ray client itself has no connect timeout)."""
    url = resolve_address(address)
    _probe(url, timeout)
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:  # pragma: no cover - ray[default] is a dependency
        raise UserError(f"the Ray Jobs client is unavailable ({exc}): install ray[default]") from exc
    try:
        return JobSubmissionClient(url)
    except (ConnectionError, RuntimeError) as exc:
        raise UserError(f"cannot use the Ray Jobs API at {url}: {_one_line(exc)}") from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _job_call(client: "JobSubmissionClient", job_id: str, fn: Callable[[str], Any]) -> Any:
    """Call ``fn(job_id)`` turning Ray's 404 into a one-line 'no such job' error."""
    try:
        return fn(job_id)
    except RuntimeError as exc:
        msg = str(exc)
        if "404" in msg or "does not exist" in msg:
            raise UserError(
                f"no job with id {job_id!r} on {client.get_address()} (see `localcl jobs list`)"
            ) from exc
        raise UserError(f"Ray Jobs API error for job {job_id!r}: {_one_line(exc)}") from exc
    except ConnectionError as exc:
        raise UserError(f"lost the connection to {client.get_address()}: {_one_line(exc)}") from exc


# --------------------------------------------------------------------------- operations


AGENT_NOT_READY = "No available agent"
"""Ray's HTTP 500 while a fresh head's job agent is still registering (transient)."""


def submit_job_retrying(client: "JobSubmissionClient", retry_for: float = 60.0,
                        **kwargs: Any) -> str:
    """``client.submit_job(**kwargs)``, retried every second for up to ``retry_for`` s while
    the cluster answers that no job agent is available yet (a head that just started)."""
    deadline = time.monotonic() + retry_for
    while True:
        try:
            return str(client.submit_job(**kwargs))
        except RuntimeError as exc:
            if AGENT_NOT_READY not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def submit(client: "JobSubmissionClient", submission: Submission, retry_for: float = 60.0) -> str:
    """Submit; return the submission id."""
    try:
        return submit_job_retrying(client, retry_for, **submission.submit_kwargs())
    except (RuntimeError, ValueError, ConnectionError) as exc:
        raise UserError(f"job submission to {client.get_address()} failed: {_one_line(exc)}") from exc


def job_info(client: "JobSubmissionClient", job_id: str) -> "JobDetails":
    return _job_call(client, job_id, client.get_job_info)


def job_logs(client: "JobSubmissionClient", job_id: str) -> str:
    return str(_job_call(client, job_id, client.get_job_logs))


def stop_job(client: "JobSubmissionClient", job_id: str) -> bool:
    """Request a stop; ``True`` if the job was still running."""
    return bool(_job_call(client, job_id, client.stop_job))


def list_jobs(client: "JobSubmissionClient") -> list["JobDetails"]:
    """All jobs of the cluster, oldest first."""
    try:
        jobs = client.list_jobs()
    except (RuntimeError, ConnectionError) as exc:
        raise UserError(f"cannot list jobs on {client.get_address()}: {_one_line(exc)}") from exc
    return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id or j.job_id or ""))


def wait_for(
    client: "JobSubmissionClient",
    job_id: str,
    statuses: Iterable[str],
    *,
    timeout: float | None = None,
    poll: float = 1.0,
    on_status: Callable[[str, str | None], None] | None = None,
) -> str:
    """Poll until the job's status is in ``statuses`` or terminal; return it.

    ``on_status(status, message)`` is called on every change. ``timeout`` (seconds) raises
    :class:`UserError` when exceeded (the job itself keeps running).
    """
    wanted = set(statuses) | TERMINAL
    deadline = None if timeout is None else time.monotonic() + timeout
    last = None
    while True:
        info = job_info(client, job_id)
        status = str(info.status)
        if status != last:
            if on_status is not None:
                on_status(status, info.message)
            last = status
        if status in wanted:
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise UserError(f"job {job_id} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def wait(
    client: "JobSubmissionClient",
    job_id: str,
    *,
    timeout: float | None = None,
    poll: float = 1.0,
    on_status: Callable[[str, str | None], None] | None = None,
) -> str:
    """Poll until the job is terminal; return ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
    return wait_for(client, job_id, (), timeout=timeout, poll=poll, on_status=on_status)


def follow(client: "JobSubmissionClient", job_id: str, out: TextIO) -> str:
    """Stream the job's logs to ``out`` until it ends; return its final status."""
    job_info(client, job_id)  # 'no such job' as a clean error before opening the websocket

    async def _tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(_tail())
    except RuntimeError as exc:  # connection closed early: fall back to polling
        out.write(f"\n[localcl] log stream closed ({_one_line(exc)}); waiting for the job\n")
    return wait(client, job_id)


@dataclass
class JobRow:
    """One line of ``localcl jobs list``."""

    submission_id: str
    status: str
    job: str
    start: str
    duration: str
    entrypoint: str
    extra: dict[str, str] = field(default_factory=dict)


def _fmt_time(ms: int | None) -> str:
    if not ms:
        return "-"
    return _dt.datetime.fromtimestamp(ms / 1000, _dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(start_ms: int | None, end_ms: int | None) -> str:
    if not start_ms:
        return "-"
    end = end_ms or int(time.time() * 1000)
    seconds = max(0, (end - start_ms) // 1000)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def job_row(info: "JobDetails") -> JobRow:
    meta = info.metadata or {}
    entry = info.entrypoint or ""
    return JobRow(
        submission_id=info.submission_id or info.job_id or "-",
        status=str(info.status),
        job=meta.get("localcl.job", "-"),
        start=_fmt_time(info.start_time),
        duration=_fmt_duration(info.start_time, info.end_time),
        entrypoint=entry if len(entry) <= 60 else entry[:57] + "...",
    )


def format_table(rows: Sequence[JobRow]) -> str:
    """Fixed-width table: SUBMISSION_ID STATUS JOB START(UTC) DURATION ENTRYPOINT."""
    header = ("SUBMISSION_ID", "STATUS", "JOB", "START (UTC)", "DURATION", "ENTRYPOINT")
    data = [header] + [
        (r.submission_id, r.status, r.job, r.start, r.duration, r.entrypoint) for r in rows
    ]
    widths = [max(len(row[i]) for row in data) for i in range(len(header) - 1)]
    lines = []
    for row in data:
        cells = [row[i].ljust(widths[i]) for i in range(len(widths))] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
