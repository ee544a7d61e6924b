"""Cost of one pre-training / fine-tuning step of every method, relative to a supervised step.

Baseline (measured in the same run, same batch, same U-Net, re-timed just before and after each
row): one ``FINETUNE["supervised"]`` step (GLCL augmentation + forward + Dice + backward + Adam). Each method's step includes its
views, heads, losses, backward, optimiser step and ``on_after_step`` (EMA / queue). The ratio
says what the method costs on top of plain supervised training; absolute times depend on the
machine and are printed for reference only.

Usage (CPU example; on a GPU pass --device cuda):

    .venv/bin/python benchmarks/bench_method_steps.py --size 96 --batch 8 --repeats 3
    .venv/bin/python benchmarks/bench_method_steps.py --size 192 --batch 20 --device cuda
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from localcl.methods import FINETUNE, METHODS


def _timeit(fn: Callable[[], None], repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocations, cudnn autotune, first queue push)
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96, help="square slice size (divisible by 32)")
    ap.add_argument("--batch", type=int, default=8, help="slices per step (multiple of 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.manual_seed(0)
    b, s = args.batch, args.size
    x = torch.rand(b, 1, s, s, device=dev)
    y = torch.randint(0, 4, (b, s, s), device=dev)
    sp = (torch.arange(s, device=dev).view(s, 1) // 12) * 64 + torch.arange(s, device=dev).view(1, s) // 12
    batch = {
        "image": x,
        "label": y,
        "superpixels": sp.expand(b, s, s).contiguous(),
        "volume": torch.arange(b, device=dev) // 2,
        "partition": torch.arange(b, device=dev) % 2,
    }
    extra: dict[str, dict[str, Any]] = {"glcl": {"input_size": s, "partitions": 2, "volumes_per_batch": b // 2}}

    def ft_step(name: str) -> Callable[[], None]:
        cls = FINETUNE[name]
        ft = cls(cls.Config(), 1, 4).to(dev)
        opt = torch.optim.Adam(ft.parameters(), 1e-3)
        bu = {"image": x, "pseudo_label": y}

        def run() -> None:
            out = ft.finetune_step({"image": x, "label": y}, bu, 10, 100)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()

        return run

    def pre_step(name: str, stage: str) -> Callable[[], None]:
        cls = METHODS[name]
        m = cls(cls.Config(**extra.get(name, {})), 1, 4).to(dev)
        opt = torch.optim.Adam(m.stage_parameters(stage), 1e-3)

        def run() -> None:
            out = m.pretrain_step(batch, 0, stage)
            opt.zero_grad()
            out["loss"].backward()
            opt.step()
            m.on_after_step()

        return run

    baseline = ft_step("supervised")
    print(f"device={dev} size={s} batch={b} reference widths (baseline re-timed around every row)")
    print(f"{'step':28s} {'ms':>9s} {'baseline ms':>12s} {'x supervised':>13s}")
    rows = [(f"finetune/{n}", ft_step(n)) for n in ("ideal", "plcl")]
    for name, cls in METHODS.items():
        for stage in cls.stages:
            rows.append((f"pretrain/{name}/{stage}", pre_step(name, stage)))
    for label, fn in rows:
        before = _timeit(baseline, args.repeats, dev)
        t = _timeit(fn, args.repeats, dev)
        base = 0.5 * (before + _timeit(baseline, args.repeats, dev))  # robust to load drift
        print(f"{label:28s} {t * 1e3:9.1f} {base * 1e3:12.1f} {t / base:13.2f}")


if __name__ == "__main__":
    main()
