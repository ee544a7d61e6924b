"""``localcl ingest SRC STORE``: NIfTI dataset -> Zarr store (thin wrapper over storage.ingest)."""

from __future__ import annotations

import argparse
import sys

from ray_jobs.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "ingest",
        help="convert an MSD/nnU-Net dataset (or a folder of NIfTI files) into a Zarr store",
        description="Ingest NIfTI volumes into a chunked Zarr v3 store. Idempotent: complete cases "
        "with unchanged source files are skipped; interrupted cases are rewritten. Bad files are "
        "reported one per line and the rest is still ingested; exit status 1 if any failed.",
    )
    p.add_argument(
        "src",
        help="dataset folder: MSD/nnU-Net layout (dataset.json, imagesTr/, labelsTr/) "
        "or, with --unlabelled, any folder tree of .nii/.nii.gz files",
    )
    p.add_argument("store", help="store path or fsspec URI (s3://bucket/name.zarr); created if missing")
    p.add_argument("--unlabelled", action="store_true", help="SRC is a plain tree of unlabelled NIfTI files")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel ingest threads (default 1)")
    p.add_argument(
        "--chunk-xy",
        type=int,
        default=None,
        metavar="N",
        help="tile slices in NxN chunks (default: one chunk per whole slice)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("Ray fan-out (large archives; SRC may be an s3:// prefix)")
    g.add_argument(
        "--ray",
        action="store_true",
        help="one Ray task per case on a local Ray (or the cluster of --address / RAY_ADDRESS) instead of threads",
    )
    g.add_argument("--address", default=None, help="Ray cluster address (implies --ray)")
    g.add_argument(
        "--max-in-flight",
        type=int,
        default=None,
        metavar="N",
        help="most tasks submitted at once (default: 2 x cluster CPUs)",
    )
    g.add_argument(
        "--task-memory",
        type=int,
        default=2048,
        metavar="MIB",
        help="Ray memory reserved per task, also the largest volume decode accepted (default 2048 MiB)",
    )
    g.add_argument("--batch-size", type=int, default=1, metavar="N", help="cases per task (default 1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    import storage

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    use_ray = args.ray or args.address is not None
    for flag, value in (
        ("--max-in-flight", args.max_in_flight),
        ("--task-memory", args.task_memory),
        ("--batch-size", args.batch_size),
    ):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if "://" in args.src and not args.src.startswith("file://") and not use_ray:
        raise UserError(f"{args.src}: an object-storage source needs --ray (or --address)")
    try:
        if use_ray:
            # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
            from ray_jobs.train.trainer import init_ray
            from storage.parallel import parallel_ingest

            init_ray(args.address)
            report = parallel_ingest(
                args.src,
                args.store,
                unlabelled=args.unlabelled,
                max_in_flight=args.max_in_flight,
                memory_per_task=args.task_memory * 2**20,
                batch_size=args.batch_size,
                chunk_xy=args.chunk_xy,
                progress=not args.no_progress,
            )
        else:
            report = storage.ingest(
                args.src,
                args.store,
                unlabelled=args.unlabelled,
                workers=args.workers,
                progress=not args.no_progress,
                chunk_xy=args.chunk_xy,
            )
    except (storage.StorageError, ValueError) as exc:  # bad input / bad option (names it)
        raise UserError(str(exc)) from None
    if use_ray and report.failed:
        print(
            f"quarantine ({len(report.failed)} case(s), kept in the store's 'quarantine' attribute):", file=sys.stderr
        )
        for r in report.failed:
            print(f"  {r.case_id}: {r.error}", file=sys.stderr)
    print(report.summary(), file=sys.stderr if report.failed else sys.stdout)
    if report.failed:
        print(
            f"localcl: {len(report.failed)} case(s) failed; fix the files above and rerun (complete cases are skipped)",
            file=sys.stderr,
        )
        return 1
    return 0
