"""Label-efficiency study: methods x label budgets x seeds, one command, resumable per cell.

A study is a driver over the pipeline functions of ``localcl run`` (:mod:`ray_jobs.train.pipeline`):
it builds one validated run :class:`~ray_jobs.config.Config` per cell, fits it with
:func:`pipeline.run_section`, evaluates it with :func:`ray_jobs.train.run_eval.evaluate_models` and writes the
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

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ray_jobs.errors import UserError
from ray_jobs.study.cells import (
    budget_cases,
    cell_dir_of,
    cell_plan,
    cells,
    ensure_pretrain,
    history_seconds,
    make_record,
    open_data,
    quiet_log,
    read_json,
    resolve_cell,
    write_atomic,
    write_json,
)
from ray_jobs.study.diagnostics import encoder_diagnostics
from ray_jobs.study.report import finished_records, write_report
from ray_jobs.study.spec import StudyConfig, load_study
from ray_jobs.train import pipeline
from ray_jobs.train.run_eval import evaluate_models


def prepare_study_dir(study: StudyConfig, study_dir: str, resume: bool) -> None:
    """Write STUDY_DIR/study.yaml; an existing study needs ``resume`` and the same config, and
    is left as it is. The file is replaced atomically: several drivers share a study directory
    and read it while another one starts."""
    if "://" in study_dir:
        raise UserError(
            f"--study-dir {study_dir}: a study directory must be a local path "
            f"(cells run in Ray Train local mode or on a shared volume)"
        )
    path = os.path.join(study_dir, "study.yaml")
    if os.path.exists(path):
        if not resume:
            raise UserError(
                f"{study_dir} holds a study already; pass --resume to continue it "
                f"(finished cells are skipped) or choose another --study-dir"
            )
        try:
            old = load_study(yaml.safe_load(Path(path).read_text()) or {})
        except UserError as exc:
            raise UserError(f"{path}: cannot read the existing study ({exc})") from None
        if old.hash() != study.hash():
            raise UserError(
                f"{study_dir} holds a study with a different config; --resume needs "
                f"the same config (or choose another --study-dir)"
            )
        return
    write_atomic(path, yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False))


def _diagnostics(
    study: StudyConfig,
    study_dir: str,
    cfg: Any,
    data: Any,
    budget: str,
    labelled: Sequence[str],
    init: str | None,
) -> dict[str, Any]:
    """``{"encoder": diagnosis of the cell's pretrained encoder (None without pretraining),
    "encoder_random": the random encoder's}`` on the cell's budget (cached per encoder)."""
    args = (study_dir, cfg, data.store, data.num_classes, budget, labelled, data.test)
    mcfg = cfg.method_config("finetune")
    rand_key = f"random:{tuple(mcfg.widths)}:{mcfg.norm}:{cfg.data.seed}:{tuple(cfg.data.size)}"
    out: dict[str, Any] = {"encoder_random": encoder_diagnostics(*args, None, rand_key), "encoder": None}
    if init is not None:
        pre = read_json(os.path.join(os.path.dirname(os.path.dirname(init)), "pretrain.json")) or {}
        out["encoder"] = encoder_diagnostics(*args, init, str(pre.get("config_hash", "?")))
    return out


def _refuse_unknown(flag: str, given: Sequence[Any] | None, known: Sequence[Any]) -> None:
    """UserError when ``given`` (a ``--only-seed``/``--only-method`` list) names what the study
    does not have, e.g. ``--only-seed: [7] not in the study's seeds [0]``."""
    unknown = sorted(set(given or ()) - set(known))
    if unknown:
        raise UserError(f"{flag}: {unknown} not in the study's {flag.removeprefix('--only-')}s {list(known)}")


def run_study(
    study: StudyConfig,
    study_dir: str,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    max_cells: int | None = None,
    only_seeds: Sequence[int] | None = None,
    only_methods: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run every unfinished cell, rewriting the report after each. Ray must be initialised.
    ``max_cells``: stop after that many newly finished cells (the report says 'partial').
    ``only_seeds``: run only the cells of these seeds, so several drivers can share one study
    directory (``--only-seed``; a shared pretraining is built by one of them under a file
    lock, the others wait for it). ``only_methods``: likewise for ``methods`` keys
    (``--only-method``). The report is rebuilt from every finished ``cell.json``.
    Returns ``{"records": [...], "done": n, "total": N, "report": {...}}``."""
    _refuse_unknown("--only-seed", only_seeds, study.seeds)
    _refuse_unknown("--only-method", only_methods, sorted(study.methods))
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
        done = read_json(os.path.join(cell_dir, "cell.json"))
        if done and done.get("config_hash") == cfg.hash():
            records.append(done)
            continue
        if only_seeds is not None and cell.seed not in only_seeds:
            continue
        if only_methods is not None and cell.method not in only_methods:
            continue
        if max_cells is not None and new >= max_cells:
            break
        if init is not None:
            pre_times.setdefault(init, ensure_pretrain(study, study_dir, cell, data, budgets, log))
        t0 = time.perf_counter()
        assert cfg.finetune is not None  # every cell fine-tunes (check_study)
        strategy = cfg.finetune.method.name
        log(f"[{i + 1}/{len(todo)}] {cell.key}: {len(labelled)} labelled volume(s), {strategy} fine-tuning")
        plan = cell_plan(data, cfg, labelled, use_unlabelled=strategy != "supervised")
        pipeline.write_config(cfg, cell_dir)
        quiet = quiet_log(log)
        res = pipeline.run_section(
            cfg,
            plan,
            cell_dir,
            "finetune",
            init=({"kind": "backbone", "dir": init} if init else None),
            progress=False,
            log=quiet,
        )
        t_ft = time.perf_counter() - t0
        if res.get("history") is None:  # exported by an interrupted earlier run: its epoch times
            t_ft = history_seconds(os.path.join(cell_dir, "finetune", "history.csv"))
        t1 = time.perf_counter()
        ev = evaluate_models(cfg, plan, cell_dir, log=quiet)
        t_ev = time.perf_counter() - t1
        diag = _diagnostics(study, study_dir, cfg, data, cell.budget.name, labelled, init) if study.diagnostics else {}
        pipeline.write_run_card(
            cfg,
            plan,
            cell_dir,
            metrics=ev,
            extra={
                "timings_s": {"finetune": round(t_ft, 1), "evaluate": round(t_ev, 1)},
                "study": study.name,
                "pretrained_from": init,
            },
        )
        rec = make_record(
            cell,
            cfg,
            plan,
            ev["method"],
            data,
            labelled,
            pretrain=init,
            times={"finetune_s": t_ft, "evaluate_s": t_ev, "pretrain_s": pre_times.get(init or "", 0.0)},
            history=res.get("history"),
        )
        rec.update(diag)
        write_json(os.path.join(cell_dir, "cell.json"), rec)
        records.append(rec)
        new += 1
        el = time.perf_counter() - t_start
        log(
            f"[{i + 1}/{len(todo)}] {cell.key}: Dice {rec['dice']:.3f} (finetune {t_ft:.0f} s, "
            f"evaluate {t_ev:.0f} s; study {el / 60:.1f} min)"
        )
        write_report(study, study_dir, finished_records(study, study_dir, data.store), len(todo))
    records = finished_records(study, study_dir, data.store)
    report = write_report(study, study_dir, records, total=len(todo))
    return {"records": records, "done": len(records), "total": len(todo), "report": report}
