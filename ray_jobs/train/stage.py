"""The stage API: what a training stage needs, resolved once on the driver.

- :class:`Plan`: the data of a run (store, label budget, unlabelled pool, validation and test
  cases), drawn from the store's catalog by :func:`ray_jobs.train.pipeline.prepare_data`;
- :class:`LoopSpec`: the frozen, typed driver-to-worker contract of one Ray Train fit. It is
  built and validated on the driver (:func:`loop_spec`); every worker receives the same object
  and trusts it (no re-validation, nothing written back);
- the run-directory layout (:data:`STAGE_DIRS`, :func:`stage_done`) and the export of a
  stage's best weights (:func:`export_checkpoint`, :func:`export_state`, :func:`export_stage`).

Layout of RUN_DIR (``docs/interfaces.md``)::

    config.yaml                    resolved, validated config
    pretrain/        Ray Train storage of the pretraining fit(s); GLCL: one per method stage
    pretrain/model/  exported pretrained method (model.pt + model.json)
    finetune/, finetune/model/, finetune_baseline/, finetune_baseline/model/
    <stage>/history.csv            one row per epoch
    eval/<name>/                   written by the evaluation step
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
import torch
from pydantic import BaseModel, ConfigDict

from localcl.methods.base import BaseMethodConfig
from ray_jobs.config import Config
from ray_jobs.errors import UserError
from ray_jobs.train.checkpoint import build_model, export_model, read_spec
from ray_jobs.train.hooks import env_hooks
from ray_jobs.train.names import BEST_FILE, STAGE_DIRS, STATE_FILE, VAL_METRICS
from storage.remote import join_uri

__all__ = [
    "BEST_FILE",
    "ChainStep",
    "STAGE_DIRS",
    "STATE_FILE",
    "VAL_METRICS",
    "Init",
    "LoopSpec",
    "Plan",
    "Section",
    "export_checkpoint",
    "export_stage",
    "export_state",
    "loop_spec",
    "model_spec",
    "stage_done",
    "write_history",
]


Section = Literal["pretrain", "finetune", "baseline"]


@dataclass
class Plan:
    """Everything a stage needs to know about the data, resolved once on the driver."""

    store: str
    num_classes: int
    label_names: dict[str, str]
    labelled: list[str]
    unlabelled: list[str]
    pretrain_cases: list[str]
    val: list[str]
    test: list[str]
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Init(BaseModel):
    """Initial weights of a fit: ``backbone`` (the backbone of an exported pretrained method,
    loaded with ``load_backbone``) or ``state`` (an exported model of the same network: GLCL's
    local stage, PLCL round r)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["backbone", "state"]
    dir: str


class LoopSpec(BaseModel):
    """The driver-to-worker contract of one Ray Train fit (``train_func(spec)``).

    Frozen: built once on the driver by :func:`loop_spec` (types checked there), pickled to
    every worker as is. ``config`` and ``method_cfg`` are the driver's validated objects.

    Attributes:
        config: the validated run config.
        section: the config section trained ("pretrain", "finetune", "baseline").
        method_name: ``METHODS`` (pretrain) or ``FINETUNE`` key of the network.
        method_cfg: the method's validated ``Config``.
        store: URI of the Zarr store (the one place it travels).
        num_classes: classes including background.
        labelled, unlabelled, pretrain_cases, val: case ids (``val`` empty in pretraining).
        model: the ``model.json`` spec of the network (preprocessing for validation).
        use_unlabelled: fine-tuning draws an unlabelled batch too.
        init: initial weights, or ``None`` (random initialisation).
        method_stage: the method's pretraining stage (GLCL "global"/"local"), or ``None``.
        pseudo: derived array holding the pseudo-labels of a PLCL round, or ``None``.
        round: PLCL self-training round, or ``None``.
        hooks: test/diagnostic hooks (``events`` file, ``kill`` spec).
        stage_name: run-directory stage name (set by ``fit_stage``).
        progress_queue: ``ray.util.queue.Queue`` rank 0 feeds with progress (``fit_stage``).
        local_ckpt_root: where Ray Train local mode keeps its checkpoints (``fit_stage``).
        stop_request: the stage's :class:`ray_jobs.train.stop.StopRequest` actor
            (``fit_stage``; None: no graceful stop).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", arbitrary_types_allowed=True)

    config: Config
    section: Section
    method_name: str
    method_cfg: BaseMethodConfig
    store: str
    num_classes: int
    labelled: tuple[str, ...]
    unlabelled: tuple[str, ...]
    pretrain_cases: tuple[str, ...]
    val: tuple[str, ...] = ()
    model: dict[str, Any]
    use_unlabelled: bool = False
    init: Init | None = None
    method_stage: str | None = None
    pseudo: str | None = None
    round: int | None = None
    hooks: dict[str, Any] = {}
    stage_name: str = ""
    progress_queue: Any = None
    local_ckpt_root: str | None = None
    stop_request: Any = None

    @property
    def schedule(self) -> Any:
        """The schedule of this fit (``stage_schedule`` of the method stage applied)."""
        return self.config.schedule_for(self.section, self.method_stage)


class ChainStep(BaseModel):
    """One stage of a one-worker-group run (``scaling.one_worker_group``;
    :func:`ray_jobs.train.worker.run_chain`): its :class:`LoopSpec`, and the run directory
    where rank 0 writes the stage when it ends: ``RUN_DIR/<stage dir>/history.csv`` and the
    best weights in :attr:`model_dir`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    spec: LoopSpec
    run_dir: str

    @property
    def model_dir(self) -> str:
        """``RUN_DIR/<stage dir>/model`` (:func:`stage_model_dir`)."""
        return stage_model_dir(self.run_dir, self.spec.section)


