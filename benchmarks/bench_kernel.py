"""Peak memory and time of the chunked InfoNCE kernel vs. the naive full-matrix version.

Usage::

    python benchmarks/bench_kernel.py                          # N = 4096 .. 65536, D = 128
    python benchmarks/bench_kernel.py --sizes 4096 8192 --modes single --reps 2

Both implementations are the same routine, ``localcl.losses.kernel.info_nce``: the naive one
(``chunk_size=None``) builds the (N, N) logits and masks as one autograd graph; the chunked one
keeps per-anchor log-sum-exps and recomputes (chunk, N) logit blocks in the backward pass.
Workload: N embeddings of dimension D (self-contrast, τ = 0.1, forward + backward):

- ``single``: ids = i // 2 (N/2 positive pairs, e.g. IDEAL/GLCL dense correspondences);
- ``per_positive``: ids = i mod 4 (4 classes, SupCon-style MixCL label loss: N/4 positives).

How memory is measured (honestly, per configuration in a fresh subprocess):

- CUDA: ``torch.cuda.max_memory_allocated()`` minus the bytes allocated before the call
  (inputs excluded), after ``reset_peak_memory_stats``.
- CPU: tracemalloc does not see torch's allocator, so the peak *resident set size* of the
  subprocess (``getrusage(RUSAGE_SELF).ru_maxrss``, the kernel's high-water mark of touched
  pages) minus the RSS just before the first forward pass (read from /proc/self/statm, after
  the inputs exist). The first forward+backward is the one measured, so the high-water mark
  is the kernel's own. RSS counts pages the allocator keeps cached, so it is an upper bound
  on the tensors alive at the peak.

Time: median of ``--reps`` forward+backward passes after that first (warm-up) pass, in the
same subprocess. On CPU the compared figure is process CPU time with ``--threads 1`` (default):
on a shared machine wall time mostly measures the other processes; the wall time of the
chunked pass is printed too. On CUDA it is wall time after ``synchronize``. The report prints chunked/naive ratios for sizes where the naive version ran;
the naive version is skipped where its estimated footprint exceeds ``--naive-budget-gib``.
Targets (issue 3): chunked peak <= 1 GiB at N = 65,536 and time <= 1.2x naive.
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

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(args: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(REPO))
    from localcl.losses.kernel import info_nce

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    x = torch.randn(args.n, args.dim, device=dev, requires_grad=True)
    ids = (torch.arange(args.n, device=dev) // 2) if args.mode == "single" else torch.arange(args.n, device=dev) % 4
    chunk = None if args.impl == "naive" else args.chunk

    def step() -> float:
        x.grad = None
        loss = info_nce(x, tau=0.1, anchor_ids=ids, mode=args.mode, chunk_size=chunk)
        loss.backward()
        return float(loss.detach())

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if dev.type == "cuda":
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    sync()
    first, first_cpu = time.perf_counter() - t0, time.process_time() - c0
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times, cpu = [], []
    for _ in range(args.reps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    assert x.grad is not None  # backward ran
    print(
        json.dumps(
            {
                "peak_bytes": peak,
                "wall_s": statistics.median(times) if times else first,
                "cpu_s": statistics.median(cpu) if cpu else first_cpu,
                "first_s": first,
                "loss": loss,
                "grad_norm": float(x.grad.norm()),
            }
        )
    )


def _run(n: int, impl: str, mode: str, a: argparse.Namespace) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "--n",
        str(n),
        "--impl",
        impl,
        "--mode",
        mode,
        "--dim",
        str(a.dim),
        "--chunk",
        str(a.chunk),
        "--reps",
        str(a.reps),
        "--device",
        a.device,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
    if p.returncode != 0:
        print(f"  {impl} N={n} failed (rc={p.returncode}): {p.stderr.strip().splitlines()[-1:]}", flush=True)
        return None
    result: dict[Any, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--impl", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="single", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    ap.add_argument(
        "--modes", nargs="+", default=["single", "per_positive"], choices=["single", "summed", "per_positive"]
    )
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--chunk", type=int, default=256, help="anchors per chunk (default 256)")
    ap.add_argument("--reps", type=int, default=2, help="timed passes after the warm-up pass")
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (default 1: CPU time is then robust to other load)"
    )
    ap.add_argument(
        "--naive-budget-gib", type=float, default=10.0, help="skip the naive version when ~30 bytes * N^2 exceeds this"
    )
    a = ap.parse_args()
    if a.worker:
        _worker(a)
        return
    print(f"device={a.device} D={a.dim} chunk={a.chunk} reps={a.reps} threads={a.threads}")
    key = "wall_s" if a.device.startswith("cuda") else "cpu_s"
    print(f"time = median {'wall' if key == 'wall_s' else 'process CPU'} seconds of one forward+backward")
    print(
        f"{'mode':<13}{'N':>7} {'naive GiB':>10} {'chunk GiB':>10} {'naive s':>9} {'chunk s':>9} "
        f"{'time ratio':>10} {'|dloss|':>9} {'chunk wall s':>12}"
    )
    for mode in a.modes:
        for n in a.sizes:
            naive = None
            if 30 * n * n / GIB <= a.naive_budget_gib:
                naive = _run(n, "naive", mode, a)
            ch = _run(n, "chunked", mode, a)
            if ch is None:
                continue
            f = lambda v, k, s: f"{v[k] / s:.3f}" if v else "skipped"  # noqa: E731
            ratio = f"{ch[key] / naive[key]:.2f}x" if naive else "-"
            dl = f"{abs(ch['loss'] - naive['loss']):.1e}" if naive else "-"
            print(
                f"{mode:<13}{n:>7} {f(naive, 'peak_bytes', GIB):>10} {f(ch, 'peak_bytes', GIB):>10} "
                f"{f(naive, key, 1):>9} {f(ch, key, 1):>9} {ratio:>10} {dl:>9} {ch['wall_s']:>12.3f}",
                flush=True,
            )


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    main()
