"""Score map -> DICOM Parametric Map (highdicom): the anomaly score volume, one frame per slice."""

from __future__ import annotations

import re

import numpy as np
import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .. import __version__
from ..errors import EncodeError
from ..pipelines.base import ScoreMap
from ..volume import Volume
from . import TYPE2_PATIENT_STUDY, EncodeContext, state_unknown_deidentification

MANUFACTURER = "pacs-node"
#: stored integers per unit of score: scores in [0, 1] are stored as 0..SCORE_STEPS
SCORE_STEPS = 1000
#: series numbers of AI outputs: source series number + this offset, per output kind
SERIES_OFFSET = {"derived": 1000, "secondary_capture": 2000, "parametric_map": 3000, "segmentation": 4000}


def checked_scores(volume: Volume, output: ScoreMap, ctx: EncodeContext) -> np.ndarray:
    """The score array as float32 (z, y, x) on the source grid, finite and within [0, 1]."""
    arr = np.asarray(output.array, dtype=np.float32)
    if arr.shape != volume.shape:
        raise EncodeError(f"pipeline {ctx.pipeline}: score map shape {arr.shape} differs from the series' {volume.shape}")
    if not np.all(np.isfinite(arr)):
        raise EncodeError(f"pipeline {ctx.pipeline}: score map contains NaN or infinite values")
    if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
        raise EncodeError(f"pipeline {ctx.pipeline}: score map values outside [0, 1] ({arr.min():.3g}..{arr.max():.3g})")
    return np.clip(arr, 0.0, 1.0)


def series_number(volume: Volume, kind: str) -> int:
    return int(volume.datasets[0].get("SeriesNumber") or 0) + SERIES_OFFSET[kind]


def series_description(volume: Volume, ctx: EncodeContext, what: str) -> str:
    source = str(volume.datasets[0].get("SeriesDescription", "") or "")
    return f"AI {ctx.pipeline} {what}: {source}".strip().rstrip(":")[:64]


def derivation_text(output: ScoreMap, ctx: EncodeContext) -> str:
    return (f"{output.description} by pacs-node {__version__} pipeline {ctx.pipeline} version {ctx.version}. "
            "AI-generated, not for primary diagnosis.")[:1024]


_AGE = re.compile(r"^\d{3}[DWMY]$")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")
_CHECKED = {"StudyDate": _DATE, "SeriesDate": _DATE, "ContentDate": _DATE, "PatientBirthDate": _DATE,
            "StudyTime": _TIME, "SeriesTime": _TIME, "ContentTime": _TIME}


def derived_object_arguments(volume: Volume, ctx: EncodeContext, kind: str, pixels: np.ndarray) -> dict:
    """Constructor arguments that every single-instance highdicom object we write shares
    (Parametric Map, SEG): pixels and their sources, deterministic UIDs, series number, device
    identity. ``pixels`` is (z, y, x) in the volume's slice order; for a series that is one
    multi-frame image, highdicom takes that image as the one source and the frames in its order."""
    source_series = str(volume.datasets[0].SeriesInstanceUID)
    if volume.frames:
        whole = volume.multiframe.get(str(volume.datasets[0].SOPInstanceUID))
        frames = int(whole.get("NumberOfFrames", 0) or 0) if whole is not None else 0
        if len(volume.multiframe) != 1 or 0 in volume.frames or frames != len(volume.frames):
            raise EncodeError(
                f"pipeline {ctx.pipeline}: a {kind.replace('_', ' ')} of a series made of several images of which "
                "some are multi-frame is not supported (one multi-frame image per series is)"
            )
        sources = [sanitised_source(whole)]
        pixels = pixels[np.argsort(volume.frames)]
    else:
        sources = [sanitised_source(ds) for ds in volume.datasets]
    return dict(
        pixel_array=pixels,
        source_images=sources,
        series_instance_uid=ctx.uid(source_series, "series"),
        series_number=series_number(volume, kind),
        sop_instance_uid=ctx.uid(source_series, "instance", "0"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=ctx.pipeline[:64],
        software_versions=f"{__version__} {ctx.pipeline} {ctx.version}"[:64],
        device_serial_number="none",
    )


def sanitised_source(src: Dataset) -> Dataset:
    """A copy of a source header that highdicom can read: malformed dates and times become empty.

    De-identification tools write values such as "***" into DA/TM attributes; copying them
    would make highdicom raise (and the output invalid). Only the copy changes; the elements
    are shared with the source, so replaced ones are deleted first, never edited in place.
    """
    clone = Dataset()
    for element in src:  # a new element dict: Dataset(src) and copy.copy share the source's
        clone.add(element)
    for keyword, pattern in _CHECKED.items():
        value = src.get(keyword)
        if value is not None and str(value) and not pattern.match(str(value).strip()):
            delattr(clone, keyword)
            setattr(clone, keyword, "")
    # Type 2 patient / study attributes a source may lack (ct/ge-head-tilt has no Patient's
    # Birth Date): highdicom copies them unconditionally, so they are added empty (unknown)
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in clone:
            setattr(clone, keyword, "")
    return clone


def copy_type2_study_attributes(target: Dataset, source: Dataset, laterality: bool = True) -> None:
    """Repairs so that an output is valid where its source header is not.

    Type 2 study attributes highdicom leaves out when the source lacks them are added (empty
    where unknown); a malformed Patient's Age (Type 3, e.g. "42" for "042Y") is dropped rather
    than copied; a missing Laterality (Type 2C, paired body parts) is added empty, i.e. unknown;
    an empty De-identification Method of a de-identified patient says that it is not stated.
    """
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in target:
            setattr(target, keyword, source.get(keyword, ""))
    age = target.get("PatientAge")
    if age is not None and not _AGE.match(str(age)):
        del target.PatientAge
    if laterality and "Laterality" not in target and "ImageLaterality" not in target:
        target.Laterality = ""
    state_unknown_deidentification(target)


def algorithm(ctx: EncodeContext) -> hd.AlgorithmIdentificationSequence:
    return hd.AlgorithmIdentificationSequence(name=ctx.pipeline, family=codes.cid7162.ArtificialIntelligence,
                                              version=ctx.version)


def encode_parametric_map(volume: Volume, output: ScoreMap, ctx: EncodeContext) -> list[Dataset]:
    """One multi-frame Parametric Map of the score, stored as integers 0..1000 with slope 1/1000."""
    scores = checked_scores(volume, output, ctx)
    stored = np.rint(scores * SCORE_STEPS).astype(np.uint16)
    mapping = hd.pm.RealWorldValueMapping(
        lut_label="ANOMALY",
        lut_explanation="Anomaly score (0 normal, 1 most abnormal)",
        unit=Code("1", "UCUM", "no units"),
        value_range=(0, SCORE_STEPS),
        slope=1.0 / SCORE_STEPS,
        intercept=0.0,
    )
    try:
        pm = hd.pm.ParametricMap(
            **derived_object_arguments(volume, ctx, "parametric_map", stored),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            window_center=SCORE_STEPS / 2,
            window_width=SCORE_STEPS,
            content_description="AI anomaly score, not for diagnosis",
            content_label="ANOMALY",
            derivation=None,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"pipeline {ctx.pipeline}: cannot build the Parametric Map: {exc}") from exc
    pm.SeriesDescription = series_description(volume, ctx, "anomaly score")
    pm.DerivationDescription = derivation_text(output, ctx)
    copy_type2_study_attributes(pm, volume.datasets[0])
    return [pm]
