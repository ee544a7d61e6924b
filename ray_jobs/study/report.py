"""The study report: aggregation over seeds, ``results.md`` tables, ``results.csv``/``.json``,
the Dice-vs-labelled-patients curve, and ``--report-only`` from the finished cells.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ray_jobs.errors import UserError
from ray_jobs.study.cells import cell_dir_of, cells, read_json, resolve_cell, write_json
from ray_jobs.study.spec import PROTOCOL_NOTES, PUBLISHED, StudyConfig, baseline_of, is_extra_baseline
from storage.remote import absolute_uri


# --------------------------------------------------------------------------- report
def aggregate(
    records: Sequence[Mapping[str, Any]], baseline: str, compare_to: Mapping[str, str] | None = None
) -> list[dict[str, Any]]:
    """Per (method, budget): mean and sample sd (ddof=1; 0 for one seed) over seeds of every
    numeric metric, plus ``delta`` = mean over seeds of (method - its baseline) Dice, paired by
    seed (same labelled set, same seed), with its sd. A method's baseline is
    ``compare_to[method]`` or ``baseline``; ``compared_to`` names it and ``steps_match`` says
    whether both trained the same number of fine-tuning steps (compute-matched)."""
    compare_to = dict(compare_to or {})
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    by_cell = {(r["method"], r["budget"], r["seed"]): r for r in records}
    out = []
    for (method, budget), rows in groups.items():
        ref = compare_to.get(method, baseline)
        base = {(budget, seed): r for (m, b, seed), r in by_cell.items() if m == ref and b == budget}
        row: dict[str, Any] = {
            "method": method,
            "budget": budget,
            "n_seeds": len(rows),
            "budget_label": rows[0]["budget_label"],
            "labelled_patients": rows[0]["labelled_patients"],
            "labelled_volumes": rows[0]["labelled_volumes"],
            "pretrain": rows[0]["pretrain"],
            "strategy": rows[0]["strategy"],
            "compared_to": None if method == ref else ref,
        }
        for k in ("finetune_steps", "labelled_views", "unlabelled_views", "pretrain_steps"):
            row[k] = rows[0].get(k)
        keys = [k for k, v in rows[0].items() if k.startswith(("dice", "hd95", "asd", "stream"))]
        for k in keys:
            vals = np.array([r.get(k) for r in rows if r.get(k) is not None], float)
            row[k] = float(vals.mean()) if vals.size else None
            row[k + "_sd"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0 if vals.size else None
        diffs = np.array(
            [
                r["dice"] - base[(budget, r["seed"])]["dice"]
                for r in rows
                if (budget, r["seed"]) in base
                and r.get("dice") is not None
                and base[(budget, r["seed"])].get("dice") is not None
            ],
            float,
        )
        row["delta"] = float(diffs.mean()) if diffs.size and method != ref else None
        row["delta_sd"] = float(diffs.std(ddof=1)) if diffs.size > 1 and method != ref else None
        row["n_paired"] = int(diffs.size)
        ref_rows = [r for r in base.values()]
        row["steps_match"] = (
            None
            if method == ref or not ref_rows
            else ref_rows[0].get("finetune_steps") == rows[0].get("finetune_steps")
        )
        out.append(row)
    return out


def _f(v: float | None, d: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def _pm(row: Mapping[str, Any], k: str, d: int = 3) -> str:
    if row.get(k) is None:
        return "n/a"
    sd = row.get(k + "_sd")
    return f"{row[k]:.{d}f} ± {sd:.{d}f}" if row.get("n_seeds", 1) > 1 and sd is not None else f"{row[k]:.{d}f}"


def results_markdown(study: StudyConfig, records: Sequence[Mapping[str, Any]], total: int, command: str = "") -> str:
    """The study's tables as markdown (see the module docstring)."""
    agg = aggregate(records, study.baseline, study.compare_to)
    by = {(r["method"], r["budget"]): r for r in agg}
    methods = [study.baseline] + [m for m in study.methods if m != study.baseline]
    budgets = study.budgets
    lines = [
        f"### Study `{study.name}`: {len(records)} of {total} cells"
        + ("" if len(records) >= total else f" (**partial**: {total - len(records)} cells not finished)"),
        "",
    ]
    if command:
        lines += [f"Command: `{command}`", ""]
    n_cases = records[0].get("n_cases") if records else None
    lines += [
        f"Mean foreground Dice (RV, MYO, LV) over the {n_cases or '?'} evaluation volumes, "
        f"mean ± sd over seeds (sd with ddof=1; seeds {study.seeds}). Δ: Dice minus the "
        f"method's baseline (column 'vs'; `{study.baseline}` unless `compare_to` names a "
        f"compute-matched one) on the same budget and seed, averaged over seeds; '≠ steps' marks "
        f"a Δ whose two cells trained different numbers of fine-tuning steps. Compute: "
        f"fine-tuning steps (labelled / unlabelled slices seen) and pretraining steps, "
        f"the pretraining amortised over every budget and seed that shares it.",
        "",
    ]
    head = (
        "| method | pretraining | fine-tuning | vs | ft steps (labelled / unlabelled slices) "
        "| pretrain steps | " + " | ".join(b.display() for b in budgets) + " |"
    )
    lines += [head, "|" + "---|" * (6 + len(budgets))]
    for m in methods:
        first = next((by[(m, b.name)] for b in budgets if (m, b.name) in by), None)
        if first is None:
            continue
        cells_txt = []
        for b in budgets:
            r = by.get((m, b.name))
            if r is None:
                cells_txt.append("—")
                continue
            txt = _pm(r, "dice")
            if r.get("delta") is not None:
                txt += f" (Δ {r['delta']:+.3f}{', ≠ steps' if r.get('steps_match') is False else ''})"
            cells_txt.append(txt)
        name = f"**{m}** (baseline)" if m == study.baseline else m
        ft = (
            f"{first.get('finetune_steps')} ({first.get('labelled_views')} / {first.get('unlabelled_views')})"
            if first.get("finetune_steps") is not None
            else "n/a"
        )
        lines.append(
            f"| {name} | {first['pretrain'] or '—'} | {first['strategy']} | "
            f"{first.get('compared_to') or '—'} | {ft} | {first.get('pretrain_steps') or 0} | "
            + " | ".join(cells_txt)
            + " |"
        )
    classes = sorted({k[len("dice_") :] for r in records for k in r if k.startswith("dice_") and not k.endswith("_sd")})
    order = {"RV": 0, "MYO": 1, "LV": 2}
    classes.sort(key=lambda c: order.get(c, 9))
    lines += [
        "",
        "Per class (Dice) and distances (mm, on the nominal header spacing):",
        "",
        "| method | budget | seeds | "
        + " | ".join(f"Dice {c}" for c in classes)
        + " | mean Dice | HD95 | ASD | Δ Dice vs baseline |",
        "|" + "---|" * (7 + len(classes)),
    ]
    for b in budgets:
        for m in methods:
            r = by.get((m, b.name))
            if r is None:
                continue
            delta = (
                "—"
                if r.get("delta") is None
                else (f"{r['delta']:+.3f}" + (f" ± {r['delta_sd']:.3f}" if r.get("delta_sd") is not None else ""))
            )
            lines.append(
                f"| {m} | {b.display()} | {r['n_seeds']} | "
                + " | ".join(_pm(r, f"dice_{c}") for c in classes)
                + f" | {_pm(r, 'dice')} | {_pm(r, 'hd95', 2)} | {_pm(r, 'asd', 2)} | {delta} |"
            )
    lines += [
        "",
        "Published ACDC numbers (mean foreground Dice; the papers' protocol, differences below):",
        "",
        "| method | 1 volume | 2 volumes | 8 volumes | source |",
        "|---|---|---|---|---|",
    ]
    for p in PUBLISHED:
        lines.append(
            f"| {p['method']} | {p['dice'][1]:.3f} | {p['dice'][2]:.3f} | {p['dice'][8]:.3f} | {p['source']} |"
        )
    one = [b for b in budgets if b.cases is not None and len(b.cases) == 1]
    if one:
        lines += ["", f"Here, at the only directly comparable budget ({one[0].display()}):"]
        for p in PUBLISHED:
            r = by.get((p["method"], one[0].name))
            if r is not None:
                lines.append(f"- {p['method']}: {_pm(r, 'dice')} here vs {p['dice'][1]:.3f} published")
    lines += ["", "Protocol differences to the published numbers:", ""] + [f"- {n}" for n in PROTOCOL_NOTES]
    lines += streams_lines(study, agg) + diagnostics_lines(records)
    verdict = verdict_lines(study, agg)
    if verdict:
        lines += ["", "Against the baseline:", ""] + verdict
    if study.notes:
        lines += ["", "Settings of this study:", ""] + [f"- {n}" for n in study.notes]
    return "\n".join(lines) + "\n"


