"""Evaluation of a run's fine-tuned models: ``RUN_DIR/finetune/model`` as ``method`` and
``RUN_DIR/finetune_baseline/model`` as ``baseline``, on the plan's test cases, into
``RUN_DIR/eval/<name>/`` (the report format of :mod:`ray_jobs.evaluation.job`).

Two ways to run it, one result:

- :func:`evaluate_models`: its own Ray Train job, after the training stages (one worker-group
  start-up; a study cell, a run with one worker group per stage, or a re-run whose stages are
  all done);
- :func:`eval_after_chain`: the ``then`` of a one-worker-group run
  (``scaling.one_worker_group``, :func:`ray_jobs.train.trainer.fit_chain`): the training
  workers score the models right after exporting them, so the run starts one worker group in
  all; :func:`chain_summaries` reads the reports back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import fsspec

from ray_jobs.config import Config
from ray_jobs.errors import UserError
from ray_jobs.evaluation.job import EvalTarget, eval_job_config, evaluate_in_worker, evaluate_many, read_summaries
from ray_jobs.train.stage import STAGE_DIRS, Plan
from storage.remote import join_uri

EVAL_NAMES = (("finetune", "method"), ("baseline", "baseline"))


def eval_targets(
    cfg: Config, plan: Plan, run_dir: str, log: Callable[[str], None] = print, how: str = "evaluating"
) -> tuple[list[str], list[EvalTarget]]:
    """The report names (``method``, ``baseline``) and targets of the run's fine-tuned models;
    logs ``<how> <stage>/model on <n> case(s) -> <report dir>`` for each."""
    if not plan.test:
        raise UserError(
            f"evaluate.split: no labelled test cases in split {cfg.evaluate.split or cfg.data.splits.test!r}"
        )
    split = cfg.evaluate.split or cfg.data.splits.test
    names, targets = [], []
    for section, name in EVAL_NAMES:
        if getattr(cfg, section) is None:
            continue
        out_dir = join_uri(run_dir, "eval", name)
        log(f"{how} {STAGE_DIRS[section]}/model on {len(plan.test)} case(s) -> {out_dir}")
        title = f"{name}: {getattr(cfg, section).method.name} on {split}"
        names.append(name)
        targets.append(EvalTarget(join_uri(run_dir, STAGE_DIRS[section], "model"), out_dir, title=title))
    return names, targets


def job_options(cfg: Config, plan: Plan) -> dict[str, Any]:
    """The :func:`ray_jobs.evaluation.job.eval_job_config` options of a run's evaluation."""
    return {
        "cases": plan.test,
        "use_gpu": cfg.scaling.use_gpu,
        "storage_options": cfg.data.storage_options or None,
        "plots": cfg.evaluate.plots,
        "overlay_cases": cfg.evaluate.overlay_cases,
    }


def evaluate_models(cfg: Config, plan: Plan, run_dir: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate the run's fine-tuned models in one Ray Train job with ``scaling.num_workers``
    workers (:func:`ray_jobs.evaluation.job.evaluate_many`). Returns ``{name: summary.json}``."""
    names, targets = eval_targets(cfg, plan, run_dir, log)
    fs, root = fsspec.core.url_to_fs(run_dir)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    summaries = evaluate_many(
        targets,
        plan.store,
        num_workers=eval_workers(cfg, len(plan.test)),
        resources_per_worker=dict(cfg.scaling.resources_per_worker),
        storage_path=os.path.join(root, "eval", "_ray") if local else None,
        **job_options(cfg, plan),
    )
    return dict(zip(names, summaries, strict=True))


def eval_after_chain(
    cfg: Config, plan: Plan, run_dir: str, log: Callable[[str], None] = print
) -> tuple[list[str], tuple[Callable[[Any], None], dict[str, Any]]]:
    """The report names and the ``then = (evaluate_in_worker, job config)`` of
    :func:`ray_jobs.train.trainer.fit_chain`: the store and the cases are checked now, the
    models (exported by the same workers first) by the workers."""
    names, targets = eval_targets(cfg, plan, run_dir, log, how="then, in the same worker group: evaluating")
    return names, (evaluate_in_worker, eval_job_config(targets, plan.store, exported=False, **job_options(cfg, plan)))


def chain_summaries(names: list[str], then: tuple[Callable[[Any], None], dict[str, Any]]) -> dict[str, Any]:
    """``{name: summary.json}`` of an evaluation that ran as a chain's ``then``."""
    return dict(zip(names, read_summaries(then[1]), strict=True))


def eval_workers(cfg: Config, n_cases: int) -> int | tuple[int, int]:
    """The evaluation job's workers: ``scaling.num_workers``, at most one per case; elastic
    ``(min, max)`` when the run's scaling is (after a lost node the cluster may hold fewer
    than ``max``: a fixed count would wait for it forever)."""
    sc = cfg.scaling
    hi = min(sc.max_workers, n_cases)
    return (min(sc.min_workers, hi), hi) if sc.elastic else hi
