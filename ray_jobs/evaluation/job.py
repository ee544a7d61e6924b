"""Evaluation: per-case, per-class Dice / HD95 / ASD (mm), summary tables and pictures.

Two entry points, one report format:

- :func:`evaluate_store` scores a fine-tuned model on a split of a store as a Ray Train
  ``TorchTrainer`` job (:func:`evaluate_many` scores several models on the same cases in one
  job, paying its worker group's start-up once): worker ``r`` of ``W`` predicts the cases
  ``cases[r::W]`` with
  :func:`ray_jobs.evaluation.inference.predict_case`, scores them with :func:`localcl.metrics.evaluate_case`,
  the per-case results are gathered (``all_gather_object`` on a gloo group, so it also works
  when the training backend is nccl) and rank 0 writes the report. A one-worker-group run
  (``scaling.one_worker_group``) runs the same worker function, :func:`evaluate_in_worker`,
  in its training workers after the last stage instead (:func:`eval_job_config` with
  ``exported=False``), so it starts no second worker group.
- :func:`score_folders` scores a folder of predicted NIfTI label maps against a folder of
  reference label maps (no model, no Ray).

Report written under ``out`` (local path or fsspec URI)::

    per_case.json   [{"case", "shape", "spacing", "metrics": {class: {label, dice, hd95, asd}},
                      "mean_fg": {dice, hd95, asd}}]   (non-finite -> null)
    per_case.csv    case, class, label, dice, hd95_mm, asd_mm   (one row per case and class)
    summary.json    n_cases, classes {name: {label, dice|hd95|asd: {mean, std, median, n}}},
                    mean_foreground {dice|hd95|asd: {...}}, source {...}
    summary.md      the table "class | Dice | HD95 (mm) | ASD (mm)" as mean ± std
    plots/          dice_boxplot.png, loss_<stage>.png (from <stage>/history.csv),
                    overlay_<case>.png (worst, median and best case by mean foreground Dice)
    predictions/    <case>.nii.gz (uint8, source affine) with ``save_predictions=True``

Statistics: for class ``k`` and metric ``m``, ``mean = (1/n) sum_i m_ik`` and the population
``std`` over the ``n`` cases where ``m_ik`` is finite (HD95/ASD are undefined when the class is
absent from the prediction or the reference; such cases are counted in ``n_missing``). The
per-case foreground mean is ``mean_fg_i = mean_{k>0} m_ik`` over the finite values of that case;
``mean_foreground`` summarises ``mean_fg_i`` over cases the same way.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import fsspec
import numpy as np
import ray.train
import ray.train.torch as rtt
import torch
import torch.distributed as dist
from ray.train.torch import TorchConfig, TorchTrainer

import storage
from ray_jobs.errors import UserError
from ray_jobs.evaluation.inference import predict_volume, stored_intensity_range, stream_views
from ray_jobs.evaluation.scoring import (
    absolute,
    case_record,
    choose_overlay_cases,
    find_histories,
    mean_fg_dice,
    overlay_payload,
    resolve_model_dir,
    score_case,
    write_report,
)
from ray_jobs.train.checkpoint import load_model, read_spec
from ray_jobs.train.trainer import worker_runtime_env
from storage.nifti import label_nifti_bytes
from storage.remote import join_uri, write_bytes

# --------------------------------------------------------------------------- store + Ray Train
_gather_group: Any = None  # the worker's gloo group for _gather_all (reset by each evaluate_in_worker)


def _gather_all(obj: Any) -> list[Any]:
    """Every rank's ``obj`` on every rank (one gloo group, so it works under nccl too)."""
    global _gather_group
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    if _gather_group is None:
        _gather_group = dist.new_group(backend="gloo")
    group = _gather_group
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def evaluate_in_worker(cfg: Mapping[str, Any]) -> None:
    """Ray Train worker: for each model of ``cfg`` (:func:`eval_job_config`) in turn, predict
    and score ``cases[rank::world]``; rank 0 writes that model's report. Runs as the
    evaluation job's worker function, or in a one-worker-group run's workers after its
    training stages (``scaling.one_worker_group``), which is why a model may still be
    ``pending`` here: it did not exist when the driver built ``cfg``."""
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    global _gather_group
    _gather_group = None
    try:
        device = rtt.get_device()
    except Exception:  # local mode without a torch backend
        device = torch.device("cuda" if torch.cuda.is_available() and cfg["use_gpu"] else "cpu")
    st = storage.open_store(cfg["store"], storage_options=cfg["storage_options"])
    for target in cfg["models"]:
        if "pending" in target:  # exported by this worker group's training stages
            names = st.attrs.get("label_names") if hasattr(st, "attrs") else None
            target = _model_job(EvalTarget(**target["pending"]), names, cfg["where"], cfg["split_name"])
        source = dict(target["source"], n_workers=world)  # the world that scored (elastic: what fit)
        _eval_one({**cfg, **target, "source": source}, st, device, rank, world)


