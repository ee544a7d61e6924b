"""Evaluation throughput: Ray Train evaluation job (1 and 2 workers) vs a plain loop.

Usage::

    python benchmarks/bench_evaluate.py                       # 24 phantom cases, 96 x 96 x 10
    python benchmarks/bench_evaluate.py --cases 48 --widths 16 32 64 --workers 1 2

Workload, all in one invocation on the same store and model:

- a phantom store (``storage.phantom``, ``--cases`` volumes, ingested once);
- an exported ``FINETUNE["supervised"]`` U-Net with ``--widths`` (random weights; the amount of
  computation, not the accuracy, matters here), trained size 96 x 96 at native spacing;
- baseline: a plain loop in this process, ``predict_case`` + ``localcl.metrics.evaluate_case`` per
  case (what every worker does), no report;
- ``evaluate_store`` with W workers for each ``--workers`` value (report and plots included,
  ``--no-plots`` to leave them out), timed end to end; "overhead" is that time minus the
  baseline time divided by W (what perfect sharding with no start-up cost would take).

Printed: seconds, cases/s and the ratio to the baseline for each setting. The fixed start-up
cost of a Ray Train fit (worker processes importing torch, ~20 s on 2 cores per
``../shared/design/platform.md``) dominates small evaluations; the ratio shows where sharding
pays off.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args()

    import ray
    import torch

    import storage
    from localcl.methods import FINETUNE
    from localcl.metrics import evaluate_case
    from ray_jobs.evaluation.inference import predict_case
    from ray_jobs.evaluation.job import evaluate_store
    from ray_jobs.train.checkpoint import export_model, load_model
    from storage.phantom import make_phantom_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-eval-"))
    src = make_phantom_dataset(tmp / "phantom", n_cases=args.cases, seed=0)
    uri = str(tmp / "store.zarr")
    storage.ingest(src, uri, progress=False)
    cls = FINETUNE["supervised"]
    cfg = cls.Config(widths=tuple(args.widths), decoder_widths=tuple(reversed(args.widths[:-1])))
    torch.manual_seed(0)
    net = cls(cfg, 1, 4).eval()
    spec = {
        "stage": "finetune",
        "name": "supervised",
        "config": cfg.model_dump(mode="json"),
        "in_channels": 1,
        "num_classes": 4,
        "size": [96, 96],
        "spacing_mm": None,
        "label_names": {"0": "background", "1": "RV", "2": "MYO", "3": "LV"},
    }
    model_dir = str(tmp / "run" / "finetune" / "model")
    export_model(model_dir, net, spec)
    st = storage.open_store(uri)
    cases = list(st.cases)

    # baseline: plain loop in this process (1 thread, like one Ray worker)
    torch.set_num_threads(1)
    model, spec = load_model(model_dir)
    t0 = time.perf_counter()
    for case in cases:
        pred = predict_case(model, spec, st, case)
        evaluate_case(pred, st.label(case), st.meta(case)["spacing"], [1, 2, 3])
    base = time.perf_counter() - t0
    print(f"cases: {len(cases)} x {tuple(st.meta(cases[0])['shape'])}, U-Net widths {tuple(args.widths)}")
    print(f"{'setting':<22}{'seconds':>10}{'cases/s':>10}{'vs loop':>10}")
    print(f"{'plain loop (1 proc)':<22}{base:>10.1f}{len(cases) / base:>10.2f}{1.0:>10.2f}")

    ray.init(
        num_cpus=max(max(args.workers), 1),
        object_store_memory=512 * 2**20,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        log_to_driver=False,
    )
    for w in args.workers:
        t0 = time.perf_counter()
        evaluate_store(model_dir, uri, str(tmp / f"eval-{w}"), cases=cases, num_workers=w, plots=not args.no_plots)
        dt = time.perf_counter() - t0
        print(
            f"{f'Ray Train, {w} worker(s)':<22}{dt:>10.1f}{len(cases) / dt:>10.2f}{dt / base:>10.2f}"
            f"   (overhead beyond loop/W: {dt - base / max(w, 1):.1f} s)"
        )
    ray.shutdown()
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
