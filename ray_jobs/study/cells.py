"""One study cell (``method x budget x seed``): the data it draws from, its labelled cases and
plans, its run directory and config, the shared pretraining it starts from, and its record.
"""

from __future__ import annotations

import csv
import fcntl
import json
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import storage
from localcl.methods import METHODS
from ray_jobs.config import Config
from ray_jobs.errors import UserError
from ray_jobs.study.spec import (
    Budget,
    StudyConfig,
    cell_config,
    method_sections,
    pretrain_config,
    pretrain_owner,
)
from ray_jobs.train import pipeline
from ray_jobs.train.stage import Plan, stage_done
from storage.remote import absolute_uri, join_uri, uri_exists


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
    dcfg = study.base.get("data") or {}
    so = dcfg.get("storage_options") or None
    uri = absolute_uri(dcfg.get("store") or join_uri(study_dir, "store.zarr"))
    if not uri_exists(uri) or not pipeline.has_cases(uri, so):
        if not dcfg.get("source"):
            raise UserError(f"base.data.store: {uri} does not exist and base.data.source is not set")
        log(f"ingesting {dcfg['source']} -> {uri}")
        rep = storage.ingest(dcfg["source"], uri, storage_options=so, workers=2, progress=False)
        if rep.failed:
            raise UserError(
                f"base.data.source: {len(rep.failed)} case(s) failed to ingest, first: {rep.failed[0].error}"
            )
    st = storage.open_store(uri, storage_options=so)
    cat = st.catalog
    sp = dcfg.get("splits") or {}
    pool_name, test_name = sp.get("pool", "train"), sp.get("test", "val")
    for k, name in (("pool", pool_name), ("test", test_name)):
        if name not in cat.splits:
            raise UserError(f"base.data.splits.{k}: split {name!r} not in the store (has {sorted(cat.splits)})")
    lab = set(st.labelled_cases)
    test = [c for c in cat.splits[test_name] if c in lab]
    if dcfg.get("max_test_cases"):
        test = test[: int(dcfg["max_test_cases"])]
    if not test:
        raise UserError(f"base.data.splits.test: no labelled cases in split {test_name!r}")
    pool = list(cat.splits[pool_name])
    names = {str(k): str(v) for k, v in (st.meta(test[0]).get("label_names") or {}).items()}
    num_classes = (study.base.get("model") or {}).get("num_classes") or (max(int(k) for k in names) + 1 if names else 0)
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
            return list(data.catalog.label_budget(budget.patients, seed=label_seed, pool=pool))
        except ValueError as exc:
            raise UserError(f"budgets.{budget.name}.patients: {exc}") from None
    try:
        return list(data.catalog.named_budget(budget.cases or [], pool=pool))
    except ValueError as exc:
        raise UserError(f"budgets.{budget.name}.cases: {exc}") from None


def patient_equivalents(data: Data, cases: Sequence[str]) -> float:
    """Labelled patients of a budget, counting a patient with k of its m labelled pool volumes
    as k/m (ACDC: one ED volume = 0.5 patient)."""
    per: dict[str, int] = {}
    for c in cases:
        p = data.catalog.patient_of(c)
        per[p] = per.get(p, 0) + 1
    return float(sum(k / max(data.frames.get(p, k), 1) for p, k in per.items()))


def cell_plan(data: Data, cfg: Config, labelled: list[str], *, use_unlabelled: bool) -> Plan:
    """A :class:`~ray_jobs.train.stage.Plan` for one fine-tuning cell: no validation cases (last
    epoch kept), the evaluation split as ``test``."""
    unl = data.catalog.unlabelled_pool(labelled, pool=cfg.data.splits.pool) if use_unlabelled else []
    if cfg.data.max_unlabelled is not None:
        unl = unl[: cfg.data.max_unlabelled]
    return Plan(
        data.store,
        data.num_classes,
        data.label_names,
        list(labelled),
        list(unl),
        sorted(set(labelled) | set(unl)),
        [],
        list(data.test),
    )


def pretrain_plan(data: Data, cfg: Config, labelled: list[str]) -> Plan:
    """Pretraining plan: ``labelled`` (label-aware methods: the budget) keep their labels, every
    other pool case is hidden (-1); label-free methods get ``labelled == []``. Pretraining uses
    the whole pool (``data.max_unlabelled`` caps only the fine-tuning pools)."""
    unl = data.catalog.unlabelled_pool(labelled, pool=cfg.data.splits.pool) if labelled else list(data.pool)
    return Plan(
        data.store,
        data.num_classes,
        data.label_names,
        list(labelled),
        list(unl),
        sorted(set(labelled) | set(unl)),
        [],
        [],
    )


