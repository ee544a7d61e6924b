"""``localcl tune``: hyperparameter campaigns (Ray Tune + Optuna).

- ``localcl tune --config CAMPAIGN.yaml [--resume] [--address ADDR] [--set K=V ...]``
- ``localcl tune report CAMPAIGN_DIR [--out DIR]``
- ``localcl tune dashboard CAMPAIGN_DIR [--port 8080]``
"""

from __future__ import annotations

import argparse
import json
import sys

from ray_jobs.config import overrides_to_tree
from ray_jobs.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune",
        help="hyperparameter campaign: Optuna TPE/NSGA-II proposals, ASHA early stopping",
        description="Run or resume a campaign (--config), or inspect one (report, dashboard). "
        "The Optuna study (SQLite in the campaign directory, or the campaign's "
        "storage URL) is the record of every trial.",
    )
    p.add_argument("--config", help="campaign YAML (e.g. ray_jobs/configs/tune/ideal.yaml)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue a campaign whose driver stopped: finished trials are kept, "
        "unfinished ones re-run once, only the remaining budget is launched",
    )
    p.add_argument(
        "--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS, else a local Ray instance)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="K=V",
        help="campaign override, e.g. trials=20 or base.finetune.schedule.epochs=4",
    )
    p.set_defaults(func=_run)
    sub = p.add_subparsers(dest="tune_command", metavar="{report,dashboard}")
    r = sub.add_parser("report", help="best config YAML, trial table and plots of a campaign")
    r.add_argument("campaign_dir", help="the campaign directory (<root>/<name>)")
    r.add_argument("--out", default=None, help="output directory (default CAMPAIGN_DIR/report)")
    r.set_defaults(func=_report)
    d = sub.add_parser("dashboard", help="serve the study in optuna-dashboard on 127.0.0.1")
    d.add_argument("campaign_dir", help="the campaign directory (<root>/<name>)")
    d.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default 8080)")
    d.set_defaults(func=_dashboard)


def _run(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.campaign import run as campaign_run
    from ray_jobs.campaign import spec as campaign_spec

    if not args.config:
        raise UserError("tune: --config CAMPAIGN.yaml is required (or use `tune report` / `tune dashboard`)")
    campaign = campaign_spec.load_campaign(args.config, overrides=overrides_to_tree(args.overrides))
    result = campaign_run.run_campaign(campaign, resume=args.resume, address=args.address)
    if result.report_dir is not None:
        print(f"best config: {result.report_dir / 'best_config.yaml'}")
    return 0 if result.n_complete >= 1 else 1


def _report(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.campaign import report as campaign_report

    out = campaign_report.write_report(args.campaign_dir, args.out)
    summary = json.loads((out / "summary.json").read_text())
    print((out / "trials.md").read_text(), end="")
    for b in summary["best"][:1]:
        vals = ", ".join(f"{m}={v:.4f}" for m, v in zip(summary["metrics"], b["values"]))
        print(f"best: trial {b['number']} ({vals}) -> {out / 'best_config.yaml'}")
    if not summary["best"]:
        print("no complete trial yet")
    print(f"plots: {out / 'plots'} ({len(summary['plots'])} files)")
    for name, why in summary["skipped_plots"].items():
        print(f"  skipped {name}: {why}")
    return 0


def _dashboard(args: argparse.Namespace) -> int:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.campaign import search as campaign_search
    from ray_jobs.campaign import spec as campaign_spec

    campaign = campaign_spec.load_campaign_dir(args.campaign_dir)
    storage = campaign_search.open_storage(campaign.storage_url)
    try:  # deferred: optional dependency (the ``dashboard`` extra)
        import optuna_dashboard
    except ModuleNotFoundError:
        raise UserError("tune dashboard needs optuna-dashboard: pip install 'localcl[dashboard]'") from None
    print(
        f"optuna-dashboard for campaign {campaign.name!r}: http://127.0.0.1:{args.port}/ (Ctrl-C to stop)", flush=True
    )
    try:
        optuna_dashboard.run_server(storage, host="127.0.0.1", port=args.port)
    except OSError as exc:
        raise UserError(f"tune dashboard: cannot serve on 127.0.0.1:{args.port}: {exc}") from None
    print("dashboard stopped", file=sys.stderr)
    return 0
