"""The per-worker training function of every Ray Train job (pretraining and fine-tuning).

``train_func(loop_cfg)`` runs on each of the ``W`` workers of a ``TorchTrainer``. It

1. rebuilds the validated :class:`ray_jobs.config.Config` from ``loop_cfg["config"]``;
2. builds the storage samplers for this worker, sharded by ``(rank, W)``: the global batch of
   ``B`` slices is split into ``B / W`` per worker; one epoch is ``steps_per_epoch`` steps;
3. builds the method (``METHODS[name]`` to pretrain, ``FINETUNE[name]`` to fine-tune), wraps it in
   :class:`StepModule` so that the method's ``pretrain_step`` / ``finetune_step`` run inside the
   DDP ``forward`` (gradient synchronisation is armed there; calling the raw method would bypass
   it), and calls ``ray.train.torch.prepare_model(find_unused_parameters=True)`` (heads unused in
   a phase would otherwise stall DDP's reducer);
4. builds the optimiser and a per-step LR schedule
   ``lr(s) = lr0 * w(s) * f(s)`` with linear warm-up ``w(s) = min(1, (s+1)/S_w)`` and
   ``f`` = 1 (constant), ``r + (1-r)(1+cos(pi s/S))/2`` (cosine) or ``r + (1-r)(1-s/S)^0.9`` (poly),
   ``S`` the total number of steps of the stage and ``r = min_lr_ratio``;
5. resumes from ``ray.train.get_checkpoint()`` when there is one (worker restart after a failure,
   or a driver re-fit with the same run name): model (EMA/momentum branches and queues are
   registered buffers/sub-modules of the method, so they are in its state_dict), optimiser,
   scheduler, AMP scaler, best model so far, history and the global step; training continues at
   the epoch after the checkpoint's;
6. per epoch: re-derives every RNG (torch/CUDA, numpy, python, and any ``torch.Generator`` owned by
   the method) from ``(seed, rank, epoch)`` and calls ``sampler.set_epoch(epoch)``, so a resumed
   epoch draws exactly what an uninterrupted run would; runs the steps (autocast bf16/fp16 on CUDA
   only); in fine-tuning, computes the validation Dice; then every rank calls
   ``ray.train.report(metrics, checkpoint)`` and rank 0 alone attaches the checkpoint.

Fine-tuning extras: ``lc["pseudo"]`` (PLCL self-training round ``lc["round"]``, see
:mod:`ray_jobs.train.self_training`) makes the unlabelled sampler read that derived array as labels,
delivered to the strategy under its ``pseudo_label_key``; ``method.start_round(r)`` is called
before training. With ``logging.mlflow_uri`` rank 0 logs every epoch's metrics to MLflow
through ``ray.air.integrations.mlflow.setup_mlflow``. Every history row carries
``start_epoch``, the epoch this worker group started at (1, or the resumed epoch).

Checkpoint directory (rank 0): ``state.pt`` (model/optimiser/scheduler/scaler state, epoch,
global step, sampler epoch, seed, history, best score) and ``best.pt`` (the model state_dict with
the best validation Dice, or the last epoch's when there is no validation). Both are read with
``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
import os
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

STATE_FILE = "state.pt"
VAL_METRICS = ("val_dice", "val_hd95", "best_val_dice")  # per-epoch validation metrics (fine-tuning)
BEST_FILE = "best.pt"


class StepModule(nn.Module):
    """Routes ``forward`` to the method's step so DDP's forward hooks wrap the whole step.

    ``forward("pretrain", batch, step)`` -> ``method.pretrain_step(batch, step=step)``;
    ``forward("finetune", batch_l, batch_u, step, total)`` -> ``method.finetune_step(...)``.
    Returns the method's dict of tensors (``out["loss"]`` is the scalar to minimise).
    """

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, kind: str, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        if kind == "pretrain":
            return self.method.pretrain_step(*args, **kwargs)
        if kind == "finetune":
            return self.method.finetune_step(*args, **kwargs)
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


def reseed(method: Optional[nn.Module], seed: int) -> None:
    """Seed torch/CUDA/numpy/python and the method's view/sampling generator
    (``method.reseed(seed)``, which adds its own rank offset)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)
    if method is not None and hasattr(method, "reseed"):
        method.reseed(seed)


