"""Per-case derived arrays computed slice by slice and cached in the store (e.g. superpixels)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from storage.preprocess import normalise
from storage.store import open_store


def cache_derived(
    uri: Any,
    name: str,
    fn: Callable[[np.ndarray], np.ndarray],
    cases: Iterable[str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, list[str]]:
    """Compute ``fn(slice) -> int map`` for every slice of every case and store it as ``name``.

    ``fn`` receives the native-grid slice normalised as the samplers do, ``(x - p1)/(p99 - p1)``
    float32 (X, Y), and must return an integer array of shape (X, Y). Results are stacked to
    (X, Y, Z) and stored as uint16 when all values fit in 0..65535, else int32. Cases that
    already hold a complete ``name`` array are skipped (unless ``overwrite``), so an interrupted
    run resumes where it stopped.

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
        st.put_derived(
            case, name, vol, {"fn": getattr(fn, "__qualname__", repr(fn)), "input": "(x-p1)/(p99-p1) native slice"}
        )
        done["computed"].append(case)
    return done
