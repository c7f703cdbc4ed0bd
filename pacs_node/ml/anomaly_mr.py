"""Brain MR anomaly model: data (resliced normal T1 volumes), training and evaluation.

Training data: studyforrest-t1 (axial, coronal and sagittal reslices) and the UIH 3D T1
sagittal slices outside a held-out contiguous block (``HELD_OUT``, with a gap on each side).
Evaluation: synthetic lesions (``pacs_node.ml.lesions``) in the held-out UIH slices (or in
the slices of any folder of DICOM MR series: split "external"); pixel AUROC / AUPRC / best Dice
of the model against the intensity-outlier baseline.

    pacs-node models train anomaly-mr [--steps N] [--out models/anomaly-mr/model.safetensors]
    pacs-node models eval anomaly-mr --data DIR [--json F] [--plot F.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..models_dir import model_path
from .anomaly import (
    AnomalyConfig,
    ReconDiscEnsemble,
    build_network,
    ensemble_of,
    head_coordinates,
    inpainting_input,
    input_planes,
    training_noise,
    foreground_mask,
    intensity_baseline,
    kl_divergence,
    laplace_nll,
    load_model,
    has_mirror_slices,
    mirror_slices,
    neighbour_planes,
    residual_maps,
    slice_positions,
    save_model,
    smooth,
    to_canvas,
)
from .lesions import Lesion, insert_lesions, lesions_in_far_plane, lesions_in_neighbour
from .synth_anomaly import corrupt_batch

log = logging.getLogger(__name__)

MODEL_NAME = "anomaly-mr"
TRAIN_SERIES = ("mr/studyforrest-t1", "mr/uih-t1-3d-sag")
HOLDOUT_SERIES = "mr/uih-t1-3d-sag"
#: held-out sagittal slice indices of the UIH volume (sorted along the slice normal) ...
HELD_OUT = (60, 110)
#: ... and the gap on each side that is used for neither training nor evaluation
HOLDOUT_GAP = 5
#: training slices cache (``default_cache`` adds the intensity reference to the name)
DEFAULT_CACHE = Path("/tmp/pacs-node-cache/anomaly-mr-slices.npz")


# ------------------------------------------------------------------------------ intensities


def _central(array: np.ndarray) -> np.ndarray:
    """The central half of a volume along each axis of 4 or more voxels (all of a shorter one)."""
    box = tuple(slice(n // 4, n - n // 4) if n >= 4 else slice(None) for n in array.shape)
    return array[box]


#: per intensity reference: (region of the volume, head percentile, the level that percentile maps to)
INTENSITY_REFS = {
    "foreground-p99": (lambda array: array, 99.0, 1.0),
    "central-p90": (_central, 90.0, 0.94),  # white matter in T1 near 0.94
}
CENTRAL_LEVEL = INTENSITY_REFS["central-p90"][2]


def intensity_scale(array: np.ndarray, ref: str = "foreground-p99") -> float:
    """The value an MR volume is divided by before the network (``AnomalyConfig.intensity_ref``).

    foreground-p99: the 99th percentile of the head (voxels above a tenth of the 99.5th
    percentile). Scalp fat decides it on a sequence where fat is bright, so brain tissue lands
    at a different level on every scanner (UIH 3D GRE: white matter near 0.65; studyforrest:
    0.9). central-p90: the 90th percentile of the head in the central half of the volume along
    each axis (mostly brain) is set to ``CENTRAL_LEVEL``: white matter near 0.94 on both.
    """
    if ref not in INTENSITY_REFS:
        raise ValueError(f"unknown intensity reference {ref!r} (known: {', '.join(INTENSITY_REFS)})")
    region, percentile, level = INTENSITY_REFS[ref]
    flat = np.asarray(region(array)).reshape(-1)
    flat = flat[:: max(1, flat.size // 2_000_000)]
    top = float(np.percentile(flat, 99.5)) if flat.size else 0.0
    fg = flat[flat > 0.1 * top]
    if not fg.size:
        return max(top, 1e-6)
    return max(float(np.percentile(fg, percentile)) / level, 1e-6)


def normalise(array: np.ndarray, scale: float, top: float = 1.5) -> np.ndarray:
    return np.clip(array / max(scale, 1e-6), 0.0, top).astype(np.float32)


def normalise_volume(array: np.ndarray, cfg: AnomalyConfig) -> np.ndarray:
    """A series' intensities as the network sees them: scaled by ``cfg.intensity_ref``, clipped
    to [0, ``cfg.intensity_max``]."""
    return normalise(array, intensity_scale(array, cfg.intensity_ref), cfg.intensity_max)


# ------------------------------------------------------------------------------------ data


@dataclass(frozen=True)
class SliceSet:
    images: np.ndarray  # (N, canvas, canvas) float32, normalised
    sources: list[str]


def _plane(array: np.ndarray, spacing: tuple[float, float, float], axis: str, i: int):
    """Plane ``i`` along ``axis`` ('a', 'c', 's'; clamped to the volume) and its (row mm, col mm);
    superior up for coronal/sagittal."""
    sz, sy, sx = spacing
    i = min(max(i, 0), array.shape["acs".index(axis)] - 1)
    if axis == "a":
        return array[i], (sy, sx)
    if axis == "c":
        return array[::-1, i, :], (sz, sx)
    return array[::-1, :, i], (sz, sy)


def _planes(array: np.ndarray, spacing: tuple[float, float, float], axes: str, step: int):
    """Yield (plane, (row mm, col mm)) along the requested axes; superior up for coronal/sagittal."""
    for axis in "acs":
        if axis in axes:
            for i in range(0, array.shape["acs".index(axis)], step):
                yield _plane(array, spacing, axis, i)


def _enough_head(canvas: np.ndarray, min_fg: float) -> bool:
    return float((canvas > 0.1).mean()) >= min_fg


def _canvas_slices(planes, cfg: AnomalyConfig, min_fg: float = 0.12) -> list[np.ndarray]:
    return [c for c in _to_canvases(planes, cfg) if _enough_head(c, min_fg)]


def _to_canvases(planes, cfg: AnomalyConfig) -> list[np.ndarray]:
    return [to_canvas(np.ascontiguousarray(plane), mm, cfg.canvas, cfg.pixel_mm)[0] for plane, mm in planes]


def load_normal_volume(name: str, data: Path, cfg: AnomalyConfig):
    from ..volume import load_series

    vol = load_series(sorted((data / name).iterdir()))
    return vol, normalise_volume(vol.array, cfg)


def build_training_slices(data: Path, cfg: AnomalyConfig, step: int = 2) -> SliceSet:
    images: list[np.ndarray] = []
    sources: list[str] = []
    vol, arr = load_normal_volume("mr/studyforrest-t1", data, cfg)
    got = _canvas_slices(_planes(arr, vol.spacing, "acs", step), cfg)
    images += got
    sources += ["studyforrest"] * len(got)
    vol, arr = load_normal_volume(HOLDOUT_SERIES, data, cfg)
    lo, hi = HELD_OUT[0] - HOLDOUT_GAP, HELD_OUT[1] + HOLDOUT_GAP
    keep = [i for i in range(arr.shape[0]) if i < lo or i >= hi]
    got = _canvas_slices(((arr[i], vol.spacing[1:]) for i in keep), cfg)
    images += got
    sources += ["uih"] * len(got)
    return SliceSet(np.stack(images).astype(np.float32), sources)


def _stacks(array: np.ndarray, spacing: tuple[float, float, float], axis: str, centres, cfg: AnomalyConfig,
            min_fg: float = 0.12) -> list[np.ndarray]:
    """2.5D training stacks (2 r + 1, canvas, canvas), r = ``cfg.context_planes``, along ``axis``
    ('a', 'c', 's'; superior up): the plane at each centre and the r planes ``cfg.context_mm``
    apart below and above it (the nearest planes of the volume), kept where the middle plane
    has enough head."""
    k = max(1, round(cfg.context_mm / spacing["acs".index(axis)]))
    r = cfg.context_planes
    out = []
    for i in centres:
        middle = _to_canvases([_plane(array, spacing, axis, i)], cfg)[0]
        if _enough_head(middle, min_fg):
            others = _to_canvases([_plane(array, spacing, axis, i + j * k) for j in range(-r, r + 1) if j], cfg)
            out.append(np.stack(others[:r] + [middle] + others[r:]))
    return out


def build_training_stacks(data: Path, cfg: AnomalyConfig, step: int = 2) -> SliceSet:
    """``build_training_slices`` for a 2.5D network: the same slices, each between its neighbours
    ``cfg.context_mm`` away (UIH: a neighbour inside the held-out block or its gaps is never
    used: those centres are left out)."""
    images: list[np.ndarray] = []
    sources: list[str] = []
    vol, arr = load_normal_volume("mr/studyforrest-t1", data, cfg)
    for axis in "acs":
        got = _stacks(arr, vol.spacing, axis, range(0, arr.shape["acs".index(axis)], step), cfg)
        images += got
        sources += ["studyforrest"] * len(got)
    vol, arr = load_normal_volume(HOLDOUT_SERIES, data, cfg)
    k = max(1, round(cfg.context_mm / vol.spacing[0])) * cfg.context_planes
    lo, hi = HELD_OUT[0] - HOLDOUT_GAP, HELD_OUT[1] + HOLDOUT_GAP
    # the series' own slices are its first axis: 'a' takes them as they are
    got = _stacks(arr, vol.spacing, "a", [i for i in range(arr.shape[0]) if i + k < lo or i - k >= hi], cfg)
    images += got
    sources += ["uih"] * len(got)
    return SliceSet(np.stack(images).astype(np.float32), sources)


def _all_canvases(planes, cfg: AnomalyConfig) -> np.ndarray:
    return np.stack(_to_canvases(planes, cfg))


#: The evaluation's lesions are 3D (since session 17): each is also drawn into the planes this far
#: below and above its slice (a 2.5D network's own ``context_mm`` where it has one), which a
#: 2.5D network reads and a 2D one does not; the scored slices and their lesions are the same
#: as with 2D lesions.
EVAL_CONTEXT_MM = 2.0


def eval_context_mm(cfg: AnomalyConfig) -> float:
    return cfg.context_mm if cfg.context_mm > 0 else EVAL_CONTEXT_MM


def eval_context_planes(cfg: AnomalyConfig) -> int:
    """The neighbour planes on each side that the evaluation makes: the network's own (a 2D one: 1;
    its lesions reach every one of them, ``make_eval_cases``)."""
    return cfg.context_planes if cfg.context_mm > 0 else 1


def _picked(canvases: np.ndarray, sagittal: bool, indices, slice_mm: float, min_fg: float = 0.2,
            along: np.ndarray | None = None, context_mm: float = EVAL_CONTEXT_MM, reach: int = 1
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slices at ``indices`` with enough head, their mirrors (``mirror_slices`` of the
    whole lesion-free series, ``slice_mm`` apart: a unilateral lesion; all NaN, no asymmetry
    term, unless ``sagittal``: a sagittal series scored with the term) and their neighbour
    planes ``context_mm`` apart, ``reach`` on each side (``neighbour_planes``; ``along``: the
    slices' positions, default ``slice_mm`` apart)."""
    mirrors = mirror_slices(canvases, slice_mm) if sagittal else np.full(canvases.shape, np.nan, np.float32)
    keep = [i for i in indices if _enough_head(canvases[i], min_fg)]
    along = np.arange(len(canvases)) * slice_mm if along is None else along
    context = neighbour_planes(canvases, along, context_mm, reach)
    return canvases[keep], mirrors[keep], context[keep]


