"""Anomaly-map pipelines: per-slice reconstruction error of a model of normal anatomy, in [0, 1].

For the served ``recon-disc`` model (DRAEM) the score is the discriminative network's
probability that a pixel differs from the model's normal-looking reconstruction because of an
anomaly (anomaly-mr since 0.6.0: read from the slice and the planes 2 mm either side of it),
smoothed, and fused as a noisy-OR with: the slice's intensity-outlier map (``baseline_weight``
> 0, anomaly-mr since 0.5.0); the reconstruction's own residual |slice - reconstruction|
(``recon_weight`` > 0, anomaly-mr 0.7.0, whose reconstruction was trained to heal); its
difference from the other hemisphere (``symmetry_weight`` > 0 in the weights' config: a probe,
not served; ``mirror_slices``, computed once per sagittal series). For ``prob-inpaint`` the
score is the standardised inpainting residual |x - location| / scale. ``residual_maps``
computes either, the same code path as the eval command."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import numpy as np
import torch

from ..errors import PacsNodeError, UnsupportedInput
from ..ml.anomaly import (AnomalyConfig, from_canvas, has_mirror_slices, load_model, mirror_slices, neighbour_planes,
                          residual_maps, slice_positions, to_canvas, to_score)
from ..models_dir import model_path
from ..volume import Volume
from .base import Output, Pipeline, Requirements, ScoreMap, device


class ModelNotAvailable(PacsNodeError):
    def __init__(self, name: str, path: str) -> None:
        super().__init__(f"model {name}: no weights at {path} (train it with 'pacs-node models train {name}')")


_SCORE_KIND = {"recon-disc": "learned reconstruction discrepancy", "prob-inpaint": "standardised inpainting residual"}


class AnomalyPipeline(Pipeline):
    """Shared by the modalities: load the weights once, score slice by slice on the model canvas.

    Each slice is resampled to the model's pixel size (2 mm) on a 128 x 128 canvas (256 mm), so
    anatomy beyond 256 mm from the slice centre gets score 0. A 2D network (``context_mm`` 0)
    reads each slice alone; a 2.5D one also the planes ``context_mm`` below and above it,
    interpolated between the series' slices (``neighbour_planes``). The asymmetry term (weights
    with ``symmetry_weight`` > 0, none served) compares a sagittal slice with its mirror in the series.
    """

    model_name: ClassVar[str]
    default_outputs = ("secondary_capture", "parametric_map")
    normalise: ClassVar[Callable[[np.ndarray, AnomalyConfig], np.ndarray]]

    def __init__(self) -> None:
        path = model_path(self.model_name)
        if not path.exists():
            raise ModelNotAvailable(self.model_name, str(path))
        self.net, self.cfg = load_model(path)
        self.device = torch.device(device())
        self.net.to(self.device).eval()

    def scores(self, volume: Volume, batch_size: int = 16, cfg: AnomalyConfig | None = None) -> np.ndarray:
        cfg = cfg or self.cfg
        images = type(self).normalise(volume.array, cfg)
        out = np.zeros(volume.shape, dtype=np.float32)
        placed = [to_canvas(plane, volume.pixel_spacing, cfg.canvas, cfg.pixel_mm) for plane in images]
        canvases = np.stack([canvas for canvas, _ in placed])
        # the other hemisphere of each slice (weights with symmetry_weight > 0): from the series, once
        mirrors = mirror_slices(canvases, volume.spacing[0]) \
            if cfg.symmetry_weight > 0 and has_mirror_slices(volume) else None
        # a 2.5D network also reads the planes cfg.context_mm below and above each slice (cfg.context_planes
        # on each side)
        context = (neighbour_planes(canvases, slice_positions(volume), cfg.context_mm, cfg.context_planes)
                   if cfg.context_mm > 0 else None)
        for start in range(0, volume.shape[0], batch_size):
            batch = slice(start, start + batch_size)
            x = torch.from_numpy(canvases[batch][:, None]).to(self.device)
            m = None if mirrors is None else torch.from_numpy(np.ascontiguousarray(mirrors[batch][:, None])).to(self.device)
            c = None if context is None else torch.from_numpy(context[batch]).to(self.device)
            with torch.inference_mode():
                err, _ = residual_maps(self.net, x, cfg, m, c)
            score = to_score(err[:, 0].float().cpu(), cfg)
            for i, (_, grid) in enumerate(placed[batch]):
                out[start + i] = from_canvas(score[i], grid)
        return np.clip(out, 0.0, 1.0)

    def run(self, volume: Volume, params: Mapping[str, Any]) -> list[Output]:
        self.check(volume)
        outliers = params.get("intensity_outliers", True)
        if not isinstance(outliers, bool):
            raise UnsupportedInput(f"pipeline {self.name}: intensity_outliers must be true or false, got {outliers!r}")
        # the model's SEG default was chosen on its fused map; the map without the outliers keeps 0.5
        threshold = float(params.get("threshold", self.cfg.seg_threshold if outliers else 0.5))
        if not 0.0 < threshold <= 1.0:
            raise UnsupportedInput(f"pipeline {self.name}: threshold {threshold} is not in (0, 1]")
        # false: the networks' map (with the reconstruction residual where recon_weight > 0) without
        # the fused intensity-outlier map (0.5.0's baseline_weight), e.g. for a sequence whose
        # normal fat or vessels are very bright
        cfg = self.cfg if outliers else dataclasses.replace(self.cfg, baseline_weight=0.0)
        scores = self.scores(volume, batch_size=int(params.get("batch_size", 16)), cfg=cfg)
        return [ScoreMap(
            array=scores,
            description=f"Anomaly map ({_SCORE_KIND.get(self.cfg.arch, 'reconstruction error')}"
                        f"{' + reconstruction residual' if cfg.recon_weight > 0 else ''}"
                        f"{' + intensity outliers' if cfg.baseline_weight > 0 else ''}"
                        f"{' + left-right asymmetry' if cfg.symmetry_weight > 0 else ''}, "
                        f"{self.model_name} {self.cfg.arch})",
            threshold=threshold,
            extra={"max_score": float(scores.max()) if scores.size else 0.0,
                   "fraction_above_threshold": float((scores >= threshold).mean()) if scores.size else 0.0},
        )]


def _normalise_mr(array: np.ndarray, cfg: AnomalyConfig) -> np.ndarray:
    from ..ml.anomaly_mr import normalise_volume

    return normalise_volume(array, cfg)


class AnomalyMr(AnomalyPipeline):
    name = "anomaly-mr"
    version = "0.7.0"
    model_name = "anomaly-mr"
    requires = Requirements(modalities=("MR",), min_slices=1)
    normalise = staticmethod(_normalise_mr)


def _normalise_ct(array: np.ndarray, cfg: AnomalyConfig) -> np.ndarray:
    from ..ml.anomaly_ct import normalise_ct

    return normalise_ct(array, cfg)


class AnomalyCt(AnomalyPipeline):
    """Head CT: maps from models/anomaly-ct (see its model card)."""

    name = "anomaly-ct"
    version = "0.1.0"
    model_name = "anomaly-ct"
    requires = Requirements(modalities=("CT",), min_slices=1)
    normalise = staticmethod(_normalise_ct)
