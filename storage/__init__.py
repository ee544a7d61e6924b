"""storage: NIfTI archives -> chunked Zarr v3 volume stores, catalog and torch samplers.

Public API (see ``docs/interfaces.md``)::

    st = storage.open_store(uri, mode="r", storage_options=None)
    storage.ingest(src, uri, unlabelled=False, workers=1)        # a dataset
    storage.ingest_case(image, label, uri, case_id, ...)         # one case (a Ray task)
    storage.cache_derived(uri, "superpixels", fn, cases=None)    # per-slice cached maps
    from storage.samplers import SliceDataset, PatchDataset, PartitionBatchDataset

``storage`` never imports ``ray`` or ``ray_jobs``; samplers import torch lazily.
"""

from __future__ import annotations

from storage.errors import CorruptDataError, InputError, StorageError, StorageUnavailableError, StoreError
from storage.ingest import CaseResult, IngestReport, discover, ingest, ingest_case
from storage.store import VolumeStore, open_store

__all__ = [
    "CaseResult",
    "CorruptDataError",
    "IngestReport",
    "InputError",
    "StorageError",
    "StorageUnavailableError",
    "StoreError",
    "VolumeStore",
    "cache_derived",
    "discover",
    "ingest",
    "ingest_case",
    "open_store",
]


def cache_derived(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`storage.derived.cache_derived` (imported lazily)."""
    from storage.derived import cache_derived as _impl

    return _impl(*args, **kwargs)
