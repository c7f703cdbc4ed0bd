"""Turn pipeline outputs into DICOM datasets (one writer per output kind).

Output kinds a rule can ask for (``outputs = [...]``):
  derived            DerivedVolume -> a new image series of the source's SOP class
  secondary_capture  ScoreMap -> RGB Secondary Capture overlays (every viewer shows these)
  parametric_map     ScoreMap -> DICOM Parametric Map (highdicom)
  segmentation       ScoreMap -> DICOM SEG of the thresholded map (highdicom)
Writers build valid objects or raise EncodeError; nothing half-written leaves here.
"""

from __future__ import annotations

import importlib
import uuid
from dataclasses import dataclass
from typing import Callable

from pydicom.dataset import Dataset

from ..errors import EncodeError
from ..pipelines.base import DerivedVolume, Output, ScoreMap
from ..volume import Volume

#: name-based (UUID version 5) namespace of pacs-node's derived UIDs
_UID_NAMESPACE = uuid.UUID("6f1c7d1e-2f8e-5b8a-9c33-2a1d5e0b7c41")


@dataclass(frozen=True)
class EncodeContext:
    pipeline: str
    version: str
    rule: str = ""
    params_key: str = ""

    def uid(self, *parts: str) -> str:
        """Deterministic UID from the context and ``parts`` (rerun replaces, never duplicates)."""
        # 2.25.<UUID as integer> (PS3.5 B.2), the UUID a hash of the inputs, so the same
        # (source series, pipeline, version, params, output) always yields the same UID
        name = "\x1f".join([self.pipeline, self.version, self.params_key, *parts])
        return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


Writer = Callable[[Volume, Output, EncodeContext], list[Dataset]]

_WRITERS: dict[str, tuple[type, str]] = {
    "derived": (DerivedVolume, "pacs_node.encode.derived:encode_derived"),
    "secondary_capture": (ScoreMap, "pacs_node.encode.overlay:encode_secondary_capture"),
    "parametric_map": (ScoreMap, "pacs_node.encode.parametric:encode_parametric_map"),
    "segmentation": (ScoreMap, "pacs_node.encode.segmentation:encode_segmentation"),
}

OUTPUT_KINDS = tuple(_WRITERS)


def _writer(kind: str) -> Writer:
    module_name, _, fn = _WRITERS[kind][1].partition(":")
    return getattr(importlib.import_module(module_name), fn)


def encode_outputs(volume: Volume, outputs: list[Output], kinds: tuple[str, ...], ctx: EncodeContext) -> list[Dataset]:
    """Encode each output with every requested writer that accepts its type."""
    unknown = [k for k in kinds if k not in _WRITERS]
    if unknown:
        raise EncodeError(f"unknown output kind {unknown[0]!r} (known: {', '.join(OUTPUT_KINDS)})")
    result: list[Dataset] = []
    for index, output in enumerate(outputs):
        matched = False
        for kind in kinds:
            accepted, _ = _WRITERS[kind]
            if isinstance(output, accepted):
                matched = True
                out_ctx = EncodeContext(ctx.pipeline, ctx.version, ctx.rule, f"{ctx.params_key}|{kind}|{index}")
                result.extend(_writer(kind)(volume, output, out_ctx))
        if not matched:
            raise EncodeError(
                f"pipeline {ctx.pipeline} produced a {type(output).__name__}, but none of the outputs "
                f"{list(kinds)} can encode it"
            )
    return result


#: Type 2 patient / study attributes: present in every output, empty when the source lacks them
TYPE2_PATIENT_STUDY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                       "ReferringPhysicianName", "StudyID", "AccessionNumber")


def state_unknown_deidentification(ds: Dataset) -> None:
    """De-identified sources often say PatientIdentityRemoved=YES but leave the Type 1C method
    empty; saying that the method is unknown is true and makes the output valid."""
    if str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and not ds.get("DeidentificationMethod") \
            and "DeidentificationMethodCodeSequence" not in ds:
        ds.DeidentificationMethod = "Not stated by the source"


def source_reference(volume: Volume, index: int) -> Dataset:
    """A Source Image Sequence item for slice ``index`` of the source: its instance, and its
    frame when the instance is multi-frame."""
    src = volume.datasets[index]
    item = Dataset()
    item.ReferencedSOPClassUID = src.SOPClassUID
    item.ReferencedSOPInstanceUID = src.SOPInstanceUID
    frame = volume.frame_number(index)
    if frame:
        item.ReferencedFrameNumber = frame
    return item
