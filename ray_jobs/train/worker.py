"""The per-worker training function of every Ray Train job (pretraining and fine-tuning).

``train_func({"spec": spec})`` runs on each of the ``W`` workers of a ``TorchTrainer``, with
``spec`` the frozen, validated :class:`ray_jobs.train.stage.LoopSpec` the driver built;
``train_func({"chain": [...], "then": ...})`` runs several stages in one worker group
(:func:`run_chain`). For each stage, :func:`fit_loop`

1. builds the storage samplers for this worker, sharded by ``(rank, W)``
   (:mod:`ray_jobs.train.loaders`): the global batch of ``B`` slices is split into ``B / W`` per
   worker; one epoch is ``steps_per_epoch`` steps;
2. builds the method (``METHODS[name]`` to pretrain, ``FINETUNE[name]`` to fine-tune), wraps it in
   :class:`StepModule` so that the method's ``pretrain_step`` / ``finetune_step`` run inside the
   DDP ``forward`` (gradient synchronisation is armed there; calling the raw method would bypass
   it), and calls ``ray.train.torch.prepare_model(find_unused_parameters=True)`` (heads unused in
   a phase would otherwise stall DDP's reducer);
3. builds the optimiser and a per-step LR schedule
   ``lr(s) = lr0 * w(s) * f(s)`` with linear warm-up ``w(s) = min(1, (s+1)/S_w)`` and
   ``f`` = 1 (constant), ``r + (1-r)(1+cos(pi s/S))/2`` (cosine) or ``r + (1-r)(1-s/S)^0.9`` (poly),
   ``S`` the total number of steps of the stage and ``r = min_lr_ratio``;
4. resumes from ``ray.train.get_checkpoint()`` when there is one (worker restart after a failure,
   or a driver re-fit with the same run name): model (EMA/momentum branches and queues are
   registered buffers/sub-modules of the method, so they are in its state_dict), optimiser,
   scheduler, AMP scaler, best model so far, history and the global step; training continues at
   the checkpoint's loop position (the next epoch, or the step inside an epoch after a step
   checkpoint: samplers skip the consumed plan prefix and the RNGs are restored, see
   :mod:`ray_jobs.train.loop_state`);
5. per epoch: re-derives every RNG (torch/CUDA, numpy, python, and any ``torch.Generator`` owned by
   the method) from ``(seed, rank, epoch)`` and calls ``sampler.set_epoch(epoch)``, so a resumed
   epoch draws exactly what an uninterrupted run would; runs the steps (autocast per
   :func:`localcl.runtime.autocast_dtype`: bf16/fp16 on CUDA, bf16 on CPU only with
   ``schedule.amp: bf16``; the ``runtime`` switches are applied to the method first); every
   ``checkpoint.every_steps`` steps (and once at the step boundary after Ray reports a
   preemption, with ``checkpoint.on_preemption``) writes a step checkpoint; in fine-tuning,
   computes the validation Dice; then every rank calls ``ray.train.report(metrics, checkpoint)``
   (each rank's checkpoint holds its RNG states, rank 0's also the training state).

Fine-tuning extras: ``spec.pseudo`` (PLCL self-training round ``spec.round``, see
:mod:`ray_jobs.train.self_training`) makes the unlabelled sampler read that derived array as
labels, delivered to the strategy under its ``pseudo_label_key``; ``method.start_round(r)`` is
called before training. With ``logging.mlflow_uri`` rank 0 logs every epoch's metrics to MLflow
through ``ray.air.integrations.mlflow.setup_mlflow``. Every history row carries
``start_epoch``, the epoch this worker group started at (1, or the resumed epoch).

Checkpoint directory: ``rng_rank<r>.pt`` from every rank; from rank 0 ``state.pt``
(model/optimiser/scheduler/scaler state, last completed epoch, global step, sampler epoch,
seed, history, best score, ``loop`` position) and ``best.pt`` (the model state_dict with
the best validation Dice, or the last epoch's when there is no validation). Both are read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
import os
import random
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
from torch import nn

from localcl.methods import FINETUNE, METHODS
from localcl.methods.base import FinetuneStrategy, PretrainMethod
from localcl.runtime import RuntimeOptions, apply_runtime, autocast_dtype
from ray_jobs.train.checkpoint import load_model, load_state
from ray_jobs.train.hooks import event, push_progress, should_kill
from ray_jobs.train.loaders import build_loaders, cycle, join_batches, make_loader
from ray_jobs.train.loop_state import (
    LoopPosition,
    capture_rng,
    load_rng,
    preemption_pending,
    report_checkpoint,
    restore_rng,
    resume_position,
    step_checkpoint_due,
    train_state,
    wait_for_restart,
)
from ray_jobs.train.stage import (
    BEST_FILE,
    STAGE_DIRS,
    STATE_FILE,
    ChainStep,
    LoopSpec,
    export_state,
    write_history,
)
from ray_jobs.train.stop import StopWatch
from ray_jobs.train.tracking import setup_mlflow
from ray_jobs.train.validation import validation_dice

__all__ = [
    "LoopOutcome",
    "StepModule",
    "build_method",
    "epoch_seed",
    "fit_loop",
    "lr_factor",
    "reseed",
    "run_chain",
    "train_func",
]


class StepModule(nn.Module):
    """Routes ``forward`` to the method's step so DDP's forward hooks wrap the whole step.

    ``forward("pretrain", batch, step)`` -> ``method.pretrain_step(batch, step=step)``;
    ``forward("finetune", batch_l, batch_u, step, total)`` -> ``method.finetune_step(...)``.
    Returns the method's dict of tensors (``out["loss"]`` is the scalar to minimise).
    """

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method: Any = method  # a PretrainMethod or FinetuneStrategy (their step methods differ)

    def forward(self, kind: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if kind == "pretrain":
            out: dict[str, torch.Tensor] = self.method.pretrain_step(*args, **kwargs)
            return out
        if kind == "finetune":
            res: dict[str, torch.Tensor] = self.method.finetune_step(*args, **kwargs)
            return res
        raise ValueError(f"StepModule.forward: unknown kind {kind!r}")


def lr_factor(step: int, total: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the base LR at optimiser step ``step`` (0-based) of ``total``."""
    w = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    t = min(max(step / max(total, 1), 0.0), 1.0)
    if kind == "cosine":
        f = min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    elif kind == "poly":
        f = min_ratio + (1 - min_ratio) * (1 - t) ** 0.9
    else:
        f = 1.0
    return w * f


