"""PLCL self-training rounds (spec ``methods.md`` §2.8) as a sequence of Ray Train fits.

Procedure for ``finetune: {method: {name: plcl}, self_training: {rounds: R, crf: ...}}``::

    round 0   teacher_0 = the supervised model on the label budget:
              - finetune_baseline/model when the run has a baseline and no initialisation
                (it *is* the supervised baseline on the same labelled cases), else
              - a FINETUNE["supervised"] fit from the initialisation (pretrained backbone or
                finetune.init) into finetune/round0/ (best-by-validation, exported)
    round r   (r = 1..R)
      a. pseudo-label every unlabelled training case with teacher_{r-1}: slice-wise softmax on
         the training grid -> localcl.methods.plcl.pseudo_label (dense CRF when
         self_training.crf and pydensecrf2 is installed, else argmax) -> back to the native
         grid (nearest) -> stored beside the scan as derived array ``pseudo_r{r}_<hash8>``
         (one Ray task per case; ``<hash8>`` = first 8 hex digits of the config hash, so runs
         sharing a store never read each other's pseudo-labels)
      b. fit FINETUNE["plcl"] jointly (Dice + lambda * L_LC) for finetune.schedule.epochs epochs
         on labelled slices + pseudo-labelled slices (``batch_u[pseudo_label_key]``), validating
         every epoch and keeping the best-by-validation weights; round 1 starts from
         teacher_0's encoder + decoder (heads re-initialised, §2.8 step 2), round r > 1 from
         round r-1's best weights
      c. export the best weights to finetune/round{r}/model; teacher_r = that model
    final     finetune/model = the round (1..R) with the highest best validation Dice (the last
              round when there is no validation split).

Every round is its own Ray Train run (``<name>-finetune-r{r}``, storage ``RUN_DIR/finetune``),
so a crash resumes inside the interrupted round; finished rounds (exported with the same config
hash) and cached pseudo-labels are skipped when the command is re-run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import ray
import torch

import storage
from localcl.methods.plcl import pseudo_label
from ray_jobs.config import Config, validate
from ray_jobs.evaluation.inference import preprocessing_from_spec
from ray_jobs.train.checkpoint import load_model, load_state, read_spec
from ray_jobs.train.stage import (
    STAGE_DIRS,
    Plan,
    export_checkpoint,
    export_state,
    loop_spec,
    model_spec,
    stage_done,
    write_history,
)
from ray_jobs.train.trainer import fit_stage, worker_runtime_env, write_tensorboard
from storage.preprocess import preprocess_slice, restore_slice
from storage.remote import join_uri

CRF_KEYS = {  # PLCLFinetuneConfig field -> localcl.methods.plcl.pseudo_label argument
    "crf_gaussian_sxy": "gaussian_sxy",
    "crf_gaussian_weight": "gaussian_weight",
    "crf_bilateral_sxy": "bilateral_sxy",
    "crf_bilateral_srgb": "bilateral_srgb",
    "crf_bilateral_weight": "bilateral_weight",
    "crf_iterations": "iterations",
}


def pseudo_label_name(cfg: Any, r: int) -> str:
    """Derived-array name of round ``r``'s pseudo-labels: ``pseudo_r{r}_<config hash[:8]>``."""
    return f"pseudo_r{r}_{cfg.hash()[:8]}"


def pseudo_label_volume(
    model: Any,
    spec: Mapping[str, Any],
    store: Any,
    case: str,
    *,
    crf: bool,
    crf_kwargs: Mapping[str, Any],
    batch_size: int = 16,
) -> np.ndarray:
    """Pseudo-labels ``(X, Y, Z)`` uint8 of one case on its native grid.

    Each slice is preprocessed exactly as the samplers do (:func:`storage.preprocess.preprocess_slice`
    with the stored p1/p99 and the spec's size/spacing), the teacher gives probabilities
    ``(B, K, H, W)``, :func:`localcl.methods.plcl.pseudo_label` turns them into labels
    ``(B, H, W)`` (CRF on the training grid, where the reference runs it), and
    :func:`storage.preprocess.restore_slice` (nearest) maps them back to ``(X, Y)``; voxels
    outside the training crop get background (0), which the sampler crops away again.
    """
    pre = preprocessing_from_spec(spec)
    size, target = pre["size"], pre["spacing_mm"]
    meta = store.meta(case)
    image = store.image(case)
    sp2 = (float(meta["spacing"][0]), float(meta["spacing"][1]))
    p1, p99 = float(meta["intensity"]["p1"]), float(meta["intensity"]["p99"])
    X, Y, Z = image.shape
    out = np.zeros((X, Y, Z), np.uint8)
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for z0 in range(0, Z, batch_size):
            zs = range(z0, min(Z, z0 + batch_size))
            x = torch.stack([preprocess_slice(image[:, :, z], sp2, p1, p99, size, target)["image"] for z in zs]).to(
                device
            )
            probs = model.predict(x).float()
            lab = pseudo_label(probs, x, crf=crf, **dict(crf_kwargs))  # (B, H, W) int64
            native = restore_slice(lab.cpu(), (X, Y), sp2, target, nearest=True)  # (B, X, Y)
            out[:, :, z0 : z0 + len(zs)] = native.clamp_min(0).to(torch.uint8).numpy().transpose(1, 2, 0)
    return out


