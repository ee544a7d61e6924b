"""A direct reader for the chunks of local arrays written by :mod:`storage.store`.

zarr-python 3 routes every read through its asyncio I/O thread. On a busy CPU the thread
hand-off, not the decoding, dominates a 2D slice read (measured in ``benchmarks/bench_store.py``).
For the layouts ``storage`` writes, a chunk is simple to read directly by following the Zarr v3
``sharding_indexed`` codec spec:

- the array ``(X, Y, Z)`` is one shard (shard shape >= array shape), stored in the file
  ``<array>/c/0/0/0``;
- the shard holds a C-ordered grid ``(gx, gy, gz)`` of inner chunks ``(cx, cy, 1)``, always
  stored at full chunk shape (edge chunks padded with ``fill_value``); its index, at the end of
  the file, is ``gx*gy*gz`` pairs of little-endian uint64 ``(offset, nbytes)`` followed by a
  4-byte CRC32C; ``(2^64-1, 2^64-1)`` marks a chunk never written (all ``fill_value``);
- a chunk is C-order little-endian bytes compressed by blosc (self-describing frame).

:meth:`ShardReader.open` returns ``None`` for any other layout, and the caller falls back to
zarr. Remote stores (``s3://``...) use :class:`storage.remote.RemoteShardReader`, the same
logic over fsspec byte ranges. The tests compare both paths voxel by voxel, for whole-slice
chunks and for tiled chunks with partial edge tiles.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numcodecs.blosc
import numpy as np

MISSING = 2**64 - 1


def parse_layout(meta: dict[str, Any]) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], np.dtype] | None:
    """``(shape, chunk, grid, dtype)`` of an array ``zarr.json`` written by :mod:`storage.store`
    (one shard, ``sharding_indexed`` with the index at the end, bytes+blosc inner codecs,
    bytes+crc32c index codecs, chunks ``(cx, cy, 1)``), or ``None`` for any other layout.
    ``grid`` is the number of inner chunks per axis; the shard index is ``16 * prod(grid) + 4``
    bytes at the end of the shard object."""
    try:
        shape = tuple(int(s) for s in meta["shape"])
        if len(shape) != 3 or meta.get("zarr_format") != 3 or meta.get("storage_transformers"):
            return None
        if meta["chunk_key_encoding"] != {"name": "default", "configuration": {"separator": "/"}}:
            return None
        shard = tuple(int(s) for s in meta["chunk_grid"]["configuration"]["chunk_shape"])
        if any(sh < s for sh, s in zip(shard, shape)):
            return None  # more than one shard
        (codec,) = meta["codecs"]
        cfg = codec["configuration"]
        if codec["name"] != "sharding_indexed" or cfg.get("index_location", "end") != "end":
            return None
        chunk = tuple(int(c) for c in cfg["chunk_shape"])
        if len(chunk) != 3 or chunk[2] != 1 or any(sh % c for sh, c in zip(shard, chunk)):
            return None
        if [c["name"] for c in cfg["codecs"]] != ["bytes", "blosc"]:
            return None
        if cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            return None
        if [c["name"] for c in cfg["index_codecs"]] != ["bytes", "crc32c"]:
            return None
        grid = tuple(sh // c for sh, c in zip(shard, chunk))
        return shape, chunk, grid, np.dtype(meta["data_type"]).newbyteorder("<")
    except (KeyError, ValueError, TypeError):
        return None


class ShardReader:
    """Reads regions of one local single-shard array by ``pread`` + blosc decode per chunk."""

    def __init__(
        self,
        shard_path: str,
        shape: tuple[int, ...],
        chunk: tuple[int, ...],
        dtype: np.dtype,
        fill_value: Any,
        index: np.ndarray,
    ) -> None:
        self.shard_path = shard_path
        self.shape = shape
        self.chunk = chunk
        self.dtype = dtype  # little-endian on-disk dtype
        self.fill_value = fill_value
        self.index = index  # uint64 (gx, gy, gz, 2): offset, nbytes

    @classmethod
    def open(cls, array_dir: str) -> ShardReader | None:
        """Reader for the array stored at ``array_dir``, or ``None`` if the layout is not ours."""
        try:
            with open(os.path.join(array_dir, "zarr.json"), "rb") as f:
                meta = json.load(f)
            layout = parse_layout(meta)
            if layout is None:
                return None
            shape, chunk, grid, dtype = layout
            n = int(np.prod(grid))
            path = os.path.join(array_dir, "c", "0", "0", "0")
            with open(path, "rb") as f:
                f.seek(-(16 * n + 4), os.SEEK_END)
                raw = f.read(16 * n)
            index = np.frombuffer(raw, dtype="<u8").reshape(*grid, 2)
            return cls(path, shape, chunk, dtype, meta.get("fill_value", 0), index)
        except (OSError, KeyError, ValueError, TypeError):
            return None

    def _chunk(self, fd: int, ix: int, iy: int, iz: int) -> np.ndarray | None:
        offset, nbytes = (int(v) for v in self.index[ix, iy, iz])
        if offset == MISSING and nbytes == MISSING:
            return None
        buf = os.pread(fd, nbytes, offset)
        return np.frombuffer(numcodecs.blosc.decompress(buf), dtype=self.dtype).reshape(self.chunk[:2])

    def read(self, x: tuple[int, int], y: tuple[int, int], z: tuple[int, int]) -> np.ndarray:
        """The in-bounds region ``[x0, x1) x [y0, y1) x [z0, z1)`` as a fresh array."""
        (x0, x1), (y0, y1), (z0, z1) = x, y, z
        cx, cy, _ = self.chunk
        out = np.empty((x1 - x0, y1 - y0, z1 - z0), dtype=self.dtype.newbyteorder("="))
        fd = os.open(self.shard_path, os.O_RDONLY)
        try:
            for iz in range(z0, z1):
                for ix in range(x0 // cx, (x1 - 1) // cx + 1):
                    for iy in range(y0 // cy, (y1 - 1) // cy + 1):
                        tile = self._chunk(fd, ix, iy, iz)
                        ax0, ax1 = max(x0, ix * cx), min(x1, (ix + 1) * cx)
                        ay0, ay1 = max(y0, iy * cy), min(y1, (iy + 1) * cy)
                        dst = out[ax0 - x0 : ax1 - x0, ay0 - y0 : ay1 - y0, iz - z0]
                        if tile is None:
                            dst[...] = self.fill_value
                        else:
                            dst[...] = tile[ax0 - ix * cx : ax1 - ix * cx, ay0 - iy * cy : ay1 - iy * cy]
        finally:
            os.close(fd)
        return out

    def read_slice(self, z: int) -> np.ndarray:
        """Slice ``z`` as a fresh (X, Y) array."""
        return self.read((0, self.shape[0]), (0, self.shape[1]), (z, z + 1))[:, :, 0]
