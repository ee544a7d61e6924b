"""Per-case derived arrays computed slice by slice and cached in the store (e.g. superpixels)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
import zarr

from storage.errors import StoreError
from storage.preprocess import normalise
from storage.store import VolumeStore, open_store

CONCURRENT_WAIT_S = 600.0  # how long to wait for another writer of the same derived array


def cache_derived(
    uri: Any,
    name: str,
    fn: Callable[[np.ndarray], np.ndarray],
    cases: Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    concurrent_wait_s: float = CONCURRENT_WAIT_S,
) -> dict[str, list[str]]:
    """Compute ``fn(slice) -> int map`` for every slice of every case and store it as ``name``.

    ``fn`` receives the native-grid slice normalised as the samplers do, ``(x - p1)/(p99 - p1)``
    float32 (X, Y), and must return an integer array of shape (X, Y). Results are stacked to
    (X, Y, Z) and stored as uint16 when all values fit in 0..65535, else int32. Cases that
    already hold a complete ``name`` array are skipped (unless ``overwrite``), so an interrupted
    run resumes where it stopped. Several processes may cache the same store at once (two jobs
    on one store): when another one creates ``name`` for a case between this one's check and its
    write, this one waits up to ``concurrent_wait_s`` for that array to be complete and keeps it
    (the same ``fn`` of the same image), listing the case as skipped.

    Returns ``{"computed": [...], "skipped": [...]}``.
    """
    st = open_store(uri, mode="a", storage_options=storage_options)
    todo = st.cases if cases is None else list(cases)
    done: dict[str, list[str]] = {"computed": [], "skipped": []}
    for case in todo:
        if not overwrite and st.has_array(case, name):
            done["skipped"].append(case)
            continue
        meta = st.meta(case)
        image = normalise(st.image(case), meta["intensity"]["p1"], meta["intensity"]["p99"])
        maps = []
        for z in range(image.shape[2]):
            out = np.asarray(fn(image[:, :, z]))
            if out.shape != image.shape[:2] or not np.issubdtype(out.dtype, np.integer):
                raise ValueError(
                    f"fn must return an integer (X, Y) = {image.shape[:2]} map, got "
                    f"{out.dtype} {out.shape} for case {case!r} slice {z}"
                )
            maps.append(out)
        vol = np.stack(maps, axis=2)
        lo, hi = int(vol.min()), int(vol.max())
        if lo < np.iinfo(np.int32).min or hi > np.iinfo(np.int32).max:
            raise ValueError(f"fn values {lo}..{hi} do not fit in int32 (case {case!r})")
        vol = vol.astype(np.uint16 if lo >= 0 and hi <= 65535 else np.int32)
        attrs = {"fn": getattr(fn, "__qualname__", repr(fn)), "input": "(x-p1)/(p99-p1) native slice"}
        try:
            st.put_derived(case, name, vol, attrs)
        except zarr.errors.ContainsArrayError:  # another process created it meanwhile
            wait_complete(st, case, name, concurrent_wait_s)
            done["skipped"].append(case)
            continue
        done["computed"].append(case)
    return done


def wait_complete(st: VolumeStore, case: str, name: str, timeout_s: float) -> None:
    """Wait until derived array ``name`` of ``case`` is complete (written by another process);
    a clear error naming the store, case and array if it is not within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not st.has_array(case, name):
        if time.monotonic() > deadline:
            raise StoreError(
                f"{st.uri}: derived array {name!r} of case {case!r} was created by another process "
                f"and is still incomplete after {timeout_s:.0f} s (that writer may have died; run "
                f"again: an incomplete array is recomputed)"
            )
        time.sleep(0.5)
