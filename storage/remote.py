# mypy: disable-error-code="arg-type"
# (object-store URLs travel as str in CaseSource/SourceDataset fields typed Path for local files)
"""Object storage (S3 and any fsspec file system): credentials, sources under a prefix, and
streaming slice reads from a remote store.

Credentials and endpoints come from the environment only, never from files in the
repository: botocore/s3fs read ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION`` and ``AWS_ENDPOINT_URL`` (an S3-compatible
server such as MinIO or moto) by themselves, so ``storage_options`` may stay empty.
:func:`forwarded_env` lists those variables so Ray tasks and Train workers started by this
process get the same ones (a KubeRay pod normally has them from a Secret already).

Remote reads. zarr over fsspec fetches the shard index *and* the chunk for every slice (two
GETs, plus the array metadata on first use). :class:`RemoteShardReader` reads an array's
``zarr.json`` and shard index once (``16 * Z + 4`` bytes for whole-slice chunks), then a slice
costs exactly one ranged GET of its compressed chunk, and a 3D patch one batched
``cat_ranges`` call (concurrent GETs) for all the chunks it overlaps. Decoding is the same
blosc frame as :mod:`storage.fastread`, so both readers return identical arrays.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping
from typing import Any

import numpy as np

from storage.errors import InputError, StorageError
from storage.fastread import Layout, ShardReader, parse_layout
from storage.retry import with_retry
from storage.sources import CaseSource, SourceDataset, parse_label_names, safe_case_id, strip_nifti_suffix

#: Environment variables that configure object-storage access (forwarded to Ray workers).
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_PROFILE",
    "AWS_CA_BUNDLE",
    "FSSPEC_S3_ENDPOINT_URL",
)


def is_url(uri: str | os.PathLike[str]) -> bool:
    """True for ``proto://...`` except ``file://`` (what :func:`storage.open_store` treats as remote)."""
    s = os.fspath(uri)
    return "://" in s and not s.startswith("file://")


def absolute_uri(uri: str) -> str:
    """``uri`` with a local path made absolute (against this process's working directory); URIs
    with a scheme (``s3://``, ``memory://``, ``file://``) unchanged. Paths handed to Ray Train
    workers must pass through here: the workers run in another working directory."""
    return uri if "://" in uri else os.path.abspath(uri)


def forwarded_env() -> dict[str, str]:
    """The object-storage variables of :data:`FORWARDED_ENV` set in this process."""
    return {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}


def env_storage_options(uri: str) -> dict[str, Any]:
    """For an ``s3://`` URI, the fsspec/s3fs options equivalent to the ``AWS_*`` environment
    (key, secret, token, endpoint, region); ``{}`` otherwise or when none is set.

    Use it where a file-system object is pickled to a process that may not have this
    environment (Ray Train's controller actor receives only Ray's own variables)."""
    if not str(uri).startswith(("s3://", "s3a://")):
        return {}
    env = os.environ
    opts: dict[str, Any] = {}
    for opt, var in (("key", "AWS_ACCESS_KEY_ID"), ("secret", "AWS_SECRET_ACCESS_KEY"), ("token", "AWS_SESSION_TOKEN")):
        if env.get(var):
            opts[opt] = env[var]
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        opts["endpoint_url"] = endpoint
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
    if region:
        opts["client_kwargs"] = {"region_name": region}
    return opts


def join_uri(root: str, *parts: str) -> str:
    """``root/part/...`` for local paths and URIs alike (``s3://b/run`` + ``eval`` ->
    ``s3://b/run/eval``): one ``/`` between parts, whatever slashes they carry."""
    return "/".join([root.rstrip("/")] + [p.strip("/") for p in parts])


