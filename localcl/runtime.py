"""Execution switches of a training step that leave the maths unchanged: threads, memory format,
``torch.compile`` and the autocast dtype (pure torch; the Ray worker and the step benchmark use
this one place).

- ``threads``: intra-op threads (``torch.set_num_threads``); ``None`` leaves torch's choice.
- ``channels_last``: parameters and buffers of every 4-D tensor in NHWC order; convolutions of
  an (B, C, H, W) input then run in channels-last kernels (same values up to summation order).
- ``compile``: ``nn.Module.compile()`` in place on each direct child network of the method (the
  U-Net, heads, EMA/momentum branches); the state_dict keys do not change, so checkpoints stay
  interchangeable. The first steps pay the compilation.
- :func:`autocast_dtype`: the dtype of ``torch.autocast`` for a ``schedule.amp`` mode; on CPU
  only an explicit ``"bf16"`` turns it on (``"auto"`` keeps fp32 there).

All switches are off by default, which reproduces the plain eager fp32 step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RuntimeOptions", "apply_runtime", "autocast_dtype"]


@dataclass(frozen=True)
class RuntimeOptions:
    """See the module docstring; the defaults change nothing."""

    threads: int | None = None
    channels_last: bool = False
    compile: bool = False


def apply_runtime(module: nn.Module, opts: RuntimeOptions) -> nn.Module:
    """Apply ``opts`` to ``module`` (a method or strategy) in place and return it."""
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if opts.channels_last:
        module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch accepts it; the stubs do not
    if opts.compile:
        for child in module.children():
            if any(True for _ in child.parameters()):
                child.compile()
    return module


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype of ``schedule.amp`` ``mode`` on ``device``; ``None``: fp32, no autocast.

    CUDA: ``"auto"`` is bf16 where supported, else fp16; ``"bf16"``/``"fp16"`` as named.
    CPU: bf16 only when asked for explicitly (``"bf16"``); ``"auto"``, ``"fp16"``, ``"off"``: None.
    """
    if mode == "off":
        return None
    if device.type != "cuda":
        return torch.bfloat16 if mode == "bf16" else None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16
