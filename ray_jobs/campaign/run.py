"""Hyperparameter campaigns: Ray Tune trials proposed by Optuna, scored by few-label Dice.

A *campaign* is a YAML file (see ``ray_jobs/configs/tune/<method>.yaml``)::

    name: ideal-acdc               # study name; also the campaign directory name
    method: ideal                  # key of localcl.methods.METHODS (= pretrain.method.name)
    base_config: ideal             # optional; a `localcl run` config (file or shipped name)
    base: {...}                    # optional; deep-merged over base_config
    space:                         # dotted paths into the run config
      pretrain.method.tau: {type: categorical, choices: [0.05, 0.1, 0.2, 0.5]}
      finetune.optim.lr:   {type: log_float, low: 1.0e-4, high: 3.0e-3}
    trials: 40
    seed: 0

Each trial applies its parameters to the base run config and runs the objective: a short
pretraining followed by a fixed-budget fine-tune on a fixed label budget, reporting validation
Dice after every fine-tune epoch (multi-fidelity: Tune's ``training_iteration`` == fine-tune
epoch). Ray Tune's ASHA scheduler stops poor trials early; Optuna's seeded TPE proposes
configurations through Ray's ``OptunaSearch``. Multi-objective campaigns (Dice up, HD95 down)
use NSGA-II and no early stopping (ASHA needs one scalar to rank rungs).

On a finite space (every parameter categorical, int, or float with a step) TPE and random
search never run a configuration twice (:mod:`ray_jobs.campaign.no_repeat`; trials are deterministic,
so a repeat would only cost a trial). Once every configuration has been tried, each one ASHA
stopped early gets one more run (ASHA's late promotion, by re-running), then the campaign
ends, possibly before ``trials``. ``repeat_configs: true`` turns this off.

Persistence has ONE source of truth: the Optuna study in RDB storage (SQLite file in the
campaign directory by default, a PostgreSQL URL on clusters). Tune's own experiment state is
*not* restored (``Tuner.restore`` and a persistent Optuna storage conflict:
``UpdateFinishedTrialError``). ``--resume`` instead:

1. marks trials left ``RUNNING`` by a killed driver as ``FAIL`` with user attribute
   ``localcl_stale=True`` and re-enqueues their parameters (``study.enqueue_trial``), so each
   unfinished trial is re-run exactly once and its stale record is never counted;
2. counts finished trials ``n_done`` (COMPLETE, PRUNED and genuinely failed trials; not stale
   ones) and runs only ``trials - n_done`` new Tune trials;
3. starts the sampler with seed ``seed + 1000 * run_index``: a fixed seed on a new Tuner would
   replay the same random start-up configurations.

Resource plan: a trial is a Tune *function* trainable that builds and fits a Ray Train
``TorchTrainer`` (the Ray 2.60 "Train inside Tune" pattern; ``Tuner(TorchTrainer)`` is broken
under Train V2). The trainable itself only waits on the Train controller, so it reserves
``{"CPU": 0, "memory": 64 MiB}`` (Ray refuses an all-zero request; the memory entry makes it
non-empty without taking a CPU). The trial's ``workers_per_trial`` Train workers reserve the
real CPUs/GPUs. ``max_concurrent_trials`` is then ``min(user cap, floor(cluster CPUs /
(workers * cpus_per_worker)), floor(cluster GPUs / (workers * gpus_per_worker)))``; a trial
that cannot fit on the cluster at all is an error before any trial starts.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from ray_jobs.campaign.no_repeat import NoRepeatSampler
from ray_jobs.campaign.report import write_report
from ray_jobs.campaign.search import (
    ResumePlan,
    build_search,
    check_study,
    count_complete,
    grid_size,
    make_sampler,
    open_storage,
    prepare_study,
)
from ray_jobs.campaign.spec import (
    TRIAL_DRIVER_MEMORY,
    Campaign,
    CampaignError,
    Resources,
    load_campaign_dir,
    save_campaign,
    validate_run_config,
)
from ray_jobs.config import get_path, set_path
from ray_jobs.errors import UserError
from ray_jobs.train import pipeline
from ray_jobs.train.hooks import EVENTS_DIR_ENV
from ray_jobs.train.trainer import init_ray
from storage.remote import forwarded_env


@dataclass
class ResourcePlan:
    """``trial_resources``: what the Tune trainable (the Train driver) reserves;
    ``worker_resources``: per Train worker; ``max_concurrent``: trials at once."""

    trial_resources: dict[str, float]
    worker_resources: dict[str, float]
    num_workers: int
    use_gpu: bool
    max_concurrent: int

    def describe(self) -> str:
        per_trial = {k: v * self.num_workers for k, v in self.worker_resources.items()}
        return (
            f"{self.max_concurrent} trial(s) at once x {self.num_workers} worker(s) "
            f"({per_trial} per trial; trial driver {self.trial_resources})"
        )


def plan_resources(res: Resources, cluster: dict[str, float]) -> ResourcePlan:
    """Fit trials x workers into ``cluster`` (``ray.cluster_resources()``).

    ``max_concurrent = min(cap, floor(CPU / (n*c)), floor(GPU / (n*g)) if g > 0)`` with ``n``
    workers per trial, ``c`` CPUs and ``g`` GPUs per worker. Raises :class:`UserError` if
    one trial needs more than the cluster has.
    """
    n, c, g = res.workers_per_trial, res.cpus_per_worker, res.gpus_per_worker
    cpus = float(cluster.get("CPU", 0.0))
    gpus = float(cluster.get("GPU", 0.0))
    need_cpu, need_gpu = n * c, n * g
    if need_cpu > cpus + 1e-9:
        raise UserError(
            f"resources: one trial needs {need_cpu:g} CPUs ({n} workers x {c:g}) but the cluster has {cpus:g}; "
            "lower resources.workers_per_trial or resources.cpus_per_worker"
        )
    if need_gpu > gpus + 1e-9:
        raise UserError(
            f"resources: one trial needs {need_gpu:g} GPUs ({n} workers x {g:g}) but the cluster has {gpus:g}"
        )
    limit = int(math.floor(cpus / need_cpu + 1e-9))
    if need_gpu > 0:
        limit = min(limit, int(math.floor(gpus / need_gpu + 1e-9)))
    if res.max_concurrent_trials is not None:
        limit = min(limit, res.max_concurrent_trials)
    worker = {"CPU": c}
    if g > 0:
        worker["GPU"] = g
    return ResourcePlan(
        trial_resources={"CPU": 0.0, "memory": float(TRIAL_DRIVER_MEMORY)},
        worker_resources=worker,
        num_workers=n,
        use_gpu=g > 0,
        max_concurrent=max(1, limit),
    )


@dataclass
class CampaignResult:
    campaign_dir: Path
    plan: ResumePlan
    resources: ResourcePlan
    n_complete: int
    report_dir: Path | None


def run_campaign(
    campaign: Campaign,
    resume: bool = False,
    address: str | None = None,
    log: Any = print,
) -> CampaignResult:
    """Run (or resume) ``campaign`` to ``campaign.trials`` finished trials, then write the report.

    Everything that can fail on user input (space, storage URL, existing study, resources) is
    checked before the first trial starts.
    """
    campaign.campaign_dir.mkdir(parents=True, exist_ok=True)
    storage = open_storage(campaign.storage_url)
    check_study(campaign, storage, resume)

    init_ray(address)
    rplan = plan_resources(campaign.resources, ray.cluster_resources())
    base = prepare_data(campaign, log)
    plan = prepare_study(campaign, storage, resume)
    save_campaign(campaign, base)
    log(
        f"campaign {campaign.name}: {plan.done}/{campaign.trials} trials finished"
        + (f", {len(plan.stale)} unfinished re-queued" if plan.stale else "")
        + f"; up to {plan.remaining} more (run {plan.run_index}, seed {plan.seed})"
    )

    remaining = plan.remaining
    sampler = make_sampler(campaign, plan.seed)
    if isinstance(sampler, NoRepeatSampler):
        log(
            f"space: {grid_size(campaign)} configurations, none run twice (an ASHA-stopped one gets one more "
            f"run); the campaign ends when all are used"
        )
        import optuna

        if remaining > 0 and sampler.exhausted(optuna.load_study(study_name=campaign.name, storage=storage)):
            log("space: every configuration has been used; nothing to launch (repeat_configs: true allows repeats)")
            remaining = 0
    if remaining > 0:
        log(f"resources: {rplan.describe()}")
        _fit(campaign, storage, plan, rplan)
    report_dir = write_report(campaign.campaign_dir)
    n_complete = count_complete(campaign, storage)
    log(f"campaign {campaign.name}: {n_complete} complete trials; report in {report_dir}")
    return CampaignResult(campaign.campaign_dir, plan, rplan, n_complete, report_dir)


def _fit(campaign: Campaign, storage: Any, plan: ResumePlan, rplan: ResourcePlan) -> None:
    searcher, scheduler = build_search(campaign, storage, plan.seed)
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_fn,
            campaign_yaml=str(campaign.campaign_dir / "campaign.yaml"),
            env=trial_env(),
        ),
        rplan.trial_resources,
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=searcher,
            scheduler=scheduler,
            num_samples=plan.remaining,
            max_concurrent_trials=rplan.max_concurrent,
        ),
        run_config=tune_run_config(campaign, plan.run_index),
    )
    tuner.fit()


def tune_run_config(campaign: Campaign, run_index: int) -> tune.RunConfig:
    """Tune's run config for driver run ``run_index``: ``<campaign>/tune/run<i>``, and
    ``resources.trial_retries`` re-runs of a trial whose driver actor died (a lost or preempted
    node). A re-run calls :func:`trial_fn` again with the same trial id, hence the same run
    directory: :func:`ray_jobs.train.pipeline.run_stages` skips the finished stages and the
    stage in flight resumes from its last Train checkpoint. Worker deaths inside a trial are
    Ray Train's (``checkpoint.max_failures``), not Tune's."""
    return tune.RunConfig(
        name=f"run{run_index}",
        storage_path=str(campaign.campaign_dir / "tune"),
        failure_config=tune.FailureConfig(max_failures=campaign.resources.trial_retries),
        verbose=0,
    )


def _absolute(cfg: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Local relative paths of the run config made absolute against ``base_dir`` (the
    driver's working directory): Tune runs each trial in its own working directory."""
    out = copy.deepcopy(cfg)
    for path in ("data.store", "data.source", "finetune.init", "run_dir"):
        v = get_path(out, path)
        if isinstance(v, str) and v and "://" not in v and not os.path.isabs(v):
            set_path(out, path, str((base_dir / v).resolve()))
    return out


