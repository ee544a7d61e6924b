"""Ray Jobs API operations on a cluster's dashboard address: connect (with a reachability probe
and one-line errors), submit with retries while the job agent starts, status, logs, stop, list,
wait and follow, and the ``localcl jobs`` table.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO, TypeVar
from urllib.parse import urlparse

from ray_jobs.cluster.submit import DEFAULT_DASHBOARD_PORT, TERMINAL, Submission
from ray_jobs.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from ray.job_submission import JobDetails, JobSubmissionClient

_T = TypeVar("_T")


def resolve_address(address: str | None) -> str:
    """The dashboard URL to use: ``address``, else ``$RAY_API_SERVER_ADDRESS``, else an http
    ``$RAY_ADDRESS``. Must be ``http(s)://HOST[:PORT]``."""
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or ""
        ray_address = os.environ.get("RAY_ADDRESS", "")
        if not address and ray_address.startswith(("http://", "https://")):
            address = ray_address
    if not address:
        raise UserError("--address is required (e.g. http://127.0.0.1:8265), or set RAY_API_SERVER_ADDRESS")
    parsed = urlparse(address)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise UserError(
            f"--address: expected http://HOST:PORT (the Ray dashboard, default port "
            f"{DEFAULT_DASHBOARD_PORT}), got {address!r}"
        )
    try:
        _ = parsed.port  # urlparse parses the port lazily: a bad one raises here
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


def connect(address: str | None, timeout: float = 10.0) -> JobSubmissionClient:
    """A :class:`JobSubmissionClient` for ``address`` after a TCP probe bounded by ``timeout``
    seconds (the Ray client itself has no connect timeout)."""
    url = resolve_address(address)
    _probe(url, timeout)
    try:  # deferred: the Jobs client pulls in Ray's dashboard modules; `localcl --help` stays fast
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


def _job_call(client: JobSubmissionClient, job_id: str, fn: Callable[[str], _T]) -> _T:
    """Call ``fn(job_id)`` turning Ray's 404 into a one-line 'no such job' error."""
    try:
        return fn(job_id)
    except RuntimeError as exc:
        msg = str(exc)
        if "404" in msg or "does not exist" in msg:
            raise UserError(f"no job with id {job_id!r} on {client.get_address()} (see `localcl jobs list`)") from exc
        raise UserError(f"Ray Jobs API error for job {job_id!r}: {_one_line(exc)}") from exc
    except ConnectionError as exc:
        raise UserError(f"lost the connection to {client.get_address()}: {_one_line(exc)}") from exc


# --------------------------------------------------------------------------- operations


AGENT_NOT_READY = "No available agent"
"""Ray's HTTP 500 while a fresh head's job agent is still registering (transient)."""


def submit_job_retrying(client: JobSubmissionClient, retry_for: float = 60.0, **kwargs: Any) -> str:
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


def submit(client: JobSubmissionClient, submission: Submission, retry_for: float = 60.0) -> str:
    """Submit; return the submission id."""
    try:
        return submit_job_retrying(client, retry_for, **submission.submit_kwargs())
    except (RuntimeError, ValueError, ConnectionError) as exc:
        raise UserError(f"job submission to {client.get_address()} failed: {_one_line(exc)}") from exc


def job_info(client: JobSubmissionClient, job_id: str) -> JobDetails:
    return _job_call(client, job_id, client.get_job_info)


def job_logs(client: JobSubmissionClient, job_id: str) -> str:
    return str(_job_call(client, job_id, client.get_job_logs))


def stop_job(client: JobSubmissionClient, job_id: str) -> bool:
    """Request a stop; ``True`` if the job was still running."""
    return bool(_job_call(client, job_id, client.stop_job))


def list_jobs(client: JobSubmissionClient) -> list[JobDetails]:
    """All jobs of the cluster, oldest first."""
    try:
        jobs = client.list_jobs()
    except (RuntimeError, ConnectionError) as exc:
        raise UserError(f"cannot list jobs on {client.get_address()}: {_one_line(exc)}") from exc
    return sorted(jobs, key=lambda j: (j.start_time or 0, j.submission_id or j.job_id or ""))


def wait_for(
    client: JobSubmissionClient,
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
    client: JobSubmissionClient,
    job_id: str,
    *,
    timeout: float | None = None,
    poll: float = 1.0,
    on_status: Callable[[str, str | None], None] | None = None,
) -> str:
    """Poll until the job is terminal; return ``SUCCEEDED``, ``FAILED`` or ``STOPPED``."""
    return wait_for(client, job_id, (), timeout=timeout, poll=poll, on_status=on_status)


def follow(client: JobSubmissionClient, job_id: str, out: TextIO) -> str:
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


def job_row(info: JobDetails) -> JobRow:
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
    data = [header] + [(r.submission_id, r.status, r.job, r.start, r.duration, r.entrypoint) for r in rows]
    widths = [max(len(row[i]) for row in data) for i in range(len(header) - 1)]
    lines = []
    for row in data:
        cells = [row[i].ljust(widths[i]) for i in range(len(widths))] + [row[-1]]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
