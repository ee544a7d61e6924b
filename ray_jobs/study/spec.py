"""The study file: budgets, methods, seeds and the base run config (:class:`StudyConfig`), its
loading with ``--set`` overrides and checks, the run config of a cell and of a shared
pretraining, and the published reference numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from localcl.methods import METHODS
from ray_jobs.config import (
    CONFIG_ROOT,
    Config,
    Strict,
    apply_overrides,
    deep_merge,
    format_validation_error,
    load_yaml,
    validate,
)
from ray_jobs.errors import ConfigError

# Published ACDC mean foreground Dice (spec methods.md §1.8 and §3.8), keyed by labelled volumes.
# IDEAL's 1.25 / 2.5 / 10 % columns are GLCL's 1 / 2 / 8 labelled volumes (methods.md §3.2 [R]).
PUBLISHED: tuple[dict[str, Any], ...] = (
    {
        "method": "supervised",
        "dice": {1: 0.614, 2: 0.702, 8: 0.844},
        "source": "random-initialisation baseline of GLCL (NeurIPS 2020), recalled, not re-verified (methods.md §1.8)",
    },
    {
        "method": "glcl",
        "dice": {1: 0.725, 2: 0.789, 8: 0.872},
        "source": "GLCL G^D + L^R as printed in IDEAL Table 2 (methods.md §1.8, §3.8)",
    },
    {
        "method": "ideal",
        "dice": {1: 0.738, 2: 0.846, 8: 0.879},
        "source": "IDEAL Table 1, ACDC 1.25 / 2.5 / 10 % (methods.md §3.8)",
    },
)

# How any study here differs from the papers' evaluation (the settings of a given study, such
# as resolution and iterations, are its ``notes``).
PROTOCOL_NOTES: tuple[str, ...] = (
    "evaluation on the SSL4MIS validation split (10 patients, ED and ES: 20 volumes) instead of "
    "the papers' 20 test patients (one frame each), which are not in this ACDC copy",
    "budgets: only '1 volume' matches a published column; 3 and 7 patients are 6 and 14 volumes "
    "(published: 2 and 8 volumes); labelled sets are the SSL4MIS lists, not GLCL's combinations",
    "no model selection: the last epoch is kept (the papers keep the best of every 50 iterations "
    "on 2 extra labelled validation volumes)",
    "no N4 bias-field correction; this ACDC copy's header spacing is nominal (1.5625 mm "
    "in-plane for every case, true 1.37-1.68 mm), so resampling to a fixed pixel size is off by "
    "up to about 12 % per case and HD95/ASD are in nominal mm",
)

STAGE_SECTIONS = ("pretrain", "finetune")
BASE_FORBIDDEN = ("pretrain", "finetune", "baseline", "name", "run_dir")


# --------------------------------------------------------------------------- config
def _is_name(v: str) -> bool:
    """A study, budget or cell name: used in directory names, so letters, digits, '-', '_', '.'."""
    return bool(v) and all(c.isalnum() or c in "-_." for c in v)


def _check_name(v: str) -> str:
    if not _is_name(v):
        raise ValueError("letters, digits, '-', '_' or '.' only")
    return v


Name = Annotated[str, AfterValidator(_check_name)]


class Budget(Strict):
    """One label budget: ``patients: n`` (all labelled frames of n patients of the pool,
    drawn by the catalog) or ``cases: [...]`` (exactly these volumes)."""

    name: Name
    patients: int | None = Field(None, ge=1)
    cases: list[str] | None = None
    label: str | None = None  # table/plot label; default from the size

    @model_validator(mode="after")
    def _one(self) -> Budget:
        if (self.patients is None) == (self.cases is None):
            raise ValueError("give exactly one of 'patients' or 'cases'")
        if self.cases is not None and (not self.cases or len(set(self.cases)) != len(self.cases)):
            raise ValueError("'cases' must be a non-empty list without repeats")
        return self

    def display(self) -> str:
        if self.label:
            return self.label
        if self.patients is not None:
            return f"{self.patients} patient{'s' * (self.patients != 1)}"
        n = len(self.cases or [])
        return f"{n} volume{'s' * (n != 1)}"


class StudyConfig(Strict):
    """A study: ``base`` run-config keys shared by every cell, ``stage_defaults`` merged into
    each method's ``pretrain``/``finetune`` section, ``methods`` (METHODS key -> sections)."""

    name: Name
    study_dir: str | None = None  # null: runs/study/<name>
    base: dict[str, Any] = Field(default_factory=dict)
    stage_defaults: dict[str, dict[str, Any]] = Field(default_factory=dict)
    methods: dict[str, dict[str, Any]]
    baseline: str = "supervised"
    # method key -> the baseline cell it is compared with (default: ``baseline``). Extra baseline
    # cells are ``methods`` keys starting with "supervised" that fine-tune the supervised
    # strategy from scratch, e.g. with as many steps as PLCL's round 0 plus its rounds.
    compare_to: dict[str, str] = Field(default_factory=dict)
    budgets: list[Budget]
    seeds: list[int] = Field(min_length=1)
    label_seed: int = Field(0, ge=0)
    pretrain_per_seed: bool = False
    require_all_methods: bool = True
    # linear probe + health of every pretrained encoder and of the random one, per budget
    # (ray_jobs.study.diagnostics), in the report
    diagnostics: bool = True
    notes: list[str] = Field(default_factory=list)  # stated reductions, printed in results.md

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("seeds must be distinct and >= 0")
        return v

    def resolved_dir(self, override: str | None = None) -> str:
        d = override or self.study_dir or os.path.join("runs", "study", self.name)
        return d if "://" in d else os.path.abspath(d)

    def hash(self) -> str:
        d = self.model_dump(mode="json")
        d.pop("study_dir", None)
        d.pop("notes", None)
        d.pop("diagnostics", None)  # reporting only: cells do not change
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def resolve_study_path(ref: str | Path) -> Path:
    """An existing file, or a shipped study name (``acdc_cpu`` -> configs/study/acdc_cpu.yaml)."""
    p = Path(ref)
    if p.is_file():
        return p
    cand = CONFIG_ROOT / "study" / (p.name if p.suffix in (".yaml", ".yml") else p.name + ".yaml")
    if cand.is_file():
        return cand
    shipped = sorted(q.stem for q in (CONFIG_ROOT / "study").glob("*.yaml"))
    raise ConfigError(f"--config: no file or shipped study named {str(ref)!r}; shipped: {', '.join(shipped)}")


