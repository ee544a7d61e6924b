"""`localcl run`: pretrain -> fine-tune -> evaluate, plus the supervised baseline."""

from __future__ import annotations

import argparse

from ray_jobs.cli.train_common import add_common, load, report_stage, start_ray


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="whole pipeline: pretrain, fine-tune, baseline, evaluate",
        description="pretrain -> fine-tune -> evaluate, plus the supervised "
        "baseline on the same label budget (when configured).",
    )
    add_common(p)
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation step")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.train import pipeline

    cfg = load(args, "run")
    run_dir = pipeline.resolve_run_dir(cfg, args.run_dir)
    start_ray(args, cfg)
    out = pipeline.run_pipeline(cfg, run_dir, evaluate=not args.no_eval, progress=cfg.logging.progress)
    for section in ("pretrain", "finetune", "baseline"):
        if section in out:
            report_stage(pipeline.STAGE_DIRS[section], out[section])
    if out.get("eval"):
        print()
        print(pipeline.summary_table(out["eval"]))
        print(f"\nevaluation: {run_dir}/eval/")
    print(f"model card: {run_dir}/MODEL_CARD.md")
    return 0
