"""Where a training loop stands, saved in every checkpoint so a run resumes at a step boundary.

A checkpoint is written at the end of every epoch and, with ``checkpoint.every_steps = N``, also
after every ``N``-th optimiser step inside an epoch (a *step checkpoint*), so the work at risk
when a worker or a node dies is at most ``N`` steps. With ``checkpoint.on_preemption`` a worker
also writes one at the next step boundary once Ray reports that a node of the worker group is
being drained/preempted (:func:`preemption_pending`), and then trains no further
(:func:`wait_for_restart`): Ray Train restarts the whole worker group from the latest
checkpoint once the node is gone, so any step after that checkpoint would be lost.

Checkpoint directory: rank 0 writes ``state.pt`` (model, optimiser, scheduler, scaler, history,
best score; ``epoch`` = the last *completed* epoch, as before) and ``best.pt``; ``state.pt``
also holds ``loop`` (:class:`LoopPosition` as a dict). Every rank writes
``rng_rank<r>.pt``: its torch/numpy/python RNG states and the method's generator state at that
step boundary (Ray Train merges the files the ranks report into one checkpoint directory).

Resume (:func:`resume_position`): epoch ``loop.epoch`` at step ``loop.step``. The samplers skip
the ``loop.consumed[name]`` plan items the whole worker group had drawn in that epoch
(``set_epoch(epoch, start=consumed)``): one step consumes ``batch_size`` items of a slice
plan whatever the world size, so a resume with another number of workers re-shards the rest of
the epoch with nothing dropped and nothing drawn twice. With the same world size each rank
restores its RNG file and the resumed run is bit-identical to an undisturbed one; after a resize
the RNGs of the rest of that epoch are derived from ``(seed, rank, epoch, step)`` instead
(augmentation draws differ, the data order does not).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn, cast

import numpy as np
import ray.train
import torch

from ray_jobs.train.hooks import KeptDir
from ray_jobs.train.stage import BEST_FILE, STATE_FILE

__all__ = [
    "LoopPosition",
    "capture_rng",
    "load_rng",
    "preemption_pending",
    "report_checkpoint",
    "restore_rng",
    "resume_position",
    "rng_file",
    "step_checkpoint_due",
    "train_state",
    "wait_for_restart",
]

# Ray Train's own fallback when a drain names no deadline (``DEFAULT_PREEMPTION_DEADLINE_S``)
PREEMPTION_DEFAULT_DEADLINE_S = 120.0
# how long past the deadline a worker waits for the restart before it gives up and fails
PREEMPTION_WAIT_MARGIN_S = 60.0


@dataclass
class LoopPosition:
    """The loop at a step boundary: ``step`` steps of ``epoch`` done (``step == 0``: the epoch
    has not started; the epoch-end checkpoint stores the next epoch at step 0).

    ``consumed``: plan items drawn by the whole worker group in ``epoch`` per sampler
    (``"main"``, ``"unlabelled"``); ``sums``/``n_seen``: the running per-epoch metric sums and
    sample count, so a resumed epoch reports the same means; ``world_size``: the number of
    workers that wrote it (the RNG files are per rank of that world)."""

    epoch: int = 1
    step: int = 0
    global_step: int = 0
    world_size: int = 1
    consumed: dict[str, int] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    n_seen: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resume_position(state: dict[str, Any]) -> LoopPosition:
    """The position to resume at from a checkpoint's ``state.pt`` (checkpoints without a
    ``loop`` entry, written before step checkpoints existed: the epoch after ``epoch``)."""
    loop = state.get("loop")
    if loop:
        return LoopPosition(
            epoch=int(loop["epoch"]),
            step=int(loop["step"]),
            global_step=int(loop["global_step"]),
            world_size=int(loop["world_size"]),
            consumed={str(k): int(v) for k, v in dict(loop["consumed"]).items()},
            sums={str(k): float(v) for k, v in dict(loop["sums"]).items()},
            n_seen=int(loop["n_seen"]),
        )
    return LoopPosition(epoch=int(state["epoch"]) + 1, global_step=int(state["global_step"]))


def step_checkpoint_due(every_steps: int | None, step_done: int, steps_per_epoch: int) -> bool:
    """Whether a step checkpoint is written after ``step_done`` (1-based) steps of an epoch:
    every ``every_steps`` steps, except the last step (the epoch-end checkpoint covers it)."""
    return bool(every_steps) and step_done % int(every_steps or 1) == 0 and step_done < steps_per_epoch


def preemption_pending() -> Any | None:
    """Ray's ``PreemptionInfo`` (``deadline_ms``, ``preempted_node_to_ranks``) when a node of this
    worker group is being drained or preempted (``ray.train.get_preemption_info()``), else
    None. A collective: every rank must call it at the same step boundary, and all get the same
    answer. None where Ray Train offers no preemption API (local mode)."""
    get = getattr(ray.train, "get_preemption_info", None)
    if get is None:
        return None
    try:
        return get()
    except (RuntimeError, NotImplementedError):  # local mode / outside a worker group
        return None


def wait_for_restart(info: Any, poll_s: float = 0.5, margin_s: float = PREEMPTION_WAIT_MARGIN_S) -> NoReturn:
    """After the preemption checkpoint: train no further and wait for Ray Train to tear the
    worker group down. Ray Train restarts the whole group from the latest checkpoint when the
    preempted node's workers die, or at the drain deadline (``info.deadline_ms``; without one,
    :data:`PREEMPTION_DEFAULT_DEADLINE_S` after now), on the nodes that are not draining: every
    step trained after the checkpoint would be lost, and the survivors would stall in the next
    all-reduce anyway. Raises ``RuntimeError`` (a worker failure: Ray Train restarts from
    that same checkpoint) if the group is still running ``margin_s`` seconds past the
    deadline."""
    deadline_ms = getattr(info, "deadline_ms", None)
    deadline = deadline_ms / 1000.0 if deadline_ms else time.time() + PREEMPTION_DEFAULT_DEADLINE_S
    while time.time() < deadline + margin_s:
        time.sleep(poll_s)
    raise RuntimeError(
        f"preemption checkpoint written, but the worker group was not restarted within {margin_s:.0f} s "
        f"of the drain deadline ({info})"
    )


def rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def capture_rng(method: Any) -> dict[str, Any]:
    """torch/CUDA, numpy, python and the method's generator states, as weights-only types."""
    np_state = cast(tuple[Any, ...], np.random.get_state(legacy=True))  # legacy: a tuple
    py_state = random.getstate()
    out: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "python": torch.tensor(py_state[1], dtype=torch.int64),
        "python_gauss": py_state[2],
        "method": method.generator.get_state() if getattr(method, "generator", None) is not None else None,
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(method: Any, rng: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(rng["torch"])
    keys = rng["numpy_keys"].numpy().astype(np.uint32)
    has_gauss, gauss = rng["numpy_gauss"]
    np.random.set_state(("MT19937", keys, int(rng["numpy_pos"]), int(has_gauss), float(gauss)))
    random.setstate((3, tuple(int(v) for v in rng["python"].tolist()), rng["python_gauss"]))
    if rng.get("method") is not None and getattr(method, "generator", None) is not None:
        method.generator.set_state(rng["method"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


def load_rng(checkpoint_dir: str, rank: int) -> dict[str, Any] | None:
    """This rank's RNG file of a checkpoint, or None when it has none."""
    path = Path(checkpoint_dir) / rng_file(rank)
    if not path.is_file():
        return None
    rng: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    return rng


def report_checkpoint(
    metrics: dict[str, Any],
    state: dict[str, Any] | None,
    best_state: dict[str, torch.Tensor] | None,
    rng: dict[str, Any],
    rank: int,
    keep_dir: str | None,
    tag: str,
) -> None:
    """``ray.train.report(metrics, checkpoint)`` on every rank: each rank's checkpoint holds its
    RNG file; rank 0's also ``state.pt`` (``state``) and ``best.pt``. ``keep_dir``: Ray Train
    local mode keeps the reported directory itself as the checkpoint, so it is made under
    ``keep_dir`` and not deleted."""
    if keep_dir:
        os.makedirs(keep_dir, exist_ok=True)
    ctx = KeptDir(tempfile.mkdtemp(prefix=f"{tag}-", dir=keep_dir)) if keep_dir else tempfile.TemporaryDirectory()
    with ctx as tmp:
        torch.save(rng, Path(tmp) / rng_file(rank))
        if rank == 0:
            assert state is not None
            torch.save(state, Path(tmp) / STATE_FILE)
            torch.save(best_state, Path(tmp) / BEST_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def train_state(
    method: torch.nn.Module,
    optim: Any,
    sched: Any,
    scaler: Any,
    epoch: int,
    global_step: int,
    seed: int,
    history: list[dict[str, Any]],
    best: dict[str, Any],
    pos: LoopPosition,
    chain: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """``state.pt`` of a checkpoint; ``epoch`` is the last completed epoch, ``loop`` where to
    resume, ``chain`` (only when given) the stage's place in a one-worker-group run
    (:func:`ray_jobs.train.worker.run_chain`)."""
    state = {
        "model": method.state_dict(),
        "optimizer": optim.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "epoch": epoch,
        "global_step": global_step,
        "sampler_epoch": epoch,
        "seed": seed,
        "history": history,
        "best": best,
        "loop": pos.to_dict(),
    }
    if chain is not None:
        state["chain"] = chain
    return state