# --------------------------------------------------------------------------- run
def read_json(path: str) -> dict[str, Any] | None:
    try:
        with open(path) as f:
            out: dict[str, Any] = json.load(f)
            return out
    except (OSError, ValueError):
        return None


def write_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a reader (another
    driver of the study) sees the old file or the new one, never a half-written one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, default=str))


def cell_dir_of(study_dir: str, cell: Cell) -> str:
    return os.path.join(study_dir, "cells", cell.method, f"{cell.budget.name}-s{cell.seed}")


def resolve_cell(study: StudyConfig, study_dir: str, cell: Cell, store: str) -> tuple[Config, str | None]:
    """The cell's run config and the exported pretrained model it starts from (None: the
    method has no pretraining stage, fine-tuning starts from scratch)."""

    init = None
    pre = method_sections(study, cell.method).get("pretrain")
    if pre is not None and tuple(getattr(METHODS[pre["method"]["name"]], "stages", ()) or ()):
        init = os.path.join(pretrain_dir(study, study_dir, cell), "pretrain", "model")
    return cell_config(study, cell.method, cell.budget, cell.seed, store=store, init=init), init


def history_seconds(path: str) -> float:
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

    def __enter__(self) -> _FileLock:
        self.f = open(self.path, "a")
        try:
            fcntl.flock(self.f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.log(f"{self.what}: another driver is building it; waiting")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def quiet_log(log: Callable[[str], None]) -> Callable[[str], None]:
    return lambda msg: log("    " + msg)


def _pretrain_key(study: StudyConfig, cell: Cell) -> tuple[Budget | None, int]:
    """(budget or None, seed) identifying the pretraining run ``cell`` starts from."""
    cfg = pretrain_config(study, cell.method, store="store.zarr", budget=None, seed=study.seeds[0])
    # label-reading pretraining (MixCL, LRC supervised) runs per budget on that budget's labels
    assert cfg.pretrain is not None
    sees = METHODS[cfg.pretrain.method.name].pretrain_reads_labels(cfg.method_config("pretrain"))
    return (cell.budget if sees else None), (cell.seed if study.pretrain_per_seed else study.seeds[0])


def pretrain_dir(study: StudyConfig, study_dir: str, cell: Cell) -> str:
    budget, seed = _pretrain_key(study, cell)
    name = pretrain_owner(study, cell.method) + (f"-{budget.name}" if budget else "") + f"-s{seed}"
    return os.path.join(study_dir, "pretrain", name)


def ensure_pretrain(
    study: StudyConfig,
    study_dir: str,
    cell: Cell,
    data: Data,
    budgets: Mapping[str, list[str]],
    log: Callable[[str], None],
) -> float:
    """Run (or skip, when exported with the same config) the pretraining ``cell`` starts from;
    returns its wall time in seconds (0 when skipped)."""
    budget, seed = _pretrain_key(study, cell)
    run_dir = pretrain_dir(study, study_dir, cell)
    cfg = pretrain_config(study, cell.method, store=data.store, budget=budget, seed=seed)
    if stage_done(os.path.join(run_dir, "pretrain", "model"), cfg):
        return 0.0
    os.makedirs(os.path.dirname(run_dir), exist_ok=True)
    with _FileLock(run_dir + ".lock", log, f"pretrain {os.path.basename(run_dir)}"):
        if stage_done(os.path.join(run_dir, "pretrain", "model"), cfg):
            return 0.0  # built by another driver while this one waited
        return _run_pretrain(cfg, data, budget, budgets, run_dir, seed, log)


def _run_pretrain(
    cfg: Config,
    data: Data,
    budget: Budget | None,
    budgets: Mapping[str, list[str]],
    run_dir: str,
    seed: int,
    log: Callable[[str], None],
) -> float:
    """Fit and export one pretraining (the caller holds its lock); returns its wall time."""
    labelled = budgets[budget.name] if budget else []
    plan = pretrain_plan(data, cfg, labelled)
    assert cfg.pretrain is not None
    log(
        f"pretrain {os.path.basename(run_dir)}: {cfg.pretrain.method.name} on "
        f"{len(plan.pretrain_cases)} case(s), "
        f"{'labels of ' + str(len(labelled)) + ' budget volume(s) visible' if labelled else 'no labels'}"
    )
    t0 = time.perf_counter()
    pipeline.write_config(cfg, run_dir)
    pipeline.run_section(cfg, plan, run_dir, "pretrain", progress=False, log=quiet_log(log))
    dt = time.perf_counter() - t0
    write_json(
        os.path.join(run_dir, "pretrain.json"),
        {
            "method": cfg.pretrain.method.name if cfg.pretrain else None,
            "labels_seen": labelled,
            "cases": len(plan.pretrain_cases),
            "seed": seed,
            "seconds": round(dt, 1),
            "config_hash": cfg.hash(),
        },
    )
    log(f"pretrain {os.path.basename(run_dir)}: done in {dt:.0f} s")
    return dt


def compute_of(cfg: Config) -> dict[str, int]:
    """The compute a cell's numbers cost, in optimiser steps and slices seen.

    ``finetune_steps``: epochs x steps per epoch, times ``1 + rounds`` for self-training (PLCL:
    round 0 plus its rounds); ``labelled_views`` / ``unlabelled_views``: slices drawn by those
    steps (``batch_size`` and ``unlabelled_batch_size`` each; the supervised strategy draws no
    unlabelled slices); ``pretrain_steps``: the sum over the pretraining's method stages (0
    without pretraining). Pretraining is amortised: one pretraining serves every budget and
    seed that shares it.
    """
    ft = cfg.finetune
    assert ft is not None
    sch = ft.schedule
    rounds = 1 + (ft.self_training.rounds if ft.self_training is not None and ft.method.name == "plcl" else 0)
    steps = sch.epochs * sch.steps_per_epoch * rounds
    ub = 0 if ft.method.name == "supervised" else (sch.unlabelled_batch_size or sch.batch_size)
    pre = 0
    if cfg.pretrain is not None:
        for stage in tuple(METHODS[cfg.pretrain.method.name].stages) or (None,):
            ps = cfg.schedule_for("pretrain", stage)
            pre += ps.epochs * ps.steps_per_epoch
    return {
        "finetune_steps": steps,
        "labelled_views": steps * sch.batch_size,
        "unlabelled_views": steps * ub,
        "pretrain_steps": pre,
    }


def make_record(
    cell: Cell,
    cfg: Config,
    plan: Any,
    summary: Mapping[str, Any],
    data: Data,
    labelled: Sequence[str],
    *,
    pretrain: str | None,
    times: Mapping[str, float],
    history: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """One results row: mean foreground Dice/HD95/ASD over the evaluated cases and the per-class
    means (``summary.json`` of :func:`ray_jobs.evaluation.job.evaluate_store`)."""
    mean = summary.get("mean") or {}
    rec: dict[str, Any] = {
        "method": cell.method,
        "budget": cell.budget.name,
        "budget_label": cell.budget.display(),
        "seed": cell.seed,
        "labelled_volumes": len(labelled),
        "labelled_patients": patient_equivalents(data, labelled),
        "pretrain": cfg.pretrain.method.name if cfg.pretrain is not None else None,
        "strategy": cfg.finetune.method.name if cfg.finetune else None,
        "unlabelled_volumes": len(plan.unlabelled),
        "dice": _num(mean.get("dice")),
        "hd95": _num(mean.get("hd95")),
        "asd": _num(mean.get("asd")),
        "n_cases": summary.get("n_cases"),
        **compute_of(cfg),
    }
    for name, c in (summary.get("classes") or {}).items():
        if int(c.get("label", 0)) == 0:
            continue
        for m in ("dice", "hd95"):
            rec[f"{m}_{name}"] = _num((c.get(m) or {}).get("mean"))
    for name, st in (summary.get("streams") or {}).items():  # multi-stream models: each alone
        rec[f"{name}_dice"] = _num((st or {}).get("mean"))
    rec.update({k: round(float(v), 1) for k, v in times.items()})
    rec.update(config_hash=cfg.hash(), labelled_cases=list(labelled), pretrained_from=pretrain)
    if history:
        rec["final_loss"] = _num(history[-1].get("loss"))
    return rec


def _num(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None
