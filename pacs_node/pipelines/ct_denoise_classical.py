"""Classical CT denoising: non-local means per slice, in HU, with a noise estimate per slice."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
from skimage.restoration import denoise_nl_means, estimate_sigma

from ..volume import Volume
from .base import DerivedVolume, Output, Pipeline, Requirements


def noise_sigma(plane: np.ndarray) -> float:
    """Noise std in HU from horizontal neighbour differences inside soft tissue.

    A wavelet estimate over the whole slice is dominated by air and bone plateaus (and is ~0
    after clipping), so use a robust (MAD) estimate on pixel pairs that both lie in
    [-100, 200] HU; fall back to skimage's estimate when a slice has too little tissue.
    """
    left, right = plane[:, :-1], plane[:, 1:]
    inside = (left > -100) & (left < 200) & (right > -100) & (right < 200)
    diffs = (right - left)[inside]
    if diffs.size < 1000:
        return float(estimate_sigma(plane))
    mad = float(np.median(np.abs(diffs - np.median(diffs))))
    return 1.4826 * mad / np.sqrt(2.0)


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
            sigma = noise_sigma(plane)
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
