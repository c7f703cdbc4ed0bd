"""Derived image series: same study, same SOP class, new UIDs, pixels from a pipeline.

A frame of an Enhanced (or Legacy Converted Enhanced) multi-frame MR or CT source gives a
single-frame image of the same modality's classic SOP class (MR, CT Image Storage), with the frame's
functional-group attributes at the top level (volume.frame_views) and the classic module's
required attributes that only the enhanced encoding names differently filled in from it."""

from __future__ import annotations

import copy
import datetime as dt

import numpy as np
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from .. import __version__
from ..errors import EncodeError
from ..pipelines.base import DerivedVolume
from ..volume import PIXEL_DATA, Volume, element_vr, rescale_of
from . import TYPE2_PATIENT_STUDY, EncodeContext, source_reference, state_unknown_deidentification

# Attributes that describe the source pixels or the source file rather than the new image.
_DROP = (
    "IconImageSequence",
    "LargestImagePixelValue",
    "SmallestImagePixelValue",
    "PixelDataProviderURL",
    "DataSetTrailingPadding",
    "PixelPaddingRangeLimit",
)


def _copy_header(src: Dataset) -> Dataset:
    """A new data set with the source's public elements but its pixel data (set_pixel_data
    puts the new pixels in), private ones dropped in nested sequences too. Elements still raw
    (read, never looked at) are immutable and shared with the source; converted ones are
    deep-copied, because the result's are changed in place. A deepcopy of the whole source
    and pydicom's remove_private_tags (which converts every element) took half the encoding
    time of a CT slice."""
    ds = Dataset()
    ds.set_original_encoding(*src.original_encoding, src.original_character_set)
    for tag in src.keys():
        if tag == PIXEL_DATA or tag.is_private:
            continue
        elem = src.get_item(tag)
        ds[tag] = elem if isinstance(elem, RawDataElement) else copy.deepcopy(elem)
        if element_vr(elem) == "SQ":  # the result's own items (a raw one is converted in ds)
            for item in ds[tag].value or ():
                _drop_private(item)
    return ds


def _drop_private(ds: Dataset) -> None:
    """Remove private elements here and in nested sequences, as Dataset.remove_private_tags
    does, without converting every element on the way: only sequences are opened."""
    for tag in list(ds.keys()):
        if tag.is_private:
            del ds[tag]
        elif element_vr(ds.get_item(tag)) == "SQ":
            for item in ds[tag].value or ():
                _drop_private(item)


MR_IMAGE, CT_IMAGE = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.2"
#: Enhanced / Legacy Converted Enhanced image storage -> the classic single-frame class (not
#: PET: its classic image needs attributes, Units, Decay Correction ..., not mapped here)
SINGLE_FRAME_CLASS = {
    "1.2.840.10008.5.1.4.1.1.4.1": MR_IMAGE,  # Enhanced MR
    "1.2.840.10008.5.1.4.1.1.4.4": MR_IMAGE,  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.2.1": CT_IMAGE,  # Enhanced CT
    "1.2.840.10008.5.1.4.1.1.2.2": CT_IMAGE,  # Legacy Converted Enhanced CT
}
#: CT Exposure functional group (Enhanced CT) -> the CT Image module's integer attributes
_CT_EXPOSURE = (("ExposureTimeInms", "ExposureTime"), ("XRayTubeCurrentInmA", "XRayTubeCurrent"),
                ("ExposureInmAs", "Exposure"))
#: attributes of the enhanced encoding with no place in a classic image (frame views carry them)
_ENHANCED_ONLY = (
    "FrameType", "PixelPresentation", "VolumetricProperties", "VolumeBasedCalculationTechnique",
    "FrameAcquisitionDateTime", "FrameReferenceDateTime", "FrameAcquisitionDuration", "StackID",
    "InStackPositionNumber", "DimensionIndexValues", "FrameComments", "FrameLaterality",
    "AnatomicRegionSequence", "ContentQualification", "ReferencedRawDataSequence",
    "ReferencedWaveformSequence", "ReferencedPresentationStateSequence",
)


def _text(ds: Dataset, keyword: str, default: str) -> str:
    return str(ds.get(keyword, default) or default).upper()


