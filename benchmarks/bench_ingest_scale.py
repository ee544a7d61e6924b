"""Ingest throughput with 1 and 2 Ray workers, and loader throughput from S3 (moto) vs local.

Generated archive: ``--n`` unlabelled volumes of ``--shape`` (default 256 x 256 x 12, int16
with a smooth "anatomy" + noise, scl_slope set, gzip: ~0.8 MiB each on disk, 3 MiB decoded as
float32), written once under ``--workdir``. Then:

1. ``storage.parallel.parallel_ingest`` into a fresh local store with ``max_in_flight=1``
   (one Ray task at a time: 1 worker) and with ``max_in_flight=2*W`` on ``W`` CPUs
   (``--workers``, default 2); prints volumes/s and the speed-up ratio (target >= 1.7x with 2
   on a quiet machine; both runs in the same process, same Ray instance), once per
   ``--batch-size`` (cases per task; default 1 and 8).
2. Loader: ``SliceDataset`` over the first ``--loader-cases`` volumes of the local store and
   of the same store copied to a moto S3 server on 127.0.0.1 (credentials in env only):
   slices/s for local, S3 without prefetch/cache, S3 with the remote defaults (prefetch 4,
   256 MiB cache), and S3 second epoch (cache warm). Ratios vs local, same run. Also the time
   to open the S3 store (``store.cases``) with the case index ingest writes vs without it
   (every case's ``zarr.json`` read), same run.

Usage: ``.venv/bin/python benchmarks/bench_ingest_scale.py --n 2000`` (default 2000).
The machine's load average is printed: on a shared CPU the scaling figure is meaningless
when other processes use the cores.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for k, v in {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "AWS_EC2_METADATA_DISABLED": "true",
}.items():
    os.environ.setdefault(k, v)


def make_archive(root: Path, n: int, shape: tuple[int, int, int], seed: int = 0) -> float:
    """``n`` gzip NIfTI volumes under root/site_<k>/vol_<i>.nii.gz; returns seconds taken."""
    import nibabel as nib

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, s) for s in shape), indexing="ij")
    done = 0
    for i in range(n):
        path = root / f"site_{i % 8}" / f"vol_{i:06d}.nii.gz"
        if path.exists():
            done += 1
            continue
        cx, cy = rng.uniform(-0.3, 0.3, 2)
        body = 800 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 0.3) + 300 * (np.hypot(x, y) < 0.9)
        vol = (body + rng.normal(0, 40, shape)).clip(0, 4000).astype(np.int16)
        img = nib.Nifti1Image(vol, np.diag([1.4, 1.4, 8.0, 1.0]))
        img.header.set_slope_inter(0.5, -10.0)
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, str(path))
    return time.perf_counter() - t0


def bench_ingest(src: Path, work: Path, workers: int, batch_size: int = 1) -> dict[str, float]:
    import ray

    from storage.parallel import parallel_ingest

    # warm-up (not timed): start the Ray workers of the ingest runtime env and import storage
    warm = [p.relative_to(src).as_posix()[: -len(".nii.gz")].replace("/", "__") for p in sorted(src.rglob("*.nii.gz"))]
    parallel_ingest(
        src,
        str(work / "warmup.zarr"),
        unlabelled=True,
        cases=warm[: 2 * workers],
        max_in_flight=2 * workers,
        memory_per_task=512 * 2**20,
        progress=False,
        batch_size=batch_size,
    )
    out = {}
    for label, in_flight in (("1 worker", 1), (f"{workers} workers", 2 * workers)):
        store = work / f"store_{in_flight}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        t0, c0 = time.perf_counter(), time.process_time()
        rep = parallel_ingest(
            src,
            str(store),
            unlabelled=True,
            max_in_flight=in_flight,
            memory_per_task=512 * 2**20,
            progress=False,
            batch_size=batch_size,
        )
        dt, driver_cpu = time.perf_counter() - t0, time.process_time() - c0
        assert rep.ok and len(rep.ingested) == len(rep.results), rep.summary()
        n = len(rep.ingested)
        out[label] = n / dt
        task_ms = 1e3 * sum(r.seconds for r in rep.results) / n
        print(
            f"ingest {label:>10} (batch {batch_size}): {n} volumes in {dt:7.1f} s = {out[label]:6.2f} volumes/s; "
            f"task wall {task_ms:.0f} ms/volume, driver CPU {1e3 * driver_cpu / n:.1f} ms/volume"
        )
    ratio = out[f"{workers} workers"] / out["1 worker"]
    print(f"ingest scaling {workers} vs 1 worker: {ratio:.2f}x (target >= 1.7x with 2)")
    ray.shutdown()
    return out


def bench_loader(store: Path, n_cases: int, samples: int) -> None:
    import socket
    import subprocess

    import boto3
    import fsspec

    import storage
    from storage.samplers import SliceDataset

    # moto in its own process (as a real server would be): an in-process ThreadedMotoServer
    # shares the loader's GIL and would hide what prefetch does
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        host, port = sock.getsockname()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.2)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=f"http://{host}:{port}",
    )
    boto3.client("s3", endpoint_url=f"http://{host}:{port}", region_name="us-east-1").create_bucket(Bucket="bench")
    fs = fsspec.filesystem("s3")
    t0 = time.perf_counter()
    fs.put(str(store) + "/", "bench/store.zarr/", recursive=True)
    print(f"copied the store to moto S3 in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    all_cases = storage.open_store(str(store)).cases
    t_local = time.perf_counter() - t0
    s3_uri = "s3://bench/store.zarr"
    t0 = time.perf_counter()
    assert storage.open_store(s3_uri).cases == all_cases
    t_s3 = time.perf_counter() - t0
    w = storage.open_store(s3_uri, mode="a")
    assert w.read_case_index() is not None, "ingest wrote no case index"
    w.drop_case_index()  # baseline: what opening cost before the index (one GET per case)
    t0 = time.perf_counter()
    assert storage.open_store(s3_uri).cases == all_cases
    t_s3_groups = time.perf_counter() - t0
    t0 = time.perf_counter()
    w.write_case_index()
    t_write = time.perf_counter() - t0
    print(
        f"opening a store of {len(all_cases)} cases (store.cases): local {t_local:.2f} s; S3 with the "
        f"case index {t_s3:.2f} s ({1e3 * t_s3 / len(all_cases):.2f} ms/case), S3 reading every case's "
        f"zarr.json (16 at a time) {t_s3_groups:.2f} s ({1e3 * t_s3_groups / len(all_cases):.2f} ms/case): "
        f"index {t_s3_groups / t_s3:.1f}x faster; rewriting the index {t_write:.2f} s"
    )
    cases = all_cases[:n_cases]

    def rate(uri: str, epochs: int = 1, **kw) -> float:  # type: ignore[no-untyped-def]
        ds = SliceDataset(uri, cases, size=(192, 192), samples_per_epoch=samples, seed=0, **kw)
        ds.metas  # noqa: B018  (metadata listing is paid once per process, not per sample)
        r = 0.0
        for _ in range(epochs):
            ds.set_epoch(0)  # same plan: the 2nd pass measures the warm cache
            t = time.perf_counter()
            n = sum(1 for _ in ds)
            r = n / (time.perf_counter() - t)
        return r

    local = rate(str(store))
    rows = [
        ("local (page cache, fast reader)", local),
        ("S3, no prefetch, no cache", rate("s3://bench/store.zarr", prefetch=0, cache_bytes=0)),
        ("S3, prefetch 4 (default), cold", rate("s3://bench/store.zarr", cache_bytes=0)),
        ("S3, prefetch 4 + 256 MiB cache, warm", rate("s3://bench/store.zarr", epochs=2)),
    ]
    for name, r in rows:
        print(f"loader {name:<38}: {r:8.1f} slices/s  ({r / local:5.2f}x local)")
    server.terminate()
    server.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="volumes in the generated archive")
    ap.add_argument("--shape", type=int, nargs=3, default=(256, 256, 12))
    ap.add_argument("--workers", type=int, default=2, help="Ray CPUs for the parallel run")
    ap.add_argument("--workdir", default=None, help="keep the archive here (default: a temp dir)")
    ap.add_argument("--loader-cases", type=int, default=20)
    ap.add_argument("--loader-samples", type=int, default=200)
    ap.add_argument("--skip-loader", action="store_true", help="ingest figures only")
    ap.add_argument(
        "--batch-size",
        type=int,
        nargs="+",
        default=[1, 8],
        help="cases per Ray task (localcl ingest --batch-size); one ingest pair per value",
    )
    args = ap.parse_args()
    import ray

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-ingest-"))
    src = work / "archive"
    print(f"load average before: {os.getloadavg()}; cpus: {os.cpu_count()}")
    dt = make_archive(src, args.n, tuple(args.shape))
    size = sum(p.stat().st_size for p in src.rglob("*.nii.gz")) / 2**20
    print(f"archive: {args.n} volumes of {tuple(args.shape)} ({size:.0f} MiB gzip) in {work} (generated in {dt:.0f} s)")
    ray.init(
        num_cpus=args.workers,
        object_store_memory=256 * 2**20,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    for b in args.batch_size:
        bench_ingest(src, work, args.workers, b)
    if not args.skip_loader:
        bench_loader(work / f"store_{2 * args.workers}.zarr", args.loader_cases, args.loader_samples)
    print(f"load average after: {os.getloadavg()}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
