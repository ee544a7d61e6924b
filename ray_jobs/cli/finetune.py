"""`localcl finetune`: the finetune stage alone as a Ray Train job."""

from __future__ import annotations

import argparse

from ray_jobs.cli.train_common import add_common, load, report_stage, start_ray


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="finetune a model (Ray Train job)",
        description="Run the finetune stage of a config on Ray Train.",
    )
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.train import pipeline

    cfg = load(args, "finetune")
    run_dir = pipeline.resolve_run_dir(cfg, args.run_dir)
    start_ray(args, cfg)
    out = pipeline.run_stages(cfg, run_dir, ("finetune",), progress=cfg.logging.progress)
    report_stage("finetune", out["finetune"])
    return 0