def uri_exists(uri: str, storage_options: Mapping[str, Any] | None = None) -> bool:
    """Whether a local path or URI exists (a file or a directory)."""
    fs, path = url_to_fs(uri, storage_options)
    return bool(with_retry(lambda: fs.exists(path), uri))


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to a local path or URI, creating parent directories."""
    fs, path = url_to_fs(uri)
    parent = path.rsplit("/", 1)[0] if "/" in path else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def url_to_fs(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """``(fsspec file system, path without protocol)`` for ``uri``."""
    import fsspec

    fs_path: tuple[Any, str] = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    return fs_path


# --------------------------------------------------------------------------- remote sources
def _unstrip(fs: Any, path: str) -> str:
    """A path of ``fs`` back as a full URL (``bucket/x`` -> ``s3://bucket/x``)."""
    return str(fs.unstrip_protocol(path))


def discover_remote(
    src: str, unlabelled: bool = False, storage_options: Mapping[str, Any] | None = None
) -> tuple[SourceDataset, dict[str, dict[str, Any]]]:
    """List the cases under an object-storage prefix without downloading any volume.

    ``unlabelled``: every ``.nii``/``.nii.gz`` object under ``src`` (recursive) is a case; the
    id is the key relative to ``src`` without suffix, ``/`` -> ``__`` (as
    :func:`storage.sources.discover_unlabelled`). Otherwise an MSD/nnU-Net layout: ``dataset.json``
    (labels + ``training`` list, or pairing by name in ``imagesTr``/``labelsTr``), optional
    ``splits.json``; ``imagesTs`` objects become unlabelled test cases.

    Returns the dataset (``CaseSource.image``/``label`` hold full URLs as strings) and a map
    ``URL -> {"size", "etag"}`` from the listing, which identifies a source version without
    reading it (resume skips complete cases whose recorded size/ETag still match).
    """
    fs, root = url_to_fs(src, storage_options)
    root = root.rstrip("/")
    try:
        listing = with_retry(lambda: fs.find(root, detail=True), src)
    except FileNotFoundError:
        listing = {}
    info = {
        _unstrip(fs, p): {"size": int(d.get("size") or 0), "etag": str(d.get("ETag") or d.get("etag") or "").strip('"')}
        for p, d in listing.items()
        if d.get("type", "file") == "file"
    }
    if not info:
        raise InputError(src, "no objects under this prefix (check the bucket, prefix and credentials)")
    nifti = sorted(p for p in listing if strip_nifti_suffix(posixpath.basename(p)) is not None)
    rel = lambda p: p[len(root) + 1 :]  # noqa: E731
    if unlabelled:
        if not nifti:
            raise InputError(src, "no .nii or .nii.gz objects found")
        cases, seen = [], set()
        for p in nifti:
            cid = safe_case_id((strip_nifti_suffix(rel(p)) or rel(p)).replace("/", "__"))
            url = _unstrip(fs, p)
            if cid in seen:
                cases.append(
                    CaseSource(
                        cid, url, None, False, problem=InputError(url, f"case id {cid!r} collides with another object")
                    )
                )
                continue
            seen.add(cid)
            cases.append(CaseSource(cid, url, None, False))  # type: ignore[arg-type]
        return SourceDataset(root=src, cases=cases, name=posixpath.basename(root), layout="unlabelled"), info  # type: ignore[arg-type]

    ds_url = f"{src.rstrip('/')}/dataset.json"
    if f"{root}/dataset.json" not in listing:
        raise InputError(
            ds_url,
            "missing: an MSD/nnU-Net dataset needs dataset.json (use --unlabelled for a plain prefix of NIfTI files)",
        )
    try:
        spec = json.loads(with_retry(lambda: fs.cat_file(f"{root}/dataset.json"), ds_url))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(ds_url, f"malformed dataset.json: {exc}") from None
    if not isinstance(spec, dict):
        raise InputError(ds_url, "malformed dataset.json: top level must be an object")
    label_names = parse_label_names(ds_url, spec.get("labels"))  # type: ignore[arg-type]
    training = spec.get("training")
    if training is not None and not isinstance(training, list):
        raise InputError(ds_url, "malformed dataset.json: 'training' must be a list")

    def key(value: Any, what: str, idx: int) -> str:
        if not isinstance(value, str) or not value:
            raise InputError(ds_url, f"training[{idx}].{what} must be a path string, got {value!r}")
        norm = posixpath.normpath(posixpath.join(root, value))
        if not norm.startswith(root + "/"):
            raise InputError(ds_url, f"training[{idx}].{what} {value!r} points outside the dataset root {src}")
        return norm

    def cid_of(p: str) -> tuple[str, int | None]:
        stem = strip_nifti_suffix(posixpath.basename(p)) or posixpath.basename(p)
        base, _, ch = stem.rpartition("_")
        if base and len(ch) == 4 and ch.isdigit():
            return safe_case_id(base), int(ch)
        return safe_case_id(stem), None

    pairs: dict[str, tuple[str, str | None, str]] = {}  # cid -> (image, label, split)
    problems: list[CaseSource] = []
    lab: str | None
    for idx, entry in enumerate(training or []):
        try:
            if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
                raise InputError(
                    ds_url, f"training[{idx}] must be an object with 'image' and 'label', got {entry!r}"[:200]
                )
            img, lab = key(entry["image"], "image", idx), key(entry["label"], "label", idx)
        except InputError as err:
            problems.append(CaseSource(f"training[{idx}]", None, None, True, problem=err))
            continue
        pairs[cid_of(img)[0]] = (img, lab, "train")
    listed = {p for v in pairs.values() for p in v[:2]}
    labels = {cid_of(p)[0]: p for p in nifti if p.startswith(f"{root}/labelsTr/")}
    for p in nifti:
        cid, ch = cid_of(p)
        if p in listed or ch not in (None, 0):
            continue
        if p.startswith(f"{root}/imagesTr/") and cid not in pairs:
            pairs[cid] = (p, labels.get(cid), "train")
        elif p.startswith(f"{root}/imagesTs/") and cid not in pairs:
            pairs[cid] = (p, None, "test")
    for cid, p in labels.items():
        if p not in listed and cid not in pairs:
            problems.append(
                CaseSource(
                    cid,
                    None,
                    _unstrip(fs, p),
                    True,
                    problem=InputError(_unstrip(fs, p), "label without its image (no matching object in imagesTr)"),
                )
            )
    cases = []
    for cid, (img, lab, split) in sorted(pairs.items()):
        c = CaseSource(
            cid, _unstrip(fs, img), None if lab is None else _unstrip(fs, lab), split == "train", split=split
        )
        if img not in listing:
            c.problem = InputError(c.image, f"image of case {cid} not found")  # type: ignore[arg-type]
        elif split == "train" and (lab is None or lab not in listing):
            c.problem = InputError(
                c.image, f"image without its label (expected {lab or root + '/labelsTr/' + cid + '.nii.gz'})"
            )
        cases.append(c)
    splits = None
    if f"{root}/splits.json" in listing:
        try:
            splits = json.loads(with_retry(lambda: fs.cat_file(f"{root}/splits.json"), src))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"{src.rstrip('/')}/splits.json", f"malformed splits.json: {exc}") from None
    ds = SourceDataset(
        root=src,
        cases=problems + cases,
        label_names=label_names,  # type: ignore[arg-type]
        name=str(spec.get("name", posixpath.basename(root))),
        splits_json=splits,
        layout="msd",
    )
    return ds, info


