"""Tests of evaluation (ray_jobs.evaluation.job), ``localcl evaluate`` and the model card."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from localcl.metrics import evaluate_case
from ray_jobs.cli import main
from ray_jobs.errors import UserError
from ray_jobs.evaluation import job as evaluation_job
from ray_jobs.evaluation import scoring as evaluation_scoring

from evalpredict_helpers import make_phantom_store, make_tiny_run, nan_equal


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return make_phantom_store(tmp_path_factory.mktemp("evalstore"))


@pytest.fixture(scope="module")
def tiny_run(phantom: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_run(tmp_path_factory.mktemp("evalrun"))


def _perturbed_predictions(src: Path, dst: Path) -> None:
    """Reference label maps with the LV dilated by one voxel and the RV removed in one case."""
    dst.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted((src / "labelsTr").glob("*.nii.gz"))):
        img = nib.load(f)
        lab = np.asarray(img.dataobj).copy()
        lab[ndimage.binary_dilation(lab == 3) & (lab != 3)] = 3
        if i == 0:
            lab[lab == 1] = 0
        nib.save(nib.Nifti1Image(lab.astype(np.uint8), img.affine, img.header), str(dst / f.name))


# --------------------------------------------------------------------------- summaries
def test_summarise__nan_aware_mean_std_and_mean_foreground() -> None:
    names = {0: "background", 1: "A", 2: "B"}
    recs = [
        evaluation_scoring.case_record(
            "c1",
            {1: {"dice": 0.5, "hd95": 2.0, "asd": 1.0}, 2: {"dice": 0.0, "hd95": math.nan, "asd": math.nan}},
            names,
            (4, 4, 4),
            (1, 1, 1),
        ),
        evaluation_scoring.case_record(
            "c2",
            {1: {"dice": 1.0, "hd95": 0.0, "asd": 0.0}, 2: {"dice": 0.8, "hd95": 4.0, "asd": 2.0}},
            names,
            (4, 4, 4),
            (1, 1, 1),
        ),
    ]
    assert recs[0]["mean_fg"]["dice"] == pytest.approx(0.25)
    assert recs[0]["mean_fg"]["hd95"] == pytest.approx(2.0)  # the NaN class is skipped
    s = evaluation_scoring.summarise(recs)
    assert s["classes"]["A"]["dice"]["mean"] == pytest.approx(0.75)
    assert s["classes"]["A"]["dice"]["std"] == pytest.approx(0.25)  # population std
    assert s["classes"]["B"]["hd95"] == {"mean": 4.0, "std": 0.0, "median": 4.0, "n": 1, "n_missing": 1}
    assert s["mean_foreground"]["dice"]["mean"] == pytest.approx((0.25 + 0.9) / 2)
    assert s["mean"]["dice"] == s["mean_foreground"]["dice"]["mean"]
    md = evaluation_scoring.summary_markdown(s)
    assert "| A | 1 | 0.750 ± 0.250 |" in md and "(1 n/a)" in md


def test_choose_overlay_cases__worst_median_best() -> None:
    recs = [{"case": f"c{i}", "mean_fg": {"dice": d}} for i, d in enumerate([0.9, 0.1, 0.5, math.nan, 0.7])]
    assert evaluation_scoring.choose_overlay_cases(recs, 3) == ["c3", "c2", "c0"]
    assert evaluation_scoring.choose_overlay_cases(recs, 0) == []
    assert len(evaluation_scoring.choose_overlay_cases(recs, 10)) == 5


# --------------------------------------------------------------------------- folders
def test_score_folders__perfect_prediction_gives_dice_1_hd95_0(phantom: tuple[Path, str], tmp_path: Path) -> None:
    src = phantom[0]
    pred = tmp_path / "pred"
    shutil.copytree(src / "labelsTr", pred)
    ref = tmp_path / "ref"
    shutil.copytree(src / "labelsTr", ref)
    (ref / "LICENSE").write_text("a reference folder may hold other files")
    shutil.copytree(src / "imagesTr", tmp_path / "imagesTr")  # MSD sibling: overlays over the scans
    shutil.copy(src / "dataset.json", tmp_path / "dataset.json")  # class names
    s = evaluation_scoring.score_folders(pred, ref, tmp_path / "out")
    assert s["source"]["overlay_images"] == str(tmp_path / "imagesTr")
    assert s["n_cases"] == 6
    assert list(s["classes"]) == ["RV", "MYO", "LV"]  # names from the MSD dataset.json
    for c in s["classes"].values():
        assert c["dice"]["mean"] == 1.0 and c["hd95"]["mean"] == 0.0 and c["asd"]["mean"] == 0.0
    for f in ("per_case.json", "per_case.csv", "summary.json", "summary.md", "plots/dice_boxplot.png"):
        assert (tmp_path / "out" / f).stat().st_size > 0
    assert len(list((tmp_path / "out" / "plots").glob("overlay_*.png"))) == 3


def test_score_folders__numbers_match_localcl_metrics(phantom: tuple[Path, str], tmp_path: Path) -> None:
    src = phantom[0]
    _perturbed_predictions(src, tmp_path / "pred")
    s = evaluation_scoring.score_folders(tmp_path / "pred", src / "labelsTr", tmp_path / "out", plots=False)
    per_case = json.loads((tmp_path / "out" / "per_case.json").read_text())
    rows = list(csv.DictReader((tmp_path / "out" / "per_case.csv").open()))
    assert len(per_case) == 6 and len(rows) == 18
    dice_lv = []
    for rec in per_case:
        ref_img = nib.load(src / "labelsTr" / f"{rec['case']}.nii.gz")
        pred = np.asarray(nib.load(tmp_path / "pred" / f"{rec['case']}.nii.gz").dataobj)
        want = evaluate_case(pred, np.asarray(ref_img.dataobj), ref_img.header.get_zooms(), [1, 2, 3])
        for k, name in ((1, "RV"), (2, "MYO"), (3, "LV")):
            for m in ("dice", "hd95", "asd"):
                assert nan_equal(rec["metrics"][name][m], want[k][m]), (rec["case"], name, m)
                row = next(r for r in rows if r["case"] == rec["case"] and r["class"] == name)
                col = {"dice": "dice", "hd95": "hd95_mm", "asd": "asd_mm"}[m]
                assert nan_equal(float(row[col]) if row[col] else None, want[k][m])
        dice_lv.append(want[3]["dice"])
    assert s["classes"]["LV"]["dice"]["mean"] == pytest.approx(np.mean(dice_lv))
    assert s["classes"]["LV"]["dice"]["std"] == pytest.approx(np.std(dice_lv))
    # the case without RV: Dice 0, distances undefined (null in JSON, empty in CSV)
    first = per_case[0]["metrics"]["RV"]
    assert first["dice"] == 0.0 and first["hd95"] is None
    assert s["classes"]["RV"]["hd95"]["n_missing"] == 1


def test_evaluate_cli__pred_ref_prints_table(
    phantom: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = phantom[0]
    _perturbed_predictions(src, tmp_path / "pred")
    rc = main(["evaluate", "--pred", str(tmp_path / "pred"), "--ref", str(src / "labelsTr"), "--no-plots"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "| LV | 3 |" in out and "mean foreground" in out
    assert (tmp_path / "pred" / "eval" / "summary.md").is_file()


def _cli_error(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("localcl: error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_evaluate_cli__bad_inputs_give_one_line_errors(
    phantom: tuple[Path, str], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    src = phantom[0]
    ref = src / "labelsTr"
    # a non-NIfTI file among the predictions
    bad = tmp_path / "bad"
    shutil.copytree(ref, bad)
    (bad / "notes.pdf").write_bytes(b"%PDF")
    assert "notes.pdf: not a NIfTI file" in _cli_error(["evaluate", "--pred", str(bad), "--ref", str(ref)], capsys)
    # a shape mismatch
    mism = tmp_path / "mism"
    mism.mkdir()
    f = sorted(ref.glob("*.nii.gz"))[0]
    img = nib.load(f)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:-2], img.affine), str(mism / f.name))
    err = _cli_error(["evaluate", "--pred", str(mism), "--ref", str(ref)], capsys)
    assert f.name in err and "shape" in err
    # a prediction without reference
    extra = tmp_path / "extra"
    extra.mkdir()
    shutil.copy(f, extra / "patient999_frame01.nii.gz")
    assert "no reference" in _cli_error(["evaluate", "--pred", str(extra), "--ref", str(ref)], capsys)
    # a corrupt .nii.gz
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / f.name).write_bytes(b"not gzip at all")
    assert "cannot read as NIfTI" in _cli_error(["evaluate", "--pred", str(corrupt), "--ref", str(ref)], capsys)
    # missing checkpoint; mixed modes; a half pair
    err = _cli_error(["evaluate", "--checkpoint", str(tmp_path / "nope"), "--store", phantom[1]], capsys)
    assert "nope" in err and "no such directory" in err
    assert "not both" in _cli_error(["evaluate", "--pred", str(ref), "--ref", str(ref), "--store", "x"], capsys)
    assert "go together" in _cli_error(["evaluate", "--pred", str(ref)], capsys)
    assert "nothing to evaluate" in _cli_error(["evaluate"], capsys)


# --------------------------------------------------------------------------- store + Ray Train
def test_evaluate_store__pretrain_model_and_bad_split_rejected_before_ray(
    phantom: tuple[Path, str], tiny_run: Path, tmp_path: Path
) -> None:
    pre = make_tiny_run(tmp_path, stage="pretrain")
    with pytest.raises(UserError, match="pretrain model has no segmentation head"):
        evaluation_job.evaluate_store(str(pre / "pretrain" / "model"), phantom[1], str(tmp_path / "o"))
    with pytest.raises(UserError, match="--split 'test2'.*known"):
        evaluation_job.evaluate_store(str(tiny_run), phantom[1], str(tmp_path / "o"), split="test2")
    with pytest.raises(UserError, match="--store"):
        evaluation_job.evaluate_store(str(tiny_run), str(tmp_path / "no-store"), str(tmp_path / "o"))


@pytest.mark.ray
def test_evaluate_store__two_workers_report_matches_metrics(
    ray_cluster, phantom: tuple[Path, str], tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import storage
    from ray_jobs.evaluation.inference import predict_case
    from ray_jobs.train.checkpoint import load_model

    out = tmp_path / "eval"
    monkeypatch.chdir(tmp_path)  # a relative --out must reach the workers as an absolute path
    summary = evaluation_job.evaluate_store(
        str(tiny_run), phantom[1], "eval", split="all", num_workers=2, save_predictions=True
    )
    st = storage.open_store(phantom[1])
    assert summary["n_cases"] == 6 and summary["cases"] == sorted(st.cases)
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert {
        "per_case.json",
        "per_case.csv",
        "summary.json",
        "summary.md",
        "plots/dice_boxplot.png",
        "plots/loss_finetune.png",
    } <= files
    assert len([f for f in files if f.startswith("plots/overlay_")]) == 3
    assert len([f for f in files if f.startswith("predictions/")]) == 6
    # every number equals localcl.metrics on the driver's own prediction of the same case
    model, spec = load_model(str(tiny_run / "finetune" / "model"))
    per_case = {r["case"]: r for r in json.loads((out / "per_case.json").read_text())}
    for case in st.cases:
        pred = predict_case(model, spec, st, case)
        want = evaluate_case(pred, st.label(case), st.meta(case)["spacing"], [1, 2, 3])
        for k, name in ((1, "RV"), (2, "MYO"), (3, "LV")):
            for m in ("dice", "hd95", "asd"):
                assert nan_equal(per_case[case]["metrics"][name][m], want[k][m], 1e-6), (case, name, m)
        saved = nib.load(out / "predictions" / f"{case}.nii.gz")
        np.testing.assert_array_equal(np.asarray(saved.dataobj), pred)
        np.testing.assert_allclose(saved.affine, np.asarray(st.meta(case)["affine"]))
    assert summary["source"]["n_workers"] == 2


def test_evaluate_cli__store_local_mode(
    ray_cluster,
    phantom: tuple[Path, str],
    tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--workers 0``: Ray Train local mode; default --out is RUN_DIR/eval/method-<split>."""
    monkeypatch.chdir(tiny_run.parent)  # relative paths work: made absolute before Ray starts
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(Path(tiny_run.name) / "finetune" / "model"),
            "--store",
            phantom[1],
            "--split",
            "val",
            "--workers",
            "0",
            "--overlays",
            "1",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0, out
    report = tiny_run / "eval" / "method-val"
    s = json.loads((report / "summary.json").read_text())
    assert s["n_cases"] == 2 and s["source"]["split"] == "val"
    assert "mean foreground" in out and str(report) in out
    assert len(list((report / "plots").glob("overlay_*.png"))) == 1


