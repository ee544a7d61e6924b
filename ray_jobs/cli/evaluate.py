"""``localcl evaluate``: score a model on a store split, or a folder of predictions.

- ``localcl evaluate --checkpoint DIR --store STORE [--split val] [--out DIR]``: a Ray Train job
  (``--workers`` workers predict disjoint shards of the cases, rank 0 writes the report).
- ``localcl evaluate --pred DIR --ref DIR [--out DIR]``: NIfTI label maps vs reference label
  maps, matched by file name (no model, no Ray).

Both write per_case.json/.csv, summary.json/.md and plots/*.png (see :mod:`ray_jobs.evaluation.job`)
and print the summary table.
"""

from __future__ import annotations

import argparse
import json
import os

from ray_jobs.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="per-case Dice/HD95/ASD (mm), summary table and plots for a model on a store split "
        "(--checkpoint/--store) or for a folder of predicted label maps (--pred/--ref)",
    )
    p.add_argument("--checkpoint", help="exported model dir (RUN_DIR/finetune/model) or a run dir")
    p.add_argument("--store", help="store path or URI to evaluate on (with --checkpoint)")
    p.add_argument("--split", default="val", help="catalog split, 'all' or 'labelled' (default: val)")
    p.add_argument("--max-cases", type=int, default=None, help="evaluate only the first N cases of the split")
    p.add_argument("--pred", help="folder of predicted NIfTI label maps (with --ref)")
    p.add_argument("--ref", help="folder of reference NIfTI label maps, same file names (with --pred)")
    p.add_argument(
        "--images",
        default=None,
        help="scans drawn under the overlays with --pred/--ref (default: <ref>/../imagesTr if present)",
    )
    p.add_argument(
        "--labels",
        type=int,
        nargs="+",
        default=None,
        help="foreground labels to score with --pred/--ref (default: all in the references)",
    )
    p.add_argument("--out", help="report folder or URI (default: <checkpoint run>/eval/<split>, or <pred>/eval)")
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers (0: local mode in this process)")
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (nccl); default CPU (gloo)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    p.add_argument("--overlays", type=int, default=3, help="cases drawn as overlays (worst..best)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument(
        "--save-predictions", action="store_true", help="also write <out>/predictions/<case>.nii.gz (with --checkpoint)"
    )
    p.add_argument("--storage-options", default=None, help="JSON fsspec options for the store (e.g. S3 endpoint)")
    p.add_argument("--address", default=None, help="existing Ray cluster (default: a local instance)")
    p.add_argument("--json", action="store_true", help="print summary.json instead of the table")
    p.set_defaults(func=run)


def _default_out(checkpoint: str, split: str) -> str:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.evaluation.scoring import resolve_model_dir

    model_dir = resolve_model_dir(checkpoint).rstrip("/")
    parts = model_dir.rsplit("/", 2)
    run_dir = parts[0] if len(parts) == 3 and parts[2] == "model" else model_dir
    stage = parts[1] if len(parts) == 3 else "model"
    name = "method" if stage == "finetune" else ("baseline" if stage == "finetune_baseline" else stage)
    return f"{run_dir}/eval/{name}-{split}"


def run(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.evaluation import job as evaluation_job
    from ray_jobs.evaluation import scoring as evaluation_scoring

    by_folder = args.pred is not None or args.ref is not None
    by_model = args.checkpoint is not None or args.store is not None
    if by_folder and by_model:
        raise UserError("use either --checkpoint/--store or --pred/--ref, not both")
    if by_folder:
        if not (args.pred and args.ref):
            raise UserError("--pred and --ref go together")
        summary = evaluation_scoring.score_folders(
            args.pred,
            args.ref,
            args.out,
            labels=args.labels,
            plots=not args.no_plots,
            overlay_cases=args.overlays,
            images_dir=args.images,
        )
        out = args.out or os.path.join(args.pred, "eval")
    elif by_model:
        if not (args.checkpoint and args.store):
            raise UserError("--checkpoint and --store go together")
        if args.workers < 0:
            raise UserError(f"--workers must be >= 0, got {args.workers}")
        try:
            so = json.loads(args.storage_options) if args.storage_options else None
        except json.JSONDecodeError as exc:
            raise UserError(f"--storage-options: not JSON ({exc})") from None
        out = args.out or _default_out(args.checkpoint, args.split)
        if "://" not in out:
            out = os.path.abspath(out)
        # validate the model directory before Ray starts
        evaluation_scoring.resolve_model_dir(args.checkpoint)
        # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
        from ray_jobs.train.trainer import init_ray

        init_ray(args.address, num_cpus=max(args.workers, 1) if not args.address else None)
        summary = evaluation_job.evaluate_store(
            args.checkpoint,
            args.store,
            out,
            split=args.split,
            max_cases=args.max_cases,
            num_workers=args.workers,
            use_gpu=args.gpu,
            storage_options=so,
            plots=not args.no_plots,
            overlay_cases=args.overlays,
            save_predictions=args.save_predictions,
            batch_size=args.batch_size,
        )
    else:
        raise UserError("nothing to evaluate: give --checkpoint DIR --store STORE, or --pred DIR --ref DIR")
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        print(evaluation_scoring.summary_markdown(summary, "Evaluation"))
        print(f"report: {out}  (summary.md, per_case.csv, plots/)")
    return 0
