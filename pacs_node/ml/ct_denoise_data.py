"""Training pairs for ct-denoise: normal-dose slices and projection-domain noise images.

Simulating one slice costs seconds (radon + iradon), so the pairs are computed once and
cached (``--cache``, default /tmp/pacs-node-ctd-cache; never inside the repository). One cache
file per slice holds the normal-dose HU slice and one noise image (HU) per configured
(dose, filter) realisation; the training loop adds a rescaled noise image to the slice, which
covers a continuous range of doses without re-simulating.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .lowdose import LowDoseParams, noise_from_sinogram, prepare_slice, sinogram

log = logging.getLogger(__name__)


def sim_params(cfg: dict[str, Any]) -> LowDoseParams:
    return LowDoseParams(
        I0=float(cfg["I0"]), sigma_e=float(cfg["sigma_e"]), n_views=int(cfg["n_views"]),
        aec_ref=None if cfg.get("aec_ref") is None else float(cfg["aec_ref"]),
    )


def _cache_key(cfg: dict[str, Any]) -> str:
    # what one cached slice depends on (the slice selection does not change a slice's file)
    keys = ["train_series", "realisations", "I0", "sigma_e", "n_views", "aec_ref", "seed"]
    blob = json.dumps({k: cfg.get(k) for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _one(job: tuple) -> str:
    hu, pixel_mm, realisations, params, seed, out = job
    hu = prepare_slice(hu)
    p = sinogram(hu, pixel_mm, params)
    noises = []
    for i, (dose, filt) in enumerate(realisations):
        rng = np.random.default_rng([seed, i])
        noises.append(noise_from_sinogram(p, float(dose), pixel_mm, rng, params, filter_name=str(filt)))
    tmp = Path(str(out) + ".tmp.npz")
    np.savez(tmp, clean=hu.astype(np.float32), noise=np.stack(noises).astype(np.float16))
    os.replace(tmp, out)
    return str(out)


def select_slices(array: np.ndarray, stride: int, min_body: float) -> list[int]:
    body = (array > -500).mean(axis=(1, 2))
    return [z for z in range(0, array.shape[0], max(1, stride)) if body[z] >= min_body]


def build_cache(cfg: dict[str, Any], cache: Path, data: Path, workers: int = 1, limit: int | None = None) -> list[Path]:
    """Simulate (or reuse) the cached pairs; returns the cache files. ``limit``: slices per series."""
    from ..volume import load_series

    folder = cache / _cache_key(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    params = sim_params(cfg)
    jobs, files = [], []
    for s_idx, name in enumerate(cfg["train_series"]):
        vol = load_series(sorted((data / name).glob("*")))
        stride = int(cfg["slice_stride"].get(name, 1)) if isinstance(cfg["slice_stride"], dict) else int(cfg["slice_stride"])
        zs = select_slices(vol.array, stride, float(cfg["min_body_fraction"]))
        if limit is not None:
            zs = zs[len(zs) // 2 - limit // 2:][:limit]
        for z in zs:
            out = folder / f"{name.replace('/', '_')}_{z:04d}.npz"
            files.append(out)
            if not out.exists():
                seed = [int(cfg["seed"]), s_idx, z]
                jobs.append((vol.array[z], float(vol.pixel_spacing[0]), cfg["realisations"], params, seed, out))
    if jobs:
        log.info("simulating %d training slices into %s (%d workers)", len(jobs), folder, workers)
        if workers > 1:
            with ProcessPoolExecutor(workers) as ex:
                for i, done in enumerate(ex.map(_one, jobs), 1):
                    if i % 10 == 0:
                        log.info("  %d/%d done", i, len(jobs))
        else:
            for i, job in enumerate(jobs, 1):
                _one(job)
                if i % 10 == 0:
                    log.info("  %d/%d done", i, len(jobs))
    return files


def load_cache(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(clean (n, h, w) float32, noise (n, r, h, w) float16) for all cached slices."""
    clean, noise = [], []
    for f in files:
        with np.load(f) as d:
            clean.append(d["clean"])
            noise.append(d["noise"])
    return np.stack(clean), np.stack(noise)
