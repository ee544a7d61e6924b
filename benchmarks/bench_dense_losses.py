"""Peak memory and time of the dense contrastive losses, chunked vs. naive, at N sampled embeddings.

Usage::

    python benchmarks/bench_dense_losses.py                       # N = 4096 .. 65536, D = 128
    python benchmarks/bench_dense_losses.py --losses lrc mixcl --sizes 4096 8192 --reps 1

Each loss is run twice on the same inputs, in the same invocation: with the memory-bounded kernel
(``chunk_size=--chunk``) and naive (``chunk_size=None``: one (N, M) logits matrix in the autograd
graph). Workloads, all with D = 128 and forward + backward:

- ``ideal``: IDEAL dense loss, N query cells = (N / 1024) images x 32x32 grid, one key per cell
  (geometric matching, identity map), a queue of 16,384 pooled keys: M = N + 16,384 candidates;
- ``mixcl``: MixCL label consistency, N_pix = N class-balanced pixels sampled from
  (N / 4096) x 2 views x 64x64 label maps with 4 classes (SupCon per-positive over N x N);
- ``lrc``: LRC sampling loss, K_r = 16 regions x P_r = 8 points x 2 views per image
  (N / 256 images, 16x16 maps of 4x4-pixel regions): N points, N x N;
- ``plcl``: PLCL, 16 images of 64x64, K = 4, P = N / 96 anchors per class per image so that the
  anchor rows number N; candidates are only the 48 prototypes, so both versions are O(N) and
  chunking only adds loop overhead (PLCL's default is ``chunk_size=None``).

Memory and time are measured exactly as in ``benchmarks/bench_kernel.py`` (its helpers are
imported): one fresh subprocess per (loss, N, implementation); CUDA: ``max_memory_allocated``
minus the allocation before the first pass; CPU: peak RSS (``ru_maxrss``) minus the RSS after the
inputs exist; time = median of ``--reps`` passes after the measured first pass. The naive version
is skipped where its estimated footprint (30 bytes x N x M) exceeds ``--naive-budget-gib``.
Targets (issue 3): <= 1 GiB peak at N = 65,536 and <= 1.2x the naive time where naive fits.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from bench_kernel import GIB, _cuda, _rss_bytes  # noqa: E402  (shared measurement helpers)

LOSSES = ("ideal", "mixcl", "lrc", "plcl")
QUEUE = 16384


def _candidates(loss: str, n: int) -> int:
    return {"ideal": n + QUEUE, "mixcl": n, "lrc": n, "plcl": 48}[loss]


def _make_step(loss: str, n: int, chunk: int | None, dev: Any) -> tuple[Any, Any]:
    """Inputs for one workload and a closure running forward + backward; returns (step, leaf)."""
    import torch

    from localcl.losses.ideal import ideal_dense_loss
    from localcl.losses.lrc import lrc_loss
    from localcl.losses.mixcl import label_consistency_loss
    from localcl.losses.plcl import plcl_loss

    g = torch.Generator(device=dev).manual_seed(0)
    D = 128
    if loss == "ideal":
        B = max(1, n // 1024)
        x = torch.randn(B, D, 32, 32, device=dev, generator=g, requires_grad=True)
        t = torch.randn(B, D, 32, 32, device=dev, generator=g)
        q = torch.nn.functional.normalize(torch.randn(QUEUE, D, device=dev, generator=g), dim=1)
        idx = torch.arange(1024, device=dev).repeat(B, 1)

        def fn() -> torch.Tensor:
            return ideal_dense_loss(x, t, "geometric", index=idx, queue=q, tau=0.2, chunk_size=chunk)
    elif loss == "mixcl":
        B = max(1, n // 4096)
        x = torch.randn(B, 2, D, 64, 64, device=dev, generator=g, requires_grad=True)
        lab = torch.randint(0, 4, (B, 2, 64, 64), device=dev, generator=g)

        def fn() -> torch.Tensor:
            return label_consistency_loss(x, lab, n, 0.1, torch.Generator(device=dev).manual_seed(1), chunk)
    elif loss == "lrc":
        B = max(1, n // 256)
        x = torch.randn(B, 2, D, 16, 16, device=dev, generator=g, requires_grad=True)
        ys, xs = torch.meshgrid(torch.arange(16, device=dev), torch.arange(16, device=dev), indexing="ij")
        reg = ((ys // 4) * 4 + xs // 4)[None, None].repeat(B, 2, 1, 1)

        def fn() -> torch.Tensor:
            return lrc_loss(x, reg, 0.1, 16, 8, generator=torch.Generator(device=dev).manual_seed(1), chunk_size=chunk)
    else:
        x = torch.randn(16, D, 64, 64, device=dev, generator=g, requires_grad=True)
        lab = torch.randint(0, 4, (16, 64, 64), device=dev, generator=g)
        per = max(1, n // 96)

        def fn() -> torch.Tensor:
            return plcl_loss(
                x, lab, 4, per_class=per, generator=torch.Generator(device=dev).manual_seed(1), chunk_size=chunk
            )

    def step() -> float:
        x.grad = None
        out = fn()
        out.backward()
        return float(out.detach())

    return step, x


def _worker(a: argparse.Namespace) -> None:
    import torch

    dev = torch.device(a.device)
    chunk = None if a.impl == "naive" else a.chunk
    step, x = _make_step(a.loss, a.n, chunk, dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0 = time.perf_counter()
    loss = step()
    sync()
    first = time.perf_counter() - t0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    print(
        json.dumps(
            {
                "peak_bytes": peak,
                "time_s": statistics.median(times) if times else first,
                "first_s": first,
                "loss": loss,
                "grad_norm": float(x.grad.norm()),
            }
        )
    )


def _run(loss: str, n: int, impl: str, a: argparse.Namespace) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--loss",
        loss,
        "--n",
        str(n),
        "--impl",
        impl,
        "--chunk",
        str(a.chunk),
        "--reps",
        str(a.reps),
        "--device",
        a.device,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    if p.returncode != 0:
        tail = p.stderr.strip().splitlines()[-1:] or [f"killed (signal {-p.returncode})"]
        print(f"  {loss} {impl} N={n} failed (rc={p.returncode}): {tail}", flush=True)
        return None
    result: dict[Any, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--loss", choices=LOSSES, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    ap.add_argument("--losses", nargs="+", default=list(LOSSES), choices=LOSSES)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument("--chunk", type=int, default=256, help="anchors per chunk (default 256, the losses' default)")
    ap.add_argument("--reps", type=int, default=2, help="timed passes after the measured first pass")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument(
        "--naive-budget-gib", type=float, default=4.0, help="skip the naive version when ~30 bytes * N * M exceeds this"
    )
    a = ap.parse_args()
    if a.worker:
        _worker(a)
        return
    print(f"device={a.device} D=128 chunk={a.chunk} reps={a.reps} threads={a.threads}")
    print(
        f"{'loss':<7}{'N':>7} {'M':>7} {'naive GiB':>10} {'chunk GiB':>10} {'naive s':>9} {'chunk s':>9} "
        f"{'time ratio':>10} {'mem ratio':>9} {'|dloss|':>9}"
    )
    for loss in a.losses:
        for n in a.sizes:
            m = _candidates(loss, n)
            naive = _run(loss, n, "naive", a) if 30 * n * m / GIB <= a.naive_budget_gib else None
            ch = _run(loss, n, "chunked", a)
            if ch is None:
                continue
            f = lambda v, k, s: f"{v[k] / s:.3f}" if v else "skipped"  # noqa: E731
            tr = f"{ch['time_s'] / naive['time_s']:.2f}x" if naive else "-"
            mr = f"{ch['peak_bytes'] / max(naive['peak_bytes'], 1):.2f}x" if naive else "-"
            dl = f"{abs(ch['loss'] - naive['loss']):.1e}" if naive else "-"
            print(
                f"{loss:<7}{n:>7} {m:>7} {f(naive, 'peak_bytes', GIB):>10} {f(ch, 'peak_bytes', GIB):>10} "
                f"{f(naive, 'time_s', 1):>9} {f(ch, 'time_s', 1):>9} {tr:>10} {mr:>9} {dl:>9}",
                flush=True,
            )


if __name__ == "__main__":
    main()