def series_slices(vol, arr: np.ndarray, indices, mirrored: bool, cfg: AnomalyConfig,
                  min_fg: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_picked`` for slices ``indices`` of a series (``arr``: its normalised volume): only those
    slices and the ones their neighbour planes need are put on the canvas, unless ``mirrored``
    (the asymmetry term) needs the whole series."""
    def planes(which):  # type: ignore[no-untyped-def]
        return ((arr[i], vol.spacing[1:]) for i in which)

    mm, reach = eval_context_mm(cfg), eval_context_planes(cfg)
    along = slice_positions(vol)
    if mirrored:
        return _picked(_all_canvases(planes(range(arr.shape[0])), cfg), True, indices, vol.spacing[0], min_fg,
                       along, mm, reach)
    indices = list(indices)
    if not indices:
        empty = np.zeros((0, cfg.canvas, cfg.canvas), np.float32)
        return empty, empty, np.zeros((0, 2 * reach, cfg.canvas, cfg.canvas), np.float32)
    # the slices around the picked ones that their neighbour planes are interpolated from
    lo = max(0, int(np.searchsorted(along, along[min(indices)] - reach * mm, side="right")) - 1)
    hi = min(arr.shape[0], int(np.searchsorted(along, along[max(indices)] + reach * mm)) + 1)
    return _picked(_all_canvases(planes(range(lo, hi)), cfg), False, [i - lo for i in indices], vol.spacing[0],
                   min_fg, along[lo:hi], mm, reach)


def held_out_slices(data: Path, cfg: AnomalyConfig, step: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out UIH sagittal block, every ``step``-th slice, each slice's mirror and its
    neighbour planes."""
    vol, arr = load_normal_volume(HOLDOUT_SERIES, data, cfg)
    return series_slices(vol, arr, range(HELD_OUT[0], HELD_OUT[1], step), cfg.symmetry_weight > 0, cfg)


def validation_slices(data: Path, cfg: AnomalyConfig, count: int = 24) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model-selection slices: studyforrest sagittal planes at odd indices (training used the
    even ones), the central ``count`` of those with enough head, and their mirrors.
    Training-domain anatomy: for choosing settings only, never reported as the result."""
    vol, arr = load_normal_volume("mr/studyforrest-t1", data, cfg)
    sz, sy, sx = vol.spacing
    canvases = _all_canvases(((arr[::-1, :, i], (sz, sy)) for i in range(arr.shape[2])), cfg)
    odd = [i for i in range(1, arr.shape[2], 2) if _enough_head(canvases[i], 0.2)]
    mid = len(odd) // 2
    return _picked(canvases, cfg.symmetry_weight > 0, odd[max(0, mid - count // 2): mid + count // 2], sx,
                   context_mm=eval_context_mm(cfg), reach=eval_context_planes(cfg))


def gap_slices(data: Path, cfg: AnomalyConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model-selection slices from the held-out scanner: the UIH gap slices on each side of the
    held-out block (used neither for training nor for the reported evaluation; adjacent to the
    held-out block, so not independent of it), and their mirrors."""
    vol, arr = load_normal_volume(HOLDOUT_SERIES, data, cfg)
    lo, hi = HELD_OUT[0], HELD_OUT[1]
    picks = list(range(lo - HOLDOUT_GAP, lo)) + list(range(hi, hi + HOLDOUT_GAP))
    return series_slices(vol, arr, picks, cfg.symmetry_weight > 0, cfg)


def default_cache(cfg: AnomalyConfig) -> Path:
    """The training-slice cache for ``cfg``'s intensity scaling (the slices differ by it)."""
    context = f"-context{cfg.context_mm:g}mm" if cfg.context_mm > 0 else ""
    context += f"x{cfg.context_planes}" if cfg.context_mm > 0 and cfg.context_planes != 1 else ""
    return DEFAULT_CACHE.with_name(f"{DEFAULT_CACHE.stem}-{cfg.intensity_ref}-max{cfg.intensity_max:g}{context}"
                                   f"{DEFAULT_CACHE.suffix}")


def cached_training_slices(data: Path, cfg: AnomalyConfig, cache: Path, build=None) -> SliceSet:
    """The training slices from ``cache`` (.npz), made there by ``build(data, cfg)`` (default:
    this model's ``build_training_slices``) if missing."""
    if cache.exists():
        npz = np.load(cache, allow_pickle=False)
        return SliceSet(npz["images"].astype(np.float32), [str(s) for s in npz["sources"]])
    sset = (build or (build_training_stacks if cfg.context_mm > 0 else build_training_slices))(data, cfg)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, images=sset.images.astype(np.float16), sources=np.array(sset.sources))
    return sset


