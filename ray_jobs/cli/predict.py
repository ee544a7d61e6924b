"""``localcl predict --checkpoint CKPT INPUT OUTPUT``: one NIfTI label map per scan.

INPUT is a folder of NIfTI scans (``.nii``/``.nii.gz``; an MSD dataset folder means its
``imagesTr``/``imagesTs``), a single NIfTI file, or a store (path with ``zarr.json`` or a URI).
OUTPUT is a folder; each scan ``<name>.nii[.gz]`` (or store case ``<name>``) gives
``OUTPUT/<name>.nii.gz``: uint8 labels, the scan's shape, affine and header (qform/sform codes,
zooms, units), intensity scaling removed, so it opens over the scan in ITK-SNAP or 3D Slicer.
Runs in this process (``--device auto``: CUDA when available).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.errors import UserError, storage_errors_as_user_errors


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("predict", help="segment NIfTI scans (or a store) with a fine-tuned model")
    p.add_argument("--checkpoint", required=True, help="exported model dir (RUN_DIR/finetune/model) or a run dir")
    p.add_argument("input", help="folder of NIfTI scans, one NIfTI file, or a store path/URI")
    p.add_argument("output", help="output folder for <name>.nii.gz label maps")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    p.add_argument("--cases", nargs="+", default=None, help="store input: only these cases")
    p.add_argument("--storage-options", default=None, help="store input: JSON fsspec options (e.g. S3 endpoint)")
    p.set_defaults(func=run)


def _device(name: str) -> Any:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise UserError(f"--device {name!r}: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    return dev


def _is_store(path: str) -> bool:
    return "://" in path or (os.path.isdir(path) and os.path.isfile(os.path.join(path, "zarr.json")))


def nifti_inputs(path: str) -> dict[str, Path]:
    """``{name: file}`` for a NIfTI file, a folder of them, or an MSD folder (imagesTr/imagesTs)."""
    # deferred: the storage package loads zarr; `localcl --help` and the other verbs stay fast
    from storage.nifti import list_nifti
    from storage.sources import strip_nifti_suffix

    p = Path(path)
    if p.is_file():
        name = strip_nifti_suffix(p.name)
        if name is None:
            raise UserError(f"{p}: not a NIfTI file (expected .nii or .nii.gz)")
        return {name: p}
    if not p.is_dir():
        raise UserError(f"INPUT {path}: no such file or directory")
    subs = [p / s for s in ("imagesTr", "imagesTs") if (p / s).is_dir()]
    if subs and not any(strip_nifti_suffix(f.name) for f in p.iterdir() if f.is_file()):
        found: dict[str, Path] = {}
        with storage_errors_as_user_errors():
            for s in subs:
                found.update(list_nifti(s, "INPUT"))
        return found
    with storage_errors_as_user_errors():
        return list_nifti(p, "INPUT")


def run(args: argparse.Namespace) -> int:
    # deferred: these load torch, Ray and zarr; `localcl --help` and the other verbs stay fast
    import storage
    from ray_jobs.evaluation.inference import predict_case, predict_volume, preprocessing_from_spec
    from ray_jobs.evaluation.scoring import resolve_model_dir
    from ray_jobs.train.checkpoint import load_model, read_spec
    from storage.nifti import label_nifti_bytes, load_nifti
    from storage.remote import write_bytes

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    model_dir = resolve_model_dir(args.checkpoint)
    spec = read_spec(model_dir)
    if spec["stage"] != "finetune":
        raise UserError(
            f"--checkpoint {model_dir}: a {spec['stage']} model has no segmentation head; "
            "use a fine-tuned model (RUN_DIR/finetune/model)"
        )
    preprocessing_from_spec(spec)
    out = args.output
    if _is_store(args.input):
        try:
            so = json.loads(args.storage_options) if args.storage_options else None
        except json.JSONDecodeError as exc:
            raise UserError(f"--storage-options: not JSON ({exc})") from None
        try:
            st = storage.open_store(args.input, storage_options=so)
        except ValueError as exc:
            raise UserError(f"INPUT {args.input}: {exc}") from None
        cases = args.cases or st.cases
        unknown = [c for c in cases if c not in st]
        if unknown:
            raise UserError(f"--cases: not in {args.input}: {unknown[:5]}")
        jobs: list[tuple[str, Any]] = [(c, None) for c in cases]
    else:
        if args.cases:
            raise UserError("--cases applies to a store INPUT only")
        st = None
        jobs = list(nifti_inputs(args.input).items())
        if "://" not in out and any(Path(out).resolve() == p.parent.resolve() for _, p in jobs):
            raise UserError(f"OUTPUT {out}: is the input folder; label maps would overwrite the scans")
    if not jobs:
        raise UserError(f"INPUT {args.input}: nothing to predict")
    # read every input header before loading the model, so a bad file fails fast
    with storage_errors_as_user_errors():
        headers = {name: load_nifti(path) for name, path in jobs if path is not None}
    model, spec = load_model(model_dir, device=_device(args.device))
    t0 = time.perf_counter()
    for i, (name, _path) in enumerate(jobs, 1):
        if st is not None:
            labels = predict_case(model, spec, st, name, batch_size=args.batch_size)
            data = label_nifti_bytes(labels, np.asarray(st.meta(name)["affine"], float))
        else:
            img = headers[name]
            image = np.asarray(img.get_fdata(dtype=np.float32))
            labels = predict_volume(model, spec, image, img.header.get_zooms()[:3], batch_size=args.batch_size)
            data = label_nifti_bytes(labels, img.affine, img.header)
        dst = (out.rstrip("/") + "/" if "://" in out else str(Path(out)) + os.sep) + f"{name}.nii.gz"
        write_bytes(dst, data)
        counts = np.bincount(labels.ravel(), minlength=int(spec["num_classes"]))
        print(f"[{i}/{len(jobs)}] {name}: {labels.shape} -> {dst}  voxels per class {counts.tolist()}")
    print(f"predicted {len(jobs)} scan(s) in {time.perf_counter() - t0:.1f} s -> {out}")
    return 0
