"""Score map -> RGB Secondary Capture overlays: grey slice + heat map + colour bar + warning text.

Every viewer shows an RGB Secondary Capture, so this is the output that always works. One
image per source slice, each referencing its source image; the warning text is burned in
(Burned In Annotation YES), and so is the colour bar.
"""

from __future__ import annotations

import datetime as dt
import math
from functools import lru_cache

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from ..errors import EncodeError
from ..pipelines.base import ScoreMap
from ..volume import Volume
from . import EncodeContext, source_reference
from .parametric import (
    MANUFACTURER,
    checked_scores,
    copy_type2_study_attributes,
    derivation_text,
    sanitised_source,
    series_description,
    series_number,
)

WARNING_TEXT = "AI-generated anomaly map \u2014 not for diagnosis"
#: scores below this are not tinted; the tint reaches full opacity at OPACITY_FULL
TINT_FROM = 0.15
OPACITY_FULL = 0.5
MAX_OPACITY = 0.6
MIN_SIDE = 384  # small images are enlarged so that the text stays legible


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans (ships with matplotlib) has the em-dash; fall back to Pillow's own font."""
    try:
        from matplotlib import font_manager

        path = font_manager.findfont(font_manager.FontProperties(family="DejaVu Sans"), fallback_to_default=True)
        return ImageFont.truetype(path, size)
    except Exception:  # noqa: BLE001 - any font trouble: use the built-in font
        return ImageFont.load_default(size=size)


@lru_cache(maxsize=1)
def _colormap() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["turbo"](np.linspace(0, 1, 256))[:, :3] * 255).astype(np.uint8)


def _window(volume: Volume) -> tuple[float, float]:
    """Display range: the source's first window, else the 0.5-99.5th percentiles of the series."""
    ds = volume.datasets[0]
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, MultiValue) else center)
        w = float(width[0] if isinstance(width, MultiValue) else width)
        if w > 0:
            return c - w / 2, c + w / 2
    except (TypeError, ValueError, IndexError):
        pass
    sample = volume.array.reshape(-1)[:: max(1, volume.array.size // 1_000_000)]
    lo, hi = np.percentile(sample, [0.5, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def _orientation_letters(direction: np.ndarray) -> str:
    """Patient-orientation letters of a direction in LPS (dominant axis first, up to 2)."""
    letters = (("R", "L"), ("A", "P"), ("F", "H"))
    order = np.argsort(-np.abs(direction))
    out = ""
    for axis in order[:2]:
        if abs(direction[axis]) > 1e-3:
            out += letters[axis][int(direction[axis] > 0)]
    return out or "L"


def render_overlay(plane: np.ndarray, score: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """RGB uint8 image: windowed grey + heat map, a colour bar on the right, the warning below."""
    lo, hi = window
    grey = np.clip((plane - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat(grey[..., None] * 255.0, 3, axis=2)
    heat = _colormap()[np.clip((score * 255).astype(int), 0, 255)].astype(np.float32)
    alpha = MAX_OPACITY * np.clip((score - TINT_FROM) / (OPACITY_FULL - TINT_FROM), 0.0, 1.0)[..., None]
    rgb = rgb * (1.0 - alpha) + heat * alpha

    rows, cols = plane.shape
    factor = max(1, math.ceil(MIN_SIDE / max(rows, cols)))
    image = Image.fromarray(rgb.astype(np.uint8), "RGB")
    if factor > 1:
        image = image.resize((cols * factor, rows * factor), Image.Resampling.BILINEAR)
    w, h = image.size
    text_px = max(11, min(w, h) // 28)
    font = _font(text_px)
    bar_w = max(44, text_px * 4)
    band_h = int(text_px * 2.2)
    canvas = Image.new("RGB", (w + bar_w, h + band_h), (0, 0, 0))
    canvas.paste(image, (0, 0))
    draw = ImageDraw.Draw(canvas)

    # colour bar: 1 at the top, 0 at the bottom, with labels
    top, bottom = text_px, h - text_px
    x0, x1 = w + 6, w + 6 + max(10, bar_w // 4)
    cmap = _colormap()
    for y in range(top, bottom):
        value = 1.0 - (y - top) / max(1, bottom - top - 1)
        draw.line([(x0, y), (x1, y)], fill=tuple(int(v) for v in cmap[int(round(value * 255))]))
    draw.rectangle([x0, top, x1, bottom - 1], outline=(255, 255, 255))
    for value in (1.0, 0.5, 0.0):
        y = top + (1.0 - value) * (bottom - top - 1)
        draw.text((x1 + 3, y), f"{value:.1f}", fill=(255, 255, 255), font=font, anchor="lm")

    draw.text((6, h + band_h // 2), WARNING_TEXT, fill=(255, 255, 0), font=font, anchor="lm")
    return np.asarray(canvas, dtype=np.uint8)


def encode_secondary_capture(volume: Volume, output: ScoreMap, ctx: EncodeContext) -> list[Dataset]:
    """One RGB Secondary Capture per source slice (same study, new series)."""
    scores = checked_scores(volume, output, ctx)
    window = _window(volume)
    first = volume.datasets[0]
    source_series = str(first.SeriesInstanceUID)
    series_uid = ctx.uid(source_series, "series")
    number = series_number(volume, "secondary_capture")
    description = series_description(volume, ctx, "overlay")
    orientation = (_orientation_letters(volume.row_direction), _orientation_letters(volume.column_direction))
    now = dt.datetime.now()
    result: list[Dataset] = []
    for z, src in enumerate(volume.datasets):
        pixels = render_overlay(volume.array[z], scores[z], window)
        ref = sanitised_source(src)  # highdicom reads patient and study from it
        try:
            sc = hd.sc.SCImage.from_ref_dataset(
                ref_dataset=ref,
                pixel_array=pixels,
                photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
                bits_allocated=8,
                coordinate_system=hd.CoordinateSystemNames.PATIENT,
                series_instance_uid=series_uid,
                series_number=number,
                sop_instance_uid=ctx.uid(source_series, "instance", str(z)),
                instance_number=z + 1,
                manufacturer=MANUFACTURER,
                patient_orientation=(orientation[0][0], orientation[1][0]),  # highdicom takes one letter
                transfer_syntax_uid="1.2.840.10008.1.2.1",
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise EncodeError(f"pipeline {ctx.pipeline}: cannot build Secondary Capture {z + 1}: {exc}") from exc
        sc.SeriesDescription = description
        sc.PatientOrientation = list(orientation)
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.BurnedInAnnotation = "YES"
        sc.DerivationDescription = derivation_text(output, ctx)
        sc.SourceImageSequence = Sequence([source_reference(volume, z)])
        sc.ImageComments = WARNING_TEXT.replace("\u2014", "-")  # no character set declared: ASCII
        sc.ContentDate = now.strftime("%Y%m%d")
        sc.ContentTime = now.strftime("%H%M%S")
        copy_type2_study_attributes(sc, src)
        result.append(sc)
    return result
