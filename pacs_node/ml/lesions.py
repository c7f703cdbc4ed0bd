"""Synthetic lesions for evaluating anomaly maps: irregular blobs, hyper- or hypo-intense, textured.

Lesions are drawn on normalised slices (tissue around 0.3-1.0) and return a ground-truth mask.
They are for evaluation only: the anomaly model never sees them in training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class LesionSpec:
    """Ranges lesions are drawn from (radii in canvas pixels)."""

    radius: tuple[float, float] = (2.5, 10.0)
    elongation: tuple[float, float] = (0.6, 1.0)
    hyper_factor: tuple[float, float] = (1.35, 1.9)  # lesion / local tissue intensity
    hypo_factor: tuple[float, float] = (0.15, 0.6)
    opacity: tuple[float, float] = (0.75, 1.0)
    texture: tuple[float, float] = (0.0, 0.2)  # relative std of the lesion's own texture
    margin_px: int = 8  # distance from the edge of the foreground


@dataclass(frozen=True)
class Lesion:
    centre: tuple[int, int]
    radius: float
    hyper: bool
    factor: float


def _blob(shape: tuple[int, int], centre: tuple[int, int], radius: float, elong: float, angle: float,
          rng: np.random.Generator) -> np.ndarray:
    """Soft mask (0..1) of an ellipse whose boundary is perturbed by smooth noise."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    dy, dx = yy - centre[0], xx - centre[1]
    ca, sa = np.cos(angle), np.sin(angle)
    u = (ca * dx + sa * dy) / radius
    v = (-sa * dx + ca * dy) / (radius * elong)
    r = np.sqrt(u ** 2 + v ** 2)
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=max(1.0, radius / 2))
    wobble /= wobble.std() + 1e-6
    r = r * (1.0 + 0.18 * wobble)
    hard = (r < 1.0).astype(np.float32)
    return ndimage.gaussian_filter(hard, sigma=0.8)


