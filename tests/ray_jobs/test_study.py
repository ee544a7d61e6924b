"""`localcl study`: config validation (before Ray), cell planning, label hygiene of the plans,
the report arithmetic, and a real micro study (2 methods x 1 budget x 1 seed) on a small ACDC
subset in Ray Train local mode that writes the tables and the curve and resumes cell by cell."""

from __future__ import annotations

import copy
import csv
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from ray_jobs.errors import ConfigError, UserError
from ray_jobs.study import cells as study_cells
from ray_jobs.study import report as study_report
from ray_jobs.study import run as study_run
from ray_jobs.study import spec as study_spec

LABELLED = ["patient099", "patient038", "patient050"]  # splits.json ssl4mis_labeled_patients["3"]
UNLABELLED = ["patient100", "patient058"]
VAL = ["patient002"]
TINY = {"widths": [8, 16, 32]}


def micro(store: str = "store.zarr", **over: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": "micro",
        "baseline": "supervised",
        "seeds": [0],
        "require_all_methods": False,
        "budgets": [{"name": "1vol", "cases": ["patient099_frame01"], "label": "1 volume"}],
        "base": {
            "data": {
                "store": store,
                "size": [64, 64],
                "spacing_mm": [5.0, 5.0],
                "splits": {"pool": "train", "val": None, "test": "val"},
            },
            "evaluate": {"plots": False},
            "scaling": {"num_workers": 0},
            "logging": {"tensorboard": False, "progress": False},
        },
        "stage_defaults": {
            "pretrain": {"method": dict(TINY), "schedule": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4}},
            "finetune": {"method": dict(TINY), "schedule": {"epochs": 2, "steps_per_epoch": 2, "batch_size": 4}},
        },
        "methods": {
            "supervised": {"finetune": {"method": {"name": "supervised"}}},
            "lrc": {"pretrain": {"method": {"name": "lrc"}}, "finetune": {"method": {"name": "supervised"}}},
        },
    }
    for key, value in over.items():
        node = d
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return d


# --------------------------------------------------------------------------- validation
def test_load_study__shipped_configs_cover_every_method(monkeypatch):
    from localcl.methods import METHODS

    cpu, paper = study_spec.load_study("acdc_cpu"), study_spec.load_study("ray_jobs/configs/study/acdc_paper.yaml")
    for st, extra in ((cpu, {"supervised_2x", "lrc_cps"}), (paper, set())):
        assert set(st.methods) == set(METHODS) | extra and st.baseline == "supervised"
        assert [b.name for b in st.budgets] == ["1vol", "3pat", "7pat"]
        assert len(st.seeds) == 3 and len(study_cells.cells(st)) == (len(METHODS) + len(extra)) * 3 * 3
    # compute-matched: PLCL (round 0 + 1 round) against the baseline at its step count
    assert cpu.compare_to == {"plcl": "supervised_2x"}
    steps = {
        m: study_cells.compute_of(study_spec.cell_config(cpu, m, cpu.budgets[1], 0, store="s.zarr", init="/x"))
        for m in ("supervised", "supervised_2x", "plcl", "ideal")
    }
    assert steps["plcl"]["finetune_steps"] == steps["supervised_2x"]["finetune_steps"] == 960
    assert steps["ideal"]["finetune_steps"] == steps["supervised"]["finetune_steps"] == 480
    assert steps["ideal"]["pretrain_steps"] == 800
    # the pipeline cell: LRC's pretraining run (shared with the lrc cells), IDEAL's fine-tuning
    pipe = study_spec.cell_config(cpu, "lrc_cps", cpu.budgets[1], 0, store="s.zarr", init="/x")
    ideal = study_spec.cell_config(cpu, "ideal", cpu.budgets[1], 0, store="s.zarr", init="/x")
    assert study_spec.pretrain_owner(cpu, "lrc_cps") == "lrc" and pipe.finetune.method == ideal.finetune.method
    assert study_cells.compute_of(pipe)["finetune_steps"] == 480
    # lrc_cps's fine-tuning is a YAML alias of IDEAL's; a --set on one leaves the other alone
    tuned = study_spec.load_study("acdc_cpu", ["methods.ideal.finetune.method.lambda_max=0.5"])
    assert tuned.methods["ideal"]["finetune"]["method"]["lambda_max"] == 0.5
    assert tuned.methods["lrc_cps"]["finetune"]["method"]["lambda_max"] == 1.0
    assert cpu.budgets[0].cases == ["patient099_frame01"] and cpu.budgets[1].patients == 3
    c = study_spec.cell_config(cpu, "ideal", cpu.budgets[2], 1, store="s.zarr", init="/x")
    assert c.data.size == (96, 96) and c.data.seed == 1 and c.data.splits.val is None
    assert c.finetune.method.name == "ideal" and c.finetune.init == "/x"
    assert c.finetune.schedule.unlabelled_batch_size == 8 and c.scaling.num_workers == 0
    p = study_spec.cell_config(paper, "ideal", paper.budgets[2], 1, store="s.zarr", init="/x")
    assert p.data.size == (192, 192) and p.finetune.schedule.epochs * p.finetune.schedule.steps_per_epoch == 10000
    # the first cells are the baseline, and a cell differs from another budget's by its hash
    assert study_cells.cells(cpu)[0].method == "supervised"
    assert c.hash() != study_spec.cell_config(cpu, "ideal", cpu.budgets[1], 1, store="s.zarr", init="/x").hash()


