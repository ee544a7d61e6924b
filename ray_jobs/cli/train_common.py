"""Arguments and plumbing shared by the training verbs (pretrain, finetune, run, demo)."""

from __future__ import annotations

import argparse
from typing import Any

from ray_jobs.config import Config, load_config


def add_common(p: argparse.ArgumentParser, default_config: str | None = None) -> None:
    p.add_argument(
        "--config",
        "-c",
        default=default_config,
        required=default_config is None,
        help="YAML file or shipped config name (e.g. ideal_cpu); see ray_jobs/configs/<stage>/",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set finetune.schedule.epochs=5 (value parsed as YAML; repeatable)",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (e.g. ray://host:10001 or auto); default: start a "
        "local Ray on 127.0.0.1 (RAY_ADDRESS is honoured)",
    )
    p.add_argument(
        "--run-dir",
        default=None,
        help="run directory, local path or fsspec URI (default: config run_dir or "
        "runs/<name>); re-running with the same run dir resumes",
    )
    p.add_argument("--no-progress", action="store_true", help="no live progress bar")


def load(args: argparse.Namespace, stage: str) -> Config:
    """Validate the config (ConfigError before Ray starts)."""
    cfg = load_config(args.config, args.overrides, stage=stage)
    if args.no_progress:
        cfg.logging.progress = False
    return cfg


def start_ray(args: argparse.Namespace, cfg: Config) -> None:
    # deferred: loads torch / Ray / zarr (seconds); `localcl --help` and the other verbs stay fast
    from ray_jobs.train.trainer import init_ray

    init_ray(args.address, num_cpus=None)


def report_stage(name: str, res: dict[str, Any]) -> None:
    hist = res.get("history")
    if hist:
        last = hist[-1]
        bits = [f"{k}={last[k]:.4f}" for k in ("loss", "val_dice") if k in last]
        print(f"{name}: {len(hist)} epoch(s), last: {' '.join(bits)}")
    print(f"{name}: model -> {res['model_dir']}")
