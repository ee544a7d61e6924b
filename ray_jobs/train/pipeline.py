"""The main job: (ingest) -> pretrain -> fine-tune -> evaluate, plus the supervised baseline.

The run directory layout and the stage API are in :mod:`ray_jobs.train.stage`. Stages whose
``<stage>/model/model.json`` exists with the same config hash are skipped, and an interrupted
stage resumes from its last checkpoint (same Ray run name and storage path), so re-running the
same command continues a run.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import fsspec
import ray
import yaml

import storage
from localcl.losses.lrc import felzenszwalb_superpixels
from localcl.methods import METHODS
from ray_jobs.config import Config, validate
from ray_jobs.errors import UserError
from ray_jobs.evaluation.model_card import build_model_card, write_model_card
from ray_jobs.train.checkpoint import read_spec
from ray_jobs.train.run_eval import chain_summaries, eval_after_chain, evaluate_models
from ray_jobs.train.self_training import run_self_training
from ray_jobs.train.stage import (
    STAGE_DIRS,
    ChainStep,
    Plan,
    export_stage,
    loop_spec,
    stage_done,
    stage_model_dir,
    write_history,
)
from ray_jobs.train.trainer import fit_chain, fit_stage, worker_runtime_env, write_tensorboard
from storage.remote import absolute_uri, join_uri, uri_exists


def resolve_run_dir(cfg: Config, run_dir: str | None) -> str:
    return absolute_uri(run_dir or cfg.run_dir or os.path.join("runs", cfg.name))


def prepare_data(cfg: Config, run_dir: str, log: Callable[[str], None] = print) -> Plan:
    """Open (or ingest) the store and draw the label budget, the unlabelled pool and the
    validation/test cases from the catalog. A relative local store path is made absolute here,
    on the driver: Ray Train workers run in another working directory."""
    so = cfg.data.storage_options or None
    uri = absolute_uri(cfg.data.store or join_uri(run_dir, "store.zarr"))
    if not uri_exists(uri) or not has_cases(uri, so):
        if not cfg.data.source:
            raise UserError(f"data.store: {uri} does not exist and data.source is not set")
        log(f"ingesting {cfg.data.source} -> {uri}")
        storage.ingest(cfg.data.source, uri, storage_options=so, workers=2)
    st = storage.open_store(uri, storage_options=so)
    cat = st.catalog
    sp = cfg.data.splits
    for key, name in (("pool", sp.pool), ("val", sp.val), ("test", cfg.evaluate.split or sp.test)):
        if name is not None and name not in cat.splits:
            raise UserError(f"data.splits.{key}: split {name!r} not in the store (has {sorted(cat.splits)})")
    labelled = budget_cases(cfg, cat, uri)
    unlabelled = cat.unlabelled_pool(labelled, pool=sp.pool)
    if cfg.data.max_unlabelled is not None:
        unlabelled = unlabelled[: cfg.data.max_unlabelled]
    pretrain_cases = sorted(set(labelled) | set(unlabelled))
    val = [c for c in (cat.splits[sp.val] if sp.val else []) if c in st.labelled_cases]
    if cfg.data.max_val_cases is not None:
        val = val[: cfg.data.max_val_cases]
    test = [c for c in cat.splits[cfg.evaluate.split or sp.test] if c in st.labelled_cases]
    if cfg.data.max_test_cases is not None:
        test = test[: cfg.data.max_test_cases]
    names = st.meta(labelled[0]).get("label_names") or {}
    names = {str(k): str(v) for k, v in names.items()}
    num_classes = cfg.model.num_classes or (max(int(k) for k in names) + 1 if names else 0)
    if num_classes < 2:
        raise UserError("model.num_classes: cannot infer from the store's label names; set it")
    fp = st.attrs.get("fingerprint") or st.attrs.get("store_fingerprint") or ""
    return Plan(uri, num_classes, names, labelled, unlabelled, pretrain_cases, val, test, str(fp))


def budget_cases(cfg: Config, cat: Any, uri: str) -> list[str]:
    """The labelled volumes of the run: ``data.label_cases`` as given (each must be a labelled
    case of the pool split), else ``data.label_budget`` patients drawn by the catalog."""
    pool = cfg.data.splits.pool
    if cfg.data.label_cases is None:
        return list(cat.label_budget(cfg.data.label_budget, seed=cfg.data.seed, pool=pool))
    try:
        return list(cat.named_budget(cfg.data.label_cases, pool=pool))
    except ValueError as exc:
        raise UserError(f"data.label_cases: {exc} in {uri}") from None


def describe_budget(cfg: Config, labelled: Sequence[str]) -> str:
    """'2 labelled patient(s)' or, with ``data.label_cases``, '1 labelled volume(s)'."""
    if cfg.data.label_cases is not None:
        return f"{len(labelled)} labelled volume(s)"
    return f"{cfg.data.label_budget} labelled patient(s)"


def has_cases(uri: str, so: Any) -> bool:
    """Whether ``uri`` is a store holding at least one case."""
    try:
        return len(storage.open_store(uri, storage_options=so).cases) > 0
    except Exception:
        return False


def run_section(
    cfg: Config,
    plan: Plan,
    run_dir: str,
    section: str,
    *,
    init: dict[str, Any] | None = None,
    hooks: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Fit ``section`` ("pretrain" | "finetune" | "baseline"), export its model, write
    ``history.csv``. Returns ``{"model_dir", "history", "results"}``.

    A fine-tune stage with ``self_training`` runs PLCL's rounds
    (:func:`ray_jobs.train.self_training.run_self_training`); its round-0 teacher is the
    baseline stage when the run has one and no initialisation."""
    if section == "finetune" and cfg.finetune is not None and cfg.finetune.self_training is not None:
        teacher = None
        if (
            init is None
            and cfg.baseline is not None
            and not stage_done(join_uri(run_dir, STAGE_DIRS["finetune"], "model"), cfg)
        ):
            teacher = run_section(cfg, plan, run_dir, "baseline", hooks=hooks, progress=progress, log=log)["model_dir"]
        return run_self_training(
            cfg, plan, run_dir, init=init, teacher=teacher, hooks=hooks, callbacks=callbacks, progress=progress, log=log
        )
    sdir = STAGE_DIRS[section]
    model_dir = join_uri(run_dir, sdir, "model")
    if stage_done(model_dir, cfg):
        log(f"{sdir}: already done ({model_dir}), skipping")
        return {"model_dir": model_dir, "history": None, "results": {}}
    method_cls = METHODS[cfg.pretrain.method.name] if section == "pretrain" and cfg.pretrain else None
    if section == "pretrain" and needs_superpixels(cfg):
        ensure_superpixels(cfg, plan, log)
    mstages: list[str | None] = [None]
    if method_cls is not None:
        mstages = list(method_cls.stages or [None])
    results, history = {}, []
    for i, ms in enumerate(mstages):
        suffix = "" if ms in (None, "main") or len(mstages) == 1 else f"-{ms}"
        this_init = init
        if i > 0:  # next method stage starts from the previous one's weights (GLCL local)
            this_init = {"kind": "state", "dir": join_uri(run_dir, sdir, f"stage-{mstages[i - 1]}")}
        spec = loop_spec(cfg, plan, section, init=this_init, hooks=hooks, method_stage=ms)  # type: ignore[arg-type]
        log(f"{sdir}{suffix}: {cfg.scaling.num_workers} worker(s), {cfg.schedule_for(section, ms).epochs} epoch(s)")
        res = fit_stage(
            cfg,
            spec,
            run_dir,
            sdir,
            run_name=f"{cfg.name}-{sdir}{suffix}",
            progress=progress,
            callbacks=list(callbacks) if section != "pretrain" else [],
        )
        results[ms or "main"] = res
        history += [dict(r, stage=ms) if ms and len(mstages) > 1 else r for r in res.history]
        if len(mstages) > 1 and i < len(mstages) - 1:
            export_stage(cfg, plan, section, res.checkpoint_dir, join_uri(run_dir, sdir, f"stage-{ms}"))
        last = res
    write_history(run_dir, sdir, history)
    if cfg.logging.tensorboard:
        write_tensorboard(run_dir, sdir, history)
    export_stage(cfg, plan, section, last.checkpoint_dir, model_dir)
    return {"model_dir": model_dir, "history": history, "results": results}


