"""NIfTI I/O: reading and validating volumes before they enter a store, listing and loading
prediction/reference folders, and writing label maps.

Every check raises :class:`storage.errors.InputError` with ``"<file>: <problem>"`` so one bad
file never becomes a traceback, and every check runs *before* anything is written, so a bad
file can never damage a case already in the store.

Checks, in order (each maps to one class of bad input of issue 2):

1. the file exists and is not empty;
2. it parses as NIfTI-1/2 (``nibabel``'s header check), otherwise "not a NIfTI file";
3. the header shape is 3D (trailing singleton dimensions are dropped; a real 4th dimension is
   refused: "4D image where 3D is expected");
4. the voxels the header announces fit in memory: the peak of decoding,
   ``prod(shape) * (2 * itemsize + 12)`` bytes (decompressed file + raw array + a float64
   scaling temporary + the float32 result), must stay below ``max_bytes`` (default: the
   machine's available memory); checked on the header alone, before reading any voxel;
5. the affine is finite and non-singular (``|det(A[:3, :3])| > 1e-12``);
6. the whole file decompresses with a valid gzip CRC (a truncated or corrupt stream is
   reported as such), then parses in memory with the declared number of voxel bytes;
7. images: every voxel is finite (no NaN/Inf); labels: every value is an integer in 0..255.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from storage.errors import InputError, StorageError
from storage.sources import strip_nifti_suffix

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Volume:
    """A validated volume: ``data`` in the file's voxel order (X, Y, Z)."""

    path: str
    data: np.ndarray  # image: float32 (X, Y, Z) == get_fdata(); label: uint8 (X, Y, Z)
    affine: np.ndarray  # float64 (4, 4)
    spacing: tuple[float, float, float]  # voxel size in mm along X, Y, Z (header zooms)
    orientation: str  # e.g. "RAS" (nibabel.aff2axcodes)
    dtype: str  # on-disk dtype before scaling, e.g. "uint16"
    shape: tuple[int, int, int]
    sha256: str


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes (streamed, constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def available_memory() -> int:
    """Bytes of memory the machine can still give (``psutil``; falls back to sysconf)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # pragma: no cover - psutil is a dependency
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def _open_stream(path: Path) -> Any:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _gzip_error(path: Path, exc: BaseException) -> InputError:
    return InputError(path, f"truncated or corrupt gzip ({type(exc).__name__}: {exc})")


_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile)


def _read_header(path: Path) -> Any:
    """Parse only the NIfTI-1/2 header (first 540 bytes of the decompressed stream)."""
    if not path.is_file():
        raise InputError(path, "file not found")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file (0 bytes)")
    with open(path, "rb") as f:
        magic = f.read(2)
    if path.name.endswith(".gz") and magic != _GZIP_MAGIC:
        raise InputError(path, "not a gzip file although the name ends in .gz (corrupt or not NIfTI)")
    try:
        with _open_stream(path) as f:
            head = f.read(540)
    except _GZIP_ERRORS as exc:
        raise _gzip_error(path, exc) from None
    if len(head) < 4:
        raise InputError(path, f"not a NIfTI file (only {len(head)} bytes)")
    sizeof = {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}
    klass = nib.Nifti1Header if 348 in sizeof else nib.Nifti2Header if 540 in sizeof else None
    if klass is None:
        raise InputError(path, "not a NIfTI file (header size field is neither 348 nor 540)")
    try:
        return klass.from_fileobj(io.BytesIO(head), check=True)
    except Exception as exc:  # nibabel raises a zoo of errors on a mangled header
        raise InputError(path, f"not a NIfTI file ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None


def _read_image(path: Path, header: Any) -> Any:
    """Decompress the whole file (verifying the gzip CRC) and parse it in memory."""
    try:
        with _open_stream(path) as f:
            raw = f.read()
    except _GZIP_ERRORS as exc:
        raise _gzip_error(path, exc) from None
    klass = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    try:
        return klass.from_bytes(raw)
    except Exception as exc:
        raise InputError(path, f"not a NIfTI file ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})") from None


def _shape3d(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) == 4:
        raise InputError(path, f"4D image where 3D is expected (shape {tuple(shape)})")
    if len(dims) != 3:
        raise InputError(path, f"expected a 3D volume, header shape is {tuple(shape)}")
    if any(d <= 0 for d in dims):
        raise InputError(path, f"header shape {tuple(shape)} has a zero or negative dimension")
    return dims[0], dims[1], dims[2]


def load_volume(
    path: str | os.PathLike[str],
    kind: str = "image",
    max_bytes: int | None = None,
    sha256: str | None = None,
) -> Volume:
    """Load and validate one NIfTI file.

    Args:
        path: ``.nii`` or ``.nii.gz`` file.
        kind: ``"image"`` -> float32 ``get_fdata()`` values (scl_slope/inter applied), finite;
            ``"label"`` -> uint8, values must be integers in 0..255 (exact copy of the file).
        max_bytes: refuse the file when ``prod(shape) * (2 * itemsize + 12)`` exceeds this many
            bytes (default: currently available memory). Checked on the header only.
        sha256: precomputed file hash (computed here when ``None``).

    Raises:
        InputError: naming ``path`` and the problem, for each class in the module docstring.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    p = Path(path)
    header = _read_header(p)
    shape = _shape3d(p, tuple(int(d) for d in header.get_data_shape()))
    raw_dtype = np.dtype(header.get_data_dtype())
    need = math.prod(shape) * (2 * raw_dtype.itemsize + 12)  # peak of decoding, see module doc
    limit = available_memory() if max_bytes is None else int(max_bytes)
    if need > limit:
        raise InputError(
            p,
            f"header dimensions {shape} ({raw_dtype}) need {need / 2**30:.1f} GiB to load, "
            f"more than the {limit / 2**30:.1f} GiB available; refusing before allocating",
        )
    affine = np.asarray(header.get_best_affine(), dtype=np.float64)
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise InputError(p, "affine contains NaN/Inf")
    if abs(float(np.linalg.det(affine[:3, :3]))) <= 1e-12:
        raise InputError(p, "singular or zero affine (det of the 3x3 part is 0)")
    img = _read_image(p, header)
    try:
        if kind == "image":
            data = np.asarray(img.get_fdata(dtype=np.float32), dtype=np.float32)
        else:
            data = np.asarray(img.dataobj)
    except (OSError, ValueError) as exc:
        raise InputError(p, f"truncated or unreadable voxel data ({exc})") from None
    data = data.reshape(shape)
    if kind == "image":
        bad = ~np.isfinite(data)
        if bad.any():
            n_nan = int(np.isnan(data).sum())
            raise InputError(p, f"{n_nan} NaN and {int(bad.sum()) - n_nan} Inf intensities")
    else:
        data = _as_label(p, data)
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    return Volume(
        path=str(p),
        data=data,
        affine=affine,
        spacing=(zooms[0], zooms[1], zooms[2]),
        orientation="".join(nib.aff2axcodes(affine)),
        dtype=str(raw_dtype),
        shape=shape,
        sha256=sha256 or sha256_file(p),
    )


def _as_label(path: Path, data: np.ndarray) -> np.ndarray:
    """Exact uint8 copy of a label map, or InputError for non-integer / out-of-range values."""
    if data.dtype == np.uint8:
        return np.ascontiguousarray(data)
    if np.issubdtype(data.dtype, np.floating):
        if not np.all(np.isfinite(data)):
            raise InputError(path, "non-integer label values (NaN/Inf)")
        frac = data != np.round(data)
        if frac.any():
            example = float(data[frac].flat[0])
            raise InputError(path, f"non-integer label values ({int(frac.sum())} voxels, e.g. {example:g})")
    lo, hi = data.min(), data.max()
    if lo < 0 or hi > 255:
        raise InputError(path, f"label values outside 0..255 (min {lo:g}, max {hi:g})")
    return data.astype(np.uint8)


# --------------------------------------------------------------------------- label maps and folders
# Used by evaluation (``localcl evaluate --pred/--ref``) and prediction (``localcl predict``);
# errors are :class:`StorageError` with a one-line message naming the file or folder.


def label_nifti_bytes(labels: np.ndarray, affine: np.ndarray, header: nib.Nifti1Header | None = None) -> bytes:
    """A gzipped NIfTI-1 (``.nii.gz``) of a uint8 label map with the given affine and header.

    The source header is copied (dimensions, zooms, qform/sform codes, units, descrip...), its
    data type set to uint8 and intensity scaling removed, so the label map overlays its scan.
    """
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(labels.astype(np.uint8), affine, header=hdr)
    img.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)
    img.header["cal_min"], img.header["cal_max"] = 0.0, float(labels.max(initial=0))
    # the source's codes when known; otherwise (a store case: only its affine is kept) the
    # affine is the scanner geometry the store recorded from the source file
    qcode = int(header["qform_code"]) if header is not None else 1
    scode = int(header["sform_code"]) if header is not None else 1
    img.set_qform(affine, code=qcode)
    img.set_sform(affine, code=scode)
    raw = img.to_bytes()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) as gz:
        gz.write(raw)
    return buf.getvalue()


