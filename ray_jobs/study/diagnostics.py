"""Encoder diagnostics of a study: does a pretraining learn anything fine-tuning can use?

For every (encoder, budget) pair, where the encoder is a study's exported pretraining or the
random initialisation of the same network (``"random"``), this module computes on the study's
own slices (the data section's size and spacing):

- a **linear probe** (:func:`localcl.diagnostics.linear_probe`): the frozen encoder's
  hypercolumn and one 1x1 conv trained on the budget's labelled slices, scored by mean foreground
  Dice per volume on the study's test cases;
- the encoder's **health** on the budget's labelled slices (:func:`localcl.diagnostics.encoder_health`)
  summarised over layers: mean weight norm, mean/min activation std, the mean fraction of dead
  units and the mean BatchNorm drift ``d_logvar``.

Results are cached as ``STUDY_DIR/diagnostics/<encoder>-<budget>.json`` (keyed by the
pretraining's config hash, so a changed pretraining is diagnosed again) and shown in the study
report next to the cells' Dice. No Ray: it runs in the study driver, single process.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from localcl.diagnostics import encoder_health, linear_probe
from localcl.methods import FINETUNE
from localcl.methods.base import BaseMethodConfig
from ray_jobs.config.run import Config
from ray_jobs.study.cells import read_json, write_json
from ray_jobs.train.checkpoint import load_model
from storage.samplers import SliceDataset

__all__ = ["Slices", "diagnose_encoder", "encoder_diagnostics", "load_slices", "summarise_health"]

PROBE_STEPS = 300


class Slices:
    """Every slice of some cases at the training grid: ``image`` (N, 1, H, W) float,
    ``label`` (N, H, W) int64, ``volume`` (N,) int64 index of the slice's case."""

    def __init__(self, image: torch.Tensor, label: torch.Tensor, volume: torch.Tensor) -> None:
        self.image, self.label, self.volume = image, label, volume


def load_slices(cfg: Config, store: str, cases: Sequence[str]) -> Slices:
    """All slices of ``cases`` preprocessed as the cell's samplers do (``cfg.data`` size and
    spacing, stored intensity percentiles), in case order."""
    kw: dict[str, Any] = {"size": tuple(cfg.data.size), "seed": 0}
    if cfg.data.spacing_mm is not None:
        kw["spacing_mm"] = float(cfg.data.spacing_mm[0])
    ds = SliceDataset(store, list(cases), storage_options=cfg.data.storage_options or None, **kw)
    items = list(iter(ds))
    if not items:
        raise ValueError(f"no slices in cases {list(cases)[:3]}")
    return Slices(
        torch.stack([it["image"] for it in items]).float(),
        torch.stack([it["label"] for it in items]).long(),
        torch.tensor([int(it["case_index"]) for it in items]),
    )


def _encoder(cfg: Config, num_classes: int, model_dir: str | None, seed: int) -> torch.nn.Module:
    """The fine-tuning U-Net's encoder of ``cfg`` (its method's widths and norm), random with
    ``seed`` or loaded with the backbone of an exported pretrained model (``model_dir``)."""
    mcfg = cfg.method_config("finetune")
    base = {k: getattr(mcfg, k) for k in BaseMethodConfig.model_fields if hasattr(mcfg, k)}
    sup = FINETUNE["supervised"]
    torch.manual_seed(seed)
    net = sup(sup.Config(**{**base, "seed": seed}), cfg.model.in_channels, num_classes)
    if model_dir is not None:
        pre, _ = load_model(model_dir)
        net.load_backbone(pre.backbone_state(), strict=False)  # type: ignore[operator]
    unet = net.unet
    assert isinstance(unet, torch.nn.Module)
    encoder = unet.encoder
    assert isinstance(encoder, torch.nn.Module)
    return encoder


def summarise_health(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Layer-averaged health: ``weight_norm``, ``act_std`` (mean), ``act_std_min``,
    ``dead_frac`` (mean over layers), ``bn_dlogvar`` (mean over layers with BatchNorm)."""

    def mean(key: str) -> float:
        v = [float(r[key]) for r in rows if np.isfinite(float(r[key]))]
        return float(np.mean(v)) if v else float("nan")

    stds = [float(r["act_std"]) for r in rows if np.isfinite(float(r["act_std"]))]
    return {
        "weight_norm": mean("weight_norm"),
        "act_std": mean("act_std"),
        "act_std_min": float(min(stds)) if stds else float("nan"),
        "dead_frac": mean("dead_frac"),
        "bn_dlogvar": mean("bn_dlogvar"),
    }


def diagnose_encoder(
    encoder: torch.nn.Module, labelled: Slices, test: Slices, num_classes: int, seed: int = 0
) -> dict[str, Any]:
    """Linear probe (trained on ``labelled``, scored on ``test`` per volume) and summarised
    health on ``labelled`` of one encoder."""
    probe = linear_probe(
        encoder,
        labelled.image,
        labelled.label,
        test.image,
        test.label,
        num_classes,
        steps=PROBE_STEPS,
        seed=seed,
        group=test.volume,
    )
    health = encoder_health(encoder, labelled.image[:64])
    return {"probe_dice": probe["dice"], "probe_train_ce": probe["train_ce"], **summarise_health(health)}


def encoder_diagnostics(
    study_dir: str,
    cfg: Config,
    store: str,
    num_classes: int,
    budget: str,
    labelled: Sequence[str],
    test: Sequence[str],
    model_dir: str | None,
    key: str,
) -> dict[str, Any]:
    """Diagnose (or read the cached diagnosis of) one encoder on one budget.

    Args:
        cfg: the cell's resolved config (network widths, data grid).
        model_dir: an exported pretrained model (``RUN/pretrain/model``), or None for the
            random encoder.
        key: cache key of the encoder (the pretraining's config hash, or ``"random"``).
    Returns:
        ``{"encoder", "budget", "probe_dice", "probe_train_ce", "weight_norm", "act_std",
        "act_std_min", "dead_frac", "bn_dlogvar", "key"}``.
    """
    # RUN/pretrain/model -> RUN's name (e.g. ideal-s0)
    name = os.path.basename(os.path.dirname(os.path.dirname(model_dir))) if model_dir else "random"
    path = os.path.join(study_dir, "diagnostics", f"{name}-{budget}.json")
    got = read_json(path)
    if got and got.get("key") == key:
        return got
    lab = load_slices(cfg, store, labelled)
    tst = load_slices(cfg, store, test)
    seed = int(cfg.data.seed)
    res = diagnose_encoder(_encoder(cfg, num_classes, model_dir, seed), lab, tst, num_classes, seed)
    out = {"encoder": name, "budget": budget, "key": key, **res}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, out)
    return out