def epoch_seed(seed: int, rank: int, epoch: int) -> int:
    """Deterministic per-(seed, rank, epoch) seed in [0, 2**31) (all arguments >= 0; epoch 0
    seeds the initial weights, training epochs are 1-based)."""
    return int(np.random.SeedSequence([seed, rank, epoch]).generate_state(1)[0] % (2**31))


def reseed(method: PretrainMethod | FinetuneStrategy | None, seed: int) -> None:
    """Seed torch/CUDA/numpy/python and the method's view/sampling generator
    (``method.reseed(seed)``, which adds its own rank offset)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    if method is not None:
        method.reseed(seed)


def build_optimizer(params: list[nn.Parameter], oc: Any, lr: float) -> torch.optim.Optimizer:
    if oc.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    cls = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# --------------------------------------------------------------------------- model
def build_method(spec: LoopSpec) -> PretrainMethod | FinetuneStrategy:
    """The network of ``spec`` (``METHODS`` to pretrain, ``FINETUNE`` to fine-tune), with the
    initial weights ``spec.init``."""
    registry: Mapping[str, type[PretrainMethod] | type[FinetuneStrategy]] = (
        METHODS if spec.section == "pretrain" else FINETUNE
    )
    method = registry[spec.method_name](spec.method_cfg, spec.config.model.in_channels, spec.num_classes)
    init = spec.init
    if init is not None:
        if init.kind == "backbone":  # pretrained method export -> fine-tuning backbone
            if not isinstance(method, FinetuneStrategy):
                raise ValueError("init kind 'backbone' loads into a fine-tuning strategy")
            pre, _ = load_model(init.dir)
            assert isinstance(method, FinetuneStrategy) and isinstance(pre, (PretrainMethod, FinetuneStrategy))
            method.load_backbone(pre.backbone_state(), strict=False)
        else:  # "state": same network (GLCL phase 2, PLCL round r)
            method.load_state_dict(load_state(init.dir), strict=False)
    return method


# --------------------------------------------------------------------------- main loop
def train_func(config: Mapping[str, Any]) -> None:
    """Entry point of every Ray Train worker: ``config["spec"]``, one stage's :class:`LoopSpec`
    (module docstring), or ``config["chain"]``, several stages in this worker group
    (:func:`run_chain`), then ``config["then"] = (fn, arg)``: ``fn(arg)`` (the evaluation)."""
    if "chain" in config:
        if run_chain(config["chain"]) and config.get("then"):
            config["then"][0](config["then"][1])
    else:
        fit_loop(config["spec"], ray.train.get_checkpoint())


@dataclass
class LoopOutcome:
    """What :func:`fit_loop` leaves: rank 0's best weights (else None), the history (a row per
    epoch) and whether it stopped early on the driver's request."""

    best_state: dict[str, torch.Tensor] | None
    history: list[dict[str, Any]]
    stopped: bool = False


