"""Torch datasets over a store: random 2D slices, random 3D patches, partition batches.

Common contract
---------------
- **Deterministic for (seed, epoch)**: each epoch has a *global plan* (a list of samples) drawn
  from ``numpy.random.default_rng([seed, epoch])``; sample ``i`` is built with its own
  ``torch.Generator`` seeded from ``(seed, epoch, i)``, so an item does not depend on which
  rank or worker produced it. Call ``set_epoch(epoch)`` before each epoch (workers copy the
  dataset when they start, so with ``persistent_workers=True`` the new epoch would not reach
  them: keep the default ``persistent_workers=False``).
- **Disjoint sharding**: global index ``i`` belongs to rank ``(i - start) % world_size``; the
  rank's ``j``-th index goes to DataLoader worker ``(j // loader_batch) % num_workers``, so a
  ``DataLoader(batch_size=loader_batch)`` yields the rank's indices in order whatever
  ``num_workers``. Union over all (rank, worker) pairs is the plan, intersections are empty.
  ``len(ds)`` is this rank's share.
- **Resume inside an epoch**: ``set_epoch(epoch, start=n)`` skips the first ``n`` plan items.
  A worker group of ``W`` ranks each drawing batches of ``b`` consumes exactly the plan prefix
  ``[0, steps * b * W)``, so ``start = steps * b * W`` resumes after ``steps`` steps, and the
  rest of the epoch is re-sharded over the new ``world_size`` (elastic training) with nothing
  dropped or drawn twice. These are
  ``IterableDataset``s, so Ray Train's ``prepare_data_loader`` adds no second sampler.
- **Fork/spawn safe**: the store is opened lazily in the process that iterates (and re-opened
  after a fork); the dataset pickles without any zarr/fsspec handle.

Item keys (see docs/interfaces.md): ``image`` float32 (1, H, W), ``label`` int64 (H, W) with
-1 = unknown (unlabelled case, hidden label, or padding), ``case_index`` (position in ``cases``),
``slice_index``, ``partition`` (int64 scalars), optional derived maps (int64 (H, W), -1 outside
the field of view), plus whatever ``views(item, generator)`` returns.

Partition of slice ``z`` in a volume of ``n`` slices with ``S`` partitions:
``min(z // max(n // S, 1), S - 1)`` (consecutive equal blocks; GLCL).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage.preprocess import preprocess_slice
from storage.store import VolumeStore, open_store

#: Defaults for remote (``s3://``...) stores: per-process LRU of decoded slices, read-ahead items.
REMOTE_CACHE_BYTES = 256 * 2**20
REMOTE_PREFETCH = 4

ViewsFn = Callable[[dict[str, torch.Tensor], torch.Generator], Mapping[str, torch.Tensor]]


def partition_of(z: int, n: int, partitions: int) -> int:
    """Partition index of slice ``z`` of ``n``: ``min(z // max(n // S, 1), S - 1)``."""
    return min(z // max(n // partitions, 1), partitions - 1)


def _item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))


