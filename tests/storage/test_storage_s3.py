"""A store on S3 (moto server on 127.0.0.1): ingest, read, samplers through fsspec/FsspecStore."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import storage
from storage.samplers import SliceDataset


@pytest.fixture()
def s3_options(monkeypatch):  # type: ignore[no-untyped-def]
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(k, v)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="lcl-test")
    yield {
        "key": "testing",
        "secret": "testing",
        "endpoint_url": endpoint,
        "client_kwargs": {"region_name": "us-east-1"},
    }
    server.stop()


def test_s3_store__ingest_read_and_sample(tmp_path: Path, synth, s3_options) -> None:
    src = synth.make_msd(tmp_path / "src", ["c0", "c1"])
    uri = "s3://lcl-test/stores/demo.zarr"
    report = storage.ingest(src, uri, progress=False, storage_options=s3_options)
    assert report.ok and len(report.ingested) == 2
    st = storage.open_store(uri, storage_options=s3_options)
    assert st.cases == ["c0", "c1"] and type(st._reader("c0", "image")).__name__ == "RemoteShardReader"
    ref = nib.load(str(src / "imagesTr" / "c1.nii.gz")).get_fdata()
    np.testing.assert_allclose(st.image("c1"), ref, atol=1e-4)
    np.testing.assert_allclose(st.read_slice("c1", 3), ref[:, :, 3], atol=1e-4)
    np.testing.assert_allclose(st.read_patch("c1", (2, 2, 1), (4, 4, 2)), ref[2:6, 2:6, 1:3], atol=1e-4)
    again = storage.ingest(src, uri, progress=False, storage_options=s3_options)
    assert len(again.skipped) == 2
    items = list(SliceDataset(uri, st.cases, size=(16, 16), seed=0, storage_options=s3_options))
    assert len(items) == sum(st.num_slices(c) for c in st.cases)


def test_s3_store__case_index_opens_without_reading_each_case(tmp_path: Path, synth, s3_options, monkeypatch) -> None:
    """On object storage the index turns N per-case GETs into one LIST and one GET; a case
    added since (not via ingest) is still found, from its own group."""
    from storage.store import VolumeStore

    src = synth.make_msd(tmp_path / "src", ["c0", "c1", "c2"])
    uri = "s3://lcl-test/stores/indexed.zarr"
    storage.ingest(src, uri, progress=False, storage_options=s3_options)
    reads: list[list[str]] = []
    original = VolumeStore._read_case_attrs

    def recording(self: VolumeStore, names: list[str]) -> object:
        reads.append(list(names))
        return original(self, names)

    monkeypatch.setattr(VolumeStore, "_read_case_attrs", recording)
    st = storage.open_store(uri, storage_options=s3_options)
    assert st.cases == ["c0", "c1", "c2"] and reads == [[]]
    assert st.meta("c1")["shape"] == list(nib.load(str(src / "imagesTr" / "c1.nii.gz")).shape)
    w = storage.open_store(uri, mode="a", storage_options=s3_options)
    w.drop_case_index()
    w.refresh()
    assert w.cases == st.cases and all(w.meta(c) == st.meta(c) for c in st.cases)
    assert sorted(reads[-1]) == ["c0", "c1", "c2"]  # no index: every group read
    assert w.write_case_index() == 3
    reads.clear()
    assert storage.open_store(uri, storage_options=s3_options).cases == ["c0", "c1", "c2"] and reads == [[]]