def test_evaluate_store__scores_each_stream_of_a_two_stream_model(
    ray_cluster, phantom: tuple[Path, str], tmp_path: Path
) -> None:
    """IDEAL's two decoders are scored alone as well as combined. The model exports
    ``inference: stream1``, so its combined prediction IS stream 1: both Dice must agree per
    case, and stream 2 (another decoder) must differ."""
    run = make_tiny_run(tmp_path, method="ideal", inference="stream1")
    s = evaluation_job.evaluate_store(
        str(run / "finetune" / "model"), phantom[1], str(tmp_path / "ev"), split="val", num_workers=0, plots=False
    )
    assert set(s["streams"]) == {"stream1", "stream2"}
    per_case = json.loads((tmp_path / "ev" / "per_case.json").read_text())
    for rec in per_case:
        assert rec["streams"]["stream1"] == pytest.approx(rec["mean_fg"]["dice"], abs=1e-9)
    assert s["streams"]["stream1"]["mean"] == pytest.approx(s["mean"]["dice"], abs=1e-9)
    assert any(abs(r["streams"]["stream2"] - r["streams"]["stream1"]) > 1e-3 for r in per_case)
    assert "stream2 alone (mean foreground)" in (tmp_path / "ev" / "summary.md").read_text()


def test_evaluate_store__single_stream_model_has_no_stream_scores(
    ray_cluster, phantom: tuple[Path, str], tiny_run: Path, tmp_path: Path
) -> None:
    s = evaluation_job.evaluate_store(
        str(tiny_run / "finetune" / "model"), phantom[1], str(tmp_path / "ev"), split="val", num_workers=0, plots=False
    )
    assert "streams" not in s


