"""Optuna study storage (SQLite / PostgreSQL), resume bookkeeping, samplers and the Tune searcher.

Persistence has one source of truth: the Optuna study in RDB storage (see
:mod:`ray_jobs.campaign.run` for the ``--resume`` procedure).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

import optuna
import sqlalchemy
from optuna.trial import TrialState
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.optuna import OptunaSearch

from ray_jobs.campaign.no_repeat import NoRepeatSampler
from ray_jobs.campaign.spec import (
    RUNS_ATTR,
    SEED_STRIDE,
    SIGNATURE_ATTR,
    STALE_ATTR,
    Campaign,
    finetune_epochs,
)
from ray_jobs.errors import UserError


def open_storage(url: str) -> Any:
    """An ``optuna.storages.RDBStorage`` for ``url`` after checking it is reachable.

    SQLite: the parent directory must exist and be writable. Other URLs (PostgreSQL, MySQL):
    a connection is opened with a 10 s timeout. Any failure -> :class:`UserError`, before any
    trial starts.
    """
    if url.startswith("sqlite:///"):
        db = Path(url.removeprefix("sqlite:///"))
        if not db.parent.is_dir():
            raise UserError(f"study storage {url!r}: directory {db.parent} does not exist")
        if not os.access(db.parent, os.W_OK):
            raise UserError(f"study storage {url!r}: directory {db.parent} is not writable")
        engine_kwargs: dict[str, Any] = {}
    else:
        engine_kwargs = {"connect_args": {"connect_timeout": 10}} if url.startswith(("postgres", "mysql")) else {}
    try:
        engine = sqlalchemy.create_engine(url, **engine_kwargs)
        with engine.connect():
            pass
        engine.dispose()
    except ModuleNotFoundError as exc:
        raise UserError(
            f"study storage {redact(url)!r}: database driver missing ({exc.name}); install it (e.g. psycopg2-binary for PostgreSQL)"
        ) from None
    except (sqlalchemy.exc.SQLAlchemyError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"study storage {redact(url)!r} is unreachable: {first}") from None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs or None)
    except Exception as exc:  # noqa: BLE001 - surface any storage set-up failure as one line
        raise UserError(f"study storage {redact(url)!r}: {type(exc).__name__}: {exc}") from None


def redact(url: str) -> str:
    """Hide a password in ``scheme://user:password@host/db``."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        if ":" in cred:
            cred = cred.split(":", 1)[0] + ":***"
        return f"{scheme}://{cred}@{host}"
    return url


def study_exists(storage: Any, name: str) -> bool:
    return any(s.study_name == name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))


@dataclass
class ResumePlan:
    """Bookkeeping of one driver start.

    ``done``: finished trials kept (COMPLETE + PRUNED + non-stale FAIL); ``stale``: trial
    numbers found RUNNING (driver killed) and marked FAIL now; ``requeued``: parameter sets
    enqueued again (one per stale trial); ``waiting``: enqueued trials not yet started;
    ``remaining``: new Tune trials to launch (``trials - done``); ``run_index`` and ``seed``
    of this driver run.
    """

    done: int
    stale: list[int]
    requeued: list[dict[str, Any]]
    waiting: int
    remaining: int
    run_index: int
    seed: int
    existing: bool = False
    notes: list[str] = field(default_factory=list)


def check_study(campaign: Campaign, storage: Any, resume: bool) -> bool:
    """Raise :class:`UserError` when the study exists with a different space/objective/base,
    or exists and ``resume`` is false, or is missing and ``resume`` is true; return whether it
    exists. Creates nothing."""
    exists = study_exists(storage, campaign.name)
    if exists:
        study = optuna.load_study(study_name=campaign.name, storage=storage)
        old = study.user_attrs.get(SIGNATURE_ATTR)
        sig = campaign.signature()
        if old != sig:
            raise UserError(
                f"campaign {campaign.name!r} already exists in {redact(campaign.storage_url)} with a different "
                f"search space/objective/base config (signature {old} != {sig}); choose a new name"
            )
        if not resume:
            raise UserError(
                f"campaign {campaign.name!r} already exists in {redact(campaign.storage_url)}; "
                "pass --resume to continue it"
            )
    elif resume:
        raise UserError(f"campaign {campaign.name!r} not found in {redact(campaign.storage_url)}; nothing to resume")
    return exists