def build_optimizer(params: list[nn.Parameter], oc: Any, lr: float) -> torch.optim.Optimizer:
    if oc.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=oc.momentum, weight_decay=oc.weight_decay)
    cls = torch.optim.AdamW if oc.name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, betas=tuple(oc.betas), weight_decay=oc.weight_decay)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v)
            for k, v in batch.items()}


def _cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def amp_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """Autocast dtype: None on CPU (AMP is CUDA-only here) or when ``mode == "off"``."""
    if device.type != "cuda" or mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


# --------------------------------------------------------------------------- data
def build_loaders(lc: dict[str, Any], cfg: Any, method_cls: Any, rank: int, world: int,
                  schedule: Any) -> dict[str, Any]:
    """Samplers for this worker. Returns ``{"main": Dataset, "unlabelled": Dataset|None}``."""
    from storage import samplers

    size = tuple(cfg.data.size)
    uri, so = lc["store"], cfg.data.storage_options or None
    per_worker = schedule.batch_size // max(world, 1)
    n_samples = per_worker * schedule.steps_per_epoch * max(world, 1)
    seed = cfg.data.seed
    common = dict(size=size, seed=seed, rank=rank, world_size=max(world, 1), storage_options=so)
    if cfg.data.spacing_mm is not None:
        sy, sx = cfg.data.spacing_mm
        if sy != sx:
            raise ValueError("data.spacing_mm: the samplers resample to isotropic in-plane pixels")
        common["spacing_mm"] = float(sy)
    hidden = list(lc["unlabelled"])  # outside the label budget: labels never reach training
    if lc["section"] == "pretrain":
        kind = method_cls.pretrain_batch
        cases = lc["pretrain_cases"]
        if kind == "partition":
            mcfg = lc["_method_cfg"]
            parts = int(getattr(mcfg, "partitions", 4))
            if per_worker % parts:
                raise ValueError(f"pretrain.schedule.batch_size per worker ({per_worker}) must be a "
                                 f"multiple of the method's partitions ({parts})")
            m = max(1, per_worker // parts)
            ds = samplers.PartitionBatchDataset(
                uri, cases, size, volumes_per_batch=m, partitions=parts,
                batches_per_epoch=schedule.steps_per_epoch * max(world, 1),
                seed=seed, rank=rank, world_size=max(world, 1), storage_options=so)
            return {"main": ds, "batched": True, "unlabelled": None, "per_worker": m * parts}
        derived = ("superpixels",) if kind == "slices+superpixels" else ()
        ds = samplers.SliceDataset(uri, cases, samples_per_epoch=n_samples, derived=derived,
                                   hide_labels=hidden, **common)
        return {"main": ds, "batched": False, "unlabelled": None, "per_worker": per_worker}
    ds_l = samplers.SliceDataset(uri, lc["labelled"], samples_per_epoch=n_samples,
                                 fg_oversample=cfg.data.fg_oversample, **common)
    ds_u = None
    ub = schedule.unlabelled_batch_size or schedule.batch_size
    if lc.get("use_unlabelled") and lc["unlabelled"]:
        pseudo = lc.get("pseudo")  # PLCL round r: labels come from the derived "pseudo_r{r}"
        ds_u = samplers.SliceDataset(
            uri, lc["unlabelled"], samples_per_epoch=(ub // max(world, 1)) * schedule.steps_per_epoch
            * max(world, 1), hide_labels=[] if pseudo else hidden,
            label_array=pseudo or "label", **{**common, "seed": seed + 1})
    return {"main": ds_l, "batched": False, "unlabelled": ds_u, "per_worker": per_worker,
            "per_worker_u": ub // max(world, 1)}


def _loader(ds: Any, batch: Optional[int], workers: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=False, drop_last=batch is not None,
        num_workers=workers, persistent_workers=False)


# --------------------------------------------------------------------------- model
def build_method(lc: dict[str, Any], cfg: Any) -> tuple[Any, nn.Module]:
    from localcl.methods import FINETUNE, METHODS

    from ray_jobs.train.checkpoint import load_model, load_state

    section = lc["section"]
    registry = METHODS if section == "pretrain" else FINETUNE
    cls = registry[lc["method_name"]]
    method = cls(lc["_method_cfg"], in_channels=cfg.model.in_channels,
                 num_classes=lc["num_classes"])
    init = lc.get("init")
    if init:
        if init["kind"] == "backbone":  # pretrained method export -> fine-tuning backbone
            pre, _ = load_model(init["dir"])
            method.load_backbone(pre.backbone_state(), strict=False)
        elif init["kind"] == "state":  # same network (GLCL phase 2, PLCL round r)
            state = load_state(init["dir"])
            method.load_state_dict(state, strict=False)
        else:
            raise ValueError(f"unknown init kind {init['kind']!r}")
    return cls, method


# --------------------------------------------------------------------------- validation
def validation_dice(method: nn.Module, lc: dict[str, Any], cfg: Any, rank: int, world: int,
                    device: torch.device) -> Optional[dict[str, float]]:
    """Mean foreground Dice over the validation cases (native grid, 3D per case).

    Each rank predicts the cases ``val[rank::W]``; the per-case means are summed across ranks
    with an all-reduce, so every rank returns the same value:
    ``dice = (1/N) sum_cases (1/|C|) sum_{c in C} 2|P_c & R_c| / (|P_c| + |R_c|)`` with ``C`` the
    foreground classes present in the reference or the prediction (absent in both: skipped).
    """
    cases = lc.get("val") or []
    if not cases:
        return None
    import storage

    from ray_jobs.evaluation.inference import predict_case

    st = storage.open_store(lc["store"], storage_options=cfg.data.storage_options or None)
    spec = lc["spec"]
    want_hd = cfg.evaluate.val_hd95
    tot = torch.zeros(4, dtype=torch.float64)  # dice sum, n, hd95 sum, n(hd95 finite)
    was_training = method.training
    method.eval()
    with torch.no_grad():
        for case in cases[rank::max(world, 1)]:
            ref = st.label(case)
            pred = predict_case(method, spec, st, case)
            tot[0] += _mean_fg_dice(pred, ref, lc["num_classes"])
            tot[1] += 1
            if want_hd:
                hd = _mean_fg_hd95(pred, ref, st.meta(case)["spacing"], lc["num_classes"])
                if hd is not None:
                    tot[2] += hd
                    tot[3] += 1
    method.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = tot.to(device) if torch.distributed.get_backend() == "nccl" else tot
        torch.distributed.all_reduce(t)
        tot = t.cpu()
    if tot[1] == 0:
        return None
    out = {"val_dice": float(tot[0] / tot[1])}
    if want_hd and tot[3] > 0:
        out["val_hd95"] = float(tot[2] / tot[3])
    return out


def _mean_fg_hd95(pred: np.ndarray, ref: np.ndarray, spacing: Any, num_classes: int
                  ) -> Optional[float]:
    """Mean over foreground classes of HD95 (mm) from ``localcl.metrics.evaluate_case``;
    classes where it is undefined (empty prediction or reference) are skipped."""
    from localcl.metrics import evaluate_case

    res = evaluate_case(pred.astype(np.int64), ref.astype(np.int64), tuple(spacing),
                        list(range(1, num_classes)))
    vals = [float(v["hd95"]) for v in res.values() if np.isfinite(v.get("hd95", np.nan))]
    return float(np.mean(vals)) if vals else None


def _mean_fg_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int) -> float:
    vals = []
    for c in range(1, num_classes):
        p, r = pred == c, ref == c
        denom = p.sum() + r.sum()
        if denom:
            vals.append(2.0 * np.logical_and(p, r).sum() / denom)
    return float(np.mean(vals)) if vals else 1.0


# --------------------------------------------------------------------------- main loop
def train_func(lc: dict[str, Any]) -> None:  # noqa: C901 - one linear story
    """Entry point run by every Ray Train worker. See the module docstring."""
    import ray.train
    import ray.train.torch

    from ray_jobs.config import validate

    cfg = validate(lc["config"])
    section, mstage = lc["section"], lc.get("method_stage")
    lc["_method_cfg"] = cfg.method_config(section)
    lc["method_name"] = getattr(cfg, section).method.name
    schedule = cfg.schedule_for(section, mstage)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    reseed(None, epoch_seed(cfg.data.seed, 0, 0))  # same initial weights on every rank (epochs start at 1)

    cls, method = build_method(lc, cfg)
    if lc.get("round") and hasattr(method, "start_round"):  # PLCL self-training round r
        method.start_round(int(lc["round"]))
    pseudo_key = (getattr(lc["_method_cfg"], "pseudo_label_key", "pseudo_label")
                  if lc.get("pseudo") else None)
    method.to(device)
    step_module = StepModule(method)
    if world > 1:
        model = ray.train.torch.prepare_model(
            step_module, parallel_strategy_kwargs={"find_unused_parameters": True})
    else:
        model = step_module
    if section == "pretrain" and hasattr(method, "stage_parameters"):
        params = list(method.stage_parameters(mstage))
    else:
        params = [p for p in method.parameters() if p.requires_grad]
    optim = build_optimizer(params, getattr(cfg, section).optim, cfg.lr(section))
    total_steps = schedule.epochs * schedule.steps_per_epoch
    warm = int(round(schedule.warmup_epochs * schedule.steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: lr_factor(s, total_steps, warm, schedule.scheduler, schedule.min_lr_ratio))
    dtype = amp_dtype(schedule.amp, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    start_epoch, global_step, history, best = 1, 0, [], {"score": -math.inf, "epoch": 0}
    best_state: Optional[dict[str, torch.Tensor]] = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            st = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
            best_state = torch.load(Path(d) / BEST_FILE, map_location="cpu", weights_only=True)
        method.load_state_dict(st["model"])
        optim.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        if scaler is not None and st.get("scaler"):
            scaler.load_state_dict(st["scaler"])
        start_epoch, global_step = int(st["epoch"]) + 1, int(st["global_step"])
        history = list(st["history"])
        best = dict(st["best"])

    first_epoch = start_epoch
    data = build_loaders(lc, cfg, cls, rank, world, schedule)
    nw = cfg.data.loader_workers
    main_loader = _loader(data["main"], None if data["batched"] else data["per_worker"], nw)
    u_loader = (_loader(data["unlabelled"], data["per_worker_u"], nw)
                if data["unlabelled"] is not None else None)
    hooks = lc.get("hooks") or {}
    queue = lc.get("progress_queue") if rank == 0 else None
    mlflow = _setup_mlflow(cfg, lc, section, mstage) if cfg.logging.mlflow_uri else None
    _event(hooks, rank, "start", start_epoch)

    for epoch in range(start_epoch, schedule.epochs + 1):
        _event(hooks, rank, "epoch", epoch)
        reseed(method, epoch_seed(cfg.data.seed, rank, epoch))
        for ds in (data["main"], data["unlabelled"]):
            if ds is not None and hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)
        method.train()
        it_l = iter(main_loader)
        it_u = _cycle(u_loader) if u_loader is not None else None
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        last_push = 0.0
        n_seen = 0
        for i in range(schedule.steps_per_epoch):
            try:
                batch = next(it_l)
            except StopIteration:  # a sampler shorter than asked: restart it
                it_l = iter(main_loader)
                batch = next(it_l)
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
            if hasattr(method, "on_after_step"):
                method.on_after_step()
            global_step += 1
            n_seen += int(batch["image"].shape[0])
            for k, v in out.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
            if hooks.get("kill") and _should_kill(hooks["kill"], rank, epoch, i):
                os.kill(os.getpid(), signal.SIGKILL)
            now = time.perf_counter()
            if queue is not None and (now - last_push > 1.0 or i == schedule.steps_per_epoch - 1):
                last_push = now
                _push(queue, {"stage": lc["stage_name"], "epoch": epoch, "epochs": schedule.epochs,
                              "step": i + 1, "steps": schedule.steps_per_epoch,
                              "loss": sums.get("loss", 0.0) / (i + 1),
                              "samples_per_s": n_seen * max(world, 1) / max(now - t0, 1e-9)})
        elapsed = time.perf_counter() - t0
        metrics: dict[str, Any] = {f"{k}": v / schedule.steps_per_epoch for k, v in sums.items()}
        # start_epoch: the epoch this worker group (re)started at; > 1 on rows trained after a
        # resume, so a history proves which epochs ran once and which were restored
        metrics.update(epoch=epoch, start_epoch=first_epoch, global_step=global_step,
                       lr=sched.get_last_lr()[0],
                       time_s=elapsed, samples_per_s=n_seen * max(world, 1) / max(elapsed, 1e-9))
        score = None
        if section != "pretrain":
            t_val = time.perf_counter()
            val = validation_dice(method, lc, cfg, rank, world, device)
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
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float)) and k != "epoch"}, step=epoch)
        checkpoint = None
        # Ray Train local mode (num_workers=0) keeps the reported directory itself as the
        # checkpoint (nothing is copied to storage), so it must outlive this epoch there.
        keep_dir = lc.get("local_ckpt_root")
        if keep_dir:
            os.makedirs(keep_dir, exist_ok=True)
        with (_KeptDir(tempfile.mkdtemp(prefix=f"epoch{epoch:04d}-", dir=keep_dir)) if keep_dir
              else tempfile.TemporaryDirectory()) as tmp:
            if rank == 0:
                state = {
                    "model": method.state_dict(), "optimizer": optim.state_dict(),
                    "scheduler": sched.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else {},
                    "epoch": epoch, "global_step": global_step, "sampler_epoch": epoch,
                    "seed": cfg.data.seed, "history": history, "best": best,
                }
                torch.save(state, Path(tmp) / STATE_FILE)
                torch.save(best_state, Path(tmp) / BEST_FILE)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)
        _event(hooks, rank, "reported", epoch)
    if mlflow is not None:
        mlflow.end_run()