def test_evaluate_many__models_scored_in_one_job_get_the_reports_each_gets_alone(
    ray_cluster, phantom: tuple[Path, str], tiny_run: Path, tmp_path: Path
) -> None:
    """Two models (a two-stream IDEAL and a one-stream U-Net) in one job: each report equals
    the one :func:`evaluate_store` writes for that model alone, and the one the workers write
    when the models were still to be exported as the job was built (``exported=False``, the
    run's evaluation in its training worker group); a bad target is refused before any worker
    starts."""
    ideal = make_tiny_run(tmp_path / "i", method="ideal", inference="stream1") / "finetune" / "model"
    unet = tiny_run / "finetune" / "model"
    job = dict(split="val", num_workers=0, plots=False)
    alone = [
        evaluation_job.evaluate_store(str(m), phantom[1], str(tmp_path / f"alone{i}"), **job)
        for i, m in enumerate((ideal, unet))
    ]
    targets = [evaluation_job.EvalTarget(str(m), str(tmp_path / f"many{i}")) for i, m in enumerate((ideal, unet))]
    together = evaluation_job.evaluate_many(targets, phantom[1], **job)
    for i in range(2):
        assert together[i]["mean"] == alone[i]["mean"] and together[i]["source"] == alone[i]["source"]
        a = json.loads((tmp_path / f"alone{i}" / "per_case.json").read_text())
        b = json.loads((tmp_path / f"many{i}" / "per_case.json").read_text())
        assert a == b
    assert "streams" in together[0] and "streams" not in together[1]
    # the same models "pending", as a one-worker-group run's workers score them after training
    # (scaling.one_worker_group: the driver builds the job before the models exist)
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    later = [evaluation_job.EvalTarget(str(m), str(tmp_path / f"later{i}")) for i, m in enumerate((ideal, unet))]
    cfg = evaluation_job.eval_job_config(later, phantom[1], split="val", plots=False, exported=False)
    assert all(set(m) == {"pending"} for m in cfg["models"])
    TorchTrainer(
        evaluation_job.evaluate_in_worker, train_loop_config=cfg, scaling_config=ScalingConfig(num_workers=0)
    ).fit()
    for i, summary in enumerate(evaluation_job.read_summaries(cfg)):
        assert summary["mean"] == together[i]["mean"] and summary["source"] == together[i]["source"]
        b = json.loads((tmp_path / f"many{i}" / "per_case.json").read_text())
        assert json.loads((tmp_path / f"later{i}" / "per_case.json").read_text()) == b
    pre = make_tiny_run(tmp_path / "p", stage="pretrain")
    bad = [targets[0], evaluation_job.EvalTarget(str(pre / "pretrain" / "model"), str(tmp_path / "x"))]
    with pytest.raises(UserError, match="pretrain model has no segmentation head"):
        evaluation_job.evaluate_many(bad, phantom[1], **job)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- model card