# --------------------------------------------------------------------------- streaming reads
class RemoteShardReader(ShardReader):
    """:class:`storage.fastread.ShardReader` over fsspec: one ranged GET per chunk.

    The shard index is fetched once (suffix range of ``16 * n_chunks + 4`` bytes, its CRC32C
    verified); a region read issues all its chunk ranges in one ``fs.cat_ranges`` call and
    verifies every chunk's CRC32C before decoding it (same checks as the local reader). Every
    request is retried through connection errors by :func:`storage.retry.with_retry`.
    """

    def __init__(
        self,
        fs: Any,
        shard_path: str,
        layout: Layout,
        fill_value: Any,
        index: np.ndarray,
        verify: bool = True,
        where: str | None = None,
    ) -> None:
        super().__init__(shard_path, layout, fill_value, index, verify, where)
        self.fs = fs
        self.url = _unstrip(fs, shard_path)

    @classmethod
    def open_remote(
        cls, fs: Any, array_path: str, verify: bool = True, where: str | None = None
    ) -> RemoteShardReader | None:
        """Reader for the array at ``array_path`` (no protocol) of ``fs``; ``None`` when the
        layout is not the one :mod:`storage.store` writes (the caller falls back to zarr).
        Raises :class:`~storage.errors.CorruptDataError` when the shard index fails its checksum
        and :class:`~storage.errors.StorageUnavailableError` when storage stays unreachable."""
        url = _unstrip(fs, array_path)
        shard = f"{array_path}/c/0/0/0"
        try:
            meta = json.loads(with_retry(lambda: fs.cat_file(f"{array_path}/zarr.json"), url))
            layout = parse_layout(meta)
            if layout is None:
                return None
            n = int(np.prod(layout.grid))
            size = with_retry(lambda: fs.size(shard), url)
            raw = with_retry(lambda: fs.cat_file(shard, start=size - (16 * n + 4), end=size), url)
        except StorageError:
            raise
        except (OSError, KeyError, ValueError, TypeError):
            return None
        where = where or url
        index = cls.parse_index(raw, layout.grid, verify, where)
        return cls(fs, shard, layout, meta.get("fill_value", 0), index, verify, where)

    def read(self, x: tuple[int, int], y: tuple[int, int], z: tuple[int, int]) -> np.ndarray:
        """The in-bounds region ``[x0, x1) x [y0, y1) x [z0, z1)`` as a fresh array."""
        (x0, x1), (y0, y1), (z0, z1) = x, y, z
        cx, cy, _ = self.chunk
        out = np.empty((x1 - x0, y1 - y0, z1 - z0), dtype=self.dtype.newbyteorder("="))
        wanted, starts, ends = [], [], []
        for iz in range(z0, z1):
            for ix in range(x0 // cx, (x1 - 1) // cx + 1):
                for iy in range(y0 // cy, (y1 - 1) // cy + 1):
                    rng = self.chunk_range(ix, iy, iz)
                    wanted.append((ix, iy, iz, rng is None))
                    if rng is not None:
                        starts.append(rng[0])
                        ends.append(rng[0] + rng[1])
        paths = [self.shard_path] * len(starts)
        blobs = iter(
            with_retry(lambda: self.fs.cat_ranges(paths, starts, ends, on_error="raise"), self.url) if starts else []
        )
        for ix, iy, iz, missing in wanted:
            ax0, ax1 = max(x0, ix * cx), min(x1, (ix + 1) * cx)
            ay0, ay1 = max(y0, iy * cy), min(y1, (iy + 1) * cy)
            dst = out[ax0 - x0 : ax1 - x0, ay0 - y0 : ay1 - y0, iz - z0]
            if missing:
                dst[...] = self.fill_value
                continue
            tile = self.decode(next(blobs), ix, iy, iz)
            dst[...] = tile[ax0 - ix * cx : ax1 - ix * cx, ay0 - iy * cy : ay1 - iy * cy]
        return out


def fetch_to_local(url: str, dest_dir: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """Copy one object to ``dest_dir`` (same file name) and return the local path. Used by
    parallel ingest so that only the volume(s) being ingested ever sit on a worker's disk."""
    fs, path = url_to_fs(url, storage_options)
    local = os.path.join(dest_dir, posixpath.basename(path))
    with_retry(lambda: fs.get_file(path, local), url)
    return local
