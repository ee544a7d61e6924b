"""A direct reader for slice chunks of local arrays written by :mod:`storage.store`.

zarr-python 3 routes every read through its asyncio I/O thread; on a busy CPU the thread
hand-off, not the decoding, dominates a 2D slice read (measured in ``benchmarks/bench_store.py``).
For the one layout ``storage`` writes by default it is simple to read a chunk directly, following
the Zarr v3 ``sharding_indexed`` codec spec:

- the array ``(X, Y, Z)`` is one shard, stored in the file ``<array>/c/0/0/0``;
- the shard holds ``Z`` inner chunks ``(X, Y, 1)``; its index, at the end of the file, is
  ``Z`` pairs of little-endian uint64 ``(offset, nbytes)`` followed by a 4-byte CRC32C;
  ``(2^64-1, 2^64-1)`` marks a chunk that was never written (all ``fill_value``);
- a chunk is C-order little-endian bytes compressed by blosc (self-describing frame).

:meth:`SliceReader.open` returns ``None`` for anything else (tiled chunks, other codecs,
remote stores), and the caller falls back to zarr. The tests compare both paths voxel by voxel.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numcodecs.blosc
import numpy as np

_MISSING = np.uint64(2**64 - 1)


class SliceReader:
    """Reads slice ``z`` of one local array by ``pread`` + blosc decode."""

    def __init__(self, shard_path: str, shape: tuple[int, int, int], dtype: np.dtype, fill_value: Any, index: np.ndarray):
        self.shard_path = shard_path
        self.shape = shape
        self.dtype = dtype
        self.fill_value = fill_value
        self.index = index  # uint64 (Z, 2): offset, nbytes

    @classmethod
    def open(cls, array_dir: str) -> "SliceReader | None":
        """Reader for the array stored at ``array_dir`` or ``None`` if its layout is not ours."""
        try:
            with open(os.path.join(array_dir, "zarr.json"), "rb") as f:
                meta = json.load(f)
            shape = tuple(int(s) for s in meta["shape"])
            if len(shape) != 3 or meta.get("zarr_format") != 3 or meta.get("storage_transformers"):
                return None
            if meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}:
                return None
            if list(meta["chunk_grid"]["configuration"]["chunk_shape"]) != list(shape):
                return None  # more than one shard
            (codec,) = meta["codecs"]
            cfg = codec["configuration"]
            if codec["name"] != "sharding_indexed" or cfg.get("index_location", "end") != "end":
                return None
            if list(cfg["chunk_shape"]) != [shape[0], shape[1], 1]:
                return None  # tiled chunks
            inner = [c["name"] for c in cfg["codecs"]]
            if inner != ["bytes", "blosc"] or cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
                return None
            if [c["name"] for c in cfg["index_codecs"]] != ["bytes", "crc32c"]:
                return None
            dtype = np.dtype(meta["data_type"]).newbyteorder("<")
            shard = os.path.join(array_dir, "c", "0", "0", "0")
            n = shape[2]
            with open(shard, "rb") as f:
                f.seek(-(16 * n + 4), os.SEEK_END)
                raw = f.read(16 * n)
            index = np.frombuffer(raw, dtype="<u8").reshape(n, 2)
            return cls(shard, shape, dtype, meta.get("fill_value", 0), index)
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def read(self, z: int) -> np.ndarray:
        """Slice ``z`` as a fresh (X, Y) array."""
        offset, nbytes = self.index[z]
        x, y, _ = self.shape
        if offset == _MISSING and nbytes == _MISSING:
            return np.full((x, y), self.fill_value, dtype=self.dtype.newbyteorder("="))
        fd = os.open(self.shard_path, os.O_RDONLY)
        try:
            buf = os.pread(fd, int(nbytes), int(offset))
        finally:
            os.close(fd)
        data = np.frombuffer(numcodecs.blosc.decompress(buf), dtype=self.dtype)
        return data.reshape(x, y).astype(self.dtype.newbyteorder("="), copy=True)