def test_model_card__fields_hash_fingerprint_and_markdown(phantom: tuple[Path, str], tmp_path: Path) -> None:
    import storage
    from ray_jobs.config import Config
    from ray_jobs.evaluation.model_card import (
        build_model_card,
        model_card_markdown,
        store_fingerprint,
        write_model_card,
    )
    from storage.phantom import make_phantom_dataset

    cfg = Config(name="card-test")
    summary = evaluation_scoring.summarise(
        [
            evaluation_scoring.case_record(
                "c", {1: {"dice": 0.8, "hd95": 3.0, "asd": 1.0}}, {1: "LV"}, (1, 1, 1), (1, 1, 1)
            )
        ]
    )
    card = build_model_card(
        run_name="card-test",
        method="ideal",
        strategy="supervised",
        store=phantom[1],
        label_budget=1,
        labelled_cases=["patient001_frame01"],
        config=cfg.to_dict(),
        metrics={"method": summary},
    )
    assert card["config_hash"] == cfg.hash()
    assert card["data"]["store_fingerprint"] == store_fingerprint(phantom[1])  # stable
    assert card["code"]["git_sha"] is None or len(card["code"]["git_sha"]) == 40
    assert card["code"]["git_sha"] or card["code"]["version"]
    assert card["metrics"]["method"]["mean_foreground"]["dice"]["mean"] == pytest.approx(0.8)
    # a store with one case fewer has another fingerprint
    src2 = make_phantom_dataset(tmp_path / "p2", n_cases=4, seed=1, shape=(48, 48, 4), spacing=(3.0, 3.0, 8.0))
    storage.ingest(src2, str(tmp_path / "s2.zarr"), progress=False)
    assert store_fingerprint(str(tmp_path / "s2.zarr")) != card["data"]["store_fingerprint"]
    paths = write_model_card(str(tmp_path / "run"), card)
    assert len(paths) == 2
    loaded = json.loads((tmp_path / "run" / "model_card.json").read_text())
    assert loaded["method"] == {"pretrain": "ideal", "finetune": "supervised"}
    md = (tmp_path / "run" / "MODEL_CARD.md").read_text()
    assert "`ideal`" in md and "0.800 ± 0.000" in md and cfg.hash() in md
    assert "- label budget: 1 patient(s), 1 labelled case(s): patient001_frame01" in md
    # a run that named its labelled volumes (data.label_cases) has no patient count
    named = model_card_markdown({**card, "data": {**card["data"], "label_budget": None}})
    assert "- label budget: 1 labelled case(s): patient001_frame01" in named


