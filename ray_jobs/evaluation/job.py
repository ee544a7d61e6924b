"""Evaluation: per-case, per-class Dice / HD95 / ASD (mm), summary tables and pictures.

Two entry points, one report format:

- :func:`evaluate_store` scores a fine-tuned model on a split of a store as a Ray Train
  ``TorchTrainer`` job: worker ``r`` of ``W`` predicts the cases ``cases[r::W]`` with
  :func:`ray_jobs.evaluation.inference.predict_case`, scores them with :func:`localcl.metrics.evaluate_case`,
  the per-case results are gathered (``all_gather_object`` on a gloo group, so it also works
  when the training backend is nccl) and rank 0 writes the report.
- :func:`score_folders` scores a folder of predicted NIfTI label maps against a folder of
  reference label maps (no model, no Ray).

Report written under ``out`` (local path or fsspec URI)::

    per_case.json   [{"case", "shape", "spacing", "metrics": {class: {label, dice, hd95, asd}},
                      "mean_fg": {dice, hd95, asd}}]   (non-finite -> null)
    per_case.csv    case, class, label, dice, hd95_mm, asd_mm   (one row per case and class)
    summary.json    n_cases, classes {name: {label, dice|hd95|asd: {mean, std, median, n}}},
                    mean_foreground {dice|hd95|asd: {...}}, source {...}
    summary.md      the table "class | Dice | HD95 (mm) | ASD (mm)" as mean ± std
    plots/          dice_boxplot.png, loss_<stage>.png (from <stage>/history.csv),
                    overlay_<case>.png (worst, median and best case by mean foreground Dice)
    predictions/    <case>.nii.gz (uint8, source affine) with ``save_predictions=True``

Statistics: for class ``k`` and metric ``m``, ``mean = (1/n) sum_i m_ik`` and the population
``std`` over the ``n`` cases where ``m_ik`` is finite (HD95/ASD are undefined when the class is
absent from the prediction or the reference; such cases are counted in ``n_missing``). The
per-case foreground mean is ``mean_fg_i = mean_{k>0} m_ik`` over the finite values of that case;
``mean_foreground`` summarises ``mean_fg_i`` over cases the same way.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import fsspec
import nibabel as nib
import numpy as np

from ray_jobs.errors import UserError
from storage.remote import join_uri

METRICS = ("dice", "hd95", "asd")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
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
    from localcl.metrics import evaluate_case

    if pred.shape != ref.shape:
        raise UserError(f"{where}: prediction shape {tuple(pred.shape)} != reference shape {tuple(ref.shape)}")
    res = evaluate_case(pred, ref, tuple(float(s) for s in spacing[: ref.ndim]), list(labels))
    return {int(k): {m: float(v[m]) for m in METRICS} for k, v in res.items()}


def case_record(
    case: str, scores: Mapping[int, Mapping[str, float]], label_names: Mapping[int, str],
    shape: Sequence[int], spacing: Sequence[float],
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
    return {"case": case, "shape": [int(s) for s in shape], "spacing": [float(s) for s in spacing],
            "metrics": metrics, "mean_fg": mean_fg}


def _stats(values: Iterable[float]) -> dict[str, Any]:
    vals = list(values)
    finite = np.array([v for v in vals if v is not None and math.isfinite(v)], float)
    if finite.size == 0:
        return {"mean": None, "std": None, "median": None, "n": 0, "n_missing": len(vals)}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "median": float(np.median(finite)),
            "n": int(finite.size), "n_missing": len(vals) - int(finite.size)}


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
    return {
        "n_cases": len(records),
        "cases": [r["case"] for r in records],
        "classes": out_classes,
        "mean_foreground": fg,
        # shortcut for tables: mean over cases of the per-case foreground mean
        "mean": {m: fg[m]["mean"] for m in METRICS},
        "source": dict(source or {}),
    }


def _fmt(s: Mapping[str, Any], digits: int) -> str:
    if s["mean"] is None:
        return "n/a"
    txt = f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"
    return txt + (f" ({s['n_missing']} n/a)" if s.get("n_missing") else "")


def summary_markdown(summary: Mapping[str, Any], title: str = "Evaluation") -> str:
    """The summary table as markdown (mean ± std over cases)."""
    lines = [f"## {title}", "", f"{summary['n_cases']} cases. Mean ± std over cases; HD95 and ASD in mm.", "",
             "| class | label | Dice | HD95 (mm) | ASD (mm) |", "|---|---|---|---|---|"]
    for name, c in summary["classes"].items():
        lines.append(f"| {name} | {c['label']} | {_fmt(c['dice'], 3)} | {_fmt(c['hd95'], 2)} | {_fmt(c['asd'], 2)} |")
    fg = summary["mean_foreground"]
    lines.append(f"| **mean foreground** | | **{_fmt(fg['dice'], 3)}** | {_fmt(fg['hd95'], 2)} | {_fmt(fg['asd'], 2)} |")
    src = summary.get("source") or {}
    if src:
        lines += ["", *[f"- {k}: `{v}`" for k, v in src.items() if not isinstance(v, (dict, list))]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- I/O helpers

def _absolute(path: str) -> str:
    """Local paths made absolute; URIs (``s3://...``, ``memory://...``) unchanged."""
    return path if "://" in path else os.path.abspath(path)


def _write_bytes(uri: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


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


def label_nifti_bytes(labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> bytes:
    """A gzipped NIfTI-1 (``.nii.gz``) of a uint8 label map with the given affine and header.

    The source header is copied (dimensions, zooms, qform/sform codes, units, descrip...), its
    data type set to uint8 and intensity scaling removed, so the label map overlays its scan.
    """
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(labels.astype(np.uint8), affine, header=hdr)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, float(labels.max(initial=0))
    # the source's codes when known; otherwise (a store case: only its affine is kept) the
    # affine is the scanner geometry the store recorded from the source file
    qcode = int(header["qform_code"]) if header is not None else 1
    scode = int(header["sform_code"]) if header is not None else 1
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(raw)
    return buf.getvalue()


def _read_history(uri: str) -> Any | None:
    import pandas as pd

    fs, path = fsspec.core.url_to_fs(uri)
    if not fs.exists(path):
        return None
    with fs.open(path, "r") as f:
        return pd.read_csv(f)


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
    raise UserError(f"--checkpoint {checkpoint}: no model.json (expected an exported model directory "
                    "such as RUN_DIR/finetune/model, or a run directory)")


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
    return {"slices": zs, "image": np.moveaxis(img, 2, 0).astype(np.float16),
            "ref": np.moveaxis(ref[:, :, zs], 2, 0).astype(np.uint8),
            "pred": np.moveaxis(pred[:, :, zs], 2, 0).astype(np.uint8)}


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
) -> dict[str, Any]:
    """Write per_case.json/.csv, summary.json/.md and plots/*.png under ``out``; returns the summary."""
    records = sorted(records, key=lambda r: r["case"])
    summary = summarise(records, source)
    _write_bytes(join_uri(out, "per_case.json"), json.dumps(_json_safe(list(records)), indent=1).encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "class", "label", "dice", "hd95_mm", "asd_mm"])
    for r in records:
        for name, v in r["metrics"].items():
            w.writerow([r["case"], name, v["label"], _csv_num(v["dice"]), _csv_num(v["hd95"]), _csv_num(v["asd"])])
    _write_bytes(join_uri(out, "per_case.csv"), buf.getvalue().encode())
    files = ["per_case.json", "per_case.csv", "summary.json", "summary.md"]
    if plots:
        from ray_jobs.evaluation import plots as P

        dice = {name: [r["metrics"][name]["dice"] for r in records if name in r["metrics"]]
                for name in summary["classes"]}
        dice["mean fg"] = [r["mean_fg"]["dice"] for r in records]
        _write_bytes(join_uri(out, "plots", "dice_boxplot.png"), P.dice_boxplot_png(dice, f"{title}: Dice per class"))
        files.append("plots/dice_boxplot.png")
        for stage, uri in (histories or {}).items():
            hist = _read_history(uri)
            if hist is None or hist.empty or "epoch" not in hist.columns:
                continue
            _write_bytes(join_uri(out, "plots", f"loss_{stage}.png"), P.loss_curves_png(hist, f"{stage}: {uri}"))
            files.append(f"plots/loss_{stage}.png")
        names = dict(label_names or {})
        by_case = {r["case"]: r for r in records}
        for case, ov in (overlays or {}).items():
            d = by_case[case]["mean_fg"]["dice"]
            png = P.overlay_png(np.asarray(ov["image"], np.float32), ov["ref"], ov["pred"], ov["slices"], names,
                                f"{case}: mean foreground Dice {d:.3f}")
            _write_bytes(join_uri(out, "plots", f"overlay_{case}.png"), png)
            files.append(f"plots/overlay_{case}.png")
    summary["files"] = files
    _write_bytes(join_uri(out, "summary.json"), json.dumps(_json_safe(summary), indent=1).encode())
    _write_bytes(join_uri(out, "summary.md"), summary_markdown(summary, title).encode())
    return summary


# --------------------------------------------------------------------------- folders
def _strip_nifti(name: str) -> str | None:
    for suf in NIFTI_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return None


def list_nifti(folder: str | os.PathLike[str], what: str, strict: bool = True) -> dict[str, Path]:
    """``{case: path}`` of the ``.nii``/``.nii.gz`` files of a folder. With ``strict``, any
    other file (except hidden files and ``.json/.md/.txt/.csv``) is an error naming the file;
    otherwise it is ignored."""
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{what} {folder}: no such directory")
    out: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.is_dir() or p.suffix in (".json", ".md", ".txt", ".csv"):
            continue
        case = _strip_nifti(p.name)
        if case is None:
            if not strict:
                continue
            raise UserError(f"{p}: not a NIfTI file (expected .nii or .nii.gz)")
        if case in out:
            raise UserError(f"{p}: case {case!r} appears twice in {folder}")
        out[case] = p
    if not out:
        raise UserError(f"{what} {folder}: no .nii/.nii.gz files")
    return out


def load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
        img.header  # noqa: B018 - force header parsing
    except Exception as exc:  # nibabel raises ImageFileError, gzip errors, EOFError...
        raise UserError(f"{path}: cannot read as NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from None
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise UserError(f"{path}: expected a 3D volume, got shape {img.shape}")
    return img


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
    preds = list_nifti(pred_dir, "--pred")
    refs = list_nifti(ref_dir, "--ref", strict=False)  # a reference folder may hold other files
    missing = [c for c in preds if c not in refs]
    if missing:
        raise UserError(f"--ref {ref_dir}: no reference for prediction(s) {missing[:5]}"
                        + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    names = _label_names_near(Path(ref_dir))
    loaded: dict[str, tuple[np.ndarray, np.ndarray, tuple[float, ...]]] = {}
    found: set[int] = set()
    for case, p in preds.items():
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
    return write_report(out, records, source=source, label_names=names, overlays=overlays, plots=plots,
                        title="Prediction folder vs reference")


# --------------------------------------------------------------------------- store + Ray Train
def _gather_all(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (one gloo group, so it works under nccl too)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    group = _gather_all.group if getattr(_gather_all, "group", None) is not None else dist.new_group(backend="gloo")
    _gather_all.group = group  # type: ignore[attr-defined]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def _eval_worker(cfg: Mapping[str, Any]) -> None:
    """Ray Train worker: predict and score ``cases[rank::world]``; rank 0 writes the report."""
    import ray.train
    import torch

    from ray_jobs.train.checkpoint import load_model
    from ray_jobs.evaluation.inference import predict_volume, stored_intensity_range
    import storage

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _gather_all.group = None  # type: ignore[attr-defined]
    try:
        import ray.train.torch as rtt

        device = rtt.get_device()
    except Exception:  # local mode without a torch backend
        device = torch.device("cuda" if torch.cuda.is_available() and cfg["use_gpu"] else "cpu")
    model, spec = load_model(cfg["model_dir"], device=device)
    st = storage.open_store(cfg["store"], storage_options=cfg["storage_options"])
    names = {int(k): v for k, v in cfg["label_names"].items()}
    fg = [k for k in sorted(names) if k != 0]
    mine = cfg["cases"][rank::world]
    records, candidates = [], {}
    for case in mine:
        meta = st.meta(case)
        image, ref = st.image(case), st.label(case)
        pred = predict_volume(model, spec, image, meta["spacing"],
                              intensity_range=stored_intensity_range(spec, meta), batch_size=cfg["batch_size"])
        scores = score_case(pred, ref, meta["spacing"], fg, where=case)
        records.append(case_record(case, scores, names, ref.shape, meta["spacing"]))
        if cfg["save_predictions"]:
            _write_bytes(join_uri(cfg["out"], "predictions", f"{case}.nii.gz"),
                         label_nifti_bytes(pred, np.asarray(meta["affine"], float)))
        if cfg["plots"] and cfg["overlay_cases"] > 0:
            # keep only the few slices an overlay needs, not the whole volumes
            candidates[case] = overlay_payload(image, ref, pred)
    all_records = [r for part in _gather_all(records) for r in part]
    chosen = choose_overlay_cases(all_records, cfg["overlay_cases"]) if cfg["plots"] else []
    payload = {c: candidates[c] for c in chosen if c in candidates}
    overlays = {c: p for part in _gather_all(payload) for c, p in part.items()}
    if rank == 0:
        write_report(cfg["out"], all_records, source=cfg["source"], label_names=names,
                     histories=cfg["histories"], overlays=overlays, plots=cfg["plots"], title=cfg["title"])


def split_cases(st: Any, split: str) -> list[str]:
    """The labelled cases of ``split`` (a catalog split name, ``all`` or ``labelled``)."""
    if split in ("all", "labelled"):
        cases = list(st.cases)
    else:
        splits = st.catalog.splits
        if split not in splits:
            raise UserError(f"--split {split!r}: not a split of this store; known: {sorted(splits) + ['all']}")
        cases = list(splits[split])
    labelled = set(st.labelled_cases)
    out = [c for c in cases if c in labelled]
    if not out:
        raise UserError(f"--split {split!r}: no labelled cases to evaluate")
    return out


def evaluate_store(
    checkpoint: str,
    store: str,
    out: str,
    *,
    split: str = "val",
    cases: Sequence[str] | None = None,
    max_cases: int | None = None,
    num_workers: int = 1,
    use_gpu: bool = False,
    resources_per_worker: Mapping[str, float] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    storage_path: str | None = None,
    plots: bool = True,
    overlay_cases: int = 3,
    save_predictions: bool = False,
    histories: Mapping[str, str] | None = None,
    batch_size: int = 16,
    title: str | None = None,
) -> dict[str, Any]:
    """Evaluate an exported model on a store split as a Ray Train job; returns ``summary.json``.

    Checks the inputs in the driver (model directory, store, split) before any worker starts.
    Ray must be initialised (``ray.init``) by the caller. ``num_workers=0`` runs Ray Train's
    local mode (in this process, no DDP). With several nodes, ``out`` must be a URI or a path
    every node sees (rank 0 writes the report).

    Args:
        checkpoint: exported model directory (``RUN_DIR/finetune/model``) or a run directory.
        store: store path or URI. ``split``: catalog split, ``all`` or ``labelled``; or ``cases``.
        max_cases: evaluate only the first ``max_cases`` cases of the split.
        histories: ``{stage: history.csv}`` to plot; default: found beside the model directory.
    """
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    import storage
    from ray_jobs.train.checkpoint import read_spec
    from ray_jobs.train.trainer import worker_runtime_env

    # Ray workers do not share the driver's working directory: make local paths absolute
    checkpoint, store, out = (_absolute(str(p)) for p in (checkpoint, store, out))
    model_dir = resolve_model_dir(checkpoint)
    spec = read_spec(model_dir)
    if spec["stage"] != "finetune":
        raise UserError(f"--checkpoint {model_dir}: a {spec['stage']} model has no segmentation head; "
                        "evaluate a fine-tuned model (RUN_DIR/finetune/model)")
    try:
        st = storage.open_store(store, storage_options=storage_options)
    except ValueError as exc:
        raise UserError(f"--store {store}: {exc}") from None
    explicit = cases is not None
    if cases is None:
        cases = split_cases(st, split)
    else:
        unknown = [c for c in cases if c not in set(st.labelled_cases)]
        if unknown:
            raise UserError(f"cases not labelled in {store}: {unknown[:5]}")
    cases = list(cases)[: max_cases] if max_cases else list(cases)
    names = {int(k): str(v) for k, v in (spec.get("label_names") or {}).items()}
    if not names:
        store_names = st.attrs.get("label_names") if hasattr(st, "attrs") else None
        names = {int(k): str(v) for k, v in (store_names or {}).items()}
    if not names:
        names = {k: str(k) for k in range(int(spec["num_classes"]))}
    names = {k: names.get(k, str(k)) for k in range(int(spec["num_classes"]))}
    if histories is None:
        histories = find_histories(model_dir)
    source = {"checkpoint": model_dir, "store": str(store), "split": "(explicit cases)" if explicit else split,
              "method": spec.get("name"), "weights_sha256": spec.get("weights_sha256"),
              "n_workers": num_workers}
    cfg = {
        "model_dir": model_dir, "store": str(store), "storage_options": dict(storage_options or {}),
        "cases": cases, "label_names": {str(k): v for k, v in names.items()}, "out": str(out),
        "use_gpu": use_gpu, "plots": plots, "overlay_cases": overlay_cases,
        "save_predictions": save_predictions, "histories": dict(histories), "batch_size": batch_size,
        "source": source, "title": title or f"{spec.get('name', 'model')} on {split}",
    }
    res = dict(resources_per_worker or ({"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}))
    tmp = None
    if storage_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="localcl-eval-")
        storage_path = tmp.name
    try:
        trainer = TorchTrainer(
            _eval_worker,
            train_loop_config=cfg,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                                   resources_per_worker=res if num_workers else None),
            # a fresh name per call: Ray Train V2 treats a reused name as "resume" and could
            # hand back a previous run instead of evaluating again
            run_config=ray.train.RunConfig(name=f"evaluate-{uuid.uuid4().hex[:12]}",
                                           storage_path=storage_path,
                                           worker_runtime_env=worker_runtime_env()),
        )
        trainer.fit()
    finally:
        if tmp is not None:
            tmp.cleanup()
    fs, path = fsspec.core.url_to_fs(join_uri(str(out), "summary.json"))
    with fs.open(path, "r") as f:
        return json.load(f)