def label_task(
    model_dir: str,
    store_uri: str,
    storage_options: dict | None,
    case: str,
    name: str,
    crf: bool,
    crf_kwargs: dict,
    use_gpu: bool,
) -> dict[str, Any]:
    """One case (a Ray task): load the teacher, pseudo-label, write the derived array."""
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    model, spec = load_model(model_dir, device=device)
    st = storage.open_store(store_uri, mode="a", storage_options=storage_options)
    lab = pseudo_label_volume(model, spec, st, case, crf=crf, crf_kwargs=crf_kwargs)
    st.put_derived(
        case, name, lab, {"teacher": model_dir, "crf": bool(crf), "weights_sha256": spec.get("weights_sha256")}
    )
    return {"case": case, "classes": np.unique(lab).tolist()}


def pseudo_label_cases(
    model_dir: str,
    store_uri: str,
    cases: Sequence[str],
    name: str,
    *,
    crf: bool,
    crf_kwargs: Mapping[str, Any],
    storage_options: dict | None = None,
    use_gpu: bool = False,
) -> dict[str, list[str]]:
    """Pseudo-label ``cases`` as one Ray task per case (1 CPU, or 1 GPU with ``use_gpu``);
    cases that already hold a complete ``name`` array are skipped. Ray must be initialised."""
    st = storage.open_store(store_uri, storage_options=storage_options)
    todo = [c for c in cases if not st.has_array(c, name)]
    done = {"computed": todo, "skipped": [c for c in cases if c not in todo]}
    if not todo:
        return done
    task = ray.remote(num_cpus=1, num_gpus=1 if use_gpu else 0, runtime_env=worker_runtime_env() or None)(label_task)  # type: ignore[arg-type]  # ray.remote annotates runtime_env as Dict; its option check accepts None
    refs = [task.remote(model_dir, store_uri, storage_options, c, name, crf, dict(crf_kwargs), use_gpu) for c in todo]
    ray.get(refs)
    return done


def _supervised_cfg(cfg: Config) -> Config:
    """A copy of ``cfg`` whose ``baseline`` section is FINETUNE["supervised"] with the
    fine-tune stage's backbone keys, optimiser and schedule (the round-0 teacher)."""
    d = cfg.to_dict()
    d["baseline"] = True
    return validate(d)


