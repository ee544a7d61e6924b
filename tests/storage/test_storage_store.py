"""VolumeStore: voxel-exact round trip on real ACDC, partial reads, layout, errors, fsspec."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import zarr

import storage
from storage.errors import StoreError
from storage.store import chunk_layout

ACDC_CASES = (
    "patient099_frame01",
    "patient099_frame02",
    "patient038_frame01",
    "patient038_frame02",
    "patient050_frame01",
    "patient050_frame02",
    "patient028_frame01",
    "patient028_frame02",
)


def test_store__round_trip_matches_nibabel(acdc_dir: Path, acdc_store: str) -> None:
    st = storage.open_store(acdc_store)
    assert st.cases == sorted(ACDC_CASES)
    assert st.labelled_cases == sorted(ACDC_CASES)
    for case in ACDC_CASES:
        src = nib.load(str(acdc_dir / "imagesTr" / f"{case}.nii.gz"))
        ref = src.get_fdata()
        img = st.image(case)
        assert img.dtype == np.float32 and img.shape == ref.shape
        np.testing.assert_allclose(img, ref, atol=1e-4, rtol=0)
        lab_src = np.asarray(nib.load(str(acdc_dir / "labelsTr" / f"{case}.nii.gz")).dataobj)
        lab = st.label(case)
        assert lab is not None and lab.dtype == np.uint8
        np.testing.assert_array_equal(lab, lab_src)
        meta = st.meta(case)
        np.testing.assert_allclose(np.asarray(meta["affine"]), src.affine, atol=1e-6)
        np.testing.assert_allclose(meta["spacing"], src.header.get_zooms()[:3], rtol=1e-6)
        assert meta["shape"] == list(ref.shape)
        assert meta["orientation"] == "".join(nib.aff2axcodes(src.affine))
        assert meta["dtype"] == str(src.header.get_data_dtype())
        assert meta["label_names"] == {0: "background", 1: "RV", 2: "MYO", 3: "LV"}
        assert meta["patient"] == case.split("_")[0]
        q = np.percentile(ref, [0.5, 1, 99, 99.5])
        it = meta["intensity"]
        np.testing.assert_allclose([it["p0_5"], it["p1"], it["p99"], it["p99_5"]], q, atol=1e-5)
        assert it["min"] == pytest.approx(ref.min(), abs=1e-6) and it["max"] == pytest.approx(ref.max(), abs=1e-6)
        assert meta["slice_labels"] == [np.unique(lab_src[:, :, z]).tolist() for z in range(ref.shape[2])]
        fg = np.nonzero(lab_src)
        assert meta["fg_bbox"] == [[int(a.min()), int(a.max())] for a in fg]
        assert st.num_slices(case) == ref.shape[2]


def test_store__partial_reads_equal_full_volume(acdc_store: str) -> None:
    st = storage.open_store(acdc_store)
    case = "patient038_frame01"
    img, lab = st.image(case), st.label(case)
    for z in (0, 3, st.num_slices(case) - 1):
        np.testing.assert_array_equal(st.read_slice(case, z), img[:, :, z])
        np.testing.assert_array_equal(st.read_slice(case, z, array="label"), lab[:, :, z])
    np.testing.assert_array_equal(st.read_patch(case, (10, 20, 2), (32, 16, 4)), img[10:42, 20:36, 2:6])
    # patch hanging over every border: zero padding where outside the volume
    x, y, z = img.shape
    patch = st.read_patch(case, (-3, y - 5, -1), (8, 9, z + 2), array="label")
    expect = np.zeros((8, 9, z + 2), np.uint8)
    expect[3:, :5, 1 : z + 1] = lab[:5, y - 5 :, :]
    np.testing.assert_array_equal(patch, expect)
    assert not st.read_patch(case, (x + 1, 0, 0), (2, 2, 2)).any()
    with pytest.raises(IndexError, match="z=99"):
        st.read_slice(case, 99)
    with pytest.raises(ValueError, match="size must be positive"):
        st.read_patch(case, (0, 0, 0), (0, 2, 2))


class _CountingStore(zarr.storage.WrapperStore):
    """Records the bytes requested from the wrapped store (whole objects or byte ranges)."""

    def __init__(self, store):  # type: ignore[no-untyped-def]
        super().__init__(store)
        self.requests: list[tuple[str, int]] = []

    async def get(self, key, prototype, byte_range=None):  # type: ignore[no-untyped-def]
        buf = await super().get(key, prototype, byte_range)
        if buf is not None and not key.endswith("zarr.json"):
            self.requests.append((key, len(buf)))
        return buf


def test_store__slice_read_fetches_one_chunk_not_the_shard(acdc_store: str) -> None:
    case = "patient099_frame01"
    arr0 = zarr.open_array(store=acdc_store, path=f"cases/{case}/image", mode="r")
    x, y, z = arr0.shape
    assert arr0.chunks == (x, y, 1)  # one chunk = one whole slice
    assert arr0.shards == (x, y, z)  # one shard (one object) per array
    counting = _CountingStore(zarr.storage.LocalStore(acdc_store, read_only=True))
    arr = zarr.open_array(store=counting, path=f"cases/{case}/image", mode="r")
    got = arr[:, :, 5]
    np.testing.assert_array_equal(got, arr0[:, :, 5])
    fetched = sum(n for _, n in counting.requests)
    shard_bytes = arr0.nbytes_stored()
    # the shard index (16 B per chunk + crc) and one compressed slice; far below the shard
    assert fetched < 3 * shard_bytes / z, (fetched, shard_bytes, counting.requests)


def test_store__chunk_layout_rounds_shards_to_chunk_multiples() -> None:
    assert chunk_layout((154, 224, 16)) == ((154, 224, 1), (154, 224, 16))
    assert chunk_layout((300, 200, 7), chunk_xy=128) == ((128, 128, 1), (384, 256, 7))
    with pytest.raises(ValueError, match="chunk_xy"):
        chunk_layout((4, 4, 4), chunk_xy=0)


def test_store__tiled_chunks_round_trip(tmp_path: Path, synth) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0"])
    uri = str(tmp_path / "s.zarr")
    assert storage.ingest(src, uri, progress=False, chunk_xy=5).ok
    st = storage.open_store(uri)
    ref = nib.load(str(src / "imagesTr" / "c0.nii.gz")).get_fdata()
    np.testing.assert_allclose(st.image("c0"), ref, atol=1e-4)
    np.testing.assert_allclose(st.read_patch("c0", (3, 4, 1), (6, 5, 3)), ref[3:9, 4:9, 1:4], atol=1e-4)
    assert zarr.open_array(store=uri, path="cases/c0/image", mode="r").chunks == (5, 5, 1)


def test_store__errors_name_the_store_and_case(tmp_path: Path, acdc_store: str, synth) -> None:
    with pytest.raises(StoreError, match="store not found"):
        storage.open_store(tmp_path / "missing.zarr")
    zarr.open_group(str(tmp_path / "other.zarr"), mode="w").create_group("x")
    with pytest.raises(StoreError, match="not a localcl store"):
        storage.open_store(tmp_path / "other.zarr")
    with pytest.raises(StoreError, match="not a localcl store"):
        storage.open_store(tmp_path / "other.zarr", mode="a")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("not a store")
    for mode in ("r", "a"):
        with pytest.raises(StoreError, match="not a Zarr v3 store"):
            storage.open_store(tmp_path / "docs", mode=mode)
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["notes.txt"]  # untouched
    with pytest.raises(StoreError, match="is a file"):
        storage.open_store(tmp_path / "docs" / "notes.txt", mode="a")
    st = storage.open_store(acdc_store)
    with pytest.raises(StoreError, match="no complete case 'nope'"):
        st.image("nope")
    with pytest.raises(StoreError, match="has no array 'superpixelz'"):
        st.read_slice(st.cases[0], 0, array="superpixelz")
    with pytest.raises(StoreError, match="read-only"):
        st.put_derived(st.cases[0], "x", np.zeros(st.meta(st.cases[0])["shape"], np.uint8))
    with pytest.raises(ValueError, match="mode"):
        storage.open_store(acdc_store, mode="w")


def test_store__derived_arrays_visible_only_when_complete(tmp_path: Path, synth) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0"])
    uri = str(tmp_path / "s.zarr")
    storage.ingest(src, uri, progress=False)
    st = storage.open_store(uri, mode="a")
    shape = tuple(st.meta("c0")["shape"])
    assert st.derived("c0", "pseudo") is None
    data = np.arange(np.prod(shape), dtype=np.int32).reshape(shape) % 7
    st.put_derived("c0", "pseudo", data, {"round": 1})
    np.testing.assert_array_equal(storage.open_store(uri).derived("c0", "pseudo"), data)
    np.testing.assert_array_equal(st.read_slice("c0", 2, array="pseudo"), data[:, :, 2])
    # an interrupted derived write (complete flag not yet set) is invisible
    zarr.open_array(store=uri, path="cases/c0/pseudo", mode="a").attrs["complete"] = False
    assert storage.open_store(uri).derived("c0", "pseudo") is None
    with pytest.raises(ValueError, match="differs from case"):
        st.put_derived("c0", "bad", np.zeros((1, 2, 3)))
    with pytest.raises(ValueError, match="reserved"):
        st.put_derived("c0", "label", data)


def test_store__fsspec_uri_round_trip(tmp_path: Path, synth) -> None:
    """An fsspec URI goes through zarr's FsspecStore (memory:// here; s3:// the same way)."""
    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    uri = f"memory://localcl-test-{tmp_path.name}/s.zarr"
    report = storage.ingest(src, uri, progress=False)
    assert report.ok and len(report.ingested) == 2
    st = storage.open_store(uri)
    assert st.cases == ["c0", "c1"]
    ref = nib.load(str(src / "imagesTr" / "c1.nii.gz")).get_fdata()
    np.testing.assert_allclose(st.image("c1"), ref, atol=1e-4)
    np.testing.assert_allclose(st.read_slice("c1", 4), ref[:, :, 4], atol=1e-4)
    assert len(storage.ingest(src, uri, progress=False).skipped) == 2


