"""NIfTI -> store: ``ingest_case`` (one case, callable from a Ray task) and ``ingest`` (a dataset).

Idempotent and resumable: a case whose group is complete and whose recorded source hashes
(``source_sha256``, ``label_sha256``) equal the files' current SHA-256 is skipped; a missing,
incomplete (interrupted) or stale case is (re)written. Every validation runs before the store is
touched, so a bad file never damages what is already there.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from storage.errors import InputError
from storage.nifti import Volume, load_volume, sha256_file
from storage.sources import CaseSource, SourceDataset, discover_msd, discover_unlabelled, patient_of
from storage.store import VolumeStore, open_store

AFFINE_ATOL = 1e-3  # mm; label and image affines must agree to this


@dataclass
class CaseResult:
    case_id: str
    status: str  # "ingested" | "skipped" | "failed"
    source: str = ""
    error: str | None = None
    seconds: float = 0.0
    meta: dict[str, Any] | None = field(default=None, repr=False)  # case attrs as stored (ingested/skipped)


@dataclass
class IngestReport:
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    def _with(self, status: str) -> list[CaseResult]:
        return [r for r in self.results if r.status == status]

    @property
    def ingested(self) -> list[CaseResult]:
        return self._with("ingested")

    @property
    def skipped(self) -> list[CaseResult]:
        return self._with("skipped")

    @property
    def failed(self) -> list[CaseResult]:
        return self._with("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        n_new = len(self.ingested)
        rate = n_new / self.seconds if self.seconds > 0 else 0.0
        return (
            f"{n_new} ingested, {len(self.skipped)} skipped (already complete), "
            f"{len(self.failed)} failed in {self.seconds:.1f} s ({rate:.2f} volumes/s)"
        )


def intensity_stats(image: np.ndarray) -> dict[str, float]:
    """Percentiles (p0_5, p1, p99, p99_5), mean, std, min, max of all voxels (float64 maths).

    The 2D samplers normalise with ``(x - p1) / (p99 - p1)``.
    """
    q = np.percentile(image, [0.5, 1.0, 99.0, 99.5])
    return {
        "p0_5": float(q[0]),
        "p1": float(q[1]),
        "p99": float(q[2]),
        "p99_5": float(q[3]),
        "mean": float(image.mean(dtype=np.float64)),
        "std": float(image.std(dtype=np.float64)),
        "min": float(image.min()),
        "max": float(image.max()),
    }


def label_summary(label: np.ndarray) -> tuple[list[list[int]], list[list[int]] | None]:
    """Per-slice sorted label values present (length Z) and the inclusive foreground bbox."""
    z = label.shape[2]
    present = np.zeros((z, 256), dtype=bool)
    flat = label.reshape(-1, z)  # logical reshape: column k holds slice k (any memory order)
    for k in range(z):
        present[k, np.unique(flat[:, k])] = True
    slice_labels = [np.flatnonzero(present[k]).tolist() for k in range(z)]
    fg = np.nonzero(label)
    bbox = None if fg[0].size == 0 else [[int(a.min()), int(a.max())] for a in fg]
    return slice_labels, bbox


def _check_pair(image: Volume, label: Volume, label_names: Mapping[int, str] | None) -> None:
    if label.shape != image.shape:
        raise InputError(label.path, f"label shape {label.shape} differs from image shape {image.shape} ({image.path})")
    if not np.allclose(label.affine, image.affine, atol=AFFINE_ATOL, rtol=0):
        diff = float(np.abs(label.affine - image.affine).max())
        raise InputError(
            label.path, f"label affine differs from the image affine by up to {diff:.4g} mm ({image.path})"
        )
    if label_names:
        values = np.flatnonzero(np.bincount(label.data.ravel(), minlength=256))
        undeclared = sorted(set(values.tolist()) - set(label_names))
        if undeclared:
            raise InputError(
                label.path, f"label values {undeclared} not declared in dataset.json labels {sorted(label_names)}"
            )


def ingest_case(
    src_image: str | os.PathLike[str],
    src_label: str | os.PathLike[str] | None,
    store: str | VolumeStore,
    case_id: str,
    *,
    label_names: Mapping[int, str] | None = None,
    patient: str | None = None,
    max_bytes: int | None = None,
    chunk_xy: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    force: bool = False,
    source_uri: str | None = None,
    label_uri: str | None = None,
    extra_meta: Mapping[str, Any] | None = None,
) -> CaseResult:
    """Validate and write one case. Safe to call from a Ray task (give ``store`` as a URI).

    Returns a :class:`CaseResult` with status ``"ingested"`` or ``"skipped"`` (complete case
    with the same source hashes, unless ``force``). Raises :class:`InputError` on bad input,
    before anything is written. ``source_uri``/``label_uri``: where the files really live
    (e.g. ``s3://...`` when ``src_image`` is a local download), recorded as ``source_path`` /
    ``label_path`` and used in error messages; ``extra_meta`` is merged into the case attrs.
    """
    t0 = time.perf_counter()
    st = open_store(store, mode="a", storage_options=storage_options)
    img_sha = sha256_file(src_image)
    lab_sha = sha256_file(src_label) if src_label is not None else None
    state = st.case_state(case_id)
    if (
        not force
        and state is not None
        and state.get("complete") is True
        and state.get("source_sha256") == img_sha
        and state.get("label_sha256") == lab_sha
    ):
        return CaseResult(case_id, "skipped", str(src_image), seconds=time.perf_counter() - t0, meta=state)
    try:
        image = load_volume(src_image, "image", max_bytes=max_bytes, sha256=img_sha)
        label = load_volume(src_label, "label", max_bytes=max_bytes, sha256=lab_sha) if src_label is not None else None
        if label is not None:
            _check_pair(image, label, label_names)
    except InputError as err:  # name the real source, not a temporary download
        if source_uri is None and label_uri is None:
            raise
        msg = str(err).replace(str(src_image), source_uri or str(src_image))
        if src_label is not None:
            msg = msg.replace(str(src_label), label_uri or str(src_label))
        path, _, problem = msg.partition(": ")
        raise InputError(path, problem) from None
    meta: dict[str, Any] = {
        "affine": image.affine.tolist(),
        "spacing": list(image.spacing),
        "shape": list(image.shape),
        "dtype": image.dtype,
        "orientation": image.orientation,
        "source_path": source_uri or str(Path(src_image).resolve()),
        "source_sha256": img_sha,
        "label_path": (label_uri or str(Path(src_label).resolve())) if src_label is not None else None,
        "label_sha256": lab_sha,
        "intensity": intensity_stats(image.data),
        "label_names": {str(k): v for k, v in (label_names or {}).items()},
        "labelled": label is not None,
        "patient": patient or patient_of(case_id),
    }
    meta.update(dict(extra_meta or {}))
    if label is not None:
        meta["slice_labels"], meta["fg_bbox"] = label_summary(label.data)
    else:
        meta["slice_labels"], meta["fg_bbox"] = None, None
    stored = st.write_case(case_id, image.data, None if label is None else label.data, meta, chunk_xy=chunk_xy)
    return CaseResult(case_id, "ingested", str(src_image), seconds=time.perf_counter() - t0, meta=stored)


def discover(src: str | os.PathLike[str], unlabelled: bool = False) -> SourceDataset:
    """MSD/nnU-Net dataset (default) or a folder tree of unlabelled NIfTI files."""
    return discover_unlabelled(src) if unlabelled else discover_msd(src)


def finish_case_index(st: VolumeStore, old: Mapping[str, Mapping[str, Any]] | None, report: IngestReport) -> int:
    """Write the store's case index at the end of an ingest run (see :mod:`storage.store`).

    Attrs come from the run's results (ingested and skipped cases carry them) and from the
    index read before the run (``old``) for cases this run did not touch; failed cases and
    anything else are read from storage. Drops the results' attrs afterwards (memory)."""
    touched = {r.case_id for r in report.results}
    known = {c: m for c, m in (old or {}).items() if c not in touched}
    known.update({r.case_id: r.meta for r in report.results if r.status != "failed" and r.meta})
    n = st.write_case_index(known)
    for r in report.results:
        r.meta = None
    return n


def prepare_store(
    dataset: SourceDataset, store: str | VolumeStore, storage_options: Mapping[str, Any] | None = None
) -> VolumeStore:
    """Open/create the store and record dataset-level attributes (label names, splits.json)."""
    st = open_store(store, mode="a", storage_options=storage_options)
    attrs = st.attrs
    sources = list(attrs.get("sources", []))
    root = dataset.root if isinstance(dataset.root, str) else str(dataset.root.resolve())  # str: a URL
    if root not in sources:
        sources.append(root)
    new: dict[str, Any] = {"sources": sources}
    if dataset.label_names:
        new["label_names"] = {str(k): v for k, v in dataset.label_names.items()}
    if dataset.layout == "msd":
        new["dataset"] = {"name": dataset.name, "layout": dataset.layout, "root": root}
        new["test_cases"] = sorted(
            set(attrs.get("test_cases", [])) | {c.case_id for c in dataset.cases if c.split == "test"}
        )
    if dataset.splits_json is not None:
        new["splits_json"] = dataset.splits_json
    st.set_root_attrs(new)
    st.ensure_cases_group()
    return st


def ingest(
    src: str | os.PathLike[str],
    store: str | VolumeStore,
    *,
    unlabelled: bool = False,
    workers: int = 1,
    progress: bool = True,
    storage_options: Mapping[str, Any] | None = None,
    max_bytes: int | None = None,
    chunk_xy: int | None = None,
    on_error: Callable[[str], None] | None = None,
    cases: list[str] | None = None,
) -> IngestReport:
    """Ingest a dataset into ``store``; bad cases are reported and skipped, never fatal.

    Args:
        src: dataset folder (MSD/nnU-Net layout, or any tree of NIfTI files with ``unlabelled``).
        store: local path or fsspec URI (created if missing) or an open writable store.
        workers: threads (gunzip, hashing and blosc release the GIL).
        progress: show a tqdm bar with rate and ETA on stderr.
        on_error: called with each one-line error (default: printed above the bar).
        cases: restrict to these case ids.

    Raises:
        InputError: only for dataset-level problems (missing/malformed dataset.json).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    dataset = discover(src, unlabelled=unlabelled)
    todo: list[CaseSource] = [c for c in dataset.cases if cases is None or c.case_id in cases]
    st = prepare_store(dataset, store, storage_options)
    old_index = st.read_case_index()
    st.drop_case_index()  # rewritten below: an index on storage always matches the cases
    report = IngestReport()
    bar = tqdm(total=len(todo), unit="vol", desc="ingest", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    say = on_error or (lambda msg: tqdm.write(f"localcl: error: {msg}", file=sys.stderr))

    def run(c: CaseSource) -> CaseResult:
        if c.problem is not None:
            raise c.problem
        assert c.image is not None
        return ingest_case(
            c.image,
            c.label,
            st,
            c.case_id,
            label_names=dataset.label_names or None,
            max_bytes=max_bytes,
            chunk_xy=chunk_xy,
        )

    def record(c: CaseSource, fut_result: Callable[[], CaseResult]) -> None:
        try:
            res = fut_result()
        except InputError as err:
            res = CaseResult(c.case_id, "failed", str(c.image or c.label or ""), error=str(err))
            say(str(err))
        except Exception as err:  # an unexpected failure of one case must not stop the rest
            msg = f"{c.image or c.label}: {type(err).__name__}: {' '.join(str(err).split())}"
            res = CaseResult(c.case_id, "failed", str(c.image or ""), error=msg)
            say(msg)
        report.results.append(res)
        bar.update(1)

    try:
        if workers <= 1:
            for c in todo:
                record(c, functools.partial(run, c))
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                futs = {pool.submit(run, c): c for c in todo}
                for fut in as_completed(futs):
                    record(futs[fut], fut.result)
    finally:
        bar.close()
    report.results.sort(key=lambda r: r.case_id)
    finish_case_index(st, old_index, report)
    report.seconds = time.perf_counter() - t0
    st.refresh()
    return report
