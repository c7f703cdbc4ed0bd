"""Which synthetic lesions does anomaly-mr miss? Lesion by lesion, on validation or training
slices (never the held-out block). Prints a table.

    .venv/bin/python bench/anomaly_lesions.py [--model F[,G,...]] [--splits val-studyforrest,val-uih-gap,uih-train]
        [--seeds 97,98,99] [--worst 12] [--threads 2]

The lesions are the eval command's (``make_eval_cases``: same generator, same seeds, same
slices, all slices scored in one batch as there). For each lesion: its kind and factor, the mean intensity of the tissue it replaced and
its own (normalised units: white matter near 0.94), the median score of its pixels, and the
fraction of the slice's normal scored pixels that score higher than that median ("normal
above": 0 is a lesion every threshold finds first, 1 one that no threshold separates). Several
``--model`` files are scored as one ensemble (``load_models``: probabilities averaged), as
``pacs-node models train anomaly-mr --combine-members`` would store them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from anomaly_adapt import uih_train_slices
from common import ROOT  # noqa: F401 - puts the repo on sys.path
from scipy import ndimage

from pacs_node.datasets import data_dir
from pacs_node.ml import anomaly_mr as A
from pacs_node.ml.anomaly import load_models, residual_maps
from pacs_node.models_dir import model_path


def lesion_rows(net, cfg, normal: np.ndarray, seed: int, mirrors: np.ndarray | None = None,
                context: np.ndarray | None = None) -> list[dict]:
    """One row per drawn lesion of ``anomaly_mr.make_eval_cases(normal, cfg, seed)``."""
    case = A.make_eval_cases(normal, cfg, seed, mirrors=mirrors, context=context)
    m = None if mirrors is None else torch.from_numpy(np.ascontiguousarray(mirrors[:, None]))
    c = None if case.context is None else torch.from_numpy(case.context)
    scores = residual_maps(net, torch.from_numpy(case.images[:, None]), cfg, m, c)[0][:, 0].numpy()
    rows = []
    for index, drawn in enumerate(case.lesions):
        score, truth, region = scores[index], case.truth[index], case.masks[index]
        normal_scores = score[region & ~truth]
        labels, _ = ndimage.label(truth)
        for lesion in drawn:
            label = labels[lesion.centre]
            if label == 0:  # drawn over by a later lesion or clipped to nothing
                continue
            pixels = labels == label
            median = float(np.median(score[pixels]))
            rows.append({"seed": seed, "slice": index, "hyper": lesion.hyper, "factor": lesion.factor,
                         "radius": lesion.radius, "tissue": float(normal[index][pixels].mean()),
                         "lesion": float(case.images[index][pixels].mean()), "score": median,
                         "normal_above": float((normal_scores > median).mean())})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(model_path("anomaly-mr")), help="weights; several, comma-separated: an ensemble")
    ap.add_argument("--splits", default="val-studyforrest,val-uih-gap,uih-train")
    ap.add_argument("--seeds", default="97,98,99")
    ap.add_argument("--worst", type=int, default=8, help="list this many lesions with the most normal pixels above them")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    splits = args.splits.split(",")
    if "held-out" in splits:
        raise SystemExit("validation and training slices only: the held-out block is for the model card's final number")
    net, cfg = load_models([Path(p) for p in args.model.split(",")])
    data = data_dir()
    print(f"model {', '.join(Path(p).name for p in args.model.split(','))}; lesion seeds {args.seeds}; CPU")
    for split in splits:
        normal, mirrors, context = uih_train_slices(data, cfg) if split == "uih-train" else A.SPLITS[split][1](data, cfg)
        rows = [r for seed in args.seeds.split(",") for r in lesion_rows(net, cfg, normal, int(seed), mirrors, context)]
        print(f"\n{split} ({len(normal)} slices, {len(rows)} lesions)")
        print(f"{'kind':6} {'lesions':>7} {'median score':>12} {'normal above':>12} {'missed':>7}   (missed: over half the normal pixels score higher)")
        for hyper in (True, False):
            sel = [r for r in rows if r["hyper"] == hyper]
            print(f"{'hyper' if hyper else 'hypo':6} {len(sel):7d} {np.median([r['score'] for r in sel]):12.3f} "
                  f"{np.mean([r['normal_above'] for r in sel]):12.3f} {sum(r['normal_above'] > 0.5 for r in sel):7d}")
        if args.worst:
            print(f"  worst {args.worst}: kind factor radius tissue -> lesion, score, normal above")
            for r in sorted(rows, key=lambda r: -r["normal_above"])[:args.worst]:
                print(f"  {'hyper' if r['hyper'] else 'hypo ':5} {r['factor']:5.2f} {r['radius']:5.1f}px "
                      f"{r['tissue']:.2f} -> {r['lesion']:.2f}, {r['score']:.3f}, {r['normal_above']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
