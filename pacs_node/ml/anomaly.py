"""Anomaly maps from networks trained on normal slices only: reconstruction error, raw or learned.

Shared by every modality (``anomaly_mr``, ``anomaly_ct``): slice geometry (resample to a fixed
pixel size and a fixed canvas), the networks, and the turn from reconstruction error to a
score in [0, 1]. Modality-specific parts (intensity normalisation, data, training) live in the
modality modules.

Five interchangeable networks (``AnomalyConfig.arch``), all giving a "normal-looking" version
of a slice whose discrepancy with the slice marks what the model could not explain:
- ``recon-disc``: the served anomaly-mr model, DRAEM (Zavrtanik et al., ICCV 2021). A
  reconstructive U-Net learns to turn a slice with self-made anomalies
  (``pacs_node.ml.synth_anomaly``, never the evaluation lesions) back into the normal slice; a
  discriminative U-Net reads the slice and that reconstruction and learns where they differ
  because of an anomaly. The score is that learned discrepancy, a probability, smoothed. With
  ``context_mm`` > 0 (anomaly-mr since 0.6.0) both networks also read the planes that far below
  and above the slice (``neighbour_planes``): 2.5D;
- ``vae``: convolutional VAE with a spatial latent (16 x 16 at a 128 canvas), no skips;
- ``dae-unet``: a U-Net trained to remove coarse, low-frequency noise (Kascenas et al., MIDL
  2022), which "heals" smooth perturbations;
- ``inpaint-unet``: the same U-Net filling masked squares from their surroundings; at
  inference four grids of squares together cover the slice;
- ``prob-inpaint``: the same U-Net, but for every hidden pixel it predicts a *distribution*
  (Laplace: location and scale): a conditional likelihood model of the hidden pixels given
  their context. The score is the standardised residual |x - location| / scale.
See models/anomaly-mr/README.md for how they compared.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class SliceGrid:
    """Where a source slice sits on the model canvas (for the way back)."""

    source_shape: tuple[int, int]
    scaled_shape: tuple[int, int]
    offset: tuple[int, int]  # top-left of the scaled slice on the canvas (may be negative: cropped)


@dataclass
class AnomalyConfig:
    """Everything needed to rebuild the network and its scoring; stored beside the weights."""

    #: "vae" (SpatialVAE, reconstruction through a spatial latent), "dae-unet" (DenoisingUNet
    #: removing coarse noise), "inpaint-unet" (the same U-Net filling masked squares from context)
    #: or "prob-inpaint" (that U-Net predicting a Laplace location and scale: the served model)
    arch: str = "vae"
    #: inpainting: side of the masked squares at inference (a grid with period 2x, 4 passes)
    mask_px: int = 24
    #: prob-inpaint: hole sides used at inference (one set of grids per side; empty: mask_px)
    hole_sizes: tuple[int, ...] = ()
    #: prob-inpaint: grid phases per hole side and axis; each pixel is hidden shifts**2 times,
    #: at different places in its hole ((2 * shifts)**2 passes per side)
    hole_shifts: int = 1
    #: prob-inpaint: how the standardised residuals of a pixel's passes are combined: "mean",
    #: "max" (largest magnitude) or "centre" (weighted towards passes where it is near the
    #: centre of its hole)
    combine: str = "mean"
    #: prob-inpaint: smallest predicted scale (normalised intensity; the noise floor)
    min_scale: float = 0.01
    #: prob-inpaint: "abs" scores smooth(|z|); "signed" scores |smooth(z)| with z the signed
    #: standardised residual, so that +/- pairs (an edge predicted a pixel off) cancel while a
    #: blob brighter or darker than predicted keeps its score
    score: str = "abs"
    #: prob-inpaint: the modelled quantity is the image Gaussian-smoothed at this sigma (px; 0:
    #: the pixels themselves): the local mean intensity is far more predictable than cortical
    #: texture, and lesions (radius >= 2.5 px) survive the smoothing
    target_sigma: float = 0.0
    #: prob-inpaint / recon-disc: also score the left-right mirrored slice and average
    #: (test-time augmentation)
    tta_flip: bool = False
    #: recon-disc: features of the discriminative U-Net (MONAI BasicUNet: five levels and the
    #: last up-sampling; ``channels`` are the reconstructive U-Net's)
    disc_channels: tuple[int, ...] = (8, 16, 32, 64, 128, 8)
    #: recon-disc: how many independently trained networks (same architecture, other seeds) are
    #: stored; their per-pixel probabilities are averaged (``ReconDiscEnsemble``)
    members: int = 1
    #: recon-disc: the score is 1 - (1 - p) (1 - q), p the network's probability and q =
    #: min(1, baseline_weight * |z|), |z| the intensity-outlier map of ``intensity_baseline``
    #: (Meissen et al.): anomalous if the network says so or the intensity is an outlier. It gives
    #: back bright lesions the network misses on a scanner whose normal anatomy has bright tissue
    #: (the model card); 0: the probability alone
    baseline_weight: float = 0.0
    #: recon-disc: a third noisy-OR term, q = min(1, symmetry_weight * a / 10), a the slice's
    #: difference from the same anatomy of the other hemisphere (``asymmetry_map``: a sagittal
    #: slice against its mirror about the mid-sagittal plane, ``mirror_slices``), in units of
    #: the head's 90th percentile of it; 0: off (and where no mirror is given: axial and coronal
    #: series, slices near the midline)
    symmetry_weight: float = 0.0
    #: recon-disc: a noisy-OR term of the generative part's own residual, q = min(1,
    #: recon_weight * r), r = |slice - reconstruction| smoothed and masked like the map (in the
    #: series' scaled intensity units: white matter near 0.94). Worth it only for a reconstructive
    #: U-Net trained to heal the training anomalies (``--heal-weight``, 0.7.0); one that copies
    #: its input leaves r near the noise; 0: off
    recon_weight: float = 0.0
    #: recon-disc: the discriminator also reads two channels of position within the head
    #: (``head_coordinates``: -1..1 from the head's first to last row and column in the image as
    #: given, i.e. after the training flips), so that what is normal can depend on where in the
    #: head a pixel lies
    coord_channels: bool = False
    #: recon-disc, 2.5D: both networks also read the planes ``context_mm`` below and above the
    #: slice along its normal (``neighbour_planes``: interpolated between the series' slices; at
    #: the ends of a series the slice itself stands in); 0: the slice alone (2D, up to 0.5.0)
    context_mm: float = 0.0
    #: recon-disc, 2.5D: how many planes on each side of the slice, ``context_mm`` apart (1: the
    #: planes at -context_mm and +context_mm, 0.6.0; 2: also those at -2 and +2 x context_mm)
    context_planes: int = 1
    #: recon-disc fusion: the region whose mean and standard deviation the intensity z-score is
    #: taken against, and outside which q is 0: "head" (the eroded head mask, MR) or
    #: "intracranial" (inside a closed ring of skull, ``intracranial_region``: CT on its HU scale)
    outlier_region: str = "head"
    #: the pipeline's default ``threshold`` for the ``segmentation`` output (a rule's own wins):
    #: where the score's best Dice lay on the model's validation slices
    seg_threshold: float = 0.5
    canvas: int = 128
    pixel_mm: float = 2.0
    channels: tuple[int, ...] = (16, 32, 64, 96)
    latent_channels: int = 8
    kl_weight: float = 5e-4
    noise_std: float = 0.2
    noise_res: int = 16
    #: training noise: the sum of coarse noise fields at these resolutions, each with a random
    #: std in [0, noise_std] per sample (empty: one field at noise_res with std noise_std)
    noise_scales: tuple[int, ...] = ()
    smooth_sigma: float = 1.5
    #: if > 0, the signed residual minus its Gaussian blur at this sigma (px) is scored: slow
    #: shading differences between scanner and model are not anomalies, blobs and edges are
    highpass_sigma: float = 0.0
    mask_erode_px: int = 3
    #: reconstruction error that maps to score 1.0 (set from normal training slices)
    error_scale: float = 0.25
    modality: str = "MR"
    #: MR: how a series' intensities are scaled before the network (``anomaly_mr.intensity_scale``):
    #: "foreground-p99" (the 99th percentile of the whole head: up to 0.3.0) or "central-p90"
    #: (the 90th percentile of the head in the central half of the volume, set to 0.94: white
    #: matter near 0.94 whatever the scalp fat does)
    intensity_ref: str = "foreground-p99"
    #: MR: scaled intensities are clipped to [0, intensity_max] (1.5 up to 0.3.0)
    intensity_max: float = 1.5
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["channels"] = list(self.channels)
        data["noise_scales"] = list(self.noise_scales)
        data["hole_sizes"] = list(self.hole_sizes)
        data["disc_channels"] = list(self.disc_channels)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "AnomalyConfig":
        data = json.loads(text)
        data["channels"] = tuple(data["channels"])
        data["noise_scales"] = tuple(data.get("noise_scales", ()))
        data["hole_sizes"] = tuple(data.get("hole_sizes", ()))
        data["disc_channels"] = tuple(data.get("disc_channels", cls.disc_channels))
        return cls(**data)


# ---------------------------------------------------------------------------------- geometry


def to_canvas(plane: np.ndarray, pixel_spacing: tuple[float, float], canvas: int, pixel_mm: float,
              fill: float = 0.0) -> tuple[np.ndarray, SliceGrid]:
    """Resample a slice to ``pixel_mm`` pixels and centre it on a ``canvas`` square."""
    rows, cols = plane.shape
    sh = (max(1, round(rows * pixel_spacing[0] / pixel_mm)), max(1, round(cols * pixel_spacing[1] / pixel_mm)))
    t = torch.from_numpy(np.ascontiguousarray(plane, dtype=np.float32))[None, None]
    scaled = F.interpolate(t, size=sh, mode="bilinear", align_corners=False, antialias=True)[0, 0].numpy()
    out = np.full((canvas, canvas), fill, dtype=np.float32)
    off = ((canvas - sh[0]) // 2, (canvas - sh[1]) // 2)
    src_r0, src_c0 = max(0, -off[0]), max(0, -off[1])
    dst_r0, dst_c0 = max(0, off[0]), max(0, off[1])
    h = min(sh[0] - src_r0, canvas - dst_r0)
    w = min(sh[1] - src_c0, canvas - dst_c0)
    out[dst_r0:dst_r0 + h, dst_c0:dst_c0 + w] = scaled[src_r0:src_r0 + h, src_c0:src_c0 + w]
    return out, SliceGrid(source_shape=(rows, cols), scaled_shape=sh, offset=off)


def from_canvas(values: np.ndarray, grid: SliceGrid, fill: float = 0.0) -> np.ndarray:
    """Inverse of ``to_canvas`` for a map computed on the canvas."""
    canvas = values.shape[0]
    sh, off = grid.scaled_shape, grid.offset
    scaled = np.full(sh, fill, dtype=np.float32)
    src_r0, src_c0 = max(0, off[0]), max(0, off[1])
    dst_r0, dst_c0 = max(0, -off[0]), max(0, -off[1])
    h = min(canvas - src_r0, sh[0] - dst_r0)
    w = min(canvas - src_c0, sh[1] - dst_c0)
    scaled[dst_r0:dst_r0 + h, dst_c0:dst_c0 + w] = values[src_r0:src_r0 + h, src_c0:src_c0 + w]
    t = torch.from_numpy(scaled)[None, None]
    back = F.interpolate(t, size=grid.source_shape, mode="bilinear", align_corners=False)[0, 0].numpy()
    return back


# ----------------------------------------------------------------------------------- network


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.SiLU()]


class SpatialVAE(nn.Module):
    """Strided conv encoder -> spatial Gaussian latent (canvas / 8) -> upsampling conv decoder.

    No skip connections (they would carry anomalies straight to the output) and no
    normalisation layers; deliberately small so that it trains on a CPU in well under an hour.
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 96), latent_channels: int = 8) -> None:
        super().__init__()
        c = channels
        self.encoder = nn.Sequential(
            *_conv(1, c[0], 2), *_conv(c[0], c[1], 2), *_conv(c[1], c[1]), *_conv(c[1], c[2], 2),
            *_conv(c[2], c[3]), nn.Conv2d(c[3], 2 * latent_channels, 1),
        )
        self.decoder = nn.Sequential(
            *_conv(latent_channels, c[3]), *_conv(c[3], c[2]), nn.Upsample(scale_factor=2),
            *_conv(c[2], c[1]), *_conv(c[1], c[1]), nn.Upsample(scale_factor=2),
            *_conv(c[1], c[0]), nn.Upsample(scale_factor=2), *_conv(c[0], c[0]),
            nn.Conv2d(c[0], 1, 3, padding=1),
        )

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        logvar = logvar.clamp(-12.0, 8.0)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        return self.decoder(z), mu, logvar


