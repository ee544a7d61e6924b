"""Why does a pretrained encoder help or not? Linear probe and encoder health (pure PyTorch).

Two diagnostics, both on a U-Net encoder (:class:`localcl.models.unet.UNetEncoder`, whose
``forward(x)`` returns one feature map per level):

- :func:`linear_probe`: the encoder is frozen (eval mode, no gradient) and a single 1x1 conv is
  trained on the *hypercolumn* of the labelled images: every level's features, bilinearly
  upsampled to the input size and concatenated, ``z = concat_l up(e_l(x))`` of shape
  ``(B, sum_l C_l, H, W)``; logits ``= W z + b`` with ``W`` of shape ``(K, sum_l C_l)``. It is
  trained with cross-entropy (Adam) on the labelled budget and scored by mean foreground Dice on
  the evaluation slices. Run on a pretrained encoder and on a random one with the same seed, the
  gap says whether pretraining learnt anything linearly decodable before fine-tuning blurs it.
- :func:`encoder_health`: per conv layer of the encoder, on a batch of fine-tuning inputs:
  the weight norm ``||W||_F``; the mean and standard deviation of the post-ReLU activations; the
  fraction of *dead* units (channels whose activation is 0 on every pixel of the batch); and the
  distance of each BatchNorm layer's running statistics from the batch's own statistics,
  ``d_mean = ||mu_run - mu_batch||_2 / sqrt(C)`` and
  ``d_logvar = ||log var_run - log var_batch||_2 / sqrt(C)``. Large distances mean that eval-mode
  inference normalises fine-tuning inputs with statistics of another input distribution.

Shapes: images ``(N, C_in, H, W)`` float, labels ``(N, H, W)`` int64 with -1 = ignored.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["encoder_health", "hypercolumn", "linear_probe", "mean_foreground_dice"]


def hypercolumn(encoder: nn.Module, x: Tensor) -> Tensor:
    """Concatenation of every encoder level upsampled (bilinear) to ``x``'s size: (B, sum C_l, H, W)."""
    feats = encoder(x)
    size = x.shape[-2:]
    return torch.cat(
        [
            f if f.shape[-2:] == size else F.interpolate(f, size=size, mode="bilinear", align_corners=False)
            for f in feats
        ],
        1,
    )


def mean_foreground_dice(pred: Tensor, ref: Tensor, num_classes: int) -> float:
    """Mean over foreground classes present in ``pred`` or ``ref`` of ``2|P&R| / (|P|+|R|)``
    (pixels with ``ref == -1`` ignored). ``pred``, ``ref``: integer tensors of the same shape."""
    keep = ref >= 0
    vals = []
    for c in range(1, num_classes):
        p, r = (pred == c) & keep, (ref == c) & keep
        den = int(p.sum() + r.sum())
        if den:
            vals.append(2.0 * int((p & r).sum()) / den)
    return float(sum(vals) / len(vals)) if vals else 1.0


def linear_probe(
    encoder: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    eval_images: Tensor,
    eval_labels: Tensor,
    num_classes: int,
    steps: int = 300,
    batch_size: int = 16,
    lr: float = 1e-2,
    seed: int = 0,
    group: Tensor | None = None,
) -> dict[str, float]:
    """Train a 1x1 conv on the frozen encoder's hypercolumn; return probe scores.

    The encoder is put in eval mode and restored afterwards; its parameters get no gradient. The
    hypercolumns are standardised per channel with the training set's mean/std (so the probe does
    not depend on the feature scale). ``group`` (N_eval,) optionally groups evaluation slices into
    volumes: the Dice is then computed per volume (3D) and averaged, as the study does.

    Returns ``{"dice": mean foreground Dice on eval, "train_ce": final training CE,
    "feature_dim": sum C_l}``.
    """
    was_training = encoder.training
    encoder.eval()
    g = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        z_tr = _batched(lambda x: hypercolumn(encoder, x), train_images)
        mu = z_tr.mean(dim=(0, 2, 3), keepdim=True)
        sd = z_tr.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
        z_tr = (z_tr - mu) / sd
    dim = z_tr.shape[1]
    head = nn.Conv2d(dim, num_classes, 1)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    ce = torch.tensor(math.nan)
    for _ in range(int(steps)):
        idx = torch.randint(0, z_tr.shape[0], (min(batch_size, z_tr.shape[0]),), generator=g)
        ce = F.cross_entropy(head(z_tr[idx]), train_labels[idx].long(), ignore_index=-1)
        opt.zero_grad(set_to_none=True)
        ce.backward()
        opt.step()
    with torch.no_grad():
        pred = _batched(lambda x: head((hypercolumn(encoder, x) - mu) / sd).argmax(1), eval_images)
    encoder.train(was_training)
    ref = eval_labels.long()
    if group is None:
        dice = mean_foreground_dice(pred, ref, num_classes)
    else:
        per = [mean_foreground_dice(pred[group == v], ref[group == v], num_classes) for v in group.unique()]
        dice = float(sum(per) / len(per))
    return {"dice": dice, "train_ce": float(ce.detach()), "feature_dim": float(dim)}


