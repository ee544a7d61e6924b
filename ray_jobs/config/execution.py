"""Execution sections of a run config: where and how a run executes, not what it learns.

``scaling`` (Ray Train workers, elastic range, resources), ``checkpoint`` (retention, failure
budget, step and preemption checkpoints), ``logging`` (TensorBoard, MLflow, progress) and
``runtime`` (speed switches of the training step). :class:`ray_jobs.config.run.Config` holds one
of each.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Literal

from pydantic import Field, field_validator

from ray_jobs.config.strict import Strict


def _one_cpu_per_worker() -> dict[str, float]:
    return {"CPU": 1}  # an int, as it always was: the config hash serialises it


class ScalingSection(Strict):
    """``num_workers``: an int (0: Ray Train local mode, the loop runs in the driver, no DDP) or
    an elastic range ``[min, max]`` (1 <= min <= max): Ray Train starts with as many workers as
    the cluster can place, at least ``min``, restarts with the survivors when a node is lost
    and grows back towards ``max`` (checked every ``resize_interval_s`` seconds). The global
    batch stays ``schedule.batch_size`` whatever the world size (see docs/training.md).

    ``one_worker_group``: train every stage of a run (pretrain -> finetune -> baseline) in one
    Ray Train worker group, so the run pays the worker group's start-up once instead of once per
    stage (``ray_jobs.train.trainer.fit_chain``). Needs workers (``num_workers`` >= 1); a run
    with several pretraining stages (GLCL) or self-training rounds (PLCL) trains one worker
    group per stage as before."""

    num_workers: int | tuple[int, int] = 2
    resize_interval_s: float = Field(60.0, ge=0)  # elastic: how often Ray Train considers growing
    one_worker_group: bool = False
    use_gpu: bool = False
    resources_per_worker: dict[str, float] = Field(default_factory=_one_cpu_per_worker)
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers_ok(cls, v: Any) -> int | tuple[int, int]:
        if isinstance(v, bool):
            raise ValueError("must be an int >= 0 or a range [min, max]")
        if isinstance(v, int):
            if v < 0:
                raise ValueError(f"must be >= 0 (0: local mode), got {v}")
            return v
        if isinstance(v, (list, tuple)):
            if len(v) != 2 or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise ValueError(f"an elastic range is two ints [min, max], got {list(v)}")
            lo, hi = int(v[0]), int(v[1])
            if not 1 <= lo <= hi:
                raise ValueError(f"an elastic range [min, max] needs 1 <= min <= max, got [{lo}, {hi}]")
            return (lo, hi)
        raise ValueError(f"must be an int >= 0 or a range [min, max], got {v!r}")

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return not isinstance(self.num_workers, int)


class CheckpointSection(Strict):
    """``every_steps``: also checkpoint after every N optimiser steps inside an epoch (null: at
    epoch ends only), bounding the work a fault loses to N steps; ``on_preemption``: write a
    checkpoint at the next step boundary when Ray reports a node of the worker group is being
    drained/preempted (``ray.train.get_preemption_info``, a per-step collective)."""

    num_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(1, ge=-1)  # worker-group restarts; -1: unlimited
    every_steps: int | None = Field(None, ge=1)
    on_preemption: bool = False


class LoggingSection(Strict):
    """``tensorboard``: per-epoch scalars written on the driver to RUN_DIR/<stage>/tensorboard;
    ``mlflow_uri``: MLflow tracking URI (``file:///abs/mlruns``, ``http://host:5000``...), logged
    from rank 0 through Ray's MLflow integration (needs the ``mlflow`` extra); ``progress``:
    live progress bar on the driver."""

    tensorboard: bool = True
    mlflow_uri: str | None = None
    progress: bool = True

    @field_validator("mlflow_uri")
    @classmethod
    def _mlflow_installed(cls, v: str | None) -> str | None:
        if v is not None:
            if importlib.util.find_spec("mlflow") is None:
                raise ValueError("MLflow is not installed: pip install 'localcl[mlflow]' (or set it to null)")
        return v


class RuntimeSection(Strict):
    """Execution switches of the training step (``localcl.runtime``); they change speed, not
    the maths, so they are not part of the config hash. ``threads``: intra-op threads of each
    worker (null: torch's default); ``channels_last``: NHWC convolutions; ``compile``:
    ``torch.compile`` of the method's networks (the first steps pay the compilation)."""

    threads: int | None = Field(None, ge=1)
    channels_last: bool = False
    compile: bool = False
