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
from pydicom.tag import Tag
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
    #: per slice: 0 for a single-frame instance, else the frame number (1-based) within the
    #: multi-frame instance whose frame view ``datasets`` holds (see frame_views)
    frames: list[int] = field(default_factory=list, repr=False)
    #: the multi-frame images' headers (no pixel data), by SOP Instance UID: highdicom's
    #: Parametric Map and SEG refer to one multi-frame source as a whole
    multiframe: dict[str, Dataset] = field(default_factory=dict, repr=False)

    def frame_number(self, index: int) -> int:
        return self.frames[index] if self.frames else 0

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


def _sort_key(ds: Dataset, normal: np.ndarray | None, frame: int = 0) -> tuple[float, int, int]:
    number = int(ds.get("InstanceNumber", 0) or 0)
    ipp = ds.get("ImagePositionPatient")
    if normal is not None and ipp is not None and len(ipp) == 3:
        return (float(np.dot(np.asarray(ipp, dtype=float), normal)), number, frame)
    return (float(number), number, frame)


#: multi-frame attributes that do not describe one frame (dropped from frame views)
_MULTIFRAME_ONLY = frozenset(
    Tag(k) for k in ("PixelData", "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
                     "DimensionIndexSequence", "DimensionOrganizationSequence", "DimensionOrganizationType",
                     "FrameIncrementPointer", "ReferencedImageEvidenceSequence", "SourceImageEvidenceSequence",
                     "ContentQualification", "ConcatenationUID", "InConcatenationNumber",
                     "InConcatenationTotalNumber", "ConcatenationFrameOffsetNumber")
)
#: functional groups that say where a frame came from or how it is indexed, not what it is
#: (a Derivation Image item describes the scanner's derivation, not a result's)
_FRAME_BOOKKEEPING = frozenset(Tag(k) for k in ("FrameContentSequence", "ConversionSourceAttributesSequence",
                                                "DerivationImageSequence"))
#: functional groups whose sequence is itself the attribute, as in a single-frame image (the
#: others are macros: their one item's attributes are the frame's)
_AS_SEQUENCE = frozenset(Tag(k) for k in ("ReferencedImageSequence", "RealWorldValueMappingSequence",
                                          "ContrastBolusUsageSequence", "MRVelocityEncodingSequence",
                                          "MRSpatialSaturationSequence"))


def _group_kind(group: DataElement | RawDataElement) -> str:
    """How frame_views treats an element of a functional groups item: "macro" (its one item's
    attributes are the frame's), "sequence" (kept as it is) or "skip" (private, bookkeeping,
    empty, not a sequence)."""
    if group.tag.is_private or group.tag in _FRAME_BOOKKEEPING or element_vr(group) != "SQ" or not group.value:
        return "skip"
    return "sequence" if group.tag in _AS_SEQUENCE or len(group.value) != 1 else "macro"


def _shallow_copy(ds: Dataset, skip: frozenset | tuple = ()) -> Dataset:
    """A new data set sharing ``ds``'s elements (raw ones stay unread), without ``skip``, with
    its encoding and file meta."""
    copy = Dataset()
    copy.set_original_encoding(*ds.original_encoding, ds.original_character_set)
    for tag in ds.keys():
        if tag not in skip:
            copy[tag] = ds.get_item(tag)
    if getattr(ds, "file_meta", None) is not None:
        copy.file_meta = ds.file_meta
    return copy


def frame_views(path: Path, ds: Dataset, only: int | None = None) -> list[Dataset]:
    """One data set per frame of a multi-frame image (Enhanced or Legacy Converted Enhanced MR,
    CT, PET, ...), shaped like a single-frame image's header: the image's own attributes, then
    those of its shared and per-frame functional groups (Image Position / Orientation, Pixel
    Spacing, Slice Thickness, rescale, window, timing, ...) moved to the top level, a frame's
    own values winning (a group that is an attribute in its own right, e.g. Referenced Image
    or Real World Value Mapping, stays a sequence). SOP Class and Instance UIDs stay the
    multi-frame image's: a result refers to the instance and the frame (Volume.frames).
    Elements are shared, not copied. ``only``: just the view of this frame (0-based).
    A multi-frame image without per-frame functional groups has no per-frame position: refused."""
    count = int(ds.get("NumberOfFrames", 1) or 1)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != count:
        raise SeriesLoadError(
            f"{path.name}: a {count}-frame image without per-frame functional groups (no position per frame): "
            "only Enhanced / Legacy Converted Enhanced multi-frame images are supported"
        )
    base = _shallow_copy(ds, _MULTIFRAME_ONLY)
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    views = []
    for frame in per_frame if only is None else [per_frame[only]]:
        view = _shallow_copy(base)
        for groups in (shared[0], frame):  # a frame's own groups override the shared ones
            for group in groups:
                kind = _group_kind(group)
                if kind == "sequence":
                    view[group.tag] = group
                elif kind == "macro":
                    for tag in group.value[0].keys():
                        if not tag.is_private:
                            view[tag] = group.value[0].get_item(tag)
        views.append(view)
    return views


