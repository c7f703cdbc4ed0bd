"""Volume: the pixels of one series as float32 (z, y, x) in physical units, with its geometry."""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .errors import PacsNodeError, SeriesLoadError

log = logging.getLogger(__name__)


@dataclass
class Volume:
    """Pixel data of one series, sorted along the slice normal.

    ``array`` holds physical values (HU for CT: stored value * slope + intercept).
    ``positions`` is the ImagePositionPatient of each slice (z, 3), so uneven gaps and
    gantry tilt survive; ``spacing`` is (slice step, row spacing, column spacing) in mm,
    the slice step being the median gap (0 for a single slice).
    """

    array: np.ndarray
    positions: np.ndarray
    row_direction: np.ndarray
    column_direction: np.ndarray
    pixel_spacing: tuple[float, float]
    datasets: list[Dataset] = field(repr=False)
    files: list[Path] = field(default_factory=list, repr=False)

    @property
    def modality(self) -> str:
        return str(self.datasets[0].get("Modality", "")) if self.datasets else ""

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)

    @property
    def slice_gaps(self) -> np.ndarray:
        if len(self.positions) < 2:
            return np.zeros(0)
        return np.diff(self.positions @ self.normal)

    @property
    def spacing(self) -> tuple[float, float, float]:
        gaps = self.slice_gaps
        step = float(np.median(np.abs(gaps))) if gaps.size else 0.0
        return (step, float(self.pixel_spacing[0]), float(self.pixel_spacing[1]))

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]


def rescale_of(ds: Dataset) -> tuple[float, float]:
    """Slope and intercept of the modality LUT (1, 0 when absent)."""
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return slope, intercept


def read_datasets(paths: Iterable[Path]) -> list[tuple[Path, Dataset]]:
    """Read every DICOM file among ``paths``; skip (and log) what is not DICOM image data.
    Values longer than 64 KiB (the pixel data) are left in the file until asked for (pydicom
    reads them then), so a series is not held in memory twice: as bytes and as the Volume."""
    found: list[tuple[Path, Dataset]] = []
    for path in paths:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER)
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not a DICOM file"
            log.warning("skipping %s: not a readable DICOM file (%s)", path.name, type(exc).__name__)
            continue
        if "PixelData" not in ds:
            log.info("skipping %s: no pixel data", path.name)
            continue
        found.append((path, ds))
    return found


_DEFER = 64 * 1024
PIXEL_DATA = 0x7FE00010
_NATIVE_LE = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


def element_vr(elem: DataElement | RawDataElement) -> str | None:
    """An element's VR without converting its value: as read (explicit VR), else (implicit
    VR) the dictionary's; None for a tag the dictionary does not know."""
    if elem.VR is not None:
        return str(elem.VR)
    try:
        return dictionary_VR(elem.tag)
    except KeyError:
        return None


def _native_pixels(path: Path, ds: Dataset) -> np.ndarray | None:
    """An uncompressed little-endian single-frame image's stored values read straight from its
    file, for pixel data left unread (read_datasets): no copy stays with the data set. None
    where pydicom decodes (compressed, already read, bits stored short of bits allocated, ...)."""
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    meta = getattr(ds, "file_meta", None)
    if (elem is None or getattr(elem, "value", b"") is not None or meta is None
            or str(meta.get("TransferSyntaxUID", "")) not in _NATIVE_LE):
        return None
    bits = int(ds.get("BitsAllocated", 0) or 0)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if bits not in (8, 16, 32) or int(ds.get("BitsStored", 0) or 0) != bits:
        return None
    rows, columns = int(ds.Rows), int(ds.Columns)
    size = rows * columns * bits // 8
    if elem.length == 0xFFFFFFFF or elem.length < size:
        return None
    # the element's own header first: a file replaced since it was read (the instance sent
    # again) must not lend its bytes; pydicom's deferred read checks the same
    implicit = str(meta.TransferSyntaxUID) == _NATIVE_LE[0]
    header = struct.pack("<HHL", 0x7FE0, 0x0010, elem.length) if implicit else \
        struct.pack("<HH", 0x7FE0, 0x0010) + bytes(str(elem.VR), "ascii") + struct.pack("<HL", 0, elem.length)
    with open(path, "rb") as fh:
        fh.seek(elem.value_tell - len(header))
        raw = fh.read(len(header) + size)
    if len(raw) != len(header) + size or raw[:len(header)] != header:
        return None
    raw = memoryview(raw)[len(header):]
    dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
    return np.frombuffer(raw, dtype=dtype).reshape(rows, columns)