def run_chain(steps: Sequence[ChainStep]) -> bool:
    """Train ``steps`` one after another in this worker group (``scaling.one_worker_group``);
    False when the driver asked the stages to stop early.

    After each stage, rank 0 writes its ``history.csv`` and exports its best weights to
    ``step.model_dir`` (the next stage's ``init`` may read them); every rank waits for it (a
    barrier). Each checkpoint's ``state.pt`` has ``chain = {"section", "histories"}``: its stage
    and the histories before it. After a restart the stages before the checkpoint's are skipped
    (exported already), that stage resumes from it, the later ones start fresh; a checkpoint of
    a stage not in ``steps`` (a re-run whose earlier stages were done) is ignored."""
    ckpt = ray.train.get_checkpoint()
    histories: dict[str, list[dict[str, Any]]] = {}
    at = 0
    if ckpt is not None:
        with ckpt.as_directory() as d:
            chain = dict(torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True).get("chain") or {})
        sections = [s.spec.section for s in steps]
        if chain.get("section") in sections:
            at = sections.index(chain["section"])
            histories = {str(k): list(v) for k, v in dict(chain.get("histories") or {}).items()}
        else:
            ckpt = None
    rank = ray.train.get_context().get_world_rank()
    for i, step in enumerate(steps):
        if i < at:
            continue
        state = {"section": step.spec.section, "histories": dict(histories)}
        out = fit_loop(step.spec, ckpt if i == at else None, chain=state)
        if out.stopped:
            return False
        histories[step.spec.section] = out.history
        if rank == 0:  # the history first: a stage whose model exists is skipped on a re-run
            assert out.best_state is not None
            write_history(step.run_dir, STAGE_DIRS[step.spec.section], out.history)
            export_state(step.spec.model, out.best_state, step.model_dir)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # the next stage may load what rank 0 exported
    return True