def list_nifti(folder: str | os.PathLike[str], what: str, strict: bool = True) -> dict[str, Path]:
    """``{case: path}`` of the ``.nii``/``.nii.gz`` files of a folder. With ``strict``, any
    other file (except hidden files and ``.json/.md/.txt/.csv``) is an error naming the file;
    otherwise it is ignored."""
    root = Path(folder)
    if not root.is_dir():
        raise StorageError(f"{what} {folder}: no such directory")
    out: dict[str, Path] = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith(".") or p.is_dir() or p.suffix in (".json", ".md", ".txt", ".csv"):
            continue
        case = strip_nifti_suffix(p.name)
        if case is None:
            if not strict:
                continue
            raise StorageError(f"{p}: not a NIfTI file (expected .nii or .nii.gz)")
        if case in out:
            raise StorageError(f"{p}: case {case!r} appears twice in {folder}")
        out[case] = p
    if not out:
        raise StorageError(f"{what} {folder}: no .nii/.nii.gz files")
    return out


def load_nifti(path: Path) -> nib.Nifti1Image:
    try:
        img = nib.load(str(path))
        img.header  # noqa: B018 - force header parsing
    except Exception as exc:  # nibabel raises ImageFileError, gzip errors, EOFError...
        raise StorageError(
            f"{path}: cannot read as NIfTI ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    if not isinstance(img, nib.Nifti1Image):  # nib.load picks the class from the file; Nifti2Image subclasses it
        raise StorageError(f"{path}: cannot read as NIfTI (nibabel read it as {type(img).__name__})")
    if len(img.shape) == 4 and img.shape[3] == 1:
        img = img.slicer[..., 0]
    if len(img.shape) != 3:
        raise StorageError(f"{path}: expected a 3D volume, got shape {img.shape}")
    return img