def superpixel_task(uri: str, case: str, kwargs: dict[str, Any], so: Any) -> list[str]:
    """One case's super-pixel cache (a Ray task)."""
    fn = functools.partial(felzenszwalb_superpixels, **kwargs)
    return list(storage.cache_derived(uri, "superpixels", fn, cases=[case], storage_options=so)["computed"])


def needs_superpixels(cfg: Config) -> bool:
    """Whether the run's pretraining reads super-pixel maps (LRC's ``slices+superpixels`` batches)."""
    return cfg.pretrain is not None and METHODS[cfg.pretrain.method.name].pretrain_batch == "slices+superpixels"


def ensure_superpixels(cfg: Config, plan: Plan, log: Callable[[str], None] = print) -> list[str]:
    """Cache Felzenszwalb super-pixels (``localcl.losses.lrc.felzenszwalb_superpixels`` on the
    normalised native slice, via ``storage.cache_derived``, with the parameters the method
    declares in ``superpixel_params``) as the derived array ``superpixels`` of every
    pretraining case that lacks it: one Ray task per case (1 CPU). Inside a placement group (a
    Tune trial: its bundles hold the trial's workers, not CPUs for tasks, and a task would not
    fit) the cases are computed in this process instead. Cached maps are reused whatever their
    parameters (the store records ``fn`` in the array's attributes); delete the array to
    recompute. ``localcl tune`` calls this in its driver before any trial starts. Returns the
    cases computed."""
    so = cfg.data.storage_options or None
    st = storage.open_store(plan.store, storage_options=so)
    todo = [c for c in plan.pretrain_cases if not st.has_array(c, "superpixels")]
    if not todo:
        return []
    assert cfg.pretrain is not None
    kwargs = METHODS[cfg.pretrain.method.name].superpixel_params(cfg.method_config("pretrain"))
    log(f"superpixels: {len(todo)} case(s) (felzenszwalb {kwargs or 'defaults'})")
    if ray.is_initialized() and ray.util.get_current_placement_group() is not None:
        return [c for case in todo for c in superpixel_task(plan.store, case, kwargs, so)]
    task = ray.remote(num_cpus=1, runtime_env=worker_runtime_env() or None)(superpixel_task)  # type: ignore[arg-type]  # ray.remote annotates runtime_env as Dict; its option check accepts None
    done = ray.get([task.remote(plan.store, c, kwargs, so) for c in todo])
    return [c for part in done for c in part]


