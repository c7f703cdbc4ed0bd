"""Would test-time tricks move the anomaly-mr validation numbers? Prints a table (validation
slices only: the held-out block is never scored here).

    .venv/bin/python bench/anomaly_adapt.py [--splits val-studyforrest,val-uih-gap] [--seeds 97,98,99]
        [--adapt-steps 100,300] [--adapt-lr 3e-4] [--threads 2]

Two families, each against the served model as it is ("plain"):
- geometric test-time augmentation: the slice also scored shifted by +-6 % of the canvas
  ("shift"), scaled by 0.9 and 1.1 ("scale"), or both, each map warped back and averaged (on top
  of the served left-right mirror averaging);
- test-time training ("adapt N"): the served weights fine-tuned for N steps on the very slices
  being scored (lesions included, their places unknown), with the training recipe's own
  anomalies and augmentation: the model adapting to an unseen scanner's contrast from the input
  alone. N steps of 12 crops take about N * 0.35 s on 2 CPU threads.
- score fusion (on request with --fuse w1,w2,...): "fuse w" is the weights' scoring with
  AnomalyConfig baseline_weight = w, 1 - (1 - p) (1 - min(1, w |z|)), p the network's map and |z|
  the intensity baseline's (the pipeline's and the eval command's code path; "fuse 0" is p alone); "sum w" is
  p + w |z| (session 4's probe); "bright w" is p + w max(z, 0), only the bright side of z, since
  the misses are hyper-intense lesions; "local S w" (with --local-sizes S1,S2) adds to the
  served score a third noisy-OR term, min(1, w |x - median_S(x)| / std), a local-contrast outlier
  (median filter of S x S canvas pixels);
- the reconstruction's own residual (on request with --recon-fuse w1,w2,...): "recon w" is the
  weights' scoring with AnomalyConfig recon_weight = w (0: off), for a reconstructive U-Net
  trained to heal (--heal-weight).
- intensity test-time augmentation (on request with --intensity-tta): the network's probability
  averaged over gain- and gamma-changed copies of the slice and its neighbours.
Each cell is the mean over the lesion seeds of the eval command's pixel AUROC / AUPRC; "plain"
also splits its AUROC by lesion kind (hyper- and hypo-intense pixels, each against all normal
pixels) and by height in the scored region (upper 60 % and lower 40 %, where a sagittal
slice's skull base and, unless defaced, face lie). Split "uih-train" (on request) is the UIH slices that *were* trained on next to the gap
(45..54 and 115..124) with the same synthetic lesions: whether a weakness is generalisation or
the scanner's contrast.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import ROOT  # noqa: F401 - puts the repo on sys.path

from pacs_node.datasets import data_dir
from pacs_node.ml import anomaly_mr as A
from pacs_node.ml.anomaly import (foreground_mask, intensity_z, load_model, recon_disc_maps, recon_disc_score,
                                  residual_maps, smooth)
from pacs_node.models_dir import model_path

GEOMETRIC = {
    "shift": [(1.0, 0.0, 0.0), (1.0, 0.06, 0.0), (1.0, -0.06, 0.0), (1.0, 0.0, 0.06), (1.0, 0.0, -0.06)],
    "scale": [(1.0, 0.0, 0.0), (0.9, 0.0, 0.0), (1.1, 0.0, 0.0)],
}
GEOMETRIC["shift+scale"] = GEOMETRIC["shift"] + GEOMETRIC["scale"][1:]


def _warp(x: torch.Tensor, s: float, dx: float, dy: float, inverse: bool = False) -> torch.Tensor:
    if inverse:
        s, dx, dy = 1.0 / s, -dx / s, -dy / s
    theta = torch.tensor([[s, 0.0, dx], [0.0, s, dy]], dtype=torch.float32).expand(x.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _plain_scores(net: torch.nn.Module, cfg, x: torch.Tensor, mirrors: torch.Tensor | None = None,
                  context: torch.Tensor | None = None) -> torch.Tensor:
    """The served scoring (the pipeline's and the eval command's own code path; ``mirrors``: each
    slice's other hemisphere, for the asymmetry term; ``context``: its neighbour planes, lesions
    drawn in, for a 2.5D network)."""
    with torch.no_grad():
        return residual_maps(net, x, cfg, mirrors, context)[0]


def _geometric_scores(net: torch.nn.Module, cfg, x: torch.Tensor, variants) -> torch.Tensor:
    """The probability averaged over the warped copies (each warped back), then the served
    post-processing and fusion (``recon_disc_score``, with the unwarped slice's reconstruction)."""
    acc, recon = torch.zeros_like(x), None
    with torch.no_grad():
        for s, dx, dy in variants:
            identity = (s, dx, dy) == (1.0, 0.0, 0.0)
            prob, rec = recon_disc_maps(net, x if identity else _warp(x, s, dx, dy), cfg)
            acc += prob if identity else _warp(prob, s, dx, dy, inverse=True)
            recon = rec if identity else recon
    return recon_disc_score(acc / len(variants), x, recon, cfg)


INTENSITY = {
    "gain": [(1.0, 1.0), (0.85, 1.0), (1.15, 1.0)],
    "gamma": [(1.0, 1.0), (1.0, 0.8), (1.0, 1.25)],
}
INTENSITY["gain+gamma"] = INTENSITY["gain"] + INTENSITY["gamma"][1:]


def _intensity_scores(net: torch.nn.Module, cfg, x: torch.Tensor, context: torch.Tensor, variants) -> torch.Tensor:
    """The network's probability averaged over copies of the slice and its neighbour planes with
    their intensities changed (gain g, gamma e: g x^e, the training augmentation's kind of
    change; no resampling), then the served post-processing and fusion (``recon_disc_score``,
    with the unchanged slice's reconstruction)."""
    acc, recon = torch.zeros_like(x), None
    with torch.no_grad():
        for g, e in variants:
            prob, rec = recon_disc_maps(net, g * x.clamp_min(0) ** e, cfg, g * context.clamp_min(0) ** e)
            acc += prob
            recon = rec if (g, e) == (1.0, 1.0) else recon
    return recon_disc_score(acc / len(variants), x, recon, cfg)


def _bright_z(x: torch.Tensor, cfg) -> torch.Tensor:
    """The bright side of the intensity baseline: max(z, 0), smoothed and masked the same way."""
    z, mask = intensity_z(x, cfg)
    return smooth(z.clamp_min(0.0), cfg.smooth_sigma) * mask


def _local_z(x: torch.Tensor, cfg, size: int) -> torch.Tensor:
    """|x - its S x S median| in units of the slice's std of that difference in the head, smoothed and masked."""
    from scipy import ndimage

    mask = foreground_mask(x, cfg.mask_erode_px)
    med = torch.from_numpy(np.stack([ndimage.median_filter(a, size=size) for a in x[:, 0].numpy()])[:, None])
    d = x - med
    n = mask.sum(dim=(2, 3), keepdim=True).clamp_min(1.0)
    std = (((d * mask) ** 2).sum(dim=(2, 3), keepdim=True) / n).sqrt().clamp_min(1e-6)
    return smooth((d / std).abs(), cfg.smooth_sigma) * mask


def _metrics(err: torch.Tensor, case: A.EvalCase) -> tuple[float, float]:
    m = A.pixel_metrics(err[:, 0].numpy()[case.masks], case.truth[case.masks])
    return m.auroc, m.auprc


def _by_kind(err: torch.Tensor, case: A.EvalCase, normal: np.ndarray) -> tuple[float, float]:
    """AUROC of the hyper-intense and of the hypo-intense lesion pixels, each against all normal ones."""
    e, m, t = err[:, 0].numpy(), case.masks, case.truth.astype(bool)
    neg = e[m & ~t]
    out = []
    for pos in (t & (case.images > normal + 1e-6), t & (case.images < normal - 1e-6)):
        scores = np.concatenate([e[pos & m], neg])
        out.append(A.pixel_metrics(scores, np.r_[np.ones((pos & m).sum()), np.zeros(neg.size)]).auroc)
    return out[0], out[1]


def _by_height(err: torch.Tensor, case: A.EvalCase, split_at: float = 0.6) -> tuple[float, float, float]:
    """AUROC in the upper ``split_at`` and in the rest of each slice's scored region (0 at its
    top row, 1 at its bottom row: on a sagittal slice the lower part holds the skull base and, on a
    scan that was not defaced, the face), and the share of the 10 % highest-scored normal pixels
    that lie in the lower part."""
    e, m, t = err[:, 0].numpy(), case.masks, case.truth.astype(bool)
    height = np.zeros(m.shape, np.float32)
    rows = np.arange(m.shape[1], dtype=np.float32)[:, None]
    for i, region in enumerate(m):
        ys = np.nonzero(region.any(axis=1))[0]
        if ys.size:
            height[i] = (rows - ys[0]) / max(1, ys[-1] - ys[0])
    s, y, h = e[m], t[m], height[m]
    upper = A.pixel_metrics(s[h < split_at], y[h < split_at]).auroc
    lower = A.pixel_metrics(s[h >= split_at], y[h >= split_at]).auroc
    normal = ~y
    top = s[normal] > np.quantile(s[normal], 0.9)
    return upper, lower, float((h[normal][top] >= split_at).mean())


def uih_train_slices(data: Path, cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UIH slices that the served model was trained on, next to the gap slices (45..54, 115..124),
    their mirrors and neighbour planes (as the eval command's splits)."""
    vol, arr = A.load_normal_volume(A.HOLDOUT_SERIES, data, cfg)
    picks = list(range(A.HELD_OUT[0] - A.HOLDOUT_GAP - 10, A.HELD_OUT[0] - A.HOLDOUT_GAP)) + \
        list(range(A.HELD_OUT[1] + A.HOLDOUT_GAP, A.HELD_OUT[1] + A.HOLDOUT_GAP + 10))
    return A.series_slices(vol, arr, picks, cfg.symmetry_weight > 0, cfg)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--splits", default="val-studyforrest,val-uih-gap",
                    help="any of val-studyforrest, val-uih-gap, uih-train (never held-out)")
    ap.add_argument("--seeds", default="97,98,99")
    ap.add_argument("--adapt-steps", default="100,300", help="test-time training lengths ('' for none)")
    ap.add_argument("--adapt-lr", type=float, default=3e-4)
    ap.add_argument("--fuse", default="", help="weights w of the fusion variants, e.g. 0.1,0.2,0.3 ('' for none)")
    ap.add_argument("--local-sizes", default="", help="median-filter sizes of the local-contrast variants (with --fuse)")
    ap.add_argument("--no-geometric", action="store_true", help="skip the geometric variants")
    ap.add_argument("--recon-fuse", default="",
                    help="weights w of the reconstruction-residual term to score with (AnomalyConfig.recon_weight; "
                         "'' for none): rows 'recon w'")
    ap.add_argument("--intensity-tta", action="store_true",
                    help="also the intensity test-time variants (gain 0.85 / 1.15, gamma 0.8 / 1.25, averaged with plain)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", type=Path, default=model_path("anomaly-mr"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = args.splits.split(",")
    if "held-out" in splits:
        raise SystemExit("this probe scores validation splits only (the held-out block is for the model card's "
                         "one final number)")
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = [int(s) for s in args.adapt_steps.split(",") if s]
    fuse = [float(w) for w in args.fuse.split(",") if w]
    local_sizes = [int(v) for v in args.local_sizes.split(",") if v]
    net, cfg = load_model(args.model)
    if cfg.context_mm > 0 and (steps or not args.no_geometric):
        raise SystemExit("the geometric and test-time-training variants are for 2D networks: with a 2.5D one "
                         "(context_mm > 0) use --no-geometric --adapt-steps ''")
    data = data_dir()
    print(f"model {args.model.name} ({cfg.arch}); splits {', '.join(splits)}; lesion seeds {seeds}; "
          f"mean AUROC / AUPRC; CPU, {args.threads} threads")
    for split in splits:
        normal, mirrors, context = uih_train_slices(data, cfg) if split == "uih-train" else A.SPLITS[split][1](data, cfg)
        kinds: list[tuple[float, float]] = []
        heights: list[tuple[float, float, float]] = []
        cells: dict[str, list[tuple[float, float]]] = {}
        seconds: dict[str, float] = {}
        for seed in seeds:
            case = A.make_eval_cases(normal, cfg, seed, mirrors=mirrors, context=context)
            x = torch.from_numpy(case.images[:, None])
            m = torch.from_numpy(np.ascontiguousarray(mirrors[:, None]))
            c = torch.from_numpy(case.context)
            plain = _plain_scores(net, cfg, x, m, c)
            cells.setdefault("plain", []).append(_metrics(plain, case))
            kinds.append(_by_kind(plain, case, normal))
            heights.append(_by_height(plain, case))
            if fuse:
                prob = _plain_scores(net, replace(cfg, baseline_weight=0.0, symmetry_weight=0.0), x, None, c)
                z_abs, z_pos = A.intensity_baseline(x, cfg), _bright_z(x, cfg)
                for w in fuse:
                    fused = _plain_scores(net, replace(cfg, baseline_weight=w), x, m, c)
                    cells.setdefault(f"fuse {w:g}", []).append(_metrics(fused, case))
                    cells.setdefault(f"sum {w:g}", []).append(_metrics(prob + w * z_abs, case))
                    cells.setdefault(f"bright {w:g}", []).append(_metrics(prob + w * z_pos, case))
                for size in local_sizes:
                    z_loc = _local_z(x, cfg, size)
                    for w in fuse:
                        q = (w * z_loc).clamp(max=1.0)
                        cells.setdefault(f"local {size} {w:g}", []).append(_metrics(1 - (1 - plain) * (1 - q), case))
            for name, variants in ({} if args.no_geometric else GEOMETRIC).items():
                cells.setdefault(name, []).append(_metrics(_geometric_scores(net, cfg, x, variants), case))
            for w in [float(v) for v in args.recon_fuse.split(",") if v]:
                cells.setdefault(f"recon {w:g}", []).append(
                    _metrics(_plain_scores(net, replace(cfg, recon_weight=w), x, m, c), case))
            for name, variants in (INTENSITY if args.intensity_tta else {}).items():
                cells.setdefault(name, []).append(_metrics(_intensity_scores(net, cfg, x, c, variants), case))
            for n in steps:
                t0 = time.time()
                with contextlib.redirect_stdout(io.StringIO()):  # train's progress lines
                    tuned = A.train(case.images.astype(np.float32), cfg, n, batch=12, lr=args.adapt_lr, seed=seed,
                                    log_every=10 ** 9, init=args.model, crop=96)
                seconds[f"adapt {n}"] = seconds.get(f"adapt {n}", 0.0) + time.time() - t0
                cells.setdefault(f"adapt {n}", []).append(_metrics(_plain_scores(tuned, cfg, x), case))
        print(f"\n{split} ({len(normal)} slices)")
        print(f"{'variant':14} {'AUROC':>7} {'AUPRC':>7}   per seed AUROC")
        for name, vals in cells.items():
            mean = np.mean(vals, axis=0)
            extra = f"   ({seconds[name] / len(seeds):.0f} s per case)" if name in seconds else ""
            print(f"{name:14} {mean[0]:7.4f} {mean[1]:7.4f}   {' '.join(f'{v[0]:.3f}' for v in vals)}{extra}")
        hyper, hypo = np.mean(kinds, axis=0)
        print(f"plain, by lesion kind: AUROC hyper-intense {hyper:.4f}, hypo-intense {hypo:.4f}")
        upper, lower, top_low = np.mean(heights, axis=0)
        print(f"plain, by height in the scored region: AUROC upper 60 % {upper:.4f}, lower 40 % {lower:.4f}; "
              f"{100 * top_low:.0f} % of the top-10 % normal scores lie in the lower 40 %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
