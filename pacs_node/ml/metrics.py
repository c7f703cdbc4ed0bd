"""Image-quality metrics shared by the models' evaluations (numpy in, floats out).

Conventions (state them wherever numbers are reported):

- A *window* ``(lo, hi)`` clips both images to [lo, hi] before comparing; the data range
  is then ``hi - lo`` (explicit, never inferred from the images).
- PSNR = 10 log10(range^2 / MSE), the MSE taken over all voxels compared.
- SSIM: Wang et al. 2004 with a Gaussian window (sigma 1.5, 11 x 11: ``truncate=3.5``),
  K1 = 0.01, K2 = 0.03, population covariance, explicit data range; computed per 2-D slice and
  averaged over slices.
- RMSE is reported in the images' own units (HU for CT), unclipped unless a window is given.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy.ndimage import uniform_filter
from skimage.metrics import structural_similarity

Window = tuple[float, float]


def apply_window(x: np.ndarray, window: Window | None) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x if window is None else np.clip(x, window[0], window[1])


def _range(window: Window | None, data_range: float | None) -> float:
    if data_range is not None:
        return float(data_range)
    if window is None:
        raise ValueError("give a window or an explicit data_range")
    return float(window[1] - window[0])


def mse(ref: np.ndarray, x: np.ndarray, window: Window | None = None, mask: np.ndarray | None = None) -> float:
    d = apply_window(ref, window) - apply_window(x, window)
    if mask is not None:
        d = d[mask]
    return float(np.mean(d * d))


def rmse(ref: np.ndarray, x: np.ndarray, window: Window | None = None, mask: np.ndarray | None = None) -> float:
    return float(np.sqrt(mse(ref, x, window, mask)))


def psnr(
    ref: np.ndarray, x: np.ndarray, window: Window | None = None, data_range: float | None = None,
    mask: np.ndarray | None = None,
) -> float:
    m = mse(ref, x, window, mask)
    r = _range(window, data_range)
    return float("inf") if m == 0 else float(10.0 * np.log10(r * r / m))


def ssim2d(ref: np.ndarray, x: np.ndarray, data_range: float) -> float:
    return float(
        structural_similarity(
            np.asarray(ref, dtype=np.float64), np.asarray(x, dtype=np.float64),
            data_range=float(data_range), gaussian_weights=True, sigma=1.5, truncate=3.5,
            use_sample_covariance=False, K1=0.01, K2=0.03,
        )
    )


def ssim(ref: np.ndarray, x: np.ndarray, window: Window | None = None, data_range: float | None = None) -> float:
    """Mean SSIM over the 2-D slices of ``ref`` / ``x`` (a 2-D image counts as one slice)."""
    r = _range(window, data_range)
    a, b = apply_window(ref, window), apply_window(x, window)
    if a.ndim == 2:
        return ssim2d(a, b, r)
    return float(np.mean([ssim2d(a[i], b[i], r) for i in range(a.shape[0])]))


def flat_roi(ref: np.ndarray, size: int = 21, value_range: Window = (-50.0, 100.0)) -> tuple[int, int, int, int]:
    """The flattest ``size`` x ``size`` square of a 2-D reference image (y0, y1, x0, x1).

    Flattest = lowest local standard deviation among squares whose whole area lies within
    ``value_range`` (soft tissue for CT); falls back to the whole image's flattest square.
    """
    img = np.asarray(ref, dtype=np.float64)
    mean = uniform_filter(img, size)
    var = np.maximum(uniform_filter(img * img, size) - mean * mean, 0.0)
    inside = uniform_filter(((img >= value_range[0]) & (img <= value_range[1])).astype(np.float64), size) > 0.999
    h = size // 2
    valid = np.zeros_like(inside)
    valid[h:img.shape[0] - h, h:img.shape[1] - h] = True
    cand = inside & valid
    if not cand.any():
        cand = valid
    score = np.where(cand, var, np.inf)
    y, x = np.unravel_index(int(np.argmin(score)), score.shape)
    return (y - h, y + h + 1, x - h, x + h + 1)


def roi_std(x: np.ndarray, roi: Sequence[int]) -> float:
    y0, y1, x0, x1 = roi
    return float(np.std(np.asarray(x, dtype=np.float64)[..., y0:y1, x0:x1]))
