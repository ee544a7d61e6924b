"""Data integrity on read: every byte of a shard is covered by a CRC32C (a chunk's or the shard
index's), so flipping any single bit of it makes the read fail with ``CorruptDataError`` in the
direct readers (local and S3) and with zarr's checksum error in a plain zarr read; never a
silently wrong array.

The sweeps flip one bit at every byte offset of the local shards, and at the first, middle and
last byte of every chunk plus the index on S3 (moto), and count: caught must equal tried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

import storage
from storage.errors import CorruptDataError
from storage.fastread import ShardReader
from storage.store import VolumeStore

SHAPE = (8, 6, 4)
CASE = "c0"


def write_store(uri: str) -> dict[str, np.ndarray]:
    """A one-case store (float32 image, uint8 label of ``SHAPE``); returns the arrays written."""
    rng = np.random.default_rng(0)
    arrays = {
        "image": rng.normal(100, 20, SHAPE).astype(np.float32),
        "label": rng.choice(np.array([0, 1, 2], np.uint8), SHAPE),
    }
    st = storage.open_store(uri, mode="a")
    st.write_case(CASE, arrays["image"], arrays["label"], {"shape": list(SHAPE), "labelled": True})
    return arrays


def regions(reader: ShardReader, size: int) -> list[tuple[int, int, int | None]]:
    """``(start, stop, z)`` of every byte range of a shard of ``size`` bytes: each chunk (``z`` its
    slice) and the index + its checksum (``z=None``: every slice depends on it). Asserts the
    ranges tile the whole object, so a sweep over them covers every byte."""
    found: list[tuple[int, int, int | None]] = []
    gx, gy, gz = reader.index.shape[:3]
    for ix in range(gx):
        for iy in range(gy):
            for iz in range(gz):
                rng = reader.chunk_range(ix, iy, iz)
                if rng is not None:
                    found.append((rng[0], rng[0] + rng[1], iz))
    found.append((size - (16 * gx * gy * gz + 4), size, None))
    found.sort(key=lambda r: r[0])
    assert found[0][0] == 0 and found[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(found, found[1:])), "bytes outside every checksum"
    return found


def flipped(good: bytes, offset: int) -> bytes:
    """``good`` with one bit flipped at ``offset`` (bit ``offset % 8``: all bit positions occur)."""
    bad = bytearray(good)
    bad[offset] ^= 1 << (offset % 8)
    return bytes(bad)


def expect_corrupt(read: Any, uri: str, name: str, z: int | None) -> bool:
    """Whether ``read()`` raised CorruptDataError naming the store, case, array and slice."""
    try:
        read()
    except CorruptDataError as exc:
        msg = str(exc)
        where = "shard index" if z is None else f"slice z={z}"
        assert uri in msg and f"case {CASE!r}" in msg and f"array {name!r}" in msg and where in msg, msg
        return True
    return False


def expect_zarr_checksum_error(read: Any) -> bool:
    """Whether a plain zarr read raised zarr's crc32c mismatch."""
    try:
        read()
    except ValueError as exc:
        return "checksum" in str(exc)
    return False


