"""Label-efficiency study: methods x label budgets x seeds, one command, resumable per cell.

A study is a driver over the pipeline functions of ``localcl run`` (:mod:`ray_jobs.train.pipeline`):
it builds one validated run :class:`~ray_jobs.config.Config` per cell, fits it with
:func:`pipeline.run_section`, evaluates it with :func:`pipeline.evaluate_models` and writes the
model card with :func:`pipeline.write_run_card`. Nothing here trains or scores by itself.

Layout of STUDY_DIR::

    study.yaml                  the resolved study config (a re-run must match it, --resume)
    store.zarr/                 the dataset, ingested once (unless base.data.store is set)
    pretrain/<key>/             one pretraining run per method (label-free methods: shared by
                                every budget, and by every seed unless pretrain_per_seed);
                                label-aware pretraining (MixCL's label term): one per budget
    cells/<method>/<budget>-s<seed>/   one fine-tuning run directory (config.yaml, finetune/,
                                eval/method/summary.json, model_card.json) + cell.json
    results.json, results.csv   one record per finished cell
    results.md                  tables: mean foreground Dice per budget, per class, HD95, the
                                difference to the baseline, the published numbers
    curve.png                   Dice vs labelled patients, one line per method (mean +- sd
                                over seeds, ddof=1)

Cells (``method x budget x seed``):

- the labelled set of a budget is fixed across seeds: ``{patients: n}`` ->
  ``catalog.label_budget(n, seed=label_seed)`` (ACDC, ``label_seed`` 0: the SSL4MIS lists of
  ``splits.json``), ``{cases: [...]}`` -> exactly those volumes; the seed varies the weight
  initialisation, the slice sampling and the augmentations (``data.seed`` of the run config);
- model selection uses no labels beyond the budget: ``base.data.splits.val`` must be null, so
  every fine-tuning keeps its last epoch (PLCL: its last round), and the evaluation split
  (``data.splits.test``) is only scored after training;
- the unlabelled pool of a cell is the pool split minus the budget's patients (labels hidden);
  fine-tuning with the ``supervised`` strategy gets no unlabelled pool (it would ignore it).

A cell is finished when ``cell.json`` holds the cell's config hash; finished cells and the
finished stages of an interrupted cell are skipped; an interrupted stage resumes at its last
epoch with Ray Train workers and restarts at epoch 1 in local mode (``num_workers: 0``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Mapping, Optional, Sequence

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

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
from ray_jobs.errors import ConfigError, UserError

# Published ACDC mean foreground Dice (spec methods.md §1.8 and §3.8), keyed by labelled volumes.
# IDEAL's 1.25 / 2.5 / 10 % columns are GLCL's 1 / 2 / 8 labelled volumes (methods.md §3.2 [R]).
PUBLISHED: tuple[dict[str, Any], ...] = (
    {"method": "supervised", "dice": {1: 0.614, 2: 0.702, 8: 0.844},
     "source": "random-initialisation baseline of GLCL (NeurIPS 2020), recalled, not re-verified "
               "(methods.md §1.8)"},
    {"method": "glcl", "dice": {1: 0.725, 2: 0.789, 8: 0.872},
     "source": "GLCL G^D + L^R as printed in IDEAL Table 2 (methods.md §1.8, §3.8)"},
    {"method": "ideal", "dice": {1: 0.738, 2: 0.846, 8: 0.879},
     "source": "IDEAL Table 1, ACDC 1.25 / 2.5 / 10 % (methods.md §3.8)"},
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


def pretrain_sees_labels(method: str, method_cfg: Any) -> bool:
    """Whether ``METHODS[method]``'s pretraining reads ``batch["label"]`` (so it must be run per
    label budget, on that budget's labels only): MixCL always (its label-aware term ``L_lab``),
    LRC with ``global_loss="supervised"``. IDEAL, GLCL and LRC (MoCo/none) are label-free: the
    study pretrains them with every label hidden (-1)."""
    if method == "mixcl":
        return True
    if method == "lrc":
        return getattr(method_cfg, "global_loss", "moco") == "supervised"
    return False


# --------------------------------------------------------------------------- config
def _check_name(v: str) -> str:
    """A study or budget name: used in directory names, so letters, digits, '-', '_', '.'."""
    if not v or not all(c.isalnum() or c in "-_." for c in v):
        raise ValueError("letters, digits, '-', '_' or '.' only")
    return v


Name = Annotated[str, AfterValidator(_check_name)]


class Budget(Strict):
    """One label budget: ``patients: n`` (all labelled frames of n patients of the pool,
    drawn by the catalog) or ``cases: [...]`` (exactly these volumes)."""

    name: Name
    patients: Optional[int] = Field(None, ge=1)
    cases: Optional[list[str]] = None
    label: Optional[str] = None  # table/plot label; default from the size

    @model_validator(mode="after")
    def _one(self) -> "Budget":
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
    study_dir: Optional[str] = None  # null: runs/study/<name>
    base: dict[str, Any] = Field(default_factory=dict)
    stage_defaults: dict[str, dict[str, Any]] = Field(default_factory=dict)
    methods: dict[str, dict[str, Any]]
    baseline: str = "supervised"
    budgets: list[Budget]
    seeds: list[int] = Field(min_length=1)
    label_seed: int = Field(0, ge=0)
    pretrain_per_seed: bool = False
    require_all_methods: bool = True
    notes: list[str] = Field(default_factory=list)  # stated reductions, printed in results.md

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or min(v) < 0:
            raise ValueError("seeds must be distinct and >= 0")
        return v

    def resolved_dir(self, override: Optional[str] = None) -> str:
        d = override or self.study_dir or os.path.join("runs", "study", self.name)
        return d if "://" in d else os.path.abspath(d)

    def hash(self) -> str:
        import hashlib

        d = self.model_dump(mode="json")
        d.pop("study_dir", None)
        d.pop("notes", None)
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
    raise ConfigError(f"--config: no file or shipped study named {str(ref)!r}; shipped: "
                      f"{', '.join(shipped)}")


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
    from localcl.methods import METHODS

    for key in BASE_FORBIDDEN:
        if key in study.base:
            raise ConfigError(f"base.{key}: set per method/cell by the study; remove it from base")
    for key in study.stage_defaults:
        if key not in STAGE_SECTIONS:
            raise ConfigError(f"stage_defaults.{key}: not a stage (use {list(STAGE_SECTIONS)})")
    for key, block in study.methods.items():
        if key not in METHODS:
            raise ConfigError(f"methods.{key}: not a method of METHODS ({sorted(METHODS)})")
        if not isinstance(block, Mapping) or "finetune" not in block:
            raise ConfigError(f"methods.{key}: needs a 'finetune' section")
        extra = set(block) - set(STAGE_SECTIONS)
        if extra:
            raise ConfigError(f"methods.{key}.{sorted(extra)[0]}: unknown key (sections: "
                              f"{list(STAGE_SECTIONS)})")
    if study.require_all_methods:
        missing = sorted(set(METHODS) - set(study.methods))
        if missing:
            raise ConfigError(f"methods: missing {missing}; the study covers every method of "
                              f"METHODS (set require_all_methods: false for a subset)")
    if study.baseline not in study.methods:
        raise ConfigError(f"baseline: {study.baseline!r} is not one of methods "
                          f"({sorted(study.methods)})")
    names = [b.name for b in study.budgets]
    if not names:
        raise ConfigError("budgets: at least one label budget")
    if len(set(names)) != len(names):
        raise ConfigError(f"budgets: duplicate names {names}")
    splits = ((study.base.get("data") or {}).get("splits") or {})
    if splits.get("val", "val") is not None:
        raise ConfigError("base.data.splits.val: must be null in a study (model selection on the "
                          "evaluation split's labels would use labels beyond the budget)")
    for key in study.methods:
        for b in study.budgets:
            cell_config(study, key, b, study.seeds[0], store="store.zarr", init=None)


def _method_sections(study: StudyConfig, key: str) -> dict[str, Any]:
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


def cell_config(study: StudyConfig, key: str, budget: Budget, seed: int, *, store: str,
                init: Optional[str]) -> Config:
    """The validated run config of one cell (fine-tuning on ``budget`` with ``seed``)."""
    d = deep_merge(study.base, _method_sections(study, key))
    d["name"] = f"{study.name}-{key}-{budget.name}-s{seed}"
    d = deep_merge(d, {"data": {"store": store, "seed": seed,
                                "label_budget": _budget_patients(budget)}, "baseline": None})
    d["finetune"]["init"] = init
    return _validate(d, f"methods.{key}")


def pretrain_config(study: StudyConfig, key: str, *, store: str, budget: Optional[Budget],
                    seed: int) -> Config:
    """The validated run config of one pretraining (``budget`` only for label-aware methods)."""
    d = deep_merge(study.base, {"pretrain": _method_sections(study, key)["pretrain"]})
    parts = [study.name, key, "pre"] + ([budget.name] if budget else []) + [f"s{seed}"]
    d["name"] = "-".join(parts)
    d = deep_merge(d, {"data": {"store": store, "seed": seed,
                                "label_budget": _budget_patients(budget) if budget else 1},
                       "finetune": None, "baseline": None})
    return _validate(d, f"methods.{key}.pretrain")


def _validate(d: Mapping[str, Any], where: str) -> Config:
    try:
        return validate(d)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


# --------------------------------------------------------------------------- plan
@dataclass
class Cell:
    method: str
    budget: Budget
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}/{self.budget.name}-s{self.seed}"


def cells(study: StudyConfig) -> list[Cell]:
    """Cells in run order: seed, then budget, then method (baseline first), so a partial
    study holds complete seeds."""
    order = [study.baseline] + [m for m in study.methods if m != study.baseline]
    return [Cell(m, b, s) for s in study.seeds for b in study.budgets for m in order]


@dataclass
class Data:
    """The store and the case lists every cell draws from (resolved once)."""

    store: str
    pool: list[str]
    test: list[str]
    label_names: dict[str, str]
    num_classes: int
    catalog: Any = None
    frames: dict[str, int] = field(default_factory=dict)  # patient -> labelled volumes in pool


def open_data(study: StudyConfig, study_dir: str, log: Callable[[str], None]) -> Data:
    """Open the store (ingest ``base.data.source`` into STUDY_DIR/store.zarr once)."""
    import storage

    from ray_jobs.train import pipeline

    dcfg = study.base.get("data") or {}
    so = dcfg.get("storage_options") or None
    uri = _store_uri(dcfg.get("store") or pipeline._join(study_dir, "store.zarr"))
    if not pipeline._exists(uri) or not pipeline._has_cases(uri, so):
        if not dcfg.get("source"):
            raise UserError(f"base.data.store: {uri} does not exist and base.data.source is not set")
        log(f"ingesting {dcfg['source']} -> {uri}")
        rep = storage.ingest(dcfg["source"], uri, storage_options=so, workers=2, progress=False)
        if rep.failed:
            raise UserError(f"base.data.source: {len(rep.failed)} case(s) failed to ingest, first: "
                            f"{rep.failed[0].error}")
    st = storage.open_store(uri, storage_options=so)
    cat = st.catalog
    sp = dcfg.get("splits") or {}
    pool_name, test_name = sp.get("pool", "train"), sp.get("test", "val")
    for k, name in (("pool", pool_name), ("test", test_name)):
        if name not in cat.splits:
            raise UserError(f"base.data.splits.{k}: split {name!r} not in the store "
                            f"(has {sorted(cat.splits)})")
    lab = set(st.labelled_cases)
    test = [c for c in cat.splits[test_name] if c in lab]
    if dcfg.get("max_test_cases"):
        test = test[: int(dcfg["max_test_cases"])]
    if not test:
        raise UserError(f"base.data.splits.test: no labelled cases in split {test_name!r}")
    pool = list(cat.splits[pool_name])
    names = {str(k): str(v) for k, v in (st.meta(test[0]).get("label_names") or {}).items()}
    num_classes = (study.base.get("model") or {}).get("num_classes") or (
        max(int(k) for k in names) + 1 if names else 0)
    if num_classes < 2:
        raise UserError("base.model.num_classes: cannot infer from the store's label names; set it")
    frames: dict[str, int] = {}
    for c in pool:
        if c in lab:
            frames[cat.patient_of(c)] = frames.get(cat.patient_of(c), 0) + 1
    return Data(uri, pool, test, names, int(num_classes), cat, frames)


def budget_cases(data: Data, budget: Budget, label_seed: int, pool: str) -> list[str]:
    """The labelled cases of ``budget`` (fixed across seeds)."""
    if budget.patients is not None:
        try:
            return data.catalog.label_budget(budget.patients, seed=label_seed, pool=pool)
        except ValueError as exc:
            raise UserError(f"budgets.{budget.name}.patients: {exc}") from None
    lab = set(data.catalog.labelled)
    bad = [c for c in budget.cases or [] if c not in set(data.pool) or c not in lab]
    if bad:
        raise UserError(f"budgets.{budget.name}.cases: {bad[:3]} not labelled cases of split "
                        f"{pool!r}")
    return sorted(budget.cases or [])


def patient_equivalents(data: Data, cases: Sequence[str]) -> float:
    """Labelled patients of a budget, counting a patient with k of its m labelled pool volumes
    as k/m (ACDC: one ED volume = 0.5 patient)."""
    per: dict[str, int] = {}
    for c in cases:
        p = data.catalog.patient_of(c)
        per[p] = per.get(p, 0) + 1
    return float(sum(k / max(data.frames.get(p, k), 1) for p, k in per.items()))


def cell_plan(data: Data, cfg: Config, labelled: list[str], *, use_unlabelled: bool) -> Any:
    """A :class:`pipeline.Plan` for one fine-tuning cell: no validation cases (last epoch kept),
    the evaluation split as ``test``."""
    from ray_jobs.train.pipeline import Plan

    unl = data.catalog.unlabelled_pool(labelled, pool=cfg.data.splits.pool) if use_unlabelled else []
    if cfg.data.max_unlabelled is not None:
        unl = unl[: cfg.data.max_unlabelled]
    return Plan(data.store, data.num_classes, data.label_names, list(labelled), list(unl),
                sorted(set(labelled) | set(unl)), [], list(data.test))


def pretrain_plan(data: Data, cfg: Config, labelled: list[str]) -> Any:
    """Pretraining plan: ``labelled`` (label-aware methods: the budget) keep their labels, every
    other pool case is hidden (-1); label-free methods get ``labelled == []``. Pretraining uses
    the whole pool (``data.max_unlabelled`` caps only the fine-tuning pools)."""
    from ray_jobs.train.pipeline import Plan

    unl = data.catalog.unlabelled_pool(labelled, pool=cfg.data.splits.pool) if labelled \
        else list(data.pool)
    return Plan(data.store, data.num_classes, data.label_names, list(labelled), list(unl),
                sorted(set(labelled) | set(unl)), [], [])


# --------------------------------------------------------------------------- run
def _read_json(path: str) -> Optional[dict[str, Any]]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(path: str, obj: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


def prepare_study_dir(study: StudyConfig, study_dir: str, resume: bool) -> None:
    """Write STUDY_DIR/study.yaml; an existing study needs ``resume`` and the same config."""
    if "://" in study_dir:
        raise UserError(f"--study-dir {study_dir}: a study directory must be a local path "
                        f"(cells run in Ray Train local mode or on a shared volume)")
    path = os.path.join(study_dir, "study.yaml")
    if os.path.exists(path):
        if not resume:
            raise UserError(f"{study_dir} holds a study already; pass --resume to continue it "
                            f"(finished cells are skipped) or choose another --study-dir")
        try:
            old = load_study(yaml.safe_load(Path(path).read_text()) or {})
        except UserError as exc:
            raise UserError(f"{path}: cannot read the existing study ({exc})") from None
        if old.hash() != study.hash():
            raise UserError(f"{study_dir} holds a study with a different config; --resume needs "
                            f"the same config (or choose another --study-dir)")
    os.makedirs(study_dir, exist_ok=True)
    with open(path, "w") as f:
        yaml.safe_dump(study.model_dump(mode="json"), f, sort_keys=False)


def run_study(study: StudyConfig, study_dir: str, *, resume: bool = False,
              log: Callable[[str], None] = print, max_cells: Optional[int] = None,
              only_seeds: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """Run every unfinished cell, rewriting the report after each. Ray must be initialised.
    ``max_cells``: stop after that many newly finished cells (the report says 'partial').
    ``only_seeds``: run only the cells of these seeds, so several drivers can share one study
    directory (``--only-seed``; a shared pretraining is built by one of them under a file
    lock, the others wait for it). The report is rebuilt from every finished ``cell.json``.
    Returns ``{"records": [...], "done": n, "total": N, "report": {...}}``."""
    from ray_jobs.train import pipeline

    if only_seeds is not None:
        unknown = sorted(set(only_seeds) - set(study.seeds))
        if unknown:
            raise UserError(f"--only-seed: {unknown} not in the study's seeds {study.seeds}")
    prepare_study_dir(study, study_dir, resume)
    t_start = time.perf_counter()
    data = open_data(study, study_dir, log)
    todo = cells(study)
    pool = (study.base.get("data") or {}).get("splits", {}).get("pool", "train")
    budgets = {b.name: budget_cases(data, b, study.label_seed, pool) for b in study.budgets}
    records: list[dict[str, Any]] = []
    pre_times: dict[str, float] = {}
    new = 0
    for i, cell in enumerate(todo):
        cell_dir = cell_dir_of(study_dir, cell)
        labelled = budgets[cell.budget.name]
        cfg, init = resolve_cell(study, study_dir, cell, data.store)
        done = _read_json(os.path.join(cell_dir, "cell.json"))
        if done and done.get("config_hash") == cfg.hash():
            records.append(done)
            continue
        if only_seeds is not None and cell.seed not in only_seeds:
            continue
        if max_cells is not None and new >= max_cells:
            break
        if init is not None:
            pre_times.setdefault(init, _ensure_pretrain(study, study_dir, cell, data, budgets, log))
        t0 = time.perf_counter()
        log(f"[{i + 1}/{len(todo)}] {cell.key}: {len(labelled)} labelled volume(s), "
            f"{cfg.finetune.method.name} fine-tuning")
        strategy = cfg.finetune.method.name
        plan = cell_plan(data, cfg, labelled, use_unlabelled=strategy != "supervised")
        pipeline.write_config(cfg, cell_dir)
        quiet = _quiet(log)
        res = pipeline.run_section(cfg, plan, cell_dir, "finetune", init=(
            {"kind": "backbone", "dir": init} if init else None), progress=False, log=quiet)
        t_ft = time.perf_counter() - t0
        if res.get("history") is None:  # exported by an interrupted earlier run: its epoch times
            t_ft = _history_seconds(os.path.join(cell_dir, "finetune", "history.csv"))
        t1 = time.perf_counter()
        ev = pipeline.evaluate_models(cfg, plan, cell_dir, log=quiet)
        t_ev = time.perf_counter() - t1
        pipeline.write_run_card(cfg, plan, cell_dir, metrics=ev, extra={
            "timings_s": {"finetune": round(t_ft, 1), "evaluate": round(t_ev, 1)},
            "study": study.name, "pretrained_from": init})
        rec = make_record(cell, cfg, plan, ev["method"], data, labelled,
                          pretrain=init, times={"finetune_s": t_ft, "evaluate_s": t_ev,
                                                "pretrain_s": pre_times.get(init or "", 0.0)},
                          history=res.get("history"))
        _write_json(os.path.join(cell_dir, "cell.json"), rec)
        records.append(rec)
        new += 1
        el = time.perf_counter() - t_start
        log(f"[{i + 1}/{len(todo)}] {cell.key}: Dice {rec['dice']:.3f} (finetune {t_ft:.0f} s, "
            f"evaluate {t_ev:.0f} s; study {el / 60:.1f} min)")
        write_report(study, study_dir, finished_records(study, study_dir, data.store), len(todo))
    records = finished_records(study, study_dir, data.store)
    report = write_report(study, study_dir, records, total=len(todo))
    return {"records": records, "done": len(records), "total": len(todo), "report": report}


def cell_dir_of(study_dir: str, cell: Cell) -> str:
    return os.path.join(study_dir, "cells", cell.method, f"{cell.budget.name}-s{cell.seed}")


def resolve_cell(study: StudyConfig, study_dir: str, cell: Cell, store: str
                 ) -> tuple[Config, Optional[str]]:
    """The cell's run config and the exported pretrained model it starts from (None: the
    method has no pretraining stage, fine-tuning starts from scratch)."""
    from localcl.methods import METHODS

    init = None
    pre = _method_sections(study, cell.method).get("pretrain")
    if pre is not None and tuple(getattr(METHODS[pre["method"]["name"]], "stages", ()) or ()):
        init = os.path.join(_pretrain_dir(study, study_dir, cell), "pretrain", "model")
    return cell_config(study, cell.method, cell.budget, cell.seed, store=store, init=init), init


def _history_seconds(path: str) -> float:
    """Sum of the ``time_s`` column of a ``history.csv`` (0 when absent)."""
    try:
        with open(path) as f:
            return float(sum(float(r.get("time_s") or 0) for r in csv.DictReader(f)))
    except (OSError, ValueError):
        return 0.0


class _FileLock:
    """Exclusive ``fcntl.flock`` on ``path`` (blocking; logs once when it has to wait)."""

    def __init__(self, path: str, log: Callable[[str], None], what: str) -> None:
        self.path, self.log, self.what = path, log, what
        self.f: Any = None

    def __enter__(self) -> "_FileLock":
        import fcntl

        self.f = open(self.path, "a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.log(f"{self.what}: another driver is building it; waiting")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        import fcntl

        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _quiet(log: Callable[[str], None]) -> Callable[[str], None]:
    return lambda msg: log("    " + msg)


def _pretrain_key(study: StudyConfig, cell: Cell) -> tuple[Optional[Budget], int]:
    """(budget or None, seed) identifying the pretraining run ``cell`` starts from."""
    cfg = pretrain_config(study, cell.method, store="store.zarr", budget=None, seed=study.seeds[0])
    sees = pretrain_sees_labels(cfg.pretrain.method.name, cfg.method_config("pretrain"))
    return (cell.budget if sees else None), (cell.seed if study.pretrain_per_seed else study.seeds[0])


def _pretrain_dir(study: StudyConfig, study_dir: str, cell: Cell) -> str:
    budget, seed = _pretrain_key(study, cell)
    name = cell.method + (f"-{budget.name}" if budget else "") + f"-s{seed}"
    return os.path.join(study_dir, "pretrain", name)


def _ensure_pretrain(study: StudyConfig, study_dir: str, cell: Cell, data: Data,
                     budgets: Mapping[str, list[str]], log: Callable[[str], None]) -> float:
    """Run (or skip, when exported with the same config) the pretraining ``cell`` starts from;
    returns its wall time in seconds (0 when skipped)."""
    from ray_jobs.train import pipeline

    budget, seed = _pretrain_key(study, cell)
    run_dir = _pretrain_dir(study, study_dir, cell)
    cfg = pretrain_config(study, cell.method, store=data.store, budget=budget, seed=seed)
    if pipeline._done(os.path.join(run_dir, "pretrain", "model"), cfg):
        return 0.0
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with _FileLock(run_dir + ".lock", log, f"pretrain {os.path.basename(run_dir)}"):
        if pipeline._done(os.path.join(run_dir, "pretrain", "model"), cfg):
            return 0.0  # built by another driver while this one waited
        return _run_pretrain(cfg, data, budget, budgets, run_dir, seed, log)


def _run_pretrain(cfg: Config, data: Data, budget: Optional[Budget],
                  budgets: Mapping[str, list[str]], run_dir: str, seed: int,
                  log: Callable[[str], None]) -> float:
    """Fit and export one pretraining (the caller holds its lock); returns its wall time."""
    from ray_jobs.train import pipeline

    labelled = budgets[budget.name] if budget else []
    plan = pretrain_plan(data, cfg, labelled)
    log(f"pretrain {os.path.basename(run_dir)}: {cfg.pretrain.method.name} on "
        f"{len(plan.pretrain_cases)} case(s), "
        f"{'labels of ' + str(len(labelled)) + ' budget volume(s) visible' if labelled else 'no labels'}")
    t0 = time.perf_counter()
    pipeline.write_config(cfg, run_dir)
    pipeline.run_section(cfg, plan, run_dir, "pretrain", progress=False, log=_quiet(log))
    dt = time.perf_counter() - t0
    _write_json(os.path.join(run_dir, "pretrain.json"), {
        "method": cfg.pretrain.method.name, "labels_seen": labelled, "cases": len(plan.pretrain_cases),
        "seed": seed, "seconds": round(dt, 1), "config_hash": cfg.hash()})
    log(f"pretrain {os.path.basename(run_dir)}: done in {dt:.0f} s")
    return dt


def make_record(cell: Cell, cfg: Config, plan: Any, summary: Mapping[str, Any], data: Data,
                labelled: Sequence[str], *, pretrain: Optional[str], times: Mapping[str, float],
                history: Optional[Sequence[Mapping[str, Any]]] = None) -> dict[str, Any]:
    """One results row: mean foreground Dice/HD95/ASD over the evaluated cases and the per-class
    means (``summary.json`` of :func:`ray_jobs.evaluation.job.evaluate_store`)."""
    mean = summary.get("mean") or {}
    rec: dict[str, Any] = {
        "method": cell.method, "budget": cell.budget.name, "budget_label": cell.budget.display(),
        "seed": cell.seed, "labelled_volumes": len(labelled),
        "labelled_patients": patient_equivalents(data, labelled),
        "pretrain": cfg.pretrain.method.name if cfg.pretrain is not None else None,
        "strategy": cfg.finetune.method.name, "unlabelled_volumes": len(plan.unlabelled),
        "dice": _num(mean.get("dice")), "hd95": _num(mean.get("hd95")), "asd": _num(mean.get("asd")),
        "n_cases": summary.get("n_cases"),
    }
    for name, c in (summary.get("classes") or {}).items():
        if int(c.get("label", 0)) == 0:
            continue
        for m in ("dice", "hd95"):
            rec[f"{m}_{name}"] = _num((c.get(m) or {}).get("mean"))
    rec.update({k: round(float(v), 1) for k, v in times.items()})
    rec.update(config_hash=cfg.hash(), labelled_cases=list(labelled), pretrained_from=pretrain)
    if history:
        rec["final_loss"] = _num(history[-1].get("loss"))
    return rec


def _num(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


# --------------------------------------------------------------------------- report
def aggregate(records: Sequence[Mapping[str, Any]], baseline: str) -> list[dict[str, Any]]:
    """Per (method, budget): mean and sample sd (ddof=1; 0 for one seed) over seeds of every
    numeric metric, plus ``delta`` = mean over seeds of (method - baseline) Dice, paired by seed
    (same labelled set, same seed), with its sd."""
    import numpy as np

    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    base = {(r["budget"], r["seed"]): r for r in records if r["method"] == baseline}
    out = []
    for (method, budget), rows in groups.items():
        row: dict[str, Any] = {"method": method, "budget": budget, "n_seeds": len(rows),
                               "budget_label": rows[0]["budget_label"],
                               "labelled_patients": rows[0]["labelled_patients"],
                               "labelled_volumes": rows[0]["labelled_volumes"],
                               "pretrain": rows[0]["pretrain"], "strategy": rows[0]["strategy"]}
        keys = [k for k, v in rows[0].items() if k.startswith(("dice", "hd95", "asd"))]
        for k in keys:
            vals = np.array([r.get(k) for r in rows if r.get(k) is not None], float)
            row[k] = float(vals.mean()) if vals.size else None
            row[k + "_sd"] = float(vals.std(ddof=1)) if vals.size > 1 else 0.0 if vals.size else None
        diffs = np.array([r["dice"] - base[(budget, r["seed"])]["dice"] for r in rows
                          if (budget, r["seed"]) in base and r.get("dice") is not None
                          and base[(budget, r["seed"])].get("dice") is not None], float)
        row["delta"] = float(diffs.mean()) if diffs.size and method != baseline else None
        row["delta_sd"] = float(diffs.std(ddof=1)) if diffs.size > 1 and method != baseline else None
        row["n_paired"] = int(diffs.size)
        out.append(row)
    return out


def _f(v: Optional[float], d: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{d}f}"


def _pm(row: Mapping[str, Any], k: str, d: int = 3) -> str:
    if row.get(k) is None:
        return "n/a"
    sd = row.get(k + "_sd")
    return f"{row[k]:.{d}f} ± {sd:.{d}f}" if row.get("n_seeds", 1) > 1 and sd is not None \
        else f"{row[k]:.{d}f}"


def results_markdown(study: StudyConfig, records: Sequence[Mapping[str, Any]], total: int,
                     command: str = "") -> str:
    """The study's tables as markdown (see the module docstring)."""
    agg = aggregate(records, study.baseline)
    by = {(r["method"], r["budget"]): r for r in agg}
    methods = [study.baseline] + [m for m in study.methods if m != study.baseline]
    budgets = study.budgets
    lines = [f"### Study `{study.name}`: {len(records)} of {total} cells"
             + ("" if len(records) >= total else
                f" (**partial**: {total - len(records)} cells not finished)"),
             ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    n_cases = records[0].get("n_cases") if records else None
    lines += [f"Mean foreground Dice (RV, MYO, LV) over the {n_cases or '?'} evaluation volumes, "
              f"mean ± sd over seeds (sd with ddof=1; seeds {study.seeds}). Δ: Dice minus the "
              f"`{study.baseline}` baseline on the same budget and seed, averaged over seeds.", ""]
    head = "| method | pretraining | fine-tuning | " + " | ".join(b.display() for b in budgets) + " |"
    lines += [head, "|" + "---|" * (3 + len(budgets))]
    for m in methods:
        first = next((by[(m, b.name)] for b in budgets if (m, b.name) in by), None)
        if first is None:
            continue
        cells_txt = []
        for b in budgets:
            r = by.get((m, b.name))
            if r is None:
                cells_txt.append("—")
                continue
            txt = _pm(r, "dice")
            if r.get("delta") is not None:
                txt += f" (Δ {r['delta']:+.3f})"
            cells_txt.append(txt)
        name = f"**{m}** (baseline)" if m == study.baseline else m
        lines.append(f"| {name} | {first['pretrain'] or '—'} | {first['strategy']} | "
                     + " | ".join(cells_txt) + " |")
    classes = sorted({k[len("dice_"):] for r in records for k in r
                      if k.startswith("dice_") and not k.endswith("_sd")})
    order = {"RV": 0, "MYO": 1, "LV": 2}
    classes.sort(key=lambda c: order.get(c, 9))
    lines += ["", "Per class (Dice) and distances (mm, on the nominal header spacing):", "",
              "| method | budget | seeds | " + " | ".join(f"Dice {c}" for c in classes)
              + " | mean Dice | HD95 | ASD | Δ Dice vs baseline |",
              "|" + "---|" * (7 + len(classes))]
    for b in budgets:
        for m in methods:
            r = by.get((m, b.name))
            if r is None:
                continue
            delta = "—" if r.get("delta") is None else (
                f"{r['delta']:+.3f}" + (f" ± {r['delta_sd']:.3f}" if r.get("delta_sd") is not None else ""))
            lines.append(f"| {m} | {b.display()} | {r['n_seeds']} | "
                         + " | ".join(_pm(r, f"dice_{c}") for c in classes)
                         + f" | {_pm(r, 'dice')} | {_pm(r, 'hd95', 2)} | {_pm(r, 'asd', 2)} | {delta} |")
    lines += ["", "Published ACDC numbers (mean foreground Dice; the papers' protocol, differences "
              "below):",
              "", "| method | 1 volume | 2 volumes | 8 volumes | source |", "|---|---|---|---|---|"]
    for p in PUBLISHED:
        lines.append(f"| {p['method']} | {p['dice'][1]:.3f} | {p['dice'][2]:.3f} | "
                     f"{p['dice'][8]:.3f} | {p['source']} |")
    one = [b for b in budgets if b.cases is not None and len(b.cases) == 1]
    if one:
        lines += ["", f"Here, at the only directly comparable budget ({one[0].display()}):"]
        for p in PUBLISHED:
            r = by.get((p["method"], one[0].name))
            if r is not None:
                lines.append(f"- {p['method']}: {_pm(r, 'dice')} here vs {p['dice'][1]:.3f} published")
    lines += ["", "Protocol differences to the published numbers:", ""] + [
        f"- {n}" for n in PROTOCOL_NOTES]
    verdict = verdict_lines(study, agg)
    if verdict:
        lines += ["", "Against the baseline:", ""] + verdict
    if study.notes:
        lines += ["", "Settings of this study:", ""] + [f"- {n}" for n in study.notes]
    return "\n".join(lines) + "\n"


def verdict_lines(study: StudyConfig, agg: Sequence[Mapping[str, Any]]) -> list[str]:
    """One plain sentence per method: the budgets where its mean Dice is above / not above the
    baseline's (paired by seed)."""
    out = []
    for m in study.methods:
        if m == study.baseline:
            continue
        rows = [r for r in agg if r["method"] == m and r.get("delta") is not None]
        if not rows:
            continue
        above = [f"{r['budget_label']} ({r['delta']:+.3f})" for r in rows if r["delta"] > 0]
        below = [f"{r['budget_label']} ({r['delta']:+.3f})" for r in rows if r["delta"] <= 0]
        if not below:
            s = f"- {m}: above the baseline at every budget run: {', '.join(above)}"
        elif not above:
            s = f"- {m}: does **not** beat the baseline at any budget run: {', '.join(below)}"
        else:
            s = (f"- {m}: above the baseline at {', '.join(above)}; not above at "
                 f"{', '.join(below)}")
        n = min(r["n_paired"] for r in rows)
        out.append(s + f" (paired over {n} seed{'s' * (n != 1)}).")
    return out


def curve_png(study: StudyConfig, records: Sequence[Mapping[str, Any]]) -> bytes:
    """Dice vs labelled patients (log x; 1 ACDC volume = 0.5 patient), one line per method
    (baseline dashed black), error bars = sd over seeds (ddof=1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agg = aggregate(records, study.baseline)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    methods = [study.baseline] + [m for m in study.methods if m != study.baseline]
    colours = plt.get_cmap("tab10").colors
    xs_all: dict[float, str] = {}
    for i, m in enumerate(methods):
        rows = sorted((r for r in agg if r["method"] == m and r.get("dice") is not None),
                      key=lambda r: r["labelled_patients"])
        if not rows:
            continue
        x = [r["labelled_patients"] for r in rows]
        y = [r["dice"] for r in rows]
        e = [r.get("dice_sd") or 0.0 for r in rows]
        for r in rows:
            xs_all[r["labelled_patients"]] = r["budget_label"]
        base = m == study.baseline
        ax.errorbar(x, y, yerr=e, marker="o", ms=4, capsize=3, lw=2.2 if base else 1.4,
                    ls="--" if base else "-", color="black" if base else colours[i % 10],
                    label=f"{m} (baseline)" if base else m)
    ax.set_ylim(0.0, 1.0)
    ax.set_xscale("log")
    ticks = sorted(xs_all)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{xs_all[t]}\n({t:g})" for t in ticks], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("labelled patients (1 ACDC volume = 0.5)")
    ax.set_ylabel("mean foreground Dice (val)")
    n = max((r["n_seeds"] for r in agg), default=0)
    ax.set_title(f"{study.name}: label efficiency (mean ± sd over {n} seed{'s' * (n != 1)})",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


CSV_FIRST = ("method", "budget", "seed", "labelled_volumes", "labelled_patients", "pretrain",
             "strategy", "dice", "hd95", "asd")


def write_report(study: StudyConfig, study_dir: str, records: Sequence[Mapping[str, Any]],
                 total: int, command: str = "") -> dict[str, str]:
    """results.json, results.csv, results.md, curve.png in STUDY_DIR; returns their paths."""
    recs = list(records)
    paths = {k: os.path.join(study_dir, f) for k, f in (
        ("json", "results.json"), ("csv", "results.csv"), ("md", "results.md"),
        ("png", "curve.png"))}
    _write_json(paths["json"], {"study": study.name, "config_hash": study.hash(), "done": len(recs),
                                "total": total, "partial": len(recs) < total,
                                "aggregate": aggregate(recs, study.baseline), "cells": recs})
    keys = list(CSV_FIRST) + sorted({k for r in recs for k in r if k not in CSV_FIRST
                                     and not isinstance(r[k], (list, dict))})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in recs:
        w.writerow({k: r.get(k) for k in keys})
    Path(paths["csv"]).write_text(buf.getvalue())
    cmd = command or _read_command(study_dir)
    Path(paths["md"]).write_text(results_markdown(study, recs, total, cmd))
    if recs:
        Path(paths["png"]).write_bytes(curve_png(study, recs))
    return paths


def _store_uri(uri: str) -> str:
    return uri if "://" in uri else os.path.abspath(uri)


def _read_command(study_dir: str) -> str:
    try:
        return Path(study_dir, "command.txt").read_text().strip()
    except OSError:
        return ""


def finished_records(study: StudyConfig, study_dir: str, store: str) -> list[dict[str, Any]]:
    """The ``cell.json`` of every finished cell whose config hash matches the study's cell
    config, in cell order."""
    recs = []
    for cell in cells(study):
        r = _read_json(os.path.join(cell_dir_of(study_dir, cell), "cell.json"))
        if r is not None and r.get("config_hash") == resolve_cell(study, study_dir, cell,
                                                                  _store_uri(store))[0].hash():
            recs.append(r)
    return recs


def report_only(study: StudyConfig, study_dir: str) -> dict[str, Any]:
    """Rewrite the report from the finished cells (no training, no Ray)."""
    cfg_path = os.path.join(study_dir, "study.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"--study-dir {study_dir}: no study.yaml (not a study directory)")
    store = (study.base.get("data") or {}).get("store") or os.path.join(study_dir, "store.zarr")
    recs = finished_records(study, study_dir, store)
    return {"records": recs, "report": write_report(study, study_dir, recs, len(cells(study)))}


__all__ = ["Budget", "Cell", "PUBLISHED", "StudyConfig", "aggregate", "budget_cases", "cells",
           "cell_config", "check_study", "curve_png", "load_study", "pretrain_config",
           "pretrain_sees_labels", "report_only", "results_markdown", "run_study",
           "write_report"]