def _sort_key(ds: Dataset, normal: np.ndarray | None) -> tuple[float, int]:
    number = int(ds.get("InstanceNumber", 0) or 0)
    ipp = ds.get("ImagePositionPatient")
    if normal is not None and ipp is not None and len(ipp) == 3:
        return (float(np.dot(np.asarray(ipp, dtype=float), normal)), number)
    return (float(number), number)


def volume_from_datasets(items: Sequence[tuple[Path, Dataset]]) -> Volume:
    """Build a Volume from already-read datasets of one series (any order)."""
    if not items:
        raise SeriesLoadError("no image instances in series")
    first = items[0][1]
    iop = first.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        row_dir = np.asarray(iop[:3], dtype=float)
        col_dir = np.asarray(iop[3:], dtype=float)
    else:
        row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_dir, col_dir)
    has_geometry = iop is not None and all("ImagePositionPatient" in ds for _, ds in items)
    ordered = sorted(items, key=lambda it: _sort_key(it[1], normal if has_geometry else None))

    shape = (int(first.Rows), int(first.Columns))
    # one float32 volume written in place: no per-slice temporaries to stack, and no decoded
    # array cached on each dataset (pydicom's ds.pixel_array keeps one, which the encoder
    # would then copy along with the header)
    array = np.empty((len(ordered), *shape), dtype=np.float32)
    for k, (path, ds) in enumerate(ordered):
        if int(ds.get("NumberOfFrames", 1) or 1) != 1:
            raise SeriesLoadError(f"{path.name}: multi-frame images are not supported")
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise SeriesLoadError(
                f"{path.name}: matrix {ds.Rows}x{ds.Columns} differs from the series' {shape[0]}x{shape[1]}"
            )
        if ds.get("SamplesPerPixel", 1) != 1:
            raise SeriesLoadError(f"{path.name}: colour images are not supported")
        try:
            pixels = _native_pixels(path, ds)
            if pixels is None:
                pixels = decode_pixels(ds)
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            raise SeriesLoadError(f"{path.name}: cannot decode pixel data (transfer syntax {ts}): {exc}") from exc
        slope, intercept = rescale_of(ds)
        out = array[k]
        out[...] = pixels  # as pixels.astype(np.float32), then the rescale in float32
        out *= np.float32(slope)
        out += np.float32(intercept)

    if has_geometry:
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in ordered])
    else:
        positions = np.zeros((len(ordered), 3))
        positions[:, 2] = np.arange(len(ordered), dtype=float)
    spacing = first.get("PixelSpacing") or first.get("ImagerPixelSpacing") or [1.0, 1.0]
    return Volume(
        array=array,
        positions=positions,
        row_direction=row_dir,
        column_direction=col_dir,
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        datasets=[ds for _, ds in ordered],
        files=[p for p, _ in ordered],
    )


def load_series(paths: Iterable[Path]) -> Volume:
    """Read files of one series and build its Volume (non-DICOM and non-image files skipped)."""
    return volume_from_datasets(read_datasets(paths))


def group_by_series(paths: Iterable[Path]) -> dict[str, list[tuple[Path, Dataset]]]:
    """Read a folder's worth of files and group the image instances by SeriesInstanceUID."""
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    for path, ds in read_datasets(paths):
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            log.warning("skipping %s: no SeriesInstanceUID", path.name)
            continue
        groups.setdefault(uid, []).append((path, ds))
    return groups


def series_volumes(root: Path, modality: str, purpose: str = "evaluation") -> Iterator[tuple[str, Volume]]:
    """(Series Instance UID, Volume) of every ``modality`` series among the DICOM files under
    ``root`` (or the file ``root``): another site's export, any layout. Series of another
    modality, and series the loader refuses (multi-frame, mixed matrices, undecodable pixels),
    are logged with the reason, prefixed with ``purpose``, and skipped."""
    root = Path(root)
    if not root.exists():
        raise PacsNodeError(f"--data {root}: no such file or folder")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    for uid, items in group_by_series(files).items():
        found = str(items[0][1].get("Modality", "") or "")
        if found != modality:
            log.info("%s: skipping a %s series (%d instances): not %s", purpose, found or "no-modality",
                     len(items), modality)
            continue
        try:
            yield uid, volume_from_datasets(items)
        except SeriesLoadError as exc:
            log.warning("%s: skipping series %s: %s", purpose, uid, exc)