# ------------------------------------------------------------------------------ augmentation


def contrast_curve(x: torch.Tensor, gen: torch.Generator, knots: int = 6, top: float = 1.5) -> torch.Tensor:
    """A random monotone intensity mapping per image (piecewise linear through ``knots`` points
    on [0, top], 0 -> 0 and top -> top, each segment's slope 0.25-1.75x): another scanner's or
    sequence's grey-level relations between tissues, beyond what a gamma curve can make."""
    b = x.shape[0]
    step = top / (knots - 1)
    rises = (0.25 + 1.5 * torch.rand((b, knots - 1), generator=gen)) * step
    fp = torch.cat([torch.zeros((b, 1)), torch.cumsum(rises, dim=1)], dim=1)
    fp = fp * (top / fp[:, -1:])
    pos = (x.clamp(0.0, top) / step).view(b, -1)
    i = pos.floor().clamp(max=knots - 2).long()
    t = pos - i
    lo, hi = torch.gather(fp, 1, i), torch.gather(fp, 1, i + 1)
    return (lo + (hi - lo) * t).view_as(x)


def contrast_matched(sset: SliceSet, source: str, target: str, level: float = 0.05) -> np.ndarray:
    """``source``'s slices with their grey levels mapped onto ``target``'s (quantile matching of
    the head pixels above ``level``; the background stays 0): one scanner's anatomy in another's
    contrast."""
    src = sset.images[[s == source for s in sset.sources]]
    tgt = sset.images[[s == target for s in sset.sources]]
    q = np.linspace(0.0, 1.0, 201)
    sq = np.quantile(src[src > level], q)
    tq = np.quantile(tgt[tgt > level], q)
    mapped = np.interp(src, np.r_[0.0, sq], np.r_[0.0, tq]).astype(np.float32)
    return np.where(src > 0, mapped, src)


def augment(batch: torch.Tensor, gen: torch.Generator, degrade: bool = True, curves: float = 0.0,
            elastic: float = 0.0) -> torch.Tensor:
    """Geometry (affine, flips; with probability ``elastic`` a smooth random deformation: another
    head shape), intensity (gamma, gain, random contrast curves with probability ``curves``, bias
    field), then (``degrade``) a mild blur and noise."""
    b = batch.shape[0]

    def u(lo: float, hi: float, n: int = b) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=gen)

    angle = u(-0.3, 0.3)
    scale = u(0.85, 1.15)
    flip_x = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    flip_y = torch.where(torch.rand(b, generator=gen) < 0.2, -1.0, 1.0)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([
        torch.stack([cos * flip_x, -sin * flip_y, u(-0.12, 0.12)], dim=1),
        torch.stack([sin * flip_x, cos * flip_y, u(-0.12, 0.12)], dim=1),
    ], dim=1)
    grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
    if elastic > 0:  # drawn only when asked, so the served recipe's random stream is unchanged
        amp = u(0.0, 0.06) * (torch.rand(b, generator=gen) < elastic)  # up to ~8 px on 128
        field = torch.randn((b, 2, 5, 5), generator=gen) * amp.view(b, 1, 1, 1)
        grid = grid + F.interpolate(field, size=grid.shape[1:3], mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    x = x.clamp_min(0.0) ** u(0.7, 1.4).view(b, 1, 1, 1)
    if curves > 0:  # drawn only when asked, so the served recipe's random stream is unchanged
        pick = torch.rand(b, generator=gen) < curves
        x = torch.where(pick.view(b, 1, 1, 1), contrast_curve(x, gen), x)
    x = x * u(0.8, 1.2).view(b, 1, 1, 1)
    bias = F.interpolate(torch.randn((b, 1, 4, 4), generator=gen) * 0.12, size=x.shape[-2:], mode="bicubic",
                         align_corners=False)
    x = x * torch.exp(bias)
    if not degrade:
        return x.clamp(0.0, 1.5)
    blur = torch.rand(b, generator=gen) < 0.25
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        c = x.shape[1]  # planes of a 2.5D stack blurred alike, each on its own
        xb = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"),
                      (k[:, None] * k[None, :]).view(1, 1, 3, 3).repeat(c, 1, 1, 1), groups=c)
        x[blur] = xb
    x = x + torch.randn(x.shape, generator=gen) * u(0.0, 0.04).view(b, 1, 1, 1)
    return x.clamp(0.0, 1.5)


def acquisition(images: list[torch.Tensor], gen: torch.Generator) -> list[torch.Tensor]:
    """recon-disc: how another scanner might have acquired the slice, drawn once per sample and
    applied alike to every tensor of ``images`` (the corrupted slice and its clean original):
    blur (sigma 0.3-1.5 px, 60 %), a lower resolution (1.3-2x, 30 %: like an interpolated
    series), then Gaussian or Rician noise (sigma 0-0.05). Applied *after* the training
    anomalies, so that an anomaly is as smooth or as noisy as the rest of its slice and
    smoothness itself is never the cue."""
    b, _, h, w = images[0].shape
    blur = (torch.rand(b, generator=gen) < 0.6) * (0.3 + 1.2 * torch.rand(b, generator=gen))
    lowres = (torch.rand(b, generator=gen) < 0.3) * (1.3 + 0.7 * torch.rand(b, generator=gen))
    sigma = 0.05 * torch.rand(b, generator=gen)
    rician = torch.rand(b, generator=gen) < 0.3
    n1 = torch.randn(images[0].shape, generator=gen) * sigma.view(b, 1, 1, 1)
    n2 = torch.randn(images[0].shape, generator=gen) * sigma.view(b, 1, 1, 1)
    out = []
    for x in images:
        x = x.clone()
        for i in range(b):
            xi = x[i:i + 1]
            if blur[i] > 0:
                xi = smooth(xi, float(blur[i]))
            if lowres[i] > 0:
                size = (max(8, round(h / float(lowres[i]))), max(8, round(w / float(lowres[i]))))
                xi = F.interpolate(F.interpolate(xi, size=size, mode="bilinear", antialias=True, align_corners=False),
                                   size=(h, w), mode="bilinear", align_corners=False)
            x[i:i + 1] = xi
        x = torch.where(rician.view(b, 1, 1, 1), torch.sqrt((x + n1) ** 2 + n2 ** 2), x + n1)
        out.append(x.clamp(0.0, 1.5))
    return out


# ---------------------------------------------------------------------------------- training


def random_holes(shape: tuple[int, ...], gen: torch.Generator, count: tuple[int, int] = (2, 6),
                 side: tuple[int, int] = (12, 32)) -> torch.Tensor:
    """Training masks for inpainting: a few axis-aligned rectangles per image."""
    b, _, h, w = shape
    holes = torch.zeros(shape)
    for i in range(b):
        for _ in range(int(torch.randint(count[0], count[1] + 1, (1,), generator=gen))):
            sh, sw = (int(v) for v in torch.randint(side[0], side[1] + 1, (2,), generator=gen))
            y = int(torch.randint(0, h - sh + 1, (1,), generator=gen))
            x = int(torch.randint(0, w - sw + 1, (1,), generator=gen))
            holes[i, :, y:y + sh, x:x + sw] = 1.0
    return holes