def insert_lesions(image: np.ndarray, foreground: np.ndarray, rng: np.random.Generator, count: int = 1,
                   spec: LesionSpec = LesionSpec(), record: list | None = None
                   ) -> tuple[np.ndarray, np.ndarray, list[Lesion]]:
    """Add ``count`` lesions inside ``foreground`` (eroded by the margin).

    Returns the new image, the truth mask (bool, soft mask > 0.5) and what was drawn. ``record``
    (a list) receives each lesion's blend, (alpha, target map, target level, texture amplitude,
    texture), so that a caller can draw the same lesion into neighbouring slices.
    """
    out = image.astype(np.float32, copy=True)
    truth = np.zeros(image.shape, dtype=bool)
    inner = ndimage.binary_erosion(foreground, iterations=spec.margin_px)
    tissue_level = float(np.median(image[foreground])) if foreground.any() else 0.5
    # Centres in parenchyma, not in CSF or air: a dark lesion in dark fluid is invisible to
    # every method and to a reader, so it would measure nothing.
    parenchyma = ndimage.gaussian_filter(image, 1.5) > 0.6 * tissue_level
    candidates = np.argwhere(inner & parenchyma)
    if candidates.size == 0:
        candidates = np.argwhere(inner)
    drawn: list[Lesion] = []
    if candidates.size == 0:
        return out, truth, drawn
    for _ in range(count):
        cy, cx = candidates[rng.integers(len(candidates))]
        radius = float(rng.uniform(*spec.radius))
        soft = _blob(image.shape, (int(cy), int(cx)), radius, float(rng.uniform(*spec.elongation)),
                     float(rng.uniform(0, np.pi)), rng)
        soft *= inner | ndimage.binary_dilation(inner, iterations=spec.margin_px // 2)
        hyper = bool(rng.random() < 0.5)
        factor = float(rng.uniform(*(spec.hyper_factor if hyper else spec.hypo_factor)))
        local = float(np.mean(out[soft > 0.5])) if (soft > 0.5).any() else tissue_level
        # Level relative to the local tissue, but never below the slice's tissue level (a
        # "bright" lesion partly in dark CSF would otherwise be grey matter).
        base = max(local, tissue_level)
        target = base * factor
        texture = ndimage.gaussian_filter(rng.standard_normal(image.shape).astype(np.float32), 1.0)
        texture /= texture.std() + 1e-6
        amp = float(rng.uniform(*spec.texture))
        target_map = target * (1.0 + amp * texture)
        alpha = soft * float(rng.uniform(*spec.opacity))
        out = out * (1.0 - alpha) + target_map * alpha
        if record is not None:
            record.append((alpha, target_map, target, amp, texture))
        truth |= soft > 0.5
        drawn.append(Lesion((int(cy), int(cx)), radius, hyper, factor))
    return np.clip(out, 0.0, None), truth, drawn


#: correlation of a lesion's texture between its slice and a plane one canvas pixel (2 mm)
#: away: that of white noise smoothed in 3D with the slice texture's own sigma (1 px),
#: exp(-1 / 4)
NEIGHBOUR_TEXTURE_CORR = 0.78


def _correlated_texture(texture: np.ndarray, rho: float, rng: np.random.Generator) -> np.ndarray:
    """A texture like ``texture`` (unit-variance noise smoothed with sigma 1 px) correlated
    ``rho`` with it: its continuation into another plane."""
    fresh = ndimage.gaussian_filter(rng.standard_normal(texture.shape).astype(np.float32), 1.0)
    fresh /= fresh.std() + 1e-6
    return rho * texture + np.sqrt(max(0.0, 1.0 - rho ** 2)) * fresh


def ellipsoid_section(alpha: np.ndarray, centre, offset: float, depth: float) -> np.ndarray | None:
    """A region's soft mask ``alpha`` (H, W) in a plane ``offset`` pixels from its own, for an
    ellipsoid ``depth`` pixels deep (semi-axis): scaled about ``centre`` (row, col) by
    sqrt(1 - (offset / depth)^2); None where it does not reach that plane. Geometry only: the
    evaluation's far-plane lesions and the 5-plane training anomalies both use it."""
    scale = 1.0 - (offset / depth) ** 2
    if scale <= 0:
        return None
    scale = float(np.sqrt(scale))
    centre = np.asarray(centre, dtype=np.float64)
    # output pixel p reads the mask at centre + (p - centre) / scale
    return ndimage.affine_transform(alpha, np.eye(2) / scale, offset=centre - centre / scale, order=1)


def lesions_in_neighbour(planes: np.ndarray, blends: list, rng: np.random.Generator,
                         rho: float = NEIGHBOUR_TEXTURE_CORR) -> np.ndarray:
    """The lesions ``insert_lesions`` drew into a slice (its ``record``), drawn into the slice's
    neighbour planes ``planes`` (C, H, W) too: a 3D lesion reaching the planes next to its
    slice, with the same extent, opacity and level, and a texture correlated ``rho`` with the
    slice's own."""
    out = np.array(planes, dtype=np.float32, copy=True)
    for alpha, _target_map, target, amp, texture in blends:
        for c in range(len(out)):
            tex = _correlated_texture(texture, rho, rng)
            out[c] = out[c] * (1.0 - alpha) + target * (1.0 + amp * tex) * alpha
    return np.clip(out, 0.0, None)


def lesions_in_far_plane(plane: np.ndarray, blends: list, lesions: list[Lesion], offset_px: float,
                         rng: np.random.Generator) -> np.ndarray:
    """The lesions ``insert_lesions`` drew into a slice (its ``record`` and what it returned),
    drawn into a plane ``offset_px`` canvas pixels from it (2 or more: a network that reads
    further than the nearest planes, which ``lesions_in_neighbour`` draws): each lesion as the
    cross-section of an ellipsoid whose depth is its radius, so its extent scaled about its centre
    by sqrt(1 - (offset / radius)^2) (a lesion that does not reach the plane is left out), the
    same opacity and level, and a texture correlated exp(-offset^2 / 4) with the slice's (that of
    white noise smoothed in 3D with sigma 1 px)."""
    out = np.array(plane, dtype=np.float32, copy=True)
    rho = float(np.exp(-offset_px ** 2 / 4.0))
    for (alpha, _target_map, target, amp, texture), lesion in zip(blends, lesions):
        shrunk = ellipsoid_section(alpha, lesion.centre, offset_px, lesion.radius)
        if shrunk is None:
            continue
        tex = _correlated_texture(texture, rho, rng)
        out = out * (1.0 - shrunk) + target * (1.0 + amp * tex) * shrunk
    return np.clip(out, 0.0, None)
