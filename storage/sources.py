"""Finding the cases of a source dataset: MSD / nnU-Net layout or a tree of unlabelled files.

MSD / nnU-Net layout::

    SRC/dataset.json      {"labels": {...}, "training": [{"image": "./imagesTr/x.nii.gz",
                           "label": "./labelsTr/x.nii.gz"}, ...], "test": [...]}  (MSD) or
                          nnU-Net v2 ({"labels": {"background": 0, ...}, "file_ending": ...},
                          no "training" list: files are paired by name, channel suffix _0000)
    SRC/imagesTr/  SRC/labelsTr/  [SRC/imagesTs/]   [SRC/splits.json]

Cases listed in ``dataset.json`` come first; files in ``imagesTr``/``labelsTr`` that it does
not list are paired by case id, so an image without its label and a label without its image
are both reported. ``imagesTs`` files become unlabelled cases.

A malformed ``dataset.json`` (unparsable, or ``labels``/``training`` of the wrong type) stops
the whole ingest: without it, labels cannot be named or checked. A single bad entry (missing
key, path outside the dataset root, missing file) only fails that case.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from storage.errors import InputError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CHANNEL = re.compile(r"^(?P<base>.+)_(?P<ch>\d{4})$")
_PATIENT = re.compile(r"^(?P<patient>patient\d+)_frame\d+$")
_BAD_CHARS = re.compile(r"[^A-Za-z0-9._-]")


@dataclass
class CaseSource:
    """One case to ingest, or the reason it cannot be (``problem``)."""

    case_id: str
    image: Path | None
    label: Path | None
    labelled: bool
    split: str = "train"  # "train" (imagesTr / unlabelled tree) or "test" (imagesTs)
    problem: InputError | None = None


@dataclass
class SourceDataset:
    root: Path
    cases: list[CaseSource]
    label_names: dict[int, str] = field(default_factory=dict)
    name: str = ""
    splits_json: dict[str, Any] | None = None
    layout: str = "msd"


def strip_nifti_suffix(name: str) -> str | None:
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


def safe_case_id(stem: str) -> str:
    """A Zarr-safe node name: ``[A-Za-z0-9._-]``, not starting with ``_`` or ``.``."""
    cid = _BAD_CHARS.sub("_", stem).lstrip("_.")
    return cid or "case"


def patient_of(case: str) -> str:
    """``patientNNN_frameNN`` -> ``patientNNN`` (ACDC); any other id is its own patient."""
    m = _PATIENT.match(case)
    return m.group("patient") if m else case


def _case_id_from_file(path: Path) -> tuple[str, int | None]:
    stem = strip_nifti_suffix(path.name) or path.name
    m = _CHANNEL.match(stem)
    if m:
        return safe_case_id(m.group("base")), int(m.group("ch"))
    return safe_case_id(stem), None


def parse_label_names(path: Path, labels: Any) -> dict[int, str]:
    """MSD ``{"0": "background"}`` or nnU-Net v2 ``{"background": 0}`` -> ``{0: "background"}``."""
    if not isinstance(labels, dict) or not labels:
        raise InputError(path, "malformed dataset.json: 'labels' must be a non-empty object")
    out: dict[int, str] = {}
    for k, v in labels.items():
        if isinstance(k, str) and k.strip().lstrip("-").isdigit() and isinstance(v, str):
            out[int(k)] = v
        elif isinstance(v, int) and not isinstance(v, bool):
            out[v] = str(k)
        else:
            raise InputError(path, f"malformed dataset.json: label entry {k!r}: {v!r} is neither 'N': name nor name: N")
    bad = [k for k in out if not 0 <= k <= 255]
    if bad:
        raise InputError(path, f"malformed dataset.json: label values {bad} outside 0..255")
    return dict(sorted(out.items()))


def _resolve_entry(root: Path, ds_json: Path, value: Any, what: str, idx: int) -> Path:
    if not isinstance(value, str) or not value:
        raise InputError(ds_json, f"training[{idx}].{what} must be a path string, got {value!r}")
    p = (root / value).resolve()
    if not p.is_relative_to(root.resolve()):
        raise InputError(ds_json, f"training[{idx}].{what} {value!r} points outside the dataset root {root}")
    return p


def _scan_dir(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and strip_nifti_suffix(p.name) is not None)


def discover_msd(root: str | os.PathLike[str]) -> SourceDataset:
    """List the cases of an MSD / nnU-Net dataset folder (see module docstring)."""
    root = Path(root)
    ds_json = root / "dataset.json"
    if not root.is_dir():
        raise InputError(root, "dataset folder not found")
    if not ds_json.is_file():
        raise InputError(
            ds_json,
            "missing: an MSD/nnU-Net dataset needs dataset.json (use --unlabelled for a plain folder of NIfTI files)",
        )
    try:
        spec = json.loads(ds_json.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(ds_json, f"malformed dataset.json: {exc}") from None
    if not isinstance(spec, dict):
        raise InputError(ds_json, "malformed dataset.json: top level must be an object")
    label_names = parse_label_names(ds_json, spec.get("labels"))
    training = spec.get("training")
    if training is not None and not isinstance(training, list):
        raise InputError(ds_json, "malformed dataset.json: 'training' must be a list")

    cases: dict[str, CaseSource] = {}
    entry_problems: list[CaseSource] = []
    for idx, entry in enumerate(training or []):
        try:
            if not isinstance(entry, dict) or "image" not in entry:
                raise InputError(
                    ds_json, f"training[{idx}] must be an object with 'image' and 'label', got {entry!r}"[:200]
                )
            img = _resolve_entry(root, ds_json, entry["image"], "image", idx)
            if "label" not in entry:
                raise InputError(ds_json, f"training[{idx}] has no 'label' (image {entry['image']})")
            lab = _resolve_entry(root, ds_json, entry["label"], "label", idx)
        except InputError as err:
            entry_problems.append(CaseSource(f"training[{idx}]", None, None, True, problem=err))
            continue
        cid, _ = _case_id_from_file(img)
        cases[cid] = CaseSource(cid, img, lab, True)

    # Files the list does not mention (all of them for nnU-Net v2): pair by case id.
    images = {}
    problems: list[CaseSource] = []
    for p in _scan_dir(root / "imagesTr"):
        cid, ch = _case_id_from_file(p)
        if ch not in (None, 0):
            if cid not in cases:
                problems.append(
                    CaseSource(
                        cid,
                        p,
                        None,
                        True,
                        problem=InputError(
                            p, f"channel {ch} of a multi-channel case: localcl ingests single-channel images"
                        ),
                    )
                )
            continue
        images[cid] = p
    labels = {_case_id_from_file(p)[0]: p for p in _scan_dir(root / "labelsTr")}
    listed = {c.image for c in cases.values()} | {c.label for c in cases.values()}
    for cid, p in images.items():
        if cid in cases or p.resolve() in listed:
            continue
        cases[cid] = CaseSource(cid, p, labels.get(cid), True)
    for cid, p in labels.items():
        if cid not in cases and p.resolve() not in listed:
            problems.append(
                CaseSource(
                    cid, None, p, True, problem=InputError(p, "label without its image (no matching file in imagesTr)")
                )
            )
    for c in cases.values():
        if c.problem is None and (c.image is None or not c.image.is_file()):
            c.problem = InputError(
                c.image or root,
                f"image of case {c.case_id} not found"
                + (f" (label {c.label} exists)" if c.label and c.label.is_file() else ""),
            )
        elif c.problem is None and (c.label is None or not c.label.is_file()):
            c.problem = InputError(
                c.image or root,
                f"image without its label (expected {c.label or root / 'labelsTr' / (c.case_id + '.nii.gz')})",
            )
    for p in _scan_dir(root / "imagesTs"):
        cid, ch = _case_id_from_file(p)
        if ch in (None, 0) and cid not in cases:
            cases[cid] = CaseSource(cid, p, None, False, split="test")

    splits = None
    sp = root / "splits.json"
    if sp.is_file():
        try:
            splits = json.loads(sp.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(sp, f"malformed splits.json: {exc}") from None
        if not isinstance(splits, dict):
            raise InputError(sp, "malformed splits.json: top level must be an object")
    ordered = sorted(cases.values(), key=lambda c: c.case_id)
    return SourceDataset(
        root=root,
        cases=entry_problems + problems + ordered,
        label_names=label_names,
        name=str(spec.get("name", root.name)),
        splits_json=splits,
        layout="msd",
    )


def discover_unlabelled(root: str | os.PathLike[str]) -> SourceDataset:
    """Every ``.nii``/``.nii.gz`` under ``root`` (recursive) as an unlabelled case.

    Case id: the path relative to ``root`` without suffix, ``/`` replaced by ``__``.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "folder not found")
    files = sorted(p for p in root.rglob("*") if p.is_file() and strip_nifti_suffix(p.name) is not None)
    if not files:
        raise InputError(root, "no .nii or .nii.gz files found")
    cases, seen = [], set()
    for p in files:
        rel = strip_nifti_suffix(str(p.relative_to(root)).replace("\\", "/")) or p.name
        cid = safe_case_id(rel.replace("/", "__"))
        if cid in seen:
            cases.append(
                CaseSource(cid, p, None, False, problem=InputError(p, f"case id {cid!r} collides with another file"))
            )
            continue
        seen.add(cid)
        cases.append(CaseSource(cid, p, None, False))
    return SourceDataset(root=root, cases=cases, name=root.name, layout="unlabelled")