def _batched(fn: Callable[[Tensor], Tensor], x: Tensor, size: int = 64) -> Tensor:
    return torch.cat([fn(x[i : i + size]) for i in range(0, x.shape[0], size)])


def encoder_health(encoder: nn.Module, images: Tensor) -> list[dict[str, Any]]:
    """Per conv layer of ``encoder`` on ``images`` (N, C_in, H, W): weight norm, activation
    statistics after the following ReLU, dead-unit fraction and BatchNorm drift (module docstring).

    The encoder runs once in eval mode (running statistics are used and not updated); the batch
    statistics are those of the input to each BatchNorm layer. Rows are in forward order:
    ``{"layer", "weight_norm", "act_mean", "act_std", "dead_frac", "bn_dmean", "bn_dlogvar"}``
    (the BN keys are NaN where a conv has no BatchNorm after it).
    """
    rows: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    hooks = []
    last_conv: list[str] = []

    def conv_hook(name: str, mod: nn.Conv2d | nn.Conv3d) -> Callable[..., None]:
        def fn(_m: nn.Module, _inp: Any, _out: Tensor) -> None:
            last_conv[:] = [name]
            if name not in rows:
                order.append(name)
                rows[name] = {
                    "layer": name,
                    "weight_norm": float(mod.weight.detach().norm()),
                    "act_mean": math.nan,
                    "act_std": math.nan,
                    "dead_frac": math.nan,
                    "bn_dmean": math.nan,
                    "bn_dlogvar": math.nan,
                }

        return fn

    def bn_hook(mod: nn.modules.batchnorm._BatchNorm) -> Callable[..., None]:
        def fn(_m: nn.Module, inp: tuple[Tensor, ...], _out: Tensor) -> None:
            running_mean, running_var = mod.running_mean, mod.running_var
            if not last_conv or running_mean is None or running_var is None:
                return
            x = inp[0].detach().float()
            dims = [d for d in range(x.dim()) if d != 1]
            mu, var = x.mean(dims), x.var(dims, unbiased=False)
            c = mu.numel()
            row = rows[last_conv[0]]
            row["bn_dmean"] = float((running_mean - mu).norm() / math.sqrt(c))
            row["bn_dlogvar"] = float((torch.log(running_var + 1e-5) - torch.log(var + 1e-5)).norm() / math.sqrt(c))

        return fn

    def relu_hook(_m: nn.Module, _inp: Any, out: Tensor) -> None:
        if not last_conv:
            return
        a = out.detach().float()
        dims = [d for d in range(a.dim()) if d != 1]
        row = rows[last_conv[0]]
        row["act_mean"] = float(a.mean())
        row["act_std"] = float(a.std())
        row["dead_frac"] = float((a.amax(dim=dims) <= 0).float().mean())

    for name, mod in encoder.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Conv3d)):
            hooks.append(mod.register_forward_hook(conv_hook(name, mod)))
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            hooks.append(mod.register_forward_hook(bn_hook(mod)))
        elif isinstance(mod, nn.ReLU):
            hooks.append(mod.register_forward_hook(relu_hook))
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            encoder(images)
    finally:
        for hk in hooks:
            hk.remove()
        encoder.train(was_training)
    return [rows[n] for n in order]