def _values(value: object) -> list:
    """A (possibly multi-valued) attribute's values as a list: [] when absent or empty."""
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _classic_mr(ds: Dataset) -> None:
    """MR Image module attributes from their Enhanced MR equivalents, where the source has none
    (after dcm4che's emf2sf, extended to Scan Options, Inversion and Trigger Time)."""
    if "ScanningSequence" not in ds:
        # RM (research mode) only where the source does not say which echo it used
        scanning = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(
            _text(ds, "EchoPulseSequence", ""), ["RM"])
        if _text(ds, "InversionRecovery", "NO") == "YES":
            scanning.append("IR")
        if _text(ds, "EchoPlanarPulseSequence", "NO") == "YES":
            scanning.append("EP")
        ds.ScanningSequence = scanning
    if "SequenceVariant" not in ds:
        variant = []
        if _text(ds, "SegmentedKSpaceTraversal", "SINGLE") != "SINGLE":
            variant.append("SK")
        if _text(ds, "MagnetizationTransfer", "NONE") != "NONE":
            variant.append("MTC")
        steady = _text(ds, "SteadyStatePulseSequence", "NONE")
        if steady != "NONE":
            variant.append("TRSS" if steady == "TIME_REVERSED" else "SS")
        if _text(ds, "Spoiling", "NONE") != "NONE":
            variant.append("SP")
        if _text(ds, "OversamplingPhase", "NONE") != "NONE":
            variant.append("OSP")
        ds.SequenceVariant = variant or ["NONE"]
    if "ScanOptions" not in ds:
        options = []
        partial = _text(ds, "PartialFourierDirection", "PHASE") if _text(ds, "PartialFourier", "NO") == "YES" else ""
        if partial:
            options.append("PFF" if partial == "FREQUENCY" else "PFP")
        if _text(ds, "SpectrallySelectedSuppression", "NONE") in ("FAT", "FAT_AND_WATER"):
            options.append("FS")
        if _text(ds, "FlowCompensation", "NONE") != "NONE":
            options.append("FC")
        if _text(ds, "SpatialPresaturation", "NONE") != "NONE":
            options.append("SP")
        if _text(ds, "CardiacSynchronizationTechnique", "NONE") != "NONE":
            options.append("CG")
        respiratory = _text(ds, "RespiratoryMotionCompensationTechnique", "NONE")
        if respiratory == "GATING":
            options.append("RG")
        elif respiratory == "PHASE_ORDERING":
            options.append("PER")
        ds.ScanOptions = options or None
    if "CG" in _values(ds.ScanOptions) and "TriggerTime" not in ds:  # Type 2C: cardiac gated images
        ds.TriggerTime = ds.get("NominalCardiacTriggerDelayTime")
    if "EchoTime" not in ds:
        ds.EchoTime = ds.get("EffectiveEchoTime")
    if "IR" in _values(ds.ScanningSequence) and "InversionTime" not in ds:  # Type 2C: with IR
        times = _values(ds.get("InversionTimes"))  # MR Modifier functional group
        ds.InversionTime = times[0] if times else None
    for keyword in ("MRAcquisitionType", "EchoTrainLength", "RepetitionTime"):
        if keyword not in ds:
            setattr(ds, keyword, None)


def _to_single_frame(ds: Dataset, ctx: EncodeContext) -> None:
    """Make a header copied from a frame view a classic single-frame image of its modality."""
    enhanced = str(ds.SOPClassUID)
    if enhanced not in SINGLE_FRAME_CLASS:
        raise EncodeError(
            f"pipeline {ctx.pipeline}: a derived series of a multi-frame {ds.SOPClassUID.name} source is not "
            "supported (Enhanced / Legacy Converted Enhanced MR and CT are)"
        )
    ds.SOPClassUID = SINGLE_FRAME_CLASS[enhanced]
    if "Laterality" not in ds:  # Type 2C; the enhanced encoding has it per frame (Frame Laterality)
        ds.Laterality = ""
    image_type = _values(ds.get("FrameType"))
    if image_type:  # the frame's own type: the image's may say MIXED
        if ds.SOPClassUID == CT_IMAGE and len(image_type) > 2 and image_type[2] != "LOCALIZER":
            image_type[2] = "AXIAL"  # Enhanced CT says VOLUME; the CT Image module knows AXIAL / LOCALIZER
        ds.ImageType = image_type
    for keyword in _ENHANCED_ONLY:
        if keyword in ds:
            delattr(ds, keyword)
    if ds.SOPClassUID == MR_IMAGE:
        _classic_mr(ds)
    if ds.SOPClassUID == CT_IMAGE:
        for enhanced_keyword, keyword in _CT_EXPOSURE:
            value = ds.get(enhanced_keyword)
            if enhanced_keyword in ds:
                delattr(ds, enhanced_keyword)
            if keyword not in ds and value is not None and str(value) != "":
                setattr(ds, keyword, int(round(float(value))))
                if keyword == "Exposure" and "ExposureInuAs" not in ds:  # whole mAs loses low doses
                    ds.ExposureInuAs = int(round(float(value) * 1000))
        for keyword in ("AcquisitionNumber", "KVP"):
            if keyword not in ds:
                setattr(ds, keyword, None)


def _stored_range(ds: Dataset) -> tuple[int, int]:
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _fix_known_errors(ds: Dataset) -> None:
    """Repair common scanner header errors where the fix is safe (see docs: 'header repairs')."""
    # Type 2 attributes of Patient/Study/Series modules that must be present (may be empty).
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in ds:
            setattr(ds, keyword, "")
    state_unknown_deidentification(ds)
    # An empty SeriesNumber / InstanceNumber (Type 2) is legal, a missing one is not.
    for keyword in ("SeriesNumber", "InstanceNumber"):
        if keyword not in ds:
            setattr(ds, keyword, None)


