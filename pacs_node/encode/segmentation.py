"""Score map -> DICOM SEG (highdicom): the map thresholded at ``output.threshold``, one segment."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from ..errors import EncodeError
from ..pipelines.base import ScoreMap
from ..volume import Volume
from . import EncodeContext
from .parametric import (
    algorithm,
    checked_scores,
    copy_type2_study_attributes,
    derived_object_arguments,
    derivation_text,
    series_description,
)


def encode_segmentation(volume: Volume, output: ScoreMap, ctx: EncodeContext) -> list[Dataset]:
    """A binary SEG of ``score >= output.threshold`` (empty frames omitted; an empty map keeps one)."""
    scores = checked_scores(volume, output, ctx)
    if not 0.0 < float(output.threshold) <= 1.0:
        raise EncodeError(f"pipeline {ctx.pipeline}: segmentation threshold {output.threshold} is not in (0, 1]")
    mask = (scores >= float(output.threshold)).astype(np.uint8)
    source_series = str(volume.datasets[0].SeriesInstanceUID)
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=f"Anomaly score >= {float(output.threshold):g}"[:64],
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm(ctx),
        tracking_uid=ctx.uid(source_series, "segment", "1"),
        tracking_id="AI anomaly region",
    )
    try:
        seg = hd.seg.Segmentation(
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=[segment],
            **derived_object_arguments(volume, ctx, "segmentation", mask),
            content_description="AI anomaly region, not for diagnosis",
            content_label="ANOMALY",
            omit_empty_frames=True,
        )
    except (ValueError, TypeError, AttributeError) as exc:
        raise EncodeError(f"pipeline {ctx.pipeline}: cannot build the Segmentation: {exc}") from exc
    seg.SeriesDescription = series_description(volume, ctx, "anomaly SEG")
    seg.DerivationDescription = derivation_text(output, ctx)
    copy_type2_study_attributes(seg, volume.datasets[0], laterality=False)  # SEG: not allowed
    return [seg]
