"""NoRepeatSampler: no configuration of a finite space twice, second chances for early-stopped
configurations, the end of the search when all are used; and the bench_tune replay against a
real Tune run of the same searcher and scheduler."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from ray_jobs.campaign import search as campaign_search
from ray_jobs.campaign import spec as campaign_spec
from ray_jobs.campaign.no_repeat import NoRepeatSampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

REPO = Path(__file__).resolve().parents[2]
LRS = [1e-4, 1e-3, 1e-2]
TAUS = [0.1, 0.2, 0.5]


def _campaign(tmp_path: Path, **kw: Any) -> campaign_spec.Campaign:
    d: dict[str, Any] = dict(
        name="nr",
        method="ideal",
        trials=9,
        seed=0,
        root=str(tmp_path / "campaigns"),
        startup_trials=2,
        space={
            "finetune.optim.lr": {"type": "categorical", "choices": LRS},
            "pretrain.method.tau": {"type": "categorical", "choices": TAUS},
        },
        scheduler={"type": "none"},
    )
    d.update(kw)
    return campaign_spec.Campaign(**d)


def _score(p: dict[str, Any]) -> float:
    """A deterministic objective with one clear best point (lr 1e-3, tau 0.2)."""
    return 1.0 - abs(LRS.index(p["finetune.optim.lr"]) - 1) * 0.3 - abs(TAUS.index(p["pretrain.method.tau"]) - 1) * 0.1


def _run(c: campaign_spec.Campaign, n: int, seed: int) -> tuple[optuna.Study, list[tuple[Any, ...]]]:
    study = optuna.create_study(direction="maximize", sampler=campaign_search.make_sampler(c, seed))
    seen = []
    for _ in range(n):
        t = study.ask(c.distributions())
        seen.append((t.params["finetune.optim.lr"], t.params["pretrain.method.tau"]))
        study.tell(t, _score(t.params))
    return study, seen


def test_make_sampler__wraps_finite_tpe_and_random_only(tmp_path: Path) -> None:
    assert isinstance(campaign_search.make_sampler(_campaign(tmp_path), 0), NoRepeatSampler)
    assert isinstance(campaign_search.make_sampler(_campaign(tmp_path, sampler="random"), 0), NoRepeatSampler)
    assert isinstance(
        campaign_search.make_sampler(_campaign(tmp_path, repeat_configs=True), 0), optuna.samplers.TPESampler
    )
    assert isinstance(campaign_search.make_sampler(_campaign(tmp_path, sampler="grid"), 0), optuna.samplers.GridSampler)
    continuous = {"finetune.optim.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2}}
    assert isinstance(
        campaign_search.make_sampler(_campaign(tmp_path, space=continuous), 0), optuna.samplers.TPESampler
    )
    # full_epochs (the second-chance threshold) is ASHA's max_t
    s = campaign_search.make_sampler(_campaign(tmp_path, scheduler={"type": "asha", "max_t": 7}), 0)
    assert isinstance(s, NoRepeatSampler) and s._full_epochs == 7
    assert campaign_search.make_sampler(_campaign(tmp_path), 0)._full_epochs is None


@pytest.mark.parametrize("sampler", ["tpe", "random"])
def test_no_repeat__every_config_once_then_exhausted(tmp_path: Path, sampler: str) -> None:
    for seed in range(5):
        study, seen = _run(_campaign(tmp_path, sampler=sampler), 9, seed)
        assert sorted(seen) == sorted(itertools.product(LRS, TAUS)), (seed, seen)
        assert study.sampler.exhausted(study)


def test_no_repeat__tpe_alone_repeats_its_incumbent(tmp_path: Path) -> None:
    """Why the wrapper exists: plain TPE proposes configurations again on this space."""
    repeats = [
        len(seen) - len(set(seen))
        for seed in range(5)
        for _, seen in [_run(_campaign(tmp_path, repeat_configs=True), 9, seed)]
    ]
    assert sum(repeats) > 0, repeats


def test_no_repeat__seeded(tmp_path: Path) -> None:
    assert _run(_campaign(tmp_path), 9, 3)[1] == _run(_campaign(tmp_path), 9, 3)[1]
    assert _run(_campaign(tmp_path), 9, 3)[1] != _run(_campaign(tmp_path), 9, 4)[1]


def test_no_repeat__enqueued_trials_keep_their_params_and_count_as_tried(tmp_path: Path) -> None:
    c = _campaign(tmp_path, sampler="random")
    study = optuna.create_study(direction="maximize", sampler=campaign_search.make_sampler(c, 0))
    first = study.ask(c.distributions())
    study.tell(first, 0.5)
    # a resumed campaign re-runs an unfinished configuration: enqueue it (it is already tried)
    study.enqueue_trial(dict(first.params))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1
    again = study.ask(c.distributions())
    assert again.params == first.params  # the enqueued trial keeps its (repeated) parameters
    study.tell(again, 0.5)
    rest = []
    for _ in range(8):
        t = study.ask(c.distributions())
        rest.append(tuple(t.params.values()))
        study.tell(t, 0.1)
    assert tuple(first.params.values()) not in rest and len(set(rest)) == 8


def test_no_repeat__waiting_trial_is_not_proposed_to_others(tmp_path: Path) -> None:
    c = _campaign(tmp_path, sampler="random")
    sampler = campaign_search.make_sampler(c, 0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    grid = [dict(zip(("finetune.optim.lr", "pretrain.method.tau"), p)) for p in itertools.product(LRS, TAUS)]
    for p in grid[:-1]:
        study.enqueue_trial(p)
        t = study.ask(c.distributions())
        study.tell(t, 0.1)
    study.enqueue_trial(grid[-1])  # the last configuration waits for a worker (a resumed re-run)
    assert not sampler.exhausted(study)  # the enqueued trial must still run ...
    assert sampler._tried(study).keys() == {_key_of(p) for p in grid}  # ... but is not proposed again
    t = study.ask(c.distributions())
    assert t.params == grid[-1]
    study.tell(t, 0.1)
    assert sampler.exhausted(study)


def _key_of(p: dict[str, Any]) -> str:
    from ray_jobs.campaign.no_repeat import _key

    return _key(p, sorted(p))


def _stopped(study: optuna.Study, c: campaign_spec.Campaign, params: dict[str, Any], epochs: int, value: float) -> None:
    study.enqueue_trial(params)
    t = study.ask(c.distributions())
    t.set_user_attr("epochs", epochs)
    study.tell(t, value)


def test_no_repeat__second_chances_furthest_and_best_first(tmp_path: Path) -> None:
    c = _campaign(tmp_path, sampler="random", scheduler={"type": "asha", "max_t": 9})
    sampler = campaign_search.make_sampler(c, 0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    grid = [dict(zip(("finetune.optim.lr", "pretrain.method.tau"), p)) for p in itertools.product(LRS, TAUS)]
    # 4 configurations ran to the end (9 epochs), 5 were stopped early at rungs 1 and 3
    plan = [(9, 0.5), (1, 0.30), (3, 0.20), (9, 0.4), (1, 0.35), (3, 0.25), (9, 0.3), (1, 0.1), (9, 0.6)]
    for p, (ep, v) in zip(grid, plan):
        _stopped(study, c, p, ep, v)
    assert not sampler.exhausted(study)  # early-stopped configurations await their second chance
    order = []
    for _ in range(5):
        t = study.ask(c.distributions())
        order.append(grid.index(t.params))
        t.set_user_attr("epochs", 3)  # stopped again
        study.tell(t, 0.0)
    # rung 3 first (best first: 0.25, then 0.20), then rung 1 (0.35, 0.30, 0.10)
    assert order == [5, 2, 4, 1, 7]
    assert sampler.exhausted(study)  # each stopped configuration had one second chance


def test_no_repeat__minimize_ranks_second_chances_lowest_first(tmp_path: Path) -> None:
    c = _campaign(
        tmp_path,
        sampler="random",
        scheduler={"type": "asha", "max_t": 9},
        objective={"metrics": ["val_loss"], "modes": ["min"]},
    )
    sampler = campaign_search.make_sampler(c, 0)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    grid = [dict(zip(("finetune.optim.lr", "pretrain.method.tau"), p)) for p in itertools.product(LRS, TAUS)]
    for i, p in enumerate(grid):
        _stopped(study, c, p, 1 if i < 3 else 9, [0.9, 0.2, 0.5][i] if i < 3 else 0.1)
    t = study.ask(c.distributions())
    assert grid.index(t.params) == 1  # the lowest loss of the stopped ones


# ----------------------------------------------------------------------------- real Tune


def _bench() -> Any:
    spec = importlib.util.spec_from_file_location("bench_tune", REPO / "benchmarks" / "bench_tune.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _synthetic_curves(bench: Any, epochs: int) -> dict[tuple[float, float], list[float]]:
    """Deterministic curves over the benchmark's grid that rank late (early-rung order differs
    from the final order), so ASHA stops some configurations that deserve a second chance."""
    curves = {}
    for i, lr in enumerate(bench.LRS):
        for j, tau in enumerate(bench.TAUS):
            final = 0.3 + 0.1 * (i == 3) + 0.03 * j + 0.01 * ((i * 7 + j * 3) % 5)
            early = 0.2 + 0.02 * ((i * 5 + j) % 7)
            curves[(lr, tau)] = [early + (final - early) * (e / epochs) ** 2 for e in range(1, epochs + 1)]
    return curves


@pytest.mark.slow  # 46 s: validates the benchmark's replay, not the product; --runslow
@pytest.mark.ray
def test_bench_replay__matches_a_real_tune_run(ray_cluster: Any, tmp_path: Path) -> None:
    """bench_tune replays searches without Tune's controller; a real ``tune.Tuner`` with the same
    searcher and scheduler (1 trial at a time) must run the same configurations for the same
    epochs, and end (FINISHED) when NoRepeatSampler has no configuration left."""
    from ray import tune as rtune

    bench = _bench()
    epochs, budget, seed = 4, 200, 5
    curves = _synthetic_curves(bench, epochs)
    expected = bench.replay(curves, epochs, "tpe+asha", seed, budget, grace=1)
    assert sum(e for e, _, _ in expected) < budget  # the search ended on exhaustion, not on budget
    assert len({k for _, _, k in expected}) < len(expected)  # second chances ran (in Tune too, below)

    camp = bench.replay_campaign("tpe+asha", seed, budget, epochs, grace=1)
    searcher, scheduler = campaign_search.build_search(camp, optuna.storages.InMemoryStorage(), seed)

    def trainable(config: dict[str, Any]) -> None:
        curve = curves[(float(config["finetune.optim.lr"]), float(config["pretrain.method.tau"]))]
        for v in curve:
            rtune.report({"val_dice": v})

    import numpy as np

    np.random.seed(seed)
    grid = rtune.Tuner(
        trainable,
        tune_config=rtune.TuneConfig(
            search_alg=searcher, scheduler=scheduler, num_samples=budget, max_concurrent_trials=1
        ),
        run_config=rtune.RunConfig(name="replay-check", storage_path=str(tmp_path), verbose=0),
    ).fit()
    # trial order = Tune's creation order: the counter in each trial's directory name
    # ("trainable_<id>_<n>_<params>")
    rows = sorted((grid[i] for i in range(len(grid))), key=lambda r: int(Path(r.path).name.split("_")[2]))
    seq = [
        (
            int(r.metrics["training_iteration"]),
            float(r.metrics["val_dice"]),
            (float(r.config["finetune.optim.lr"]), float(r.config["pretrain.method.tau"])),
        )
        for r in rows
    ]
    assert seq == expected
    assert len(rows) < budget  # Tune stopped asking: the searcher said FINISHED


def test_searcher__finished_when_space_used_but_not_before_enqueued_trials(tmp_path: Path) -> None:
    c = _campaign(
        tmp_path, sampler="random", space={"finetune.optim.lr": {"type": "categorical", "choices": [1e-3, 1e-2]}}
    )
    storage = optuna.storages.InMemoryStorage()
    searcher, _ = campaign_search.build_search(c, storage, seed=0)
    got = []
    for i in range(2):
        cfg = searcher.suggest(f"t{i}")
        got.append(cfg["finetune.optim.lr"])
        searcher.on_trial_complete(f"t{i}", result={"val_dice": 0.5, "training_iteration": 2})
    assert sorted(got) == [1e-3, 1e-2]
    study = optuna.load_study(study_name=c.name, storage=storage)
    study.enqueue_trial({"finetune.optim.lr": 1e-2})  # as --resume re-queues an unfinished trial
    assert searcher.suggest("t2") == {"finetune.optim.lr": 1e-2}
    searcher.on_trial_complete("t2", result={"val_dice": 0.5, "training_iteration": 2})
    assert searcher.suggest("t3") == searcher.FINISHED
