"""Benchmark the Zarr store against nibabel-per-sample and all-in-RAM numpy, same cases, one run.

Measures, on the real ACDC copy (or any MSD dataset given with --src):
- ingest throughput (volumes/s) into a fresh store;
- random 2D slices/s and random 3D patches/s from
    nibabel : load the .nii.gz and take the slice/patch, per sample (what a naive loader does),
    store   : ``storage.open_store(...).read_slice / read_patch`` with its direct local shard
              reader (the default, CRC32C of every chunk verified), and through zarr's own
              read path for reference,
    noverify: the same store opened with ``verify=False`` (checksums not checked): the
              verification cost is the throughput ratio of the two,
    tiled   : a second store ingested with ``--chunk-xy 64`` (tiles; patches decode less),
    cache   : the store with a bounded per-process LRU slice cache (``cache_bytes`` = 25 % and
              100 % of the decoded images) after one warm-up epoch, on a fresh random draw,
    RAM     : every volume decoded into a dict of numpy arrays up front;
  2D slices both "raw" (array only) and "pipeline" (plus the training preprocessing of
  ``storage.preprocess``: p1/p99 normalisation, centre crop/pad to 192x192, tensors);
- memory: bytes held by the RAM baseline and by the caches; the plain store holds no volume.

The loaders are timed in interleaved rounds (each round runs every loader on its next block of
samples), so a load change on a shared machine hits all of them alike; ratios are of the totals.

    .venv/bin/python benchmarks/bench_store.py [--src ../shared/data/acdc] [--cases 40] [--samples 400]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import storage  # noqa: E402
from storage.preprocess import preprocess_slice  # noqa: E402

PATCH = (64, 64, 8)


def _fdata(path: str | os.PathLike[str]) -> np.ndarray:
    """nibabel's ``get_fdata`` as float32 (the loader the store is compared against)."""
    img: Any = nib.load(path)
    data: np.ndarray = img.get_fdata(dtype=np.float32)
    return data


SIZE = (192, 192)