def write_config(cfg: Config, run_dir: str, force: bool = False) -> None:
    """Write RUN_DIR/config.yaml; refuse to reuse a run dir holding a different config."""
    fs, root = fsspec.core.url_to_fs(run_dir)
    path = join_uri(root, "config.yaml")
    if fs.exists(path) and not force:
        with fs.open(path, "r") as f:
            old = yaml.safe_load(f) or {}
        try:
            same = validate(old).hash() == cfg.hash()
        except UserError:
            same = False
        if not same:
            raise UserError(
                f"{run_dir} holds a run with a different config; pass another "
                f"--run-dir (or --set name=...) to start a new run"
            )
    fs.makedirs(root, exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(cfg.to_yaml())


def run_stages(
    cfg: Config,
    run_dir: str,
    stages: Sequence[str] = ("pretrain", "finetune"),
    finetune_callbacks: Sequence[Any] = (),
    progress: bool = True,
    hooks: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
    card: bool = True,
    evaluate: bool = False,
) -> dict[str, Any]:
    """Run the training stages in order (pretrain -> finetune, baseline). Fine-tuning starts
    from ``finetune.init`` when set, else from the pretrained backbone when a pretrain stage is
    configured, else from scratch. Writes the model card (without metrics) when ``card``.
    ``evaluate``: when the stages train in one worker group, its workers evaluate the models
    too (:func:`ray_jobs.train.run_eval.eval_after_chain`; ``out["eval"]``).
    Returns ``{"plan": Plan, "timings": {section: s}, section: run_section(...) result}``."""
    plan = prepare_data(cfg, run_dir, log)
    write_config(cfg, run_dir)
    out: dict[str, Any] = {"plan": plan, "timings": {}}
    for section in stages:
        if getattr(cfg, section) is None:
            raise UserError(f"{section}: this config has no '{section}' section")
    chain = chain_sections(cfg, run_dir, stages, log)
    if chain:
        t0 = time.perf_counter()
        names, then = eval_after_chain(cfg, plan, run_dir, log) if evaluate else ([], None)
        kw: dict[str, Any] = {"hooks": hooks, "callbacks": finetune_callbacks, "progress": progress, "log": log}
        out.update(run_chain(cfg, plan, run_dir, chain, then=then, **kw))
        if then is not None:
            out["eval"] = chain_summaries(names, then)
        out["timings"]["+".join([*chain, "evaluate"] if then else chain)] = round(time.perf_counter() - t0, 1)
    for section in stages:
        if section in chain:
            continue
        init = finetune_init(cfg, run_dir, check=True) if section == "finetune" else None
        t0 = time.perf_counter()
        out[section] = run_section(
            cfg,
            plan,
            run_dir,
            section,
            init=init,
            hooks=hooks,
            callbacks=finetune_callbacks if section == "finetune" else (),
            progress=progress,
            log=log,
        )
        out["timings"][section] = round(time.perf_counter() - t0, 1)
    if card:
        write_run_card(cfg, plan, run_dir, metrics=None, extra={"timings_s": out["timings"]})
    return out


def finetune_init(cfg: Config, run_dir: str, check: bool) -> dict[str, Any] | None:
    """Where fine-tuning starts: ``finetune.init`` when set, else the run's pretrained model
    when it has a pretrain stage, else None (from scratch). ``check``: the model must exist
    already (it does not when the same worker group exports it first, :func:`run_chain`)."""
    assert cfg.finetune is not None
    src = cfg.finetune.init or (stage_model_dir(run_dir, "pretrain") if cfg.pretrain is not None else None)
    if not src:
        return None
    src = absolute_uri(src)
    if (check or cfg.finetune.init) and not uri_exists(join_uri(src, "model.json")):
        raise UserError(f"finetune.init: no exported model at {src} (run 'localcl pretrain' first)")
    return {"kind": "backbone", "dir": src}


def chain_sections(cfg: Config, run_dir: str, stages: Sequence[str], log: Callable[[str], None] = print) -> list[str]:
    """The sections of ``stages`` to train in one worker group (``scaling.one_worker_group``):
    those not done yet, when each is one fit; else ``[]`` (each section then gets its own worker
    group, as without the switch). Even one section left goes through the chain: its
    checkpoints, where a re-run after an interruption resumes, are the chain's."""
    if not cfg.scaling.one_worker_group or cfg.scaling.num_workers == 0:  # local mode: no start-up to save
        return []
    todo = [s for s in stages if not stage_done(stage_model_dir(run_dir, s), cfg)]
    why = None
    if "pretrain" in todo and len(METHODS[cfg.pretrain.method.name].stages or ()) > 1:  # type: ignore[union-attr]
        why = f"{cfg.pretrain.method.name} pretrains in several stages"  # type: ignore[union-attr]
    elif "finetune" in todo and cfg.finetune is not None and cfg.finetune.self_training is not None:
        why = "self-training rounds run between fits"
    if why:
        log(f"scaling.one_worker_group: one worker group per stage ({why})")
        return []
    return todo


def run_chain(
    cfg: Config,
    plan: Plan,
    run_dir: str,
    sections: Sequence[str],
    hooks: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
    then: tuple[Callable[[Any], None], Any] | None = None,
) -> dict[str, Any]:
    """Train ``sections`` in order in one worker group (:func:`ray_jobs.train.trainer.fit_chain`;
    ``then``: what its workers run after the last stage, the run's evaluation):
    the workers write each stage's ``history.csv`` and export it to ``RUN_DIR/<stage>/model`` as
    the stage ends, so a stage skipped on a re-run has both. ``callbacks``: Ray Train callbacks of the fit (a campaign trial's
    ``EpochReportCallback``, which forwards only the fine-tuning epochs' reports: the
    pretraining's carry no validation metric). Returns ``{section: {"model_dir", "history",
    "results"}}`` like :func:`run_section`."""
    if "pretrain" in sections and needs_superpixels(cfg):
        ensure_superpixels(cfg, plan, log)
    steps = [
        ChainStep(
            spec=loop_spec(
                cfg,
                plan,
                section,  # type: ignore[arg-type]
                init=finetune_init(cfg, run_dir, check=False) if section == "finetune" else None,
                hooks=hooks,
            ),
            run_dir=run_dir,
        )
        for section in sections
    ]
    epochs = ", ".join(f"{STAGE_DIRS[s]} {cfg.schedule_for(s, None).epochs}" for s in sections)
    log(
        f"{' + '.join(STAGE_DIRS[s] for s in sections)}: one worker group, {cfg.scaling.num_workers} worker(s), epochs: {epochs}"
    )
    results = fit_chain(cfg, steps, run_dir, progress=progress, callbacks=callbacks, then=then)
    out: dict[str, Any] = {}
    for section in sections:  # the workers wrote each history.csv as the stage ended
        res = results[section]
        if cfg.logging.tensorboard:
            write_tensorboard(run_dir, STAGE_DIRS[section], res.history)
        out[section] = {
            "model_dir": stage_model_dir(run_dir, section),
            "history": res.history,
            "results": {"main": res},
        }
    return out


def run_pipeline(
    cfg: Config,
    run_dir: str,
    evaluate: bool = True,
    progress: bool = True,
    hooks: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """pretrain -> finetune (-> baseline) -> evaluate each fine-tuned model on the test split
    (:mod:`ray_jobs.train.run_eval`), then the model card (RUN_DIR/model_card.json +
    MODEL_CARD.md) with the metrics."""
    stages = [s for s in ("pretrain", "finetune", "baseline") if getattr(cfg, s) is not None]
    out = run_stages(
        cfg, run_dir, stages, progress=progress, hooks=hooks, log=log, card=not evaluate, evaluate=evaluate
    )
    if evaluate:
        if "eval" not in out:  # not by the training workers (scaling.one_worker_group)
            t0 = time.perf_counter()
            out["eval"] = evaluate_models(cfg, out["plan"], run_dir, log=log)
            out["timings"]["evaluate"] = round(time.perf_counter() - t0, 1)
        out["card"] = write_run_card(
            cfg, out["plan"], run_dir, metrics=out["eval"], extra={"timings_s": out["timings"]}
        )
    return out


def write_run_card(
    cfg: Config, plan: Plan, run_dir: str, metrics: dict[str, Any] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """RUN_DIR/model_card.json + MODEL_CARD.md (:mod:`ray_jobs.evaluation.model_card`): pretraining
    method, fine-tuning strategy, store + fingerprint, label budget and labelled cases, the
    resolved config and its hash, code version, evaluation metrics and ``extra``."""
    ex = dict(extra or {})
    if cfg.finetune is not None and cfg.finetune.self_training is not None:
        try:
            ex["self_training"] = read_spec(join_uri(run_dir, "finetune", "model")).get("self_training")
        except UserError:
            pass
    card = build_model_card(
        run_name=cfg.name,
        method=cfg.pretrain.method.name if cfg.pretrain is not None else None,
        strategy=cfg.finetune.method.name if cfg.finetune is not None else None,
        store=plan.store,
        label_budget=cfg.data.label_budget if cfg.data.label_cases is None else None,
        labelled_cases=plan.labelled,
        config=cfg.to_dict(),
        metrics=metrics or {},
        storage_options=cfg.data.storage_options or None,
        extra=ex,
    )
    write_model_card(run_dir, card)
    return card


def summary_table(results: dict[str, Any]) -> str:
    """Markdown table of mean foreground Dice / HD95 / ASD per evaluated model."""
    rows = ["| model | Dice | HD95 (mm) | ASD (mm) |", "|---|---|---|---|"]
    for name, s in results.items():
        mean = s.get("mean", s) if isinstance(s, dict) else {}
        rows.append(f"| {name} | {_fmt(mean.get('dice'))} | {_fmt(mean.get('hd95'))} | {_fmt(mean.get('asd'))} |")
    return "\n".join(rows)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, (int, float)) else "n/a"


def dump_json(uri: str, obj: Any) -> None:
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)


def write_text(uri: str, text: str) -> None:
    """Write ``text`` to a local path or fsspec URI, creating the parent folder."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "w") as f:
        f.write(text)