# --------------------------------------------------------------------------- plots
FINETUNE_HISTORY = (
    "epoch,start_epoch,global_step,lr,time_s,samples_per_s,loss,sup,pl,lambda_c,val_dice,val_hd95,"
    "val_time_s,best_epoch,best_val_dice\n"
    "1,1,8,0.001,3.0,10.0,2.0,1.5,0.5,0.1,0.30,20.0,1.2,1,0.30\n"
    "2,1,16,0.001,3.1,11.0,1.1,0.8,0.3,0.4,0.50,12.0,1.1,2,0.50\n"
)


def test_loss_curves__draw_loss_terms_and_validation_dice_on_its_own_axis() -> None:
    """The finetune loss plot draws loss terms only (no start_epoch / global_step / best_epoch /
    timing columns), the validation Dice alone on the Dice axis, distances on their own mm axis,
    and titles that name the run, not a path."""
    import io

    import matplotlib.pyplot as plt
    import pandas as pd

    from ray_jobs.evaluation import plots as P

    hist = pd.read_csv(io.StringIO(FINETUNE_HISTORY))
    assert P.curve_series(hist) == {"losses": ["loss", "sup", "pl"], "dice": ["val_dice"], "distances": ["val_hd95"]}
    fig = P.loss_curves_figure(hist, "ideal-acdc finetune")
    try:
        loss_ax, dice_ax, mm_ax = fig.axes
        assert [ln.get_label() for ln in loss_ax.get_lines()] == ["loss", "sup", "pl"]
        assert [ln.get_label() for ln in dice_ax.get_lines()] == ["val_dice"]
        assert dice_ax.get_ylabel() == "Dice" and dice_ax.get_ylim()[1] <= 1.02
        assert [ln.get_label() for ln in mm_ax.get_lines()] == ["val_hd95"]
        assert mm_ax.get_ylabel() == "distance (mm)"
        assert loss_ax.get_title() == "ideal-acdc finetune: training losses"
        assert dice_ax.get_title() == "ideal-acdc finetune: validation"
    finally:
        plt.close(fig)
    pre = P.loss_curves_figure(hist[["epoch", "start_epoch", "global_step", "loss", "time_s"]], "run pretrain")
    try:
        assert len(pre.axes) == 1 and [ln.get_label() for ln in pre.axes[0].get_lines()] == ["loss"]
    finally:
        plt.close(pre)