def prepare_study(campaign: Campaign, storage: Any, resume: bool) -> ResumePlan:
    """Create or reopen the campaign's study and plan this driver run (see module docstring).

    Raises :class:`UserError` when the study exists with a different space/objective, or
    exists and ``resume`` is false, or does not exist and ``resume`` is true.
    """
    exists = check_study(campaign, storage, resume)
    sig = campaign.signature()
    if exists:
        study = optuna.load_study(study_name=campaign.name, storage=storage)
    else:
        directions: list[Literal["maximize", "minimize"]] = [
            "maximize" if m == "max" else "minimize" for m in campaign.objective.modes
        ]
        study = optuna.create_study(study_name=campaign.name, storage=storage, directions=directions)
        study.set_user_attr(SIGNATURE_ATTR, sig)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(campaign.objective.metrics))

    stale: list[int] = []
    requeued: list[dict[str, Any]] = []
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            storage.set_trial_user_attr(t._trial_id, STALE_ATTR, True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            stale.append(t.number)
            if t.params:
                study.enqueue_trial(
                    dict(t.params), user_attrs={"localcl_requeued_from": t.number}, skip_if_exists=False
                )
                requeued.append(dict(t.params))
    trials = study.get_trials(deepcopy=False)
    done = sum(
        1
        for t in trials
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
        or (t.state == TrialState.FAIL and not t.user_attrs.get(STALE_ATTR))
    )
    waiting = sum(1 for t in trials if t.state == TrialState.WAITING)
    run_index = int(study.user_attrs.get(RUNS_ATTR, 0))
    study.set_user_attr(RUNS_ATTR, run_index + 1)
    remaining = max(0, campaign.trials - done)
    return ResumePlan(
        done=done,
        stale=stale,
        requeued=requeued,
        waiting=waiting,
        remaining=remaining,
        run_index=run_index,
        seed=campaign.seed + SEED_STRIDE * run_index,
        existing=exists,
    )


# ----------------------------------------------------------------------------- driver


def make_sampler(campaign: Campaign, seed: int) -> Any:
    """The Optuna sampler for ``campaign`` seeded with ``seed`` (TPE, NSGA-II, random, grid).

    TPE and random on a finite space are wrapped in :class:`ray_jobs.campaign.no_repeat.NoRepeatSampler`
    (no configuration twice) unless ``repeat_configs`` is set."""
    name = campaign.sampler_name
    grid = {k: p.grid() for k, p in campaign.space.items()}
    if name == "grid":
        return optuna.samplers.GridSampler(grid, seed=seed)  # type: ignore[arg-type]
    if name == "nsga2":
        if campaign.population_size is None:
            return optuna.samplers.NSGAIISampler(seed=seed)
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=campaign.population_size)
    if name == "tpe":
        if campaign.startup_trials is None:
            base: Any = optuna.samplers.TPESampler(seed=seed)
        else:
            base = optuna.samplers.TPESampler(seed=seed, n_startup_trials=campaign.startup_trials)
    else:
        base = optuna.samplers.RandomSampler(seed=seed)
    if campaign.repeat_configs or grid_size(campaign) is None:
        return base

    full = (campaign.scheduler.max_t or finetune_epochs(campaign)) if campaign.scheduler_name == "asha" else None
    return NoRepeatSampler(base, campaign.distributions(), grid, seed=seed, full_epochs=full)  # type: ignore[arg-type]


def grid_size(campaign: Campaign) -> int | None:
    """Number of points of the full grid, or ``None`` when a parameter is continuous."""
    n = 1
    for p in campaign.space.values():
        g = p.grid()
        if g is None:
            return None
        n *= len(g)
    return n


def count_complete(campaign: Campaign, storage: Any) -> int:
    study = optuna.load_study(study_name=campaign.name, storage=storage)
    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))


def build_search(campaign: Campaign, storage: Any, seed: int) -> tuple[Any, Any]:
    """The Tune search algorithm and scheduler of ``campaign``: ``OptunaSearch`` over the
    campaign's distributions with :func:`make_sampler` (seeded ``seed``) writing to the study
    ``campaign.name`` in ``storage``, and ``ASHAScheduler`` on ``training_iteration`` (= fine-tune
    epoch; rungs at ``grace_period * reduction_factor**k`` up to ``max_t``) or ``None``."""
    obj = campaign.objective
    metric: str | list[str] = obj.metrics if obj.multi else obj.metrics[0]
    mode: str | list[str] = list(obj.modes) if obj.multi else obj.modes[0]
    searcher = _tracked_search_cls()(
        space=campaign.distributions(),
        metric=metric,
        mode=mode,  # type: ignore[arg-type]
        sampler=make_sampler(campaign, seed),
        study_name=campaign.name,
        storage=storage,
    )
    scheduler = None
    if campaign.scheduler_name == "asha":
        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            metric=obj.metrics[0],
            mode=obj.modes[0],
            max_t=campaign.scheduler.max_t or finetune_epochs(campaign),
            grace_period=campaign.scheduler.grace_period,
            reduction_factor=campaign.scheduler.reduction_factor,
        )
    return searcher, scheduler


def _tracked_search_cls() -> type:
    """``OptunaSearch`` that also records, on each Optuna trial while it runs, the Tune trial
    id and the fine-tune epochs reached (user attributes ``tune_trial_id``, ``epochs``): Optuna's
    intermediate values miss the last result of an ASHA-stopped trial, and multi-objective
    trials get none, so trial-epochs are counted from ``epochs``. With a
    :class:`~ray_jobs.campaign.no_repeat.NoRepeatSampler` it tells Tune the search is finished once every
    configuration has been tried."""

    class TrackedOptunaSearch(OptunaSearch):  # type: ignore[misc]
        # Ray annotates suggest as Optional[Dict], yet Searcher.FINISHED (a str) is its documented
        # "no more trials" answer (Searcher.suggest's docstring: dict | FINISHED | None).
        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:  # type: ignore[override]
            # Ray's __init__ sets _ot_study = None (inferred type: None); it is a Study once Tune
            # has set the search properties, before any suggest.
            study = cast(optuna.Study, self._ot_study)
            sampler = study.sampler
            if trial_id not in self._ot_trials and isinstance(sampler, NoRepeatSampler) and sampler.exhausted(study):
                return self.FINISHED  # every configuration of the finite space has been tried
            return super().suggest(trial_id)

        def _mark(self, trial_id: str, result: dict[str, Any] | None) -> None:
            ot = self._ot_trials.get(trial_id)
            if ot is None or not result:
                return
            ot.set_user_attr("tune_trial_id", trial_id)
            if "training_iteration" in result:
                ot.set_user_attr("epochs", int(result["training_iteration"]))

        def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
            self._mark(trial_id, result)
            super().on_trial_result(trial_id, result)

        def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
            if trial_id not in self._completed_trials:
                self._mark(trial_id, result)
            super().on_trial_complete(trial_id, result=result, error=error)

    return TrackedOptunaSearch