def _eval_one(cfg: Mapping[str, Any], st: Any, device: torch.device, rank: int, world: int) -> None:
    """One model of :func:`evaluate_in_worker`: ``cfg`` is the job's settings with the model's own
    (``model_dir``, ``out``, ``label_names``, ``histories``, ``source``, ``title``, ``run_name``)."""
    model, spec = load_model(cfg["model_dir"], device=device)
    names = {int(k): v for k, v in cfg["label_names"].items()}
    fg = [k for k in sorted(names) if k != 0]
    mine = cfg["cases"][rank::world]
    records, candidates = [], {}
    for case in mine:
        meta = st.meta(case)
        image, ref = st.image(case), st.label(case)
        if ref is None:  # the driver passes labelled cases only
            raise UserError(f"case {case!r} is unlabelled: nothing to score it against")
        pred = predict_volume(
            model,
            spec,
            image,
            meta["spacing"],
            intensity_range=stored_intensity_range(spec, meta),
            batch_size=cfg["batch_size"],
        )
        scores = score_case(pred, ref, meta["spacing"], fg, where=case)
        rec = case_record(case, scores, names, ref.shape, meta["spacing"])
        for stream, view in stream_views(model).items():  # each stream alone: Dice only
            sp = predict_volume(
                view,
                spec,
                image,
                meta["spacing"],
                intensity_range=stored_intensity_range(spec, meta),
                batch_size=cfg["batch_size"],
            )
            rec.setdefault("streams", {})[stream] = mean_fg_dice(sp, ref, fg)
        records.append(rec)
        if cfg["save_predictions"]:
            write_bytes(
                join_uri(cfg["out"], "predictions", f"{case}.nii.gz"),
                label_nifti_bytes(pred, np.asarray(meta["affine"], float)),
            )
        if cfg["plots"] and cfg["overlay_cases"] > 0:
            # keep only the few slices an overlay needs, not the whole volumes
            candidates[case] = overlay_payload(image, ref, pred)
    all_records = [r for part in _gather_all(records) for r in part]
    chosen = choose_overlay_cases(all_records, cfg["overlay_cases"]) if cfg["plots"] else []
    payload = {c: candidates[c] for c in chosen if c in candidates}
    overlays = {c: p for part in _gather_all(payload) for c, p in part.items()}
    if rank == 0:
        write_report(
            cfg["out"],
            all_records,
            source=cfg["source"],
            label_names=names,
            histories=cfg["histories"],
            overlays=overlays,
            plots=cfg["plots"],
            title=cfg["title"],
            run_name=cfg["run_name"],
        )


def split_cases(st: Any, split: str) -> list[str]:
    """The labelled cases of ``split`` (a catalog split name, ``all`` or ``labelled``)."""
    if split in ("all", "labelled"):
        cases = list(st.cases)
    else:
        splits = st.catalog.splits
        if split not in splits:
            raise UserError(f"--split {split!r}: not a split of this store; known: {sorted(splits) + ['all']}")
        cases = list(splits[split])
    labelled = set(st.labelled_cases)
    out = [c for c in cases if c in labelled]
    if not out:
        raise UserError(f"--split {split!r}: no labelled cases to evaluate")
    return out