def interleaved_rates(
    loaders: dict[str, tuple[Callable[[int], object], int]], rounds: int, len_plan: int
) -> dict[str, float]:
    """samples/s per loader; loader ``name`` runs ``n`` samples (cycling over the ``len_plan``
    drawn ones) split over ``rounds`` rounds."""
    spent = dict.fromkeys(loaders, 0.0)
    done = dict.fromkeys(loaders, 0)
    for fn, _ in loaders.values():
        fn(0)  # warm-up: first open, imports, index reads
    for r in range(rounds):
        for name, (fn, n) in loaders.items():
            lo, hi = r * n // rounds, (r + 1) * n // rounds
            t0 = time.perf_counter()
            for i in range(lo, hi):
                fn(i % len_plan)
            spent[name] += time.perf_counter() - t0
            done[name] += hi - lo
    return {k: done[k] / spent[k] for k in loaders}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "acdc"))
    ap.add_argument("--cases", type=int, default=40, help="number of cases (first N of dataset.json)")
    ap.add_argument("--samples", type=int, default=400, help="random samples per loader")
    ap.add_argument("--nib-samples", type=int, default=60, help="samples for the (slow) nibabel loader")
    ap.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds")
    ap.add_argument(
        "--fast-repeat", type=int, default=5, help="fast loaders (RAM, caches) cycle this many times over the samples"
    )
    ap.add_argument("--workers", type=int, default=2, help="ingest threads")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    ds = storage.discover(args.src)
    cases = [c for c in ds.cases if c.problem is None][: args.cases]
    ids = [c.case_id for c in cases]
    paths = {c.case_id: str(c.image) for c in cases}
    tmp = tempfile.mkdtemp(prefix="bench_store_")
    uri, uri_t = os.path.join(tmp, "bench.zarr"), os.path.join(tmp, "bench_tiled.zarr")

    t0 = time.perf_counter()
    rep = storage.ingest(args.src, uri, cases=ids, progress=False, workers=args.workers)
    ingest_s = time.perf_counter() - t0
    assert rep.ok, rep.failed
    assert storage.ingest(args.src, uri_t, cases=ids, progress=False, workers=args.workers, chunk_xy=64).ok
    src_mb = sum(os.path.getsize(p) for p in paths.values()) / 2**20
    st = storage.open_store(uri)
    store_mb = sum(st.nbytes_stored(c) for c in ids) / 2**20
    print(f"cases: {len(ids)}  source .nii.gz images: {src_mb:.1f} MiB  store (image+label): {store_mb:.1f} MiB")
    print(
        f"ingest ({args.workers} threads): {len(ids) / ingest_s:.2f} volumes/s ({ingest_s:.1f} s, load average "
        f"{os.getloadavg()[0]:.1f})"
    )

    rng = np.random.default_rng(args.seed)
    meta = {c: st.meta(c) for c in ids}
    nz = {c: meta[c]["shape"][2] for c in ids}
    n = args.samples

    def draw() -> tuple[list[str], list[int]]:
        pick = [ids[i] for i in rng.integers(0, len(ids), n)]
        return pick, [int(rng.integers(0, nz[c])) for c in pick]

    pick, zs = draw()
    starts: list[tuple[int, int, int]] = [
        tuple(int(rng.integers(0, max(meta[c]["shape"][a] - PATCH[a], 0) + 1)) for a in range(3))  # type: ignore[misc]
        for c in pick
    ]

    def prep(c: str, s: np.ndarray) -> object:
        it = meta[c]["intensity"]
        return preprocess_slice(s, meta[c]["spacing"], it["p1"], it["p99"], SIZE)

    def patch_of(a: np.ndarray, s0: tuple[int, ...]) -> np.ndarray:
        x, y, z = s0
        return np.array(a[x : x + PATCH[0], y : y + PATCH[1], z : z + PATCH[2]])

    os.environ["LOCALCL_ZARR_ONLY"] = "1"
    stz = storage.open_store(uri)
    stz.meta(ids[0])
    for c in ids:
        stz._reader(c, "image")  # resolve (to None) now, while zarr-only is set
    del os.environ["LOCALCL_ZARR_ONLY"]
    stt = storage.open_store(uri_t)
    stn = storage.open_store(uri, verify=False)

    decoded = sum(int(np.prod(meta[c]["shape"])) * 4 for c in ids)
    caches = {}
    # fresh draws for the cached stores (the warm-up epoch is not replayed), one per loader so
    # that the pipeline loader does not hit slices the raw loader just brought into the cache
    pick2, zs2 = draw()
    pick3, zs3 = draw()
    for frac in (0.25, 1.0):
        stc = storage.open_store(uri, cache_bytes=int(frac * decoded))
        for c in ids:  # warm-up epoch: every slice once, in random order
            for z in rng.permutation(nz[c]):
                stc.read_slice(c, int(z))
        caches[frac] = stc

    ram = {c: _fdata(paths[c]) for c in ids}
    ram_bytes = sum(a.nbytes for a in ram.values())

    nn, nf = args.nib_samples, args.samples * args.fast_repeat
    loaders: dict[str, tuple[Callable[[int], object], int]] = {
        "nib slice": (lambda i: np.asarray(_fdata(paths[pick[i]])[:, :, zs[i]]), nn),
        "nib patch": (lambda i: patch_of(_fdata(paths[pick[i]]), starts[i]), nn),
        "ram slice": (lambda i: np.array(ram[pick[i]][:, :, zs[i]]), nf),
        "ram pipe": (lambda i: prep(pick[i], np.array(ram[pick[i]][:, :, zs[i]])), nf),
        "ram patch": (lambda i: patch_of(ram[pick[i]], starts[i]), nf),
        "store slice": (lambda i: st.read_slice(pick[i], zs[i]), n),
        "store pipe": (lambda i: prep(pick[i], st.read_slice(pick[i], zs[i])), n),
        "store patch": (lambda i: st.read_patch(pick[i], starts[i], PATCH), n),
        "noverify slice": (lambda i: stn.read_slice(pick[i], zs[i]), n),
        "noverify pipe": (lambda i: prep(pick[i], stn.read_slice(pick[i], zs[i])), n),
        "noverify patch": (lambda i: stn.read_patch(pick[i], starts[i], PATCH), n),
        "zarr slice": (lambda i: stz.read_slice(pick[i], zs[i]), n),
        "zarr patch": (lambda i: stz.read_patch(pick[i], starts[i], PATCH), n),
        "tiled slice": (lambda i: stt.read_slice(pick[i], zs[i]), n),
        "tiled patch": (lambda i: stt.read_patch(pick[i], starts[i], PATCH), n),
    }

    def cached_slice(s: storage.VolumeStore) -> Callable[[int], object]:
        return lambda i: s.read_slice(pick2[i], zs2[i])

    def cached_pipe(s: storage.VolumeStore) -> Callable[[int], object]:
        return lambda i: prep(pick3[i], s.read_slice(pick3[i], zs3[i]))

    for frac, stc in caches.items():
        loaders[f"cache{frac} slice"] = (cached_slice(stc), nf if frac == 1.0 else n)
        loaders[f"cache{frac} pipe"] = (cached_pipe(stc), nf if frac == 1.0 else n)
    r = interleaved_rates(loaders, args.rounds, n)

    rows = [
        ("2D slice, raw", "nib slice", "store slice", "ram slice"),
        ("2D slice, pipeline", "nib slice", "store pipe", "ram pipe"),
        (f"3D patch {'x'.join(map(str, PATCH))}", "nib patch", "store patch", "ram patch"),
        ("2D slice, zarr path", "nib slice", "zarr slice", "ram slice"),
        ("3D patch, zarr path", "nib patch", "zarr patch", "ram patch"),
        ("2D slice, 64x64 tiles", "nib slice", "tiled slice", "ram slice"),
        ("3D patch, 64x64 tiles", "nib patch", "tiled patch", "ram patch"),
    ]
    for frac in caches:
        rows += [
            (f"2D raw, cache {frac:.0%}", "nib slice", f"cache{frac} slice", "ram slice"),
            (f"2D pipeline, cache {frac:.0%}", "nib slice", f"cache{frac} pipe", "ram pipe"),
        ]
    print(f"\n{'samples/s':<26}{'nibabel':>9}{'store':>9}{'RAM':>9}{'store/nib':>11}{'store/RAM':>11}")
    for name, a, b, c in rows:
        print(f"{name:<26}{r[a]:>9.1f}{r[b]:>9.1f}{r[c]:>9.1f}{r[b] / r[a]:>10.1f}x{r[b] / r[c]:>10.2f}x")
    print("\nchecksum verification (CRC32C per chunk), same store, verify=True vs verify=False:")
    for name, on, off in (
        ("2D slice, raw", "store slice", "noverify slice"),
        ("2D slice, pipeline", "store pipe", "noverify pipe"),
        (f"3D patch {'x'.join(map(str, PATCH))}", "store patch", "noverify patch"),
    ):
        print(
            f"  {name:<24}{r[on]:>9.1f} vs {r[off]:>9.1f} samples/s: verified/unverified = {r[on] / r[off]:.3f} "
            f"(cost {100 * (1 - r[on] / r[off]):+.1f} %)"
        )
    print(
        f"\nmemory: RAM baseline holds {ram_bytes / 2**20:.0f} MiB of decoded volumes; the plain store "
        "reader holds no volume"
    )
    for frac, stc in caches.items():
        print(
            f"  cache budget {frac:.0%} = {frac * decoded / 2**20:.0f} MiB: holds {stc._cached_bytes / 2**20:.0f} MiB"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (shared machine: compare ratios, not absolute rates)")


if __name__ == "__main__":
    main()
