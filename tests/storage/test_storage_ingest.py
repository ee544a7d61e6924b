"""Ingest: idempotence, resume after a killed ingest, and every bad-input class of issue 2."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import storage
from ray_jobs import cli
from storage.errors import InputError
from storage.nifti import load_volume

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- idempotence
def test_ingest__rerun_skips_complete_and_rewrites_changed(tmp_path: Path, synth) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0", "c1", "c2"])
    uri = str(tmp_path / "s.zarr")
    first = storage.ingest(src, uri, progress=False)
    assert [r.case_id for r in first.ingested] == ["c0", "c1", "c2"] and first.ok
    meta_file = Path(uri) / "cases" / "c1" / "zarr.json"
    stamp = meta_file.stat().st_mtime_ns
    again = storage.ingest(src, uri, progress=False)
    assert len(again.skipped) == 3 and not again.ingested
    assert meta_file.stat().st_mtime_ns == stamp  # untouched
    # change one source: only that case is rewritten, with the new voxels
    new = np.full((12, 10, 6), 7.0, np.float32)
    synth.write_nifti(src / "imagesTr" / "c1.nii.gz", new)
    third = storage.ingest(src, uri, progress=False)
    assert [r.case_id for r in third.ingested] == ["c1"] and len(third.skipped) == 2
    np.testing.assert_array_equal(storage.open_store(uri).image("c1"), new)


def test_ingest__incomplete_case_is_invisible_then_rewritten(tmp_path: Path, synth) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    uri = str(tmp_path / "s.zarr")
    storage.ingest(src, uri, progress=False)
    import zarr

    # as if a later ingest was interrupted while rewriting c0 (it drops the case index first)
    storage.open_store(uri, mode="a").drop_case_index()
    zarr.open_group(uri, path="cases/c0", mode="a").attrs["complete"] = False
    st = storage.open_store(uri)
    assert st.cases == ["c1"] and st.incomplete_cases() == ["c0"]
    report = storage.ingest(src, uri, progress=False)
    assert [r.case_id for r in report.ingested] == ["c0"]
    assert storage.open_store(uri).cases == ["c0", "c1"]


_KILL_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import storage
    from storage.store import VolumeStore
    original = VolumeStore.write_case
    calls = []
    def write_then_die(self, case, image, label, meta, chunk_xy=None):
        calls.append(case)
        if len(calls) == 3:  # third case: group created, image written, then SIGKILL
            cases = self._root.require_group("cases")
            grp = cases.create_group(case, attributes={**meta, "complete": False})
            grp.create_array("image", data=image, chunks=image.shape[:2] + (1,))
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, case, image, label, meta, chunk_xy)
    VolumeStore.write_case = write_then_die
    storage.ingest(sys.argv[1], sys.argv[2], progress=False, cases=sys.argv[3].split(","))
""")


def test_ingest__killed_midway_leaves_no_half_case_and_resumes(tmp_path: Path, acdc_dir: Path) -> None:
    cases = ["patient099_frame01", "patient099_frame02", "patient038_frame01", "patient038_frame02"]
    uri = str(tmp_path / "s.zarr")
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_SCRIPT, str(acdc_dir), uri, ",".join(cases)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr  # really killed
    st = storage.open_store(uri)
    assert st.cases == sorted(cases)[:2]  # the two written before the kill, nothing else
    assert st.incomplete_cases() == [sorted(cases)[2]]
    assert st.read_case_index() is None  # dropped before the first write, never written
    report = storage.ingest(acdc_dir, uri, progress=False, cases=cases)
    assert [r.case_id for r in report.ingested] == sorted(cases)[2:]
    assert len(report.skipped) == 2
    st = storage.open_store(uri)
    assert st.cases == sorted(cases) and st.incomplete_cases() == []
    assert sorted(st.read_case_index() or {}) == sorted(cases)
    half = sorted(cases)[2]
    ref = nib.load(str(acdc_dir / "imagesTr" / f"{half}.nii.gz")).get_fdata()
    np.testing.assert_allclose(st.image(half), ref, atol=1e-4)
    np.testing.assert_array_equal(
        st.label(half), np.asarray(nib.load(str(acdc_dir / "labelsTr" / f"{half}.nii.gz")).dataobj)
    )


