"""How much does an anomaly-mr network's score depend on what a lesion looks like in the planes
next to its slice, and inside? Prints fused and network-alone AUROC on the validation splits
(never the held-out block), seeds 97-99.

    .venv/bin/python bench/anomaly_25d_probe.py eval W.safetensors [--rho R] [--keep-noise | --keep-noise-all]

W: any weights of `pacs-node models train anomaly-mr` (2D or 2.5D, ``--context-mm``). The
scored slices and their lesions are the eval command's (``make_eval_cases``: same random
stream), and each lesion is drawn with the same extent and level into the planes 2 mm either
side (``lesions.lesions_in_neighbour``), as the eval command does; what differs is how:
``--rho R``: the correlation of a neighbour's lesion texture with the slice's (0.78, the eval
command's: a 3D texture as smooth as the 2D one; 1: the same patch; 0: its own);
``--keep-noise``: the neighbours keep their own fine structure (x - gauss(x, 1 px)) through the
lesion; ``--keep-noise-all``: the slice too (then the scored slice differs from the eval
command's: a level change over the anatomy rather than tissue replaced by a smooth fill).

Session 16's figures for this probe ("Session 16 probe: 2.5D input" in the model card) and
session 17's 2D control with per-plane noise were made by this script's earlier form, which also
trained its own 2D and 2.5D networks (`train W.pt [--ctx 1|0] [--indep]`; commit d24a89c); the
2.5D network is now the library's (``AnomalyConfig.context_mm``), trained by the train command.
"""
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from anomaly_adapt import uih_train_slices  # noqa: E402
from common import ROOT  # noqa: F401,E402
from pacs_node.datasets import data_dir  # noqa: E402
from pacs_node.ml import anomaly_mr as A  # noqa: E402
from pacs_node.ml import lesions as L  # noqa: E402
from pacs_node.ml.anomaly import load_model, residual_maps  # noqa: E402

RHO = float(sys.argv[sys.argv.index("--rho") + 1]) if "--rho" in sys.argv else L.NEIGHBOUR_TEXTURE_CORR
KEEP_NOISE_ALL = "--keep-noise-all" in sys.argv
KEEP_NOISE = KEEP_NOISE_ALL or "--keep-noise" in sys.argv


def fine(x: np.ndarray) -> np.ndarray:
    return x - ndimage.gaussian_filter(x, 1.0)


def cases(normal: np.ndarray, context: np.ndarray, cfg, seed: int):
    """The eval command's cases (``make_eval_cases``), their neighbour planes' lesions drawn the
    way the flags say."""
    blends_of: list[list] = []  # each slice's lesion blends, in slice order

    def draw(planes: np.ndarray, blends: list, rng: np.random.Generator) -> np.ndarray:
        blends_of.append(blends)
        drawn = L.lesions_in_neighbour(planes, blends, rng, rho=RHO)
        if KEEP_NOISE:  # the neighbours keep their fine structure through the lesion
            for alpha, *_ in blends:
                drawn = drawn + alpha * np.stack([fine(p) for p in planes])
        return np.clip(drawn, 0, None)

    case = A.make_eval_cases(normal, cfg, seed, context=context, draw_in_neighbours=draw)
    images = case.images
    if KEEP_NOISE_ALL:  # the scored slice too keeps its fine structure through the lesion
        images = images.copy()
        for n, (img, blends) in enumerate(zip(normal, blends_of)):
            out = img.astype(np.float32, copy=True)
            for alpha, target, *_ in blends:
                out = out * (1 - alpha) + (target + fine(img)) * alpha
            images[n] = np.clip(out, 0, None)
    return images, case.context, case.truth, case.masks


def evaluate(path: str) -> None:
    torch.set_num_threads(2)
    net, cfg = load_model(Path(path))
    data = data_dir()
    for split in ("val-studyforrest", "val-uih-gap", "uih-train"):
        normal, _, context = uih_train_slices(data, cfg) if split == "uih-train" else A.SPLITS[split][1](data, cfg)
        res = []
        for seed in (97, 98, 99):
            images, ctx, truth, regions = cases(normal, context, cfg, seed)
            x, c = torch.from_numpy(images[:, None]), torch.from_numpy(ctx)
            with torch.no_grad():
                fused = residual_maps(net, x, cfg, None, c)[0][:, 0].numpy()
                alone = residual_maps(net, x, replace(cfg, baseline_weight=0.0), None, c)[0][:, 0].numpy()
            res.append([A.pixel_metrics(s[regions], truth[regions]).auroc for s in (fused, alone)])
        m = np.mean(res, axis=0)
        print(f"{split:18} fused {m[0]:.4f}  network alone {m[1]:.4f}   per seed fused {' '.join(f'{r[0]:.3f}' for r in res)}",
              flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] != "eval":
        raise SystemExit(__doc__)
    evaluate(sys.argv[2])
