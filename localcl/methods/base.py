"""Common machinery of the pre-training methods and fine-tuning strategies.

A *method* (``METHODS[name]``) is an ``nn.Module`` that owns a U-Net backbone and the heads of
its pre-training losses. Contract (``docs/interfaces.md``):

- ``M.Config``: a pydantic v2 model, ``extra="forbid"``, defaults = the specification
  (``../shared/design/methods.md``), validators naming the field and the allowed values;
- ``M(cfg, in_channels, num_classes)``;
- ``M.pretrain_batch``: the batch kind the data side must produce (``"slices"``,
  ``"partition"``, ``"slices+superpixels"``) or ``None`` (no pre-training stage);
- ``M.stages``: names of the pre-training stages, run in order (GLCL: ``("global", "local")``);
- ``pretrain_step(batch, step, stage=None) -> dict[str, Tensor]`` with ``"loss"`` the total;
  ``forward`` is the same call, so ``DistributedDataParallel(method)(batch, step=...)`` syncs
  gradients;
- ``stage_parameters(stage)``: the parameters the optimiser of that stage updates;
- ``on_after_step()``: EMA / queue updates (call after ``optimizer.step()``);
- ``set_total_steps(T)``: the stage's number of optimiser steps, for step schedules;
- ``backbone_state()``: U-Net state_dict (keys ``encoder.*``, ``decoder.*``) for fine-tuning;
- ``M.pretrain_reads_labels(cfg)``: whether pre-training reads ``batch["label"]`` (default False);
- ``M.superpixel_params(cfg)``: keyword arguments of
  :func:`localcl.losses.lrc.felzenszwalb_superpixels` for ``"slices+superpixels"`` batches
  (default ``{}``: the function's defaults).

A *fine-tuning strategy* (``FINETUNE[name]``) has ``FT(cfg, in_channels, num_classes)``,
``load_backbone(state, strict=False)``, ``finetune_step(batch_l, batch_u, step, total_steps)``,
``predict(image) -> probs``; ``forward(batch_l, batch_u, step, total_steps)`` is the training
step when ``batch_l`` is a dict and ``predict`` when it is a tensor. Hooks with defaults:
``on_after_step()`` (no-op), ``start_round(r)`` (self-training round; no-op),
``pseudo_label_key`` (key of the pseudo-labels in ``batch_u``; ``"pseudo_label"``).

Hyperparameters are validated once, by the field types of the config (pydantic constraints):
:data:`Temperature`, :data:`PositiveFinite`, :data:`NonNegative`, :data:`UnitInterval`,
:data:`Count`.

Randomness (views, sampling) comes from ``self.generator``, a CPU ``torch.Generator`` seeded
with ``cfg.seed + 1_000_003 * rank`` so workers draw different views; reseed with
:meth:`reseed` (e.g. per epoch) for reproducible runs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Annotated, Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch import Tensor, nn

from localcl import dist
from localcl.augment import make_generator

__all__ = [
    "BaseMethodConfig",
    "Count",
    "FinetuneStrategy",
    "NonNegative",
    "PositiveFinite",
    "PretrainMethod",
    "Temperature",
    "UnitInterval",
    "check_batch",
]

# ------------------------------------------------------------------ hyperparameter types
# One rule per kind of hyperparameter; a config field states its kind by its type.
PositiveFinite = Annotated[float, Field(gt=0, allow_inf_nan=False)]
"""A finite float > 0 (learning rates, Felzenszwalb scale, CRF kernel widths)."""
Temperature = PositiveFinite
"""A softmax temperature: finite and > 0 (the rule of :func:`localcl.losses.kernel.check_tau`)."""
NonNegative = Annotated[float, Field(ge=0, allow_inf_nan=False)]
"""A finite float >= 0 (loss weights)."""
UnitInterval = Annotated[float, Field(ge=0, le=1)]
"""A float in [0, 1] (EMA momentum, probabilities, fractions)."""
Count = Annotated[int, Field(ge=1)]
"""An int >= 1 (sizes, counts, iterations)."""


class BaseMethodConfig(BaseModel):
    """Fields shared by every method / strategy config.

    Attributes:
        seed: seed of the method's ``torch.Generator`` (views, pixel sampling).
        widths: U-Net encoder channels per level (spec §1.3: 16, 32, 64, 128, 128, 128).
            At least 2 levels, all > 0. Input sizes must be divisible by 2^(len(widths)-1).
        decoder_widths: decoder block channels (spec §1.3: 128, 128, 64, 32, 16), exactly
            ``len(widths) - 1`` entries.
        norm: normalisation of the backbone: "batch" (the reference), "instance", "group", "none".
        lr: Adam learning rate (1e-3 in GLCL/PLCL, spec §1.6/§2.7); read by ``ray_jobs``.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    seed: int = 0
    widths: tuple[Count, ...] = (16, 32, 64, 128, 128, 128)
    decoder_widths: tuple[Count, ...] = (128, 128, 64, 32, 16)
    norm: str = "batch"
    lr: PositiveFinite = 1e-3

    @model_validator(mode="before")
    @classmethod
    def _unknown_keys(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown config key(s) {unknown} for {cls.__qualname__}; valid keys: {sorted(cls.model_fields)}"
                )
        return data

    @model_validator(mode="after")
    def _decoder_matches(self) -> BaseMethodConfig:
        if len(self.widths) < 2:
            raise ValueError(f"widths must have >= 2 levels, got {self.widths}")
        if len(self.decoder_widths) != len(self.widths) - 1:
            raise ValueError(
                f"decoder_widths must have len(widths) - 1 = {len(self.widths) - 1} entries, got {self.decoder_widths}"
            )
        return self

    @field_validator("norm")
    @classmethod
    def _norm(cls, v: str) -> str:
        allowed = ["batch", "instance", "group", "none"]
        if v not in allowed:
            raise ValueError(f"norm must be one of {allowed}, got {v!r}")
        return v