def load_study(ref: str | Path | Mapping[str, Any], overrides: Iterable[str] = ()) -> StudyConfig:
    """Load (``extends`` supported), apply ``--set`` overrides, validate the study and every
    cell's run config. Raises :class:`ConfigError` naming the bad key."""
    data = dict(ref) if isinstance(ref, Mapping) else load_yaml(resolve_study_path(ref))
    data = apply_overrides(data, overrides)
    try:
        study = StudyConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    check_study(study)
    return study


def check_study(study: StudyConfig) -> None:
    """Cross-checks (before Ray starts): method keys, baseline, budgets, no validation split,
    and every (method, budget, seed) run config validates."""

    for key in BASE_FORBIDDEN:
        if key in study.base:
            raise ConfigError(f"base.{key}: set per method/cell by the study; remove it from base")
    for key in study.stage_defaults:
        if key not in STAGE_SECTIONS:
            raise ConfigError(f"stage_defaults.{key}: not a stage (use {list(STAGE_SECTIONS)})")
    for key, block in study.methods.items():
        if not isinstance(block, Mapping) or "finetune" not in block:
            raise ConfigError(f"methods.{key}: needs a 'finetune' section")
        if key not in METHODS and not is_extra_baseline(key) and not is_pipeline(block):
            raise ConfigError(
                f"methods.{key}: not a method of METHODS ({sorted(METHODS)}), an extra baseline "
                f"(a name starting with 'supervised') nor a pipeline cell (a pretrain and a finetune "
                f"section that both name their method)"
            )
        if not _is_name(key):
            raise ConfigError(f"methods.{key}: a cell name is a directory name: letters, digits, '-', '_' or '.' only")
        if is_extra_baseline(key):
            name = ((block.get("finetune") or {}).get("method") or {}).get("name")
            if "pretrain" in block or name != "supervised":
                raise ConfigError(
                    f"methods.{key}: an extra baseline cell fine-tunes "
                    f"{{method: {{name: supervised}}}} from scratch (no pretrain section)"
                )
        extra = set(block) - set(STAGE_SECTIONS)
        if extra:
            raise ConfigError(f"methods.{key}.{sorted(extra)[0]}: unknown key (sections: {list(STAGE_SECTIONS)})")
    if study.require_all_methods:
        missing = sorted(set(METHODS) - set(study.methods))
        if missing:
            raise ConfigError(
                f"methods: missing {missing}; the study covers every method of "
                f"METHODS (set require_all_methods: false for a subset)"
            )
    if study.baseline not in study.methods:
        raise ConfigError(f"baseline: {study.baseline!r} is not one of methods ({sorted(study.methods)})")
    for key, base in study.compare_to.items():
        if key not in study.methods:
            raise ConfigError(f"compare_to.{key}: not one of methods ({sorted(study.methods)})")
        if base not in study.methods or not (base == study.baseline or is_extra_baseline(base)):
            raise ConfigError(
                f"compare_to.{key}: {base!r} must be the baseline or an extra baseline "
                f"cell of methods (a name starting with 'supervised')"
            )
    names = [b.name for b in study.budgets]
    if not names:
        raise ConfigError("budgets: at least one label budget")
    if len(set(names)) != len(names):
        raise ConfigError(f"budgets: duplicate names {names}")
    splits = (study.base.get("data") or {}).get("splits") or {}
    if splits.get("val", "val") is not None:
        raise ConfigError(
            "base.data.splits.val: must be null in a study (model selection on the "
            "evaluation split's labels would use labels beyond the budget)"
        )
    for key in study.methods:
        for b in study.budgets:
            cell_config(study, key, b, study.seeds[0], store="store.zarr", init=None)