def _setup_mlflow(cfg: Any, lc: dict[str, Any], section: str, mstage: Optional[str]) -> Any:
    """MLflow run of this stage through Ray's integration
    (``ray.air.integrations.mlflow.setup_mlflow``): rank 0 gets the ``mlflow`` module (other
    ranks a no-op), experiment ``cfg.name`` (created if missing), run name ``<stage>[-<method
    stage>][-r<round>]``, the flattened config logged as parameters. A worker-group restart
    opens a new MLflow run (tagged with the same ``ray_run``) whose steps continue the epochs."""
    from ray.air.integrations.mlflow import setup_mlflow

    run = lc.get("stage_name", section) + (f"-{mstage}" if mstage and mstage != "main" else "")
    if lc.get("round"):
        run += f"-r{lc['round']}"
    flat = _flatten({k: v for k, v in cfg.to_dict().items() if k not in ("logging", "run_dir")})
    return setup_mlflow(config=flat, tracking_uri=cfg.logging.mlflow_uri,
                        experiment_name=cfg.name, run_name=run,
                        create_experiment_if_not_exists=True,
                        tags={"ray_run": run, "config_hash": cfg.hash(), "section": section})


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
    return out


class _KeptDir:
    """Context manager yielding a directory that is not deleted on exit (local mode)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> str:
        return self.path

    def __exit__(self, *exc: Any) -> None:
        return None


def _push(queue: Any, item: dict[str, Any]) -> None:
    try:
        queue.put_nowait(item)
    except Exception:  # a full or gone queue must never stop training
        pass


def _should_kill(spec: dict[str, Any], rank: int, epoch: int, step: int) -> bool:
    """Test hook: SIGKILL this worker once (a flag file marks that it already happened)."""
    if rank != spec.get("rank", 1) or epoch != spec.get("epoch", 2) or step != spec.get("step", 0):
        return False
    flag = Path(spec["flag"])
    if flag.exists():
        return False
    if spec.get("snapshot"):  # die only once the previous epoch's checkpoint is registered
        _wait_registered(Path(spec["snapshot"]), epoch - 1, timeout=float(spec.get("timeout", 300)))
    flag.write_text(f"killed rank {rank} epoch {epoch} step {step}\n")
    return True


def _wait_registered(snapshot: Path, epoch: int, timeout: float) -> None:
    """Block until Ray Train's ``checkpoint_manager_snapshot.json`` lists a checkpoint of
    ``epoch`` (the controller registers reported checkpoints asynchronously)."""
    import json

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            results = json.loads(snapshot.read_text()).get("checkpoint_results") or []
            if any((r.get("metrics") or {}).get("epoch", 0) >= epoch for r in results):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.2)


def _event(hooks: dict[str, Any], rank: int, what: str, epoch: int) -> None:
    """Test/diagnostic hook: append ``rank what epoch`` to ``hooks["events"]`` (local file)."""
    path = hooks.get("events")
    if path:
        with open(path, "a") as f:
            f.write(f"{rank} {what} {epoch}\n")
