"""Training-step throughput (samples/s) of every method, and of each runtime switch, in one run.

Rows: the fine-tuning step of every ``FINETUNE`` strategy and the pre-training step of every
``METHODS`` stage, with the CPU study's shapes by default (``ray_jobs/configs/study/acdc_cpu.yaml``:
96x96 slices, U-Net widths 8-16-32-64 with the decoder 32-16-8, batch 8). Columns, all measured in the same run:

- ``plain``: a plain eager PyTorch step of the same U-Net and loss, no ``localcl`` code: forward,
  Dice + CE on the raw batch, backward, Adam (the baseline of issue 15);
- ``project``: the step as the Ray worker runs it (``pretrain_step``/``finetune_step``:
  augmentation, views, heads, losses; backward; Adam; ``on_after_step`` EMA/queue), fp32 eager;
- one column per switch of :mod:`localcl.runtime` on top of ``project``: ``threads`` (intra-op
  threads = ``--threads``, the others run with 1 like a Ray worker with ``CPU: 1``),
  ``channels_last``, ``bf16`` (``torch.autocast`` bf16, ``schedule.amp: bf16``), ``compile``
  (only with ``--compile``; its one-off compile time is printed separately), and ``all``.

Load noise: the variants of a row are timed interleaved (A B C ... A B C ...), ``--reps`` rounds
of ``--steps`` steps each, and the median round is reported; ratios are within one row. Then a
``torch.profiler`` table of the top ops of the slowest ``project`` step is printed.

Usage::

    .venv/bin/python benchmarks/bench_step.py                       # all rows, CPU
    .venv/bin/python benchmarks/bench_step.py --rows finetune/supervised finetune/ideal --json out.json
    .venv/bin/python benchmarks/bench_step.py --device cuda --compile
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from localcl.losses.segmentation import dice_ce_loss
from localcl.methods import FINETUNE, METHODS
from localcl.runtime import RuntimeOptions, apply_runtime


@dataclass(frozen=True)
class Variant:
    name: str
    threads: int
    channels_last: bool = False
    bf16: bool = False
    compile: bool = False


def make_batch(b: int, s: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """A synthetic batch with every key a method may read: image (B,1,S,S), label (B,S,S) in 0..3,
    superpixels (B,S,S) of 12x12 cells, volume/partition ids (B,)."""
    g = torch.Generator().manual_seed(0)
    sp = (torch.arange(s).view(s, 1) // 12) * 64 + torch.arange(s).view(1, s) // 12
    out = {
        "image": torch.rand(b, 1, s, s, generator=g),
        "label": torch.randint(0, 4, (b, s, s), generator=g),
        "superpixels": sp.expand(b, s, s).contiguous(),
        "volume": torch.arange(b) // 2,
        "partition": torch.arange(b) % 2,
    }
    return {k: v.to(dev) for k, v in out.items()}


def make_step(
    row: str, v: Variant, batch: dict[str, torch.Tensor], widths: list[int], dev: torch.device
) -> Callable[[], None]:
    """A closure running one optimiser step of ``row`` ("finetune/<name>" or
    "pretrain/<name>/<stage>") with the switches of ``v``; variant "plain": the plain eager
    supervised step of the same U-Net widths instead."""
    torch.manual_seed(0)
    kind, name, *rest = row.split("/")
    kind = "plain" if v.name == "plain" else kind
    s = batch["image"].shape[-1]
    amp = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=v.bf16)
    opts = RuntimeOptions(channels_last=v.channels_last, compile=v.compile)
    net = {"widths": widths, "decoder_widths": widths[-2::-1]}  # the demo's mirror-image decoder
    if kind == "finetune" or kind == "plain":
        ft = FINETUNE[name if kind == "finetune" else "supervised"]
        m: Any = apply_runtime(ft(ft.Config(**net), 1, 4).to(dev), opts)
        opt = torch.optim.Adam(m.parameters(), 1e-3)
        bl, bu = (
            {"image": batch["image"], "label": batch["label"]},
            {"image": batch["image"], "pseudo_label": batch["label"]},
        )

        def run() -> None:
            with amp:
                if kind == "plain":
                    loss = dice_ce_loss(m.unet(batch["image"])["logits"], batch["label"])
                else:
                    loss = m.finetune_step(bl, bu, 10, 100)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return run
    cls = METHODS[name]
    extra = (
        {"input_size": s, "partitions": 2, "volumes_per_batch": batch["image"].shape[0] // 2} if name == "glcl" else {}
    )
    pm: Any = apply_runtime(cls(cls.Config(**net, **extra), 1, 4).to(dev), opts)
    stage = rest[0]
    popt = torch.optim.Adam(pm.stage_parameters(stage), 1e-3)

    def prun() -> None:
        with amp:
            loss = pm.pretrain_step(batch, 0, stage)["loss"]
        popt.zero_grad(set_to_none=True)
        loss.backward()
        popt.step()
        pm.on_after_step()

    return prun


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def bench_row(row: str, variants: list[Variant], a: argparse.Namespace, dev: torch.device) -> dict[str, Any]:
    batch = make_batch(a.batch, a.size, dev)
    steps: dict[str, Callable[[], None]] = {}
    warm_s: dict[str, float] = {}
    for v in variants:
        torch.set_num_threads(v.threads)
        fn = make_step(row, v, batch, a.widths, dev)
        t = time.perf_counter()
        for _ in range(2):  # warm-up: allocations, first queue push, compilation
            fn()
        _sync(dev)
        warm_s[v.name] = time.perf_counter() - t
        steps[v.name] = fn
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(a.reps):  # interleaved: every variant once per round
        for v in variants:
            torch.set_num_threads(v.threads)
            t = time.perf_counter()
            for _ in range(a.steps):
                steps[v.name]()
            _sync(dev)
            rates[v.name].append(a.steps * a.batch / (time.perf_counter() - t))
    med = {k: statistics.median(r) for k, r in rates.items()}
    out: dict[str, Any] = {"row": row, "samples_per_s": med, "warmup_s": warm_s}
    out["ratios"] = {k: med[k] / med["project"] for k in med} | {"project/plain": med["project"] / med["plain"]}
    if "compile" in med:
        per_step = a.batch / med["project"]
        out["compile_s"] = max(0.0, warm_s["compile"] - 2 * per_step)
    if dev.type == "cuda":
        out["max_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def profile_row(row: str, a: argparse.Namespace, dev: torch.device, threads: int) -> str:
    """``torch.profiler`` table (top 15 ops by self time) of 3 ``project`` steps of ``row``."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    fn = make_step(row, Variant("project", threads), make_batch(a.batch, a.size, dev), a.widths, dev)
    fn()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            fn()
        _sync(dev)
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    table: str = prof.key_averages().table(sort_by=key, row_limit=15)
    return table


