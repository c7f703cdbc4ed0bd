"""Learned low-dose CT denoising (models/ct-denoise): residual U-Net, slice by slice.

The weights are loaded once, when the registry creates the pipeline. On CUDA the network runs
under bf16 autocast, on CPU in float32; slices go through in batches. The output is in HU on
the source grid; padding outside the scan field (below -1024 HU) is passed through unchanged,
and every slice is clipped to the HU range its source's stored values and slope/intercept can
represent, so the encoder's stored-value round trip is exact.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..ml.ct_denoise import MODEL_NAME, MODEL_VERSION, denoise_slices, load_model
from ..models_dir import model_path
from ..volume import Volume, rescale_of
from .base import DerivedVolume, Output, Pipeline, Requirements


def representable_hu(ds) -> tuple[float, float]:
    """HU range of a dataset's stored values (BitsStored, PixelRepresentation, rescale)."""
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    else:
        lo, hi = 0, (1 << bits) - 1
    slope, intercept = rescale_of(ds)
    a, b = lo * slope + intercept, hi * slope + intercept
    return (min(a, b), max(a, b))


class CtDenoise(Pipeline):
    name = MODEL_NAME
    version = MODEL_VERSION
    requires = Requirements(modalities=("CT",), min_slices=1)

    def __init__(self, weights: Path | None = None, device: str | None = None) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta = load_model(weights or model_path(MODEL_NAME))
        self.model.to(self.device)

    def run(self, volume: Volume, params: Mapping[str, Any]) -> list[Output]:
        self.check(volume)
        default_batch = 32 if self.device.type == "cuda" else 4
        batch = int(params.get("batch_size", default_batch))
        out = denoise_slices(self.model, volume.array, batch=batch, device=self.device)
        for z, ds in enumerate(volume.datasets[: out.shape[0]]):
            lo, hi = representable_hu(ds)
            np.clip(out[z], lo, hi, out=out[z])
        return [DerivedVolume(array=out, description=f"Low-dose CT denoised ({MODEL_NAME} {MODEL_VERSION})")]