@dataclass(frozen=True)
class EvalTarget:
    """One model to score in an :func:`evaluate_many` job: an exported model directory (or a
    run directory), the report directory ``out`` (local path or URI), the report's title
    (default ``<method> on <split>``) and ``{stage: history.csv}`` to plot (default: found
    beside the model directory)."""

    checkpoint: str
    out: str
    title: str | None = None
    histories: Mapping[str, str] | None = None


def evaluate_store(
    checkpoint: str,
    store: str,
    out: str,
    *,
    histories: Mapping[str, str] | None = None,
    title: str | None = None,
    **job: Any,
) -> dict[str, Any]:
    """Evaluate one exported model on a store split as a Ray Train job; returns its
    ``summary.json``. ``job``: the keyword arguments of :func:`evaluate_many` (``split``,
    ``cases``, ``num_workers``, ...)."""
    return evaluate_many([EvalTarget(checkpoint, out, title, histories)], store, **job)[0]


def evaluate_many(
    targets: Sequence[EvalTarget],
    store: str,
    *,
    num_workers: int | tuple[int, int] = 1,
    resources_per_worker: Mapping[str, float] | None = None,
    storage_path: str | None = None,
    **job: Any,
) -> list[dict[str, Any]]:
    """Evaluate exported models on the same cases of a store in ONE Ray Train job (one worker
    group, whose start-up is paid once: ``localcl run`` scores the method and the baseline
    together); returns each target's ``summary.json``, in order.

    Checks the inputs in the driver (every model directory, the store, the split) before any
    worker starts. Ray must be initialised (``ray.init``) by the caller. ``num_workers=0`` runs
    Ray Train's local mode (in this process, no DDP). With several nodes, each target's ``out``
    must be a URI or a path every node sees (rank 0 writes the reports).

    Args:
        targets: the models and their report directories (:class:`EvalTarget`).
        store: store path or URI.
        num_workers: ``W``, or an elastic ``(min, max)``: the job starts with the workers that
            fit (at least ``min``; a cluster that lost a node still evaluates). The report's
            ``source.n_workers`` is the world size that scored the cases.
        job: the keyword arguments of :func:`eval_job_config` (``split``, ``cases``,
            ``max_cases``, ``use_gpu``, ``plots``, ...).
    """
    cfg = eval_job_config(targets, store, **job)
    use_gpu = cfg["use_gpu"]
    res = dict(resources_per_worker or ({"CPU": 1, "GPU": 1} if use_gpu else {"CPU": 1}))
    tmp = None
    if storage_path is None:
        tmp = tempfile.TemporaryDirectory(prefix="localcl-eval-")
        storage_path = tmp.name
    try:
        trainer = TorchTrainer(
            evaluate_in_worker,
            train_loop_config=cfg,
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=num_workers,  # type: ignore[arg-type]  # Train V2 takes (min, max); typed as V1's
                use_gpu=use_gpu,
                resources_per_worker=res if num_workers else None,
            ),
            # a fresh name per call: Ray Train V2 treats a reused name as "resume" and could
            # hand back a previous run instead of evaluating again
            # the ignore: mypy resolves ray.train.RunConfig to ray.air's; at run time (Train V2)
            # it is ray.train.v2's, which takes worker_runtime_env
            run_config=ray.train.RunConfig(
                name=f"evaluate-{uuid.uuid4().hex[:12]}",  # type: ignore[call-arg]
                storage_path=storage_path,
                worker_runtime_env=worker_runtime_env(),
            ),
        )
        trainer.fit()
    finally:
        if tmp is not None:
            tmp.cleanup()
    return read_summaries(cfg)


