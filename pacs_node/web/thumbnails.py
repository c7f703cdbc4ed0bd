"""Before/after thumbnails: the middle source slice and the result made from it, one window for both.

Using the source's window for the result too makes a change in noise or contrast visible;
each image scaled to its own range would hide it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut

from ..errors import SeriesLoadError
from ..volume import frame_views

SIZE = 256


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    def apply(self, values: np.ndarray) -> np.ndarray:
        low = self.center - self.width / 2
        return (np.clip((values - low) / max(self.width, 1e-6), 0, 1) * 255).astype(np.uint8)


def _first(value) -> float | None:  # type: ignore[no-untyped-def]
    if value is None:
        return None
    try:
        return float(value[0] if isinstance(value, pydicom.multival.MultiValue) else value)
    except (TypeError, ValueError, IndexError):
        return None


def _middle_frame(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The header of the frame _plane shows: of an Enhanced multi-frame image, its middle
    frame's view (rescale and window live in its functional groups), else ``ds`` itself."""
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and "PerFrameFunctionalGroupsSequence" in ds:
        try:
            return frame_views(Path("image"), ds, only=frames // 2)[0]
        except SeriesLoadError:
            pass
    return ds


def _plane(ds: pydicom.Dataset) -> np.ndarray:
    """The middle frame in modality units (HU for CT); RGB kept as it is."""
    pixels = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        pixels = pixels[frames // 2]
    if ds.get("PhotometricInterpretation", "") == "RGB" or pixels.ndim == 3:
        return pixels
    return apply_modality_lut(pixels, _middle_frame(ds)).astype(np.float32)


def window_of(ds: pydicom.Dataset, values: np.ndarray) -> Window:
    center, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
    if center is not None and width and width > 1:
        return Window(center, width)
    low, high = np.percentile(values, [1, 99])
    return Window(float(low + high) / 2, float(max(high - low, 1.0)))


def middle_source(paths: list[Path]) -> Path:
    """The middle slice along the stack (InstanceNumber order)."""
    def number(path: Path) -> tuple[int, str]:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["InstanceNumber"])
        return int(ds.get("InstanceNumber", 0) or 0), path.name

    ordered = sorted(paths, key=number)
    return ordered[len(ordered) // 2]


def result_for(source: pydicom.Dataset, result_files: list[Path]) -> Path | None:
    """The result image derived from ``source`` (same SOP class first; of a multi-frame source,
    from its middle frame, the one _plane shows), else the middle result."""
    if not result_files:
        return None
    frames = int(source.get("NumberOfFrames", 1) or 1)
    frame = frames // 2 + 1 if frames > 1 else None
    headers = [(path, pydicom.dcmread(path, stop_before_pixels=True)) for path in sorted(result_files)]
    # a derived series keeps the source's SOP class; SEG or SC outputs reference every source
    headers.sort(key=lambda item: str(item[1].get("SOPClassUID", "")) != str(source.SOPClassUID))
    for path, ds in headers:
        for item in ds.get("SourceImageSequence", []) or []:
            if str(item.get("ReferencedSOPInstanceUID", "")) == str(source.SOPInstanceUID) and \
                    (frame is None or int(item.get("ReferencedFrameNumber", 0) or 0) == frame):
                return path
    return headers[len(headers) // 2][0]


def _png(array: np.ndarray) -> bytes:
    image = Image.fromarray(array)
    image.thumbnail((SIZE, SIZE), Image.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def before_after(source_paths: list[Path], result_files: list[Path]) -> tuple[bytes, bytes | None]:
    """PNG of the middle source slice and of its result, both in the source's window."""
    source_path = middle_source(source_paths)
    source = pydicom.dcmread(source_path)
    before = _plane(source)
    window = window_of(_middle_frame(source), before) if before.ndim == 2 else None
    before_png = _png(window.apply(before) if window else before.astype(np.uint8))
    result_path = result_for(source, result_files)
    if result_path is None:
        return before_png, None
    result = pydicom.dcmread(result_path)
    after = _plane(result)
    if after.ndim == 2:
        after_png = _png((window or window_of(_middle_frame(result), after)).apply(after))
    else:
        after_png = _png(after.astype(np.uint8))
    return before_png, after_png
