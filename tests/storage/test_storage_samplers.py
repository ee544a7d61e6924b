"""Samplers on real ACDC: determinism, disjoint rank x worker shards (fork and spawn),
preprocessing, oversampling, class filter, derived maps, views, partition batches, patches."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Mapping

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import storage
from storage.preprocess import crop_or_pad, preprocess_slice, resampled_shape, restore_slice
from storage.samplers import PartitionBatchDataset, PatchDataset, SliceDataset, partition_of


def _key(item: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    return int(item["case_index"]), int(item["slice_index"])


def test_slice_dataset__deterministic_for_seed_and_epoch(acdc_store: str) -> None:
    cases = storage.open_store(acdc_store).cases
    a = SliceDataset(acdc_store, cases, size=(64, 64), samples_per_epoch=12, seed=3)
    b = SliceDataset(acdc_store, cases, size=(64, 64), samples_per_epoch=12, seed=3)
    ia, ib = list(a), list(b)
    assert [_key(x) for x in ia] == [_key(x) for x in ib]
    for x, y in zip(ia, ib):
        for k in x:
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0)
    a.set_epoch(1)
    assert [_key(x) for x in a] != [_key(x) for x in ia]
    a.set_epoch(0)
    assert [_key(x) for x in a] == [_key(x) for x in ia]
    c = SliceDataset(acdc_store, cases, size=(64, 64), samples_per_epoch=12, seed=4)
    assert [_key(x) for x in c] != [_key(x) for x in ia]


def test_slice_dataset__one_pass_covers_every_slice_once(acdc_store: str) -> None:
    st = storage.open_store(acdc_store)
    ds = SliceDataset(acdc_store, st.cases, size=(32, 32), seed=0)
    total = sum(st.num_slices(c) for c in st.cases)
    plan = ds.plan(0)
    assert len(ds) == total == len(plan)
    assert len({tuple(p) for p in plan.tolist()}) == total


@pytest.mark.parametrize("context, ranks", [("fork", (0, 1)), ("spawn", (1,))])
def test_slice_dataset__shards_disjoint_across_ranks_and_workers(acdc_store: str, context: str, ranks) -> None:
    """world_size=2 x num_workers=2: every rank's items are exactly its shard of the plan, each
    served once, equal to the item built in the main process (store opened lazily per worker).
    Fork runs both ranks (union covers the plan, intersection empty); spawn (slow worker start)
    runs one rank."""
    st = storage.open_store(acdc_store)
    cases = st.cases  # the parent has used zarr already: forked workers must still not deadlock
    world = 2
    full = SliceDataset(acdc_store, cases, size=(48, 48), seed=5)
    plan = [tuple(p) for p in full.plan(0).tolist()]
    reference = {_key(x): x for x in full}
    seen: dict[tuple[int, int], int] = {}
    for rank in ranks:
        ds = SliceDataset(acdc_store, cases, size=(48, 48), seed=5, rank=rank, world_size=world)
        ds.set_epoch(0)
        loader = DataLoader(
            ds,
            batch_size=4,
            num_workers=2,
            multiprocessing_context=mp.get_context(context),
            worker_init_fn=_record_worker,
        )
        got = []
        for batch in loader:
            for i in range(len(batch["case_index"])):
                k = (int(batch["case_index"][i]), int(batch["slice_index"][i]))
                got.append(k)
                torch.testing.assert_close(batch["image"][i], reference[k]["image"])
                torch.testing.assert_close(batch["label"][i], reference[k]["label"])
        assert sorted(got) == sorted(plan[rank::world])  # this rank's shard, nothing else
        for k in got:
            seen[k] = seen.get(k, 0) + 1
    assert all(v == 1 for v in seen.values())  # no slice served twice (across workers and ranks)
    if ranks == (0, 1):
        assert sorted(seen) == sorted(plan)  # union covers the epoch plan


def _record_worker(worker_id: int) -> None:
    info = torch.utils.data.get_worker_info()
    assert info is not None and info.dataset._store is None  # nothing opened before the worker ran


def test_slice_dataset__shard_indices_partition_the_plan(acdc_store: str) -> None:
    cases = storage.open_store(acdc_store).cases
    n, world, workers = 29, 3, 2
    shards = []
    for rank in range(world):
        ds = SliceDataset(acdc_store, cases, size=(8, 8), samples_per_epoch=n, rank=rank, world_size=world)
        per_worker = [list(ds.shard_indices(w, workers)) for w in range(workers)]
        assert sum(map(len, per_worker)) == len(ds)
        shards += per_worker
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))


def test_slice_dataset__item_is_normalised_cropped_slice(acdc_store: str) -> None:
    st = storage.open_store(acdc_store)
    case = "patient099_frame01"  # 154 x 224 in-plane
    ds = SliceDataset(acdc_store, [case], size=(160, 200), seed=0)
    item = next(iter(ds))
    z = int(item["slice_index"])
    meta = st.meta(case)
    p1, p99 = meta["intensity"]["p1"], meta["intensity"]["p99"]
    raw = st.read_slice(case, z)
    expect = np.zeros((160, 200), np.float32)
    expect[3:157, :] = ((raw - p1) / (p99 - p1))[:, 12:212]  # pad X by 3, crop Y by 12
    np.testing.assert_allclose(item["image"][0].numpy(), expect, atol=1e-6)
    lab = np.full((160, 200), -1)
    lab[3:157, :] = st.read_slice(case, z, "label")[:, 12:212]
    np.testing.assert_array_equal(item["label"].numpy(), lab)
    assert item["image"].dtype == torch.float32 and item["label"].dtype == torch.int64
    assert item["partition"] == partition_of(z, 16, 4) == min(z // 4, 3)


def test_preprocess__resample_then_restore_round_trips_labels() -> None:
    rng = np.random.default_rng(0)
    lab = np.kron(rng.integers(0, 4, (10, 12)), np.ones((8, 8), np.int64))  # blocky (80, 96)
    img = rng.normal(size=lab.shape).astype(np.float32)
    out = preprocess_slice(img, (1.5, 1.5), 0.0, 1.0, size=(128, 128), spacing_mm=0.75, maps={"label": lab})
    assert resampled_shape(lab.shape, (1.5, 1.5), 0.75) == (160, 192)
    assert out["image"].shape == (1, 128, 128) and out["label"].shape == (128, 128)
    back = restore_slice(out["label"][None], lab.shape, (1.5, 1.5), 0.75, nearest=True)[0].numpy()
    # the crop kept rows 16..143 of 160 and cols 32..159 of 192 at 0.75 mm, i.e. native rows
    # 8..71 and cols 16..79: there the round trip is exact, the cropped margins come back as 0.
    np.testing.assert_array_equal(back[8:72, 16:80], lab[8:72, 16:80])
    assert (back[:8] == 0).all() and (back[72:] == 0).all() and (back[:, :16] == 0).all() and (back[:, 80:] == 0).all()
    padded = crop_or_pad(torch.ones(1, 3, 5), (6, 4), -1)
    assert padded[0].tolist() == [[-1] * 4, [1] * 4, [1] * 4, [1] * 4, [-1] * 4, [-1] * 4]


def test_slice_dataset__spacing_mm_resamples(acdc_store: str) -> None:
    ds = SliceDataset(acdc_store, ["patient099_frame01"], size=(400, 400), spacing_mm=0.78125, seed=0)
    item = next(iter(ds))
    valid = (item["label"] >= 0).numpy()
    rows, cols = np.nonzero(valid)
    assert rows.max() - rows.min() + 1 == 308 and cols.max() - cols.min() + 1 == 400  # 154*2, 224*2 cropped


def test_slice_dataset__fg_oversample_and_class_filter(acdc_store: str) -> None:
    st = storage.open_store(acdc_store)
    cases = st.cases

    def fg_fraction(ds: SliceDataset) -> float:
        plan = ds.plan(0)
        return float(np.mean([any(v > 0 for v in st.meta(cases[c])["slice_labels"][z]) for c, z in plan]))

    base = SliceDataset(acdc_store, cases, size=(8, 8), samples_per_epoch=400, seed=1)
    over = SliceDataset(acdc_store, cases, size=(8, 8), samples_per_epoch=400, seed=1, fg_oversample=1.0)
    assert fg_fraction(over) == 1.0 and fg_fraction(base) < 1.0
    allc = SliceDataset(acdc_store, cases, size=(8, 8), seed=0, require_all_classes=True)
    eligible, _ = allc.eligible()
    assert 0 < len(eligible) < sum(st.num_slices(c) for c in cases)
    for c, z in eligible.tolist():
        assert st.meta(cases[c])["slice_labels"][z] == [0, 1, 2, 3]
        assert set(np.unique(st.read_slice(cases[c], z, "label"))) == {0, 1, 2, 3}


def test_slice_dataset__hidden_labels_are_minus_one(acdc_store: str) -> None:
    cases = storage.open_store(acdc_store).cases
    ds = SliceDataset(acdc_store, cases[:2], size=(32, 32), hide_labels=[cases[0]], seed=0)
    for item in ds:
        hidden = int(item["case_index"]) == 0
        assert bool((item["label"] == -1).all()) == hidden


def test_slice_dataset__derived_superpixels_and_views(tmp_path, synth) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    uri = str(tmp_path / "s.zarr")
    storage.ingest(src, uri, progress=False)

    def regions(s: np.ndarray) -> np.ndarray:  # deterministic region map: quadrant id
        out = np.zeros(s.shape, np.int64)
        out[s.shape[0] // 2 :, :] += 1
        out[:, s.shape[1] // 2 :] += 2
        return out

    done = storage.cache_derived(uri, "superpixels", regions)
    assert done == {"computed": ["c0", "c1"], "skipped": []}
    assert storage.cache_derived(uri, "superpixels", regions)["skipped"] == ["c0", "c1"]
    st = storage.open_store(uri)
    assert st.derived("c0", "superpixels").dtype == np.uint16

    def views(item, gen):  # noqa: ANN001
        noise = torch.randn(item["image"].shape, generator=gen)
        return {"view1": item["image"] + noise, "view2": item["image"] - noise}

    ds = SliceDataset(uri, ["c0", "c1"], size=(14, 10), derived=("superpixels",), views=views, seed=2)
    items = list(ds)
    again = list(SliceDataset(uri, ["c0", "c1"], size=(14, 10), derived=("superpixels",), views=views, seed=2))
    for it, it2 in zip(items, again):
        torch.testing.assert_close(it["view1"], it2["view1"])  # generator seeded per sample
        sp = it["superpixels"]
        assert sp.shape == (14, 10) and sp.dtype == torch.int64
        np.testing.assert_array_equal(sp[1:13].numpy(), regions(np.zeros((12, 10))))
        assert (sp[0] == -1).all() and (sp[13] == -1).all()  # padding rows
    with pytest.raises(ValueError, match="integer"):
        storage.cache_derived(uri, "bad", lambda s: s.astype(np.float32), overwrite=True)


def test_cache_derived__another_writer_of_the_same_array_is_waited_for_and_kept(tmp_path, synth, monkeypatch) -> None:
    """Two jobs caching super-pixels of one store at once: when the other process creates a
    case's array between this one's check and its write (zarr's ContainsArrayError), this one
    keeps the other's array once complete instead of failing; an array that never completes is
    a clear error naming the case."""
    import zarr

    from storage.store import VolumeStore

    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    uri = str(tmp_path / "s.zarr")
    storage.ingest(src, uri, progress=False)
    put = VolumeStore.put_derived

    def fn(s: np.ndarray) -> np.ndarray:
        return (s > 0.5).astype(np.int64)

    def other_writer_first(self, case, name, array, attrs=None):  # noqa: ANN001
        if case == "c1":  # the other process's write lands between the check and the create
            put(self, case, name, array, {"writer": "other"})
            raise zarr.errors.ContainsArrayError(f"An array exists at cases/{case}/{name}")
        put(self, case, name, array, attrs)

    monkeypatch.setattr(VolumeStore, "put_derived", other_writer_first)
    assert storage.cache_derived(uri, "sp", fn) == {"computed": ["c0"], "skipped": ["c1"]}
    assert zarr.open_group(uri, mode="r")["cases/c1/sp"].attrs["writer"] == "other"  # kept, not rewritten
    monkeypatch.setattr(VolumeStore, "put_derived", put)
    storage.cache_derived(uri, "sp_ref", fn)
    st = storage.open_store(uri)
    np.testing.assert_array_equal(st.derived("c1", "sp"), st.derived("c1", "sp_ref"))

    def never_completes(self, case, name, array, attrs=None):  # noqa: ANN001
        put(self, case, name, array, attrs)
        zarr.open_group(uri, mode="a")[f"cases/{case}/{name}"].attrs["complete"] = False  # it died mid-write
        raise zarr.errors.ContainsArrayError("exists")

    monkeypatch.setattr(VolumeStore, "put_derived", never_completes)
    with pytest.raises(storage.StoreError, match=r"'sp2' of case 'c0' .* still incomplete"):
        storage.cache_derived(uri, "sp2", fn, concurrent_wait_s=0.2)


def test_partition_batch_dataset__one_slice_per_partition(acdc_store: str) -> None:
    st = storage.open_store(acdc_store)
    cases = st.cases
    m, s = 3, 4
    ds = PartitionBatchDataset(
        acdc_store, cases, size=(32, 32), volumes_per_batch=m, partitions=s, batches_per_epoch=4, seed=7
    )
    batches = list(ds)
    assert len(batches) == 4
    for b in batches:
        assert b["image"].shape == (m * s, 1, 32, 32) and b["label"].shape == (m * s, 32, 32)
        assert b["volume"].tolist() == [v for v in range(m) for _ in range(s)]
        assert b["partition"].tolist() == list(range(s)) * m
        vols = b["case_index"].view(m, s)
        assert (vols == vols[:, :1]).all() and len(set(vols[:, 0].tolist())) == m  # distinct volumes
        for v in range(m):
            n = st.num_slices(cases[int(vols[v, 0])])
            length = n // s
            zs = b["slice_index"].view(m, s)[v]
            for p in range(s):
                assert p * length <= int(zs[p]) < (p + 1) * length
    assert [b["slice_index"].tolist() for b in batches] == [b["slice_index"].tolist() for b in ds]
    r0 = PartitionBatchDataset(
        acdc_store, cases, size=(8, 8), volumes_per_batch=2, batches_per_epoch=5, rank=0, world_size=2
    )
    r1 = PartitionBatchDataset(
        acdc_store, cases, size=(8, 8), volumes_per_batch=2, batches_per_epoch=5, rank=1, world_size=2
    )
    assert len(r0) == 3 and len(r1) == 2
    with pytest.raises(ValueError, match="volumes_per_batch=9"):
        list(PartitionBatchDataset(acdc_store, cases, size=(8, 8), volumes_per_batch=9))


def test_patch_dataset__patches_match_volume_and_pad(acdc_store: str) -> None:
    st = storage.open_store(acdc_store)
    cases = st.cases
    ds = PatchDataset(acdc_store, cases, size=(64, 48, 20), samples_per_epoch=6, seed=0, fg_oversample=0.5)
    for item in ds:
        case = cases[int(item["case_index"])]
        x0, y0, z0 = item["origin"].tolist()
        meta = st.meta(case)
        it = meta["intensity"]
        img = (st.read_patch(case, (x0, y0, z0), (64, 48, 20)) - it["p1"]) / (it["p99"] - it["p1"])
        nz = meta["shape"][2]  # < 20 slices: centred with padding along z
        assert z0 == (nz - 20) // 2
        inside = slice(-z0, -z0 + nz)
        got = item["image"][0].numpy()  # (D, H, W) = (z, x, y)
        np.testing.assert_allclose(got[inside], np.transpose(img, (2, 0, 1))[inside], atol=1e-5)
        assert (got[:-z0] == 0).all() and (item["label"][:-z0] == -1).all()
        lab = st.read_patch(case, (x0, y0, z0), (64, 48, 20), array="label")
        np.testing.assert_array_equal(item["label"].numpy()[inside], np.transpose(lab, (2, 0, 1))[inside])
    fg = PatchDataset(acdc_store, cases, size=(32, 32, 4), samples_per_epoch=20, seed=1, fg_oversample=1.0)
    assert all(bool((it["label"] > 0).any()) for it in fg)


def test_samplers__bad_arguments_name_the_parameter(acdc_store: str) -> None:
    cases = storage.open_store(acdc_store).cases
    with pytest.raises(ValueError, match="rank"):
        SliceDataset(acdc_store, cases, rank=2, world_size=2)
    with pytest.raises(ValueError, match="fg_oversample"):
        SliceDataset(acdc_store, cases, fg_oversample=1.5)
    with pytest.raises(ValueError, match="size"):
        SliceDataset(acdc_store, cases, size=(0, 4))
    with pytest.raises(ValueError, match="cases"):
        SliceDataset(acdc_store, [])
    with pytest.raises(ValueError, match="size"):
        PatchDataset(acdc_store, cases, size=(4, 4))


@pytest.mark.parametrize("out", [(300, 400), (100, 150), (17, 9), (276, 384)])
def test_resize2d__matches_torch_interpolate(out) -> None:
    """The numpy resampler equals torch's bilinear (align_corners=False) and nearest-exact."""
    import torch.nn.functional as F

    from storage.preprocess import resize2d

    rng = np.random.default_rng(1)
    x = rng.random((276, 384)).astype(np.float32)
    ref = F.interpolate(
        torch.from_numpy(x.astype(np.float64))[None, None], size=out, mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(resize2d(x, out, nearest=False), ref, atol=1e-5)
    lab = rng.integers(0, 5000, x.shape)
    ref_n = F.interpolate(torch.from_numpy(lab.astype(np.float64))[None, None], size=out, mode="nearest-exact")[0, 0]
    got = resize2d(lab, out, nearest=True)
    assert got.dtype == lab.dtype
    np.testing.assert_array_equal(got, ref_n.numpy().astype(np.int64))


def test_slice_dataset__label_array_reads_derived_pseudo_labels(tmp_path, synth) -> None:
    """PLCL rounds: ``label_array="pseudo_r1"`` serves cached pseudo-labels as ``label`` and
    the all-classes filter uses them; cases without the array get -1 and are filtered out."""
    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    uri = str(tmp_path / "s.zarr")
    storage.ingest(src, uri, progress=False)
    st = storage.open_store(uri, mode="a")
    shape = tuple(st.meta("c0")["shape"])  # (12, 10, 6)
    pseudo = np.zeros(shape, np.uint8)
    pseudo[:6, :, 2] = 1
    pseudo[6:, :5, 2] = 2  # slice 2 holds classes {0, 1, 2}; the others only 0
    st.put_derived("c0", "pseudo_r1", pseudo)
    ds = SliceDataset(
        uri, ["c0", "c1"], size=(12, 10), label_array="pseudo_r1", require_all_classes=True, num_classes=3
    )
    assert ds.eligible()[0].tolist() == [[0, 2]]
    (item,) = list(ds)
    np.testing.assert_array_equal(item["label"].numpy(), pseudo[:, :, 2])
    ds_all = SliceDataset(uri, ["c0", "c1"], size=(12, 10), label_array="pseudo_r1")
    for it in ds_all:
        assert bool((it["label"] == -1).all()) == (int(it["case_index"]) == 1)


def _consumed(ds: SliceDataset, workers: int, batch: int, steps: int) -> list[int]:
    """Plan indices a DataLoader(batch_size=batch, num_workers=workers) yields in ``steps``
    steps: batch j comes from loader worker j % workers (PyTorch's in-order round robin)."""
    per_worker = [list(ds.shard_indices(w, workers)) for w in range(workers)]
    out: list[int] = []
    for j in range(steps):
        w, k = j % workers, j // workers
        out += per_worker[w][k * batch : (k + 1) * batch]
    return out


@pytest.mark.parametrize("workers", [1, 2])
def test_slice_dataset__set_epoch_start_resumes_on_another_world_size(acdc_store: str, workers: int) -> None:
    """Resume inside an epoch: 2 ranks x batch 2 run 3 steps (global batch 4); the rest of the
    epoch is re-sharded over 1 rank with batch 4. Every plan item is drawn exactly once."""
    cases = storage.open_store(acdc_store).cases
    steps, gb = 6, 4
    n = steps * gb
    before: list[int] = []
    for rank in range(2):
        ds = SliceDataset(acdc_store, cases, size=(8, 8), samples_per_epoch=n, rank=rank, world_size=2)
        ds.loader_batch = 2
        ds.set_epoch(1)
        before += _consumed(ds, workers, 2, 3)
    assert sorted(before) == list(range(3 * gb))  # 3 steps used exactly the plan prefix
    ds1 = SliceDataset(acdc_store, cases, size=(8, 8), samples_per_epoch=n, rank=0, world_size=1)
    ds1.loader_batch = 4
    ds1.set_epoch(1, start=3 * gb)
    after = _consumed(ds1, workers, 4, 3)
    assert len(ds1) == 3 * gb and sorted(before + after) == list(range(n))
    with pytest.raises(ValueError, match="start"):
        ds1.set_epoch(1, start=-1)
