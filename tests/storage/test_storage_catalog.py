"""Catalog (splits, budgets) and the ``localcl info`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import storage
from ray_jobs import cli
from storage.catalog import Catalog


def test_catalog__acdc_splits_from_splits_json(acdc_dir: Path, acdc_store: str) -> None:
    cat = storage.open_store(acdc_store).catalog
    raw = json.loads((acdc_dir / "splits.json").read_text())
    present = set(cat.cases)
    assert cat.splits["train"] == sorted(set(raw["train_cases"]) & present)
    assert cat.splits["val"] == sorted(set(raw["val_cases"]) & present) == ["patient028_frame01", "patient028_frame02"]
    assert cat.patient_of("patient099_frame02") == "patient099"
    assert cat.patients(["patient038_frame01", "patient038_frame02", "patient099_frame01"]) == [
        "patient038",
        "patient099",
    ]


def test_catalog__acdc_budget_uses_ssl4mis_list_for_seed_0(acdc_store: str) -> None:
    cat = storage.open_store(acdc_store).catalog
    budget = cat.label_budget(3, seed=0)
    assert budget == sorted(f"{p}_frame0{f}" for p in ("patient099", "patient038", "patient050") for f in (1, 2))
    assert cat.unlabelled_pool(budget) == []  # the 4-patient store's train split is exactly those 3
    one = cat.label_budget(1, seed=11)
    assert one == cat.label_budget(1, seed=11) and len(one) == 2
    with pytest.raises(ValueError, match="n_patients=4 exceeds the 3 labelled patients"):
        cat.label_budget(4)
    with pytest.raises(ValueError, match="pool 'nope'"):
        cat.label_budget(1, pool="nope")


def _synthetic(n_patients: int = 20) -> Catalog:
    cases = [f"patient{i:03d}_frame0{f}" for i in range(1, n_patients + 1) for f in (1, 2)]
    extra = ["scan_a", "scan_b"]  # unlabelled
    return Catalog(cases + extra, labelled=cases, test_cases=[])


def test_catalog__derived_splits_are_patient_level_and_seeded() -> None:
    cat = _synthetic()
    val, train = cat.splits["val"], cat.splits["train"]
    assert len(cat.patients(val)) == 4  # ceil(0.2 * 20)
    assert not set(cat.patients(val)) & set(cat.patients(train))  # no patient in both
    assert {"scan_a", "scan_b"} <= set(train) and set(val) | set(train) == set(cat.cases)
    assert _synthetic().splits == cat.splits  # reproducible


def test_catalog__budget_is_reproducible_and_pool_excludes_budget_patients() -> None:
    cat = _synthetic()
    b1 = cat.label_budget(3, seed=1)
    assert b1 == cat.label_budget(3, seed=1)
    assert len(cat.patients(b1)) == 3 and all(c in cat.splits["train"] for c in b1)
    draws = {tuple(cat.label_budget(3, seed=s)) for s in range(8)}
    assert len(draws) > 1  # seeds matter
    pool = cat.unlabelled_pool(b1)
    assert not set(cat.patients(pool)) & set(cat.patients(b1))
    assert {"scan_a", "scan_b"} <= set(pool)
    assert set(pool) | set(b1) == set(cat.splits["train"])
    with pytest.raises(ValueError, match="positive int"):
        cat.label_budget(0)


def test_info_cli__table_and_json(acdc_store: str, capsys) -> None:
    assert cli.main(["info", acdc_store]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["case", "shape", "(x,y,z)", "spacing", "mm", "labelled", "size"]
    assert any(line.startswith("patient099_frame01  154x224x16") and "1.5625x1.5625x10" in line for line in lines)
    assert "8 cases (8 labelled, 0 unlabelled, 4 patients)" in out
    assert "labels: 0=background, 1=RV, 2=MYO, 3=LV" in out
    assert cli.main(["info", acdc_store, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [r["case"] for r in info["cases"]][:2] == ["patient028_frame01", "patient028_frame02"]
    assert info["total_bytes"] == sum(r["nbytes"] for r in info["cases"]) > 0
    assert info["catalog"]["splits"]["val"] == 2


def test_info_cli__missing_store_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert cli.main(["info", str(tmp_path / "none.zarr")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "store not found" in err and "Traceback" not in err
