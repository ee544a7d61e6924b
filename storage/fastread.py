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
- a chunk is C-order little-endian bytes compressed by blosc (self-describing frame), followed
  by the 4-byte little-endian CRC32C of the compressed bytes when the array's inner codecs end
  in ``crc32c`` (every store written since checksums were added, see
  :func:`storage.store.compressors`).

Verification (``verify=True``, the default): the shard index's CRC32C is checked when the reader
opens, and each chunk's CRC32C before it is decoded; a mismatch, a blosc frame that does not
decode, or one that decodes to the wrong size raises :class:`storage.errors.CorruptDataError`
naming the store, case, array and slice. Arrays written before checksums (inner codecs
``bytes, blosc``) keep their index check but their chunks cannot be verified: only a chunk
whose blosc frame fails to decode is caught there. ``verify=False`` skips both CRC checks
(the decode checks stay, they cost nothing).

:meth:`ShardReader.open` returns ``None`` for any other layout, and the caller falls back to
zarr (whose ``crc32c`` codec verifies the same checksums). Remote stores (``s3://``...) use :class:`storage.remote.RemoteShardReader`, the same
logic over fsspec byte ranges. The tests compare both paths voxel by voxel, for whole-slice
chunks and for tiled chunks with partial edge tiles.
"""

from __future__ import annotations

import json
import os
from typing import Any, NamedTuple

import google_crc32c
import numcodecs.blosc
import numpy as np

from storage.errors import CorruptDataError

MISSING = 2**64 - 1


class Layout(NamedTuple):
    """What :func:`parse_layout` reads from an array's ``zarr.json``."""

    shape: tuple[int, ...]
    chunk: tuple[int, ...]
    grid: tuple[int, ...]  # inner chunks per axis
    dtype: np.dtype  # little-endian on-disk dtype
    chunk_crc: bool  # every chunk ends in a 4-byte CRC32C of its compressed bytes


def crc32c(data: bytes | memoryview) -> int:
    """The CRC32C (Castagnoli) of ``data``, as zarr's ``crc32c`` codec computes it."""
    return int(google_crc32c.value(data))


def split_checked(raw: bytes, verify: bool, what: str) -> bytes:
    """``raw`` without its trailing 4-byte little-endian CRC32C; with ``verify``, raises
    :class:`~storage.errors.CorruptDataError` (``"<what>: checksum mismatch ..."``) when the
    stored and computed checksums differ."""
    if len(raw) < 4:
        raise CorruptDataError(f"{what}: {len(raw)} bytes, shorter than its 4-byte checksum")
    body = raw[:-4]
    if verify:
        stored = int.from_bytes(raw[-4:], "little")
        computed = crc32c(body)
        if stored != computed:
            raise CorruptDataError(
                f"{what}: checksum mismatch (stored {stored:#010x}, computed {computed:#010x}); the object "
                f"is damaged: re-ingest this case"
            )
    return body


def parse_layout(meta: dict[str, Any]) -> Layout | None:
    """The :class:`Layout` of an array ``zarr.json`` written by :mod:`storage.store` (one shard,
    ``sharding_indexed`` with the index at the end, bytes+blosc(+crc32c) inner codecs,
    bytes+crc32c index codecs, chunks ``(cx, cy, 1)``), or ``None`` for any other layout.
    The shard index is ``16 * prod(grid) + 4`` bytes at the end of the shard object."""
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
        names = [c["name"] for c in cfg["codecs"]]
        if names not in (["bytes", "blosc"], ["bytes", "blosc", "crc32c"]):
            return None
        if cfg["codecs"][0].get("configuration", {}).get("endian", "little") != "little":
            return None
        if [c["name"] for c in cfg["index_codecs"]] != ["bytes", "crc32c"]:
            return None
        grid = tuple(sh // c for sh, c in zip(shard, chunk))
        return Layout(shape, chunk, grid, np.dtype(meta["data_type"]).newbyteorder("<"), names[-1] == "crc32c")
    except (KeyError, ValueError, TypeError):
        return None


class ShardReader:
    """Reads regions of one local single-shard array by ``pread`` + blosc decode per chunk,
    verifying checksums (see the module docstring). ``where`` prefixes every
    :class:`~storage.errors.CorruptDataError` (the store sets ``"<store>: case 'X', array 'image'"``)."""

    def __init__(
        self,
        shard_path: str,
        layout: Layout,
        fill_value: Any,
        index: np.ndarray,
        verify: bool = True,
        where: str | None = None,
    ) -> None:
        self.shard_path = shard_path
        self.shape = layout.shape
        self.chunk = layout.chunk
        self.dtype = layout.dtype  # little-endian on-disk dtype
        self.chunk_crc = layout.chunk_crc
        self.fill_value = fill_value
        self.index = index  # uint64 (gx, gy, gz, 2): offset, nbytes
        self.verify = verify
        self.where = where or shard_path

    @staticmethod
    def parse_index(raw: bytes, grid: tuple[int, ...], verify: bool, where: str) -> np.ndarray:
        """The shard index (``16 * prod(grid)`` bytes + CRC32C) as uint64 ``(*grid, 2)``, its
        checksum verified when ``verify``."""
        body = split_checked(raw, verify, f"{where}: shard index (locates every slice)")
        if len(body) != 16 * int(np.prod(grid)):
            raise CorruptDataError(f"{where}: shard index has {len(body)} bytes, expected {16 * int(np.prod(grid))}")
        return np.frombuffer(body, dtype="<u8").reshape(*grid, 2)

    @classmethod
    def open(cls, array_dir: str, verify: bool = True, where: str | None = None) -> ShardReader | None:
        """Reader for the array stored at ``array_dir``, or ``None`` if the layout is not ours.
        Raises :class:`~storage.errors.CorruptDataError` when the shard index fails its checksum."""
        path = os.path.join(array_dir, "c", "0", "0", "0")
        try:
            with open(os.path.join(array_dir, "zarr.json"), "rb") as f:
                meta = json.load(f)
            layout = parse_layout(meta)
            if layout is None:
                return None
            n = int(np.prod(layout.grid))
            with open(path, "rb") as f:
                f.seek(-(16 * n + 4), os.SEEK_END)
                raw = f.read(16 * n + 4)
        except (OSError, KeyError, ValueError, TypeError):
            return None
        where = where or array_dir
        return cls(
            path, layout, meta.get("fill_value", 0), cls.parse_index(raw, layout.grid, verify, where), verify, where
        )

    def chunk_range(self, ix: int, iy: int, iz: int) -> tuple[int, int] | None:
        """``(offset, nbytes)`` of chunk ``(ix, iy, iz)`` in the shard, ``None`` if never written."""
        offset, nbytes = (int(v) for v in self.index[ix, iy, iz])
        if offset == MISSING and nbytes == MISSING:
            return None
        return offset, nbytes

    def decode(self, raw: bytes, ix: int, iy: int, iz: int) -> np.ndarray:
        """Chunk ``(ix, iy, iz)`` from its stored bytes: checksum verified (when the array has
        one and ``verify``), blosc-decoded, size checked; else
        :class:`~storage.errors.CorruptDataError` naming the slice."""
        what = f"{self.where}: slice z={iz}, chunk ({ix}, {iy})"
        body = split_checked(raw, self.verify, what) if self.chunk_crc else raw
        try:
            data = numcodecs.blosc.decompress(body)
        except (RuntimeError, ValueError) as exc:
            raise CorruptDataError(f"{what}: blosc frame does not decode ({exc}); re-ingest this case") from None
        want = int(np.prod(self.chunk[:2])) * self.dtype.itemsize
        if len(data) != want:
            raise CorruptDataError(f"{what}: decodes to {len(data)} bytes, expected {want}; re-ingest this case")
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunk[:2])

    def _chunk(self, fd: int, ix: int, iy: int, iz: int) -> np.ndarray | None:
        rng = self.chunk_range(ix, iy, iz)
        if rng is None:
            return None
        offset, nbytes = rng
        buf = os.pread(fd, nbytes, offset)
        return self.decode(buf, ix, iy, iz)

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