def test_integrity__every_bit_flip_in_a_local_shard_is_caught(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.zarr")
    arrays = write_store(uri)
    st = storage.open_store(uri)
    tried = direct = plain = 0
    for name, data in arrays.items():
        array_dir = Path(uri) / "cases" / CASE / name
        shard = array_dir / "c" / "0" / "0" / "0"
        good = shard.read_bytes()
        reader = st._reader(CASE, name)
        assert isinstance(reader, ShardReader) and reader.chunk_crc and reader.verify
        arr = zarr.open_array(store=uri, path=f"cases/{CASE}/{name}", mode="r")  # reads chunks afresh each time
        for start, stop, z in regions(reader, len(good)):
            zz = 0 if z is None else z
            for offset in range(start, stop):
                shard.write_bytes(flipped(good, offset))
                st.refresh()
                tried += 1
                direct += expect_corrupt(lambda zz=zz, name=name: st.read_slice(CASE, zz, name), uri, name, z)
                plain += expect_zarr_checksum_error(lambda arr=arr, zz=zz: arr[:, :, zz])
        shard.write_bytes(good)
        st.refresh()
        for z in range(SHAPE[2]):  # restored: reads are exact again
            np.testing.assert_array_equal(st.read_slice(CASE, z, name), data[:, :, z])
    print(f"\nlocal bit flips: tried {tried}, caught by the direct reader {direct}, by plain zarr {plain}")
    assert tried > 1000  # every byte of both shards (~900 + ~340 bytes)
    assert direct == plain == tried


def test_integrity__bit_flips_in_s3_shards_are_caught_by_the_remote_reader_and_zarr(s3_env: str) -> None:
    from zarr.storage import FsspecStore

    uri = f"s3://{s3_env}/s.zarr"
    arrays = write_store(uri)
    st = storage.open_store(uri)
    fs = st._reader(CASE, "image").fs
    tried = direct = plain = 0
    for name in arrays:
        reader = st._reader(CASE, name)
        assert type(reader).__name__ == "RemoteShardReader" and reader.chunk_crc
        key = f"{s3_env}/s.zarr/cases/{CASE}/{name}/c/0/0/0"
        good = fs.cat_file(key)
        arr = zarr.open_array(store=FsspecStore.from_url(uri, read_only=True), path=f"cases/{CASE}/{name}", mode="r")
        for start, stop, z in regions(reader, len(good)):
            zz = 0 if z is None else z
            # first, middle, last byte of every chunk; of the index also each checksum byte
            offsets = {start, (start + stop) // 2, stop - 1} | (set(range(stop - 4, stop)) if z is None else set())
            for offset in sorted(offsets):
                fs.pipe_file(key, flipped(good, offset))
                st.refresh()
                tried += 1
                direct += expect_corrupt(lambda zz=zz, name=name: st.read_slice(CASE, zz, name), uri, name, z)
                plain += expect_zarr_checksum_error(lambda arr=arr, zz=zz: arr[:, :, zz])
        fs.pipe_file(key, good)
        st.refresh()
        np.testing.assert_array_equal(st.read_slice(CASE, 1, name), arrays[name][:, :, 1])
    print(f"\nS3 bit flips: tried {tried}, caught by the remote reader {direct}, by plain zarr {plain}")
    assert tried >= 2 * (3 * SHAPE[2] + 4)  # both arrays: 3 offsets per chunk, the index's 4 CRC bytes
    assert direct == plain == tried


def test_integrity__zarr_path_of_the_store_raises_corrupt_data_error(tmp_path: Path, monkeypatch) -> None:
    uri = str(tmp_path / "s.zarr")
    write_store(uri)
    shard = Path(uri) / "cases" / CASE / "image" / "c" / "0" / "0" / "0"
    reader = storage.open_store(uri)._reader(CASE, "image")
    offset, _ = reader.chunk_range(0, 0, 2)
    shard.write_bytes(flipped(shard.read_bytes(), offset + 3))
    monkeypatch.setenv("LOCALCL_ZARR_ONLY", "1")
    st = storage.open_store(uri)
    assert st._reader(CASE, "image") is None
    st.read_slice(CASE, 1)  # an intact slice still reads
    with pytest.raises(CorruptDataError, match=r"case 'c0', array 'image', slice z=2: .*checksum"):
        st.read_slice(CASE, 2)
    with pytest.raises(CorruptDataError, match="whole volume"):
        st.image(CASE)
    with pytest.raises(CorruptDataError, match=r"slices z=1\.\.3"):
        st.read_patch(CASE, (0, 0, 1), (4, 4, 3))


def test_integrity__verify_false_skips_the_crc_and_old_stores_read_unverified(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.zarr")
    arrays = write_store(uri)
    shard = Path(uri) / "cases" / CASE / "image" / "c" / "0" / "0" / "0"
    good = shard.read_bytes()
    offset, nbytes = storage.open_store(uri)._reader(CASE, "image").chunk_range(0, 0, 2)
    shard.write_bytes(flipped(good, offset + nbytes - 1))  # damage only the stored checksum
    with pytest.raises(CorruptDataError):
        storage.open_store(uri).read_slice(CASE, 2)
    unverified = storage.open_store(uri, verify=False)
    assert unverified.verify is False and unverified._reader(CASE, "image").verify is False
    np.testing.assert_array_equal(unverified.read_slice(CASE, 2), arrays["image"][:, :, 2])

    # a store written before chunk checksums (inner codecs bytes + blosc): read as before
    old = str(tmp_path / "old.zarr")
    write_store(old)
    grp = zarr.open_group(old, mode="a")[f"cases/{CASE}"]
    del grp["image"]
    arr = grp.create_array(
        "image",
        shape=SHAPE,
        dtype=np.float32,
        chunks=(*SHAPE[:2], 1),
        shards=SHAPE,
        compressors=storage.store.compressors()[:1],
        fill_value=0,
    )
    arr[...] = arrays["image"]
    st = storage.open_store(old)
    reader = st._reader(CASE, "image")
    assert isinstance(reader, ShardReader) and reader.chunk_crc is False and reader.verify is True
    for z in range(SHAPE[2]):
        np.testing.assert_array_equal(st.read_slice(CASE, z, "image"), arrays["image"][:, :, z])


def test_compressors__new_stores_carry_a_chunk_crc32c(tmp_path: Path) -> None:
    uri = str(tmp_path / "s.zarr")
    write_store(uri)
    st: VolumeStore = storage.open_store(uri)
    for name in ("image", "label"):
        cfg = zarr.open_array(store=uri, path=f"cases/{CASE}/{name}", mode="r").metadata.to_dict()["codecs"][0]
        assert [c["name"] for c in cfg["configuration"]["codecs"]] == ["bytes", "blosc", "crc32c"]
        assert st._reader(CASE, name).chunk_crc is True