def test_ingest__ingest_case_is_usable_alone(tmp_path: Path, synth) -> None:
    img, lab = synth.make_pair(tmp_path / "src", "x")
    uri = str(tmp_path / "s.zarr")
    res = storage.ingest_case(img, lab, uri, "x", label_names={0: "bg", 1: "a", 2: "b"}, patient="p7")
    assert res.status == "ingested"
    assert storage.ingest_case(img, lab, uri, "x").status == "skipped"
    assert storage.ingest_case(img, lab, uri, "x", force=True, patient="p7").status == "ingested"
    meta = storage.open_store(uri).meta("x")
    assert meta["patient"] == "p7" and meta["labelled"]


def test_ingest__unlabelled_tree(tmp_path: Path, synth) -> None:
    root = tmp_path / "raw"
    synth.write_nifti(root / "siteA" / "s1.nii.gz", np.ones((5, 6, 3), np.float32))
    synth.write_nifti(root / "siteB" / "deep" / "s2.nii", np.zeros((4, 4, 2), np.int16))
    (root / "notes.txt").write_text("ignored")
    uri = str(tmp_path / "s.zarr")
    report = storage.ingest(root, uri, unlabelled=True, progress=False)
    assert report.ok
    st = storage.open_store(uri)
    assert st.cases == ["siteA__s1", "siteB__deep__s2"] and st.labelled_cases == []
    assert st.label("siteA__s1") is None
    assert st.catalog.splits["train"] == st.cases


# ----------------------------------------------------------------------------- bad input
def _aff() -> np.ndarray:
    return np.diag([1.5, 1.5, 5.0, 1.0])


def _raw_nifti(path: Path, data: np.ndarray, srow: np.ndarray) -> Path:
    """A .nii written byte by byte with sform rows ``srow`` (3, 4) and no qform: nibabel's
    writer would refuse to encode a singular affine, real-world files sometimes have one."""
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(data.dtype)
    hdr.set_data_shape(data.shape)
    hdr["pixdim"][1:4] = 1.0
    hdr["sform_code"], hdr["qform_code"] = 1, 0
    hdr["srow_x"], hdr["srow_y"], hdr["srow_z"] = srow
    hdr["vox_offset"] = 352
    path.write_bytes(hdr.binaryblock + b"\x00" * 4 + data.tobytes(order="F"))
    return path


