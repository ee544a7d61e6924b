"""Benchmark the Zarr store against nibabel-per-sample and all-in-RAM numpy, same cases, one run.

Measures, on the real ACDC copy (or any MSD dataset given with --src):
- ingest throughput (volumes/s) into a fresh store;
- random 2D slices/s and random 3D patches/s for three sources (the store both through its
  direct local shard reader, the default, and through zarr's own read path; plus a second
  store ingested with ``--chunk-xy 64`` tiles):
    nibabel : load the .nii.gz and take the slice/patch, per sample (what a naive loader does),
    store   : storage.open_store(...).read_slice / read_patch (decodes one chunk per slice),
    RAM     : every volume decoded into a dict of numpy arrays up front;
  each "raw" (array only) and "pipeline" (plus the training preprocessing of storage.preprocess:
  p1/p99 normalisation, centre crop/pad to 192x192, tensors) for slices;
- the store with a bounded per-process LRU slice cache (``cache_bytes`` = 25 % and 100 % of the
  decoded images), after one warm-up epoch, on a fresh random draw;
- resident memory: the RAM baseline holds every decoded volume; the plain store holds none.

Prints ratios store/nibabel and store/RAM. Usage:
    .venv/bin/python benchmarks/bench_store.py [--src ../shared/data/acdc] [--cases 40] [--samples 400]
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import storage  # noqa: E402
from storage.preprocess import preprocess_slice  # noqa: E402

PATCH = (64, 64, 8)
SIZE = (192, 192)


def rss() -> int:
    return psutil.Process().memory_info().rss


def rate(fn, n: int) -> float:  # type: ignore[no-untyped-def]
    fn(0)  # warm-up (first open, imports)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"))
    ap.add_argument("--cases", type=int, default=40, help="number of cases (first N of dataset.json)")
    ap.add_argument("--samples", type=int, default=400, help="random samples per measurement")
    ap.add_argument("--nib-samples", type=int, default=60, help="samples for the (slow) nibabel loader")
    ap.add_argument("--workers", type=int, default=2, help="ingest threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ds = storage.discover(args.src)
    cases = [c for c in ds.cases if c.problem is None][: args.cases]
    ids = [c.case_id for c in cases]
    paths = {c.case_id: str(c.image) for c in cases}
    tmp = tempfile.mkdtemp(prefix="bench_store_")
    uri = os.path.join(tmp, "bench.zarr")

    t0 = time.perf_counter()
    rep = storage.ingest(args.src, uri, cases=ids, progress=False, workers=args.workers)
    ingest_s = time.perf_counter() - t0
    assert rep.ok, rep.failed
    src_mb = sum(os.path.getsize(p) for p in paths.values()) / 2**20
    st = storage.open_store(uri)
    store_mb = sum(st.nbytes_stored(c) for c in ids) / 2**20
    print(f"cases: {len(ids)}  source .nii.gz images: {src_mb:.1f} MiB  store (image+label): {store_mb:.1f} MiB")
    print(f"ingest ({args.workers} threads): {len(ids) / ingest_s:.2f} volumes/s ({ingest_s:.1f} s)")

    rng = np.random.default_rng(args.seed)
    nz = {c: st.num_slices(c) for c in ids}
    shapes = {c: st.meta(c)["shape"] for c in ids}
    meta = {c: st.meta(c) for c in ids}
    n = args.samples
    pick = [ids[i] for i in rng.integers(0, len(ids), n)]
    zs = [int(rng.integers(0, nz[c])) for c in pick]
    starts = [tuple(int(rng.integers(0, max(shapes[c][a] - PATCH[a], 0) + 1)) for a in range(3)) for c in pick]

    def prep(c: str, s: np.ndarray):  # type: ignore[no-untyped-def]
        it = meta[c]["intensity"]
        return preprocess_slice(s, meta[c]["spacing"], it["p1"], it["p99"], SIZE)

    def patch_of(a: np.ndarray, st0: tuple[int, int, int]) -> np.ndarray:
        x, y, z = st0
        return np.array(a[x:x + PATCH[0], y:y + PATCH[1], z:z + PATCH[2]])

    # nibabel per sample
    nib_slice = rate(lambda i: np.asarray(nib.load(paths[pick[i]]).get_fdata(dtype=np.float32)[:, :, zs[i]]), args.nib_samples)
    nib_patch = rate(lambda i: patch_of(nib.load(paths[pick[i]]).get_fdata(dtype=np.float32), starts[i]), args.nib_samples)

    # store through zarr only (no direct shard reader), for reference
    os.environ["LOCALCL_ZARR_ONLY"] = "1"
    stz = storage.open_store(uri)
    zarr_slice = rate(lambda i: stz.read_slice(pick[i], zs[i]), n)
    zarr_patch = rate(lambda i: stz.read_patch(pick[i], starts[i], PATCH), n)
    del os.environ["LOCALCL_ZARR_ONLY"]

    # store
    gc.collect()
    r0 = rss()
    st = storage.open_store(uri)
    store_slice = rate(lambda i: st.read_slice(pick[i], zs[i]), n)
    store_pipe = rate(lambda i: prep(pick[i], st.read_slice(pick[i], zs[i])), n)
    store_patch = rate(lambda i: st.read_patch(pick[i], starts[i], PATCH), n)
    store_rss = rss() - r0

    # store + bounded LRU slice cache: one warm-up "epoch" of random samples, then a fresh draw
    decoded = sum(int(np.prod(shapes[c])) * 4 for c in ids)
    pick2 = [ids[i] for i in rng.integers(0, len(ids), n)]
    zs2 = [int(rng.integers(0, nz[c])) for c in pick2]
    cached = {}
    for frac in (0.25, 1.0):
        gc.collect()
        r0 = rss()
        stc = storage.open_store(uri, cache_bytes=int(frac * decoded))
        for c in ids:  # warm-up epoch: every slice once, in random order
            for z in rng.permutation(nz[c]):
                stc.read_slice(c, int(z))
        raw = rate(lambda i: stc.read_slice(pick2[i], zs2[i]), n)
        pipe = rate(lambda i: prep(pick2[i], stc.read_slice(pick2[i], zs2[i])), n)
        cached[frac] = (raw, pipe, rss() - r0, stc._cached_bytes)
        del stc

    # 3D patches from a store with tiled chunks (--chunk-xy 64): decodes only overlapping tiles
    uri_t = os.path.join(tmp, "bench_tiled.zarr")
    assert storage.ingest(args.src, uri_t, cases=ids, progress=False, workers=args.workers, chunk_xy=64).ok
    stt = storage.open_store(uri_t)
    tiled_patch = rate(lambda i: stt.read_patch(pick[i], starts[i], PATCH), n)
    tiled_slice = rate(lambda i: stt.read_slice(pick[i], zs[i]), n)

    # all in RAM
    gc.collect()
    r0 = rss()
    ram = {c: nib.load(paths[c]).get_fdata(dtype=np.float32) for c in ids}
    ram_bytes = sum(a.nbytes for a in ram.values())
    ram_slice = rate(lambda i: np.array(ram[pick[i]][:, :, zs[i]]), n)
    ram_pipe = rate(lambda i: prep(pick[i], np.array(ram[pick[i]][:, :, zs[i]])), n)
    ram_patch = rate(lambda i: patch_of(ram[pick[i]], starts[i]), n)
    ram_rss = rss() - r0

    print(f"\n{'samples/s':<24}{'nibabel':>10}{'store':>10}{'RAM':>10}{'store/nib':>11}{'store/RAM':>11}")
    rows = [("2D slice, zarr path", nib_slice, zarr_slice, ram_slice),
            ("3D patch, zarr path", nib_patch, zarr_patch, ram_patch),
            ("2D slice (raw)", nib_slice, store_slice, ram_slice),
            ("2D slice (pipeline)", nib_slice, store_pipe, ram_pipe),
            (f"3D patch {PATCH}", nib_patch, store_patch, ram_patch),
            ("2D slice, 64x64 tiles", nib_slice, tiled_slice, ram_slice),
            ("3D patch, 64x64 tiles", nib_patch, tiled_patch, ram_patch)]
    for frac, (raw, pipe, _, _) in cached.items():
        rows += [(f"2D raw, cache {frac:.0%}", nib_slice, raw, ram_slice),
                 (f"2D pipe, cache {frac:.0%}", nib_slice, pipe, ram_pipe)]
    for name, a, b, c in rows:
        print(f"{name:<24}{a:>10.1f}{b:>10.1f}{c:>10.1f}{b / a:>10.1f}x{b / c:>10.2f}x")
    print(f"\nmemory: RAM baseline holds {ram_bytes / 2**20:.0f} MiB of decoded volumes (RSS +{ram_rss / 2**20:.0f} MiB); "
          f"store reader RSS +{store_rss / 2**20:.0f} MiB (no cache)")
    for frac, (_, _, grow, held) in cached.items():
        print(f"  cache budget {frac:.0%} of decoded images = {frac * decoded / 2**20:.0f} MiB: holds "
              f"{held / 2**20:.0f} MiB, RSS +{grow / 2**20:.0f} MiB")
    print("(2D pipeline = read + p1/p99 normalisation + centre crop/pad to 192x192 + tensors; the nibabel "
          "column is raw load+slice for both rows)")


if __name__ == "__main__":
    main()