class _StoreDataset(IterableDataset):
    """Shared machinery: lazy per-process store, (seed, epoch) plans, rank x worker shards."""

    def __init__(
        self,
        uri: str,
        cases: Sequence[str],
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        storage_options: Mapping[str, Any] | None = None,
        cache_bytes: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(uri, VolumeStore):
            storage_options = storage_options or uri.storage_options
            uri = uri.uri
        if not cases:
            raise ValueError("cases must not be empty")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        uri = str(uri)
        # local paths are made absolute: Ray/DataLoader workers may run in another directory
        self.uri = uri if "://" in uri else os.path.abspath(uri)
        self.cases = list(cases)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.storage_options = dict(storage_options or {})
        remote = "://" in uri and not uri.startswith("file://")
        if cache_bytes is not None and cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        if prefetch is not None and prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        # Remote stores stream: a bounded LRU of decoded slices + read-ahead threads hide the
        # GET latency. Local stores read from the page cache and need neither by default.
        self.cache_bytes = int(cache_bytes if cache_bytes is not None else (REMOTE_CACHE_BYTES if remote else 0))
        self.prefetch = int(prefetch if prefetch is not None else (REMOTE_PREFETCH if remote else 0))
        self.epoch = 0
        self.start = 0  # plan items of this epoch already consumed (set_epoch)
        self.loader_batch = 1  # DataLoader batch size: worker shards are whole batches
        self._store: VolumeStore | None = None
        self._pid: int | None = None
        self._metas: list[dict[str, Any]] | None = None

    # -- process-local state -------------------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_store"] = None
        state["_pid"] = None
        return state

    @property
    def store(self) -> VolumeStore:
        if self._store is None or self._pid != os.getpid():
            self._store = open_store(
                self.uri, mode="r", storage_options=self.storage_options, cache_bytes=self.cache_bytes
            )
            self._pid = os.getpid()
        return self._store

    @property
    def metas(self) -> list[dict[str, Any]]:
        if self._metas is None:
            self._metas = [self.store.meta(c) for c in self.cases]
        return self._metas

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the plan of ``epoch`` from plan item ``start`` on (call on every rank before
        iterating; ``start > 0`` resumes inside the epoch, see the module docstring)."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch = int(epoch)
        self.start = int(start)

    # -- sharding -------------------------------------------------------------------------
    def _num_samples(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        n = self._num_samples()
        return len(range(self.start + self.rank, n, self.world_size))

    def shard_indices(self, worker_id: int = 0, num_workers: int = 1) -> range | list[int]:
        """Global plan indices of (this rank, ``worker_id`` of ``num_workers``)."""
        mine = range(self.start + self.rank, self._num_samples(), self.world_size)
        b = max(int(self.loader_batch), 1)
        if b == 1 or num_workers == 1:
            return mine[worker_id::num_workers]
        return [mine[j] for j in range(len(mine)) if (j // b) % num_workers == worker_id]

    def __iter__(self):  # type: ignore[no-untyped-def]
        info = get_worker_info()
        wid, nw = (0, 1) if info is None else (info.id, info.num_workers)
        epoch = self.epoch
        plan = self.plan(epoch)
        indices = self.shard_indices(wid, nw)
        build = lambda i: self.build_item(i, plan[i], _item_generator(self.seed, epoch, i))  # noqa: E731
        if self.prefetch == 0:
            for i in indices:
                yield build(i)
            return
        # Read-ahead: at most ``prefetch`` items are being built (I/O threads) while the
        # consumer works; items come out in plan order and each has its own generator, so the
        # stream is identical to the sequential one.
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        self.metas  # noqa: B018  (load metadata once, before the threads share the store)
        pending: deque[Any] = deque()
        it = iter(indices)
        with ThreadPoolExecutor(max_workers=self.prefetch, thread_name_prefix="localcl-prefetch") as pool:
            try:
                for i in it:
                    pending.append(pool.submit(build, i))
                    if len(pending) > self.prefetch:
                        yield pending.popleft().result()
                while pending:
                    yield pending.popleft().result()
            finally:
                for f in pending:
                    f.cancel()

    def plan(self, epoch: int) -> list[Any] | np.ndarray:
        raise NotImplementedError

    def build_item(self, index: int, spec: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class SliceDataset(_StoreDataset):
    """Random 2D slices, preprocessed as in :mod:`storage.preprocess`.

    Args:
        uri: store path/URI (or an open store: only its URI is kept).
        cases: case ids; ``case_index`` in items is the position in this list.
        size: (H, W) after resampling and centre crop/pad.
        samples_per_epoch: plan length (default: number of eligible slices). The plan is made of
            concatenated random permutations of the eligible slices, so each eligible slice
            appears once per pass.
        fg_oversample: probability that a plan entry is replaced by a random foreground slice
            (a slice of a labelled case with any label > 0).
        require_all_classes: keep only slices whose label (``label_array``) holds every class
            0..K-1 (K = ``num_classes`` or the number of label names) (PLCL contrastive batch).
        derived: names of cached per-case arrays to add as int64 (H, W) keys.
        views: ``views(item, generator) -> dict`` merged into the item (paired views).
        spacing_mm: in-plane resampling target (None: native grid).
        hide_labels: cases whose labels are reported as -1 (semi-supervised unlabelled pool).
        label_array: array used as ``label`` ("label" or a derived pseudo-label array).
        partitions: S used for the ``partition`` key.
        cache_bytes: per-process LRU budget for decoded slices (each DataLoader worker holds
            its own cache; 0 = none). Worth it for multi-epoch runs whose slices fit. Default
            (None): 0 for a local store, ``REMOTE_CACHE_BYTES`` (256 MiB) for ``s3://``... .
        prefetch: items built ahead of the consumer by I/O threads (order and values unchanged).
            Default (None): 0 for a local store, ``REMOTE_PREFETCH`` (4) for a remote one.
    """

    def __init__(
        self,
        uri: str,
        cases: Sequence[str],
        size: Sequence[int] = (192, 192),
        samples_per_epoch: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fg_oversample: float = 0.0,
        require_all_classes: bool = False,
        derived: Sequence[str] = (),
        views: ViewsFn | None = None,
        storage_options: Mapping[str, Any] | None = None,
        spacing_mm: float | None = None,
        hide_labels: Sequence[str] = (),
        label_array: str = "label",
        num_classes: int | None = None,
        partitions: int = 4,
        cache_bytes: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        super().__init__(uri, cases, seed, rank, world_size, storage_options, cache_bytes, prefetch)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"size must be (H, W) with positive entries, got {tuple(size)}")
        if not 0.0 <= fg_oversample <= 1.0:
            raise ValueError(f"fg_oversample must be in [0, 1], got {fg_oversample}")
        if samples_per_epoch is not None and samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.size = (int(size[0]), int(size[1]))
        self.samples_per_epoch = samples_per_epoch
        self.fg_oversample = float(fg_oversample)
        self.require_all_classes = bool(require_all_classes)
        self.derived = tuple(derived)
        self.views = views
        self.spacing_mm = spacing_mm
        self.hide_labels = frozenset(hide_labels)
        self.label_array = label_array
        self.num_classes = num_classes
        self.partitions = int(partitions)
        self._eligible: tuple[np.ndarray, np.ndarray] | None = None

    def _has_labels(self, ci: int) -> bool:
        """Whether items of case ``ci`` carry labels (else -1): not hidden, and the label
        source exists (``label`` of a labelled case, or the derived ``label_array``)."""
        if self.cases[ci] in self.hide_labels:
            return False
        if self.label_array == "label":
            return bool(self.metas[ci].get("labelled"))
        return self.store.has_array(self.cases[ci], self.label_array)

    def _slice_labels(self, ci: int) -> list[list[int]] | None:
        if not self._has_labels(ci):
            return None
        if self.label_array == "label":
            labels: list[list[int]] = self.metas[ci]["slice_labels"]
            return labels
        arr = self.store.derived(self.cases[ci], self.label_array)
        assert arr is not None
        return [np.unique(arr[:, :, z]).tolist() for z in range(arr.shape[2])]

    def eligible(self) -> tuple[np.ndarray, np.ndarray]:
        """(all eligible (case_index, z) pairs, the foreground subset), each int64 (N, 2)."""
        if self._eligible is None:
            k = self.num_classes
            if self.require_all_classes and k is None:
                names = self.metas[0].get("label_names") or {}
                k = len(names)
                if k < 2:
                    raise ValueError("require_all_classes needs num_classes (no label names in the store)")
            pairs, fg = [], []
            for ci, m in enumerate(self.metas):
                labels = self._slice_labels(ci) if (self.require_all_classes or self.fg_oversample > 0) else None
                for z in range(int(m["shape"][2])):
                    present = None if labels is None else set(labels[z])
                    if self.require_all_classes and (present is None or not set(range(k or 0)) <= present):
                        continue
                    pairs.append((ci, z))
                    if present is not None and any(v > 0 for v in present):
                        fg.append((ci, z))
            if not pairs:
                raise ValueError("no eligible slices (require_all_classes filtered every slice?)")
            self._eligible = (np.asarray(pairs, dtype=np.int64), np.asarray(fg, dtype=np.int64).reshape(-1, 2))
        return self._eligible

    def _num_samples(self) -> int:
        return self.samples_per_epoch or len(self.eligible()[0])

    def plan(self, epoch: int) -> np.ndarray:
        """Global (N, 2) array of (case_index, z) for ``epoch``."""
        pairs, fg = self.eligible()
        n = self._num_samples()
        rng = np.random.default_rng([self.seed, epoch])
        passes = math.ceil(n / len(pairs))
        order = np.concatenate([rng.permutation(len(pairs)) for _ in range(passes)])[:n]
        plan: np.ndarray = pairs[order].copy()
        if self.fg_oversample > 0 and len(fg):
            swap = rng.random(n) < self.fg_oversample
            plan[swap] = fg[rng.integers(0, len(fg), int(swap.sum()))]
        return plan

    def load_slice(self, ci: int, z: int) -> dict[str, torch.Tensor]:
        """Preprocessed slice ``z`` of case ``cases[ci]`` with label (-1 if unknown) and derived maps."""
        case, m = self.cases[ci], self.metas[ci]
        st = self.store
        image = st.read_slice(case, z, "image")
        maps = {}
        if self._has_labels(ci):
            maps["label"] = st.read_slice(case, z, self.label_array)
        else:
            maps["label"] = np.full(image.shape, -1, dtype=np.int64)
        for name in self.derived:
            maps[name] = st.read_slice(case, z, name)
        it = m["intensity"]
        item = preprocess_slice(image, m["spacing"], it["p1"], it["p99"], self.size, self.spacing_mm, maps)
        item["case_index"] = torch.tensor(ci, dtype=torch.int64)
        item["slice_index"] = torch.tensor(z, dtype=torch.int64)
        item["partition"] = torch.tensor(partition_of(z, int(m["shape"][2]), self.partitions), dtype=torch.int64)
        return item

    def build_item(self, index: int, spec: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
        item = self.load_slice(int(spec[0]), int(spec[1]))
        if self.views is not None:
            item.update(self.views(item, gen))
        return item


class PartitionBatchDataset(SliceDataset):
    """GLCL global batches: each item is a whole batch of ``m * S`` slices.

    For every batch, ``m = volumes_per_batch`` distinct volumes are drawn (without replacement)
    among those with at least ``S`` slices; volume ``v`` with ``n`` slices is cut into ``S``
    consecutive partitions of ``L = n // S`` slices (the trailing ``n - S*L`` are never used) and
    one slice is drawn uniformly in each partition. Items stack the slice keys volume-major:
    ``image`` (m*S, 1, H, W), ``label`` (m*S, H, W), ``case_index``, ``slice_index``,
    ``partition`` (m*S,), and ``volume`` (m*S,) = position 0..m-1 of the volume in the batch.
    Use with ``DataLoader(batch_size=None)``.
    """

    def __init__(
        self,
        uri: str,
        cases: Sequence[str],
        size: Sequence[int] = (192, 192),
        volumes_per_batch: int = 4,
        partitions: int = 4,
        batches_per_epoch: int = 10,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        storage_options: Mapping[str, Any] | None = None,
        spacing_mm: float | None = None,
        derived: Sequence[str] = (),
        hide_labels: Sequence[str] = (),
        cache_bytes: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        super().__init__(
            uri,
            cases,
            size=size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            derived=derived,
            storage_options=storage_options,
            spacing_mm=spacing_mm,
            hide_labels=hide_labels,
            partitions=partitions,
            cache_bytes=cache_bytes,
            prefetch=prefetch,
        )
        if volumes_per_batch < 1 or partitions < 1 or batches_per_epoch < 1:
            raise ValueError(
                "volumes_per_batch, partitions and batches_per_epoch must be >= 1, got "
                f"{volumes_per_batch}, {partitions}, {batches_per_epoch}"
            )
        self.volumes_per_batch = int(volumes_per_batch)
        self.batches_per_epoch = int(batches_per_epoch)

    def _volumes(self) -> np.ndarray:
        vols = np.asarray(
            [ci for ci, m in enumerate(self.metas) if int(m["shape"][2]) >= self.partitions], dtype=np.int64
        )
        if len(vols) < self.volumes_per_batch:
            raise ValueError(
                f"volumes_per_batch={self.volumes_per_batch} but only {len(vols)} cases have "
                f">= {self.partitions} slices"
            )
        return vols

    def _num_samples(self) -> int:
        return self.batches_per_epoch

    def plan(self, epoch: int) -> np.ndarray:
        """(batches, m*S, 2) array of (case_index, z)."""
        vols = self._volumes()
        rng = np.random.default_rng([self.seed, epoch])
        m, s = self.volumes_per_batch, self.partitions
        out = np.zeros((self.batches_per_epoch, m * s, 2), dtype=np.int64)
        for b in range(self.batches_per_epoch):
            chosen = vols[rng.choice(len(vols), size=m, replace=False)]
            for v, ci in enumerate(chosen):
                length = int(self.metas[ci]["shape"][2]) // s
                zs = np.arange(s) * length + rng.integers(0, length, size=s)
                out[b, v * s : (v + 1) * s, 0] = ci
                out[b, v * s : (v + 1) * s, 1] = zs
        return out

    def build_item(self, index: int, spec: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
        items = [self.load_slice(int(ci), int(z)) for ci, z in spec]
        batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
        s = self.partitions
        batch["partition"] = torch.arange(s, dtype=torch.int64).repeat(self.volumes_per_batch)
        batch["volume"] = torch.arange(self.volumes_per_batch, dtype=torch.int64).repeat_interleave(s)
        return batch


class PatchDataset(_StoreDataset):
    """Random 3D patches ``size = (sx, sy, sz)`` in store voxel order, without resampling.

    Items: ``image`` float32 (1, D, H, W) = (1, sz, sx, sy), normalised ``(x - p1)/(p99 - p1)``;
    ``label`` int64 (D, H, W) (-1 unknown / outside the volume); ``case_index``;
    ``slice_index`` (first z of the patch); ``partition`` (0); ``origin`` int64 (3,) patch start
    (x, y, z); derived maps int64 (D, H, W).

    Plan: cases by concatenated permutations; the start along each axis is uniform in
    ``[0, dim - s]`` (centred, with padding, where ``dim < s``). With probability
    ``fg_oversample`` (labelled cases) the patch centre is drawn uniformly inside the stored
    foreground bounding box instead.
    """

    def __init__(
        self,
        uri: str,
        cases: Sequence[str],
        size: Sequence[int] = (96, 96, 16),
        samples_per_epoch: int = 100,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        fg_oversample: float = 0.0,
        derived: Sequence[str] = (),
        views: ViewsFn | None = None,
        storage_options: Mapping[str, Any] | None = None,
        hide_labels: Sequence[str] = (),
        cache_bytes: int | None = None,
        prefetch: int | None = None,
    ) -> None:
        super().__init__(uri, cases, seed, rank, world_size, storage_options, cache_bytes, prefetch)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"size must be (sx, sy, sz) with positive entries, got {tuple(size)}")
        if not 0.0 <= fg_oversample <= 1.0:
            raise ValueError(f"fg_oversample must be in [0, 1], got {fg_oversample}")
        if samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.size = (int(size[0]), int(size[1]), int(size[2]))
        self.samples_per_epoch = int(samples_per_epoch)
        self.fg_oversample = float(fg_oversample)
        self.derived = tuple(derived)
        self.views = views
        self.hide_labels = frozenset(hide_labels)

    def _num_samples(self) -> int:
        return self.samples_per_epoch

    def plan(self, epoch: int) -> np.ndarray:
        """Global (N, 4) array of (case_index, x0, y0, z0)."""
        rng = np.random.default_rng([self.seed, epoch])
        n, nc = self.samples_per_epoch, len(self.cases)
        order = np.concatenate([rng.permutation(nc) for _ in range(math.ceil(n / nc))])[:n]
        fg_draw = rng.random(n) < self.fg_oversample
        out = np.zeros((n, 4), dtype=np.int64)
        for i, ci in enumerate(order):
            m = self.metas[ci]
            shape = m["shape"]
            bbox = m.get("fg_bbox") if m.get("labelled") and self.cases[ci] not in self.hide_labels else None
            out[i, 0] = ci
            for ax in range(3):
                dim, s = int(shape[ax]), self.size[ax]
                if fg_draw[i] and bbox is not None:
                    centre = int(rng.integers(bbox[ax][0], bbox[ax][1] + 1))
                    start = min(max(centre - s // 2, min(0, dim - s)), max(0, dim - s)) if dim >= s else (dim - s) // 2
                else:
                    start = int(rng.integers(0, dim - s + 1)) if dim >= s else (dim - s) // 2
                out[i, ax + 1] = start
        return out

    def build_item(self, index: int, spec: Any, gen: torch.Generator) -> dict[str, torch.Tensor]:
        ci = int(spec[0])
        start = (int(spec[1]), int(spec[2]), int(spec[3]))
        case, m = self.cases[ci], self.metas[ci]
        st = self.store
        it = m["intensity"]
        img = st.read_patch(case, start, self.size, "image")
        img = (img - np.float32(it["p1"])) / np.float32(max(it["p99"] - it["p1"], 1e-8))
        valid = _inside_mask(m["shape"], start, self.size)
        img = np.where(valid, img, 0).astype(np.float32)  # zero outside the volume, as in 2D
        to_dhw = lambda a: np.ascontiguousarray(np.transpose(a, (2, 0, 1)))  # noqa: E731  (x,y,z)->(z,x,y)
        if m.get("labelled") and case not in self.hide_labels:
            lab = np.where(valid, st.read_patch(case, start, self.size, "label").astype(np.int64), -1)
        else:
            lab = np.full(self.size, -1, dtype=np.int64)
        item = {
            "image": torch.from_numpy(to_dhw(img))[None],
            "label": torch.from_numpy(to_dhw(lab)),
            "case_index": torch.tensor(ci, dtype=torch.int64),
            "slice_index": torch.tensor(start[2], dtype=torch.int64),
            "partition": torch.tensor(0, dtype=torch.int64),
            "origin": torch.tensor(start, dtype=torch.int64),
        }
        for name in self.derived:
            d = st.read_patch(case, start, self.size, name).astype(np.int64)
            item[name] = torch.from_numpy(to_dhw(np.where(valid, d, -1)))
        if self.views is not None:
            item.update(self.views(item, gen))
        return item


def _inside_mask(shape: Sequence[int], start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Boolean (sx, sy, sz): True where the patch voxel lies inside the volume."""
    axes = [(np.arange(s) + o >= 0) & (np.arange(s) + o < d) for d, o, s in zip(shape, start, size)]
    return axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]
