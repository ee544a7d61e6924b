"""`localcl demo`: the whole pipeline on an embedded default, in minutes on a laptop.

Without ``--data``: a synthetic cardiac-like phantom (``storage.phantom``) is generated into the
run dir, ingested, and run through ``configs/run/demo.yaml`` (IDEAL pretraining + two-stream
fine-tuning vs the supervised baseline on the same 2 labelled patients). With ``--data PATH``:
the same on an MSD-layout dataset such as ``../shared/data/acdc``.
"""

from __future__ import annotations

import argparse
import os
import time

from ray_jobs.cli.train_common import add_common, load, start_ray
from ray_jobs.errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="whole pipeline on a synthetic phantom (or --data PATH)",
        description="Generate a phantom dataset (or use --data), ingest, "
        "pretrain, fine-tune, evaluate, compare with the supervised "
        "baseline.",
    )
    add_common(p, default_config="demo")
    p.add_argument("--data", default=None, help="MSD-layout dataset folder (default: phantom)")
    p.add_argument("--cases", type=int, default=24, help="phantom volumes to generate (2 per patient; default 24)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.train import pipeline

    cfg = load(args, "run")
    run_dir = pipeline.resolve_run_dir(cfg, args.run_dir or os.path.join("runs", "demo"))
    t0 = time.perf_counter()
    if args.data:
        if not os.path.isdir(args.data):
            raise UserError(f"--data: {args.data} is not a folder")
        source = os.path.abspath(args.data)
    else:
        # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
        from storage.phantom import make_phantom_dataset

        source = os.path.join(run_dir, "phantom")
        if not os.path.isfile(os.path.join(source, "dataset.json")):
            print(f"generating {args.cases} phantom volumes -> {source}")
            make_phantom_dataset(source, n_cases=args.cases, seed=cfg.data.seed)
    if cfg.data.source is None:
        cfg.data.source = source
    start_ray(args, cfg)
    out = pipeline.run_pipeline(cfg, run_dir, progress=cfg.logging.progress)
    assert cfg.pretrain is not None and cfg.finetune is not None  # the demo config has both
    table = (
        pipeline.summary_table(out.get("eval", {}))
        + f"\n\nmethod: {cfg.finetune.method.name} fine-tuning after {cfg.pretrain.method.name} "
        f"pretraining; baseline: supervised from scratch; {pipeline.describe_budget(cfg, out['plan'].labelled)}; "
        f"{len(out['plan'].test)} test volume(s)"
    )
    # the table docs/getting-started.md quotes; scripts/check_demo_table.py compares the two
    pipeline.write_text(f"{run_dir}/demo_table.md", table + "\n")
    print()
    print(table)
    print(f"plots and per-case tables: {run_dir}/eval/<model>/  (history: {run_dir}/*/history.csv)")
    print(f"model card: {run_dir}/MODEL_CARD.md")
    print(f"total {time.perf_counter() - t0:.0f} s")
    return 0
