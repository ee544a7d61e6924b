"""The model card of a run: ``RUN_DIR/model_card.json`` + ``RUN_DIR/MODEL_CARD.md``.

A card records what is needed to trust and reproduce a model: the method (pretraining method
and fine-tuning strategy), the data (store URI and fingerprint, label budget and the labelled
cases), the resolved configuration and its hash, the code version and the evaluation metrics.

API (called by the pipeline at the end of a run)::

    card = build_model_card(run_name=..., method=..., strategy=..., store=st_or_uri,
                            label_budget=2, labelled_cases=[...], config=cfg.to_dict(),
                            metrics={"method": summary, "baseline": summary})
    write_model_card(run_dir, card)            # -> model_card.json, MODEL_CARD.md

- ``store_fingerprint(store)``: SHA-256 over the sorted ``(case, source_sha256, shape, labelled)``
  of every complete case, i.e. it changes when a scan or label file changes, a case is added
  or removed, or labels are hidden; it does not depend on chunking or compression.
- the card's ``config_hash`` is :func:`ray_jobs.config.run.config_hash`, the rule of
  ``Config.hash`` (one definition of a run's identity).
- ``code_version()``: ``{"package": "localcl", "version": <installed version>, "git_sha": <HEAD
  of the checkout the code runs from, or null>, "git_dirty": bool | null}``.
- ``metrics`` values are evaluation summaries (``summary.json`` of :mod:`ray_jobs.evaluation.job`);
  the card keeps the per-class and mean-foreground mean ± std.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from collections.abc import Mapping, Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import fsspec

import storage
from ray_jobs.config.run import config_hash

CARD_JSON = "model_card.json"
CARD_MD = "MODEL_CARD.md"
CARD_FORMAT = 1


def store_fingerprint(store: Any, storage_options: Mapping[str, Any] | None = None) -> str:
    """SHA-256 of the sorted ``(case, source_sha256, shape, labelled)`` of a store's cases.

    Args:
        store: a ``storage`` store object or its path/URI.
    """
    if isinstance(store, (str, Path)):
        store = storage.open_store(str(store), storage_options=storage_options)
    labelled = set(store.labelled_cases)
    h = hashlib.sha256()
    for case in sorted(store.cases):
        meta = store.meta(case)
        row = [case, meta.get("source_sha256"), list(meta.get("shape") or []), case in labelled]
        h.update(json.dumps(row, default=str).encode() + b"\n")
    return h.hexdigest()


def code_version() -> dict[str, Any]:
    """Installed package version and, when the code runs from a git checkout, its HEAD sha."""
    try:
        pkg = version("localcl")
    except Exception:  # not installed (e.g. a copied working_dir on a cluster)
        pkg = None
    root = Path(__file__).resolve().parents[2]
    sha: str | None = None
    dirty: bool | None = None
    try:
        sha = (
            subprocess.run(
                ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            or None
        )
        if sha:
            status = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout
            dirty = bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        sha, dirty = None, None
    return {"package": "localcl", "version": pkg, "git_sha": sha, "git_dirty": dirty}


def _metric_digest(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The part of an evaluation summary a card keeps: per-class and mean-fg mean/std/n."""

    def keep(s: Mapping[str, Any]) -> dict[str, Any]:
        return {k: s.get(k) for k in ("mean", "std", "n")}

    out: dict[str, Any] = {"n_cases": summary.get("n_cases")}
    out["mean_foreground"] = {m: keep(v) for m, v in (summary.get("mean_foreground") or {}).items()}
    out["classes"] = {
        name: {"label": c.get("label"), **{m: keep(c[m]) for m in ("dice", "hd95", "asd") if m in c}}
        for name, c in (summary.get("classes") or {}).items()
    }
    return out