def _bad_file(kind: str, tmp: Path, synth) -> tuple[Path, str, str]:
    """(file, 'image'|'label', expected message fragment) for one bad-input class."""
    p = tmp / f"{kind}.nii.gz"
    good = synth.write_nifti(tmp / "good.nii.gz", np.arange(60, dtype=np.float32).reshape(5, 4, 3))
    if kind == "truncated_gzip":
        raw = good.read_bytes()
        p.write_bytes(raw[: len(raw) // 2])
        return p, "image", "truncated or corrupt gzip"
    if kind == "corrupt_gzip":
        raw = bytearray(good.read_bytes())
        body = gzip.decompress(bytes(raw))
        bad = bytearray(gzip.compress(body))
        bad[-8] ^= 0xFF  # CRC32 of the payload
        p.write_bytes(bytes(bad))
        return p, "image", "truncated or corrupt gzip"
    if kind == "not_nifti":
        p = tmp / "not_nifti.nii"
        p.write_text("this is a text file, not an image\n" * 20)
        return p, "image", "not a NIfTI file"
    if kind == "not_gzip":
        p.write_text("plain text with a .gz name\n")
        return p, "image", "not a gzip file"
    if kind == "empty":
        p.write_bytes(b"")
        return p, "image", "empty file"
    if kind == "4d":
        synth.write_nifti(p, np.zeros((4, 4, 3, 2), np.float32))
        return p, "image", "4D image where 3D is expected"
    if kind == "nan":
        d = np.ones((4, 4, 3), np.float32)
        d[0, 0, 0], d[1, 1, 1] = np.nan, np.inf
        synth.write_nifti(p, d)
        return p, "image", "1 NaN and 1 Inf intensities"
    if kind == "zero_affine":
        return (
            _raw_nifti(tmp / "zero_affine.nii", np.ones((4, 4, 3), np.float32), np.zeros((3, 4))),
            "image",
            "singular or zero affine",
        )
    if kind == "singular_affine":
        rows = np.array([[1.5, 0, 0, 0], [0, 1.5, 0, 0], [1.5, 0, 0, 0]])  # row 2 == row 0: det 0
        return (
            _raw_nifti(tmp / "singular.nii", np.ones((4, 4, 3), np.float32), rows),
            "image",
            "singular or zero affine",
        )
    if kind == "huge_header":
        hdr = nib.Nifti1Header()
        hdr.set_data_dtype(np.int16)
        hdr.set_data_shape((30000, 30000, 30000))
        p = tmp / "huge.nii"
        with open(p, "wb") as f:
            f.write(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64)  # header + a few voxels only
        return p, "image", "refusing before allocating"
    if kind == "float_label":
        d = np.zeros((4, 4, 3), np.float32)
        d[1, 1, 1] = 0.5
        synth.write_nifti(p, d)
        return p, "label", "non-integer label values"
    raise AssertionError(kind)


FILE_CLASSES = [
    "truncated_gzip",
    "corrupt_gzip",
    "not_nifti",
    "not_gzip",
    "empty",
    "4d",
    "nan",
    "zero_affine",
    "singular_affine",
    "huge_header",
    "float_label",
]


@pytest.mark.parametrize("kind", FILE_CLASSES)
def test_load_volume__bad_file_raises_one_line_error_naming_it(kind: str, tmp_path: Path, synth) -> None:
    path, role, fragment = _bad_file(kind, tmp_path, synth)
    with pytest.raises(InputError) as info:
        load_volume(path, role)
    msg = str(info.value)
    assert msg.startswith(str(path) + ": ") and fragment in msg and "\n" not in msg


def test_load_volume__huge_header_refused_before_reading_data(tmp_path: Path, synth, monkeypatch) -> None:
    path, _, _ = _bad_file("huge_header", tmp_path, synth)
    import storage.nifti

    def boom(*a, **k):  # any attempt to read past the header fails the test
        raise AssertionError("voxel data was read")

    monkeypatch.setattr(storage.nifti, "_read_image", boom)
    with pytest.raises(InputError, match=r"header dimensions \(30000, 30000, 30000\) \(int16\) need .* GiB to load"):
        load_volume(path, "image")
    # and a modest max_bytes refuses a small real file too, naming the limit
    small = synth.write_nifti(tmp_path / "s.nii.gz", np.ones((8, 8, 8), np.float32))
    with pytest.raises(InputError, match="more than the 0.0 GiB available"):
        load_volume(small, "image", max_bytes=100)


def _dataset_with_every_bad_case(root: Path, synth) -> tuple[Path, dict[str, str]]:
    """A dataset with 2 good cases and one case per pair/dataset-level bad-input class.

    Returns the root and {case or file name: expected message fragment}."""
    good = ["good0", "good1"]
    expect: dict[str, str] = {}
    synth.make_msd(root, good)
    entries = []

    def entry(case: str) -> None:
        entries.append({"image": f"./imagesTr/{case}.nii.gz", "label": f"./labelsTr/{case}.nii.gz"})

    for kind in ("truncated_gzip", "empty", "4d", "nan", "zero_affine", "huge_header"):
        f, _, frag = _bad_file(kind, root / "tmpbad", synth)
        (root / "imagesTr").mkdir(exist_ok=True)
        suffix = ".nii.gz" if f.name.endswith(".gz") else ".nii"
        f.replace(root / "imagesTr" / f"bad_{kind}{suffix}")
        synth.write_nifti(root / "labelsTr" / f"bad_{kind}.nii.gz", np.zeros((5, 4, 3), np.uint8))
        entries.append({"image": f"./imagesTr/bad_{kind}{suffix}", "label": f"./labelsTr/bad_{kind}.nii.gz"})
        expect[f"imagesTr/bad_{kind}{suffix}"] = frag
    # label problems (the image itself is fine)
    rng = np.random.default_rng(0)
    img = rng.normal(size=(6, 5, 4)).astype(np.float32)
    for case, label, affine, frag in [
        ("lab_shape", np.zeros((6, 5, 3), np.uint8), None, "label shape (6, 5, 3) differs from image shape (6, 5, 4)"),
        ("lab_affine", np.zeros((6, 5, 4), np.uint8), np.diag([1.0, 1.5, 5.0, 1.0]), "label affine differs"),
        ("lab_float", np.full((6, 5, 4), 1.25, np.float32), None, "non-integer label values"),
        ("lab_undeclared", np.full((6, 5, 4), 7, np.uint8), None, "label values [7] not declared in dataset.json"),
    ]:
        synth.write_nifti(root / "imagesTr" / f"{case}.nii.gz", img)
        synth.write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, affine=affine)
        entry(case)
        expect[f"labelsTr/{case}.nii.gz"] = frag
    # pairing and dataset.json problems
    synth.write_nifti(root / "imagesTr" / "nolabel.nii.gz", img)
    expect["nolabel.nii.gz"] = "image without its label"
    synth.write_nifti(root / "labelsTr" / "orphan.nii.gz", np.zeros((6, 5, 4), np.uint8))
    expect["orphan.nii.gz"] = "label without its image"
    synth.write_nifti(root.parent / "outside.nii.gz", img)
    entries.append({"image": "../outside.nii.gz", "label": "./labelsTr/good0.nii.gz"})
    expect["dataset.json"] = "points outside the dataset root"
    spec = json.loads((root / "dataset.json").read_text())
    spec["training"] += entries
    (root / "dataset.json").write_text(json.dumps(spec))
    return root, expect


def test_ingest_cli__every_bad_case_reported_once_rest_ingested(tmp_path: Path, synth, capsys) -> None:
    root, expect = _dataset_with_every_bad_case(tmp_path / "ds", synth)
    uri = str(tmp_path / "s.zarr")
    # something valuable already in the store must survive the bad run untouched
    synth.make_msd(tmp_path / "prev", ["keep"])
    storage.ingest(tmp_path / "prev", uri, progress=False)
    before = storage.open_store(uri).image("keep")
    rc = cli.main(["ingest", str(root), uri, "--no-progress"])
    out, err = capsys.readouterr()
    assert rc == 1
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("localcl: error: ")]
    assert len(errors) == len(expect), err
    for name, frag in expect.items():
        hits = [e for e in errors if name in e and frag in e]
        assert len(hits) >= 1, (name, frag, errors)
    n_failed = len(expect)
    assert f"2 ingested, 0 skipped (already complete), {n_failed} failed" in err
    st = storage.open_store(uri)
    assert st.cases == ["good0", "good1", "keep"]
    np.testing.assert_array_equal(st.image("keep"), before)


