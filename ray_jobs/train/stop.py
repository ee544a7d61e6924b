"""Graceful stop: SIGTERM to the driver (``localcl jobs stop``, Ctrl-C's cousin, a pod
deletion of the submitter) ends a stage at the next step boundary with a checkpoint.

How it travels:

1. the driver (:func:`ray_jobs.train.trainer.fit_stage`) creates one :class:`StopRequest` actor
   per stage when it runs in the main thread (:func:`new_stop_request`; elsewhere, e.g. in a
   Tune trial, there is no handler to feed it and no actor), and, while ``fit()`` runs, a
   SIGTERM handler (:func:`stop_on_sigterm`) that calls ``request()`` on it;
2. every worker holds a :class:`StopWatch`: rank 0 asks the actor at most every ``poll_s``
   seconds, and the answer is broadcast to every rank at each step boundary (one 1-element
   collective per step), so all ranks stop after the same step;
3. the workers write a step checkpoint (metric ``stopped: 1``) and return from the training
   function; ``fit()`` returns, and the driver raises :class:`StageStopped` instead of
   exporting the stage: re-running the same command resumes at that step, nothing redone.

Ray's job supervisor SIGKILLs the driver ``RAY_JOB_STOP_WAIT_TIME_S`` seconds after the SIGTERM
(default 3); ``localcl jobs submit`` sets it to 60 s
(:data:`ray_jobs.cluster.submit.JOB_STOP_WAIT_S`) in the job's runtime environment, so the checkpoint has time to be written and registered. A second SIGTERM falls
through to the previous handler (the default: exit at once).
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ray
import torch
import torch.distributed as dist

from ray_jobs.errors import UserError

__all__ = ["StageStopped", "StopRequest", "StopWatch", "new_stop_request", "stop_on_sigterm"]


class StageStopped(UserError):
    """A stage ended early on a stop request, after writing its checkpoint."""


@ray.remote(num_cpus=0)
class StopRequest:
    """One stage's stop flag: the driver sets it, rank 0 of the worker group reads it."""

    def __init__(self) -> None:
        self.at: float | None = None

    def request(self) -> None:
        if self.at is None:
            self.at = time.time()

    def requested(self) -> bool:
        return self.at is not None


def new_stop_request() -> Any | None:
    """A :class:`StopRequest` actor for one stage, or None outside the main thread (where no
    SIGTERM handler can be installed to set it)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return StopRequest.remote()  # type: ignore[attr-defined]


class StopWatch:
    """Worker side: ``due()`` at each step boundary; True on every rank after the same step
    once a stop was requested. ``handle`` None (no driver flag, e.g. a Tune trial): never."""

    def __init__(self, handle: Any, rank: int, poll_s: float = 0.5) -> None:
        self.handle, self.rank, self.poll_s = handle, rank, poll_s
        self.last = 0.0
        self.seen = False

    def _ask(self) -> bool:
        now = time.monotonic()
        if self.seen or self.handle is None or now - self.last < self.poll_s:
            return self.seen
        self.last = now
        try:
            self.seen = bool(ray.get(self.handle.requested.remote(), timeout=5.0))
        except Exception:  # the driver is gone (then Ray ends this group anyway)
            pass
        return self.seen

    def due(self, device: torch.device) -> bool:
        if self.handle is None:
            return False
        flag = self._ask() if self.rank == 0 else False
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            t = torch.tensor([int(flag)], device=device)
            dist.broadcast(t, src=0)
            flag = bool(t.item())
        return flag


@contextmanager
def stop_on_sigterm(handle: Any, stage: str, log: Any = None) -> Iterator[dict[str, Any]]:
    """While the block runs, the first SIGTERM sets ``handle``'s flag instead of ending the
    process; the yielded dict records ``{"at": time}`` when it did. ``handle`` None
    (:func:`new_stop_request` outside the main thread): nothing is installed."""
    got: dict[str, Any] = {}
    if handle is None:
        yield got
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: Any) -> None:
        if got:  # second SIGTERM: the old behaviour
            signal.signal(signal.SIGTERM, previous)
            signal.raise_signal(signal.SIGTERM)
            return
        got["at"] = time.time()
        if log is not None:
            log(f"{stage}: SIGTERM: stopping at the next step boundary with a checkpoint")
        # not from inside the handler: the main thread may be in the middle of a Ray call
        threading.Thread(target=handle.request.remote, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    try:
        yield got
    finally:
        signal.signal(signal.SIGTERM, previous)
