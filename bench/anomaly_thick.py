"""anomaly-mr on thick slices: the studyforrest T1 (0.67 mm isotropic, a training subject) averaged
into axial slabs of 3 and 5 mm (a clinical 2D series' slice thickness), every 2nd slab with enough
head scored with the eval command's 3D lesions (whole head: axial), seeds 97-99; prints a table.

A 2.5D network's neighbour planes are what the pipeline gives it ("blend": ``neighbour_planes``,
2 mm away, i.e. blends of the slab and the next one) or, for comparison, the slab itself on both
sides ("self"). A 2D network reads the slab alone.

    .venv/bin/python bench/anomaly_thick.py [--models A.safetensors,B.safetensors] [--thick 3,5]

(0.5.0's 2D weights: ``git show 2a524c6:models/anomaly-mr/model.safetensors > /tmp/anomaly-mr-0.5.0.safetensors``.)
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from common import ROOT  # noqa: F401 - puts the repo on sys.path

from pacs_node.datasets import data_dir
from pacs_node.ml import anomaly_mr as A
from pacs_node.ml.anomaly import load_model, neighbour_planes
from pacs_node.models_dir import model_path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(model_path("anomaly-mr")))
    ap.add_argument("--thick", default="3,5", help="slab thicknesses in mm")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = data_dir()
    print(f"{'slabs':>14} {'weights':28} {'planes':6} {'AUROC':>7} {'AUPRC':>7} {'baseline AUROC':>15}")
    for thick in (float(t) for t in args.thick.split(",")):
        for path in args.models.split(","):
            net, cfg = load_model(Path(path))
            vol, arr = A.load_normal_volume("mr/studyforrest-t1", data, cfg)
            sz, sy, sx = vol.spacing
            n = max(1, int(round(thick / sz)))
            slabs = np.stack([arr[i:i + n].mean(0) for i in range(0, arr.shape[0] - n + 1, n)])
            canvases = A._all_canvases(((s, (sy, sx)) for s in slabs), cfg)
            keep = [i for i in range(len(canvases)) if A._enough_head(canvases[i], 0.2)][::2]
            blended = neighbour_planes(canvases, np.arange(len(canvases)) * n * sz, A.eval_context_mm(cfg),
                                       A.eval_context_planes(cfg))
            modes = {"blend": blended, "self": np.repeat(canvases[:, None], blended.shape[1], 1)} if cfg.context_mm > 0 else {"-": blended}
            for mode, context in modes.items():
                res = []
                for seed in (97, 98, 99):
                    case = A.make_eval_cases(canvases[keep], cfg, seed, fractions=[1.0] * len(keep), context=context[keep])
                    r = A.evaluate(net, cfg, case)
                    res.append((r["model"]["auroc"], r["model"]["auprc"], r["baseline"]["auroc"]))
                m = np.mean(res, axis=0)
                label = f"{n * sz:.1f} mm x {len(keep)}"
                print(f"{label:>14} {Path(path).name[-28:]:28} {mode:6} {m[0]:7.4f} {m[1]:7.4f} {m[2]:15.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
