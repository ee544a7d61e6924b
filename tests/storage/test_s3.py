"""Object storage end to end against a real S3 API (moto server on 127.0.0.1, credentials and
endpoint in the environment only): the streaming reader (one ranged GET per slice), the
samplers' prefetch + bounded cache, and ingest (Ray, from an S3 prefix and a local tree, with a
malformed file) -> ``localcl run`` (pretrain + fine-tune, store *and* checkpoints on S3) ->
evaluation, plus resume of an S3-sourced ingest without downloading anything."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

import storage
import storage.remote
from storage.parallel import _spec, ingest_specs, parallel_ingest, quarantine
from storage.remote import discover_remote
from storage.samplers import PatchDataset, SliceDataset

LABELLED = ["patient099", "patient038", "patient050"]  # splits.json ssl4mis_labeled_patients["3"]
VAL = ["patient002"]
UNLABELLED = ["patient100"]
BAD = "patient999_frame01"


class CountingFS:
    """Wraps an fsspec file system and counts the byte ranges requested through it."""

    def __init__(self, fs) -> None:  # type: ignore[no-untyped-def]
        self.fs, self.ranges = fs, 0

    def cat_ranges(self, paths, starts, ends, **kw):  # type: ignore[no-untyped-def]
        self.ranges += len(paths)
        return self.fs.cat_ranges(paths, starts, ends, **kw)


def test_remote_shard_reader__equals_zarr_with_one_get_per_slice(tmp_path: Path, synth, s3_env, monkeypatch) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    uri = f"s3://{s3_env}/demo.zarr"
    assert storage.ingest(src, uri, progress=False).ok  # no storage_options: env only
    st = storage.open_store(uri)
    reader = st._reader("c1", "image")
    assert type(reader).__name__ == "RemoteShardReader"
    counting = CountingFS(reader.fs)
    reader.fs = counting
    ref = nib.load(str(src / "imagesTr" / "c1.nii.gz")).get_fdata()
    for z in range(st.num_slices("c1")):
        np.testing.assert_allclose(st.read_slice("c1", z), ref[:, :, z], atol=1e-4)
    assert counting.ranges == st.num_slices("c1")  # the index was read once, at open
    np.testing.assert_allclose(
        st.read_patch("c1", (-2, 3, 1), (6, 9, 3)), np.pad(ref, ((2, 0), (0, 2), (0, 0)))[0:6, 3:12, 1:4], atol=1e-4
    )
    assert counting.ranges == st.num_slices("c1") + 3  # one batched call, one range per chunk
    monkeypatch.setenv("LOCALCL_ZARR_ONLY", "1")
    zarr_st = storage.open_store(uri)
    assert zarr_st._reader("c1", "label") is None
    np.testing.assert_array_equal(zarr_st.read_slice("c1", 2, "label"), st.read_slice("c1", 2, "label"))


def test_samplers__s3_prefetch_stream_equals_local_and_cache_is_bounded(tmp_path: Path, synth, s3_env) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0", "c1", "c2"])
    local, remote = str(tmp_path / "l.zarr"), f"s3://{s3_env}/r.zarr"
    for uri in (local, remote):
        assert storage.ingest(src, uri, progress=False).ok
    cases = storage.open_store(local).cases
    ds_l = SliceDataset(local, cases, size=(16, 16), samples_per_epoch=40, seed=3)
    ds_r = SliceDataset(remote, cases, size=(16, 16), samples_per_epoch=40, seed=3, cache_bytes=1500)
    assert (ds_l.prefetch, ds_l.cache_bytes, ds_r.prefetch) == (0, 0, 4)
    for epoch in (0, 1):
        ds_l.set_epoch(epoch)
        ds_r.set_epoch(epoch)
        a, b = list(ds_l), list(ds_r)
        assert len(a) == len(b) == 40
        for x, y in zip(a, b):
            assert x.keys() == y.keys()
            for k in x:
                torch_equal = (x[k] == y[k]).all().item()
                assert torch_equal, k
        assert 0 < ds_r.store._cached_bytes <= 1500  # 12x10 float32 slices: at most 3 kept
    p_l = PatchDataset(local, cases, size=(8, 8, 4), samples_per_epoch=6, seed=1)
    p_r = PatchDataset(remote, cases, size=(8, 8, 4), samples_per_epoch=6, seed=1, prefetch=2)
    for x, y in zip(p_l, p_r):
        assert (x["image"] == y["image"]).all() and (x["label"] == y["label"]).all()
    with pytest.raises(ValueError, match="prefetch"):
        SliceDataset(remote, cases, prefetch=-1)
    with pytest.raises(ValueError, match="cache_bytes"):
        SliceDataset(remote, cases, cache_bytes=-1)


def test_env_storage_options__s3_settings_from_the_environment_only(monkeypatch) -> None:
    from storage.remote import FORWARDED_ENV, env_storage_options, forwarded_env

    for k in FORWARDED_ENV:
        monkeypatch.delenv(k, raising=False)
    assert env_storage_options("s3://b/x") == {} and forwarded_env() == {}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("HOME_SECRET_NOT_AWS", "x")
    assert env_storage_options("s3://b/x") == {
        "key": "k",
        "secret": "s",
        "endpoint_url": "http://127.0.0.1:9",
        "client_kwargs": {"region_name": "eu-west-1"},
    }
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:10")  # the S3-specific one wins
    assert env_storage_options("s3://b/x")["endpoint_url"] == "http://127.0.0.1:10"
    assert env_storage_options("/local/run") == {} and env_storage_options("memory://x") == {}
    assert set(forwarded_env()) == {
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ENDPOINT_URL",
        "AWS_DEFAULT_REGION",
        "AWS_ENDPOINT_URL_S3",
    }


def test_discover_remote__msd_prefix_pairs_and_reports_problems(tmp_path: Path, synth, s3_env) -> None:
    import fsspec

    fs = fsspec.filesystem("s3")
    src = synth.make_msd(tmp_path / "src", ["c0", "c1"], extra_entries=[{"image": "../../etc/passwd", "label": "x"}])
    fs.put(str(src) + "/", f"{s3_env}/ds/", recursive=True)
    fs.pipe_file(f"{s3_env}/ds/labelsTr/orphan.nii.gz", b"x")  # a label without its image
    dataset, versions = discover_remote(f"s3://{s3_env}/ds")
    by_id = {c.case_id: c for c in dataset.cases}
    assert by_id["c0"].image == f"s3://{s3_env}/ds/imagesTr/c0.nii.gz" and by_id["c0"].problem is None
    assert by_id["c1"].label == f"s3://{s3_env}/ds/labelsTr/c1.nii.gz"
    assert "outside the dataset root" in str(by_id["training[2]"].problem)
    assert "label without its image" in str(by_id["orphan"].problem)
    assert versions[by_id["c0"].image]["size"] == (src / "imagesTr" / "c0.nii.gz").stat().st_size
    assert dataset.label_names == {0: "background", 1: "a", 2: "b"}
    with pytest.raises(storage.InputError, match="dataset.json"):
        discover_remote(f"s3://{s3_env}/ds/imagesTr")
    with pytest.raises(storage.InputError, match="no objects"):
        discover_remote(f"s3://{s3_env}/nothing-here")
    flat, _ = discover_remote(f"s3://{s3_env}/ds", unlabelled=True)
    assert sorted(c.case_id for c in flat.cases) == [
        "imagesTr__c0",
        "imagesTr__c1",
        "labelsTr__c0",
        "labelsTr__c1",
        "labelsTr__orphan",
    ]


def _upload_acdc(acdc_dir: Path, bucket: str) -> str:
    """ACDC subset as an MSD prefix on S3 (+ a truncated image with its label); returns the URL."""
    import fsspec

    fs = fsspec.filesystem("s3")
    prefix = f"{bucket}/archive/acdc"
    cases = [f"{p}_frame{f:02d}" for p in LABELLED + VAL for f in (1, 2)]
    for c in cases:
        for sub in ("imagesTr", "labelsTr"):
            fs.put_file(str(acdc_dir / sub / f"{c}.nii.gz"), f"{prefix}/{sub}/{c}.nii.gz")
    raw = (acdc_dir / "imagesTr" / f"{cases[0]}.nii.gz").read_bytes()
    fs.pipe_file(f"{prefix}/imagesTr/{BAD}.nii.gz", raw[: len(raw) // 3])
    fs.put_file(str(acdc_dir / "labelsTr" / f"{cases[0]}.nii.gz"), f"{prefix}/labelsTr/{BAD}.nii.gz")
    spec = json.loads((acdc_dir / "dataset.json").read_text())
    spec["training"] = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases + [BAD]]
    fs.pipe_file(f"{prefix}/dataset.json", json.dumps(spec).encode())
    fs.put_file(str(acdc_dir / "splits.json"), f"{prefix}/splits.json")
    return f"s3://{prefix}"


def test_s3__ingest_from_prefix_and_tree_then_finetune_evaluate(
    ray_cluster, acdc_dir, tmp_path, s3_env, monkeypatch, capsys
):
    import fsspec

    from ray_jobs.cli import main

    fs = fsspec.filesystem("s3")
    src = _upload_acdc(acdc_dir, s3_env)
    store = f"s3://{s3_env}/stores/acdc.zarr"
    # 1. labelled cases from the S3 prefix (Ray tasks download one case each, then delete it)
    rep = parallel_ingest(src, store, progress=False, memory_per_task=256 * 2**20)
    labelled = sorted(f"{p}_frame{f:02d}" for p in LABELLED + VAL for f in (1, 2))
    assert [r.case_id for r in rep.ingested] == labelled and [r.case_id for r in rep.failed] == [BAD]
    assert f"s3://{s3_env}/archive/acdc/imagesTr/{BAD}.nii.gz" in rep.failed[0].error  # the URL, not a temp file
    assert "truncated or corrupt gzip" in rep.failed[0].error
    st = storage.open_store(store)
    meta = st.meta(labelled[0])
    assert meta["source_path"].startswith("s3://") and meta["source_version"]["image"]["etag"]
    ref = nib.load(str(acdc_dir / "imagesTr" / f"{labelled[0]}.nii.gz")).get_fdata()
    np.testing.assert_allclose(st.read_slice(labelled[0], 4), ref[:, :, 4], atol=1e-4)
    # 2. resume: complete cases are skipped from the listing's size + ETag alone. The task
    #    body is run in-process here so that a download attempt can be caught.
    dataset, versions = discover_remote(src)
    specs = [_spec(c, versions) for c in dataset.cases if c.case_id in labelled]
    with monkeypatch.context() as m:
        m.setattr(storage.remote, "fetch_to_local", lambda *a, **k: pytest.fail("downloaded"))
        out = ingest_specs(
            specs,
            store,
            label_names=dataset.label_names,
            storage_options=None,
            source_options=None,
            max_bytes=None,
            chunk_xy=None,
        )
    assert [r["status"] for r in out] == ["skipped"] * len(labelled)
    again = parallel_ingest(src, store, progress=False, memory_per_task=256 * 2**20)
    assert [r.case_id for r in again.skipped] == labelled and [r.case_id for r in again.failed] == [BAD]
    # 3. unlabelled volumes from a local tree into the same S3 store, through the CLI
    tree = tmp_path / "unlabelled" / "site_a"
    tree.mkdir(parents=True)
    for f in (1, 2):
        (tree / f"{UNLABELLED[0]}_frame{f:02d}.nii.gz").write_bytes(
            (acdc_dir / "imagesTr" / f"{UNLABELLED[0]}_frame{f:02d}.nii.gz").read_bytes()
        )
    assert (
        main(
            [
                "ingest",
                str(tmp_path / "unlabelled"),
                store,
                "--unlabelled",
                "--ray",
                "--no-progress",
                "--task-memory",
                "256",
            ]
        )
        == 0
    )
    st.refresh()
    assert len(st.cases) == 10 and len(st.labelled_cases) == 8
    assert [q["case"] for q in quarantine(store)] == [BAD]
    capsys.readouterr()

    # 4. fine-tune + evaluate: store and run directory (checkpoints) on S3 (pretraining on S3,
    #    with its step checkpoints, is what the node-fault runs of test_node_faults.py do)
    cfg = {
        "name": "s3e2e",
        "data": {
            "store": store,
            "label_budget": 3,
            "seed": 0,
            "size": [64, 64],
            "spacing_mm": [5.0, 5.0],
            "splits": {"pool": "train", "val": "val", "test": "val"},
            "max_val_cases": 1,
            "max_test_cases": 2,
        },
        "pretrain": None,
        "finetune": {
            "method": {"name": "supervised", "widths": [8, 16, 32]},
            "schedule": {"epochs": 1, "steps_per_epoch": 2, "batch_size": 4},
        },
        "baseline": None,
        "evaluate": {"overlay_cases": 1},
        "scaling": {"num_workers": 1, "use_gpu": False, "resources_per_worker": {"CPU": 1}},
        "checkpoint": {"num_to_keep": 1, "max_failures": 0},
        "logging": {"tensorboard": False, "progress": False},
    }
    cfg_path = tmp_path / "s3.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert "testing" not in cfg_path.read_text()  # no credentials in the config
    run_dir = f"s3://{s3_env}/runs/s3e2e"
    assert main(["run", "--config", str(cfg_path), "--run-dir", run_dir, "--no-progress"]) == 0
    root = f"{s3_env}/runs/s3e2e"
    for rel in (
        "config.yaml",
        "model_card.json",
        "finetune/history.csv",
        "finetune/model/model.pt",
        "eval/method/summary.json",
        "eval/method/per_case.json",
    ):
        assert fs.exists(f"{root}/{rel}"), rel
    ckpts = [p for p in fs.find(f"{root}/finetune") if "/checkpoint_" in p]
    assert ckpts, "fine-tuning checkpoints were not written to S3"
    summary = json.loads(fs.cat_file(f"{root}/eval/method/summary.json"))
    assert 0.0 <= summary["mean"]["dice"] <= 1.0
    per_case = json.loads(fs.cat_file(f"{root}/eval/method/per_case.json"))
    assert sorted(r["case"] for r in per_case) == ["patient002_frame01", "patient002_frame02"]
    assert "testing" not in fs.cat_file(f"{root}/config.yaml").decode()