class DenoisingUNet(nn.Module):
    """Small U-Net trained to remove coarse noise (Kascenas et al.): skips keep normal detail
    sharp, and what it cannot explain as normal anatomy plus noise it "heals" away.

    Same call signature as SpatialVAE (returns mu/logvar as empty tensors: no latent prior).
    """

    def __init__(self, channels: tuple[int, ...] = (16, 32, 64, 96), in_channels: int = 1,
                 out_channels: int = 1) -> None:
        super().__init__()
        c = channels
        self.inc = nn.Sequential(*_conv(in_channels, c[0]), *_conv(c[0], c[0]))
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c[i], c[i + 1], 3, stride=2, padding=1), nn.SiLU(), *_conv(c[i + 1], c[i + 1]))
            for i in range(len(c) - 1)
        )
        self.ups = nn.ModuleList(
            nn.Sequential(*_conv(c[i + 1] + c[i], c[i]), *_conv(c[i], c[i]))
            for i in reversed(range(len(c) - 1))
        )
        self.out = nn.Conv2d(c[0], out_channels, 1)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for up in self.ups:
            skip = skips.pop()
            h = up(torch.cat([F.interpolate(h, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        empty = x.new_zeros((x.shape[0], 0, 1, 1))
        out = self.out(h)
        if out.shape[1] == 2:  # prob-inpaint: location and raw scale of each pixel's distribution
            return out[:, :1], out[:, 1:], empty
        return out, empty, empty


class ReconDisc(nn.Module):
    """DRAEM (Zavrtanik et al., ICCV 2021): a reconstructive U-Net that turns a slice into its
    normal-looking version, and a discriminative U-Net that reads the slice *and* that
    reconstruction and outputs, per pixel, the logit that the two differ because of an anomaly:
    a learned reconstruction-error metric instead of a fixed |x - reconstruction|.

    Same call signature as the other networks: returns (logits, reconstruction, empty)."""

    def __init__(self, recon_channels: tuple[int, ...], disc_channels: tuple[int, ...], coords: bool = False,
                 planes: int = 1) -> None:
        from monai.networks.nets import BasicUNet

        super().__init__()
        self.coords = coords
        self.planes = planes  # 2 k + 1: the slice between k planes on each side (2.5D, ``context_mm``)
        self.recon = DenoisingUNet(recon_channels, in_channels=planes)
        # instance normalisation: without it the discriminator did not start learning within
        # 1,000 CPU steps (probe AUROC ~0.57); with it, 0.8 after 300
        self.disc = BasicUNet(spatial_dims=2, in_channels=planes + (3 if coords else 1), out_channels=1,
                              features=disc_channels, norm=("instance", {"affine": True}))

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x``: (B, planes, H, W): the slice, or (2.5D) the planes below, the slice and the planes
        above (``network_input``); then two channels of ``head_coordinates`` for a network with ``coords``. The
        reconstruction is the slice's (the middle plane's)."""
        k = self.planes
        image = x[:, :k]
        recon = self.recon(image)[0]
        parts = [image, recon, x[:, k:k + 2]] if self.coords else [image, recon]
        logits = self.disc(torch.cat(parts, dim=1))
        return logits, recon, x.new_zeros((x.shape[0], 0, 1, 1))


class ReconDiscEnsemble(nn.Module):
    """Several ``ReconDisc`` networks trained alone with other seeds: the per-pixel anomaly
    probability is the mean of theirs (returned as its logit, so callers treat it like one
    network's output), the reconstruction the mean of theirs. Networks trained from other
    random starts and anomaly streams make different false positives on unseen anatomy and
    contrast, while a lesion is seen by each of them."""

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor, sample: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prob = recon = None
        for member in self.members:
            logits, rec, _ = member(x, sample)
            p = torch.sigmoid(logits)
            prob = p if prob is None else prob + p
            recon = rec if recon is None else recon + rec
        n = len(self.members)
        return torch.logit(prob / n, eps=1e-6), recon / n, x.new_zeros((x.shape[0], 0, 1, 1))


def input_planes(cfg: AnomalyConfig) -> int:
    """The planes a recon-disc network reads: the slice, and (2.5D) ``cfg.context_planes`` on
    each side of it."""
    return 1 + 2 * cfg.context_planes if cfg.context_mm > 0 else 1


def build_network(cfg: AnomalyConfig) -> nn.Module:
    if cfg.arch == "recon-disc":
        planes = input_planes(cfg)
        if cfg.members > 1:
            return ReconDiscEnsemble([ReconDisc(cfg.channels, cfg.disc_channels, cfg.coord_channels, planes)
                                      for _ in range(cfg.members)])
        return ReconDisc(cfg.channels, cfg.disc_channels, cfg.coord_channels, planes)
    if cfg.arch == "dae-unet":
        return DenoisingUNet(cfg.channels)
    if cfg.arch == "inpaint-unet":
        return DenoisingUNet(cfg.channels, in_channels=2)  # image with holes + the hole mask
    if cfg.arch == "prob-inpaint":
        return DenoisingUNet(cfg.channels, in_channels=2, out_channels=2)  # location, scale
    return SpatialVAE(cfg.channels, cfg.latent_channels)


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    if mu.numel() == 0:
        return mu.new_zeros(())
    return 0.5 * torch.mean(torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar, dim=1))


def coarse_noise(shape: tuple[int, ...], std: float, res: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Low-frequency Gaussian noise: drawn at ``res`` x ``res`` and upsampled (Kascenas et al.)."""
    b, _, h, w = shape
    n = torch.randn((b, 1, res, res), generator=generator) * std
    return F.interpolate(n, size=(h, w), mode="bilinear", align_corners=False)


def training_noise(shape: tuple[int, ...], cfg: AnomalyConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """The corruption the denoising model learns to remove (see AnomalyConfig.noise_scales)."""
    if not cfg.noise_scales:
        return coarse_noise(shape, cfg.noise_std, cfg.noise_res, generator)
    total = torch.zeros(shape)
    for res in cfg.noise_scales:
        std = torch.rand((shape[0], 1, 1, 1), generator=generator) * cfg.noise_std
        total = total + coarse_noise(shape, 1.0, res, generator) * std
    return total


# ----------------------------------------------------------------------------------- scoring


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    return k / k.sum()


def smooth(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B, 1, H, W)."""
    if sigma <= 0:
        return maps
    k = gaussian_kernel(sigma).to(maps.device, maps.dtype)
    r = (k.numel() - 1) // 2
    out = F.conv2d(F.pad(maps, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(out, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def foreground_mask(images: torch.Tensor, erode_px: int, level: float = 0.08) -> torch.Tensor:
    """Head/body mask of normalised images (B, 1, H, W): above ``level``, holes closed, eroded.

    Scoring outside it is zero: the background and the outer skin edge carry reconstruction
    error that is not anatomy.
    """
    m = (smooth(images, 1.0) > level).float()
    m = F.max_pool2d(m, 5, stride=1, padding=2)  # close small holes (dark CSF, sinuses)
    m = -F.max_pool2d(-m, 5, stride=1, padding=2)
    if erode_px > 0:
        m = -F.max_pool2d(-m, 2 * erode_px + 1, stride=1, padding=erode_px)
    return m


def inpainting_input(images: torch.Tensor, holes: torch.Tensor) -> torch.Tensor:
    """Two channels: the image with the holes zeroed, and the hole mask."""
    return torch.cat([images * (1.0 - holes), holes], dim=1)


def grid_holes(shape: tuple[int, ...], side: int) -> list[torch.Tensor]:
    """Four masks of ``side`` squares on a grid of period 2 * side; together they cover all."""
    _, _, h, w = shape
    yy = torch.arange(h).view(-1, 1)
    xx = torch.arange(w).view(1, -1)
    masks = []
    for oy in (0, side):
        for ox in (0, side):
            m = ((((yy + oy) // side) % 2 == 0) & (((xx + ox) // side) % 2 == 0)).float()
            masks.append(m.expand(shape[0], 1, h, w))
    return masks


def shifted_grid_holes(shape: tuple[int, ...], side: int, shifts: int,
                       with_weights: bool = False) -> list[torch.Tensor] | list[tuple[torch.Tensor, torch.Tensor]]:
    """Masks of ``side`` squares on a grid of period 2 * side, at (2 * shifts)**2 phases: each
    pixel is hidden in shifts**2 of them, each time at another place within its square.

    With ``with_weights``, each mask comes with a weight map: 1 at the centre of each square
    falling linearly to about 0 at its border (the centre of a hole is the least influenced by
    what lies just outside it)."""
    _, _, h, w = shape
    yy = torch.arange(h).view(-1, 1)
    xx = torch.arange(w).view(1, -1)
    step = 2 * side / (2 * shifts)
    phases = [int(round(i * step)) for i in range(2 * shifts)]
    out = []
    for oy in phases:
        for ox in phases:
            m = ((((yy + oy) // side) % 2 == 0) & (((xx + ox) // side) % 2 == 0)).float().expand(shape[0], 1, h, w)
            if not with_weights:
                out.append(m)
                continue
            wy = 1.0 - (2.0 * (((yy + oy) % side).float() + 0.5) / side - 1.0).abs()
            wx = 1.0 - (2.0 * (((xx + ox) % side).float() + 0.5) / side - 1.0).abs()
            out.append((m, m * (wy * wx).expand(shape[0], 1, h, w)))
    return out


def laplace_scale(raw: torch.Tensor, cfg: AnomalyConfig) -> torch.Tensor:
    """Positive scale of the predicted Laplace distribution from the network's raw output."""
    return F.softplus(raw) + cfg.min_scale


def laplace_nll(x: torch.Tensor, loc: torch.Tensor, raw_scale: torch.Tensor, cfg: AnomalyConfig,
                beta: float = 0.5) -> torch.Tensor:
    """Per-pixel Laplace negative log-likelihood (+ log 2), weighted by scale**beta (detached).

    The weight (as in beta-NLL, Seitzer et al. 2022) keeps the location learning at a steady
    pace where the scale is large; it does not move the optimum of the scale.
    """
    b = laplace_scale(raw_scale, cfg)
    nll = (x - loc).abs() / b + torch.log(b)
    return nll * b.detach() ** beta if beta > 0 else nll


def _mirror_averaged(maps_of, images: torch.Tensor, enabled: bool) -> tuple[torch.Tensor, ...]:
    """``maps_of(images)``, each map averaged with its counterpart from the left-right mirrored
    slice (flipped back) when ``enabled`` (test-time augmentation, ``cfg.tta_flip``)."""
    maps = maps_of(images)
    if not enabled:
        return maps
    mirrored = maps_of(images.flip(-1))
    return tuple((m + f.flip(-1)) / 2 for m, f in zip(maps, mirrored))


def prob_inpaint_maps(net: nn.Module, images: torch.Tensor, cfg: AnomalyConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``_prob_inpaint_maps``, averaged with that of the mirrored slice if ``cfg.tta_flip``."""
    return _mirror_averaged(lambda x: _prob_inpaint_maps(net, x, cfg), images, cfg.tta_flip)


def _prob_inpaint_maps(net: nn.Module, images: torch.Tensor, cfg: AnomalyConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standardised residual |x - loc| / scale of every pixel (signed if ``cfg.score`` is
    "signed"), combined over the passes in which it was hidden, and the mean location and scale
    predicted for it (all (B, 1, H, W))."""
    z_total = torch.zeros_like(images)
    loc_total = torch.zeros_like(images)
    scale_total = torch.zeros_like(images)
    count = torch.zeros_like(images)
    weight_total = torch.zeros_like(images)
    target = smooth(images, cfg.target_sigma)
    for side in cfg.hole_sizes or (cfg.mask_px,):
        for holes, centre in shifted_grid_holes(tuple(images.shape), side, max(1, cfg.hole_shifts), with_weights=True):
            loc, raw, _ = net(inpainting_input(images, holes), sample=False)
            b = laplace_scale(raw, cfg)
            z = (target - loc) / b
            if cfg.score != "signed":
                z = z.abs()
            if cfg.combine == "max":  # the pass with the largest |z| (sign kept)
                z_total = torch.where((z * holes).abs() > z_total.abs(), z * holes, z_total)
            else:
                weight = centre if cfg.combine == "centre" else holes
                z_total = z_total + z * weight
                weight_total = weight_total + weight
            loc_total = loc_total + loc * holes
            scale_total = scale_total + b * holes
            count = count + holes
    count = count.clamp_min(1.0)
    z = z_total if cfg.combine == "max" else z_total / weight_total.clamp_min(1e-6)
    return z, loc_total / count, scale_total / count


def head_coordinates(images: torch.Tensor) -> torch.Tensor:
    """(B, 2, H, W): each pixel's row and column position relative to the head in its slice,
    -1 at the head's first row (column) and +1 at its last, linear beyond (the head: the
    foreground mask, not eroded). A slice without head gets the image's own extent."""
    b, _, h, w = images.shape
    mask = foreground_mask(images, 0)[:, 0] > 0
    rows = torch.arange(h, dtype=images.dtype).view(1, h, 1).expand(b, h, w)
    cols = torch.arange(w, dtype=images.dtype).view(1, 1, w).expand(b, h, w)
    out = images.new_zeros((b, 2, h, w))
    for i in range(b):
        ys = torch.nonzero(mask[i].any(dim=1)).flatten()
        xs = torch.nonzero(mask[i].any(dim=0)).flatten()
        y0, y1 = (float(ys[0]), float(ys[-1])) if ys.numel() > 1 else (0.0, float(h - 1))
        x0, x1 = (float(xs[0]), float(xs[-1])) if xs.numel() > 1 else (0.0, float(w - 1))
        out[i, 0] = (rows[i] - y0) / max(y1 - y0, 1.0) * 2 - 1
        out[i, 1] = (cols[i] - x0) / max(x1 - x0, 1.0) * 2 - 1
    return out


def network_input(images: torch.Tensor, cfg: AnomalyConfig, context: torch.Tensor | None = None) -> torch.Tensor:
    """What a recon-disc network is called with: the slices (B, 1, H, W), between their
    neighbour planes (``context``, (B, 2 k, H, W), k = ``cfg.context_planes``, in order along the
    normal: the k planes below, then the k above, as ``neighbour_planes`` gives them; the slice
    itself where None) for a 2.5D network (``cfg.context_mm`` > 0), and their head coordinates
    when ``cfg.coord_channels``."""
    x = images
    if cfg.context_mm > 0:
        k = cfg.context_planes
        if context is None:
            x = images.expand(-1, 2 * k + 1, -1, -1)
        else:
            x = torch.cat([context[:, :k], images, context[:, k:2 * k]], dim=1)
    return torch.cat([x, head_coordinates(images)], dim=1) if cfg.coord_channels else x


def recon_disc_maps(net: nn.Module, images: torch.Tensor, cfg: AnomalyConfig,
                    context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """recon-disc: per-pixel anomaly probability and the reconstruction (averaged with those of
    the mirrored slice if ``cfg.tta_flip``); ``context``: see ``network_input``."""
    def maps_of(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x: the slices, then their neighbours
        logits, recon, _ = net(network_input(x[:, :1], cfg, x[:, 1:] if x.shape[1] > 1 else None), sample=False)
        return torch.sigmoid(logits), recon

    # the planes of a 2.5D stack are mirrored together
    x = images if context is None or cfg.context_mm <= 0 else torch.cat([images, context], dim=1)
    return _mirror_averaged(maps_of, x, cfg.tta_flip)


def reconstruct(net: nn.Module, images: torch.Tensor, cfg: AnomalyConfig) -> torch.Tensor:
    """The model's normal-looking version of ``images``."""
    if cfg.arch == "prob-inpaint":
        return prob_inpaint_maps(net, images, cfg)[1]
    if cfg.arch == "recon-disc":
        return recon_disc_maps(net, images, cfg)[1]
    if cfg.arch != "inpaint-unet":
        return net(images, sample=False)[0]
    recon = torch.zeros_like(images)
    for holes in grid_holes(tuple(images.shape), cfg.mask_px):
        filled = net(inpainting_input(images, holes), sample=False)[0]
        recon = recon + filled * holes
    return recon


@torch.no_grad()
def residual_maps(net: nn.Module, images: torch.Tensor, cfg: AnomalyConfig,
                  mirrors: torch.Tensor | None = None,
                  context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed, masked reconstruction error (B, 1, H, W) and the reconstructions. recon-disc:
    fused with the intensity outliers and, given each slice's ``mirrors`` (``mirror_slices``),
    its asymmetry, as the weights' config says; a 2.5D network (``cfg.context_mm``) also reads
    each slice's neighbour planes ``context`` (B, 2 k, H, W; ``neighbour_planes``).

    For ``prob-inpaint`` the "error" is the standardised residual |x - loc| / scale (in units
    of the scale the model predicted for that pixel), smoothed and masked the same way; the
    reconstruction is the predicted location. The pipeline and the eval both call this.
    """
    if cfg.arch == "recon-disc":
        prob, recon = recon_disc_maps(net, images, cfg, context)
        return recon_disc_score(prob, images, recon, cfg, mirrors), recon
    if cfg.arch == "prob-inpaint":
        z, loc, _ = prob_inpaint_maps(net, images, cfg)
        err = smooth(z, cfg.smooth_sigma)
        if cfg.score == "signed":
            err = err.abs()
        err = err * foreground_mask(images, cfg.mask_erode_px)
        return err, loc
    recon = reconstruct(net, images, cfg)
    signed = images - recon
    if cfg.highpass_sigma > 0:
        signed = signed - smooth(signed, cfg.highpass_sigma)
    err = signed.abs()
    err = smooth(err, cfg.smooth_sigma) * foreground_mask(images, cfg.mask_erode_px)
    return err, recon


def recon_disc_score(prob: torch.Tensor, images: torch.Tensor, recon: torch.Tensor, cfg: AnomalyConfig,
                     mirrors: torch.Tensor | None = None) -> torch.Tensor:
    """recon-disc's served map from the network's probability ``prob`` (B, 1, H, W): smoothed,
    zero outside the head mask, then fused as the weights' config says with the intensity
    outliers, the reconstruction's residual and (given ``mirrors``) the asymmetry."""
    mask = foreground_mask(images, cfg.mask_erode_px)
    err = smooth(prob, cfg.smooth_sigma) * mask
    err = fuse_reconstruction_error(fuse_intensity_outliers(err, images, cfg), images, recon, cfg, mask)
    return fuse_asymmetry(err, images, mirrors, cfg)


def to_score(err: torch.Tensor | np.ndarray, cfg: AnomalyConfig) -> np.ndarray:
    """Reconstruction error -> [0, 1]; 0.5 is about the 99.9th percentile of normal tissue."""
    arr = err.numpy() if isinstance(err, torch.Tensor) else np.asarray(err)
    return np.clip(arr / cfg.error_scale, 0.0, 1.0).astype(np.float32)


#: an intracranial region smaller than this (canvas pixels: 16 cm^2 at 2 mm) counts as none
MIN_INTRACRANIAL_PX = 400


def intracranial_region(image: np.ndarray, erode_px: int = 2, max_gap_px: int = 3) -> np.ndarray:
    """Pixels inside the skull of a CT slice on the CT model's scale (``anomaly_ct.CT_WINDOW``:
    -20..100 HU to 0..1): what the ring of bone (>= 1.4, i.e. 148 HU) encloses, minus the bone
    itself and air, eroded by ``erode_px``, its largest part (not an orbit or a sinus cell). The
    ring is grown by 1, 2, ... ``max_gap_px`` pixels until it encloses a region (thin temporal
    bone leaves gaps at 2 mm pixels). Empty where no region of ``MIN_INTRACRANIAL_PX`` is
    enclosed (skull base, vertex cuts, an open skull)."""
    from scipy import ndimage

    bone = image >= 1.4
    outside_bone = ~ndimage.binary_dilation(bone, iterations=1) & (image > 0.05)
    for grow in range(1, max_gap_px + 1):
        inside = ndimage.binary_fill_holes(ndimage.binary_dilation(bone, iterations=grow)) & outside_bone
        if erode_px:
            inside = ndimage.binary_erosion(inside, iterations=erode_px)
        labels, n = ndimage.label(inside)
        if n > 1:
            sizes = ndimage.sum(inside, labels, range(1, n + 1))
            inside = labels == (1 + int(np.argmax(sizes)))
        if inside.sum() >= MIN_INTRACRANIAL_PX:
            return inside
    return np.zeros_like(bone)


def outlier_mask(images: torch.Tensor, cfg: AnomalyConfig) -> torch.Tensor:
    """(B, 1, H, W) float mask of the region the intensity outliers are measured in (``cfg.outlier_region``)."""
    if cfg.outlier_region == "head":
        return foreground_mask(images, cfg.mask_erode_px)
    if cfg.outlier_region == "intracranial":
        arr = images[:, 0].detach().float().cpu().numpy()
        masks = np.stack([intracranial_region(a) for a in arr]).astype(np.float32)
        return torch.from_numpy(masks[:, None]).to(images.device, images.dtype)
    raise ValueError(f"unknown outlier_region {cfg.outlier_region!r} (known: head, intracranial)")


def intensity_baseline(images: torch.Tensor, cfg: AnomalyConfig) -> torch.Tensor:
    """Meissen et al.'s baseline: bright or dark outliers after per-slice normalisation.

    |z-score| of the intensity within the foreground, smoothed like the model's residual so
    that the comparison is about the model, not the post-processing. Inside the skull (CT,
    ``outlier_region = "intracranial"``) only the region's own z enters the smoothing: the
    bone around it (z of 10 or more) would otherwise light up the brain's edge.
    """
    z, mask = intensity_z(images, cfg)
    if cfg.outlier_region == "intracranial":
        return smooth(z.abs() * mask, cfg.smooth_sigma) * mask
    return smooth(z.abs(), cfg.smooth_sigma) * mask


def intensity_z(images: torch.Tensor, cfg: AnomalyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed z-score of each pixel's intensity against its slice's foreground (mean and
    standard deviation inside the eroded head mask), and that mask."""
    mask = outlier_mask(images, cfg)
    n = mask.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    mean = (images * mask).sum(dim=(2, 3), keepdim=True) / n
    var = (((images - mean) * mask) ** 2).sum(dim=(2, 3), keepdim=True) / n
    return (images - mean) / var.sqrt().clamp_min(1e-6), mask


def _ncc(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Normalised cross-correlation of ``a`` and ``b`` inside ``mask`` where ``b`` is defined (0
    for fewer than two such pixels)."""
    mask = mask & np.isfinite(b)
    if int(mask.sum()) < 2:
        return 0.0
    a, b = a[mask] - a[mask].mean(), b[mask] - b[mask].mean()
    return float((a * b).sum() / (np.sqrt((a * a).sum() * (b * b).sum()) + 1e-9))


def _mirror_across_slices(canvases: np.ndarray, plane: tuple[float, float, float, float, float],
                          only: list[int] | None = None, min_gap: float = 0.0) -> np.ndarray:
    """Slice k's mirror about the mid-sagittal plane ``plane`` = (m2, t, u, dy, dx): at canvas
    pixel (r, c) the series sampled at slice m2 - k + 2 (t (c - W/2) + u (r - H/2)) (a plane
    tilted against the slices: the head turned or tilted in the slab), row r - dy, column
    c - dx, linearly interpolated; NaN (no mirror: no asymmetry there) where the mirror falls
    outside the series or fewer than ``min_gap`` slices from k, and for every k not in ``only``."""
    from scipy.ndimage import map_coordinates

    m2, t, u, dy, dx = plane
    n, h, w = canvases.shape
    rr, cc = np.mgrid[:h, :w].astype(np.float32)
    tilt = 2.0 * (t * (cc - w / 2) + u * (rr - h / 2))
    out = np.full(canvases.shape, np.nan, dtype=np.float32)
    for k in range(n) if only is None else only:
        j = m2 - k + tilt
        inside = (j >= 0) & (j <= n - 1) & (np.abs(j - k) >= min_gap)
        if not inside.any():
            continue
        values = map_coordinates(canvases, [np.clip(j, 0, n - 1), rr - dy, cc - dx], order=1, mode="constant")
        out[k] = np.where(inside, values, np.nan)
    return out


#: a sagittal slice closer than this to the mid-sagittal plane is its own mirror (no asymmetry
#: term): its mirror slice would lie within 2 x this of it, where a lesion of up to that radius
#: reaches too, so the difference would not tell a unilateral lesion from a midline one
MIN_MIRROR_OFFSET_MM = 10.0
#: the least share of a slice's head that must have a mirror for its asymmetry to be scored
MIN_MIRROR_COVERAGE = 0.3


def slice_positions(volume) -> np.ndarray:  # type: ignore[no-untyped-def]
    """Each slice's position along the series' normal (mm; ``Volume``: sorted, so increasing
    unless two slices share a position), for ``neighbour_planes``."""
    return np.asarray(volume.positions, dtype=np.float64) @ volume.normal


def neighbour_planes(canvases: np.ndarray, along: np.ndarray, mm: float, reach: int = 1) -> np.ndarray:
    """The planes ``mm`` below and above each slice (N, 2, H, W), for a 2.5D network; with
    ``reach`` > 1 that many on each side, ``mm`` apart (N, 2 reach, H, W), in order along the
    normal from -reach x mm to +reach x mm, the slice itself left out. ``canvases``
    (N, H, W) are a series' slices in order, ``along`` (N,) their positions along the slice
    normal in mm (increasing; gaps may be uneven). Each plane is interpolated linearly between
    the two slices around it (in a series of thick slices, 5 mm apart say, a blend of the slice
    and its neighbour); beyond the first or last slice the end slice stands in, so the end
    slices see themselves on one side (training shows the network such stacks too). Positions
    that do not increase (one slice, a broken geometry): the slice itself on both sides.
    """
    along = np.asarray(along, dtype=np.float64)
    n = len(canvases)
    offsets = [j * mm for j in range(-reach, reach + 1) if j != 0]
    out = np.empty((n, len(offsets)) + canvases.shape[1:], dtype=np.float32)
    idx = np.arange(n, dtype=np.float64)
    if n < 2 or not np.all(np.diff(along) > 0):
        out[:] = canvases[:, None]
        return out
    for side, offset in enumerate(offsets):
        # fractional slice index of each target position; clamped to the series
        f = np.interp(along + offset, along, idx)
        lo = np.floor(f).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        w = (f - lo).astype(np.float32)[:, None, None]
        out[:, side] = canvases[lo] * (1.0 - w) + canvases[hi] * w
    return out


def mirror_slices(canvases: np.ndarray, slice_mm: float = 1.0) -> np.ndarray:
    """For the consecutive sagittal slices of one series on the model's canvas (n, H, W), each
    slice's view of the other hemisphere, aligned with it: the series sampled at the mirror of
    slice k about the mid-sagittal plane, whose position, tilt against the slices (both ways)
    and a small in-plane shift are found by the best normalised cross-correlation of the heads
    of the central slices. NaN where there is no mirror: outside the series, and for a slice
    within ``MIN_MIRROR_OFFSET_MM`` of the plane (``slice_mm`` apart).

    The mirror comes from *other* slices, so an evaluation may take it from the lesion-free
    series (a unilateral lesion); an in-plane (axial, coronal) mirror would come from the slice
    itself and is not implemented."""
    n = len(canvases)
    if n < 3:
        return np.full(canvases.shape, np.nan, dtype=np.float32)
    central = list(range(n // 4, max(n // 4 + 1, 3 * n // 4), max(1, n // 30)))
    heads = {k: canvases[k] > 0.1 for k in central}

    def mean_ncc(plane: tuple[float, float, float, float, float]) -> float:
        pairs = [k for k in central if 0 <= plane[0] - k <= n - 1]
        mirrored = _mirror_across_slices(canvases, plane, only=pairs)
        return float(np.mean([_ncc(canvases[k], mirrored[k], heads[k]) for k in pairs])) if pairs else -1.0
    m2 = max(np.arange(int(0.6 * n), int(1.4 * n) + 0.5, 0.5), key=lambda v: mean_ncc((v, 0, 0, 0, 0)))
    steps = (-0.3, -0.2, -0.1, 0.0, 0.1, 0.2, 0.3)  # slices per canvas pixel: up to ~15 degrees at 2 mm / 1 mm
    plane = max(((m2 + d, t, u, 0, 0) for d in (-1, -0.5, 0, 0.5, 1) for t in steps for u in steps), key=mean_ncc)
    plane = max(((*plane[:3], dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)), key=mean_ncc)
    # per pixel: the plane may be tilted, so a slice's distance to it varies across the slice
    return _mirror_across_slices(canvases, plane, min_gap=2.0 * MIN_MIRROR_OFFSET_MM / slice_mm)


def has_mirror_slices(vol) -> bool:
    """Whether the asymmetry term applies to a series: sagittal slices (normal mostly along x),
    whose mirror is another slice of the series (``mirror_slices``)."""
    return len(vol.positions) >= 3 and int(np.argmax(np.abs(vol.normal))) == 0


def asymmetry_map(images: torch.Tensor, mirrors: torch.Tensor, cfg: AnomalyConfig) -> torch.Tensor:
    """|x - mirror| after the score's smoothing, in units of its 90th percentile where the
    slice's head has a mirror (the usual left-right difference of that slice's normal tissue),
    masked; 0 where there is no mirror, and for a slice with a mirror for under
    ``MIN_MIRROR_COVERAGE`` of its head (too few pixels for a typical difference)."""
    mask = foreground_mask(images, cfg.mask_erode_px)
    mirrors = mirrors.to(images.dtype)
    missing = torch.isnan(mirrors)
    mirrors = torch.where(missing, images, mirrors)  # no mirror: no asymmetry
    covered = mask * (~missing).to(images.dtype)
    diff = (smooth(images, cfg.smooth_sigma) - smooth(mirrors, cfg.smooth_sigma)).abs() * covered
    out = torch.zeros_like(diff)
    for i, (d, c, m) in enumerate(zip(diff[:, 0], covered[:, 0], mask[:, 0])):
        if float(c.sum()) >= MIN_MIRROR_COVERAGE * max(float(m.sum()), 1.0):
            out[i, 0] = d / torch.quantile(d[c > 0], 0.9).clamp_min(1e-6)
    return out


def fuse_asymmetry(err: torch.Tensor, images: torch.Tensor, mirrors: torch.Tensor | None,
                   cfg: AnomalyConfig) -> torch.Tensor:
    """``err`` fused with the asymmetry map as a noisy-OR, 1 - (1 - err)(1 - min(1, symmetry_weight
    a / 10)); ``err`` itself when symmetry_weight is 0 or no mirrors are given."""
    if cfg.symmetry_weight <= 0 or mirrors is None:
        return err
    q = (cfg.symmetry_weight * asymmetry_map(images, mirrors, cfg) / 10.0).clamp(max=1.0)
    return 1.0 - (1.0 - err) * (1.0 - q)


def reconstruction_error(images: torch.Tensor, recon: torch.Tensor, cfg: AnomalyConfig,
                         mask: torch.Tensor | None = None) -> torch.Tensor:
    """|slice - reconstruction|, smoothed and masked like the network's map (``mask``: the
    images' ``foreground_mask``, made here if not given)."""
    if mask is None:
        mask = foreground_mask(images, cfg.mask_erode_px)
    return smooth((images - recon).abs(), cfg.smooth_sigma) * mask


def fuse_reconstruction_error(err: torch.Tensor, images: torch.Tensor, recon: torch.Tensor,
                              cfg: AnomalyConfig, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``err`` fused with the reconstruction's residual as a noisy-OR, 1 - (1 - err)(1 - min(1,
    recon_weight r)); ``err`` itself when recon_weight is 0."""
    if cfg.recon_weight <= 0:
        return err
    q = (cfg.recon_weight * reconstruction_error(images, recon, cfg, mask)).clamp(max=1.0)
    return 1.0 - (1.0 - err) * (1.0 - q)


def fuse_intensity_outliers(err: torch.Tensor, images: torch.Tensor, cfg: AnomalyConfig) -> torch.Tensor:
    """recon-disc's map ``err`` (in [0, 1]) fused with the intensity-outlier map as a noisy-OR,
    1 - (1 - err)(1 - min(1, baseline_weight |z|)); ``err`` itself when baseline_weight is 0."""
    if cfg.baseline_weight <= 0:
        return err
    q = (cfg.baseline_weight * intensity_baseline(images, cfg)).clamp(max=1.0)
    return 1.0 - (1.0 - err) * (1.0 - q)


# ------------------------------------------------------------------------------- persistence


def save_model(net: SpatialVAE, cfg: AnomalyConfig, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(path), metadata={"config": cfg.to_json()})


def ensemble_of(nets: list[nn.Module], cfgs: list[AnomalyConfig]) -> tuple[nn.Module, AnomalyConfig]:
    """One ``ReconDiscEnsemble`` from single recon-disc networks of one architecture and one
    scoring; the first config is kept (with ``members`` set, and each member's training notes
    under ``extra["members"]``)."""
    if len(nets) < 2:
        raise ValueError("an ensemble needs at least two networks")
    first = cfgs[0]
    for cfg in cfgs:
        if cfg.arch != "recon-disc" or cfg.members != 1:
            raise ValueError(f"only single recon-disc networks can be combined (got {cfg.arch}, members={cfg.members})")
        differs = [k for k in ("channels", "disc_channels", "canvas", "pixel_mm", "intensity_ref", "intensity_max",
                               "smooth_sigma", "tta_flip", "mask_erode_px", "error_scale", "baseline_weight",
                               "recon_weight", "symmetry_weight", "coord_channels", "context_mm", "context_planes", "modality", "outlier_region", "seg_threshold")
                   if getattr(cfg, k) != getattr(first, k)]
        if differs:
            raise ValueError(f"networks differ in {', '.join(differs)}: they cannot be combined")
    cfg = dataclasses.replace(first, members=len(nets),
                              extra={**first.extra, "members": [c.extra for c in cfgs]})
    return ReconDiscEnsemble(list(nets)).eval(), cfg


def load_models(paths: list[Path]) -> tuple[nn.Module, AnomalyConfig]:
    """One weight file's network, or several single recon-disc files as one ensemble (``ensemble_of``)."""
    loaded = [load_model(Path(p)) for p in paths]
    if len(loaded) == 1:
        return loaded[0]
    return ensemble_of([n for n, _ in loaded], [c for _, c in loaded])


def load_model(path: Path) -> tuple[SpatialVAE, AnomalyConfig]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if "config" not in meta:
        raise ValueError(f"{path}: no 'config' in the safetensors metadata")
    cfg = AnomalyConfig.from_json(meta["config"])
    net = build_network(cfg)
    net.load_state_dict(load_file(str(path)))
    net.eval()
    return net, cfg