def is_pipeline(block: Mapping[str, Any]) -> bool:
    """A pipeline cell: a ``methods`` entry, under any name, whose ``pretrain`` and ``finetune``
    sections both name their method, e.g. ``lrc_cps: {pretrain: {method: {name: lrc}}, finetune:
    {method: {name: ideal}}}`` (LRC's pretraining, then IDEAL's two-stream fine-tuning)."""
    return all(
        isinstance(block.get(s), Mapping) and ((block[s].get("method") or {}).get("name")) for s in STAGE_SECTIONS
    )


def is_extra_baseline(key: str) -> bool:
    """An extra baseline cell: a ``methods`` key starting with "supervised" that is not a METHODS
    key (e.g. ``supervised_320``: the supervised strategy with another number of steps)."""
    return key.startswith("supervised") and key not in METHODS


def baseline_of(study: StudyConfig, key: str) -> str:
    """The baseline cell ``key`` is compared with (``compare_to``, else ``baseline``)."""
    return study.compare_to.get(key, study.baseline)


def is_baseline(study: StudyConfig, key: str) -> bool:
    return key == study.baseline or is_extra_baseline(key)


def method_sections(study: StudyConfig, key: str) -> dict[str, Any]:
    out = {}
    for section, block in study.methods[key].items():
        if block is None:
            continue
        merged = deep_merge(study.stage_defaults.get(section, {}), block)
        method = dict(merged.get("method") or {})
        if section == "pretrain":
            method.setdefault("name", key)
        merged["method"] = method
        out[section] = merged
    return out


def _budget_patients(budget: Budget) -> int:
    return budget.patients if budget.patients is not None else max(1, len(budget.cases or []))


def cell_config(study: StudyConfig, key: str, budget: Budget, seed: int, *, store: str, init: str | None) -> Config:
    """The validated run config of one cell (fine-tuning on ``budget`` with ``seed``)."""
    d = deep_merge(study.base, method_sections(study, key))
    d["name"] = f"{study.name}-{key}-{budget.name}-s{seed}"
    d = deep_merge(
        d, {"data": {"store": store, "seed": seed, "label_budget": _budget_patients(budget)}, "baseline": None}
    )
    d["finetune"]["init"] = init
    return _validate(d, f"methods.{key}")


def pretrain_owner(study: StudyConfig, key: str) -> str:
    """The method key whose pretraining run ``key``'s cells start from: the first key of
    ``methods`` with an identical (merged) ``pretrain`` section. Identical sections are one run,
    shared: e.g. ``plcl: {pretrain: {method: {name: lrc}}}`` starts PLCL from LRC's pretraining
    instead of repeating it."""
    own = method_sections(study, key).get("pretrain")
    if own is None:
        return key
    # ``key`` itself matches, so the search always ends
    return next(other for other in study.methods if method_sections(study, other).get("pretrain") == own)


def pretrain_config(study: StudyConfig, key: str, *, store: str, budget: Budget | None, seed: int) -> Config:
    """The validated run config of one pretraining (``budget`` only for label-aware methods);
    named after :func:`pretrain_owner`, so methods sharing a pretraining share its config hash."""
    key = pretrain_owner(study, key)
    d = deep_merge(study.base, {"pretrain": method_sections(study, key)["pretrain"]})
    parts = [study.name, key, "pre"] + ([budget.name] if budget else []) + [f"s{seed}"]
    d["name"] = "-".join(parts)
    d = deep_merge(
        d,
        {
            "data": {"store": store, "seed": seed, "label_budget": _budget_patients(budget) if budget else 1},
            "finetune": None,
            "baseline": None,
        },
    )
    return _validate(d, f"methods.{key}.pretrain")


def _validate(d: Mapping[str, Any], where: str) -> Config:
    try:
        return validate(d)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
