"""`pacs-node models eval ct-denoise`: simulated low dose on real series, methods compared.

For every CT series found under ``--data`` (any folder of DICOM files; series told apart by
Series Instance UID, or by folder where it is blank), the
normal-dose slices are the reference (padding below -1024 HU set to air). The low-dose input
is simulated in the projection domain (:mod:`pacs_node.ml.lowdose`, seeded per slice); then

- ``low-dose``   the simulated input itself,
- ``gaussian``   a Gaussian filter, sigma (pixels) picked per series from 0.5-2.0 by the best
                 soft-window PSNR against the reference (an oracle-tuned baseline),
- ``bm3d``       BM3D (pip ``bm3d``, both stages) with sigma = the true standard deviation of
                 the inserted noise inside the body (oracle sigma),
- ``classical``  the ``ct-denoise-classical`` pipeline (non-local means, its own defaults),
- ``model``      the trained ct-denoise network (no dose given),

are scored against the reference with :mod:`pacs_node.ml.metrics`: PSNR and SSIM (Gaussian
window 11, sigma 1.5, data range = window width) in the windows [-1000, 1000] and [-160, 240]
HU over the whole slice, RMSE in HU (unclipped, pixels inside the body, reference > -900 HU),
and the noise std (HU) and mean HU bias in the flattest 21 x 21 soft-tissue square of each
reference slice.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from ..errors import PacsNodeError, SeriesLoadError
from . import metrics
from .lowdose import LowDoseParams, prepare_slice, simulate_slice

log = logging.getLogger(__name__)

WINDOWS = {"wide": (-1000.0, 1000.0), "soft": (-160.0, 240.0)}
METHODS = ["low-dose", "gaussian", "bm3d", "classical", "model"]
GAUSS_SIGMAS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


def find_series(roots: list[Path]) -> list[tuple[str, list]]:
    """Every CT series under (or equal to) each root, as (name, [(path, dataset)]): files grouped
    by Series Instance UID, so a flat export of several series works too. A series is named by
    its folder, with its Series Number (or UID suffix) added where a folder holds several.
    Other modalities and files that are not DICOM images are skipped and logged."""
    from ..volume import read_datasets

    found: list[tuple[str, str, list]] = []
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise PacsNodeError(f"--data {root}: no such file or folder")
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        groups: dict[str, list] = {}
        for path, ds in read_datasets(files):
            # files whose Series Instance UID was blanked (ct/abdomen-j2k) count as their folder's series
            uid = str(ds.get("SeriesInstanceUID", "") or "") or f"folder:{path.parent}"
            groups.setdefault(uid, []).append((path, ds))
        here: list[tuple[str, str, list]] = []
        by_folder = Counter(items[0][0].parent for items in groups.values())
        for uid, items in groups.items():
            modality = str(items[0][1].get("Modality", "") or "")
            if modality != "CT":
                log.info("skipping a %s series (%d instances) under %s: not CT", modality or "no-modality",
                         len(items), root)
                continue
            folder = items[0][0].parent
            name = folder.name or str(folder)
            if by_folder[folder] > 1:
                number = items[0][1].get("SeriesNumber")
                name += f"-{number}" if number not in (None, "") else f"-{uid[-8:]}"
            here.append((name, uid, sorted(items, key=lambda it: str(it[0]))))
        found += sorted(here, key=lambda f: f[0])  # in the order the roots were given
    # names still shared (two series with one Series Number in a folder, one folder name under
    # two roots) get their UID's end: the report and the cache tell them apart
    counts = Counter(name for name, _, _ in found)
    return [(f"{name}-{uid[-8:]}" if counts[name] > 1 else name, items) for name, uid, items in found]


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def pick_slices(n: int, max_slices: int) -> list[int]:
    if max_slices <= 0 or max_slices >= n:
        return list(range(n))
    # evenly spaced, away from the ends
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, max_slices + 2)[1:-1]})


def _classical(low: np.ndarray, pixel_spacing: tuple[float, float]) -> np.ndarray:
    import importlib

    from ..volume import Volume

    # ml/ does not import pipelines at module level; the evaluation sits above them
    cls = importlib.import_module("pacs_node.pipelines.ct_denoise_classical").CtDenoiseClassical
    vol = Volume(array=low[None].astype(np.float32), positions=np.zeros((1, 3)), row_direction=np.array([1.0, 0, 0]),
                 column_direction=np.array([0, 1.0, 0]), pixel_spacing=pixel_spacing, datasets=[])
    return cls().run(vol, {})[0].array[0]


def _slice_job(job: tuple) -> dict[str, Any]:
    ref, dose, pixel_spacing, seed, params, skip, cache_file = job
    if cache_file is not None and Path(cache_file).exists():
        with np.load(cache_file, allow_pickle=False) as d:
            got = {k: d[k] for k in d.files}
        if all(m in got for m in ("bm3d", "classical") if m not in skip):
            out = {k: v for k, v in got.items() if k not in ("sigma_true", "times")}
            out["sigma_true"] = float(got["sigma_true"])
            out["times"] = json.loads(str(got["times"]))
            return out
    out = _compute_slice(ref, dose, pixel_spacing, seed, params, skip)
    if cache_file is not None:
        tmp = Path(str(cache_file) + ".tmp.npz")
        arrays = {k: v for k, v in out.items() if isinstance(v, np.ndarray)}
        np.savez(tmp, sigma_true=out["sigma_true"], times=json.dumps(out["times"]), **arrays)
        tmp.replace(cache_file)
    return out


def _compute_slice(ref, dose, pixel_spacing, seed, params, skip) -> dict[str, Any]:
    t = time.time()
    rng = np.random.default_rng(seed)
    low = simulate_slice(ref, dose, float(pixel_spacing[0]), rng, params)
    body = ref > -900
    sigma_true = float(np.std((low - ref)[body])) if body.any() else float(np.std(low - ref))
    out = {"low-dose": low, "sigma_true": sigma_true, "times": {}}
    out["times"]["simulate"] = time.time() - t
    if "bm3d" not in skip:
        import bm3d

        t = time.time()
        out["bm3d"] = (bm3d.bm3d(low / 1000.0, sigma_psd=sigma_true / 1000.0,
                                 stage_arg=bm3d.BM3DStages.ALL_STAGES) * 1000.0).astype(np.float32)
        out["times"]["bm3d"] = time.time() - t
    if "classical" not in skip:
        t = time.time()
        out["classical"] = _classical(low, pixel_spacing).astype(np.float32)
        out["times"]["classical"] = time.time() - t
    return out


def score(ref: np.ndarray, x: np.ndarray) -> dict[str, float]:
    """Metrics of a (z, y, x) result against the reference (see module docstring)."""
    res: dict[str, float] = {}
    for wname, win in WINDOWS.items():
        res[f"psnr_{wname}"] = metrics.psnr(ref, x, window=win)
        res[f"ssim_{wname}"] = metrics.ssim(ref, x, window=win)
    body = ref > -900
    res["rmse_hu"] = metrics.rmse(ref, x, mask=body)
    stds, bias, ref_std = [], [], []
    for z in range(ref.shape[0]):
        roi = metrics.flat_roi(ref[z])
        y0, y1, x0, x1 = roi
        stds.append(metrics.roi_std(x[z], roi))
        ref_std.append(metrics.roi_std(ref[z], roi))
        bias.append(float(np.mean(x[z, y0:y1, x0:x1]) - np.mean(ref[z, y0:y1, x0:x1])))
    res["roi_noise_std_hu"] = float(np.mean(stds))
    res["roi_bias_hu"] = float(np.mean(bias))
    res["roi_reference_std_hu"] = float(np.mean(ref_std))
    return res


def evaluate_series(name: str, items: list, dose: float, model, seed: int, max_slices: int, workers: int,
                    params: LowDoseParams, skip: set[str], cache: Path | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from ..volume import volume_from_datasets
    from .ct_denoise import denoise_slices

    vol = volume_from_datasets(items)
    zs = pick_slices(vol.shape[0], max_slices)
    ref = np.stack([prepare_slice(vol.array[z]) for z in zs])
    # the fan-beam simulation needs a square slice: pad with air, score the original pixels
    shape = ref.shape[1:]
    side = max(shape)
    py, px = side - shape[0], side - shape[1]
    if py or px:
        ref = np.pad(ref, ((0, 0), (py // 2, py - py // 2), (px // 2, px - px // 2)), constant_values=-1000.0)
        log.info("%s: %dx%d slices padded with air to %dx%d for the simulation", name, *shape, side, side)
    crop = (slice(None), slice(py // 2, py // 2 + shape[0]), slice(px // 2, px // 2 + shape[1]))
    key = hashlib.sha256(json.dumps([params.as_dict(), dose, seed]).encode()).hexdigest()[:10]
    ident = hashlib.sha256("\n".join(str(p) for p, _ in items).encode()).hexdigest()[:8]  # which files
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    jobs = [(ref[i], dose, vol.pixel_spacing, [seed, z], params, skip,
             None if cache is None else cache / f"{_file_safe(name)}_{ident}_{z:04d}_{key}.npz") for i, z in enumerate(zs)]
    t0 = time.time()
    if workers > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_slice_job, jobs))
    else:
        parts = [_slice_job(j) for j in jobs]
    log.info("%s: %d slices simulated + baselines in %.0f s", name, len(zs), time.time() - t0)
    outs: dict[str, np.ndarray] = {"reference": ref, "low-dose": np.stack([p["low-dose"] for p in parts])}
    for m in ("bm3d", "classical"):
        if m not in skip:
            outs[m] = np.stack([p[m] for p in parts])
    low = outs["low-dose"]
    best = None
    for s in GAUSS_SIGMAS:
        g = np.stack([gaussian_filter(sl, s) for sl in low])
        p = metrics.psnr(ref, g, window=WINDOWS["soft"])
        if best is None or p > best[0]:
            best = (p, s, g)
    outs["gaussian"] = best[2].astype(np.float32)
    if model is not None:
        t = time.time()
        outs["model"] = denoise_slices(model, low, batch=4)
        model_s = (time.time() - t) / len(zs)
    else:
        model_s = None
    outs = {k: v[crop] for k, v in outs.items()}
    ref = outs["reference"]
    results = {m: score(ref, outs[m]) for m in METHODS if m in outs}
    times = {k: float(np.mean([p["times"].get(k, 0.0) for p in parts])) for k in ("simulate", "bm3d", "classical")}
    times["model"] = model_s
    info = {
        "series": name, "slices_total": vol.shape[0], "slices_evaluated": zs,
        "pixel_spacing_mm": list(vol.pixel_spacing), "gaussian_sigma_px": best[1],
        "bm3d_sigma_hu": float(np.mean([p["sigma_true"] for p in parts])),
        "seconds_per_slice": times, "metrics": results,
    }
    return info, outs


def _fmt_table(report: dict[str, Any]) -> str:
    cols = ["psnr_wide", "ssim_wide", "psnr_soft", "ssim_soft", "rmse_hu", "roi_noise_std_hu", "roi_bias_hu"]
    head = ["series", "method", "PSNR[-1000,1000]", "SSIM[-1000,1000]", "PSNR[-160,240]", "SSIM[-160,240]",
            "RMSE HU", "ROI std HU", "ROI bias HU"]
    rows = []
    for s in report["series"]:
        for m, r in s["metrics"].items():
            rows.append([s["series"], m] + [f"{r[c]:.4f}" if c.startswith("ssim") else f"{r[c]:.2f}" for c in cols])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    out = [line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def plot_panel(path: Path, report: dict[str, Any], panels: list[tuple[str, dict[str, np.ndarray]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = ["reference"] + [m for m in METHODS if m in panels[0][1]]
    n_rows = len(panels)
    fig = plt.figure(figsize=(2.6 * len(shown), 2.8 * n_rows + 0.35 * (2 + sum(len(s["metrics"]) for s in report["series"]))))
    gs = fig.add_gridspec(n_rows + 1, len(shown), height_ratios=[1] * n_rows + [0.12 * (2 + sum(len(s["metrics"]) for s in report["series"]))])
    for r, (name, outs) in enumerate(panels):
        ref = outs["reference"]
        k = ref.shape[0] // 2
        roi = metrics.flat_roi(ref[k])
        cy, cx = (roi[0] + roi[1]) // 2, (roi[2] + roi[3]) // 2
        half = min(96, ref.shape[1] // 2)
        y0 = int(np.clip(cy - half, 0, ref.shape[1] - 2 * half))
        x0 = int(np.clip(cx - half, 0, ref.shape[2] - 2 * half))
        for c, m in enumerate(shown):
            ax = fig.add_subplot(gs[r, c])
            ax.imshow(outs[m][k, y0:y0 + 2 * half, x0:x0 + 2 * half], cmap="gray", vmin=-160, vmax=240)
            ax.set_xticks([])
            ax.set_yticks([])
            if m != "reference":
                met = next(s for s in report["series"] if s["series"] == name)["metrics"][m]
                ax.set_title(f"{m}\n{met['psnr_soft']:.2f} dB / {met['ssim_soft']:.3f}", fontsize=8)
            else:
                ax.set_title(f"{name}\nreference (normal dose)", fontsize=8)
    ax = fig.add_subplot(gs[n_rows, :])
    ax.axis("off")
    ax.text(0, 1, f"dose {report['dose']:.0%}; window [-160,240] HU shown; titles: PSNR/SSIM in [-160,240]\n" + _fmt_table(report),
            family="monospace", fontsize=6.5, va="top")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def eval_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pacs-node models eval ct-denoise", description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, nargs="+", required=True, help="series folder(s) or folder(s) of series")
    ap.add_argument("--dose", type=float, default=0.25, help="dose fraction to simulate (default 0.25)")
    ap.add_argument("--json", type=Path, default=None, help="write the full report here")
    ap.add_argument("--plot", type=Path, default=None, help="write a crop panel + metric table PNG here")
    ap.add_argument("--weights", type=Path, default=None, help="model weights (default models/ct-denoise/model.safetensors)")
    ap.add_argument("--max-slices", type=int, default=0, help="evenly spaced slices per series (0: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=1, help="processes for simulation and baselines")
    ap.add_argument("--cache", type=Path, default=None,
                    help="keep simulated inputs and baseline outputs here (re-evaluating a new model is then fast)")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip (bm3d, classical, model)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    torch.set_num_threads(1)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    model = None
    meta: dict[str, str] = {}
    if "model" not in skip:
        from .ct_denoise import load_model

        model, meta = load_model(args.weights)
    params = LowDoseParams()
    series = find_series(args.data)
    if not series:
        raise PacsNodeError(f"no CT series under {' '.join(map(str, args.data))}")
    report: dict[str, Any] = {
        "dose": args.dose, "seed": args.seed, "simulation": params.as_dict(),
        "windows_hu": WINDOWS, "model": {k: meta[k] for k in ("name", "version", "trained_steps", "prior_steps") if k in meta},
        "ssim": "gaussian window 11 (sigma 1.5, truncate 3.5), K1 0.01, K2 0.03, data range = window width, mean over slices",
        "psnr": "over all pixels of the evaluated slices, both images clipped to the window, peak = window width",
        "rmse": "HU, unclipped, pixels with reference > -900 HU",
        "series": [],
    }
    panels = []
    for name, items in series:
        try:
            info, outs = evaluate_series(name, items, args.dose, model, args.seed, args.max_slices, args.workers,
                                         params, skip, args.cache)
        except SeriesLoadError as exc:  # e.g. a localizer of another matrix in the series: the others go on
            log.warning("%s: skipped: %s", name, exc)
            continue
        report["series"].append(info)
        panels.append((info["series"], outs))
    if not report["series"]:
        raise PacsNodeError("no CT series could be evaluated (the warnings above say why)")
    table = _fmt_table(report)
    print(f"ct-denoise eval: dose {args.dose:.0%}, model {report['model']}")
    print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        plot_panel(args.plot, report, panels)
    return 0