def all_rows() -> list[str]:
    rows = [f"finetune/{n}" for n in FINETUNE]
    for name, cls in METHODS.items():
        rows += [f"pretrain/{name}/{st}" for st in cls.stages]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=96, help="square slice size (divisible by 32)")
    ap.add_argument("--batch", type=int, default=8, help="slices per step (multiple of 4)")
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--steps", type=int, default=3, help="steps per timed round")
    ap.add_argument("--reps", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the 'threads' variant")
    ap.add_argument("--compile", action="store_true", help="add the torch.compile variant (slow to warm up)")
    ap.add_argument("--rows", nargs="+", default=None, help=f"subset of: {' '.join(all_rows())}")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    dev = torch.device(a.device)
    base = 1 if dev.type == "cpu" else torch.get_num_threads()
    variants = [
        Variant("plain", base),
        Variant("project", base),
        Variant("threads", a.threads),
        Variant("channels_last", base, channels_last=True),
        Variant("bf16", base, bf16=True),
    ]
    if a.compile:
        variants.append(Variant("compile", base, compile=True))
    variants.append(Variant("all", a.threads, True, True, a.compile))
    rows = a.rows or all_rows()
    names = [v.name for v in variants]
    print(
        f"device={dev} size={a.size} batch={a.batch} widths={a.widths} steps={a.steps} reps={a.reps} load={os.getloadavg()[0]:.1f}"
    )
    print("samples/s (median of interleaved rounds) and ratio to 'project'; last column: 'all' / 'plain'")
    print(f"{'row':26s}" + "".join(f"{n:>15s}" for n in names) + f"{'all/plain':>10s}")
    results: list[dict[str, Any]] = []
    for row in rows:
        r = bench_row(row, variants, a, dev)
        med = r["samples_per_s"]
        cells = [f"{med[n]:7.1f} {med[n] / med['project']:5.2f}x" for n in names]
        rel = f"{med['all'] / med['plain']:9.2f}x"
        extra = f"  compile {r['compile_s']:.0f}s" if "compile_s" in r else ""
        extra += f"  {r['max_memory_gib']:.2f} GiB" if "max_memory_gib" in r else ""
        print(f"{row:26s}" + "".join(f"{c:>15s}" for c in cells) + rel + extra, flush=True)
        results.append(r)
    slowest = min(results, key=lambda r: r["samples_per_s"]["project"], default=None)
    if slowest is not None and not a.no_profile:
        print(f"\ntop ops of the slowest project step: {slowest['row']}")
        print(profile_row(slowest["row"], a, dev, base))
    if a.json:
        meta = {k: getattr(a, k) for k in ("size", "batch", "widths", "steps", "reps", "threads", "device")}
        with open(a.json, "w") as f:
            json.dump({"meta": {**meta, "load": os.getloadavg()[0]}, "rows": results}, f, indent=1)


if __name__ == "__main__":
    main()
