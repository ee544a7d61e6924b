"""Catalog: which cases are labelled, which split they belong to, and label budgets.

Splits come from the ``splits.json`` stored at ingest (root attribute ``splits_json``):

- ``<name>_cases: [case, ...]`` -> split ``name`` (e.g. ACDC ``train_cases`` -> ``"train"``);
- ``<name>_patients: [patient, ...]`` -> split ``name`` = all store cases of those patients
  (used only when ``<name>_cases`` is absent);
- ``<name>: [case, ...]`` (plain list of case ids) -> split ``name``;
- other entries (e.g. ACDC ``ssl4mis_labeled_patients``) are kept for :meth:`label_budget`.

Unlabelled cases that no split mentions (an extra ``--unlabelled`` ingest) join ``"train"``: they
only feed pre-training / unlabelled pools.

Without ``splits.json``: a seeded (seed 0) patient-level split of the labelled training cases,
``ceil(0.2 * n_patients)`` patients to ``"val"`` (none when fewer than 2 patients), the rest plus
all unlabelled cases to ``"train"``, ``imagesTs`` cases to ``"test"``.

Always present: ``"all"``, ``"labelled"``, ``"unlabelled"``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from storage.sources import patient_of as _patient_of

VAL_FRACTION = 0.2


class Catalog:
    """Case membership and splits of one store (build with ``store.catalog``)."""

    def __init__(
        self,
        cases: Sequence[str],
        labelled: Iterable[str],
        patients: Mapping[str, str] | None = None,
        splits_json: Mapping[str, Any] | None = None,
        test_cases: Iterable[str] = (),
    ) -> None:
        self.cases = sorted(cases)
        self.labelled = sorted(set(labelled) & set(self.cases))
        self._patient = {c: (patients or {}).get(c) or _patient_of(c) for c in self.cases}
        self.splits_json = dict(splits_json or {})
        self.test_cases = sorted(set(test_cases) & set(self.cases))
        self.splits = self._build_splits()

    @classmethod
    def from_store(cls, store: Any) -> Catalog:
        metas = {c: store.meta(c) for c in store.cases}
        attrs = store.attrs
        return cls(
            cases=list(metas),
            labelled=[c for c, m in metas.items() if m.get("labelled")],
            patients={c: m.get("patient") for c, m in metas.items()},
            splits_json=attrs.get("splits_json"),
            test_cases=attrs.get("test_cases", []),
        )

    # ------------------------------------------------------------------ membership
    def patient_of(self, case: str) -> str:
        """``patientNNN_frameNN`` -> ``patientNNN``; other ids map to themselves."""
        return self._patient.get(case) or _patient_of(case)

    def patients(self, cases: Iterable[str] | None = None) -> list[str]:
        """Distinct patients of ``cases`` (default: all), in order of first appearance."""
        seen: dict[str, None] = {}
        for c in self.cases if cases is None else cases:
            seen.setdefault(self.patient_of(c), None)
        return list(seen)

    def cases_of(self, patients: Iterable[str], within: Iterable[str] | None = None) -> list[str]:
        want = set(patients)
        pool = self.cases if within is None else within
        return sorted(c for c in pool if self.patient_of(c) in want)

    @property
    def unlabelled(self) -> list[str]:
        lab = set(self.labelled)
        return [c for c in self.cases if c not in lab]

    # ------------------------------------------------------------------ splits
    def _build_splits(self) -> dict[str, list[str]]:
        present = set(self.cases)
        splits: dict[str, list[str]] = {}
        sj = self.splits_json
        for key, value in sj.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                continue
            if key.endswith("_cases"):
                splits[key[: -len("_cases")]] = sorted(set(value) & present)
        for key, value in sj.items():
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                continue
            if key.endswith("_patients"):
                name = key[: -len("_patients")]
                splits.setdefault(name, self.cases_of(value))
            elif not key.endswith("_cases"):
                splits.setdefault(key, sorted(set(value) & present))
        if not splits:
            splits = self._derived_splits()
        else:
            mentioned = {c for v in splits.values() for c in v}
            extra = [c for c in self.unlabelled if c not in mentioned and c not in self.test_cases]
            if extra:
                splits["train"] = sorted(set(splits.get("train", [])) | set(extra))
            if self.test_cases:
                splits.setdefault("test", list(self.test_cases))
        splits["all"] = list(self.cases)
        splits["labelled"] = list(self.labelled)
        splits["unlabelled"] = self.unlabelled
        return splits

    def _derived_splits(self) -> dict[str, list[str]]:
        test = set(self.test_cases)
        lab_patients = sorted(self.patients(c for c in self.labelled if c not in test))
        n_val = math.ceil(VAL_FRACTION * len(lab_patients)) if len(lab_patients) >= 2 else 0
        order = np.random.default_rng(0).permutation(len(lab_patients))
        val_patients = {lab_patients[i] for i in order[:n_val]}
        val = [c for c in self.labelled if c not in test and self.patient_of(c) in val_patients]
        train = [c for c in self.cases if c not in test and c not in set(val)]
        out = {"train": sorted(train), "val": sorted(val)}
        if test:
            out["test"] = sorted(test)
        return out

    # ------------------------------------------------------------------ budgets
    def label_budget(self, n_patients: int, seed: int = 0, pool: str = "train") -> list[str]:
        """Labelled cases of ``n_patients`` patients drawn from split ``pool`` (reproducible).

        ACDC: for ``seed == 0`` and ``splits.json["ssl4mis_labeled_patients"][str(n)]`` present
        (and all its patients labelled in the pool), that fixed SSL4MIS list is used. Otherwise
        ``numpy.random.default_rng(seed).choice(sorted(patients), n, replace=False)``.
        Returns the sorted cases (all labelled frames of the chosen patients within the pool).
        """
        if pool not in self.splits:
            raise ValueError(f"pool {pool!r} is not a split; known splits: {sorted(self.splits)}")
        lab = set(self.labelled)
        pool_cases = [c for c in self.splits[pool] if c in lab]
        patients = sorted(self.patients(pool_cases))
        if not isinstance(n_patients, int) or isinstance(n_patients, bool) or n_patients < 1:
            raise ValueError(f"n_patients must be a positive int, got {n_patients!r}")
        if n_patients > len(patients):
            raise ValueError(f"n_patients={n_patients} exceeds the {len(patients)} labelled patients of split {pool!r}")
        fixed = self.splits_json.get("ssl4mis_labeled_patients")
        if seed == 0 and isinstance(fixed, Mapping) and isinstance(fixed.get(str(n_patients)), list):
            chosen = list(fixed[str(n_patients)])
            if len(chosen) == n_patients and set(chosen) <= set(patients):
                return self.cases_of(chosen, within=pool_cases)
        idx = np.random.default_rng(seed).choice(len(patients), size=n_patients, replace=False)
        return self.cases_of([patients[i] for i in idx], within=pool_cases)

    def named_budget(self, cases: Iterable[str], pool: str = "train") -> list[str]:
        """A label budget given as exactly ``cases`` (sorted). Each must be a labelled case of
        split ``pool``: ValueError names the first few that are not."""
        if pool not in self.splits:
            raise ValueError(f"pool {pool!r} is not a split; known splits: {sorted(self.splits)}")
        usable = set(self.splits[pool]) & set(self.labelled)
        cases = list(cases)
        bad = [c for c in cases if c not in usable]
        if bad:
            raise ValueError(f"{bad[:3]} are not labelled cases of split {pool!r}")
        return sorted(cases)

    def unlabelled_pool(self, budget_cases: Iterable[str], pool: str = "train") -> list[str]:
        """Cases of split ``pool`` outside the budget, and outside the budget's patients
        (labels hidden for semi-supervised training; includes truly unlabelled cases)."""
        if pool not in self.splits:
            raise ValueError(f"pool {pool!r} is not a split; known splits: {sorted(self.splits)}")
        budget = set(budget_cases)
        budget_patients = {self.patient_of(c) for c in budget}
        return [c for c in self.splits[pool] if c not in budget and self.patient_of(c) not in budget_patients]

    def summary(self) -> dict[str, Any]:
        return {
            "cases": len(self.cases),
            "labelled": len(self.labelled),
            "unlabelled": len(self.unlabelled),
            "patients": len(self.patients()),
            "splits": {k: len(v) for k, v in self.splits.items()},
        }