def write_history(run_dir: str, stage: str, history: list[dict[str, Any]]) -> str:
    """RUN_DIR/<stage>/history.csv: one row per epoch (columns = union of metric keys)."""
    keys: list[str] = []
    for row in history:
        keys += [k for k in row if k not in keys]
    order = ["epoch"] + [k for k in keys if k != "epoch"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=order)
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k, "") for k in order})
    fs, root = fsspec.core.url_to_fs(run_dir)
    path = f"{root.rstrip('/')}/{stage}/history.csv"
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(buf.getvalue())
    return path


def model_spec(cfg: Config, plan: Plan, section: str) -> dict[str, Any]:
    """The model.json of ``section``'s network (without the weights hash)."""
    stage = getattr(cfg, section)
    return {
        "stage": "pretrain" if section == "pretrain" else "finetune",
        "name": stage.method.name,
        "config": cfg.method_config(section).model_dump(mode="json"),
        "in_channels": cfg.model.in_channels,
        "num_classes": plan.num_classes,
        "size": list(cfg.data.size),
        "spacing_mm": list(cfg.data.spacing_mm) if cfg.data.spacing_mm else None,
        "normalisation": {"kind": "percentile_minmax", "low_percentile": 1.0, "high_percentile": 99.0},
        "label_names": plan.label_names,
        "label_budget": cfg.data.label_budget,
        "labelled_cases": plan.labelled,
        "run": cfg.name,
        "config_hash": cfg.hash(),
    }


def loop_spec(
    cfg: Config,
    plan: Plan,
    section: Section,
    *,
    init: Mapping[str, Any] | Init | None = None,
    hooks: Mapping[str, Any] | None = None,
    method_stage: str | None = None,
    pseudo: str | None = None,
    round: int | None = None,
    model: Mapping[str, Any] | None = None,
) -> LoopSpec:
    """The :class:`LoopSpec` of fitting ``section`` of ``cfg`` on ``plan`` (validated here,
    once). ``model`` overrides the model.json spec (default :func:`model_spec`); ``hooks``
    default to :func:`ray_jobs.train.hooks.env_hooks` (``LOCALCL_EVENTS_DIR``)."""
    return LoopSpec(
        config=cfg,
        section=section,
        method_name=getattr(cfg, section).method.name,
        method_cfg=cfg.method_config(section),
        store=plan.store,
        num_classes=plan.num_classes,
        labelled=tuple(plan.labelled),
        unlabelled=tuple(plan.unlabelled),
        pretrain_cases=tuple(plan.pretrain_cases),
        val=tuple(plan.val) if section != "pretrain" else (),
        model=dict(model) if model is not None else model_spec(cfg, plan, section),
        use_unlabelled=section == "finetune",
        init=Init(**init) if isinstance(init, Mapping) else init,
        hooks=dict(hooks) if hooks is not None else env_hooks(section, method_stage),
        method_stage=method_stage,
        pseudo=pseudo,
        round=round,
    )


def stage_done(model_dir: str, cfg: Config) -> bool:
    """Whether ``model_dir`` holds a model exported by a run with ``cfg``'s config hash."""
    try:
        return read_spec(model_dir).get("config_hash") == cfg.hash()
    except UserError:
        return False


def export_checkpoint(spec: dict[str, Any], ckpt_dir: str, model_dir: str) -> dict[str, Any]:
    """Rebuild the network of ``spec`` on the driver, load the checkpoint's best weights
    (``best.pt``) and export them to ``model_dir``."""
    state = torch.load(os.path.join(ckpt_dir, BEST_FILE), map_location="cpu", weights_only=True)
    return export_state(spec, state, model_dir)


def export_state(spec: dict[str, Any], state: dict[str, Any], model_dir: str) -> dict[str, Any]:
    """Export a state_dict of the network ``spec`` describes (strict load first, so a
    mismatch fails here and not at inference)."""
    net = build_model(spec)
    net.load_state_dict(state)
    return export_model(model_dir, net, spec)


def export_stage(cfg: Config, plan: Plan, section: str, ckpt_dir: str, model_dir: str) -> dict[str, Any]:
    """Rebuild ``section``'s network on the driver, load the best weights, export them."""
    return export_checkpoint(model_spec(cfg, plan, section), ckpt_dir, model_dir)


def stage_model_dir(run_dir: str, section: str) -> str:
    """``RUN_DIR/<stage dir>/model``: where ``section``'s exported model lives."""
    return join_uri(run_dir, STAGE_DIRS[section], "model")