def trial_config(campaign: Campaign, params: dict[str, Any], trial_id: str) -> dict[str, Any]:
    """The run config of one trial: base + ``params`` + the trial's scaling, run name
    ``<campaign>-<trial_id>``, no baseline, no live progress/TensorBoard, paths absolute."""
    cfg = campaign.trial_config(params)
    cfg["name"] = f"{campaign.name}-{trial_id}"
    cfg["run_dir"] = str(campaign.campaign_dir / "trials" / trial_id)
    cfg["baseline"] = None
    cfg["logging"] = {**(cfg.get("logging") or {}), "progress": False, "tensorboard": False}
    if "val_hd95" in campaign.objective.metrics:
        cfg["evaluate"] = {**(cfg.get("evaluate") or {}), "val_hd95": True}
    return cfg


class EpochReportCallback(TuneReportCallback):
    """Ray's ``TuneReportCallback``, for the reports that carry the campaign's objective
    ``metrics``: the fine-tuning stage's one per epoch. The other reports of a stage, the step
    checkpoints (``checkpoint.every_steps``, a preemption or a stop), have no validation
    metrics; forwarded, Tune would fail the trial ("did not include the specified metric(s)")
    and count them as ``training_iteration``s, which ASHA's rungs take to be fine-tune epochs."""

    def __init__(self, metrics: list[str]) -> None:
        super().__init__()
        self.metrics = tuple(metrics)

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics and all(m in metrics[0] for m in self.metrics):
            super().after_report(run_context, metrics, checkpoint)