def test_write_report__loss_plot_titles_name_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_jobs.evaluation import plots as P

    stage = tmp_path / "runs" / "ideal-acdc" / "finetune"
    stage.mkdir(parents=True)
    (stage / "history.csv").write_text(FINETUNE_HISTORY)
    titles: list[str] = []
    real = P.loss_curves_png
    monkeypatch.setattr(P, "loss_curves_png", lambda h, t: titles.append(t) or real(h, t))
    rec = evaluation_scoring.case_record(
        "c1", {1: {"dice": 0.8, "hd95": 2.0, "asd": 1.0}}, {0: "bg", 1: "fg"}, (4, 4, 2), (1.0, 1.0, 1.0)
    )
    evaluation_scoring.write_report(str(tmp_path / "eval"), [rec], histories={"finetune": str(stage / "history.csv")})
    assert titles == ["ideal-acdc finetune"]
    assert evaluation_scoring.history_run_name("s3://bucket/runs/r1/finetune/history.csv") == "r1"


def test_plots__png_output_and_input_checks() -> None:
    import io

    import pandas as pd

    from ray_jobs.evaluation import plots as P

    png_magic = b"\x89PNG\r\n\x1a\n"
    hist = pd.read_csv(
        io.StringIO(
            "epoch,loss,loss_dice,lr,time_s,val_dice,val_hd95\n0,2.0,1.2,0.001,3,0.3,20\n1,1.1,0.7,0.001,6,0.5,12\n"
        )
    )
    assert P.loss_curves_png(hist, "finetune").startswith(png_magic)
    assert P.loss_curves_png(hist[["epoch", "loss"]], "pretrain").startswith(png_magic)
    with pytest.raises(ValueError, match="epoch"):
        P.loss_curves_png(hist.drop(columns="epoch"), "finetune")
    assert P.dice_boxplot_png({"LV": [0.9, 0.8, float("nan")], "RV": []}).startswith(png_magic)
    img = np.zeros((2, 8, 8), np.float32)
    lab = np.zeros((2, 8, 8), np.uint8)
    lab[:, 2:5, 2:5] = 3
    assert P.overlay_png(img, lab, lab, [3, 4], {3: "LV"}, "c").startswith(png_magic)
    with pytest.raises(ValueError, match="share one"):
        P.overlay_png(img, lab[:1], lab, [3, 4], {3: "LV"}, "c")


