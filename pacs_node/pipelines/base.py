"""The Pipeline interface: a named, versioned function from a Volume to outputs (no I/O)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

import numpy as np

from ..errors import UnsupportedInput
from ..volume import Volume


@dataclass(frozen=True)
class Requirements:
    """What a pipeline needs of its input series; checked before it runs."""

    modalities: tuple[str, ...] = ()
    min_slices: int = 1


@dataclass
class DerivedVolume:
    """An image series computed from the source, in the source's physical units.

    Geometry defaults to the source's. A pipeline that resamples sets ``positions``
    (z, 3 ImagePositionPatient), ``pixel_spacing`` (row, column mm) and, where slices
    change, ``slice_thickness`` and ``source_slices`` (for each output slice, the indices
    of the source slices it derives from).
    """

    array: np.ndarray
    description: str
    positions: np.ndarray | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None
    source_slices: list[list[int]] | None = None


@dataclass
class ScoreMap:
    """A per-voxel score in [0, 1] on the source grid (e.g. an anomaly map)."""

    array: np.ndarray
    description: str
    threshold: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


Output = DerivedVolume | ScoreMap


def device() -> str:
    """The torch device learned pipelines should use: $PACS_NODE_DEVICE (set by
    `pacs-node worker --device`), else cuda when present, else cpu."""
    import os

    chosen = os.environ.get("PACS_NODE_DEVICE")
    if chosen:
        return chosen
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


class Pipeline(ABC):
    """Subclasses set ``name``, ``version`` and ``requires`` and implement ``run``.

    ``run`` must not touch the network or the database: the encoder turns its outputs into
    DICOM and the sender ships them, so the same call serves ``pacs-node run`` and jobs.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    requires: ClassVar[Requirements] = Requirements()
    #: the encoder outputs used when a rule does not list ``outputs``
    default_outputs: ClassVar[tuple[str, ...]] = ("derived",)

    def check(self, volume: Volume) -> None:
        """Raise UnsupportedInput naming the unmet requirement."""
        req = self.requires
        if req.modalities and volume.modality not in req.modalities:
            raise UnsupportedInput(
                f"pipeline {self.name} needs modality {'/'.join(req.modalities)}, series is {volume.modality or 'unknown'}"
            )
        if volume.shape[0] < req.min_slices:
            raise UnsupportedInput(
                f"pipeline {self.name} needs at least {req.min_slices} slices, series has {volume.shape[0]}"
            )

    @abstractmethod
    def run(self, volume: Volume, params: Mapping[str, Any]) -> list[Output]:
        """Compute the outputs for one series."""