def test_store__slice_cache_is_bounded_lru_and_returns_copies(acdc_store: str) -> None:
    plain = storage.open_store(acdc_store)
    case = "patient099_frame01"
    one = plain.read_slice(case, 0).nbytes
    st = storage.open_store(acdc_store, cache_bytes=2 * one + 10)
    for z in (0, 1, 0, 2):  # 0 refreshed before 2 arrives, so 1 is the one evicted
        np.testing.assert_array_equal(st.read_slice(case, z), plain.read_slice(case, z))
    assert list(st._cache) == [(case, "image", 0), (case, "image", 2)]
    assert st._cached_bytes == 2 * one <= st.cache_bytes
    got = st.read_slice(case, 2)
    got[...] = -1  # callers own what they get
    np.testing.assert_array_equal(st.read_slice(case, 2), plain.read_slice(case, 2))
    np.testing.assert_array_equal(st.read_slice(case, -1), plain.read_slice(case, 15))
    with pytest.raises(ValueError, match="cache_bytes"):
        storage.open_store(acdc_store, cache_bytes=-1)


def test_fastread__equals_zarr_for_every_slice(acdc_store: str, tmp_path: Path, synth, monkeypatch) -> None:
    """The direct shard reader (local default layout) returns exactly what zarr returns,
    including never-written (all fill-value) chunks; other layouts fall back to zarr."""
    st = storage.open_store(acdc_store)
    for case in st.cases[:4]:
        for name in ("image", "label"):
            assert st._reader(case, name) is not None
            arr = zarr.open_array(store=acdc_store, path=f"cases/{case}/{name}", mode="r")
            for z in range(arr.shape[2]):
                got = st.read_slice(case, z, name)
                assert got.dtype == arr.dtype
                np.testing.assert_array_equal(got, arr[:, :, z])
    np.testing.assert_array_equal(
        st.read_patch(st.cases[0], (5, 7, 1), (20, 30, 3)),
        zarr.open_array(store=acdc_store, path=f"cases/{st.cases[0]}/image", mode="r")[5:25, 7:37, 1:4],
    )
    # a label with empty slices: zarr skips writing all-zero chunks, the reader fills them
    img, lab = synth.make_pair(tmp_path / "src", "e", shape=(6, 5, 4))
    data = np.asarray(nib.load(str(lab)).dataobj).copy()
    data[:, :, 1] = 0
    synth.write_nifti(lab, data)
    uri = str(tmp_path / "s.zarr")
    storage.ingest_case(img, lab, uri, "e")
    s2 = storage.open_store(uri)
    assert s2._reader("e", "label").index[0, 0, 1].tolist() == [2**64 - 1] * 2
    for z in range(4):
        np.testing.assert_array_equal(s2.read_slice("e", z, "label"), data[:, :, z])
    monkeypatch.setenv("LOCALCL_ZARR_ONLY", "1")
    assert storage.open_store(uri)._reader("e", "label") is None
    monkeypatch.delenv("LOCALCL_ZARR_ONLY")