def frame_attribute(ds: Dataset, keyword: str) -> object | None:
    """The value of ``keyword`` for the first frame of a multi-frame image, from its per-frame
    functional groups, else its shared ones (None when neither has it): what frame_views puts
    at the top level, without building the views (routing asks this of a series' first image)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [Dataset()]
    shared = ds.get("SharedFunctionalGroupsSequence") or [Dataset()]
    for groups in (per_frame[0], shared[0]):
        for group in groups:
            if _group_kind(group) == "macro" and keyword in group.value[0]:
                return group.value[0].get(keyword)
    return None


def _orientation(ds: Dataset) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    return np.asarray(iop, dtype=float) if iop is not None and len(iop) == 6 else None


def volume_from_datasets(items: Sequence[tuple[Path, Dataset]]) -> Volume:
    """Build a Volume from already-read datasets of one series (any order). A multi-frame
    image contributes one slice per frame (frame_views)."""
    if not items:
        raise SeriesLoadError("no image instances in series")
    # (path, header, frame number or 0, the multi-frame data set whose pixels it is)
    slices: list[tuple[Path, Dataset, int, Dataset | None]] = []
    seen: dict[str, tuple[Path, tuple]] = {}
    for path, ds in items:
        uid = str(ds.get("SOPInstanceUID", "") or "")
        what = (tuple(ds.get("ImagePositionPatient") or ()), int(ds.get("NumberOfFrames", 1) or 1))
        if uid and uid in seen:
            if seen[uid][1] != what:  # not a copy: one UID on two different images
                raise SeriesLoadError(
                    f"{path.name} and {seen[uid][0].name} carry one SOP Instance UID but are different images "
                    "(position or frame count): the series cannot be put together"
                )
            log.info("skipping %s: the same instance as %s", path.name, seen[uid][0].name)  # an export with copies
            continue
        seen[uid] = (path, what)
        if int(ds.get("NumberOfFrames", 1) or 1) == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
            slices.append((path, ds, 0, None))
            continue
        views = frame_views(path, ds)
        slices.extend((path, view, k + 1, ds) for k, view in enumerate(views))
    first = slices[0][1]
    iop = _orientation(first)
    if iop is not None:
        row_dir, col_dir = iop[:3], iop[3:]
    else:
        row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_dir, col_dir)
    has_geometry = iop is not None and all("ImagePositionPatient" in ds for _, ds, _, _ in slices)
    if has_geometry:
        for path, ds, frame, _ in slices:
            other = _orientation(ds)
            if other is None or np.abs(other - iop).max() > 1e-3:
                where = f"{path.name} frame {frame}" if frame else path.name
                raise SeriesLoadError(
                    f"{where}: image orientation differs from the series' first image (a localiser or several "
                    "stacks in one series): not supported"
                )
    ordered = sorted(slices, key=lambda it: _sort_key(it[1], normal if has_geometry else None, it[2]))
    if has_geometry and len(ordered) > 1:
        # two images at one place are not two slices: several echoes, phases, b-values or
        # contrasts in one series (single-frame, or the frames of an Enhanced image)
        along = np.array([float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=float), normal))
                          for _, ds, _, _ in ordered])
        repeated = np.flatnonzero(np.diff(along) < 1e-3)
        if repeated.size:
            path, _, frame, _ = ordered[int(repeated[0]) + 1]
            where = f"{path.name} frame {frame}" if frame else path.name
            raise SeriesLoadError(
                f"{where}: {repeated.size} of {len(ordered)} images share a position with another image of the series "
                "(several echoes, phases, b-values or contrasts in one series): not supported; send one stack per series"
            )

    shape = (int(first.Rows), int(first.Columns))
    # one float32 volume written in place: no per-slice temporaries to stack, and no decoded
    # array cached on each dataset (pydicom's ds.pixel_array keeps one, which the encoder
    # would then copy along with the header)
    array = np.empty((len(ordered), *shape), dtype=np.float32)
    decoded: dict[int, np.ndarray] = {}  # multi-frame pixel data, decoded once per image
    for k, (path, ds, frame, whole) in enumerate(ordered):
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise SeriesLoadError(
                f"{path.name}: matrix {ds.Rows}x{ds.Columns} differs from the series' {shape[0]}x{shape[1]}"
            )
        if ds.get("SamplesPerPixel", 1) != 1:
            raise SeriesLoadError(f"{path.name}: colour images are not supported")
        try:
            if whole is None:
                pixels = _native_pixels(path, ds)
                if pixels is None:
                    pixels = decode_pixels(ds)
            else:
                if id(whole) not in decoded:
                    decoded[id(whole)] = decode_pixels(whole).reshape(-1, *shape)
                pixels = decoded[id(whole)][frame - 1]
        except Exception as exc:  # noqa: BLE001 - decoder errors come in many types
            ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
            raise SeriesLoadError(f"{path.name}: cannot decode pixel data (transfer syntax {ts}): {exc}") from exc
        slope, intercept = rescale_of(ds)
        out = array[k]
        out[...] = pixels  # as pixels.astype(np.float32), then the rescale in float32
        out *= np.float32(slope)
        out += np.float32(intercept)

    if has_geometry:
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds, _, _ in ordered])
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
        datasets=[ds for _, ds, _, _ in ordered],
        files=[p for p, _, _, _ in ordered],
        frames=[frame for _, _, frame, _ in ordered] if any(f for _, _, f, _ in ordered) else [],
        multiframe={str(whole.get("SOPInstanceUID", "")): _shallow_copy(whole, (PIXEL_DATA,))
                    for whole in {id(w): w for _, _, _, w in ordered if w is not None}.values()},
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
    modality, and series the loader refuses (several stacks, mixed matrices, undecodable pixels),
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