def encode_derived(volume: Volume, output: DerivedVolume, ctx: EncodeContext) -> list[Dataset]:
    """One dataset per output slice, copied from its source slice, with the new pixels."""
    arr = np.asarray(output.array, dtype=np.float32)
    if arr.ndim != 3:
        raise EncodeError(f"pipeline {ctx.pipeline}: derived array must be (z, y, x), got shape {arr.shape}")
    n_out = arr.shape[0]
    mapping = output.source_slices or ([[i] for i in range(n_out)] if n_out == len(volume.datasets) else None)
    if mapping is None or len(mapping) != n_out:
        raise EncodeError(
            f"pipeline {ctx.pipeline}: {n_out} output slices for {len(volume.datasets)} source slices "
            "and no source_slices mapping"
        )
    if not np.all(np.isfinite(arr)):
        raise EncodeError(f"pipeline {ctx.pipeline}: output contains NaN or infinite values")

    first_src = volume.datasets[0]
    source_series = str(first_src.SeriesInstanceUID)
    series_uid = ctx.uid(source_series, "series")
    now = dt.datetime.now()
    series_number = int(first_src.get("SeriesNumber") or 0) + 1000
    description = f"AI {ctx.pipeline}: {first_src.get('SeriesDescription', '') or ''}".strip()[:64]

    new_step = None
    if output.positions is not None and len(output.positions) > 1:
        # resampled along the normal: the header's slice step must follow the new positions
        new_step = float(np.median(np.abs(np.diff(np.asarray(output.positions) @ volume.normal))))

    result: list[Dataset] = []
    for z in range(n_out):
        src = volume.datasets[mapping[z][0]]
        ds = _copy_header(src)
        if volume.frame_number(mapping[z][0]):
            _to_single_frame(ds, ctx)
        for keyword in _DROP:
            if keyword in ds:
                delattr(ds, keyword)
        for tag in [t for t in ds.keys() if 0x6000 <= t.group <= 0x60FF and t.group % 2 == 0]:
            del ds[tag]  # overlays drawn on the source pixels

        slope, intercept = rescale_of(src)
        lo, hi = _stored_range(src)
        stored = arr[z] - np.float32(intercept)  # one temporary, then in place
        stored /= np.float32(slope)
        np.rint(stored, out=stored)
        np.clip(stored, lo, hi, out=stored)
        dtype = np.int16 if lo < 0 else np.uint16
        if int(src.get("BitsAllocated", 16)) > 16:
            dtype = np.int32 if lo < 0 else np.uint32
        ds.set_pixel_data(
            stored.astype(dtype),
            photometric_interpretation=str(src.get("PhotometricInterpretation", "MONOCHROME2")),
            bits_stored=int(src.get("BitsStored", 16) or 16),
            generate_instance_uid=False,
        )
        if "RescaleSlope" in src or "RescaleIntercept" in src:
            ds.RescaleSlope = src.get("RescaleSlope", 1)
            ds.RescaleIntercept = src.get("RescaleIntercept", 0)

        sop_uid = ctx.uid(source_series, "instance", str(z))
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.InstanceNumber = z + 1
        ds.SeriesDescription = description
        image_type = _values(ds.get("ImageType"))  # the source's (a frame's: its Frame Type)
        ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]] if len(image_type) > 2 else ["DERIVED", "SECONDARY"]
        ds.DerivationDescription = (
            f"{output.description} by pacs-node {__version__} pipeline {ctx.pipeline} "
            f"version {ctx.version}. AI-generated, not for primary diagnosis."
        )[:1024]
        ds.SourceImageSequence = Sequence([source_reference(volume, i) for i in mapping[z]])
        ds.InstanceCreationDate = now.strftime("%Y%m%d")
        ds.InstanceCreationTime = now.strftime("%H%M%S")
        ds.ContentDate = ds.InstanceCreationDate
        ds.ContentTime = ds.InstanceCreationTime
        if output.positions is not None:
            ds.ImagePositionPatient = [round(float(v), 6) for v in output.positions[z]]
            if "SliceLocation" in ds:
                normal = volume.normal
                ds.SliceLocation = round(float(np.dot(output.positions[z], normal)), 6)
        if output.pixel_spacing is not None:
            ds.PixelSpacing = [round(float(v), 8) for v in output.pixel_spacing]
        if output.slice_thickness is not None:
            ds.SliceThickness = round(float(output.slice_thickness), 6)
        if new_step is not None and "SpacingBetweenSlices" in ds:
            ds.SpacingBetweenSlices = round(new_step, 6)
        _fix_known_errors(ds)

        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        result.append(ds)
    return result