def build_model_card(
    *,
    run_name: str,
    method: str | None,
    strategy: str | None,
    store: Any,
    label_budget: int | None,
    labelled_cases: Sequence[str] = (),
    config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Mapping[str, Any]] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    fingerprint: str | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble the card (a JSON-serialisable dict).

    Args:
        run_name: the run's name.
        method: pretraining method (``METHODS`` key) or ``None`` without pretraining.
        strategy: fine-tuning strategy (``FINETUNE`` key).
        store: the store object or its URI (fingerprinted unless ``fingerprint`` is given).
        label_budget: number of labelled patients (None when the run named its labelled volumes,
            ``data.label_cases``); ``labelled_cases`` the cases used.
        config: the resolved config as a dict (stored verbatim, hashed with :func:`config_hash`).
        metrics: ``{model name: evaluation summary}``, e.g. ``{"method": ..., "baseline": ...}``.
        extra: anything else JSON-serialisable (e.g. timings).
    """
    uri = store if isinstance(store, (str, Path)) else getattr(store, "uri", None)
    fp = fingerprint or store_fingerprint(store, storage_options)
    cfg = dict(config or {})
    return {
        "format": CARD_FORMAT,
        "run": run_name,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "method": {"pretrain": method, "finetune": strategy},
        "data": {
            "store": str(uri) if uri is not None else None,
            "store_fingerprint": fp,
            "label_budget": label_budget,
            "labelled_cases": list(labelled_cases),
        },
        "config_hash": config_hash(cfg) if cfg else None,
        "code": code_version(),
        "metrics": {name: _metric_digest(s) for name, s in (metrics or {}).items()},
        "config": cfg,
        "extra": dict(extra or {}),
    }


def _pm(s: Mapping[str, Any] | None, digits: int) -> str:
    if not s or s.get("mean") is None:
        return "n/a"
    return f"{s['mean']:.{digits}f} ± {(s.get('std') or 0.0):.{digits}f}"


def model_card_markdown(card: Mapping[str, Any]) -> str:
    """``MODEL_CARD.md``: the card as a human-readable page."""
    m, d, c = card["method"], card["data"], card["code"]
    version = c.get("git_sha") or c.get("version") or "unknown"
    if c.get("git_sha") and c.get("git_dirty"):
        version += " (uncommitted changes)"
    lines = [
        f"# Model card: {card['run']}",
        "",
        f"- pretraining method: `{m.get('pretrain') or 'none (random initialisation)'}`",
        f"- fine-tuning strategy: `{m.get('finetune')}`",
        f"- data: `{d.get('store')}` (fingerprint `{(d.get('store_fingerprint') or '')[:16]}`)",
        "- label budget: "
        + (f"{d['label_budget']} patient(s), " if d.get("label_budget") is not None else "")
        + f"{len(d.get('labelled_cases') or [])} labelled case(s)"
        + (
            f": {', '.join(d['labelled_cases'][:8])}" + (" ..." if len(d["labelled_cases"]) > 8 else "")
            if d.get("labelled_cases")
            else ""
        ),
        f"- config hash: `{card.get('config_hash')}`",
        f"- code version: `{version}` (localcl {c.get('version') or 'not installed'})",
        f"- created: {card.get('created')}",
        "",
    ]
    if card.get("metrics"):
        lines += [
            "## Evaluation",
            "",
            "Mean ± std over test cases; HD95 and ASD in mm.",
            "",
            "| model | cases | class | Dice | HD95 (mm) | ASD (mm) |",
            "|---|---|---|---|---|---|",
        ]
        for name, s in card["metrics"].items():
            for cls, v in s.get("classes", {}).items():
                if v.get("label") == 0:
                    continue
                lines.append(
                    f"| {name} | {s.get('n_cases')} | {cls} | {_pm(v.get('dice'), 3)} | "
                    f"{_pm(v.get('hd95'), 2)} | {_pm(v.get('asd'), 2)} |"
                )
            fg = s.get("mean_foreground", {})
            lines.append(
                f"| **{name}** | {s.get('n_cases')} | **mean foreground** | **{_pm(fg.get('dice'), 3)}** | "
                f"{_pm(fg.get('hd95'), 2)} | {_pm(fg.get('asd'), 2)} |"
            )
        lines.append("")
    lines += [
        "## Reproduce",
        "",
        "The resolved configuration is `config.yaml` in the run directory "
        "(and `config` in `model_card.json`); re-running it with the same store and code "
        "version reproduces this model up to non-deterministic GPU kernels.",
        "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: str, card: Mapping[str, Any]) -> list[str]:
    """Write ``model_card.json`` and ``MODEL_CARD.md`` into ``run_dir`` (path or fsspec URI)."""
    fs, root = fsspec.core.url_to_fs(str(run_dir))
    fs.makedirs(root, exist_ok=True)
    paths = []
    for name, text in ((CARD_JSON, json.dumps(card, indent=2, default=str)), (CARD_MD, model_card_markdown(card))):
        p = root.rstrip("/") + "/" + name
        with fs.open(p, "w") as f:
            f.write(text)
        paths.append(p)
    return paths
