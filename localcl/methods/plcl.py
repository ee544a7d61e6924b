"""PLCL: pseudo-label local contrastive loss with self-training (joint fine-tuning strategy).

Chaitanya, Erdil, Karani, Konukoglu, *Local contrastive loss with pseudo-label based
self-training for semi-supervised medical image segmentation*, arXiv 2112.09645 / MedIA 87 (2023)
102792; TF1 code ``krishnabits001/pseudo_label_contrastive_training``. Spec ``methods.md`` §2.

Procedure (§2.8, [C]); ``ray_jobs`` drives the loop, this module provides the pieces:

0. ``METHODS["plcl"]`` has no self-supervised stage (``pretrain_batch is None``).
1. Baseline: ``FINETUNE["supervised"]`` on the labelled slices (Dice with background, §1.7
   augmentation, 5,001 iterations, best-by-validation).
2. ``FINETUNE["plcl"]`` (:class:`PLCLFinetune`): :meth:`~PLCLFinetune.load_backbone` copies
   encoder + decoder from the baseline; segmentation head and contrastive head ``h_φ`` are
   freshly initialised.
3. Rounds ``r = 1..rounds``: pseudo-label every unlabelled slice with the current best model
   (:func:`pseudo_label`: softmax → dense CRF → argmax), store them (``storage`` derived array
   ``pseudo_r{r}``, delivered in ``batch_u[cfg.pseudo_label_key]``), train jointly for
   ``iterations_per_round`` steps, restore the best checkpoint (``ray_jobs``).
   :meth:`~PLCLFinetune.start_round` keeps the round counter (a buffer, checkpointed).

Joint loss (§2.4):

.. math::

    \\mathcal L = \\mathcal L_{Dice}(g_\\xi(d(e(x_L))), y_L) + \\lambda\\,\\mathcal L_{LC},\\qquad \\lambda = 0.1

Segmentation term: labelled slices with >= ``seg_min_labels`` distinct labels, §1.7
augmentation. Contrastive term (:func:`localcl.losses.plcl.plcl_loss`, 16-d embeddings of
``h_φ`` = 1×1 conv (16, BN, ReLU) → 1×1 conv (16), full resolution): up to 5 labelled slices (ground
truth) and 5 unlabelled slices (pseudo-labels) whose maps contain all K classes; the 10 slices
form two halves with independent brightness/contrast jitter (no geometric augmentation) and the
reference pairs ``(L0,L0) (L1,U1) (L2,L2) (L3,U3) (L4,U4) (U0,U0) (U0,U1) (U2,U2) (U2,U3) (U3,U4)``
(first member from half 1, second from half 2). Pairs whose slices are unavailable are dropped;
with no pair left the contrastive term is 0 and ``"lc_skipped"`` is 1 (the reference skips
such iterations). Segmentation and contrastive images share one forward pass, as in the reference.

CRF: ``pydensecrf2`` (``pip install localcl[crf]``; Krähenbühl & Koltun's fully connected CRF).
When it is not importable, :func:`pseudo_label` falls back to the plain argmax of the softmax
(the specification's fallback) and warns once; ``crf=False`` requests the argmax explicitly.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import ClassVar, Literal

import numpy as np
import torch
from torch import Tensor

from localcl.augment import intensity_view
from localcl.losses.plcl import plcl_loss
from localcl.methods import _nets
from localcl.methods.base import (
    BaseMethodConfig,
    Count,
    FinetuneStrategy,
    NonNegative,
    PositiveFinite,
    PretrainMethod,
    Temperature,
    check_batch,
)
from localcl.methods.supervised import augment_labelled
from localcl.models.heads import DenseHead

__all__ = [
    "PLCL",
    "PLCLConfig",
    "PLCLFinetune",
    "PLCLFinetuneConfig",
    "REFERENCE_PAIRS",
    "crf_available",
    "plcl_step",
    "pseudo_label",
]

# (kind, index) of the first (half 1) and second (half 2) member of each pair, spec §2.5 [C]
REFERENCE_PAIRS: tuple[tuple[tuple[str, int], tuple[str, int]], ...] = (
    (("L", 0), ("L", 0)),
    (("L", 1), ("U", 1)),
    (("L", 2), ("L", 2)),
    (("L", 3), ("U", 3)),
    (("L", 4), ("U", 4)),
    (("U", 0), ("U", 0)),
    (("U", 0), ("U", 1)),
    (("U", 2), ("U", 2)),
    (("U", 2), ("U", 3)),
    (("U", 3), ("U", 4)),
)

_WARNED = False


def crf_available() -> bool:
    """True when ``pydensecrf`` (package ``pydensecrf2``) can be imported."""
    try:
        import pydensecrf.densecrf  # noqa: F401
    except ImportError:
        return False
    return True


def pseudo_label(
    probs: Tensor,
    image: Tensor,
    crf: bool = True,
    gaussian_sxy: float = 10.0,
    gaussian_weight: float = 30.0,
    bilateral_sxy: float = 0.01,
    bilateral_srgb: float = 0.5,
    bilateral_weight: float = 10.0,
    iterations: int = 30,
) -> Tensor:
    """Pseudo-labels from softmax probabilities, refined by a 2D dense CRF (spec §2.6, [C]).

    CRF energy (Krähenbühl & Koltun 2011): unary ``−log p_k(u)``; pairwise Potts terms with a
    Gaussian kernel ``w_g exp(−|u−v|²/2σ_g²)`` (``σ_g = gaussian_sxy`` px, ``w_g = 30``; use 5 px for
    prostate) and a bilateral kernel ``w_b exp(−|u−v|²/2σ_b² − |I_u−I_v|²/2σ_I²)`` (``σ_b = 0.01``,
    ``σ_I = 0.5``, ``w_b = 10``); ``iterations`` mean-field steps; label = argmax of the marginals.
    No confidence threshold (the reference has none). The weights are the reference's
    ``para_list`` for ACDC ``[0.01, 0.5, 10, 10, 30, 30]``; with them the Gaussian term dominates
    (the bilateral kernel of spatial std 0.01 px barely links distinct pixels), so the CRF removes
    isolated errors and also erodes structures much smaller than ~``gaussian_sxy`` pixels.

    Args:
        probs: (B, K, H, W) softmax probabilities.
        image: (B, 1, H, W) or (B, H, W) intensities of the same slices (bilateral kernel).
        crf: refine with the CRF (falls back to argmax with a warning if ``pydensecrf`` is absent).

    Returns:
        (B, H, W) int64 labels on ``probs.device``.
    """
    global _WARNED
    if probs.dim() != 4:
        raise ValueError(f"probs must have shape (B, K, H, W), got {tuple(probs.shape)}")
    img = image[:, 0] if image.dim() == 4 else image
    if img.shape != (probs.shape[0], *probs.shape[2:]):
        raise ValueError(
            f"image must have shape (B, [1,] H, W) = {(probs.shape[0], *probs.shape[2:])}, got {tuple(image.shape)}"
        )
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if crf and not crf_available():
        if not _WARNED:
            warnings.warn(
                "pydensecrf2 is not installed: pseudo_label falls back to argmax (no CRF); "
                "install localcl[crf] for the reference behaviour",
                stacklevel=2,
            )
            _WARNED = True
        crf = False
    if not crf:
        return probs.argmax(1)
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import create_pairwise_bilateral, unary_from_softmax

    b, k, h, w = probs.shape
    p_np = probs.detach().float().cpu().numpy()
    i_np = img.detach().float().cpu().numpy()
    out = np.empty((b, h, w), dtype=np.int64)
    for i in range(b):
        d = dcrf.DenseCRF2D(w, h, k)
        p = np.clip(p_np[i], 1e-8, 1.0)
        d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(p / p.sum(0, keepdims=True))))
        d.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_weight)
        feats = create_pairwise_bilateral(
            sdims=(bilateral_sxy, bilateral_sxy),
            schan=(bilateral_srgb,),
            img=np.ascontiguousarray(i_np[i][..., None]),
            chdim=2,
        )
        d.addPairwiseEnergy(feats, compat=bilateral_weight)
        q = np.asarray(d.inference(iterations)).reshape(k, h, w)
        out[i] = q.argmax(0)
    return torch.from_numpy(out).to(probs.device)


class PLCLConfig(BaseMethodConfig):
    """PLCL as a ``METHODS`` entry: no pre-training stage; only the backbone shape."""


class PLCL(PretrainMethod):
    """``METHODS["plcl"]``: nothing to pre-train; fine-tune with ``FINETUNE["plcl"]``."""

    name = "plcl"
    Config = PLCLConfig
    cfg: PLCLConfig
    pretrain_batch = None
    stages: ClassVar[tuple[str, ...]] = ()
    default_finetune = "plcl"

    def __init__(self, cfg: PLCLConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes)

    def pretrain_step(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:
        self._stage(stage)  # raises: no pre-training stage
        raise AssertionError("unreachable")


class PLCLFinetuneConfig(BaseMethodConfig):
    """PLCL joint training settings (spec §2.7; [C] unless noted).

    Attributes:
        lambda_lc: weight λ of ``L_LC`` (0.1). tau: 0.1. per_class: P = 3 anchors per class.
        embed_dim: contrastive embedding size (16). variant: "inter" (default) | "intra".
        contrast_labelled, contrast_unlabelled: slices per half (5 + 5).
        require_all_classes: only slices whose (pseudo-)label map has all K classes enter the
            contrastive batch (True; biases towards mid-ventricular slices, §2.11.3).
        seg_min_labels: segmentation batch keeps slices with >= this many distinct labels
            (3 for ACDC/MMWHS, 2 for prostate).
        loss, include_background: segmentation loss ("dice" with background, [C]).
        augment, elastic, elastic_sigma_px: §1.7 augmentation of the segmentation batch.
        pseudo_label_key: key of the pseudo-label map in ``batch_u`` (-1 = unknown).
        crf and crf_*: :func:`pseudo_label` settings (σ_g 10 px, w_g 30, σ_b 0.01, σ_I 0.5,
            w_b 10, 30 iterations).
        rounds: self-training rounds (3). iterations_per_round: 5,000 ([R]: the released script
            has a 301 placeholder). baseline_iterations: 5,001. batch_size: 20. val_every: 50.
    """

    lambda_lc: NonNegative = 0.1
    tau: Temperature = 0.1
    per_class: Count = 3
    embed_dim: Count = 16
    variant: Literal["inter", "intra"] = "inter"
    contrast_labelled: Count = 5
    contrast_unlabelled: Count = 5
    require_all_classes: bool = True
    seg_min_labels: Count = 3
    loss: Literal["dice", "dice_ce"] = "dice"
    include_background: bool = True
    augment: Literal["glcl", "none"] = "glcl"
    elastic: bool = True
    elastic_sigma_px: float = 5.0
    pseudo_label_key: str = "pseudo_label"
    crf: bool = True
    crf_gaussian_sxy: PositiveFinite = 10.0
    crf_gaussian_weight: float = 30.0
    crf_bilateral_sxy: PositiveFinite = 0.01
    crf_bilateral_srgb: PositiveFinite = 0.5
    crf_bilateral_weight: float = 10.0
    crf_iterations: Count = 30
    rounds: Count = 3
    iterations_per_round: Count = 5000
    baseline_iterations: Count = 5001
    batch_size: Count = 20
    val_every: Count = 50


def _all_classes(lbl: Tensor, k: int) -> Tensor:
    """(B,) bool: every class 0..K-1 occurs in the map."""
    present = torch.stack([(lbl == c).flatten(1).any(1) for c in range(k)], 1)
    return present.all(1)


def _n_labels(lbl: Tensor) -> Tensor:
    """(B,) number of distinct non-negative labels per map."""
    m = int(lbl.max().clamp_min(0)) + 1
    return torch.stack([(lbl == c).flatten(1).any(1) for c in range(m)], 1).sum(1)


def contrastive_pairs(n_l: int, n_u: int) -> Tensor:
    """Reference pairs restricted to available slices, as rows (a, b) into the 2-half batch.

    Half 1 holds ``[L_0..L_{n_l-1}, U_0..U_{n_u-1}]`` (rows 0..n-1), half 2 the same slices
    (rows n..2n-1). Returns (N_pairs, 2) int64.
    """
    n = n_l + n_u

    def idx(kind: str, i: int) -> int | None:
        if kind == "L":
            return i if i < n_l else None
        return n_l + i if i < n_u else None

    rows = []
    for (k1, i1), (k2, i2) in REFERENCE_PAIRS:
        a, b = idx(k1, i1), idx(k2, i2)
        if a is not None and b is not None:
            rows.append((a, n + b))
    return torch.tensor(rows, dtype=torch.long).view(-1, 2)


def plcl_step(
    model: PLCLFinetune, batch_l: Mapping[str, Tensor], batch_u: Mapping[str, Tensor] | None
) -> dict[str, Tensor]:
    """One PLCL joint step (module docstring). Returns ``{"loss", "dice", "lc", "lc_skipped", ["ce"]}``."""
    cfg = model.cfg
    check_batch(batch_l, ("image", "label"), "plcl")
    k = model.num_classes
    gen = model.generator
    x_l, y_l = batch_l["image"], batch_l["label"].long()
    # segmentation batch: slices with enough distinct labels (all when none qualifies)
    keep = _n_labels(y_l) >= cfg.seg_min_labels
    if not keep.any():
        keep = torch.ones_like(keep)
    xs, ys = augment_labelled(x_l[keep], y_l[keep], gen, cfg.augment, cfg.elastic, cfg.elastic_sigma_px)
    # contrastive batch: all-class labelled and pseudo-labelled slices
    sel_l = _all_classes(y_l, k) if cfg.require_all_classes else (y_l >= 0).flatten(1).any(1)
    cx_l, cy_l = x_l[sel_l][: cfg.contrast_labelled], y_l[sel_l][: cfg.contrast_labelled]
    if batch_u is not None:
        check_batch(batch_u, ("image", cfg.pseudo_label_key), "plcl (unlabelled batch)")
        x_u, y_u = batch_u["image"], batch_u[cfg.pseudo_label_key].long()
        sel_u = _all_classes(y_u, k) if cfg.require_all_classes else (y_u >= 0).flatten(1).any(1)
        cx_u, cy_u = x_u[sel_u][: cfg.contrast_unlabelled], y_u[sel_u][: cfg.contrast_unlabelled]
    else:
        cx_u, cy_u = x_l[:0], y_l[:0]
    pairs = contrastive_pairs(cx_l.shape[0], cx_u.shape[0])
    n_seg = xs.shape[0]
    if pairs.numel():
        cx = torch.cat([cx_l, cx_u], 0)
        cy = torch.cat([cy_l, cy_u], 0)
        halves = torch.cat([intensity_view(cx, gen), intensity_view(cx, gen)], 0)
        allx = torch.cat([xs, halves], 0)
    else:
        allx = xs
    out = model.unet(allx, taps=("features",))
    seg = _nets.seg_loss(out["logits"][:n_seg], ys, cfg.loss, cfg.include_background)
    if pairs.numel():
        emb = model.contrast_head(out["features"][n_seg:])
        lc = plcl_loss(
            emb,
            torch.cat([cy, cy], 0),
            k,
            pairs.to(emb.device),
            tau=cfg.tau,
            per_class=cfg.per_class,
            variant=cfg.variant,
            generator=model.generator_for(emb.device),
        )
        skipped = torch.zeros((), device=lc.device)
    else:
        lc = out["features"].sum() * 0.0
        skipped = torch.ones((), device=lc.device)
    result = {k_: v for k_, v in seg.items() if k_ != "loss"}
    result.update(loss=seg["loss"] + cfg.lambda_lc * lc, lc=lc.detach(), lc_skipped=skipped)
    return result


class PLCLFinetune(FinetuneStrategy):
    """``FINETUNE["plcl"]``: joint Dice + λ·L_LC training with self-training rounds.

    Shapes: ``batch_l = {"image": (B,1,H,W), "label": (B,H,W)}``, ``batch_u = {"image": (B',1,H,W),
    cfg.pseudo_label_key: (B',H,W)}`` or ``None``; ``predict((B,1,H,W)) -> (B,K,H,W)``.
    """

    name = "plcl"
    Config = PLCLFinetuneConfig
    cfg: PLCLFinetuneConfig
    st_round: Tensor

    def __init__(self, cfg: PLCLFinetuneConfig, in_channels: int, num_classes: int) -> None:
        super().__init__(cfg, in_channels, num_classes)
        self.unet = _nets.build_unet(cfg, in_channels, num_classes)
        c = cfg.decoder_widths[-1]
        self.contrast_head = DenseHead(
            c, out_dim=cfg.embed_dim, hidden_dim=cfg.embed_dim, layers=2, norm=cfg.norm, bias=False
        )
        self.register_buffer("st_round", torch.zeros((), dtype=torch.long))

    def load_backbone(self, state: Mapping[str, Tensor], strict: bool = False) -> tuple[list[str], list[str]]:
        """Copy encoder + decoder (heads stay re-initialised, spec §2.8 step 2)."""
        return _nets.load_unet(self.unet, state, strict)

    def backbone_state(self) -> dict[str, Tensor]:
        return _nets.unet_backbone_state(self.unet)

    @property
    def pseudo_label_key(self) -> str:
        return self.cfg.pseudo_label_key

    def start_round(self, r: int | None = None) -> int:
        """Enter self-training round ``r`` (default: the next one); returns it. Raises if
        ``r`` exceeds ``cfg.rounds``."""
        r = int(self.st_round) + 1 if r is None else int(r)
        if not 1 <= r <= self.cfg.rounds:
            raise ValueError(f"round must be in [1, {self.cfg.rounds}] (cfg.rounds), got {r}")
        self.st_round.fill_(r)
        return r

    def pseudo_label_name(self, r: int | None = None) -> str:
        """Storage name of the pseudo-labels of round ``r`` (default current): ``pseudo_r{r}``."""
        return f"pseudo_r{int(self.st_round) if r is None else int(r)}"

    @torch.no_grad()
    def make_pseudo_labels(self, image: Tensor) -> Tensor:
        """Pseudo-labels of a slice batch with this model as teacher (eval mode + CRF)."""
        was = self.training
        self.eval()
        try:
            probs = self.predict(image)
        finally:
            self.train(was)
        c = self.cfg
        return pseudo_label(
            probs,
            image,
            crf=c.crf,
            gaussian_sxy=c.crf_gaussian_sxy,
            gaussian_weight=c.crf_gaussian_weight,
            bilateral_sxy=c.crf_bilateral_sxy,
            bilateral_srgb=c.crf_bilateral_srgb,
            bilateral_weight=c.crf_bilateral_weight,
            iterations=c.crf_iterations,
        )

    def finetune_step(
        self,
        batch_l: Mapping[str, Tensor],
        batch_u: Mapping[str, Tensor] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor]:
        return plcl_step(self, batch_l, batch_u)

    def predict(self, image: Tensor) -> Tensor:
        return torch.softmax(self.unet(image)["logits"], dim=1)