def check_batch(batch: Mapping[str, Tensor], keys: Iterable[str], owner: str) -> None:
    """Raise ``KeyError``/``ValueError`` naming missing keys or a badly shaped ``image``."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"{owner}: batch must be a dict of tensors, got {type(batch).__name__}")
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{owner}: batch is missing key(s) {missing}; has {sorted(batch)}")
    img = batch.get("image")
    if img is not None and (img.dim() not in (4, 5) or not img.is_floating_point()):
        raise ValueError(
            f"{owner}: batch['image'] must be float (B, C, H, W) or (B, C, D, H, W), got {img.dtype} {tuple(img.shape)}"
        )


class _Seeded(nn.Module):
    Config: ClassVar[type[BaseMethodConfig]] = BaseMethodConfig
    name: ClassVar[str] = ""

    def __init__(self, cfg: BaseMethodConfig, in_channels: int, num_classes: int) -> None:
        super().__init__()
        if not isinstance(cfg, self.Config):
            raise TypeError(f"{type(self).__name__} needs a {self.Config.__qualname__}, got {type(cfg).__name__}")
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes must be >= 2 (background + >= 1 class), got {num_classes}")
        self.cfg = cfg
        self.in_channels = int(in_channels)
        self.num_classes = int(num_classes)
        self.generator = make_generator(cfg.seed + 1_000_003 * dist.rank())

    def generator_for(self, device: torch.device | str) -> torch.Generator:
        """A generator on ``device`` for losses that draw there (pixel/point sampling).

        CPU: ``self.generator`` itself. Other devices: a fresh device generator seeded from a
        draw of ``self.generator``, so runs stay reproducible.
        """
        device = torch.device(device)
        if device.type == "cpu":
            return self.generator
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        g = torch.Generator(device=device)
        g.manual_seed(seed)
        return g

    def reseed(self, seed: int) -> None:
        """Reset the view/sampling generator to ``seed + 1_000_003 * rank``."""
        self.generator = make_generator(int(seed) + 1_000_003 * dist.rank())

    def on_after_step(self) -> None:
        """EMA / queue updates after the optimiser step (no-op by default)."""


class PretrainMethod(_Seeded):
    """Base class of ``METHODS`` entries (see module docstring)."""

    pretrain_batch: ClassVar[str | None] = None
    stages: ClassVar[tuple[str, ...]] = ("main",)
    default_finetune: ClassVar[str] = "supervised"
    #: optimiser steps of the current stage (set by :meth:`set_total_steps`; None = unknown).
    total_steps: int | None = None

    def set_total_steps(self, total_steps: int) -> None:
        """Tell the method how many optimiser steps the current stage has (for schedules such
        as the key momentum's); the training loop calls it before the first step."""
        if int(total_steps) < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    def _stage(self, stage: str | None) -> str:
        if not self.stages:
            raise RuntimeError(
                f"method {self.name!r} has no pre-training stage (pretrain_batch is None); "
                f"fine-tune with FINETUNE[{self.default_finetune!r}] directly"
            )
        stage = self.stages[0] if stage is None else stage
        if stage not in self.stages:
            raise ValueError(f"stage must be one of {list(self.stages)}, got {stage!r}")
        return stage

    def pretrain_step(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, batch: Mapping[str, Tensor], step: int = 0, stage: str | None = None) -> dict[str, Tensor]:  # type: ignore[override]
        return self.pretrain_step(batch, step, stage)

    def stage_parameters(self, stage: str | None = None) -> list[nn.Parameter]:
        """Parameters optimised in ``stage`` (default: all trainable parameters)."""
        self._stage(stage)
        return [p for p in self.parameters() if p.requires_grad]

    @classmethod
    def pretrain_reads_labels(cls, cfg: BaseMethodConfig) -> bool:
        """Whether pre-training with ``cfg`` reads ``batch["label"]`` (False by default).

        A label-reading pre-training must see only the labels of the current label budget."""
        return False

    @classmethod
    def superpixel_params(cls, cfg: BaseMethodConfig) -> dict[str, Any]:
        """Keyword arguments of :func:`localcl.losses.lrc.felzenszwalb_superpixels` for the
        super-pixel cache of ``"slices+superpixels"`` batches (``{}``: the function's defaults)."""
        return {}

    def backbone_state(self) -> dict[str, Tensor]:
        """State dict of the U-Net (``encoder.*`` and ``decoder.*`` keys) on CPU."""
        net = self.get_submodule("unet")  # a subclass sets self.unet; typed nn.Module here
        return {
            k: v.detach().cpu().clone() for k, v in net.state_dict().items() if k.startswith(("encoder.", "decoder."))
        }


class FinetuneStrategy(_Seeded):
    """Base class of ``FINETUNE`` entries (see module docstring)."""

    def load_backbone(self, state: Mapping[str, Tensor], strict: bool = False) -> tuple[list[str], list[str]]:
        """Load ``encoder.*``/``decoder.*`` weights into the strategy's U-Net(s); heads stay fresh.
        Returns ``(missing, unexpected)`` keys."""
        raise NotImplementedError

    def backbone_state(self) -> dict[str, Tensor]:
        """``encoder.*``/``decoder.*`` weights (e.g. the PLCL baseline -> PLCL joint training)."""
        raise NotImplementedError

    @property
    def pseudo_label_key(self) -> str:
        """Key of the pseudo-label map in ``batch_u`` (self-training strategies)."""
        return "pseudo_label"

    def start_round(self, r: int | None = None) -> int:
        """Enter self-training round ``r`` and return it (no-op without self-training)."""
        return 0 if r is None else int(r)

    def finetune_step(
        self, batch_l: Mapping[str, Tensor], batch_u: Mapping[str, Tensor] | None, step: int, total_steps: int
    ) -> dict[str, Tensor]:
        raise NotImplementedError

    def predict(self, image: Tensor) -> Tensor:
        raise NotImplementedError

    #: Names of the strategy's separate predictors (e.g. IDEAL's two decoder streams) that
    #: :meth:`predict` combines; evaluation scores each one as well. Empty: a single predictor.
    streams: tuple[str, ...] = ()

    def predict_stream(self, image: Tensor, name: str) -> Tensor:
        """Class probabilities (B, K, H, W) of one of :attr:`streams` alone."""
        raise KeyError(f"{type(self).__name__} has no prediction stream {name!r} (streams: {list(self.streams)})")

    def forward(  # type: ignore[override]
        self,
        batch_l: Mapping[str, Tensor] | Tensor,
        batch_u: Mapping[str, Tensor] | None = None,
        step: int = 0,
        total_steps: int = 1,
    ) -> dict[str, Tensor] | Tensor:
        if isinstance(batch_l, Tensor):
            return self.predict(batch_l)
        return self.finetune_step(batch_l, batch_u, step, total_steps)
