"""The data side of a Ray Train worker: its samplers and loaders, sharded by ``(rank, W)``.

:func:`build_loaders` turns a :class:`ray_jobs.train.stage.LoopSpec` into the storage samplers of
one worker. The global batch of ``B`` slices is split into ``B / W`` per worker; one epoch is
``steps_per_epoch`` steps of every sampler:

- pretraining: ``main`` draws from the pretraining pool (labels outside the budget hidden), as
  slices, slices with superpixels (LRC) or GLCL's partition batches; with the method's
  ``labelled_per_batch = L`` (MixCL) a second sampler, ``labelled``, draws ``L / W`` slices per
  worker from the label budget and ``main`` the other ``(B - L) / W``
  (:func:`join_batches` makes one batch of the two);
- fine-tuning: ``main`` draws the labelled budget, ``unlabelled`` the unlabelled pool
  (``unlabelled_batch_size``), or PLCL's pseudo-labels of round ``r``.

Every sampler reads slices at ``data.size`` and ``data.spacing_mm``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from localcl.methods import METHODS
from ray_jobs.train.stage import LoopSpec
from storage import samplers

__all__ = ["build_loaders", "cycle", "join_batches", "make_loader"]


def join_batches(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """One batch of ``a``'s items followed by ``b``'s (tensors concatenated on dim 0; keys in
    both)."""
    return {k: torch.cat([a[k], b[k]]) if torch.is_tensor(a[k]) else a[k] for k in a if k in b}


def cycle(loader: Any) -> Iterator[Any]:
    while True:
        yield from loader


def build_loaders(spec: LoopSpec, rank: int, world: int) -> dict[str, Any]:
    """Samplers for this worker (module docstring). Returns ``{"main": Dataset, "batched": bool,
    "unlabelled": Dataset | None, "per_worker": int}``, plus ``"per_worker_u"`` in fine-tuning
    and ``"labelled": Dataset | None, "per_worker_lab": int`` in slice pretraining."""
    cfg, schedule = spec.config, spec.schedule
    size = tuple(cfg.data.size)
    uri, so = spec.store, cfg.data.storage_options or None
    per_worker = schedule.batch_size // max(world, 1)
    n_samples = per_worker * schedule.steps_per_epoch * max(world, 1)
    seed = cfg.data.seed
    common: dict[str, Any] = dict(size=size, seed=seed, rank=rank, world_size=max(world, 1), storage_options=so)
    if cfg.data.spacing_mm is not None:
        sy, sx = cfg.data.spacing_mm
        if sy != sx:
            raise ValueError("data.spacing_mm: the samplers resample to isotropic in-plane pixels")
        common["spacing_mm"] = float(sy)
    hidden = list(spec.unlabelled)  # outside the label budget: labels never reach training
    if spec.section == "pretrain":
        kind = METHODS[spec.method_name].pretrain_batch
        cases = list(spec.pretrain_cases)
        if kind == "partition":
            parts = int(getattr(spec.method_cfg, "partitions", 4))
            if per_worker % parts:
                raise ValueError(
                    f"pretrain.schedule.batch_size per worker ({per_worker}) must be a "
                    f"multiple of the method's partitions ({parts})"
                )
            m = max(1, per_worker // parts)
            ds = samplers.PartitionBatchDataset(
                uri,
                cases,
                size,
                volumes_per_batch=m,
                partitions=parts,
                batches_per_epoch=schedule.steps_per_epoch * max(world, 1),
                seed=seed,
                rank=rank,
                world_size=max(world, 1),
                storage_options=so,
                spacing_mm=common.get("spacing_mm"),  # the same pixel size as every other stage
            )
            return {"main": ds, "batched": True, "unlabelled": None, "per_worker": m * parts}
        derived = ("superpixels",) if kind == "slices+superpixels" else ()
        # labelled_per_batch (MixCL): that many slices of every batch come from the label budget
        lab_w = int(getattr(spec.method_cfg, "labelled_per_batch", 0) or 0) // max(world, 1)
        if lab_w and not spec.labelled:
            raise ValueError("pretrain.method.labelled_per_batch needs a label budget (data.label_budget)")
        main_w = per_worker - lab_w
        ds_s = samplers.SliceDataset(
            uri,
            cases,
            samples_per_epoch=main_w * schedule.steps_per_epoch * max(world, 1),
            derived=derived,
            hide_labels=hidden,
            **common,
        )
        ds_lab = None
        if lab_w:
            ds_lab = samplers.SliceDataset(
                uri,
                list(spec.labelled),
                samples_per_epoch=lab_w * schedule.steps_per_epoch * max(world, 1),
                derived=derived,
                **{**common, "seed": seed + 2},
            )
        return {
            "main": ds_s,
            "batched": False,
            "unlabelled": None,
            "labelled": ds_lab,
            "per_worker": main_w,
            "per_worker_lab": lab_w,
        }
    ds_l = samplers.SliceDataset(
        uri, list(spec.labelled), samples_per_epoch=n_samples, fg_oversample=cfg.data.fg_oversample, **common
    )
    ds_u = None
    ub = schedule.unlabelled_batch_size or schedule.batch_size
    if spec.use_unlabelled and spec.unlabelled:
        pseudo = spec.pseudo  # PLCL round r: labels come from the derived "pseudo_r{r}"
        ds_u = samplers.SliceDataset(
            uri,
            list(spec.unlabelled),
            samples_per_epoch=(ub // max(world, 1)) * schedule.steps_per_epoch * max(world, 1),
            hide_labels=[] if pseudo else hidden,
            label_array=pseudo or "label",
            **{**common, "seed": seed + 1},
        )
    return {
        "main": ds_l,
        "batched": False,
        "unlabelled": ds_u,
        "per_worker": per_worker,
        "per_worker_u": ub // max(world, 1),
    }


def make_loader(ds: Any, batch: int | None, workers: int) -> torch.utils.data.DataLoader:
    ds.loader_batch = batch or 1  # loader workers shard whole batches: steps consume a plan prefix
    return torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=False, drop_last=batch is not None, num_workers=workers, persistent_workers=False
    )