def streams_lines(study: StudyConfig, agg: Sequence[Mapping[str, Any]]) -> list[str]:
    """Table of the methods whose model has several prediction streams (IDEAL): the Dice of
    the combined prediction next to each stream alone, mean ± sd over seeds."""
    rows = [r for r in agg if any(k.startswith("stream") and k.endswith("_dice") for k in r)]
    if not rows:
        return []
    names = sorted({k[: -len("_dice")] for r in rows for k in r if k.startswith("stream") and k.endswith("_dice")})
    out = [
        "",
        "Per prediction stream (mean foreground Dice of each decoder alone, and of the combined "
        "prediction the model exports):",
        "",
        "| method | budget | combined | " + " | ".join(names) + " |",
        "|" + "---|" * (3 + len(names)),
    ]
    for r in rows:
        out.append(
            f"| {r['method']} | {r['budget_label']} | {_pm(r, 'dice')} | "
            + " | ".join(_pm(r, f"{n}_dice") for n in names)
            + " |"
        )
    return out


def diagnostics_lines(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Table of the encoder diagnostics the cells carry (``encoder``, ``encoder_random``; see
    :mod:`ray_jobs.study.diagnostics`), one row per (encoder, budget)."""
    seen: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in records:
        for key in ("encoder_random", "encoder"):
            d = r.get(key)
            if isinstance(d, Mapping):
                seen.setdefault((str(d["encoder"]), str(r["budget_label"])), d)
    if not seen:
        return []
    out = [
        "",
        "Encoder diagnostics (frozen encoder; linear probe = 1x1 conv on the hypercolumn trained on "
        "the budget, mean foreground Dice on the evaluation volumes; health on the budget's slices, "
        "averaged over conv layers: weight norm, activation std, dead-unit fraction, BatchNorm "
        "drift d_logvar between running and batch statistics):",
        "",
        "| encoder | budget | probe Dice | weight norm | act std (min) | dead units | BN drift |",
        "|---|---|---|---|---|---|---|",
    ]
    order = sorted(seen, key=lambda k: (k[1], k[0] != "random", k[0]))
    for enc, budget in order:
        d = seen[(enc, budget)]
        out.append(
            f"| {enc} | {budget} | {_f(d.get('probe_dice'))} | {_f(d.get('weight_norm'), 2)} | "
            f"{_f(d.get('act_std'), 3)} ({_f(d.get('act_std_min'), 3)}) | "
            f"{100 * float(d.get('dead_frac') or 0):.1f} % | {_f(d.get('bn_dlogvar'), 2)} |"
        )
    return out


def verdict_lines(study: StudyConfig, agg: Sequence[Mapping[str, Any]]) -> list[str]:
    """One plain sentence per method: the budgets where its Dice is above, within the seed noise
    of, or below its baseline's (paired by seed). Noise: twice the standard error of the paired
    differences, ``2 sd / sqrt(n)``; with one seed there is no noise estimate and the sign is
    reported as it is, except that a difference printed as ``0.000`` is called tied."""
    out = []
    for m in study.methods:
        if m == study.baseline or is_extra_baseline(m):
            continue
        rows = [r for r in agg if r["method"] == m and r.get("delta") is not None]
        if not rows:
            continue
        groups: dict[str, list[str]] = {"above": [], "within noise": [], "tied": [], "below": []}
        for r in rows:
            se = 2 * r["delta_sd"] / math.sqrt(r["n_paired"]) if r.get("delta_sd") else 0.0
            kind = "above" if r["delta"] > se else "below" if r["delta"] < -se else "within noise"
            if not se and abs(r["delta"]) < 0.0005:
                kind = "tied"
            txt = f"{r['budget_label']} ({abs(r['delta']) if kind == 'tied' else r['delta']:+.3f}"
            txt += (f" ± {se:.3f}" if se else "") + ")"
            groups[kind].append(txt + (" [not compute-matched]" if r.get("steps_match") is False else ""))
        ref = baseline_of(study, m)
        s = f"- {m} vs `{ref}`: " + "; ".join(f"{k} at {', '.join(v)}" for k, v in groups.items() if v)
        n = min(r["n_paired"] for r in rows)
        out.append(s + f" (paired over {n} seed{'s' * (n != 1)}).")
    return out


def curve_png(study: StudyConfig, records: Sequence[Mapping[str, Any]]) -> bytes:
    """Dice vs labelled patients (log x; 1 ACDC volume = 0.5 patient), one line per method
    (baseline dashed black), error bars = sd over seeds (ddof=1)."""
    # deferred: matplotlib is slow to import and must get the Agg backend before pyplot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(records, study.baseline, study.compare_to)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = [study.baseline] + [m for m in study.methods if m != study.baseline]
    colours = [plt.get_cmap("tab10")(i) for i in range(10)]
    xs_all: dict[float, str] = {}
    for i, m in enumerate(methods):
        rows = sorted(
            (r for r in agg if r["method"] == m and r.get("dice") is not None), key=lambda r: r["labelled_patients"]
        )
        if not rows:
            continue
        x = [r["labelled_patients"] for r in rows]
        y = [r["dice"] for r in rows]
        e = [r.get("dice_sd") or 0.0 for r in rows]
        for r in rows:
            xs_all[r["labelled_patients"]] = r["budget_label"]
        base = m == study.baseline
        ax.errorbar(
            x,
            y,
            yerr=e,
            marker="o",
            ms=4,
            capsize=3,
            lw=2.2 if base else 1.4,
            ls="--" if base else "-",
            color="black" if base else colours[i % 10],
            label=f"{m} (baseline)" if base else m,
        )
    ax.set_ylim(0.0, 1.0)
    ax.set_xscale("log")
    ticks = sorted(xs_all)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{xs_all[t]}\n({t:g})" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("labelled patients (1 ACDC volume = 0.5)")
    ax.set_ylabel("mean foreground Dice (val)")
    n = max((r["n_seeds"] for r in agg), default=0)
    ax.set_title(f"{study.name}: label efficiency (mean ± sd over {n} seed{'s' * (n != 1)})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


CSV_FIRST = (
    "method",
    "budget",
    "seed",
    "labelled_volumes",
    "labelled_patients",
    "pretrain",
    "strategy",
    "dice",
    "hd95",
    "asd",
)


def write_report(
    study: StudyConfig, study_dir: str, records: Sequence[Mapping[str, Any]], total: int, command: str = ""
) -> dict[str, str]:
    """results.json, results.csv, results.md, curve.png in STUDY_DIR; returns their paths."""
    recs = list(records)
    paths = {
        k: os.path.join(study_dir, f)
        for k, f in (("json", "results.json"), ("csv", "results.csv"), ("md", "results.md"), ("png", "curve.png"))
    }
    write_json(
        paths["json"],
        {
            "study": study.name,
            "config_hash": study.hash(),
            "done": len(recs),
            "total": total,
            "partial": len(recs) < total,
            "aggregate": aggregate(recs, study.baseline, study.compare_to),
            "cells": recs,
        },
    )
    keys = list(CSV_FIRST) + sorted(
        {k for r in recs for k in r if k not in CSV_FIRST and not isinstance(r[k], (list, dict))}
    )
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in recs:
        w.writerow({k: r.get(k) for k in keys})
    Path(paths["csv"]).write_text(buf.getvalue())
    cmd = command or _read_command(study_dir)
    Path(paths["md"]).write_text(results_markdown(study, recs, total, cmd))
    if recs:
        Path(paths["png"]).write_bytes(curve_png(study, recs))
    return paths


def _read_command(study_dir: str) -> str:
    try:
        return Path(study_dir, "command.txt").read_text().strip()
    except OSError:
        return ""


def finished_records(study: StudyConfig, study_dir: str, store: str) -> list[dict[str, Any]]:
    """The ``cell.json`` of every finished cell whose config hash matches the study's cell
    config, in cell order."""
    recs = []
    for cell in cells(study):
        r = read_json(os.path.join(cell_dir_of(study_dir, cell), "cell.json"))
        if (
            r is not None
            and r.get("config_hash") == resolve_cell(study, study_dir, cell, absolute_uri(store))[0].hash()
        ):
            recs.append(r)
    return recs


def report_only(study: StudyConfig, study_dir: str) -> dict[str, Any]:
    """Rewrite the report from the finished cells (no training, no Ray)."""
    cfg_path = os.path.join(study_dir, "study.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"--study-dir {study_dir}: no study.yaml (not a study directory)")
    store = (study.base.get("data") or {}).get("store") or os.path.join(study_dir, "store.zarr")
    recs = finished_records(study, study_dir, store)
    return {"records": recs, "report": write_report(study, study_dir, recs, len(cells(study)))}
