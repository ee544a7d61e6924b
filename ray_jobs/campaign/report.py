"""``localcl tune report``: trials table, best trials, Optuna plots and ``REPORT.md`` of a campaign."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

import optuna
import optuna.visualization as ov
import pandas as pd
from optuna.importance import PedAnovaImportanceEvaluator
from optuna.trial import TrialState

from ray_jobs.campaign.search import open_storage, redact, study_exists
from ray_jobs.campaign.spec import STALE_ATTR, Campaign, CampaignError, load_campaign_dir, validate_run_config

#: Plots written by ``localcl tune report`` (single-objective; multi adds ``pareto_front``).
PLOTS = ("optimization_history", "parallel_coordinate", "param_importances")


def trials_table(campaign: Campaign, study: Any) -> Any:
    """A pandas DataFrame, one row per Optuna trial: number, state, objective value(s),
    fine-tune epochs reached (``epochs``; < budget when ASHA stopped it), duration, params,
    and ``stale`` (orphaned by a killed driver and re-run)."""
    rows = []
    for t in study.get_trials(deepcopy=False):
        row: dict[str, Any] = {"number": t.number, "state": t.state.name}
        vals = t.values or [None] * len(campaign.objective.metrics)
        for m, v in zip(campaign.objective.metrics, vals):
            row[m] = v
        row["epochs"] = int(t.user_attrs.get("epochs", len(t.intermediate_values)))
        row["tune_trial_id"] = t.user_attrs.get("tune_trial_id")
        row["duration_s"] = round(t.duration.total_seconds(), 1) if t.duration else None
        row["stale"] = bool(t.user_attrs.get(STALE_ATTR, False))
        for k in campaign.space:
            row[k] = t.params.get(k)
        rows.append(row)
    return pd.DataFrame(rows)


def best_trials(campaign: Campaign, study: Any) -> list[Any]:
    """Single objective: ``[study.best_trial]``. Multi: the Pareto front sorted by the first
    metric in its preferred direction (so ``[0]`` is the best-Dice Pareto trial)."""
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        return []
    if not campaign.objective.multi:
        return [study.best_trial]
    sign = -1.0 if campaign.objective.modes[0] == "max" else 1.0
    return sorted(study.best_trials, key=lambda t: sign * t.values[0])


def write_report(campaign_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str] | None = None) -> Path:
    """Write the campaign report into ``out_dir`` (default ``<campaign_dir>/report``):

    - ``best_config.yaml``: the full validated run config of the best trial, ready for
      ``localcl run --config``;
    - ``trials.csv`` / ``trials.md``: :func:`trials_table`;
    - ``summary.json``: counts per state, best trial(s), total fine-tune trial-epochs;
    - ``plots/<name>.png`` (matplotlib) and ``plots/<name>.html`` (plotly) for
      optimisation history, parallel coordinates and parameter importances (multi-objective:
      Pareto front and one history per metric). A plot that cannot be drawn yet (e.g.
      importances with fewer than 2 complete trials) is listed under ``skipped_plots``.
    """
    campaign = load_campaign_dir(campaign_dir)
    out = Path(out_dir) if out_dir else campaign.campaign_dir / "report"
    (out / "plots").mkdir(parents=True, exist_ok=True)
    storage = open_storage(campaign.storage_url)
    if not study_exists(storage, campaign.name):
        raise CampaignError(f"{campaign_dir}: study {campaign.name!r} not found in {redact(campaign.storage_url)}")
    study = optuna.load_study(study_name=campaign.name, storage=storage)
    table = trials_table(campaign, study)
    table.to_csv(out / "trials.csv", index=False)
    (out / "trials.md").write_text(_markdown_table(table))
    best = best_trials(campaign, study)
    summary: dict[str, Any] = {
        "campaign": campaign.name,
        "method": campaign.method,
        "metrics": campaign.objective.metrics,
        "modes": campaign.objective.modes,
        "sampler": campaign.sampler_name,
        "scheduler": campaign.scheduler_name,
        "trials_target": campaign.trials,
        "states": table["state"].value_counts().to_dict() if len(table) else {},
        "stale_rerun": int(table["stale"].sum()) if len(table) else 0,
        "trial_epochs": int(table.loc[~table["stale"], "epochs"].sum()) if len(table) else 0,
        "best": [{"number": t.number, "values": t.values, "params": t.params} for t in best],
    }
    if best:
        cfg = campaign.trial_config(best[0].params)
        cfg["name"] = f"{campaign.name}-best"
        cfg.pop("run_dir", None)
        validated = validate_run_config(cfg)
        header = (
            f"# Best configuration of campaign {campaign.name!r} (trial {best[0].number}, "
            + ", ".join(f"{m}={v:.4f}" for m, v in zip(campaign.objective.metrics, best[0].values))
            + ")\n# Run it: localcl run --config best_config.yaml\n"
        )
        (out / "best_config.yaml").write_text(header + validated.to_yaml())
        summary["best_config"] = str(out / "best_config.yaml")
    summary["plots"], summary["skipped_plots"] = _plots(campaign, study, out / "plots")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return out


def _markdown_table(df: Any) -> str:
    if not len(df):
        return "(no trials)\n"
    cols = list(df.columns)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _plots(campaign: Campaign, study: Any, out: Path) -> tuple[list[str], dict[str, str]]:
    # deferred: matplotlib must get the Agg backend before pyplot (and optuna's matplotlib
    # backend, which imports pyplot) is loaded
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    written: list[str] = []
    skipped: dict[str, str] = {}
    metrics = campaign.objective.metrics
    jobs: list[tuple[str, Any, Any, dict[str, Any]]] = []
    if campaign.objective.multi:
        for i, m in enumerate(metrics):
            kw = {"target": (lambda t, i=i: t.values[i]), "target_name": m}
            jobs.append((f"optimization_history_{m}", ov.plot_optimization_history, ovm.plot_optimization_history, kw))
            jobs.append((f"parallel_coordinate_{m}", ov.plot_parallel_coordinate, ovm.plot_parallel_coordinate, kw))
        jobs.append(("pareto_front", ov.plot_pareto_front, ovm.plot_pareto_front, {"target_names": metrics}))
        kw = {"target": (lambda t: t.values[0]), "target_name": metrics[0]}
    else:
        kw = {"target_name": metrics[0]}
        jobs.append(("optimization_history", ov.plot_optimization_history, ovm.plot_optimization_history, kw))
        jobs.append(("parallel_coordinate", ov.plot_parallel_coordinate, ovm.plot_parallel_coordinate, kw))
    # fANOVA needs scikit-learn; PED-ANOVA is self-contained.
    imp_kw = {**kw, "evaluator": PedAnovaImportanceEvaluator()}
    jobs.append(("param_importances", ov.plot_param_importances, ovm.plot_param_importances, imp_kw))
    n_complete = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    for name, plotly_fn, mpl_fn, kwargs in jobs:
        if name == "param_importances" and n_complete < 2:
            skipped[name] = f"needs >= 2 complete trials (have {n_complete})"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fig = plotly_fn(study, **kwargs)
                fig.write_html(str(out / f"{name}.html"), include_plotlyjs="cdn")
                written.append(f"{name}.html")
                ax = mpl_fn(study, **kwargs)
                f = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                f.set_size_inches(max(f.get_size_inches()[0], 8), max(f.get_size_inches()[1], 5))
                f.tight_layout()
                f.savefig(out / f"{name}.png", dpi=100)
                plt.close(f)
                written.append(f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return written, skipped
