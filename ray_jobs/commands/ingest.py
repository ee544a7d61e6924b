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
    p.add_argument("src", help="dataset folder: MSD/nnU-Net layout (dataset.json, imagesTr/, labelsTr/) "
                   "or, with --unlabelled, any folder tree of .nii/.nii.gz files")
    p.add_argument("store", help="store path or fsspec URI (s3://bucket/name.zarr); created if missing")
    p.add_argument("--unlabelled", action="store_true", help="SRC is a plain tree of unlabelled NIfTI files")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="parallel ingest threads (default 1)")
    p.add_argument("--chunk-xy", type=int, default=None, metavar="N",
                   help="tile slices in NxN chunks (default: one chunk per whole slice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import storage

    if args.workers < 1:
        raise UserError(f"--workers must be >= 1, got {args.workers}")
    try:
        report = storage.ingest(
            args.src, args.store, unlabelled=args.unlabelled, workers=args.workers,
            progress=not args.no_progress, chunk_xy=args.chunk_xy,
        )
    except storage.StorageError as exc:
        raise UserError(str(exc)) from None
    print(report.summary(), file=sys.stderr if report.failed else sys.stdout)
    if report.failed:
        print(f"localcl: {len(report.failed)} case(s) failed; fix the files above and rerun "
              "(complete cases are skipped)", file=sys.stderr)
        return 1
    return 0