def test_ingest__bad_new_version_does_not_damage_stored_case(tmp_path: Path, synth) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0"])
    uri = str(tmp_path / "s.zarr")
    storage.ingest(src, uri, progress=False)
    before = storage.open_store(uri).image("c0")
    (src / "imagesTr" / "c0.nii.gz").write_bytes(b"\x1f\x8b garbage")
    report = storage.ingest(src, uri, progress=False, on_error=lambda m: None)
    assert len(report.failed) == 1 and "c0.nii.gz" in report.failed[0].error
    np.testing.assert_array_equal(storage.open_store(uri).image("c0"), before)


@pytest.mark.parametrize(
    "content, fragment",
    [
        ("{not json", "malformed dataset.json"),
        (json.dumps({"labels": ["bg", "fg"], "training": []}), "'labels' must be a non-empty object"),
        (json.dumps({"labels": {"0": "bg"}, "training": {"a": 1}}), "'training' must be a list"),
        (json.dumps([1, 2]), "top level must be an object"),
    ],
)
def test_ingest_cli__malformed_dataset_json_is_one_line_exit_2(
    tmp_path: Path, content: str, fragment: str, capsys
) -> None:
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.json").write_text(content)
    rc = cli.main(["ingest", str(root), str(tmp_path / "s.zarr"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert err.strip().count("\n") == 0 and str(root / "dataset.json") in err and fragment in err
    assert not (tmp_path / "s.zarr").exists()  # nothing written


def test_ingest__nnunet_v2_layout_pairs_by_name(tmp_path: Path, synth) -> None:
    root = tmp_path / "Dataset001_X"
    rng = np.random.default_rng(1)
    for c in ("a_001", "a_002"):
        synth.write_nifti(root / "imagesTr" / f"{c}_0000.nii.gz", rng.normal(size=(4, 4, 2)).astype(np.float32))
        synth.write_nifti(root / "labelsTr" / f"{c}.nii.gz", np.ones((4, 4, 2), np.uint8))
    synth.write_nifti(root / "imagesTs" / "a_003_0000.nii.gz", np.ones((4, 4, 2), np.float32))
    (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1}, "file_ending": ".nii.gz"}))
    uri = str(tmp_path / "s.zarr")
    assert storage.ingest(root, uri, progress=False).ok
    st = storage.open_store(uri)
    assert st.cases == ["a_001", "a_002", "a_003"] and st.labelled_cases == ["a_001", "a_002"]
    assert st.meta("a_001")["label_names"] == {0: "background", 1: "organ"}
    assert st.catalog.splits["test"] == ["a_003"]


