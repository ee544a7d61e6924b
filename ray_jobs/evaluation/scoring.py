"""Scoring and the evaluation report: per-case, per-class Dice / HD95 / ASD (mm), summaries,
``per_case.json``/``.csv``, ``summary.json``/``.md``, plots and overlays, and
:func:`score_folders` (a folder of predicted NIfTI label maps against a folder of references;
no model, no Ray). The report format is described in :mod:`ray_jobs.evaluation.job`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from localcl.metrics import dice_score, evaluate_case
from ray_jobs.errors import UserError, storage_errors_as_user_errors
from ray_jobs.evaluation import plots as P
from storage.nifti import list_nifti, load_nifti
from storage.remote import join_uri, write_bytes
from storage.sources import NIFTI_SUFFIXES

METRICS = ("dice", "hd95", "asd")
HISTORY_STAGES = ("pretrain", "finetune", "finetune_baseline")


# --------------------------------------------------------------------------- scoring
def score_case(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Sequence[int], where: str = "case"
) -> dict[int, dict[str, float]]:
    """``{label: {"dice", "hd95", "asd"}}`` for one case (``localcl.metrics.evaluate_case``).

    Args:
        pred, ref: integer label maps of the same shape ``(X, Y, Z)``.
        spacing: voxel size in mm, ``(s_x, s_y, s_z)``.
        labels: foreground labels to score.
        where: named in the error message (a case id or a file).
    """

    if pred.shape != ref.shape:
        raise UserError(f"{where}: prediction shape {tuple(pred.shape)} != reference shape {tuple(ref.shape)}")
    res = evaluate_case(pred, ref, tuple(float(s) for s in spacing[: ref.ndim]), list(labels))
    return {int(k): {m: float(v[m]) for m in METRICS} for k, v in res.items()}


def mean_fg_dice(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int]) -> float:
    """Mean over ``labels`` of the Dice of ``pred == k`` vs ``ref == k`` (as ``mean_fg`` of
    :func:`case_record`, without the surface metrics): scores each stream of a multi-stream model."""
    return float(np.mean([dice_score(pred == k, ref == k) for k in labels])) if len(labels) else float("nan")


def case_record(
    case: str,
    scores: Mapping[int, Mapping[str, float]],
    label_names: Mapping[int, str],
    shape: Sequence[int],
    spacing: Sequence[float],
) -> dict[str, Any]:
    """One entry of ``per_case.json`` (floats kept as floats, possibly nan/inf)."""
    metrics = {
        label_names.get(k, str(k)): {"label": int(k), **{m: float(v[m]) for m in METRICS}}
        for k, v in sorted(scores.items())
    }
    mean_fg = {}
    for m in METRICS:
        vals = [v[m] for k, v in scores.items() if k != 0 and math.isfinite(v[m])]
        mean_fg[m] = float(np.mean(vals)) if vals else float("nan")
    return {
        "case": case,
        "shape": [int(s) for s in shape],
        "spacing": [float(s) for s in spacing],
        "metrics": metrics,
        "mean_fg": mean_fg,
    }


def _stats(values: Iterable[float]) -> dict[str, Any]:
    vals = list(values)
    finite = np.array([v for v in vals if v is not None and math.isfinite(v)], float)
    if finite.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0, "n_missing": len(vals)}
    return {
        "mean": float(finite.mean()),
        "std": float(finite.std()),
        "median": float(np.median(finite)),
        "n": int(finite.size),
        "n_missing": len(vals) - int(finite.size),
    }


def summarise(records: Sequence[Mapping[str, Any]], source: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``summary.json``: per-class and mean-foreground statistics over the case records."""
    classes: dict[str, Any] = {}
    for rec in records:
        for name, v in rec["metrics"].items():
            classes.setdefault(name, {"label": v["label"], **{m: [] for m in METRICS}})
            for m in METRICS:
                classes[name][m].append(v[m])
    out_classes = {
        name: {"label": c["label"], **{m: _stats(c[m]) for m in METRICS}}
        for name, c in sorted(classes.items(), key=lambda kv: kv[1]["label"])
    }
    fg = {m: _stats(r["mean_fg"][m] for r in records) for m in METRICS}
    names = sorted({k for r in records for k in r.get("streams", {})})
    streams = {k: _stats(r["streams"].get(k, float("nan")) for r in records if "streams" in r) for k in names}
    return {
        "n_cases": len(records),
        "cases": [r["case"] for r in records],
        "classes": out_classes,
        "mean_foreground": fg,
        # shortcut for tables: mean over cases of the per-case foreground mean
        "mean": {m: fg[m]["mean"] for m in METRICS},
        # multi-stream models (IDEAL): mean foreground Dice of each stream alone
        **({"streams": streams} if streams else {}),
        "source": dict(source or {}),
    }