def test_write_report__fsspec_uri_and_histories_beside_the_model() -> None:
    """Reports and history look-up work on fsspec URIs (memory:// here, s3:// in production)."""
    import fsspec

    fs = fsspec.filesystem("memory")
    run = "memory://evaltest-run"
    fs.makedirs("/evaltest-run/finetune/model", exist_ok=True)
    fs.pipe("/evaltest-run/finetune/history.csv", b"epoch,loss,val_dice\n0,1.0,0.2\n1,0.5,0.6\n")
    fs.pipe("/evaltest-run/pretrain/history.csv", b"epoch,loss\n0,4.0\n1,3.0\n")
    hist = evaluation_scoring.find_histories(f"{run}/finetune/model")
    assert sorted(hist) == ["finetune", "pretrain"]
    for stage, uri in hist.items():
        assert uri.startswith("memory://") and uri.endswith(f"evaltest-run/{stage}/history.csv")
    names = {0: "background", 3: "LV"}
    recs = [
        evaluation_scoring.case_record("a", {3: {"dice": 0.5, "hd95": 1.0, "asd": 0.5}}, names, (2, 2, 2), (1, 1, 1))
    ]
    s = evaluation_scoring.write_report(f"{run}/eval/method", recs, label_names=names, histories=hist)
    assert set(s["files"]) >= {"plots/loss_pretrain.png", "plots/loss_finetune.png", "plots/dice_boxplot.png"}
    for f in s["files"]:
        assert fs.exists(f"/evaltest-run/eval/method/{f}")
    assert json.loads(fs.cat("/evaltest-run/eval/method/summary.json"))["classes"]["LV"]["dice"]["mean"] == 0.5
    fs.rm("/evaltest-run", recursive=True)


def test_eval_workers__one_per_case_at_most_and_elastic_when_the_run_is() -> None:
    """``localcl run``'s evaluation job: ``scaling.num_workers`` capped at the number of cases;
    an elastic run gets an elastic job (a cluster that lost a node still evaluates: a fixed
    2-worker job waited forever on the one node left, found by the demo fault run)."""
    from ray_jobs.config import Config
    from ray_jobs.train.run_eval import eval_workers

    def cfg(workers: object) -> Config:
        return Config.model_validate({"name": "x", "data": {"store": "s.zarr"}, "scaling": {"num_workers": workers}})

    assert eval_workers(cfg(2), 4) == 2 and eval_workers(cfg(4), 3) == 3 and eval_workers(cfg(0), 2) == 0
    assert eval_workers(cfg([1, 2]), 4) == (1, 2)
    assert eval_workers(cfg([2, 4]), 3) == (2, 3) and eval_workers(cfg([2, 4]), 1) == (1, 1)
