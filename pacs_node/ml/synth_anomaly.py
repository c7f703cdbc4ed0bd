"""Self-supervised training anomalies for the ``recon-disc`` anomaly model (DRAEM-style).

The model learns what normal anatomy looks like from normal slices only; to learn *where* an
image departs from it, it is shown normal slices with local corruptions drawn here, and the
mask of what was corrupted. These corruptions are deliberately broader than, and generated
differently from, the evaluation lesions (``pacs_node.ml.lesions``: elliptical blobs at a
multiple of the local tissue level):

- **shapes**: smooth noise (Perlin-like, as in DRAEM) minus a radial fall-off, thresholded:
  irregular regions, sometimes in pieces, of radius 2-16 px, centred anywhere in the head
  (skull and scalp included: the model must learn that those are normal there too);
- **content**, one of:
  - *foreign patch*: the same region of another slice, shifted, blended in (Foreign Patch
    Interpolation, Tan et al. 2020);
  - *intensity shift*: an additive or multiplicative change of the region;
  - *fill*: a random level with random texture (noise of random grain);
  - *smear*: the region blurred or its texture replaced (structure lost, mean kept);
- **edges**: soft, with random width; opacity random.

The label is the corrupted region where the change is visible (smoothed difference above a
small level): a change that cannot be seen must not be learnt as an anomaly.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .lesions import ellipsoid_section


def _noise_shape(shape: tuple[int, int], centre: tuple[int, int], radius: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of an irregular region of about ``radius`` around ``centre``: smooth noise
    (Perlin-like) minus a radial fall-off, thresholded at 0 (may come in several pieces)."""
    sigma = float(rng.uniform(1.0, max(1.5, radius / 1.5)))
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    field /= field.std() + 1e-6
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    dist2 = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / radius ** 2
    return (float(rng.uniform(0.3, 1.0)) * field + 1.0 - dist2) > 0


def _texture(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    t = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), float(rng.uniform(0.5, 3.0)))
    return t / (t.std() + 1e-6)