def test_fastread__tiled_chunks_with_edge_tiles_equal_zarr(tmp_path: Path, synth) -> None:
    rng = np.random.default_rng(3)
    shape = (13, 11, 5)  # 13 = 2*5 + 3 and 11 = 2*5 + 1: partial edge tiles
    img = synth.write_nifti(tmp_path / "i.nii.gz", rng.normal(size=shape).astype(np.float32))
    lab_data = rng.integers(0, 3, shape).astype(np.uint8)
    lab_data[:5, :5, 3] = 0  # one all-zero tile: never written by zarr
    lab = synth.write_nifti(tmp_path / "l.nii.gz", lab_data)
    uri = str(tmp_path / "t.zarr")
    storage.ingest_case(img, lab, uri, "t", chunk_xy=5)
    st = storage.open_store(uri)
    reader = st._reader("t", "label")
    assert reader is not None and reader.chunk == (5, 5, 1) and reader.index.shape == (3, 3, 5, 2)
    assert reader.index[0, 0, 3].tolist() == [2**64 - 1] * 2
    for name in ("image", "label"):
        arr = zarr.open_array(store=uri, path=f"cases/t/{name}", mode="r")
        for z in range(shape[2]):
            np.testing.assert_array_equal(st.read_slice("t", z, name), arr[:, :, z])
        for start, size in [
            ((0, 0, 0), shape),
            ((4, 6, 1), (7, 5, 3)),
            ((-2, 9, 4), (6, 4, 3)),
            ((12, 10, 0), (1, 1, 1)),
        ]:
            full = np.zeros(size, arr.dtype)
            lo = [max(s, 0) for s in start]
            hi = [min(s + n, d) for s, n, d in zip(start, size, shape)]
            full[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = arr[
                tuple(slice(a, b) for a, b in zip(lo, hi))
            ]
            np.testing.assert_array_equal(st.read_patch("t", start, size, name), full)
