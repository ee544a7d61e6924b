"""Fixtures for storage tests: a small real-ACDC store and synthetic MSD datasets."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

# Four patients of the shared ACDC copy (3 of the SSL4MIS 3-labelled set + 1 val patient).
ACDC_PATIENTS = ("patient099", "patient038", "patient050", "patient028")
ACDC_CASES = tuple(f"{p}_frame0{f}" for p in ACDC_PATIENTS for f in (1, 2))


@pytest.fixture(scope="session")
def acdc_store(acdc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Read-only store of the 8 ACDC_CASES (ingested once per session; do not modify)."""
    import storage

    uri = str(tmp_path_factory.mktemp("acdc") / "acdc.zarr")
    report = storage.ingest(acdc_dir, uri, cases=list(ACDC_CASES), progress=False, workers=2)
    assert not report.failed, report.failed
    return uri


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = None, dtype: type | None = None) -> Path:
    """Save ``data`` as NIfTI (gzip if the name ends in .gz)."""
    img = nib.Nifti1Image(
        np.asarray(data, dtype=dtype) if dtype else np.asarray(data),
        np.diag([1.5, 1.5, 5.0, 1.0]) if affine is None else affine,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def make_pair(root: Path, case: str, shape=(12, 10, 6), seed: int = 0, labels=(0, 1, 2)) -> tuple[Path, Path]:
    """A random float image and integer label of ``shape`` under root/imagesTr, root/labelsTr."""
    rng = np.random.default_rng(seed)
    img = write_nifti(root / "imagesTr" / f"{case}.nii.gz", rng.normal(100, 20, shape).astype(np.float32))
    lab = write_nifti(root / "labelsTr" / f"{case}.nii.gz", rng.choice(labels, shape).astype(np.uint8))
    return img, lab


def make_msd(
    root: Path, cases: list[str], labels: dict[str, str] | None = None, extra_entries: list | None = None
) -> Path:
    """A small MSD dataset with ``cases`` (valid pairs) and a dataset.json listing them."""
    for i, c in enumerate(cases):
        make_pair(root, c, seed=i)
    spec = {
        "name": "synthetic",
        "labels": labels or {"0": "background", "1": "a", "2": "b"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
        + list(extra_entries or []),
    }
    (root / "dataset.json").write_text(json.dumps(spec))
    return root


class Synth:
    """Builders of synthetic NIfTI files / MSD datasets, handed to tests as the ``synth`` fixture
    (tests/ is not a package, so helpers travel as a fixture rather than an import)."""

    write_nifti = staticmethod(write_nifti)
    make_pair = staticmethod(make_pair)
    make_msd = staticmethod(make_msd)
    ACDC_CASES = ACDC_CASES


@pytest.fixture(scope="session")
def synth() -> type[Synth]:
    return Synth


# --------------------------------------------------------------------------- object storage
@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """One moto S3 server on 127.0.0.1 (free port) for the session; its ``http://`` endpoint."""
    import logging

    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture()
def s3_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> str:
    """Fake credentials + endpoint in the environment only (``AWS_ENDPOINT_URL``), and a fresh
    bucket for this test; returns the bucket name. Code under test passes no storage_options."""
    import re

    import boto3

    for k, v in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
    }.items():
        monkeypatch.setenv(k, v)
    bucket = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-") or "bucket"
    bucket = f"b-{bucket}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    import fsspec

    fsspec.filesystem("s3").invalidate_cache()  # instances are cached across tests
    return bucket
