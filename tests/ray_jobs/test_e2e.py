"""End to end on real ACDC through Ray Train: pipeline artefacts, worker-kill recovery, driver
resume through the CLI on an existing cluster (``--address``), and every method/strategy in
Ray Train local mode.

Data: a store ingested once per module from a small subset of ``../shared/data/acdc``:
3 labelled patients (the SSL4MIS 3-patient budget), 3 unlabelled patients and 1 validation
patient (2 volumes each), trained on 64x64 slices at 5 mm with a 3-level U-Net of widths
(8, 16, 32). Bad configs failing before Ray starts are tested in ``test_config.py``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
LABELLED = ["patient099", "patient038", "patient050"]  # splits.json ssl4mis_labeled_patients["3"]
UNLABELLED = ["patient100", "patient058", "patient021"]
VAL = ["patient002"]
TINY = {"widths": [8, 16, 32]}


@pytest.fixture(scope="module")
def acdc_store(acdc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    import storage

    uri = str(tmp_path_factory.mktemp("acdc") / "acdc.zarr")
    cases = [f"{p}_frame{f:02d}" for p in LABELLED + UNLABELLED + VAL for f in (1, 2)]
    rep = storage.ingest(str(acdc_dir), uri, cases=cases, workers=2, progress=False)
    st = storage.open_store(uri)
    assert sorted(st.cases) == sorted(cases), rep
    return uri


def base_config(store: str, **over: Any) -> dict[str, Any]:
    cfg = {
        "name": "e2e",
        "data": {
            "store": store,
            "label_budget": 3,
            "seed": 0,
            "size": [64, 64],
            "spacing_mm": [5.0, 5.0],
            "splits": {"pool": "train", "val": "val", "test": "val"},
            "max_unlabelled": 6,
            "max_val_cases": 1,
            "max_test_cases": 2,
        },
        "pretrain": {
            "method": {"name": "ideal", **TINY, "queue_size": 256, "proj_dim": 16},
            "schedule": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4},
        },
        "finetune": {
            "method": {"name": "ideal", **TINY},
            "schedule": {"epochs": 3, "steps_per_epoch": 2, "batch_size": 4, "unlabelled_batch_size": 4},
        },
        "baseline": None,
        "evaluate": {"overlay_cases": 1},
        "scaling": {"num_workers": 2, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
        "checkpoint": {"num_to_keep": 2, "max_failures": 1},
        "logging": {"tensorboard": True, "progress": False},
    }
    for key, value in over.items():
        node: Any = cfg
        *path, last = key.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def read_history(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


# slow (69 s): the worker-SIGKILL resume runs in the default suite as
# test_step_resume.py::test_worker_sigkill_mid_epoch__resumes_at_the_step_checkpoint
@pytest.mark.slow
def test_pipeline__pretrain_finetune_evaluate_survives_worker_sigkill(ray_cluster, acdc_store, tmp_path):
    """Rank 1 SIGKILLs itself at fine-tune epoch 2; the worker group restarts from the epoch-1
    checkpoint (epoch 1 is not redone) and the run ends with every artefact."""
    from ray_jobs.config import validate
    from ray_jobs.train import pipeline

    mlflow_uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = validate(base_config(acdc_store, **{"logging.mlflow_uri": mlflow_uri}))
    run_dir = str(tmp_path / "run")
    events, flag = tmp_path / "events.txt", tmp_path / "killed.flag"
    # the kill waits until the epoch-1 checkpoint is registered by the controller (it registers
    # reports asynchronously; a worker dying before that restarts from the checkpoint before)
    snapshot = tmp_path / "run" / "finetune" / "e2e-finetune" / "checkpoint_manager_snapshot.json"
    hooks = {
        "events": str(events),
        "kill": {"rank": 1, "epoch": 2, "step": 0, "flag": str(flag), "snapshot": str(snapshot)},
    }
    import glob
    import tempfile

    tmp_copies = set(glob.glob(os.path.join(tempfile.gettempdir(), "checkpoint_tmp_*")))
    out = pipeline.run_pipeline(cfg, run_dir, progress=False, hooks=hooks, log=lambda m: None)
    # a local run dir's checkpoints are used in place, never copied into the temp dir
    assert set(glob.glob(os.path.join(tempfile.gettempdir(), "checkpoint_tmp_*"))) <= tmp_copies

    assert flag.exists(), "the kill hook never fired"
    lines = events.read_text().split("\n")
    # after the kill, both ranks restart at epoch 2 (checkpoint of epoch 1), never at 1 again
    starts = [ln for ln in lines if " start " in ln]
    assert starts.count("0 start 1") == 2 and starts.count("1 start 1") == 2  # pretrain + finetune
    assert "1 start 2" in starts and "0 start 2" in starts
    hist = read_history(Path(run_dir) / "finetune" / "history.csv")
    assert [int(r["epoch"]) for r in hist] == [1, 2, 3]
    assert [int(r["start_epoch"]) for r in hist] == [1, 2, 2]
    # best_val_dice: the running max of val_dice (the score of best.pt), across the restart too
    dice = [float(r["val_dice"]) for r in hist]
    assert [float(r["best_val_dice"]) for r in hist] == [max(dice[: i + 1]) for i in range(len(dice))]
    assert all(0.0 <= float(r["val_dice"]) <= 1.0 for r in hist)

    root = Path(run_dir)
    for rel in [
        "config.yaml",
        "model_card.json",
        "MODEL_CARD.md",
        "pretrain/history.csv",
        "pretrain/model/model.pt",
        "pretrain/model/model.json",
        "finetune/model/model.pt",
        "eval/method/per_case.json",
        "eval/method/per_case.csv",
        "eval/method/summary.json",
        "eval/method/summary.md",
        "eval/method/plots/dice_boxplot.png",
        "eval/method/plots/loss_finetune.png",
        "eval/method/plots/loss_pretrain.png",
    ]:
        assert (root / rel).is_file(), rel
    assert list((root / "eval/method/plots").glob("overlay_*.png"))
    assert list((root / "finetune/tensorboard").glob("events.out.tfevents.*"))
    per_case = json.loads((root / "eval/method/per_case.json").read_text())
    assert sorted(r["case"] for r in per_case) == ["patient002_frame01", "patient002_frame02"]
    assert {"RV", "MYO", "LV"} <= set(per_case[0]["metrics"])
    card = json.loads((root / "model_card.json").read_text())
    assert card["method"] == {"pretrain": "ideal", "finetune": "ideal"}
    assert card["config_hash"] == cfg.hash()
    assert card["data"]["label_budget"] == 3
    assert sorted({c.split("_")[0] for c in card["data"]["labelled_cases"]}) == sorted(LABELLED)
    assert len(card["data"]["store_fingerprint"]) == 64
    assert card["metrics"]["method"]["n_cases"] == 2
    assert card["code"]["git_sha"]
    assert out["eval"]["method"]["mean"]["dice"] == pytest.approx(
        card["metrics"]["method"]["mean_foreground"]["dice"]["mean"]
    )

    # MLflow (rank 0 through Ray's setup_mlflow): the fine-tune epochs 1..3 are logged once,
    # across the run before the kill and the one after the restart
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("e2e")
    runs = client.search_runs([exp.experiment_id])
    ft_runs = [r for r in runs if r.data.tags.get("ray_run") == "finetune"]
    steps = sorted(m.step for r in ft_runs for m in client.get_metric_history(r.info.run_id, "val_dice"))
    assert steps == [1, 2, 3] and len(ft_runs) == 2
    assert any(r.data.tags.get("ray_run") == "pretrain" for r in runs)
    assert ft_runs[0].data.params["finetune.method.name"] == "ideal"

    # re-running the finished run trains nothing (every stage is skipped by its config hash)
    msgs: list[str] = []
    pipeline.run_stages(cfg, run_dir, ("pretrain", "finetune"), progress=False, log=msgs.append)
    assert sum("already done" in m for m in msgs) == 2


def _cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ray_jobs.cli", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _registered_checkpoints(snapshot: Path) -> int:
    try:
        return len(json.loads(snapshot.read_text()).get("checkpoint_results") or [])
    except (OSError, ValueError):  # absent, or caught mid-write
        return 0


def test_cli__address_driver_killed_then_rerun_resumes(ray_cluster, acdc_store, tmp_path):
    """``localcl run --address <session cluster> --no-eval`` with ``scaling.one_worker_group``
    (pretraining and fine-tuning in one worker group): the driver is SIGKILLed once the first
    fine-tuning epoch's checkpoint is registered; the same command again (with the evaluation)
    skips the pretraining its workers exported and continues fine-tuning from that checkpoint
    (rows before the kill keep start_epoch 1, later rows were trained by the second driver),
    then the same worker group evaluates the model, and the run finishes. (Without the switch,
    the driver-level resume is the SIGTERM test below.)"""
    address = ray_cluster.get_runtime_context().gcs_address
    cfg = base_config(
        acdc_store,
        name="cli",
        **{
            "finetune.method": {"name": "supervised", **TINY},
            "finetune.schedule": {"epochs": 4, "steps_per_epoch": 3, "batch_size": 4},
            "checkpoint.max_failures": 0,
            "scaling.one_worker_group": True,
            "logging.tensorboard": False,
        },
    )
    cfg_path = tmp_path / "cli.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_dir = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS="")
    args = ["run", "--config", str(cfg_path), "--address", address, "--run-dir", str(run_dir), "--no-progress"]
    proc = _cli([*args, "--no-eval"], env)
    # resumable state = a checkpoint registered in Ray Train's snapshot (the checkpoint folder
    # alone appears before the controller records it); the pretraining's epoch is the first
    snapshot = run_dir / "stages" / "cli-stages" / "checkpoint_manager_snapshot.json"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if _registered_checkpoints(snapshot) >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, f"driver ended before the first fine-tuning checkpoint:\n{proc.communicate()[0]}"
    assert _registered_checkpoints(snapshot) >= 2, "no fine-tuning checkpoint within 300 s"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (run_dir / "pretrain" / "model" / "model.json").is_file()  # exported by the workers
    assert not (run_dir / "finetune" / "model" / "model.json").exists()

    proc2 = _cli(args, env)  # this time with the evaluation, by the same worker group
    log, _ = proc2.communicate(timeout=300)
    assert proc2.returncode == 0, log
    assert "pretrain: already done" in log and "finetune: one worker group" in log, log
    assert "then, in the same worker group: evaluating finetune/model" in log, log
    summary = json.loads((run_dir / "eval" / "method" / "summary.json").read_text())
    assert summary["n_cases"] >= 1 and summary["source"]["n_workers"] == 2, summary["source"]
    card = json.loads((run_dir / "model_card.json").read_text())
    timings = card["extra"]["timings_s"]  # no separate evaluation job
    assert "finetune+evaluate" in timings and "evaluate" not in timings, timings
    assert card["metrics"]["method"]["mean_foreground"]["dice"]["mean"] == summary["mean_foreground"]["dice"]["mean"]
    hist = read_history(run_dir / "finetune" / "history.csv")
    assert [int(r["epoch"]) for r in hist] == [1, 2, 3, 4]
    starts = [int(r["start_epoch"]) for r in hist]
    assert starts[0] == 1 and starts[-1] > 1  # resumed, and epoch 1 was not trained again
    assert all(s == 1 or s == starts[-1] for s in starts)
    assert (run_dir / "model_card.json").is_file()


def test_cli__address_driver_sigterm_stops_at_a_step_then_rerun_resumes(ray_cluster, acdc_store, tmp_path):
    """SIGTERM to ``localcl finetune --address`` (what ``localcl jobs stop`` sends the job's
    driver) mid-epoch: both workers stop after the same step and write a checkpoint there, the
    driver exits naming the step without exporting the stage, and the same command again
    resumes at exactly that step: no step is trained twice or skipped."""
    address = ray_cluster.get_runtime_context().gcs_address
    # enough steps after the SIGTERM (sent once step 2 is done) for the request to reach the
    # workers (rank 0 asks every 0.5 s) before the stage ends: 4 steps per epoch were too few
    # once the controller polled every 0.5 s (the workers wait less on each checkpoint report)
    epochs, steps = 3, 10
    cfg = base_config(
        acdc_store,
        name="stop",
        pretrain=None,
        **{
            "finetune.method": {"name": "supervised", **TINY},
            "finetune.schedule": {"epochs": epochs, "steps_per_epoch": steps, "batch_size": 4},
            "checkpoint.max_failures": 0,
        },
    )
    cfg_path = tmp_path / "stop.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    run_dir, events = tmp_path / "run", tmp_path / "events"
    events.mkdir()
    env = dict(os.environ, RAY_ADDRESS="", LOCALCL_EVENTS_DIR=str(events))
    args = ["finetune", "--config", str(cfg_path), "--address", address, "--run-dir", str(run_dir), "--no-progress"]
    ev = events / "finetune.events"

    def lines() -> list[tuple[int, str, int]]:
        out = []
        for line in ev.read_text().splitlines() if ev.exists() else []:
            r, what, v = line.split()
            out.append((int(r), what, int(v)))
        return out

    proc = _cli(args, env)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if any(w == "step" and v >= 2 for _, w, v in lines()):  # into epoch 1, before its end
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"driver ended before the second step:\n{proc.communicate()[0]}"
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, log
    stopped = sorted({(r, v) for r, w, v in lines() if w == "stopped"})
    assert [r for r, _ in stopped] == [0, 1], (stopped, log)  # both ranks, after the same step
    at = stopped[0][1]
    assert stopped[1][1] == at and 2 <= at < epochs * steps, stopped
    assert f"stopped on SIGTERM at epoch {(at - 1) // steps + 1} step {(at - 1) % steps + 1}" in log, log
    assert not (run_dir / "finetune" / "model" / "model.json").exists()
    trained_before = [v for r, w, v in lines() if w == "step" and r == 0]
    assert max(trained_before) == at  # nothing trained after the stop checkpoint

    ev.write_text("")
    proc2 = _cli(args, env)
    log2, _ = proc2.communicate(timeout=300)
    assert proc2.returncode == 0, log2
    assert (0, "resume_step", at) in lines(), (lines(), log2)
    again = [v for r, w, v in lines() if w == "step" and r == 0]
    assert again == list(range(at + 1, epochs * steps + 1))  # the rest, each step once
    hist = read_history(run_dir / "finetune" / "history.csv")
    assert [int(r["epoch"]) for r in hist] == list(range(1, epochs + 1))


# --------------------------------------------------------------------------- every method
METHOD_CASES = {
    "ideal": ({"name": "ideal", "queue_size": 64, "proj_dim": 8}, {"name": "ideal"}, None),
    "glcl": (
        {
            "name": "glcl",
            "volumes_per_batch": 2,
            "global_hidden": 16,
            "global_dim": 8,
            "local_dim": 8,
            "local_depth": 1,
        },
        {"name": "supervised"},
        None,
    ),
    # half of every pretraining batch from the label budget (the CPU study's MixCL setting)
    "mixcl": ({"name": "mixcl", "labelled_per_batch": 4}, {"name": "supervised"}, None),
    "lrc": ({"name": "lrc"}, {"name": "supervised"}, None),
    "plcl": (None, {"name": "plcl", "require_all_classes": False}, {"rounds": 2, "crf": False}),
    # PLCL's round 0 from a pretrained U-Net (the CPU study starts it from LRC's pretraining)
    "plcl_after_lrc": ({"name": "lrc"}, {"name": "plcl", "require_all_classes": False}, {"rounds": 1, "crf": False}),
    "supervised": (None, {"name": "supervised"}, None),
}


# ideal and supervised also train (with 2 workers) in the two tests above: slow-only here
COVERED = {"ideal", "supervised"}


@pytest.mark.parametrize(
    "method", [pytest.param(m, marks=pytest.mark.slow) if m in COVERED else m for m in sorted(METHOD_CASES)]
)
def test_pipeline__every_method_trains_in_local_mode(ray_cluster, acdc_store, tmp_path, method):
    """Each pretraining method (GLCL: both stages) and fine-tuning strategy (PLCL: 2
    self-training rounds after a supervised round 0) runs through the real loop in Ray Train
    local mode (1 process) for 2 steps per stage and exports a loadable model."""
    from ray_jobs.config import validate
    from ray_jobs.train import pipeline
    from ray_jobs.train.checkpoint import load_model, read_spec

    pre, ft, st = METHOD_CASES[method]
    d = base_config(acdc_store, name=f"m-{method}")
    d["scaling"]["num_workers"] = 0
    d["pretrain"] = (
        None
        if pre is None
        else {"method": {**pre, **TINY}, "schedule": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 8}}
    )
    d["finetune"] = {
        "method": {**ft, **TINY},
        "self_training": st,
        "schedule": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4, "unlabelled_batch_size": 4},
    }
    cfg = validate(d)
    run_dir = tmp_path / "run"
    stages = [s for s in ("pretrain", "finetune") if d[s] is not None]
    logs: list[str] = []
    out = pipeline.run_stages(cfg, str(run_dir), stages, progress=False, log=logs.append)
    model, spec = load_model(str(run_dir / "finetune" / "model"))
    assert spec["name"] == ft["name"] and spec["num_classes"] == 4
    if pre is not None:
        hist = read_history(run_dir / "pretrain" / "history.csv")
        n_stages = 2 if method == "glcl" else 1
        assert len(hist) == n_stages and all(float(r["loss"]) == float(r["loss"]) for r in hist)
        assert read_spec(str(run_dir / "pretrain" / "model"))["name"] == pre["name"]
    if st is not None:  # round 0 starts from the pretrained model when there is one
        (r0,) = [m for m in logs if "round0 (supervised teacher)" in m]
        assert r0.endswith(str(run_dir / "pretrain" / "model") if pre else "from random initialisation"), r0
    if pre is not None and pre["name"] == "lrc":
        import storage

        s = storage.open_store(acdc_store)
        assert all(s.has_array(c, "superpixels") for c in out["plan"].pretrain_cases)
    if st is not None:
        import storage

        rounds = read_spec(str(run_dir / "finetune" / "model"))["self_training"]["rounds"]
        assert [r["round"] for r in rounds] == list(range(1, st["rounds"] + 1))
        s = storage.open_store(acdc_store)
        for r in rounds:
            assert all(s.has_array(c, r["pseudo"]) for c in out["plan"].unlabelled)
            lab = s.derived(out["plan"].unlabelled[0], r["pseudo"])
            assert list(lab.shape) == list(s.meta(out["plan"].unlabelled[0])["shape"]) and lab.max() < 4
        hist = read_history(run_dir / "finetune" / "history.csv")
        assert sorted({int(r["round"]) for r in hist}) == list(range(st["rounds"] + 1))