def training_holes(shape: tuple[int, ...], gen: torch.Generator, side: tuple[int, int] = (12, 36)) -> torch.Tensor:
    """prob-inpaint training masks: per image, either a grid of squares like the inference grids
    (random side and phase) or a few random rectangles."""
    b, _, h, w = shape
    holes = torch.zeros(shape)
    yy = torch.arange(h).view(-1, 1)
    xx = torch.arange(w).view(1, -1)
    for i in range(b):
        if float(torch.rand(1, generator=gen)) < 0.5:
            s = int(torch.randint(side[0], side[1] + 1, (1,), generator=gen))
            oy, ox = (int(v) for v in torch.randint(0, 2 * s, (2,), generator=gen))
            holes[i, 0] = ((((yy + oy) // s) % 2 == 0) & (((xx + ox) // s) % 2 == 0)).float()
        else:
            holes[i:i + 1] = random_holes((1, 1, h, w), gen, count=(2, 5), side=(side[0], side[1]))
    return holes


def random_crops(batch: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random ``size`` squares of each image (training on crops: about (128/size)**2 faster)."""
    b, _, h, w = batch.shape
    if size >= h and size >= w:
        return batch
    ys = torch.randint(0, h - size + 1, (b,), generator=gen)
    xs = torch.randint(0, w - size + 1, (b,), generator=gen)
    return torch.stack([batch[i, :, int(y):int(y) + size, int(x):int(x) + size] for i, (y, x) in enumerate(zip(ys, xs))])


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float = 10.0,
                      focal_gamma: float = 0.0) -> torch.Tensor:
    """The discriminator's loss: binary cross-entropy with anomalous pixels weighted
    ``pos_weight``, times the focal factor (1 - p_t) ** ``focal_gamma`` (Lin et al. 2017; DRAEM
    trains with focal loss, gamma 2) that puts the weight on the pixels still misjudged; gamma 0
    is the plain weighted BCE the served weights were trained with."""
    bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    weight = 1.0 + (pos_weight - 1.0) * labels
    if focal_gamma > 0:
        p_true = torch.exp(-bce)  # the probability given to the right class
        weight = weight * (1.0 - p_true) ** focal_gamma
    return (weight * bce).mean()


def train(images: np.ndarray, cfg: AnomalyConfig, steps: int, batch: int = 16, lr: float = 2e-3,
          seed: int = 0, log_every: int = 50, max_minutes: float | None = None,
          checkpoint: Path | None = None, init: Path | None = None, crop: int = 0,
          beta: float = 0.5, sample_weights: np.ndarray | None = None,
          acquisition_aug: bool = False, curves: float = 0.0, elastic: float = 0.0,
          bright: float | None = None, keep_texture: float = 0.0, pos_weight: float = 10.0,
          focal_gamma: float = 0.0, heal_weight: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = build_network(cfg)
    if init is not None:
        # Same-shaped tensors only: an inpainting net (2 input channels) can start from a
        # denoising one, all but its first convolution.
        own = net.state_dict()
        start_from = {k: v for k, v in load_model(init)[0].state_dict().items() if k in own and own[k].shape == v.shape}
        net.load_state_dict(start_from, strict=False)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.05)
    stacks = images.ndim == 4  # 2.5D: (N, 2 r + 1, H, W), the slice between its neighbours
    if stacks and cfg.arch != "recon-disc":
        raise ValueError("2.5D training stacks are for --arch recon-disc only")
    data = torch.from_numpy(images if stacks else images[:, None])
    np_rng = np.random.default_rng(seed)  # recon-disc training anomalies
    start = time.time()
    net.train()
    for step in range(1, steps + 1):
        if sample_weights is None:
            idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        else:
            idx = torch.multinomial(torch.as_tensor(sample_weights, dtype=torch.float64), batch, replacement=True,
                                    generator=gen)
        clean = augment(data[idx], gen, degrade=not acquisition_aug, curves=curves, elastic=elastic)
        if stacks:
            # a tenth of the stacks see the slice itself as all its neighbours: what a series' end
            # slices get (``neighbour_planes``)
            alone = torch.rand(clean.shape[0], generator=gen) < 0.1
            mid = clean.shape[1] // 2
            clean[alone] = clean[alone][:, mid:mid + 1].expand(-1, clean.shape[1], -1, -1)
        # head coordinates from the whole canvas, cropped with it
        position = head_coordinates(clean) if cfg.arch == "recon-disc" and cfg.coord_channels else None
        if crop:
            both = random_crops(clean if position is None else torch.cat([clean, position], dim=1), crop, gen)
            clean, position = (both, None) if position is None else (both[:, :1], both[:, 1:])
        if cfg.arch == "recon-disc":
            corrupted, labels = corrupt_batch((clean if stacks else clean[:, 0]).numpy(), np_rng, bright=bright,
                                              keep_texture=keep_texture)
            x, y = torch.from_numpy(corrupted if stacks else corrupted[:, None]), torch.from_numpy(labels)[:, None]
            if stacks:
                clean = clean[:, mid:mid + 1]  # the reconstruction target: the middle plane
            if acquisition_aug:
                x, clean = acquisition([x, clean], gen)
            logits, recon, _ = net(x if position is None else torch.cat([x, position], dim=1))
            # anomalous pixels are ~2 % of a crop: weight them 10x (BCE + soft Dice did not learn)
            seg = segmentation_loss(logits, y, pos_weight, focal_gamma)
            l1 = (recon - clean).abs()
            rec = l1.mean() + seg
            if heal_weight > 0:  # the L1 inside the anomalies again: heal them, not copy them
                rec = rec + heal_weight * (l1 * y).sum() / y.sum().clamp_min(1.0)
            mu = logvar = clean.new_zeros((clean.shape[0], 0, 1, 1))
        elif cfg.arch == "prob-inpaint":
            holes = training_holes(clean.shape, gen)
            loc, raw_scale, _ = net(inpainting_input(clean, holes))
            nll = laplace_nll(smooth(clean, cfg.target_sigma), loc, raw_scale, cfg, beta=beta)
            rec = (nll * holes).sum() / holes.sum().clamp_min(1.0)  # hidden pixels only
            mu = logvar = clean.new_zeros((clean.shape[0], 0, 1, 1))
        elif cfg.arch == "inpaint-unet":
            holes = random_holes(clean.shape, gen)
            recon, mu, logvar = net(inpainting_input(clean, holes))
            weight = holes + 0.1  # learn to fill the holes; elsewhere only to pass through
            rec = ((recon - clean).abs() * weight).sum() / weight.sum()
        else:
            noisy = clean + training_noise(clean.shape, cfg, gen)
            recon, mu, logvar = net(noisy)
            rec = (recon - clean).abs().mean()
        loss = rec + cfg.kl_weight * kl_divergence(mu, logvar)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps:
            minutes = (time.time() - start) / 60
            print(f"step {step}/{steps} {'nll' if cfg.arch == 'prob-inpaint' else 'loss'} {rec.item():.4f} kl {kl_divergence(mu, logvar).item():.1f} "
                  f"{minutes:.1f} min", flush=True)
            if checkpoint is not None:
                save_model(net, cfg, checkpoint)
            if max_minutes is not None and minutes > max_minutes:
                print(f"stopping at step {step}: time budget of {max_minutes} min spent", flush=True)
                break
    net.eval()
    return net


def calibrate(net: torch.nn.Module, images: np.ndarray, cfg: AnomalyConfig, count: int = 256) -> float:
    """Error scale such that score 0.5 is the 99.9th percentile of normal-slice error."""
    rng = np.random.default_rng(0)
    pick = rng.choice(len(images), size=min(count, len(images)), replace=False)
    errs = []
    for chunk in np.array_split(pick, max(1, len(pick) // 32)):
        x = torch.from_numpy(images[np.sort(chunk)][:, None])
        err, _ = residual_maps(net, x, cfg)
        mask = foreground_mask(x, cfg.mask_erode_px) > 0
        errs.append(err[mask].numpy())
    return float(2.0 * np.percentile(np.concatenate(errs), 99.9))


def config_defaults(p: argparse.ArgumentParser, argv: list[str], allowed: set[str]) -> None:
    """``--config F``: the TOML's keys (``allowed``, plus ``version``, which is only a label)
    become the parser's defaults, so flags still override them; lists of widths become the
    comma-separated strings the flags take."""
    known, _ = p.parse_known_args(argv)
    if known.config is None:
        return
    import tomllib

    settings = tomllib.loads(known.config.read_text())
    unknown = set(settings) - allowed - {"version"}
    if unknown:
        p.error(f"{known.config}: unknown keys {sorted(unknown)}")
    settings.pop("version", None)
    for key in ("hole_sizes", "channels", "disc_channels"):
        if isinstance(settings.get(key), list):
            settings[key] = ",".join(str(v) for v in settings[key])
    p.set_defaults(**settings)


def source_weights(sources: list[str] | np.ndarray) -> np.ndarray:
    """Sampling weight per slice so that each training series is drawn equally often."""
    _, series_of, counts = np.unique(np.asarray(sources), return_inverse=True, return_counts=True)
    return 1.0 / counts[series_of]


def save_trained(net: torch.nn.Module, cfg: AnomalyConfig, out: Path) -> None:
    """The finished weights at ``out``; the training checkpoint beside them removed."""
    save_model(net, cfg, out)
    partial = out.with_suffix(".partial.safetensors")
    if partial.exists():
        partial.unlink()


def add_eval_arguments(p: argparse.ArgumentParser, model_name: str) -> None:
    """The options every anomaly evaluation command has besides ``--data`` and ``--split``."""
    p.add_argument("--model", type=Path, default=model_path(model_name))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=1)


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"pacs-node models train {MODEL_NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=None, help="unpacked shared data (default: pacs_node.datasets)")
    p.add_argument("--out", type=Path, default=model_path(MODEL_NAME))
    p.add_argument("--cache", type=Path, default=None,
                   help="precomputed training slices (.npz; made there if missing; default: one per intensity "
                        f"reference beside {DEFAULT_CACHE})")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this much wall time")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="use only the first N slices (smoke runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=("recon-disc", "prob-inpaint", "inpaint-unet", "dae-unet", "vae"),
                   default="recon-disc",
                   help="recon-disc: reconstructive + discriminative U-Nets trained on self-made anomalies "
                        "(DRAEM; served); prob-inpaint: U-Net predicting a Laplace distribution for masked pixels; "
                        "inpaint-unet: U-Net filling masked squares; dae-unet: denoising U-Net; vae: spatial-latent VAE")
    p.add_argument("--crop", type=int, default=0, help="train on random crops of this side (0: whole canvas)")
    p.add_argument("--beta", type=float, default=0.5, help="prob-inpaint: beta of the beta-weighted NLL")
    p.add_argument("--hole-sizes", default=None, help="prob-inpaint: inference hole sides, e.g. 16,24")
    p.add_argument("--hole-shifts", type=int, default=None, help="prob-inpaint: grid phases per side and axis")
    p.add_argument("--combine", choices=("mean", "max", "centre"), default=None)
    p.add_argument("--score", choices=("abs", "signed"), default=None, help="prob-inpaint: smooth(|z|) or |smooth(z)|")
    p.add_argument("--channels", default=None, help="U-Net widths per level, e.g. 16,32,64,96,128")
    p.add_argument("--disc-channels", default=None, help="recon-disc: discriminative U-Net widths, e.g. 16,32,64,96,128")
    p.add_argument("--target-sigma", type=float, default=None,
                   help="prob-inpaint: model the image smoothed at this sigma (px) instead of raw pixels")
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="prob-inpaint: average the score with that of the mirrored slice")
    p.add_argument("--smooth-sigma", type=float, default=None, help="score smoothing (px; the baseline uses the same)")
    p.add_argument("--calibrate-slices", type=int, default=256)
    p.add_argument("--balance-sources", action=argparse.BooleanOptionalAction, default=False,
                   help="draw each training series equally often (default: each slice equally often)")
    p.add_argument("--coord-channels", action=argparse.BooleanOptionalAction, default=False,
                   help="recon-disc: the discriminator also reads each pixel's position within the head")
    p.add_argument("--uih-share", type=float, default=None,
                   help="fraction of training draws from the UIH slices, the rest from the others (1: UIH only; "
                        "overrides --balance-sources; a probe of whether the UIH scanner's weakness is exposure)")
    p.add_argument("--acquisition", action=argparse.BooleanOptionalAction, default=False,
                   help="recon-disc: blur / resolution / noise applied after the training anomalies")
    p.add_argument("--elastic", type=float, default=0.0,
                   help="probability of a smooth random deformation per training slice (0: off)")
    p.add_argument("--bright-anomalies", type=float, default=None,
                   help="recon-disc: probability that a training intensity-shift anomaly brightens its region "
                        "(and fills reach 2.2x the head's median level); default: the served recipe's mix")
    p.add_argument("--context-mm", type=float, default=0.0,
                   help="recon-disc, 2.5D: the networks also read the planes this far (mm) below and above each "
                        "slice (0: the slice alone, 2D)")
    p.add_argument("--context-planes", type=int, default=1,
                   help="recon-disc, 2.5D: planes on each side of the slice, --context-mm apart (1: the planes at "
                        "-/+ context-mm; 2: also those at -/+ 2 x context-mm)")
    p.add_argument("--keep-texture", type=float, default=0.0,
                   help="recon-disc: probability that a training fill / smear anomaly keeps the slice's own fine "
                        "structure and noise (0: the served recipe, whose fills are smooth)")
    p.add_argument("--pos-weight", type=float, default=10.0,
                   help="recon-disc: weight of the anomalous pixels in the discriminator's loss (served: 10)")
    p.add_argument("--focal-gamma", type=float, default=0.0,
                   help="recon-disc: focal-loss exponent of the discriminator's loss (0: the served plain weighted "
                        "BCE; DRAEM uses 2)")
    p.add_argument("--heal-weight", type=float, default=0.0,
                   help="recon-disc: extra weight of the reconstruction's L1 inside the training anomalies, so "
                        "that the reconstructive U-Net heals them rather than copies them (0: 0.6.0's recipe; 0.7.0's "
                        "healing members: 2 and 5)")
    p.add_argument("--contrast-curves", type=float, default=0.0,
                   help="probability of a random monotone contrast curve per training slice (0: off)")
    p.add_argument("--match-contrast", action=argparse.BooleanOptionalAction, default=False,
                   help="add the studyforrest slices again with their grey levels matched to the UIH slices' "
                        "(a third training source)")
    p.add_argument("--intensity-ref", choices=tuple(INTENSITY_REFS), default="foreground-p99",
                   help="how series intensities are scaled for training (see intensity_scale)")
    p.add_argument("--serve-intensity-ref", choices=tuple(INTENSITY_REFS), default=None,
                   help="the scaling stored in the weights, i.e. used by the pipeline and the eval command "
                        "(default: --intensity-ref)")
    p.add_argument("--intensity-max", type=float, default=1.5, help="scaled intensities are clipped to [0, this]")
    p.add_argument("--serve-intensity-max", type=float, default=None,
                   help="the clip stored in the weights (default: --intensity-max)")
    p.add_argument("--init", type=Path, default=None, help="start from these weights (same architecture)")
    p.add_argument("--baseline-weight", type=float, default=0.0,
                   help="recon-disc scoring stored in the weights: 1 - (1 - probability) * (1 - min(1, this * intensity |z|)) "
                        "(not with --combine-members: an ensemble keeps its members' scoring)")
    p.add_argument("--recon-weight", type=float, default=None,
                   help="recon-disc scoring stored in the weights: the reconstruction-residual term's weight "
                        "(AnomalyConfig.recon_weight; 0, the default: off; for networks trained with --heal-weight; "
                        "with --combine-members: set for the ensemble, whatever its members had)")
    p.add_argument("--seg-threshold", type=float, default=None,
                   help="the pipeline's default threshold of the segmentation output, stored in the weights "
                        "(AnomalyConfig.seg_threshold; default 0.5; choose it where the best Dice lies on the "
                        "validation splits)")
    p.add_argument("--symmetry-weight", type=float, default=0.0,
                   help="recon-disc scoring stored in the weights: the other-hemisphere term's weight "
                        "(AnomalyConfig.symmetry_weight; 0: off)")
    p.add_argument("--noise-std", type=float, default=None, help="training noise std (default: AnomalyConfig)")
    p.add_argument("--noise-scales", default=None,
                   help="comma-separated coarse noise resolutions, e.g. 4,8,16 (default: one field at 16)")
    p.add_argument("--members", type=int, default=1,
                   help="recon-disc: train this many networks, seeds --seed, --seed + 1, ..., each for --steps, and "
                        "store them as one ensemble (probabilities averaged)")
    p.add_argument("--combine-members", default=None, metavar="A,B,...",
                   help="recon-disc: no training: store these single-network weight files as one ensemble in --out")
    p.add_argument("--config", type=Path, default=None,
                   help="TOML with any of: steps, batch, lr, seed, max_minutes, threads (flags override it)")
    config_defaults(p, argv, {"steps", "batch", "lr", "seed", "max_minutes", "threads", "arch", "init", "noise_std",
                              "noise_scales", "crop", "beta", "hole_sizes", "hole_shifts",
                              "combine", "smooth_sigma", "calibrate_slices", "score", "tta_flip",
                              "target_sigma", "channels", "disc_channels", "balance_sources",
                              "acquisition", "contrast_curves", "match_contrast", "intensity_ref", "elastic",
                              "serve_intensity_ref", "intensity_max", "serve_intensity_max", "bright_anomalies",
                              "keep_texture", "context_mm", "context_planes",
                              "members", "baseline_weight", "uih_share", "coord_channels", "symmetry_weight",
                              "recon_weight", "heal_weight", "focal_gamma", "pos_weight", "seg_threshold"})
    args = p.parse_args(argv)
    if args.recon_weight is not None and args.recon_weight < 0:
        p.error("--recon-weight must be >= 0")
    if args.seg_threshold is not None and not 0.0 < args.seg_threshold <= 1.0:
        p.error(f"--seg-threshold {args.seg_threshold}: must be in (0, 1]")
    if args.combine_members:
        return _combine_members(p, [Path(v) for v in args.combine_members.split(",") if v], args.out,
                                args.recon_weight, args.seg_threshold)
    args.recon_weight = args.recon_weight or 0.0
    if args.members < 1 or (args.members > 1 and args.arch != "recon-disc"):
        p.error("--members must be 1, or more with --arch recon-disc")
    if args.acquisition and args.arch != "recon-disc":
        p.error("--acquisition applies to --arch recon-disc only (it replaces the blur and noise of augment)")
    torch.set_num_threads(args.threads)
    if args.intensity_max <= 0 or (args.serve_intensity_max is not None and args.serve_intensity_max <= 0):
        p.error("--intensity-max and --serve-intensity-max must be positive")
    cfg = AnomalyConfig(modality="MR", arch=args.arch, intensity_ref=args.intensity_ref,
                        intensity_max=args.intensity_max)
    if args.noise_std is not None:
        cfg.noise_std = float(args.noise_std)
    if args.noise_scales:
        cfg.noise_scales = tuple(int(v) for v in str(args.noise_scales).split(","))
    if args.hole_sizes:
        cfg.hole_sizes = tuple(int(v) for v in str(args.hole_sizes).split(","))
    if args.hole_shifts is not None:
        cfg.hole_shifts = int(args.hole_shifts)
    if args.combine is not None:
        cfg.combine = args.combine
    if args.score is not None:
        cfg.score = args.score
    if args.channels:
        cfg.channels = tuple(int(v) for v in str(args.channels).split(","))
    if args.disc_channels:
        cfg.disc_channels = tuple(int(v) for v in str(args.disc_channels).split(","))
    if args.target_sigma is not None:
        cfg.target_sigma = float(args.target_sigma)
    if args.tta_flip is not None:
        cfg.tta_flip = bool(args.tta_flip)
    if args.smooth_sigma is not None:
        cfg.smooth_sigma = float(args.smooth_sigma)
    if args.baseline_weight < 0 or (args.baseline_weight > 0 and args.arch != "recon-disc"):
        p.error("--baseline-weight must be >= 0, and > 0 only with --arch recon-disc")
    cfg.baseline_weight = float(args.baseline_weight)  # scoring only: training never sees it
    if args.symmetry_weight < 0 or (args.symmetry_weight > 0 and args.arch != "recon-disc"):
        p.error("--symmetry-weight must be >= 0, and > 0 only with --arch recon-disc")
    cfg.symmetry_weight = float(args.symmetry_weight)  # scoring only, as baseline_weight
    for flag, value in (("--recon-weight", args.recon_weight), ("--heal-weight", args.heal_weight),
                        ("--focal-gamma", args.focal_gamma)):
        if value < 0 or (value > 0 and args.arch != "recon-disc"):
            p.error(f"{flag} must be >= 0, and > 0 only with --arch recon-disc")
    if args.pos_weight <= 0:
        p.error("--pos-weight must be positive")
    cfg.recon_weight = float(args.recon_weight)  # scoring only, as baseline_weight
    if args.seg_threshold is not None:
        cfg.seg_threshold = float(args.seg_threshold)
    if args.coord_channels and args.arch != "recon-disc":
        p.error("--coord-channels applies to --arch recon-disc only")
    cfg.coord_channels = bool(args.coord_channels)
    if args.context_mm < 0 or (args.context_mm > 0 and (args.arch != "recon-disc" or args.coord_channels
                                                        or args.acquisition or args.match_contrast)):
        p.error("--context-mm must be >= 0, and > 0 only with --arch recon-disc, without --coord-channels, "
                "--acquisition and --match-contrast")
    cfg.context_mm = float(args.context_mm)
    if args.context_planes < 1 or (args.context_planes > 1 and args.context_mm <= 0):
        p.error("--context-planes must be >= 1, and > 1 only with --context-mm > 0")
    cfg.context_planes = int(args.context_planes)
    if args.data is None:
        from ..datasets import data_dir

        args.data = data_dir()
    started = time.time()
    sset = cached_training_slices(args.data, cfg, args.cache or default_cache(cfg))
    if args.match_contrast:
        extra = contrast_matched(sset, "studyforrest", "uih")
        sset = SliceSet(np.concatenate([sset.images, extra]), sset.sources + ["studyforrest-as-uih"] * len(extra))
    if (sset.images.ndim == 4) != (cfg.context_mm > 0) or (sset.images.ndim == 4
                                                            and sset.images.shape[1] != input_planes(cfg)):
        held = f"2.5D stacks of {sset.images.shape[1]} planes" if sset.images.ndim == 4 else "2D slices"
        p.error(f"{args.cache or default_cache(cfg)} holds {held} but --context-mm is {cfg.context_mm:g} and "
                f"--context-planes {cfg.context_planes}: use another --cache (or none: one per setting is made "
                f"beside {DEFAULT_CACHE})")
    images = sset.images[: args.limit] if args.limit else sset.images
    print(f"{len(images)} training {'stacks' if images.ndim == 4 else 'slices'} ({', '.join(f'{s}: {sset.sources.count(s)}' for s in sorted(set(sset.sources)))})",
          flush=True)
    weights = None
    if args.uih_share is not None:
        src = np.array(sset.sources[: len(images)])
        n_uih, n_other = int((src == "uih").sum()), int((src != "uih").sum())
        if not 0.0 <= args.uih_share <= 1.0 or (args.uih_share > 0 and n_uih == 0) or (args.uih_share < 1 and n_other == 0):
            p.error(f"--uih-share {args.uih_share}: must be in [0, 1], with slices of each source it draws from "
                    f"(UIH: {n_uih}, others: {n_other})")
        weights = np.where(src == "uih", args.uih_share / max(n_uih, 1), (1.0 - args.uih_share) / max(n_other, 1))
    elif args.balance_sources:  # each slice weighted by 1 / (slices of its series)
        weights = source_weights(sset.sources[: len(images)])
    nets = []
    for member in range(args.members):
        if args.members > 1:
            print(f"member {member + 1} of {args.members}: seed {args.seed + member}", flush=True)
        nets.append(train(images, cfg, args.steps, batch=args.batch, lr=args.lr, seed=args.seed + member,
                          max_minutes=args.max_minutes, checkpoint=args.out.with_suffix(".partial.safetensors"),
                          log_every=max(1, min(50, args.steps // 4)), init=args.init, crop=args.crop, beta=args.beta,
                          sample_weights=weights, acquisition_aug=args.acquisition, curves=args.contrast_curves,
                          elastic=args.elastic, bright=args.bright_anomalies,
                          keep_texture=args.keep_texture, pos_weight=args.pos_weight,
                          focal_gamma=args.focal_gamma, heal_weight=args.heal_weight))
    net = nets[0] if len(nets) == 1 else ReconDiscEnsemble(nets).eval()
    cfg.members = len(nets)
    train_minutes = (time.time() - started) / 60
    # recon-disc scores a probability (0.5: as likely anomalous as not); the others a residual
    # that calibration maps to [0, 1]
    cfg.error_scale = 1.0 if cfg.arch == "recon-disc" else calibrate(net, images, cfg, count=args.calibrate_slices)
    cfg.extra = {"init": str(args.init.name) if args.init else None, "steps": args.steps, "batch": args.batch, "lr": args.lr,
                 "crop": args.crop, "beta": args.beta, "seed": args.seed, "threads": args.threads,
                 "balance_sources": args.balance_sources, "uih_share": args.uih_share, "acquisition": args.acquisition,
                 "contrast_curves": args.contrast_curves, "match_contrast": args.match_contrast,
                 "elastic": args.elastic, "bright_anomalies": args.bright_anomalies,
                 "keep_texture": args.keep_texture, "pos_weight": args.pos_weight, "focal_gamma": args.focal_gamma,
                 "heal_weight": args.heal_weight,
                 "train_minutes": round(train_minutes, 1), "train_slices": len(images),
                 "held_out": f"{HOLDOUT_SERIES} sagittal slices {HELD_OUT[0]}..{HELD_OUT[1] - 1}",
                 "train_intensity_ref": cfg.intensity_ref, "train_intensity_max": cfg.intensity_max,
                 "member_seeds": [args.seed + m for m in range(len(nets))]}
    # the pipeline and the eval command scale intensities as the weights' config says
    cfg.intensity_ref = args.serve_intensity_ref or cfg.intensity_ref
    if args.serve_intensity_max is not None:
        cfg.intensity_max = float(args.serve_intensity_max)
    save_trained(net, cfg, args.out)
    print(f"saved {args.out} (error scale {cfg.error_scale:.4f})", flush=True)
    return 0


def _combine_members(p: argparse.ArgumentParser, paths: list[Path], out: Path,
                     recon_weight: float | None = None, seg_threshold: float | None = None) -> int:
    """``--combine-members``: single recon-disc weight files -> one ensemble file (no training);
    ``recon_weight``: the ensemble's (every member's set to it first), else the members' own;
    ``seg_threshold``: the ensemble's, else the members' own."""
    if len(paths) < 2:
        p.error("--combine-members needs at least two weight files")
    missing = [str(v) for v in paths if not v.is_file()]
    if missing:
        p.error(f"--combine-members: no such file: {', '.join(missing)}")
    try:
        nets, cfgs = zip(*[load_model(v) for v in paths])
        if recon_weight is not None:
            cfgs = [dataclasses.replace(c, recon_weight=float(recon_weight)) for c in cfgs]
        net, cfg = ensemble_of(list(nets), list(cfgs))
    except ValueError as exc:
        p.error(f"--combine-members: {exc}")
    if seg_threshold is not None:
        cfg.seg_threshold = float(seg_threshold)
    cfg.extra["member_files"] = [v.name for v in paths]
    save_model(net, cfg, out)
    print(f"saved {out}: ensemble of {len(paths)} networks ({', '.join(v.name for v in paths)})", flush=True)
    return 0


# -------------------------------------------------------------------------------- evaluation


@dataclass
class PixelMetrics:
    auroc: float
    auprc: float
    best_dice: float
    best_threshold: float


def pixel_metrics(scores: np.ndarray, truth: np.ndarray) -> PixelMetrics:
    """AUROC (rank statistic), AUPRC (average precision) and the best Dice over thresholds."""
    s = scores.astype(np.float64).ravel()
    t = truth.astype(bool).ravel()
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        return PixelMetrics(float("nan"), float("nan"), float("nan"), float("nan"))
    order = np.argsort(-s, kind="stable")
    s_sorted, t_sorted = s[order], t[order]
    tp = np.cumsum(t_sorted)
    fp = np.cumsum(~t_sorted)
    # Keep the last index of each run of tied scores, so ties count as one threshold.
    last = np.r_[np.nonzero(np.diff(s_sorted))[0], s.size - 1]
    tp, fp = tp[last], fp[last]
    tpr = np.r_[0.0, tp / n_pos]
    fpr = np.r_[0.0, fp / n_neg]
    auroc = float(np.trapezoid(tpr, fpr))
    precision = tp / (tp + fp)
    recall = tp / n_pos
    auprc = float(np.sum(np.diff(np.r_[0.0, recall]) * precision))
    dice = 2 * tp / (tp + fp + n_pos)
    best = int(np.argmax(dice))
    return PixelMetrics(auroc, auprc, float(dice[best]), float(s_sorted[last][best]))


@dataclass
class EvalCase:
    images: np.ndarray
    truth: np.ndarray
    masks: np.ndarray  # scored pixels: brain region of each lesion-free slice
    #: what was drawn in each slice (``insert_lesions``), for lesion-by-lesion looks
    lesions: list[list[Lesion]] = field(default_factory=list)
    #: each slice's lesion-free view of the other hemisphere (``mirror_slices``), or None
    mirrors: np.ndarray | None = None
    #: each slice's neighbour planes (N, 2 k, H, W; ``neighbour_planes``) with the slice's lesions
    #: drawn into them too (3D lesions), or None (2D lesions: anomaly-ct)
    context: np.ndarray | None = None


def make_eval_cases(normal: np.ndarray, cfg: AnomalyConfig, seed: int = 1234,
                    fractions: list[float] | None = None, regions: np.ndarray | None = None,
                    mirrors: np.ndarray | None = None, context: np.ndarray | None = None,
                    draw_in_neighbours=lesions_in_neighbour) -> EvalCase:
    """1-3 synthetic lesions in each slice, inside its region, which is also what is scored:
    ``regions`` where given (anomaly-ct: inside the skull), else ``brain_region`` (upper
    ``fractions[i]`` of the head; 0.55, for sagittal slices, where none is given). Given the
    slices' neighbour planes ``context``, each lesion is drawn into the nearest one on each side
    too (``draw_in_neighbours(planes, blends, rng)``, default ``lesions_in_neighbour``: same
    extent and level, a texture correlated with the slice's), from a second random stream, so
    the slices and their lesions are the same either way; into planes further out (a network
    that reads two or more on each side, ``eval_context_mm`` apart) as an ellipsoid's cross-section
    (``lesions_in_far_plane``), from a third stream, so the nearest planes are the same too.
    A lesion absent from the planes a network reads would be scored against the normal tissue
    right beside it, which no real lesion of this size offers (session 18)."""
    rng = np.random.default_rng(seed)
    neighbour_rng = np.random.default_rng(seed + 1000)
    far_rng = np.random.default_rng(seed + 2000)
    context = None if context is None else np.array(context, dtype=np.float32, copy=True)
    if regions is None:
        masks = foreground_mask(torch.from_numpy(normal[:, None]), cfg.mask_erode_px)[:, 0].numpy() > 0
        fractions = fractions if fractions is not None else [0.55] * len(normal)
        regions = np.stack([brain_region(m, fraction) for m, fraction in zip(masks, fractions)])
    imgs, truths, lesions = [], [], []
    for n, (img, region) in enumerate(zip(normal, regions)):
        blends: list | None = [] if context is not None else None
        out, truth, drawn = insert_lesions(img, region, rng, count=int(rng.integers(1, 4)), record=blends)
        if context is not None:
            reach = context.shape[1] // 2
            near = [reach - 1, reach]  # below, above: the nearest planes
            context[n, near] = draw_in_neighbours(context[n, near], blends or [], neighbour_rng)
            for j in range(2, reach + 1):  # further out, below then above
                for c in (reach - j, reach + j - 1):
                    context[n, c] = lesions_in_far_plane(context[n, c], blends or [], drawn,
                                                         j * eval_context_mm(cfg) / cfg.pixel_mm, far_rng)
        imgs.append(out)
        truths.append(truth)
        lesions.append(drawn)
    return EvalCase(np.stack(imgs), np.stack(truths), np.asarray(regions), lesions, mirrors, context)


def brain_region(foreground: np.ndarray, fraction: float = 0.55) -> np.ndarray:
    """The upper ``fraction`` of the head in a slice (0.55 in a sagittal or coronal one: above
    the skull base; 1 in an axial one): a crude stand-in for a brain mask (no skull stripping
    here). Lesions are drawn, and both methods scored, only there."""
    rows = np.nonzero(foreground.any(axis=1))[0]
    region = foreground.copy()
    if rows.size:
        region[rows[0] + int(fraction * (rows[-1] - rows[0])):] = False
    return region


def evaluate(net: torch.nn.Module, cfg: AnomalyConfig, case: EvalCase) -> dict:
    x = torch.from_numpy(case.images[:, None])
    mirrors = None if case.mirrors is None else torch.from_numpy(np.ascontiguousarray(case.mirrors[:, None]))
    context = None if case.context is None else torch.from_numpy(np.ascontiguousarray(case.context))
    err, recon = residual_maps(net, x, cfg, mirrors, context)
    base = intensity_baseline(x, cfg)
    # Score only inside the brain regions of the lesion-free slices (identical for both).
    m = case.masks
    model = pixel_metrics(err[:, 0].numpy()[m], case.truth[m])
    baseline = pixel_metrics(base[:, 0].numpy()[m], case.truth[m])
    return {
        "model": asdict(model),
        "baseline": asdict(baseline),
        "slices": int(len(case.images)),
        "lesion_pixels": int(case.truth.sum()),
        "scored_pixels": int(m.sum()),
        "_maps": (err[:, 0].numpy(), base[:, 0].numpy(), recon[:, 0].numpy()),
    }


def plot_panel(case: EvalCase, maps: tuple[np.ndarray, np.ndarray, np.ndarray], path: Path, cfg: AnomalyConfig,
               rows: int = 4) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    err, base, recon = maps
    order = np.argsort(-case.truth.sum(axis=(1, 2)))
    pick = order[np.linspace(0, max(0, len(order) // 2), rows).astype(int)]
    fig, axes = plt.subplots(rows, 5, figsize=(12.5, 2.6 * rows))
    titles = ("image + lesions", "reconstruction", "model map", "intensity baseline", "truth")
    for r, i in enumerate(pick):
        panels = (case.images[i], recon[i], np.clip(err[i] / cfg.error_scale, 0, 1), base[i], case.truth[i])
        for c, (ax, im) in enumerate(zip(axes[r], panels)):
            ax.imshow(im, cmap="gray" if c in (0, 1, 4) else "inferno", vmin=0 if c != 3 else None,
                      vmax=(1.2 if c < 2 else None))
            ax.set_axis_off()
            if r == 0:
                ax.set_title(titles[c], fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def external_slices(root: Path, cfg: AnomalyConfig, step: int = 2
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, list[float]]:
    """Evaluation slices from any folder of DICOM MR series (other scanners, contrasts, planes):
    every ``step``-th slice of each series in its acquisition plane, as the node serves it, kept
    where the head fills a fifth of the canvas. Returns the slices, their mirrors
    (``mirror_slices``), a description and each slice's ``brain_region`` fraction (axial: the
    whole head; sagittal, coronal: the upper 55 %)."""
    from ..volume import series_volumes

    images: list[np.ndarray] = []
    mirrors: list[np.ndarray] = []
    context: list[np.ndarray] = []
    fractions: list[float] = []
    used: list[str] = []
    for uid, vol in series_volumes(root, "MR", "external evaluation"):
        arr = normalise_volume(vol.array, cfg)
        got, their_mirrors, their_context = series_slices(vol, arr, range(0, arr.shape[0], step),
                                                          has_mirror_slices(vol) and cfg.symmetry_weight > 0, cfg)
        plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(vol.normal)))]
        log.info("external evaluation: %s series %s: %d of %d slices used", plane, uid, len(got), arr.shape[0])
        images += list(got)
        mirrors += list(their_mirrors)
        context += list(their_context)
        fractions += [1.0 if plane == "axial" else 0.55] * len(got)
        used.append(f"{plane}, {len(got)} of {arr.shape[0]} slices")
    if not images:
        raise SystemExit(f"{root}: no MR slices with enough head to evaluate (expected the shared data folder "
                         f"holding {HOLDOUT_SERIES}/, or a folder of DICOM MR series)")
    what = f"{len(used)} MR series under {root.name or root} ({'; '.join(used)}, every {step}. slice)"
    return np.stack(images), np.stack(mirrors), np.stack(context), what, fractions


SPLITS = {
    "held-out": (f"{HOLDOUT_SERIES} sagittal slices {HELD_OUT[0]}..{HELD_OUT[1] - 1} (every 2nd)", held_out_slices),
    "val-studyforrest": ("mr/studyforrest-t1 central odd sagittal slices", validation_slices),
    "val-uih-gap": (f"{HOLDOUT_SERIES} sagittal slices {HELD_OUT[0] - HOLDOUT_GAP}..{HELD_OUT[0] - 1} and "
                    f"{HELD_OUT[1]}..{HELD_OUT[1] + HOLDOUT_GAP - 1}", gap_slices),
}


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"pacs-node models eval {MODEL_NAME}")
    p.add_argument("--data", type=Path, required=True,
                   help="unpacked shared data (folder holding mr/): the held-out evaluation; or any folder of "
                        "DICOM MR series (other scanners, contrasts, planes): split 'external'")
    add_eval_arguments(p, MODEL_NAME)
    p.add_argument("--split", choices=(*SPLITS, "external"), default=None,
                   help="held-out (default where --data holds the shared data): the reported evaluation; "
                        "val-studyforrest / val-uih-gap: the model-selection slices (the model card used seeds "
                        "97, 98, 99 there); external (default otherwise): every MR series under --data")
    p.add_argument("--symmetry-weight", type=float, default=None,
                   help="score with this weight of the other-hemisphere term instead of the weights' own "
                        "(0: off; for choosing it on the validation splits)")
    p.add_argument("--recon-weight", type=float, default=None,
                   help="score with this weight of the reconstruction-residual term instead of the weights' own "
                        "(0: off; for choosing it on the validation splits)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    net, cfg = load_model(args.model)
    if args.recon_weight is not None:
        if args.recon_weight < 0 or cfg.arch != "recon-disc":
            p.error("--recon-weight must be >= 0, for recon-disc weights")
        cfg = dataclasses.replace(cfg, recon_weight=float(args.recon_weight))
    if args.symmetry_weight is not None:
        if args.symmetry_weight < 0:
            p.error("--symmetry-weight must be >= 0")
        cfg = dataclasses.replace(cfg, symmetry_weight=float(args.symmetry_weight))
    shared = (args.data / HOLDOUT_SERIES).is_dir()
    split = args.split or ("held-out" if shared else "external")
    if split == "external":
        if not args.data.exists():
            p.error(f"--data {args.data}: no such file or folder")
        normal, mirrors, context, what, fractions = external_slices(args.data, cfg)
    else:
        if not shared:
            p.error(f"--split {split} needs the shared data folder (holding {HOLDOUT_SERIES}/); "
                    f"{args.data} is not one (use --split external for any folder of MR series)")
        what, pick = SPLITS[split]
        (normal, mirrors, context), fractions = pick(args.data, cfg), None
    case = make_eval_cases(normal, cfg, seed=args.seed, fractions=fractions, mirrors=mirrors, context=context)
    res = evaluate(net, cfg, case)
    res["data"] = f"{what}, synthetic lesions seed {args.seed}"
    res["symmetry_weight"] = cfg.symmetry_weight
    report(res, case, cfg, split, args.json, args.plot)
    return 0


def report(res: dict, case: EvalCase, cfg: AnomalyConfig, split: str, json_path: Path | None,
           plot_path: Path | None) -> None:
    """Print an evaluation's table; write its JSON and panel where asked (both anomaly models)."""
    maps = res.pop("_maps")
    print(f"{split} slices: {res['slices']}, lesion pixels: {res['lesion_pixels']}, scored pixels: {res['scored_pixels']}")
    print(f"{'method':<22} {'AUROC':>7} {'AUPRC':>7} {'best Dice':>10}")
    for name, key in ((f"model ({cfg.arch})", "model"), ("intensity baseline", "baseline")):
        m = res[key]
        print(f"{name:<22} {m['auroc']:7.4f} {m['auprc']:7.4f} {m['best_dice']:10.4f}")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=2))
    if plot_path:
        plot_panel(case, maps, plot_path, cfg)