def test_ablation_ideal_scratch__acdc_cpu_without_ideal_pretraining():
    """benchmarks/label_efficiency/ablation_ideal_scratch.yaml is acdc_cpu with IDEAL fine-tuned
    from random initialisation: the same cells and settings otherwise (docs/results/acdc.md)."""
    repo = Path(__file__).resolve().parents[2]
    abl = study_spec.load_study(repo / "benchmarks" / "label_efficiency" / "ablation_ideal_scratch.yaml")
    cpu = study_spec.load_study("acdc_cpu")
    assert set(abl.methods) == {"supervised", "ideal"} and abl.seeds == cpu.seeds
    assert "pretrain" not in study_spec.method_sections(abl, "ideal")
    for key in ("supervised", "ideal"):
        a = study_spec.cell_config(abl, key, abl.budgets[1], 0, store="s.zarr", init=None)
        c = study_spec.cell_config(cpu, key, cpu.budgets[1], 0, store="s.zarr", init=None)
        assert a.finetune == c.finetune and a.data == c.data


def test_lrc_cps_pseed__acdc_cpu_best_pipeline_with_one_pretraining_per_seed():
    """benchmarks/label_efficiency/lrc_cps_pseed.yaml is acdc_cpu's supervised, lrc and lrc_cps
    cells at 3 patients with one pretraining per seed: the same cells and pretraining otherwise."""
    repo = Path(__file__).resolve().parents[2]
    abl = study_spec.load_study(repo / "benchmarks" / "label_efficiency" / "lrc_cps_pseed.yaml")
    cpu = study_spec.load_study("acdc_cpu")
    assert set(abl.methods) == {"supervised", "lrc", "lrc_cps"} and abl.seeds == cpu.seeds
    assert abl.pretrain_per_seed and [b.name for b in abl.budgets] == ["3pat"]
    assert study_spec.pretrain_owner(abl, "lrc_cps") == "lrc"
    for key in abl.methods:
        a = study_spec.cell_config(abl, key, abl.budgets[0], 1, store="s.zarr", init=None)
        c = study_spec.cell_config(cpu, key, cpu.budgets[1], 1, store="s.zarr", init=None)
        assert a.finetune == c.finetune and a.data == c.data
    pa = study_spec.pretrain_config(abl, "lrc_cps", store="s.zarr", budget=None, seed=1)
    pc = study_spec.pretrain_config(cpu, "lrc_cps", store="s.zarr", budget=None, seed=1)
    assert pa.pretrain == pc.pretrain


@pytest.mark.parametrize(
    "key,value,needle",
    [
        ("methods.nope", {"finetune": {"method": {"name": "supervised"}}}, "methods.nope: not a method"),
        ("baseline", "ideal", "baseline: 'ideal' is not one of methods"),
        ("base.data.splits.val", "val", "base.data.splits.val: must be null"),
        ("base.name", "x", "base.name: set per method"),
        ("seeds", [], "seeds"),
        ("seeds", [1, 1], "seeds"),
        ("budgets", [{"name": "b", "patients": 2, "cases": ["a"]}], "exactly one of 'patients' or 'cases'"),
        ("budgets", [{"name": "a b", "patients": 2}], "budgets.0.name"),
        (
            "methods.supervised",
            {"finetune": {"method": {"name": "supervised", "widthz": 3}}},
            "methods.supervised: invalid config: finetune.method: Value error, unknown config key(s) ['widthz']",
        ),
        ("methods.lrc.pretrain.schedule", {"epochs": 0}, "methods.lrc: invalid config: pretrain.schedule.epochs"),
        ("methods.lrc.oops", {}, "methods.lrc.oops: unknown key"),
        ("stage_defaults.baseline", {}, "stage_defaults.baseline: not a stage"),
    ],
)
def test_load_study__bad_config_names_the_key(key, value, needle):
    d = micro()
    node = d
    *path, last = key.split(".")
    for p in path:
        node = node[p]
    node[last] = value
    with pytest.raises(ConfigError) as exc:
        study_spec.load_study(d)
    assert needle in str(exc.value)