def trial_env() -> dict[str, str]:
    """What a trial's actor needs of the driver's environment (it runs wherever Tune puts it,
    with the node's environment): the object-storage variables
    (:data:`storage.remote.FORWARDED_ENV`: an ``s3://`` store or run directory works on a
    cluster whose nodes lack the credentials, as ``localcl run --address`` does through its
    workers' runtime env), Ray Train's settings (``RAY_TRAIN_*``, which Ray Train passes from
    the process that calls ``fit()`` to its controller, as it does for ``localcl run``) and
    ``LOCALCL_EVENTS_DIR`` (:mod:`ray_jobs.train.hooks`)."""
    env = forwarded_env()
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_TRAIN_")})
    if os.environ.get(EVENTS_DIR_ENV):
        env[EVENTS_DIR_ENV] = os.environ[EVENTS_DIR_ENV]
    return env


def trial_fn(params: dict[str, Any], campaign_yaml: str, env: dict[str, str] | None = None) -> None:
    """The Tune function trainable of one trial (runs in a Ray actor with 0 CPU).

    Short pretraining, then the fixed-budget fine-tune on the base config's label budget, both
    through :func:`ray_jobs.train.pipeline.run_stages` (each a ``TorchTrainer`` of
    ``workers_per_trial`` workers). :class:`EpochReportCallback` on the fine-tune stage forwards
    every epoch's ``ray.train.report`` (``val_dice`` ...) to Tune, so ASHA can stop the trial between
    epochs; the callback also forwards the checkpoint. ``env`` (:func:`trial_env`) is set in
    this actor's environment first; events go to ``$LOCALCL_EVENTS_DIR/<trial id>/``.
    """
    campaign = load_campaign_dir(Path(campaign_yaml).parent)
    trial_id = tune.get_context().get_trial_id()
    env = dict(env or {})
    if env.get(EVENTS_DIR_ENV):
        env[EVENTS_DIR_ENV] = os.path.join(env[EVENTS_DIR_ENV], trial_id)
        os.makedirs(env[EVENTS_DIR_ENV], exist_ok=True)
    os.environ.update(env)
    cfg = validate_run_config(trial_config(campaign, params, trial_id))
    stages = [s for s in ("pretrain", "finetune") if getattr(cfg, s) is not None]
    pipeline.run_stages(
        cfg,
        str(cfg.run_dir),
        stages=stages,
        finetune_callbacks=[EpochReportCallback(campaign.objective.metrics)],
        progress=False,
        log=lambda msg: None,
    )


def prepare_data(campaign: Campaign, log: Any = print) -> dict[str, Any]:
    """Validate the base config and make sure its store exists (ingested once here, in the
    driver, so concurrent trials never race to ingest). Returns the base config with
    absolute paths and ``data.store`` set (default ``<campaign_dir>/store.zarr``)."""
    base = _absolute(campaign.resolved_base(), Path.cwd())
    if not get_path(base, "data.store"):
        set_path(base, "data.store", str(campaign.campaign_dir / "store.zarr"))
    cfg = validate_run_config(campaign.with_scaling(base))
    plan = pipeline.prepare_data(cfg, str(campaign.campaign_dir), log)
    log(
        f"data: {plan.store}: {len(plan.labelled)} labelled, {len(plan.unlabelled)} unlabelled, "
        f"{len(plan.val)} validation case(s)"
    )
    if not plan.val:
        raise CampaignError("the campaign objective needs validation cases: data.splits.val is empty or null")
    if pipeline.needs_superpixels(cfg):  # once here: a trial's placement group has no CPU for tasks
        pipeline.ensure_superpixels(cfg, plan, log)
    return base
