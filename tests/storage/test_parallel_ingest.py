"""Ray fan-out of ingest (storage.parallel) from a local tree: real ACDC cases + one malformed
file, quarantine, resume after a partial/interrupted ingest, the per-task memory budget, the
bounded in-flight window, and the ``localcl ingest --ray`` CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

import storage
from storage.parallel import bounded_map, parallel_ingest, quarantine

CASES = ["patient099_frame01", "patient099_frame02", "patient038_frame01"]
BAD = "patient999_frame01"


def acdc_subset(acdc_dir: Path, root: Path, cases: list[str] = CASES, bad: bool = True) -> Path:
    """An MSD tree with ``cases`` (copies from the shared ACDC copy) + one truncated image."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
        for c in cases:
            shutil.copy(acdc_dir / sub / f"{c}.nii.gz", root / sub / f"{c}.nii.gz")
    spec = json.loads((acdc_dir / "dataset.json").read_text())
    names = cases + ([BAD] if bad else [])
    spec["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in names]
    if bad:
        raw = (acdc_dir / "imagesTr" / f"{CASES[0]}.nii.gz").read_bytes()
        (root / "imagesTr" / f"{BAD}.nii.gz").write_bytes(raw[: len(raw) // 2])  # truncated gzip
        shutil.copy(acdc_dir / "labelsTr" / f"{CASES[0]}.nii.gz", root / "labelsTr" / f"{BAD}.nii.gz")
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


def test_parallel_ingest__malformed_file_is_quarantined_others_ingested(ray_cluster, acdc_dir, tmp_path):
    src = acdc_subset(acdc_dir, tmp_path / "src")
    uri = str(tmp_path / "s.zarr")
    errors: list[str] = []
    rep = parallel_ingest(src, uri, progress=False, memory_per_task=256 * 2**20, on_error=errors.append)
    assert [r.case_id for r in rep.ingested] == sorted(CASES)
    assert [r.case_id for r in rep.failed] == [BAD] and not rep.skipped
    assert "truncated or corrupt gzip" in rep.failed[0].error and f"{BAD}.nii.gz" in rep.failed[0].error
    assert errors == [rep.failed[0].error]
    q = quarantine(uri)
    assert [e["case"] for e in q] == [BAD] and q[0]["error"] == rep.failed[0].error
    st = storage.open_store(uri)
    assert st.cases == sorted(CASES) and st.labelled_cases == sorted(CASES)
    for c in CASES:  # same voxels as nibabel, same metadata as the serial ingest writes
        np.testing.assert_allclose(
            st.image(c), nib.load(str(acdc_dir / "imagesTr" / f"{c}.nii.gz")).get_fdata(), atol=1e-4
        )
        np.testing.assert_array_equal(
            st.label(c), np.asarray(nib.load(str(acdc_dir / "labelsTr" / f"{c}.nii.gz")).dataobj)
        )
    serial = str(tmp_path / "serial.zarr")
    storage.ingest(src, serial, cases=[CASES[0]], progress=False)
    a, b = st.meta(CASES[0]), storage.open_store(serial).meta(CASES[0])
    assert {k: a[k] for k in a if k != "ingested_at"} == {k: b[k] for k in b if k != "ingested_at"}
    assert st.attrs["label_names"] == storage.open_store(serial).attrs["label_names"]


def test_parallel_ingest__resume_completes_only_what_is_missing(ray_cluster, acdc_dir, tmp_path):
    src = acdc_subset(acdc_dir, tmp_path / "src")
    uri = str(tmp_path / "s.zarr")
    first = parallel_ingest(src, uri, cases=CASES[:2], progress=False, memory_per_task=256 * 2**20)
    assert [r.case_id for r in first.ingested] == sorted(CASES[:2])
    assert sorted(storage.open_store(uri).read_case_index()) == sorted(CASES[:2])
    # as if the next run's driver died while case 2 was half written: that run dropped the case
    # index before writing, the group is present with complete=false
    storage.open_store(uri, mode="a").drop_case_index()
    zarr.open_group(uri, path=f"cases/{CASES[1]}", mode="a").attrs["complete"] = False
    assert storage.open_store(uri).incomplete_cases() == [CASES[1]]
    assert storage.open_store(uri).cases == [CASES[0]]
    second = parallel_ingest(src, uri, progress=False, memory_per_task=256 * 2**20)
    assert [r.case_id for r in second.skipped] == [CASES[0]]
    assert sorted(r.case_id for r in second.ingested) == sorted([CASES[1], CASES[2]])
    assert [r.case_id for r in second.failed] == [BAD]
    st = storage.open_store(uri)
    assert st.cases == sorted(CASES) and st.incomplete_cases() == []  # the bad file never wrote a group
    assert sorted(st.read_case_index()) == sorted(CASES)
    # fix the malformed file: the next run ingests it and empties the quarantine
    (src / "imagesTr" / f"{BAD}.nii.gz").unlink()
    shutil.copy(acdc_dir / "imagesTr" / f"{CASES[0]}.nii.gz", src / "imagesTr" / f"{BAD}.nii.gz")
    third = parallel_ingest(src, uri, progress=False, memory_per_task=256 * 2**20)
    assert [r.case_id for r in third.ingested] == [BAD] and len(third.skipped) == 3 and third.ok
    assert quarantine(uri) == []


def test_parallel_ingest__volume_over_task_memory_is_refused_from_header(ray_cluster, acdc_dir, tmp_path):
    src = acdc_subset(acdc_dir, tmp_path / "src", cases=CASES[:1], bad=False)
    uri = str(tmp_path / "s.zarr")
    rep = parallel_ingest(src, uri, progress=False, memory_per_task=2 * 2**20)  # 2 MiB budget
    assert [r.case_id for r in rep.failed] == [CASES[0]]
    assert "refusing before allocating" in rep.failed[0].error
    assert storage.open_store(uri).cases == [] and [q["case"] for q in quarantine(uri)] == [CASES[0]]


def test_parallel_ingest__task_memory_larger_than_any_node_is_refused(ray_cluster, acdc_dir, tmp_path):
    src = acdc_subset(acdc_dir, tmp_path / "src", cases=CASES[:1], bad=False)
    with pytest.raises(ValueError, match="memory_per_task=.*exceeds the largest node"):
        parallel_ingest(src, str(tmp_path / "s.zarr"), progress=False, memory_per_task=2**50)


def test_parallel_ingest__bad_arguments_name_the_parameter(tmp_path):
    for kw, name in (
        ({"batch_size": 0}, "batch_size"),
        ({"memory_per_task": 10}, "memory_per_task"),
        ({"max_in_flight": 0}, "max_in_flight"),
    ):
        with pytest.raises(ValueError, match=name):
            parallel_ingest(tmp_path, str(tmp_path / "s.zarr"), **kw)
    with pytest.raises(storage.InputError, match="dataset.json"):
        parallel_ingest(tmp_path, str(tmp_path / "s.zarr"))


def test_bounded_map__never_more_than_max_in_flight_and_every_item_once():
    in_flight: set[int] = set()
    peak = 0
    order: list[int] = []

    def submit(item: int) -> int:
        nonlocal peak
        in_flight.add(item)
        peak = max(peak, len(in_flight))
        return item

    def wait(refs: list[int]) -> tuple[list[int], list[int]]:
        done = max(refs)  # finish out of submission order
        in_flight.discard(done)
        return [done], [r for r in refs if r != done]

    for item, ref in bounded_map(submit, list(range(23)), 4, wait):
        assert item == ref
        order.append(item)
    assert peak == 4 and sorted(order) == list(range(23)) and order != list(range(23))
    with pytest.raises(ValueError, match="max_in_flight"):
        list(bounded_map(submit, [1], 0, wait))


def test_cli_ingest__ray_prints_quarantine_and_exits_1(ray_cluster, acdc_dir, tmp_path, capsys):
    from ray_jobs.cli import main

    src = acdc_subset(acdc_dir, tmp_path / "src", cases=CASES[:1])
    uri = str(tmp_path / "s.zarr")
    assert main(["ingest", str(src), uri, "--ray", "--no-progress", "--task-memory", "256"]) == 1
    err = capsys.readouterr().err
    assert "quarantine (1 case(s)" in err and f"{BAD}: " in err and "1 ingested, 0 skipped" in err
    assert main(["info", uri]) == 0
    assert f"quarantined: {BAD}: " in capsys.readouterr().out
    assert main(["ingest", str(src), uri, "--ray", "--max-in-flight", "0"]) == 2
    assert "--max-in-flight must be >= 1" in capsys.readouterr().err
    assert main(["ingest", "s3://bucket/prefix", uri]) == 2
    assert "needs --ray" in capsys.readouterr().err