def _fmt(s: Mapping[str, Any], digits: int) -> str:
    if s["mean"] is None:
        return "n/a"
    txt = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return txt + (f" ({s['n_missing']} n/a)" if s.get("n_missing") else "")


def summary_markdown(summary: Mapping[str, Any], title: str = "Evaluation") -> str:
    """The summary table as markdown (mean ± std over cases)."""
    lines = [
        f"## {title}",
        "",
        f"{summary['n_cases']} cases. Mean ± std over cases; HD95 and ASD in mm.",
        "",
        "| class | label | Dice | HD95 (mm) | ASD (mm) |",
        "|---|---|---|---|---|",
    ]
    for name, c in summary["classes"].items():
        lines.append(f"| {name} | {c['label']} | {_fmt(c['dice'], 3)} | {_fmt(c['hd95'], 2)} | {_fmt(c['asd'], 2)} |")
    fg = summary["mean_foreground"]
    lines.append(
        f"| **mean foreground** | | **{_fmt(fg['dice'], 3)}** | {_fmt(fg['hd95'], 2)} | {_fmt(fg['asd'], 2)} |"
    )
    for name, st in (summary.get("streams") or {}).items():
        lines.append(f"| {name} alone (mean foreground) | | {_fmt(st, 3)} | | |")
    src = summary.get("source") or {}
    if src:
        lines += ["", *[f"- {k}: `{v}`" for k, v in src.items() if not isinstance(v, (dict, list))]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- I/O helpers


def absolute(path: str) -> str:
    """Local paths made absolute; URIs (``s3://...``, ``memory://...``) unchanged."""
    return path if "://" in path else os.path.abspath(path)


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return _json_safe(obj.item())
    return obj


def _csv_num(v: float) -> str:
    return repr(float(v)) if math.isfinite(v) else ""


def _read_history(uri: str) -> Any | None:
    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return pd.read_csv(f)


def history_run_name(uri: str) -> str:
    """The run a ``RUN_DIR/<stage>/history.csv`` belongs to: the name of ``RUN_DIR``."""
    parts = [p for p in str(uri).split("://", 1)[-1].split("/") if p]
    return parts[-3] if len(parts) >= 3 else ""


def find_histories(model_dir: str) -> dict[str, str]:
    """``{stage: history.csv URI}`` next to an exported model: ``<stage>/model`` has its stage's
    ``<stage>/history.csv`` and the run directory's other stages beside it."""
    fs, path = fsspec.core.url_to_fs(str(model_dir))
    path = path.rstrip("/")
    is_uri = "://" in str(model_dir)
    stage_dir = path.rsplit("/", 1)[0] if "/" in path else "."
    run_dir = stage_dir.rsplit("/", 1)[0] if "/" in stage_dir else "."
    candidates = [(stage, f"{run_dir}/{stage}/history.csv") for stage in HISTORY_STAGES]
    candidates.append((stage_dir.rsplit("/", 1)[-1], f"{stage_dir}/history.csv"))
    found: dict[str, str] = {}
    for stage, p in candidates:
        if p not in found.values() and fs.exists(p):
            found.setdefault(stage, p)
    return {k: (fs.unstrip_protocol(v) if is_uri else v) for k, v in found.items()}


def resolve_model_dir(checkpoint: str) -> str:
    """The exported model directory for ``--checkpoint``: the directory itself when it holds
    ``model.json``, else ``<checkpoint>/finetune/model`` (a run directory)."""
    fs, path = fsspec.core.url_to_fs(str(checkpoint))
    if fs.exists(join_uri(path, "model.json")):
        return str(checkpoint)
    if fs.exists(join_uri(path, "finetune", "model", "model.json")):
        return join_uri(str(checkpoint), "finetune", "model")
    if not fs.exists(path):
        raise UserError(f"--checkpoint {checkpoint}: no such directory")
    raise UserError(
        f"--checkpoint {checkpoint}: no model.json (expected an exported model directory "
        "such as RUN_DIR/finetune/model, or a run directory)"
    )


# --------------------------------------------------------------------------- report
def choose_overlay_cases(records: Sequence[Mapping[str, Any]], n: int) -> list[str]:
    """Up to ``n`` cases spread over the mean-foreground-Dice ranking (worst, median, best, ...)."""
    if n <= 0 or not records:
        return []
    ranked = sorted(records, key=lambda r: (np.nan_to_num(r["mean_fg"]["dice"], nan=-1.0), r["case"]))
    if n == 1:
        idx = [len(ranked) // 2]
    else:
        idx = sorted({int(round(i * (len(ranked) - 1) / (n - 1))) for i in range(n)})
    return [ranked[i]["case"] for i in idx]


def overlay_slices(ref: np.ndarray, n: int = 3) -> list[int]:
    """``n`` slice indices spread over the slices where the reference has foreground."""
    fg = np.flatnonzero(ref.reshape(-1, ref.shape[-1]).any(axis=0))
    if fg.size == 0:
        fg = np.arange(ref.shape[-1])
    picks = [int(fg[int(round(q * (fg.size - 1)))]) for q in np.linspace(0.2, 0.8, n)] if fg.size > 1 else [int(fg[0])]
    return sorted(set(picks))


def overlay_payload(image: np.ndarray, ref: np.ndarray, pred: np.ndarray, n_slices: int = 3) -> dict[str, Any]:
    """The few slices an overlay needs: ``image`` (S, X, Y) float16 in [0, 1] (p1/p99 window),
    ``ref`` / ``pred`` (S, X, Y) uint8 and the slice indices."""
    zs = overlay_slices(ref, n_slices)
    lo, hi = np.percentile(image, [1, 99])
    img = np.clip((image[:, :, zs] - lo) / max(hi - lo, 1e-6), 0, 1)
    return {
        "slices": zs,
        "image": np.moveaxis(img, 2, 0).astype(np.float16),
        "ref": np.moveaxis(ref[:, :, zs], 2, 0).astype(np.uint8),
        "pred": np.moveaxis(pred[:, :, zs], 2, 0).astype(np.uint8),
    }


def write_report(
    out: str,
    records: Sequence[Mapping[str, Any]],
    *,
    source: Mapping[str, Any] | None = None,
    label_names: Mapping[int, str] | None = None,
    histories: Mapping[str, str] | None = None,
    overlays: Mapping[str, Mapping[str, Any]] | None = None,
    plots: bool = True,
    title: str = "Evaluation",
    run_name: str | None = None,
) -> dict[str, Any]:
    """Write per_case.json/.csv, summary.json/.md and plots/*.png under ``out``; returns the summary."""
    records = sorted(records, key=lambda r: r["case"])
    summary = summarise(records, source)
    write_bytes(join_uri(out, "per_case.json"), json.dumps(_json_safe(list(records)), indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "class", "label", "dice", "hd95_mm", "asd_mm"])
    for r in records:
        for name, v in r["metrics"].items():
            w.writerow([r["case"], name, v["label"], _csv_num(v["dice"]), _csv_num(v["hd95"]), _csv_num(v["asd"])])
    write_bytes(join_uri(out, "per_case.csv"), buf.getvalue().encode())
    files = ["per_case.json", "per_case.csv", "summary.json", "summary.md"]
    if plots:
        dice = {
            name: [r["metrics"][name]["dice"] for r in records if name in r["metrics"]] for name in summary["classes"]
        }
        dice["mean fg"] = [r["mean_fg"]["dice"] for r in records]
        write_bytes(join_uri(out, "plots", "dice_boxplot.png"), P.dice_boxplot_png(dice, f"{title}: Dice per class"))
        files.append("plots/dice_boxplot.png")
        for stage, uri in (histories or {}).items():
            hist = _read_history(uri)
            if hist is None or hist.empty or "epoch" not in hist.columns:
                continue
            run = run_name or history_run_name(uri)
            write_bytes(
                join_uri(out, "plots", f"loss_{stage}.png"), P.loss_curves_png(hist, f"{run} {stage}" if run else stage)
            )
            files.append(f"plots/loss_{stage}.png")
        names = dict(label_names or {})
        by_case = {r["case"]: r for r in records}
        for case, ov in (overlays or {}).items():
            d = by_case[case]["mean_fg"]["dice"]
            png = P.overlay_png(
                np.asarray(ov["image"], np.float32),
                ov["ref"],
                ov["pred"],
                ov["slices"],
                names,
                f"{case}: mean foreground Dice {d:.3f}",
            )
            write_bytes(join_uri(out, "plots", f"overlay_{case}.png"), png)
            files.append(f"plots/overlay_{case}.png")
    summary["files"] = files
    write_bytes(join_uri(out, "summary.json"), json.dumps(_json_safe(summary), indent=1).encode())
    write_bytes(join_uri(out, "summary.md"), summary_markdown(summary, title).encode())
    return summary


# --------------------------------------------------------------------------- folders
def _label_names_near(ref_dir: Path) -> dict[int, str]:
    for cand in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        if cand.is_file():
            try:
                labels = json.loads(cand.read_text()).get("labels", {})
                return {int(k): str(v) for k, v in labels.items()}
            except (ValueError, AttributeError):
                return {}
    return {}


def score_folders(
    pred_dir: str | os.PathLike[str],
    ref_dir: str | os.PathLike[str],
    out: str | None = None,
    *,
    labels: Sequence[int] | None = None,
    plots: bool = True,
    overlay_cases: int = 3,
    images_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Score every predicted label map in ``pred_dir`` against the file of the same name in
    ``ref_dir`` (spacing from the reference header). Label names come from a ``dataset.json``
    in ``ref_dir`` or its parent (MSD layout), else the numbers.

    Args:
        labels: foreground labels to score; default: every non-zero label in any reference.
        out: report folder; default ``<pred_dir>/eval``.
        images_dir: scans drawn under the overlays (same file names); default: the MSD
            sibling ``<ref_dir>/../imagesTr`` when it exists, else the reference mask is drawn.

    Raises:
        UserError: a missing reference, a non-NIfTI file, a shape mismatch, an unreadable file.
    """
    with storage_errors_as_user_errors():
        preds = list_nifti(pred_dir, "--pred")
        refs = list_nifti(ref_dir, "--ref", strict=False)  # a reference folder may hold other files
    missing = [c for c in preds if c not in refs]
    if missing:
        raise UserError(
            f"--ref {ref_dir}: no reference for prediction(s) {missing[:5]}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    names = _label_names_near(Path(ref_dir))
    loaded: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] = {}
    found: set[int] = set()
    for case, p in preds.items():
        with storage_errors_as_user_errors():
            pimg, rimg = load_nifti(p), load_nifti(refs[case])
        pred = np.asarray(pimg.dataobj)
        ref = np.asarray(rimg.dataobj)
        for arr, path in ((pred, p), (ref, refs[case])):
            if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)) or arr.min(initial=0) < 0:
                raise UserError(f"{path}: not a label map (values must be non-negative integers)")
        if pred.shape != ref.shape:
            raise UserError(f"{p}: shape {pred.shape} != reference {refs[case]} shape {ref.shape}")
        spacing = tuple(float(s) for s in rimg.header.get_zooms()[:3])
        loaded[case] = (pred.astype(np.int64), ref.astype(np.int64), spacing)
        found |= set(np.unique(ref).tolist())
    fg = sorted(int(k) for k in (labels if labels is not None else found - {0}))
    if not fg:
        raise UserError(f"--ref {ref_dir}: references contain no foreground label; pass --labels")
    names = {k: names.get(k, str(k)) for k in [0, *fg]}
    records = []
    for case, (pred, ref, spacing) in loaded.items():
        scores = score_case(pred, ref, spacing, fg, where=str(preds[case]))
        records.append(case_record(case, scores, names, ref.shape, spacing))
    overlays: dict[str, Any] = {}
    used_images: str | None = None
    if plots:
        img_dir = Path(images_dir) if images_dir is not None else Path(ref_dir).parent / "imagesTr"
        for case in choose_overlay_cases(records, overlay_cases):
            pred, ref, _ = loaded[case]
            image = None
            for suf in NIFTI_SUFFIXES:
                if (img_dir / f"{case}{suf}").is_file():
                    with storage_errors_as_user_errors():
                        cand = load_nifti(img_dir / f"{case}{suf}")
                    if cand.shape == ref.shape:
                        image = np.asarray(cand.get_fdata(dtype=np.float32))
                    break
            # without a scan, draw the reference's own mask as the background
            overlays[case] = overlay_payload(image if image is not None else (ref > 0).astype(np.float32), ref, pred)
            if image is not None:
                used_images = str(img_dir)
    out = str(out) if out is not None else str(Path(pred_dir) / "eval")
    source = {"pred_dir": str(pred_dir), "ref_dir": str(ref_dir)}
    if used_images is not None:
        source["overlay_images"] = used_images
    return write_report(
        out,
        records,
        source=source,
        label_names=names,
        overlays=overlays,
        plots=plots,
        title="Prediction folder vs reference",
    )
