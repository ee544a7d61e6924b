"""Worker-side helpers of the training loop that are not training: progress pushes, the
local-mode checkpoint directory, and the test/diagnostic hooks (``LoopSpec.hooks``: an
``events`` file and a ``kill`` spec ``{rank, epoch, step, flag[, snapshot[, global_step]]}``
that SIGKILLs one worker once, after step ``step`` (0-based) of ``epoch``, optionally once the
checkpoint of the previous epoch, or of ``global_step``, is registered).

Events are lines ``<rank> <what> <value>``: ``start <epoch>``, ``world <W>`` and ``pid <process
id>`` when a worker group starts, ``resume_step <global step>`` when it resumes inside an
epoch, ``step <global step>`` after every optimiser step, ``preempted <global step>`` after
a preemption checkpoint, ``epoch``/``reported <epoch>``. Outside tests, ``LOCALCL_EVENTS_DIR=/dir`` in the driver's
environment writes them to ``/dir/<section>[-<method stage>].events`` (a path every worker
can write: a local directory on a one-machine cluster) for any CLI run (:func:`env_hooks`);
the fault tests read the work a fault cost from them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

__all__ = ["EVENTS_DIR_ENV", "KeptDir", "env_hooks", "event", "push_progress", "should_kill"]

EVENTS_DIR_ENV = "LOCALCL_EVENTS_DIR"


def env_hooks(section: str, method_stage: str | None = None) -> dict[str, Any]:
    """``{"events": $LOCALCL_EVENTS_DIR/<section>[-<method_stage>].events}`` when that variable
    is set in this (the driver's) environment, else ``{}``."""
    root = os.environ.get(EVENTS_DIR_ENV)
    if not root:
        return {}
    name = section if method_stage in (None, "main") else f"{section}-{method_stage}"
    return {"events": os.path.join(root, f"{name}.events")}


class KeptDir:
    """Context manager yielding a directory that is not deleted on exit (local mode)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        return None


def push_progress(queue: Any, item: dict[str, Any]) -> None:
    try:
        queue.put_nowait(item)
    except Exception:  # a full or gone queue must never stop training
        pass


def should_kill(spec: dict[str, Any], rank: int, epoch: int, step: int) -> bool:
    """Test hook: SIGKILL this worker once (a flag file marks that it already happened)."""
    if rank != spec.get("rank", 1) or epoch != spec.get("epoch", 2) or step != spec.get("step", 0):
        return False
    flag = Path(spec["flag"])
    if flag.exists():
        return False
    if spec.get("snapshot"):  # die only once the previous epoch's (or a step) checkpoint is registered
        key, value = ("global_step", int(spec["global_step"])) if "global_step" in spec else ("epoch", epoch - 1)
        _wait_registered(Path(spec["snapshot"]), key, value, timeout=float(spec.get("timeout", 300)))
    flag.write_text(f"killed rank {rank} epoch {epoch} step {step}\n")
    return True


def _wait_registered(snapshot: Path, key: str, value: int, timeout: float) -> None:
    """Block until Ray Train's ``checkpoint_manager_snapshot.json`` lists a checkpoint whose
    metric ``key`` (``epoch`` or ``global_step``) is >= ``value`` (the controller registers
    reported checkpoints asynchronously)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results") or []
            if any((r.get("metrics") or {}).get(key, 0) >= value for r in results):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def event(hooks: dict[str, Any], rank: int, what: str, epoch: int) -> None:
    """Test/diagnostic hook: append ``rank what epoch`` to ``hooks["events"]`` (local file)."""
    path = hooks.get("events")
    if path:
        with open(path, "a") as f:
            f.write(f"{rank} {what} {epoch}\n")