def run_self_training(
    cfg: Config,
    plan: Plan,
    run_dir: str,
    *,
    init: dict[str, Any] | None,
    teacher: str | None = None,
    hooks: dict[str, Any] | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run round 0 (unless ``teacher``, an exported supervised model such as the run's
    baseline, is given) and rounds 1..R; export the best round to finetune/model.
    Returns ``{"model_dir", "history", "results", "rounds"}`` like ``pipeline.run_section``."""
    assert cfg.finetune is not None and cfg.finetune.self_training is not None
    st_cfg = cfg.finetune.self_training
    sdir = STAGE_DIRS["finetune"]
    final_dir = join_uri(run_dir, sdir, "model")
    if stage_done(final_dir, cfg):
        log(f"{sdir}: already done ({final_dir}), skipping")
        return {"model_dir": final_dir, "history": None, "results": {}, "rounds": None}
    mcfg = cfg.method_config("finetune")
    crf_kwargs = {arg: getattr(mcfg, key) for key, arg in CRF_KEYS.items()}

    # ---- round 0: the supervised teacher
    history: list[dict[str, Any]] = []
    if teacher is None:
        scfg = _supervised_cfg(cfg)
        r0_dir = join_uri(run_dir, sdir, "round0", "model")
        if stage_done(r0_dir, cfg):
            log(f"{sdir}/round0: already done, skipping")
        else:
            spec = dict(model_spec(scfg, plan, "baseline"), config_hash=cfg.hash())
            lspec = loop_spec(scfg, plan, "baseline", init=init, hooks=hooks, model=spec)
            log(
                f"{sdir}/round0 (supervised teacher): {cfg.scaling.num_workers} worker(s), "
                f"{scfg.schedule_for('baseline').epochs} epoch(s), from "
                f"{init['dir'] if init else 'random initialisation'}"
            )
            res = fit_stage(scfg, lspec, run_dir, sdir, run_name=f"{cfg.name}-{sdir}-r0", progress=progress)
            export_checkpoint(spec, res.checkpoint_dir, r0_dir)
            history = [dict(r, round=0) for r in res.history]
        teacher = r0_dir

    # ---- rounds 1..R
    rounds: list[dict[str, Any]] = []
    results: dict[str, Any] = {}
    for r in range(1, st_cfg.rounds + 1):
        name = pseudo_label_name(cfg, r)
        r_dir = join_uri(run_dir, sdir, f"round{r}", "model")
        if stage_done(r_dir, cfg):
            spec_r = read_spec(r_dir)
            log(f"{sdir}/round{r}: already done, skipping")
            rounds.append({"round": r, "model_dir": r_dir, "best": spec_r.get("best_score"), "pseudo": name})
            teacher = r_dir
            continue
        done = pseudo_label_cases(
            teacher,
            plan.store,
            plan.unlabelled,
            name,
            crf=st_cfg.crf,
            crf_kwargs=crf_kwargs,
            storage_options=cfg.data.storage_options or None,
            use_gpu=cfg.scaling.use_gpu,
        )
        log(
            f"{sdir}/round{r}: pseudo-labelled {len(done['computed'])} case(s) with {teacher} "
            f"({'CRF' if st_cfg.crf else 'argmax'}; {len(done['skipped'])} cached) -> {name}"
        )
        r_init = {"kind": "backbone", "dir": teacher} if r == 1 else {"kind": "state", "dir": teacher}
        lspec = loop_spec(cfg, plan, "finetune", init=r_init, hooks=hooks, pseudo=name, round=r)
        res = fit_stage(
            cfg, lspec, run_dir, sdir, run_name=f"{cfg.name}-{sdir}-r{r}", progress=progress, callbacks=list(callbacks)
        )
        best = _best_score(res.history)
        spec = dict(model_spec(cfg, plan, "finetune"), round=r, best_score=best, pseudo_labels=name)
        export_checkpoint(spec, res.checkpoint_dir, r_dir)
        history += [dict(row, round=r) for row in res.history]
        rounds.append({"round": r, "model_dir": r_dir, "best": best, "pseudo": name})
        results[f"round{r}"] = res
        teacher = r_dir

    # ---- the overall best round -> finetune/model
    scored = [x for x in rounds if x["best"] is not None]
    pick = max(scored, key=lambda x: x["best"]) if scored else rounds[-1]
    log(f"{sdir}: best round {pick['round']} (val_dice {pick['best']}) -> {final_dir}")
    state = load_state(pick["model_dir"])
    spec = dict(read_spec(pick["model_dir"]))
    for k in ("format", "weights_sha256"):
        spec.pop(k, None)
    spec["self_training"] = {
        "rounds": [{k: v for k, v in x.items() if k != "model_dir"} for x in rounds],
        "selected_round": pick["round"],
    }
    export_state(spec, state, final_dir)
    if history:
        write_history(run_dir, sdir, history)
        if cfg.logging.tensorboard:
            write_tensorboard(run_dir, sdir, history)
    return {"model_dir": final_dir, "history": history, "results": results, "rounds": rounds}


def _best_score(history: Sequence[Mapping[str, Any]]) -> float | None:
    vals = [float(h["val_dice"]) for h in history if h.get("val_dice") is not None]
    return max(vals) if vals else None


__all__ = ["pseudo_label_cases", "pseudo_label_name", "pseudo_label_volume", "run_self_training"]
