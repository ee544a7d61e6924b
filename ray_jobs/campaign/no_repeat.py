"""An Optuna sampler wrapper that never proposes a configuration of a finite space twice.

A localcl trial is deterministic for a given configuration (fixed seeds; the campaign tests
rerun the best configuration and get its score back), so running a configuration again costs
a whole trial and teaches the search nothing. On a finite space (every parameter categorical,
int or float with a step) TPE does exactly that once it has an incumbent: the argmax of
``l(x)/g(x)`` over its candidates is the incumbent again, trial after trial. The same idea is
SMAC's ``deterministic`` option.

:class:`NoRepeatSampler` asks the wrapped sampler for a full configuration; if that
configuration already belongs to a trial of the study (complete, pruned, running or
enqueued), it asks
again up to ``retries`` times, then takes a configuration no trial has had, drawn uniformly
with its own seeded RNG.

**Second chances.** Ray's ``ASHAScheduler`` stops a trial for good, and whether a trial
passes a rung depends on the trials that reached the rung before it: a configuration tried
early, against few and lucky rivals, can be stopped although it ranks in the top
``1/reduction_factor`` of the finished rung. ASHA proper (Li et al., 2020) would promote it
later. Here, once every configuration has been tried, each configuration that was stopped
early (epochs reached, user attribute ``epochs``, below ``full_epochs``) and tried once only is
proposed once more, the furthest-reaching and best-scoring first; the scheduler then judges it
again against the full rung. With nothing left, :meth:`exhausted` is true (the Tune searcher
ends the campaign) and proposals fall through to the wrapped sampler.

Trials with fixed parameters (``study.enqueue_trial``, e.g. the re-runs of a resumed
campaign's unfinished trials) are left alone. Failed trials do not count as tried, so a
configuration whose trial crashed can be tried again.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import optuna
from optuna.distributions import BaseDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, TrialState

# a WAITING trial (enqueued, not started) has its configuration in system_attrs["fixed_params"]
TRIED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)


def _key(params: dict[str, Any], names: Sequence[str]) -> str:
    """One configuration as a string; floats to 12 significant digits (a stepped float drawn by
    Optuna and the same grid point computed here may differ in the last bit)."""

    def norm(v: Any) -> Any:
        return float(f"{v:.12g}") if isinstance(v, float) else v

    return json.dumps([norm(params.get(n)) for n in names])


class NoRepeatSampler(BaseSampler):
    """``base`` over the finite ``space`` ({name: distribution}; ``grid`` {name: values}) with no
    configuration proposed twice while an untried one is left."""

    def __init__(
        self,
        base: BaseSampler,
        space: dict[str, BaseDistribution],
        grid: dict[str, list[Any]],
        seed: int | None = None,
        retries: int = 4,
        full_epochs: int | None = None,
    ) -> None:
        if set(space) != set(grid):
            raise ValueError(f"space and grid name different parameters: {sorted(space)} vs {sorted(grid)}")
        self._base = base
        self._space = dict(space)
        self._names = sorted(space)
        self._grid = [dict(zip(self._names, combo)) for combo in itertools.product(*(grid[n] for n in self._names))]
        self._rng = np.random.RandomState(seed)
        self._retries = retries
        self._full_epochs = full_epochs

    # --------------------------------------------------------------- helpers

    def _tried(self, study: Study, exclude: int | None = None) -> dict[str, list[FrozenTrial]]:
        """{configuration key: its complete/pruned/running trials}, ``exclude`` left out."""
        out: dict[str, list[FrozenTrial]] = {}
        for t in study.get_trials(deepcopy=False, states=TRIED_STATES):
            params = t.params or t.system_attrs.get("fixed_params") or {}
            if t.number != exclude and params:
                out.setdefault(_key(params, self._names), []).append(t)
        return out

    def _second_chances(self, study: Study, tried: dict[str, list[FrozenTrial]]) -> list[dict[str, Any]]:
        """Configurations stopped early in their only trial, furthest-reaching and best first."""
        if self._full_epochs is None:
            return []
        sign = -1.0 if study.direction == optuna.study.StudyDirection.MINIMIZE else 1.0
        ranked: list[tuple[int, float, int, dict[str, Any]]] = []
        for p in self._grid:
            trials = tried.get(_key(p, self._names), [])
            if len(trials) != 1 or trials[0].state not in (TrialState.COMPLETE, TrialState.PRUNED):
                continue
            t = trials[0]
            epochs = t.user_attrs.get("epochs")
            if epochs is None or int(epochs) >= self._full_epochs:
                continue
            value = sign * t.value if t.value is not None else -np.inf
            ranked.append((-int(epochs), -value, len(ranked), p))
        return [p for *_, p in sorted(ranked, key=lambda r: r[:3])]

    def exhausted(self, study: Study) -> bool:
        """True when every configuration has been tried, no early-stopped one awaits its second
        chance and no enqueued trial waits to run."""
        if study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return False
        tried = self._tried(study)
        return all(_key(p, self._names) in tried for p in self._grid) and not self._second_chances(study, tried)

    def _propose(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        rel_space = self._base.infer_relative_search_space(study, trial)
        params = dict(self._base.sample_relative(study, trial, rel_space))
        for name in self._names:
            if name not in params:
                params[name] = self._base.sample_independent(study, trial, name, self._space[name])
        return params

    # --------------------------------------------------------------- sampler API

    def infer_relative_search_space(self, study: Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self._space)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if trial.system_attrs.get("fixed_params"):
            return {}
        tried = self._tried(study, exclude=trial.number)
        params = self._propose(study, trial)
        for _ in range(self._retries):
            if _key(params, self._names) not in tried:
                return params
            params = self._propose(study, trial)
        if _key(params, self._names) not in tried:
            return params
        untried = [p for p in self._grid if _key(p, self._names) not in tried]
        if untried:
            return dict(untried[self._rng.randint(len(untried))])
        second = self._second_chances(study, tried)
        return dict(second[0]) if second else params

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        return self._base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._base.before_trial(study, trial)

    def after_trial(self, study: Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None) -> None:
        self._base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._base.reseed_rng()
        self._rng = np.random.RandomState()


__all__ = ["NoRepeatSampler"]
