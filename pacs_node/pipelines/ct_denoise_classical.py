"""Classical CT denoising: non-local means per slice, in HU, with a noise estimate per slice."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from skimage.restoration import denoise_nl_means, estimate_sigma

from ..volume import Volume
from .base import DerivedVolume, Output, Pipeline, Requirements


class CtDenoiseClassical(Pipeline):
    name = "ct-denoise-classical"
    version = "1.0.0"
    requires = Requirements(modalities=("CT",), min_slices=1)

    def run(self, volume: Volume, params: Mapping[str, Any]) -> list[Output]:
        # Filter strength h is a multiple of the estimated noise sigma (skimage's advice is
        # 0.6-1.0 with fast_mode); estimate on the soft-tissue range so bone and air edges
        # do not inflate it.
        strength = float(params.get("strength", 0.8))
        patch_size = int(params.get("patch_size", 5))
        patch_distance = int(params.get("patch_distance", 5))
        out = np.empty_like(volume.array)
        for z, plane in enumerate(volume.array):
            clipped = np.clip(plane, -200.0, 300.0)
            sigma = float(estimate_sigma(clipped))
            if sigma <= 0:
                out[z] = plane
                continue
            out[z] = denoise_nl_means(
                plane,
                h=strength * sigma,
                sigma=sigma,
                patch_size=patch_size,
                patch_distance=patch_distance,
                fast_mode=True,
            )
        return [DerivedVolume(array=out, description="NLM denoised")]
