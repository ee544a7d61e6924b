"""Hyperparameter campaigns (ray_jobs.tune, `localcl tune`).

Fast tests (no Ray): schema and space validation, study storage errors, resume bookkeeping on
a real SQLite Optuna study, resource planning, the report of a study. Ray tests (session
``ray_cluster``): a real 6-trial campaign on ACDC slices, a SIGKILLed driver resumed, and the
best configuration re-run.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from ray_jobs import tune
from ray_jobs.errors import UserError

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- helpers


def _campaign(tmp_path: Path, **kw: Any) -> tune.Campaign:
    """A campaign object built directly (no method validation): for study bookkeeping tests."""
    d: dict[str, Any] = dict(
        name="c1",
        method="ideal",
        space={
            "finetune.optim.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2},
            "pretrain.method.temperature": {"type": "categorical", "choices": [0.05, 0.1, 0.2]},
        },
        trials=5,
        seed=3,
        root=str(tmp_path / "campaigns"),
    )
    d.update(kw)
    c = tune.Campaign(**d)
    c.campaign_dir.mkdir(parents=True, exist_ok=True)
    return c


def _ask_tell(study: optuna.Study, c: tune.Campaign, value: float | None) -> optuna.trial.Trial:
    t = study.ask(c.distributions())
    if value is not None:
        study.tell(t, value)
    return t


# ----------------------------------------------------------------------------- ParamSpec


@pytest.mark.parametrize(
    "spec, needle",
    [
        ({"type": "float", "low": 2.0, "high": 1.0}, "low (2.0) > high (1.0)"),
        ({"type": "log_float", "low": 0.0, "high": 1.0}, "log_float needs low > 0"),
        ({"type": "categorical", "choices": []}, "non-empty 'choices'"),
        ({"type": "categorical"}, "non-empty 'choices'"),
        ({"type": "categorical", "choices": [1, 1]}, "duplicates"),
        ({"type": "int", "low": 1, "high": 10, "step": 4}, "not a multiple of step"),
        ({"type": "int", "low": 1.5, "high": 3}, "int bounds must be integers"),
        ({"type": "float", "low": 0.1}, "needs both 'low' and 'high'"),
        ({"type": "float", "low": 0, "high": 1, "choices": [1]}, "not 'choices'"),
        ({"type": "uniform", "low": 0, "high": 1}, "type"),
    ],
)
def test_param_spec__bad_entry_rejected(spec: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=".*") as err:
        tune.ParamSpec(**spec)
    assert needle in str(err.value)


def test_param_spec__distribution_and_grid_match_bounds() -> None:
    import optuna.distributions as od

    f = tune.ParamSpec(type="float", low=0.1, high=0.5, step=0.1)
    assert f.grid() == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert f.distribution() == od.FloatDistribution(0.1, 0.5, step=0.1)
    lf = tune.ParamSpec(type="log_float", low=1e-4, high=1e-2)
    assert lf.grid() is None and lf.distribution() == od.FloatDistribution(1e-4, 1e-2, log=True)
    i = tune.ParamSpec(type="int", low=8, high=32, step=8)
    assert i.grid() == [8, 16, 24, 32] and i.endpoints() == [8, 32]
    assert i.distribution() == od.IntDistribution(8, 32, step=8)
    c = tune.ParamSpec(type="categorical", choices=["intra", "inter", None])
    assert c.endpoints() == ["intra", "inter", None]
    assert c.distribution() == od.CategoricalDistribution(("intra", "inter", None))


def test_campaign__empty_space_and_bad_key_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="search space is empty"):
        _campaign(tmp_path, space={})
    with pytest.raises(ValueError, match="not a dotted config path"):
        _campaign(tmp_path, space={"finetune..lr": {"type": "float", "low": 0, "high": 1}})


def test_campaign__multi_objective_refuses_asha(tmp_path: Path) -> None:
    obj = {"metrics": ["val_dice", "val_hd95"], "modes": ["max", "min"]}
    with pytest.raises(ValueError, match="cannot rank a multi-objective"):
        _campaign(tmp_path, objective=obj, scheduler={"type": "asha"})
    c = _campaign(tmp_path, objective=obj)
    assert c.sampler_name == "nsga2" and c.scheduler_name == "none"
    assert _campaign(tmp_path).sampler_name == "tpe" and _campaign(tmp_path).scheduler_name == "asha"


def test_campaign__grid_sampler_needs_finite_space(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sampler=grid needs finite parameters"):
        _campaign(tmp_path, sampler="grid")
    c = _campaign(
        tmp_path,
        sampler="grid",
        space={"finetune.optim.lr": {"type": "categorical", "choices": [1e-3, 3e-3]},
               "data.label_budget": {"type": "int", "low": 1, "high": 3}},
    )
    assert tune.grid_size(c) == 6


# ----------------------------------------------------------------------------- storage


def test_open_storage__missing_directory_is_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        tune.open_storage(f"sqlite:///{tmp_path}/nope/study.db")


def test_open_storage__unreachable_server_is_user_error() -> None:
    # Port 1 on loopback: connection refused at once (or the driver is missing): one clear line.
    with pytest.raises(UserError, match=r"postgresql://u:\*\*\*@127\.0\.0\.1:1/db") as err:
        tune.open_storage("postgresql://u:secret@127.0.0.1:1/db")
    assert "secret" not in str(err.value)
    assert "unreachable" in str(err.value) or "driver missing" in str(err.value)


# ----------------------------------------------------------------------------- study bookkeeping


def test_prepare_study__new_then_exists_without_resume_rejected(tmp_path: Path) -> None:
    c = _campaign(tmp_path)
    storage = tune.open_storage(c.storage_url)
    plan = tune.prepare_study(c, storage, resume=False)
    assert (plan.done, plan.remaining, plan.run_index, plan.seed, plan.existing) == (0, 5, 0, 3, False)
    with pytest.raises(UserError, match="already exists .* pass --resume"):
        tune.prepare_study(c, storage, resume=False)
    with pytest.raises(UserError, match="not found .* nothing to resume"):
        tune.prepare_study(_campaign(tmp_path, name="other"), storage, resume=True)


def test_prepare_study__different_space_rejected(tmp_path: Path) -> None:
    c = _campaign(tmp_path)
    storage = tune.open_storage(c.storage_url)
    tune.prepare_study(c, storage, resume=False)
    changed = _campaign(tmp_path, space={"finetune.optim.lr": {"type": "log_float", "low": 1e-5, "high": 1e-2}})
    for resume in (False, True):
        with pytest.raises(UserError, match="different\\s+search space"):
            tune.prepare_study(changed, storage, resume=resume)
    # the trial budget is not part of the space: a resumed campaign may be extended
    assert tune.prepare_study(_campaign(tmp_path, trials=9), storage, resume=True).remaining == 9


def test_prepare_study__resume_requeues_each_unfinished_trial_once(tmp_path: Path) -> None:
    c = _campaign(tmp_path)
    storage = tune.open_storage(c.storage_url)
    tune.prepare_study(c, storage, resume=False)
    study = optuna.load_study(study_name=c.name, storage=storage)
    _ask_tell(study, c, 0.5)
    _ask_tell(study, c, 0.6)
    orphan_a = _ask_tell(study, c, None)  # left RUNNING: the driver "died"
    orphan_b = _ask_tell(study, c, None)
    failed = study.ask(c.distributions())
    study.tell(failed, state=TrialState.FAIL)  # a real failure: counts as done, not re-run

    plan = tune.prepare_study(c, storage, resume=True)
    assert plan.stale == [orphan_a.number, orphan_b.number]
    assert plan.requeued == [orphan_a.params, orphan_b.params]
    assert (plan.done, plan.remaining, plan.run_index) == (3, 2, 1)
    assert plan.seed == c.seed + tune.SEED_STRIDE
    trials = study.get_trials()
    assert [t.state for t in trials[:5]] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] * 3
    assert [t.user_attrs.get(tune.STALE_ATTR, False) for t in trials[:5]] == [False, False, True, True, False]
    assert [t.state for t in trials[5:]] == [TrialState.WAITING] * 2

    # A second resume before anything ran: nothing new is stale, the queue is not doubled.
    plan2 = tune.prepare_study(c, storage, resume=True)
    assert (plan2.stale, plan2.waiting, plan2.remaining, plan2.run_index) == ([], 2, 2, 2)
    # The next two asks pop exactly the orphans' parameters.
    popped = [study.ask(c.distributions()) for _ in range(2)]
    assert [p.params for p in popped] == [orphan_a.params, orphan_b.params]
    assert [p.user_attrs["localcl_requeued_from"] for p in popped] == [orphan_a.number, orphan_b.number]


# ----------------------------------------------------------------------------- resources


@pytest.mark.parametrize(
    "res, cluster, expect",
    [
        ({"workers_per_trial": 1}, {"CPU": 2.0}, 2),
        ({"workers_per_trial": 2}, {"CPU": 2.0}, 1),
        ({"workers_per_trial": 2, "cpus_per_worker": 2}, {"CPU": 17.0}, 4),
        ({"workers_per_trial": 1, "max_concurrent_trials": 3}, {"CPU": 16.0}, 3),
        ({"workers_per_trial": 2, "gpus_per_worker": 1}, {"CPU": 64.0, "GPU": 8.0}, 4),
        ({"workers_per_trial": 1, "gpus_per_worker": 0.5}, {"CPU": 4.0, "GPU": 1.0}, 2),
    ],
)
def test_plan_resources__trials_times_workers_fit(res: dict[str, Any], cluster: dict[str, float], expect: int) -> None:
    plan = tune.plan_resources(tune.Resources(**res), cluster)
    assert plan.max_concurrent == expect
    need = {k: v * plan.num_workers * plan.max_concurrent for k, v in plan.worker_resources.items()}
    assert all(need[k] <= cluster.get(k, 0.0) + 1e-9 for k in need)
    # the trial driver takes no CPU, only a token of memory (so the request is not empty)
    assert plan.trial_resources == {"CPU": 0.0, "memory": float(tune.TRIAL_DRIVER_MEMORY)}


def test_plan_resources__trial_larger_than_cluster_is_user_error() -> None:
    with pytest.raises(UserError, match="needs 4 CPUs .* cluster has 2"):
        tune.plan_resources(tune.Resources(workers_per_trial=4), {"CPU": 2.0})
    with pytest.raises(UserError, match="needs 1 GPUs"):
        tune.plan_resources(tune.Resources(gpus_per_worker=1), {"CPU": 8.0})