def corrupt(image: np.ndarray, other: np.ndarray, rng: np.random.Generator,
            foreground_level: float = 0.06, bright: float | None = None,
            keep_texture: float = 0.0, texture_corr: tuple[float, float] = (0.5, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """One training anomaly in ``image`` (normalised, 2D). ``other`` is another normal slice
    (same size) for foreign patches. Returns the corrupted image and its label (float 0/1).

    A stack of planes (C, H, W; a 2.5D network's slice between its neighbours, ``other`` a stack
    too) gets a 3D anomaly: placed, sized and labelled on the middle plane, with the same
    region, opacity and kind of content in every plane (a fill's texture correlated
    ``texture_corr`` between the middle plane and each other one: a 3D texture); the label is
    the middle plane's (H, W). A stack of five or more planes: beyond the nearest planes the
    anomaly is the cross-section of an ellipsoid as deep as 0.7-1.4 x its radius.
    A single plane draws exactly what the 2D recipe drew.

    ``bright`` (None: the served recipe): the probability that an intensity shift brightens the
    region, and the fill level's range reaching 2.2x (not 1.6x) the head's median, so that more
    anomalies are brighter than the tissue around them.

    ``keep_texture`` (0: the served recipe): the probability that a fill or smear keeps the
    slice's own fine structure and noise (``image`` minus its 1 px Gaussian blur) through the
    region, so that a region's loss of texture is not what marks it: a real lesion changes the
    level of tissue that the scanner still images with its own noise."""
    stack = image.ndim == 3
    planes = image if stack else image[None]
    others = other if stack else other[None]
    mid = len(planes) // 2
    centre = planes[mid]
    h, w = centre.shape
    fg = ndimage.gaussian_filter(centre, 1.0) > foreground_level
    if fg.mean() < 0.05:
        return image.copy(), np.zeros_like(centre)
    inner = ndimage.binary_erosion(fg, iterations=4)
    pool = np.argwhere(inner if inner.any() and rng.random() < 0.8 else fg)
    cy, cx = pool[rng.integers(len(pool))]
    radius = float(np.exp(rng.uniform(np.log(2.0), np.log(16.0))))
    region = _noise_shape((h, w), (int(cy), int(cx)), radius, rng) & fg
    if region.sum() < 6:
        return image.copy(), np.zeros_like(centre)
    level = float(np.median(centre[fg]))
    kind = rng.choice(["foreign", "shift", "fill", "smear"], p=[0.3, 0.3, 0.25, 0.15])
    if kind == "foreign":
        dy, dx = (int(v) for v in rng.integers(-h // 4, h // 4 + 1, size=2))
        source = np.roll(others, (dy, dx), axis=(-2, -1))
        if rng.random() < 0.5:
            source = source[..., ::-1]
        content = source * float(rng.uniform(0.7, 1.4))
    elif kind == "shift" and bright is not None:
        up = rng.random() < bright
        if rng.random() < 0.5:
            content = planes * float(rng.uniform(1.2, 2.5) if up else rng.uniform(0.1, 0.8))
        else:
            content = planes + float((1 if up else -1) * rng.uniform(0.1, 0.7)) * level
    elif kind == "shift":
        if rng.random() < 0.5:
            content = planes * float(rng.choice([rng.uniform(0.1, 0.8), rng.uniform(1.2, 2.5)]))
        else:
            content = planes + float(rng.choice([-1, 1]) * rng.uniform(0.1, 0.7)) * level
    elif kind == "fill":
        content = np.full_like(planes, float(rng.uniform(0.0, 1.6 if bright is None else 2.2)) * level)
        amp = float(rng.uniform(0.0, 0.25)) * level
        tex = _texture((h, w), rng)
        if stack:  # drawn only for a stack: the single-plane random stream is the 2D recipe's
            r = float(rng.uniform(*texture_corr))
            tex = np.stack([tex if c == mid else r * tex + np.sqrt(max(0.0, 1.0 - r * r)) * _texture((h, w), rng)
                            for c in range(len(planes))])
        content = content + amp * tex
    else:
        if rng.random() < 0.5:
            sigma = float(rng.uniform(2.0, 5.0))
            content = np.stack([ndimage.gaussian_filter(p, sigma) for p in planes])
        else:
            mean = np.stack([ndimage.gaussian_filter(p, 4.0) for p in planes])
            content = mean * (1.0 + float(rng.uniform(0.1, 0.4)) * _texture((h, w), rng))
    if keep_texture > 0 and kind in ("fill", "smear") and rng.random() < keep_texture:
        # drawn only when asked, so the served recipe's random stream is unchanged
        content = content + (planes - np.stack([ndimage.gaussian_filter(p, 1.0) for p in planes]))
    edge = float(rng.uniform(0.3, 2.0))
    alpha = ndimage.gaussian_filter(region.astype(np.float32), edge) * float(rng.uniform(0.6, 1.0))
    per_plane = alpha
    if len(planes) > 3:
        # drawn only for stacks of more than three planes (so the 3-plane stream is 0.6.0's): in
        # the planes beyond the nearest ones the anomaly is an ellipsoid's cross-section, its depth
        # (semi-axis, in planes) 0.7-1.4 x its radius, so it ends before them only when small
        # (session 18: a network shown anomalies that end at random there learnt to read the
        # lesion-free tissue beyond as a reference, and failed on lesions deeper than that)
        depth = radius * float(rng.uniform(0.7, 1.4))
        per_plane = np.repeat(alpha[None], len(planes), axis=0)
        for c in range(len(planes)):
            if abs(c - mid) >= 2:
                section = ellipsoid_section(alpha, (cy, cx), abs(c - mid), depth)
                per_plane[c] = 0.0 if section is None else section
    out = planes * (1.0 - per_plane) + content.astype(np.float32) * per_plane
    out = np.clip(out, 0.0, 1.5).astype(np.float32)
    visible = np.abs(ndimage.gaussian_filter(out[mid] - centre, 1.0)) > 0.06 * max(level, 0.1)
    label = (alpha > 0.3) & visible
    return (out if stack else out[0]), label.astype(np.float32)


def corrupt_batch(images: np.ndarray, rng: np.random.Generator, p_normal: float = 0.25,
                  bright: float | None = None, keep_texture: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``corrupt`` for a batch (N, H, W), or of stacks (N, C, H, W) with the middle plane's labels
    (N, H, W); a fraction ``p_normal`` is left untouched (label 0), and a quarter of the others
    get a second anomaly."""
    out = images.astype(np.float32, copy=True)
    labels = np.zeros((len(out),) + out.shape[-2:], dtype=np.float32)
    n = len(images)
    for i in range(n):
        if rng.random() < p_normal:
            continue
        other = images[(i + 1 + int(rng.integers(max(1, n - 1)))) % n]
        for _ in range(2 if rng.random() < 0.25 else 1):
            out[i], lab = corrupt(out[i], other, rng, bright=bright, keep_texture=keep_texture)
            labels[i] = np.maximum(labels[i], lab)
    return out, labels