def fit_loop(  # noqa: C901 - one linear story
    spec: LoopSpec, ckpt: ray.train.Checkpoint | None, chain: dict[str, Any] | None = None
) -> LoopOutcome:
    """Train one stage (``spec``), resuming from ``ckpt`` when given; ``chain``: the
    :func:`run_chain` entry stored in every checkpoint's ``state.pt``. See the module docstring."""
    cfg = spec.config
    section, mstage = spec.section, spec.method_stage
    schedule = spec.schedule
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    reseed(None, epoch_seed(cfg.data.seed, 0, 0))  # same initial weights on every rank (epochs start at 1)

    method = build_method(spec)
    pseudo_key: str | None = None
    if isinstance(method, FinetuneStrategy):
        if spec.round:  # PLCL self-training round r
            method.start_round(spec.round)
        if spec.pseudo:
            pseudo_key = method.pseudo_label_key
    method.to(device)
    apply_runtime(method, RuntimeOptions(**cfg.runtime.model_dump()))
    step_module = StepModule(method)
    if world > 1:
        model = ray.train.torch.prepare_model(step_module, parallel_strategy_kwargs={"find_unused_parameters": True})
    else:
        model = step_module
    if isinstance(method, PretrainMethod):
        params = list(method.stage_parameters(mstage))
    else:
        params = [p for p in method.parameters() if p.requires_grad]
    optim = build_optimizer(params, getattr(cfg, section).optim, cfg.lr(section))
    total_steps = schedule.epochs * schedule.steps_per_epoch
    if isinstance(method, PretrainMethod):
        method.set_total_steps(total_steps)  # step schedules (key momentum) need the stage length
    warm = int(round(schedule.warmup_epochs * schedule.steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: lr_factor(s, total_steps, warm, schedule.scheduler, schedule.min_lr_ratio)
    )
    dtype = autocast_dtype(schedule.amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    pos, rng, history, best = LoopPosition(world_size=world), None, [], {"score": -math.inf, "epoch": 0}
    best_state: dict[str, torch.Tensor] | None = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            best_state = torch.load(Path(d) / BEST_FILE, map_location="cpu", weights_only=True)
            pos = resume_position(st)  # mid-epoch after a step checkpoint (loop_state)
            rng = load_rng(d, rank) if pos.step and pos.world_size == world else None
        method.load_state_dict(st["model"])
        optim.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        history = list(st["history"])
        best = dict(st["best"])

    start_epoch, global_step, first_epoch = pos.epoch, pos.global_step, pos.epoch
    data = build_loaders(spec, rank, world)
    nw = cfg.data.loader_workers
    main_loader = make_loader(data["main"], None if data["batched"] else data["per_worker"], nw)
    u_loader = make_loader(data["unlabelled"], data["per_worker_u"], nw) if data["unlabelled"] is not None else None
    lab_loader = make_loader(data["labelled"], data["per_worker_lab"], nw) if data.get("labelled") is not None else None
    hooks, ck = spec.hooks, cfg.checkpoint
    stop_watch = StopWatch(spec.stop_request, rank)
    queue = spec.progress_queue if rank == 0 else None
    mlflow = setup_mlflow(spec) if cfg.logging.mlflow_uri else None
    event(hooks, rank, "start", start_epoch)
    event(hooks, rank, "world", world)
    event(hooks, rank, "pid", os.getpid())  # which node trains what (the fault tests map pids to nodes)
    if pos.step:
        event(hooks, rank, "resume_step", global_step)

    for epoch in range(start_epoch, schedule.epochs + 1):
        event(hooks, rank, "epoch", epoch)
        mid = pos.step > 0 and epoch == pos.epoch  # resumed from a step checkpoint of this epoch
        first_step = pos.step if mid else 0
        reseed(method, epoch_seed(cfg.data.seed, rank, epoch))
        if mid and rng is not None:  # same world size: this rank's RNGs at that step
            restore_rng(method, rng)
        elif mid:  # resized: RNGs derived from (seed, rank, epoch, step)
            reseed(method, epoch_seed(cfg.data.seed, rank, epoch * 2**20 + first_step))
        start = dict(pos.consumed) if mid else {}
        per_step = {
            "main": (1 if data["batched"] else data["per_worker"]) * world,
            "unlabelled": data.get("per_worker_u", 0) * world,
            "labelled": data.get("per_worker_lab", 0) * world,
        }
        for name in ("main", "unlabelled", "labelled"):  # skip what the worker group drew before the checkpoint
            if data.get(name) is not None:
                data[name].set_epoch(epoch, start=start.get(name, 0))
        method.train()
        it_l = iter(main_loader)
        it_u = cycle(u_loader) if u_loader is not None else None
        it_lab = cycle(lab_loader) if lab_loader is not None else None
        sums: dict[str, float] = dict(pos.sums) if mid else {}
        t0 = time.perf_counter()
        last_push = 0.0
        n_seen = pos.n_seen if mid else 0
        for i in range(first_step, schedule.steps_per_epoch):
            try:
                batch = next(it_l)
            except StopIteration:  # a sampler shorter than asked: restart it
                it_l = iter(main_loader)
                batch = next(it_l)
            if it_lab is not None:  # pretraining: the label budget's share of the batch
                batch = join_batches(batch, next(it_lab))
            batch = _to_device(batch, device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                if section == "pretrain":
                    out = model("pretrain", batch, step=global_step, stage=mstage)
                else:
                    bu = _to_device(next(it_u), device) if it_u is not None else None
                    if bu is not None and pseudo_key:  # PLCL: pseudo-labels under their key
                        bu[pseudo_key] = bu.pop("label")
                    out = model("finetune", batch, bu, global_step, total_steps)
            loss = out["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {epoch} step {i}: {loss.item()}")
            optim.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optim)
            else:
                loss.backward()
            oc = getattr(cfg, section).optim
            if oc.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, oc.grad_clip)
            if scaler is not None:
                scaler.step(optim)
                scaler.update()
            else:
                optim.step()
            sched.step()
            method.on_after_step()
            global_step += 1
            n_seen += int(batch["image"].shape[0])
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
            event(hooks, rank, "step", global_step)
            preempted = preemption_pending() if ck.on_preemption else None
            stopping = stop_watch.due(device)  # the driver got SIGTERM (jobs stop)
            if (
                step_checkpoint_due(ck.every_steps, i + 1, schedule.steps_per_epoch)
                or preempted is not None
                or stopping
            ):
                done = LoopPosition(
                    epoch,
                    i + 1,
                    global_step,
                    world,
                    {k: start.get(k, 0) + (i + 1 - first_step) * n for k, n in per_step.items()},
                    dict(sums),
                    n_seen,
                )
                state = train_state(
                    method, optim, sched, scaler, epoch - 1, global_step, cfg.data.seed, history, best, done, chain
                )
                flag = int(preempted is not None)
                m = {
                    "epoch_in_progress": epoch,
                    "step": i + 1,
                    "global_step": global_step,
                    "preempted": flag,
                    "stopped": int(stopping),
                }
                report_checkpoint(
                    m,
                    state,
                    best_state,
                    capture_rng(method),
                    rank,
                    spec.local_ckpt_root,
                    f"epoch{epoch:04d}-step{i + 1:05d}",
                )
                if preempted is not None:  # the node goes: nothing after this checkpoint would be kept
                    event(hooks, rank, "preempted", global_step)
                    wait_for_restart(preempted)
                if stopping:  # the driver raises StageStopped; a re-run resumes here
                    event(hooks, rank, "stopped", global_step)
                    return LoopOutcome(best_state, history, stopped=True)
            if hooks.get("kill") and should_kill(hooks["kill"], rank, epoch, i):
                os.kill(os.getpid(), signal.SIGKILL)
            now = time.perf_counter()
            if queue is not None and (now - last_push > 1.0 or i == schedule.steps_per_epoch - 1):
                last_push = now
                push_progress(
                    queue,
                    {
                        "stage": spec.stage_name,
                        "epoch": epoch,
                        "epochs": schedule.epochs,
                        "step": i + 1,
                        "steps": schedule.steps_per_epoch,
                        "loss": sums.get("loss", 0.0) / (i + 1),
                        "samples_per_s": n_seen * max(world, 1) / max(now - t0, 1e-9),
                    },
                )
        elapsed = time.perf_counter() - t0
        metrics: dict[str, Any] = {f"{k}": v / schedule.steps_per_epoch for k, v in sums.items()}
        # start_epoch: the epoch this worker group (re)started at; > 1 on rows trained after a
        # resume, so a history proves which epochs ran once and which were restored
        metrics.update(
            epoch=epoch,
            start_epoch=first_epoch,
            global_step=global_step,
            lr=sched.get_last_lr()[0],
            time_s=elapsed,
            samples_per_s=n_seen * max(world, 1) / max(elapsed, 1e-9),
        )
        score = None
        if section != "pretrain":
            t_val = time.perf_counter()
            val = validation_dice(method, spec, rank, world, device)
            if val is not None:
                metrics.update(val)
                score = val["val_dice"]
                metrics["val_time_s"] = time.perf_counter() - t_val
        improved = score is None or score > best["score"]
        if improved:
            best = {"score": score if score is not None else -math.inf, "epoch": epoch}
            if rank == 0:
                best_state = {k: v.detach().cpu().clone() for k, v in method.state_dict().items()}
        metrics["best_epoch"] = best["epoch"]
        if score is not None:  # the val Dice of best.pt, the checkpoint the stage exports
            metrics["best_val_dice"] = best["score"]
        history.append(dict(metrics))
        if mlflow is not None:
            mlflow.log_metrics(
                {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}, step=epoch
            )
        nxt = LoopPosition(epoch + 1, 0, global_step, world)
        state = train_state(method, optim, sched, scaler, epoch, global_step, cfg.data.seed, history, best, nxt, chain)
        report_checkpoint(
            metrics, state, best_state, capture_rng(method), rank, spec.local_ckpt_root, f"epoch{epoch:04d}"
        )
        event(hooks, rank, "reported", epoch)
    if mlflow is not None:
        mlflow.end_run()
    return LoopOutcome(best_state, history)