def eval_job_config(
    targets: Sequence[EvalTarget],
    store: str,
    *,
    split: str = "val",
    cases: Sequence[str] | None = None,
    max_cases: int | None = None,
    use_gpu: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    plots: bool = True,
    overlay_cases: int = 3,
    save_predictions: bool = False,
    batch_size: int = 16,
    exported: bool = True,
) -> dict[str, Any]:
    """The workers' settings of an evaluation (:func:`evaluate_in_worker`), checked in the
    driver: the store, the cases (``split``: a catalog split, ``all`` or ``labelled``; or
    ``cases``; the first ``max_cases``) and, when ``exported``, every model directory.
    ``exported=False``: the models are exported later by the same worker group
    (``scaling.one_worker_group``), so the workers check and describe them."""
    if not targets:
        raise ValueError("evaluate_many: no models to evaluate")
    # Ray workers do not share the driver's working directory: make local paths absolute
    store = absolute(str(store))
    try:
        st = storage.open_store(store, storage_options=storage_options)
    except ValueError as exc:
        raise UserError(f"--store {store}: {exc}") from None
    explicit = cases is not None
    if cases is None:
        cases = split_cases(st, split)
    else:
        unknown = [c for c in cases if c not in set(st.labelled_cases)]
        if unknown:
            raise UserError(f"cases not labelled in {store}: {unknown[:5]}")
    cases = list(cases)[:max_cases] if max_cases else list(cases)
    store_names = st.attrs.get("label_names") if hasattr(st, "attrs") else None
    where = {"store": str(store), "split": "(explicit cases)" if explicit else split}
    if exported:
        models = [_model_job(t, store_names, where, title_split=split) for t in targets]
    else:
        models = [
            {
                "pending": {
                    **dataclasses.asdict(t),
                    "checkpoint": absolute(str(t.checkpoint)),
                    "out": absolute(str(t.out)),
                }
            }
            for t in targets
        ]
    return {
        "models": models,
        "where": where,
        "split_name": split,
        "store": str(store),
        "storage_options": dict(storage_options or {}),
        "cases": cases,
        "use_gpu": use_gpu,
        "plots": plots,
        "overlay_cases": overlay_cases,
        "save_predictions": save_predictions,
        "batch_size": batch_size,
    }


def read_summaries(cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each model's ``summary.json`` of an evaluation that ran with ``cfg``, in order."""
    summaries = []
    for m in cfg["models"]:
        out = m["pending"]["out"] if "pending" in m else m["out"]
        fs, path = fsspec.core.url_to_fs(join_uri(out, "summary.json"))
        with fs.open(path, "r") as f:
            summaries.append(json.load(f))
    return summaries


def _model_job(target: EvalTarget, store_names: Any, where: Mapping[str, Any], title_split: str) -> dict[str, Any]:
    """The worker's settings for one target (``_eval_one``), checked in the driver: a fine-tuned
    model directory, its class names (the model's, else the store's, else the label values).
    ``where``: the report's ``source`` entries ``store`` and ``split`` (the worker adds
    ``n_workers``)."""
    checkpoint, out = absolute(str(target.checkpoint)), absolute(str(target.out))
    model_dir = resolve_model_dir(checkpoint)
    spec = read_spec(model_dir)
    if spec["stage"] != "finetune":
        raise UserError(
            f"--checkpoint {model_dir}: a {spec['stage']} model has no segmentation head; "
            "evaluate a fine-tuned model (RUN_DIR/finetune/model)"
        )
    names = {int(k): str(v) for k, v in (spec.get("label_names") or {}).items()}
    if not names:
        names = {int(k): str(v) for k, v in (store_names or {}).items()}
    if not names:
        names = {k: str(k) for k in range(int(spec["num_classes"]))}
    names = {k: names.get(k, str(k)) for k in range(int(spec["num_classes"]))}
    histories = target.histories if target.histories is not None else find_histories(model_dir)
    return {
        "model_dir": model_dir,
        "out": str(out),
        "label_names": {str(k): v for k, v in names.items()},
        "histories": dict(histories),
        "source": {
            "checkpoint": model_dir,
            "store": where["store"],
            "split": where["split"],
            "method": spec.get("name"),
            "weights_sha256": spec.get("weights_sha256"),
        },
        "title": target.title or f"{spec.get('name', 'model')} on {title_split}",
        "run_name": spec.get("run"),
    }