def test_load_study__require_all_methods_lists_the_missing(tmp_path):
    d = micro(require_all_methods=True)
    with pytest.raises(ConfigError, match=r"methods: missing \['glcl', 'ideal', 'mixcl', 'plcl'\]"):
        study_spec.load_study(d)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(micro()))
    assert study_spec.load_study(path, ["seeds=[0, 3]"]).seeds == [0, 3]
    with pytest.raises(ConfigError, match="no file or shipped study named 'nope'"):
        study_spec.load_study("nope")


def test_pretrain_reads_labels__matches_the_methods_steps():
    """Label-free claims are checked on the real steps: with the view generator reseeded, the
    loss is identical whether the labels are hidden (-1) or given; MixCL's is not."""
    import torch

    from localcl.methods import METHODS

    torch.manual_seed(0)
    img = torch.rand(4, 1, 32, 32)
    lab = torch.zeros(4, 32, 32, dtype=torch.long)
    lab[:, 8:24, 8:24] = 1
    lab[:, 12:20, 12:20] = 2
    sp = (torch.arange(32 * 32).view(32, 32) // 64).expand(4, 32, 32).clone()
    for name, kw in (("ideal", {"queue_size": 64, "proj_dim": 8}), ("lrc", {}), ("mixcl", {})):
        cls = METHODS[name]
        cfg = cls.Config(widths=(4, 8), decoder_widths=(4,), **kw)
        losses = []
        for y in (lab, torch.full_like(lab, -1)):
            torch.manual_seed(1)
            m = cls(cfg, in_channels=1, num_classes=3)
            m.reseed(5)
            batch = {"image": img, "label": y, "superpixels": sp}
            losses.append(float(m.pretrain_step(batch, step=0)["loss"].detach()))
        sees = cls.pretrain_reads_labels(cfg)
        assert sees == (name == "mixcl")
        assert (losses[0] != losses[1]) == sees, (name, losses)
    assert METHODS["lrc"].pretrain_reads_labels(METHODS["lrc"].Config(global_loss="supervised"))


# --------------------------------------------------------------------------- report maths
def _rec(method: str, budget: str, seed: int, dice: float, **kw: Any) -> dict[str, Any]:
    return {
        "method": method,
        "budget": budget,
        "seed": seed,
        "budget_label": {"a": "1 volume", "b": "3 patients"}[budget],
        "labelled_volumes": 2,
        "labelled_patients": {"a": 0.5, "b": 3.0}[budget],
        "pretrain": None if method == "supervised" else method,
        "strategy": "supervised",
        "dice": dice,
        "hd95": kw.get("hd95", 10.0),
        "asd": 2.0,
        "dice_RV": dice - 0.1,
        "dice_MYO": dice,
        "dice_LV": dice + 0.1,
        "hd95_RV": 12.0,
        "n_cases": 20,
        "finetune_steps": kw.get("steps", 160),
        "labelled_views": kw.get("steps", 160) * 8,
        "unlabelled_views": 0,
        "pretrain_steps": 0 if method.startswith("supervised") else 120,
    }


def test_aggregate__sd_over_seeds_and_paired_delta():
    recs = [
        _rec("supervised", "a", 0, 0.50),
        _rec("supervised", "a", 1, 0.60),
        _rec("lrc", "a", 0, 0.55),
        _rec("lrc", "a", 1, 0.58),
        _rec("supervised", "b", 0, 0.70),
        _rec("lrc", "b", 0, 0.65),
    ]
    agg = {(r["method"], r["budget"]): r for r in study_report.aggregate(recs, "supervised")}
    base, lrc = agg[("supervised", "a")], agg[("lrc", "a")]
    assert base["dice"] == pytest.approx(0.55) and base["dice_sd"] == pytest.approx(0.1 / 2**0.5)
    assert base["delta"] is None
    # paired by seed: (0.55 - 0.50, 0.58 - 0.60) -> mean 0.015, sd |0.05 + 0.02| / sqrt(2)
    assert lrc["delta"] == pytest.approx(0.015) and lrc["delta_sd"] == pytest.approx(0.07 / 2**0.5)
    assert lrc["n_paired"] == 2 and lrc["dice_LV"] == pytest.approx(0.665)
    one = agg[("lrc", "b")]
    assert one["delta"] == pytest.approx(-0.05) and one["delta_sd"] is None and one["dice_sd"] == 0.0


def test_results_markdown__partial_flag_published_rows_and_plain_verdict():
    st = study_spec.load_study(
        micro(budgets=[{"name": "a", "cases": ["patient099_frame01"]}, {"name": "b", "patients": 3}])
    )
    recs = [
        _rec("supervised", "a", 0, 0.50),
        _rec("lrc", "a", 0, 0.45),
        _rec("supervised", "b", 0, 0.70),
        _rec("lrc", "b", 0, 0.75),
    ]
    md = study_report.results_markdown(st, recs, total=6)
    assert "4 of 6 cells (**partial**" in md
    assert "| **supervised** (baseline) | — | supervised | — | 160 (1280 / 0) | 0 | 0.500 | 0.700 |" in md
    assert "| lrc | lrc | supervised | supervised | 160 (1280 / 0) | 120 | 0.450 (Δ -0.050) | 0.750 (Δ +0.050) |" in md
    assert "| glcl | 0.725 | 0.789 | 0.872 |" in md and "| ideal | 0.738 | 0.846 | 0.879 |" in md
    assert "- supervised: 0.500 here vs 0.614 published" in md
    assert "- lrc vs `supervised`: above at 3 patients (+0.050); below at 1 volume (-0.050)" in md
    md2 = study_report.results_markdown(st, [_rec("supervised", "a", 0, 0.5), _rec("lrc", "a", 0, 0.4)], 2)
    assert "- lrc vs `supervised`: below at 1 volume (-0.100)" in md2 and "partial" not in md2
    png = study_report.curve_png(st, recs)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_results_markdown__per_stream_and_encoder_diagnostics_tables():
    """Stream Dice are aggregated over seeds like any metric; the diagnostics table has one row
    per (encoder, budget), the random encoder first."""
    st = study_spec.load_study(micro())
    diag = {"probe_dice": 0.43, "weight_norm": 3.2, "act_std": 0.5, "act_std_min": 0.1, "dead_frac": 0.05}
    rand = {**diag, "encoder": "random", "probe_dice": 0.27, "bn_dlogvar": 0.4}
    recs = [{**_rec("supervised", "a", s, 0.5), "encoder": None, "encoder_random": rand} for s in (0, 1)] + [
        {
            **_rec("lrc", "a", s, 0.6),
            "stream1_dice": 0.55 + 0.1 * s,
            "stream2_dice": 0.5,
            "encoder": {**diag, "encoder": "lrc-s0", "bn_dlogvar": 0.9},
            "encoder_random": rand,
        }
        for s in (0, 1)
    ]
    md = study_report.results_markdown(st, recs, total=4)
    assert "| method | budget | combined | stream1 | stream2 |" in md
    assert "| lrc | 1 volume | 0.600 ± 0.000 | 0.600 ± 0.071 | 0.500 ± 0.000 |" in md
    rows = [line for line in md.splitlines() if line.startswith(("| random |", "| lrc-s0 |"))]
    assert rows == [
        "| random | 1 volume | 0.270 | 3.20 | 0.500 (0.100) | 5.0 % | 0.40 |",
        "| lrc-s0 | 1 volume | 0.430 | 3.20 | 0.500 (0.100) | 5.0 % | 0.90 |",
    ]
    assert "Per prediction stream" not in study_report.results_markdown(st, recs[:2], total=4)


def test_aggregate__compare_to_pairs_each_method_with_its_compute_matched_baseline():
    recs = [
        _rec("supervised", "a", 0, 0.50),
        _rec("supervised_320", "a", 0, 0.58, steps=320),
        _rec("plcl", "a", 0, 0.60, steps=320),
        _rec("lrc", "a", 0, 0.52),
        _rec("ideal", "a", 0, 0.56, steps=320),
    ]
    agg = {r["method"]: r for r in study_report.aggregate(recs, "supervised", {"plcl": "supervised_320"})}
    assert agg["plcl"]["compared_to"] == "supervised_320" and agg["plcl"]["delta"] == pytest.approx(0.02)
    assert agg["plcl"]["steps_match"] is True
    assert agg["lrc"]["compared_to"] == "supervised" and agg["lrc"]["steps_match"] is True
    assert agg["ideal"]["steps_match"] is False  # 320 steps against the 160-step baseline
    assert agg["supervised_320"]["delta"] == pytest.approx(0.08)  # an extra baseline vs the main one


def test_verdict__noise_band_and_not_compute_matched_flag():
    methods = dict(
        micro()["methods"], ideal={"pretrain": {"method": {"name": "ideal"}}, "finetune": {"method": {"name": "ideal"}}}
    )
    st = study_spec.load_study(micro(budgets=[{"name": "a", "cases": ["patient099_frame01"]}], methods=methods))
    recs = [_rec("supervised", "a", s, 0.50 + 0.01 * s) for s in range(3)]
    recs += [_rec("lrc", "a", s, 0.50 + 0.01 * s + d) for s, d in enumerate((0.02, -0.01, 0.00))]
    recs += [_rec("ideal", "a", s, 0.60 + 0.01 * s, steps=320) for s in range(3)]
    md = study_report.results_markdown(st, recs, total=9)
    assert "- lrc vs `supervised`: within noise at 1 volume (+0.003 ± 0.018)" in md
    assert "- ideal vs `supervised`: above at 1 volume (+0.100) [not compute-matched]" in md
    assert "(Δ +0.100, ≠ steps)" in md


def test_verdict__a_single_seed_difference_that_prints_as_zero_is_tied():
    st = study_spec.load_study(
        micro(budgets=[{"name": "a", "cases": ["patient099_frame01"]}, {"name": "b", "patients": 3}])
    )
    recs = [_rec("supervised", "a", 0, 0.5), _rec("lrc", "a", 0, 0.4998)]
    recs += [_rec("supervised", "b", 0, 0.5), _rec("lrc", "b", 0, 0.4990)]
    md = study_report.results_markdown(st, recs, total=4)
    assert "- lrc vs `supervised`: tied at 1 volume (+0.000); below at 3 patients (-0.001) (paired over 1 seed)." in md


def test_check_study__extra_baseline_cells_and_compare_to_are_validated():
    ok = micro(
        methods={
            "supervised": {"finetune": {"method": {"name": "supervised"}}},
            "supervised_2x": {"finetune": {"method": {"name": "supervised"}}},
        },
        compare_to={"supervised_2x": "supervised"},
    )
    st = study_spec.load_study(ok)
    study_spec.check_study(st)
    assert [c.method for c in study_cells.cells(st)][:2] == ["supervised", "supervised_2x"]
    bad = micro(
        methods={
            "supervised": {"finetune": {"method": {"name": "supervised"}}},
            "supervised_x": {"finetune": {"method": {"name": "ideal"}}},
        }
    )
    with pytest.raises(ConfigError, match="extra baseline"):
        study_spec.check_study(study_spec.load_study(bad))
    bad2 = micro(compare_to={"lrc": "glcl"})
    with pytest.raises(ConfigError, match="compare_to.lrc"):
        study_spec.check_study(study_spec.load_study(bad2))


def test_check_study__a_pipeline_cell_names_both_its_methods():
    """A key outside METHODS is a pipeline cell when its pretrain and finetune sections both name
    their method: LRC's pretraining (shared with the lrc cells) then IDEAL's fine-tuning."""
    d = micro()
    d["methods"]["lrc_cps"] = {"pretrain": {"method": {"name": "lrc"}}, "finetune": {"method": {"name": "ideal"}}}
    st = study_spec.load_study(d)
    cell = next(c for c in study_cells.cells(st) if c.method == "lrc_cps")
    cfg = study_spec.cell_config(st, "lrc_cps", st.budgets[0], 0, store="s.zarr", init=None)
    assert cfg.finetune is not None and cfg.finetune.method.name == "ideal"
    assert study_spec.pretrain_owner(st, "lrc_cps") == "lrc"
    assert study_cells.pretrain_dir(st, "/s", cell) == "/s/pretrain/lrc-s0"
    for bad, needle in (
        ({"finetune": {"method": {"name": "ideal"}}}, "nor a pipeline cell"),  # no pretrain section
        ({"pretrain": {"method": {}}, "finetune": {"method": {"name": "ideal"}}}, "nor a pipeline cell"),
        ({"pretrain": {"method": {"name": "lrc"}}}, "needs a 'finetune' section"),
    ):
        d2 = micro()
        d2["methods"]["lrc_cps"] = bad
        with pytest.raises(ConfigError, match=needle):
            study_spec.load_study(d2)
    d3 = micro()
    d3["methods"]["lrc/cps"] = d["methods"]["lrc_cps"]
    with pytest.raises(ConfigError, match="a cell name is a directory name"):
        study_spec.load_study(d3)


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def tiny_store(acdc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    import storage

    uri = str(tmp_path_factory.mktemp("study") / "acdc.zarr")
    cases = [f"{p}_frame{f:02d}" for p in LABELLED + UNLABELLED + VAL for f in (1, 2)]
    storage.ingest(str(acdc_dir), uri, cases=cases, workers=2, progress=False)
    return uri


def test_plans__budgets_fixed_and_pretraining_label_free(tiny_store, tmp_path):
    st = study_spec.load_study(
        micro(tiny_store, budgets=[{"name": "1vol", "cases": ["patient099_frame01"]}, {"name": "3pat", "patients": 3}])
    )
    data = study_cells.open_data(st, str(tmp_path), log=lambda m: None)
    assert data.test == ["patient002_frame01", "patient002_frame02"] and data.num_classes == 4
    three = study_cells.budget_cases(data, st.budgets[1], 0, "train")
    assert sorted({c.split("_")[0] for c in three}) == sorted(LABELLED) and len(three) == 6
    assert study_cells.patient_equivalents(data, ["patient099_frame01"]) == 0.5
    assert study_cells.patient_equivalents(data, three) == 3.0
    cfg = study_spec.cell_config(st, "lrc", st.budgets[0], 0, store=tiny_store, init=None)
    pre = study_cells.pretrain_plan(data, cfg, [])
    assert pre.labelled == [] and sorted(pre.unlabelled) == sorted(data.pool) == sorted(pre.pretrain_cases)
    assert not set(pre.pretrain_cases) & set(data.test)
    aware = study_cells.pretrain_plan(data, cfg, ["patient099_frame01"])
    assert aware.labelled == ["patient099_frame01"]
    assert not any(c.startswith("patient099") for c in aware.unlabelled)  # ES frame: neither
    cell = study_cells.cell_plan(data, cfg, ["patient099_frame01"], use_unlabelled=False)
    assert cell.unlabelled == [] and cell.val == [] and cell.test == data.test
    bad = study_spec.Budget(name="x", cases=["patient002_frame01"])  # a val case is not in the pool
    with pytest.raises(
        UserError, match=r"budgets.x.cases: \['patient002_frame01'\] are not labelled cases of split 'train'"
    ):
        study_cells.budget_cases(data, bad, 0, "train")
    with pytest.raises(UserError, match="budgets.y.patients: n_patients=9 exceeds"):
        study_cells.budget_cases(data, study_spec.Budget(name="y", patients=9), 0, "train")


def test_run_study__micro_study_writes_report_and_resumes(ray_cluster, tiny_store, tmp_path):
    """supervised + LRC (pretraining shared, label-free) on 1 volume, 1 seed: the cells, the
    tables, the curve; a second run skips both cells; a different config is refused."""
    st = study_spec.load_study(micro(tiny_store))
    sdir = str(tmp_path / "study")
    logs: list[str] = []
    # --only-method: the baseline's cell alone, the report marked partial
    part = study_run.run_study(st, sdir, only_methods=["supervised"], log=logs.append)
    assert (part["done"], part["total"]) == (1, 2) and json.loads(Path(sdir, "results.json").read_text())["partial"]
    assert not Path(sdir, "cells", "lrc").exists() and not Path(sdir, "pretrain").exists()
    out = study_run.run_study(st, sdir, resume=True, log=logs.append)
    assert out["done"] == out["total"] == 2
    with open(os.path.join(sdir, "results.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["budget"], r["seed"]) for r in rows] == [("supervised", "1vol", "0"), ("lrc", "1vol", "0")]
    for r in rows:
        assert 0.0 <= float(r["dice"]) <= 1.0 and r["labelled_volumes"] == "1"
        assert float(r["labelled_patients"]) == 0.5 and r["unlabelled_volumes"] == "0"
        assert {"dice_RV", "dice_MYO", "dice_LV", "hd95"} <= set(r)
    res = json.loads(Path(sdir, "results.json").read_text())
    assert res["partial"] is False and len(res["aggregate"]) == 2
    md = Path(sdir, "results.md").read_text()
    assert "2 of 2 cells" in md and "| lrc | lrc | supervised |" in md and "Published" in md
    assert Path(sdir, "curve.png").read_bytes()[:4] == b"\x89PNG"
    pre = json.loads(Path(sdir, "pretrain", "lrc-s0", "pretrain.json").read_text())
    assert pre["labels_seen"] == [] and pre["cases"] == 10  # whole train pool, labels hidden
    cell = Path(sdir, "cells", "lrc", "1vol-s0")
    card = json.loads((cell / "model_card.json").read_text())
    assert card["data"]["labelled_cases"] == ["patient099_frame01"]
    with open(cell / "finetune" / "history.csv") as f:
        hist = list(csv.DictReader(f))
    assert len(hist) == 2 and not any(h.get("val_dice") for h in hist)  # no model selection
    rec = json.loads((cell / "cell.json").read_text())
    assert rec["pretrained_from"].endswith(os.path.join("pretrain", "lrc-s0", "pretrain", "model"))
    # encoder diagnostics: the LRC encoder and the random one, probed on the cell's budget
    enc, rnd = rec["encoder"], rec["encoder_random"]
    assert (enc["encoder"], rnd["encoder"]) == ("lrc-s0", "random") and enc["budget"] == "1vol"
    for d in (enc, rnd):
        assert 0.0 <= d["probe_dice"] <= 1.0 and 0.0 <= d["dead_frac"] <= 1.0 and d["weight_norm"] > 0
    assert enc["weight_norm"] != rnd["weight_norm"]  # the pretrained weights were loaded
    sup_rec = json.loads(Path(sdir, "cells", "supervised", "1vol-s0", "cell.json").read_text())
    assert sup_rec["encoder"] is None and sup_rec["encoder_random"] == rnd  # cached per budget
    assert Path(sdir, "diagnostics", "lrc-s0-1vol.json").exists()
    assert "Encoder diagnostics" in md and "| lrc-s0 | 1 volume |" in md and "| random | 1 volume |" in md

    mtime = (cell / "cell.json").stat().st_mtime_ns
    with pytest.raises(UserError, match="pass --resume"):
        study_run.run_study(st, sdir, log=logs.append)
    logs.clear()
    again = study_run.run_study(st, sdir, resume=True, log=logs.append)
    assert again["done"] == 2 and not any("fine-tuning" in m or "pretrain" in m for m in logs)
    assert (cell / "cell.json").stat().st_mtime_ns == mtime
    other = study_spec.load_study(micro(tiny_store, seeds=[1]))
    with pytest.raises(UserError, match="different config"):
        study_run.run_study(other, sdir, resume=True, log=logs.append)
    assert len(study_report.report_only(st, sdir)["records"]) == 2


def test_cli_study__dry_run_and_one_line_errors(tmp_path, capsys):
    from ray_jobs.cli import main

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(micro()))
    assert main(["study", "--config", str(path), "--dry-run", "--study-dir", str(tmp_path / "d")]) == 0
    out = capsys.readouterr().out
    assert "2 cells (2 methods x 1 budgets x 1 seeds)" in out and "pretrain/lrc-s0" in out
    bad = copy.deepcopy(micro())
    bad["methods"]["supervised"]["finetune"]["method"]["name"] = "nope"
    path.write_text(yaml.safe_dump(bad))
    assert main(["study", "--config", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown finetune method 'nope'" in err and "Traceback" not in err


def test_run_study__only_seed_must_be_a_study_seed(tmp_path):
    st = study_spec.load_study(micro())
    with pytest.raises(UserError, match=r"--only-seed: \[7\] not in the study's seeds \[0\]"):
        study_run.run_study(st, str(tmp_path / "d"), only_seeds=[7])
    assert not (tmp_path / "d").exists()  # refused before anything is written


def test_run_study__only_method_must_be_a_study_method(tmp_path):
    st = study_spec.load_study(micro())
    with pytest.raises(
        UserError, match=r"--only-method: \['ideal'\] not in the study's methods \['lrc', 'supervised'\]"
    ):
        study_run.run_study(st, str(tmp_path / "d"), only_methods=["ideal"])
    assert not (tmp_path / "d").exists()


def test_study_command__the_report_quotes_the_study_not_one_driver():
    from ray_jobs.cli.study import study_command

    argv = ["study", "--config", "acdc_cpu", "--set", "budgets=[{name: 3pat, patients: 3}]", "--only-seed", "1"]
    argv += ["--only-method", "lrc", "--only-method=plcl", "--max-cells", "2", "--resume", "--dry-run"]
    assert (
        study_command(argv) == "localcl study --config acdc_cpu --set 'budgets=[{name: 3pat, patients: 3}]' --dry-run"
    )


def test_pretrain_owner__identical_pretrain_sections_share_one_run(tmp_path, capsys):
    """PLCL given LRC's pretrain section starts from LRC's pretraining run (same directory, same
    config hash, listed once) instead of repeating it; a different section gets its own run."""
    from ray_jobs.cli import main

    d = micro()
    d["methods"]["plcl"] = {"pretrain": {"method": {"name": "lrc"}}, "finetune": {"method": {"name": "plcl"}}}
    st = study_spec.load_study(d)
    by = {c.method: c for c in study_cells.cells(st)}
    assert (
        study_spec.pretrain_owner(st, "plcl") == "lrc" and study_spec.pretrain_owner(st, "supervised") == "supervised"
    )
    assert (
        study_cells.pretrain_dir(st, "/s", by["plcl"])
        == study_cells.pretrain_dir(st, "/s", by["lrc"])
        == "/s/pretrain/lrc-s0"
    )
    cfg = {k: study_spec.pretrain_config(st, k, store="s.zarr", budget=None, seed=0) for k in ("lrc", "plcl")}
    assert cfg["plcl"].hash() == cfg["lrc"].hash() and cfg["plcl"].name == "micro-lrc-pre-s0"
    _, init = study_cells.resolve_cell(st, "/s", by["plcl"], "s.zarr")
    assert init == "/s/pretrain/lrc-s0/pretrain/model"
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(d))
    assert main(["study", "--config", str(path), "--dry-run", "--study-dir", "/s"]) == 0
    assert "pretraining runs (1): pretrain/lrc-s0" in capsys.readouterr().out
    d["methods"]["plcl"]["pretrain"]["method"]["tau_local"] = 0.5  # not identical: its own run
    st2 = study_spec.load_study(d)
    plcl2 = next(c for c in study_cells.cells(st2) if c.method == "plcl")
    assert study_cells.pretrain_dir(st2, "/s", plcl2) == "/s/pretrain/plcl-s0"
    # the shipped CPU study starts PLCL from LRC's pretraining
    cpu = study_spec.load_study("acdc_cpu")
    assert study_spec.pretrain_owner(cpu, "plcl") == "lrc"


def test_file_lock__second_holder_waits_for_the_first(tmp_path):
    """The pretraining lock is exclusive across processes: a child blocks until it is freed."""
    import subprocess
    import sys
    import time

    path = str(tmp_path / "x.lock")
    msgs: list[str] = []
    code = (
        "import fcntl, sys, time; f = open(sys.argv[1], 'a'); t = time.time(); "
        "fcntl.flock(f, fcntl.LOCK_EX); print(time.time() - t)"
    )
    with study_cells._FileLock(path, msgs.append, "pretrain x"):
        child = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert child.poll() is None  # still waiting for the lock
    waited = float(child.communicate(timeout=30)[0])
    assert waited >= 0.9 and msgs == []


def test_prepare_study_dir__resume_leaves_study_yaml_alone_and_a_new_one_is_written_whole(tmp_path):
    # drivers sharing a study directory read study.yaml while another driver starts: it was
    # truncated and rewritten on every --resume, and a driver starting at that moment failed
    # with "cannot read the existing study"
    st = study_spec.load_study(micro())
    d = str(tmp_path / "study")
    study_run.prepare_study_dir(st, d, resume=False)
    path = tmp_path / "study" / "study.yaml"
    before = path.stat()
    assert study_spec.load_study(yaml.safe_load(path.read_text())).hash() == st.hash()
    study_run.prepare_study_dir(st, d, resume=True)
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert sorted(p.name for p in path.parent.iterdir()) == ["study.yaml"]
    with pytest.raises(UserError, match="holds a study already"):
        study_run.prepare_study_dir(st, d, resume=False)