def test_ingest__workers_give_the_same_store(tmp_path: Path, synth) -> None:
    src = synth.make_msd(tmp_path / "src", [f"c{i}" for i in range(5)])
    a, b = str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr")
    storage.ingest(src, a, progress=False, workers=1)
    storage.ingest(src, b, progress=False, workers=3)
    sa, sb = storage.open_store(a), storage.open_store(b)
    assert sa.cases == sb.cases
    for c in sa.cases:
        np.testing.assert_array_equal(sa.image(c), sb.image(c))
        np.testing.assert_array_equal(sa.label(c), sb.label(c))


def test_ingest_cli__progress_bar_with_rate_and_eta(tmp_path: Path, synth, capsys) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    assert cli.main(["ingest", str(src), str(tmp_path / "s.zarr")]) == 0
    out, err = capsys.readouterr()
    assert "ingest: 100%" in err and "2/2" in err and "vol/s" in err and "<00:00" in err  # elapsed<ETA
    assert out.strip().startswith("2 ingested, 0 skipped (already complete), 0 failed")


def test_ingest_case__parallel_processes_into_a_fresh_store(tmp_path: Path, synth) -> None:
    """What a Ray fan-out does: independent processes, one ingest_case each, same new store.
    The processes are spawned: a fork of this test process, which holds Ray's and zarr's threads,
    once left a pool worker blocked on a lock forever (CI hung in Pool.terminate)."""
    import functools
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    jobs = []
    for i in range(4):
        img, lab = synth.make_pair(tmp_path / "src", f"p{i}", seed=i)
        jobs.append((str(img), str(lab), str(tmp_path / "s.zarr"), f"p{i}"))
    one = functools.partial(storage.ingest_case, label_names={0: "bg", 1: "a", 2: "b"})
    with ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        reports = list(pool.map(one, *zip(*jobs), timeout=300))
    assert [r.status for r in reports] == ["ingested"] * 4
    st = storage.open_store(tmp_path / "s.zarr")
    assert st.cases == ["p0", "p1", "p2", "p3"] and st.incomplete_cases() == []
    for img, _, _, case in jobs:
        np.testing.assert_allclose(st.image(case), nib.load(img).get_fdata(), atol=1e-4)


def test_ingest__writes_case_index_and_open_reads_no_case_metadata(tmp_path: Path, synth, monkeypatch) -> None:
    """The index makes opening a store one listing + one object, whatever the number of cases;
    cases it lacks (written since) are read from their group, so nothing is hidden."""
    from storage.store import CASE_INDEX, VolumeStore

    src = synth.make_msd(tmp_path / "src", ["c0", "c1", "c2"])
    uri = str(tmp_path / "s.zarr")
    storage.ingest(src, uri, progress=False)
    assert (Path(uri) / CASE_INDEX).is_file()
    reads: list[list[str]] = []
    original = VolumeStore._read_case_attrs

    def recording(self: VolumeStore, names: list[str]) -> object:
        reads.append(list(names))
        return original(self, names)

    monkeypatch.setattr(VolumeStore, "_read_case_attrs", recording)
    st = storage.open_store(uri)
    assert st.cases == ["c0", "c1", "c2"] and reads == [[]]
    slow = storage.open_store(uri, mode="a")
    slow.drop_case_index()
    slow.refresh()
    assert slow.cases == st.cases and all(slow.meta(c) == st.meta(c) for c in st.cases)  # index == groups
    storage.ingest(src, uri, progress=False)  # nothing to do: rewrites the index from the skip results
    reads.clear()
    w = storage.open_store(uri, mode="a")
    img = np.zeros((4, 4, 2), np.float32)
    w.write_case("extra", img, None, {"shape": [4, 4, 2], "labelled": False})  # not via ingest
    assert storage.open_store(uri).cases == ["c0", "c1", "c2", "extra"] and reads[-1] == ["extra"]
    assert w.write_case_index() == 4
    reads.clear()
    assert storage.open_store(uri).cases == ["c0", "c1", "c2", "extra"] and reads == [[]]


def test_case_index__corrupt_index_warns_and_falls_back_to_the_groups(tmp_path: Path, synth) -> None:
    from storage.store import CASE_INDEX

    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    uri = str(tmp_path / "s.zarr")
    storage.ingest(src, uri, progress=False)
    (Path(uri) / CASE_INDEX).write_bytes(b"not gzip")
    with pytest.warns(UserWarning, match="case_index.json.gz: unreadable case index"):
        assert storage.open_store(uri).cases == ["c0", "c1"]
    storage.ingest(src, uri, progress=False)  # the next ingest replaces it
    assert storage.open_store(uri).read_case_index() is not None
