"""Head CT anomaly model: data, training and evaluation (the MR model's network and recipe).

Training data: the Visible Human Female head CT (``ct/vhf-head``, cadaver, 1 mm), resliced
axial, coronal and sagittal, and the skull-base slices of the GE head CT (``ct/ge-head-tilt``,
a living patient) below a held-out block. Evaluation: synthetic lesions
(``pacs_node.ml.lesions``, hyper- and hypodense blobs relative to the local brain) inside the
skull of the held-out GE slices (or of any folder of DICOM CT series: split "external");
pixel AUROC / AUPRC / best Dice of the model against the intensity-outlier baseline.

    pacs-node models train anomaly-ct [--config models/anomaly-ct/train.toml] [--out F]
    pacs-node models eval anomaly-ct --data DIR [--json F] [--plot F.png]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..models_dir import model_path
from .anomaly import AnomalyConfig, intracranial_region, load_model
from .anomaly_mr import (SliceSet, _canvas_slices, _planes, add_eval_arguments, cached_training_slices,
                         config_defaults, evaluate, make_eval_cases, report, save_trained, source_weights, train)

log = logging.getLogger(__name__)

MODEL_NAME = "anomaly-ct"
TRAIN_SERIES = "ct/vhf-head"
HOLDOUT_SERIES = "ct/ge-head-tilt"
#: held-out GE slices (indices along the slice normal: the brain above the skull base) ...
HELD_OUT = (12, 28)
#: ... and the slices below it left out of training as a gap
HOLDOUT_GAP = 2
#: HU window mapped to 0..1 (brain near 0.4, CSF near 0.2, fresh blood near 0.75; fat and air
#: 0; bone clipped at ``intensity_max``)
CT_WINDOW = (-20.0, 100.0)
INTENSITY_REF = "ct-window"
#: training slices cache, named by what makes them (window, held-out block), so a change makes a new one
DEFAULT_CACHE = Path(f"/tmp/pacs-node-cache/anomaly-ct-slices-w{CT_WINDOW[0]:g}_{CT_WINDOW[1]:g}"
                     f"-h{HELD_OUT[0]}_{HELD_OUT[1]}_{HOLDOUT_GAP}.npz")


def normalise_ct(array: np.ndarray, cfg: AnomalyConfig) -> np.ndarray:
    """HU -> the network's scale: ``CT_WINDOW`` to 0..1, clipped to [0, ``cfg.intensity_max``]."""
    lo, hi = CT_WINDOW
    return np.clip((np.asarray(array, dtype=np.float32) - lo) / (hi - lo), 0.0, cfg.intensity_max).astype(np.float32)


def _load(name: str, data: Path, cfg: AnomalyConfig):
    from ..volume import load_series

    vol = load_series(sorted((data / name).iterdir()))
    return vol, normalise_ct(vol.array, cfg)


def build_training_slices(data: Path, cfg: AnomalyConfig, step: int = 2) -> SliceSet:
    vol, arr = _load(TRAIN_SERIES, data, cfg)
    vhf = _canvas_slices(_planes(arr, vol.spacing, "acs", step), cfg)
    vol, arr = _load(HOLDOUT_SERIES, data, cfg)
    ge = _canvas_slices(((arr[i], vol.spacing[1:]) for i in range(HELD_OUT[0] - HOLDOUT_GAP)), cfg)
    return SliceSet(np.stack(vhf + ge).astype(np.float32), ["vhf"] * len(vhf) + ["ge"] * len(ge))


def _with_brain(slices: list[np.ndarray]) -> list[np.ndarray]:
    return [s for s in slices if intracranial_region(s).any()]


def held_out_slices(data: Path, cfg: AnomalyConfig) -> np.ndarray:
    vol, arr = _load(HOLDOUT_SERIES, data, cfg)
    got = _with_brain(_canvas_slices(((arr[i], vol.spacing[1:]) for i in range(*HELD_OUT)), cfg, min_fg=0.1))
    return np.stack(got)


def validation_slices(data: Path, cfg: AnomalyConfig) -> np.ndarray:
    """Model-selection slices (never the reported result): the Visible Human axial slices at odd
    indices (training used the even ones) and the two GE gap slices between the training slices
    and the held-out block, where the skull encloses brain."""
    vol, arr = _load(TRAIN_SERIES, data, cfg)
    got = _with_brain(_canvas_slices(((arr[i], vol.spacing[1:]) for i in range(1, arr.shape[0], 2)), cfg, min_fg=0.1))
    vol, arr = _load(HOLDOUT_SERIES, data, cfg)
    gap = range(HELD_OUT[0] - HOLDOUT_GAP, HELD_OUT[0])
    got += _with_brain(_canvas_slices(((arr[i], vol.spacing[1:]) for i in gap), cfg, min_fg=0.1))
    return np.stack(got)


def external_slices(root: Path, cfg: AnomalyConfig) -> tuple[np.ndarray, str]:
    """Every slice of each CT series under ``root`` whose skull encloses enough brain."""
    from ..errors import PacsNodeError
    from ..volume import series_volumes

    images: list[np.ndarray] = []
    used: list[str] = []
    for uid, vol in series_volumes(root, "CT", "external evaluation"):
        arr = normalise_ct(vol.array, cfg)
        got = _with_brain(_canvas_slices(((arr[i], vol.spacing[1:]) for i in range(arr.shape[0])), cfg, min_fg=0.1))
        log.info("external evaluation: series %s: %d of %d slices with brain inside the skull", uid, len(got),
                 arr.shape[0])
        images += got
        used.append(f"{len(got)} of {arr.shape[0]} slices")
    if not images:
        raise PacsNodeError(f"{root}: no CT slices with brain inside a closed skull to evaluate (expected the "
                            f"shared data folder holding {HOLDOUT_SERIES}/, or a folder of DICOM head CT series)")
    return np.stack(images), f"{len(used)} CT series under {root.name or root} ({'; '.join(used)})"


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"pacs-node models eval {MODEL_NAME}",
                                description="Synthetic lesions inside the skull of held-out head CT slices: "
                                            "pixel AUROC / AUPRC / best Dice of the model and of the "
                                            "intensity-outlier baseline.")
    p.add_argument("--data", type=Path, required=True,
                   help="unpacked shared data (folder holding ct/): the held-out GE slices; or any folder of DICOM "
                        "head CT series: split 'external'")
    add_eval_arguments(p, MODEL_NAME)
    p.add_argument("--split", choices=("held-out", "val", "external"), default=None,
                   help="held-out (default with the shared data): the reported evaluation; val: the model-selection "
                        "slices (Visible Human odd axial slices, GE gap slices); external (default otherwise): "
                        "every CT series under --data")
    p.add_argument("--baseline-weight", type=float, default=None,
                   help="score with this intensity-outlier fusion weight instead of the stored one (choosing it)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.model.is_file():
        p.error(f"--model {args.model}: no such file (train it with 'pacs-node models train {MODEL_NAME}')")
    net, cfg = load_model(args.model)
    if args.baseline_weight is not None:
        cfg = dataclasses.replace(cfg, baseline_weight=float(args.baseline_weight))
    shared = (args.data / HOLDOUT_SERIES).is_dir()
    split = args.split or ("held-out" if shared else "external")
    if split == "external":
        normal, what = external_slices(args.data, cfg)
    elif not shared:
        p.error(f"--split {split} needs the shared data folder (holding {HOLDOUT_SERIES}/)")
    elif split == "val":
        normal = validation_slices(args.data, cfg)
        what = (f"{TRAIN_SERIES} odd axial slices and {HOLDOUT_SERIES} slices {HELD_OUT[0] - HOLDOUT_GAP}.."
                f"{HELD_OUT[0] - 1}, with brain inside the skull")
    else:
        normal = held_out_slices(args.data, cfg)
        what = f"{HOLDOUT_SERIES} slices {HELD_OUT[0]}..{HELD_OUT[1] - 1} with brain inside the skull"
    # lesions drawn, and both methods scored, inside the skull; the baseline (Meissen et al.) is
    # |z| against the intracranial region's mean and std, as the served weights' own fusion
    case = make_eval_cases(normal, cfg, seed=args.seed, regions=np.stack([intracranial_region(s) for s in normal]))
    res = evaluate(net, cfg, case)
    res["data"] = f"{what}, synthetic lesions seed {args.seed}"
    res["baseline_weight"] = cfg.baseline_weight
    report(res, case, cfg, split, args.json, args.plot)
    return 0


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog=f"pacs-node models train {MODEL_NAME}", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None, help="TOML with any of the options below (flags override it)")
    p.add_argument("--data", type=Path, default=None, help="unpacked shared data (default: pacs_node.datasets)")
    p.add_argument("--out", type=Path, default=model_path(MODEL_NAME))
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="training slices (.npz; made there if missing)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--crop", type=int, default=96, help="random crops of this side (0: the whole canvas)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-minutes", type=float, default=None, help="stop early after this much wall time")
    p.add_argument("--limit", type=int, default=None, help="use only the first N slices (smoke runs)")
    p.add_argument("--channels", default="8,16,32,64", help="reconstructive U-Net widths")
    p.add_argument("--disc-channels", default="8,16,32,64,128,8", help="discriminative U-Net (MONAI BasicUNet) features")
    p.add_argument("--smooth-sigma", type=float, default=1.0)
    p.add_argument("--tta-flip", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--balance-sources", action=argparse.BooleanOptionalAction, default=True,
                   help="draw each training series equally often (else each slice: the GE slices are 10 of 279)")
    p.add_argument("--baseline-weight", type=float, default=0.0,
                   help="score = 1 - (1 - p)(1 - min(1, w |z|)), z the intensity z-score inside the skull (scoring "
                        "only, stored in the weights; 0: the network alone)")
    p.add_argument("--seg-threshold", type=float, default=0.5,
                   help="the pipeline's default segmentation threshold, stored in the weights")
    config_defaults(p, argv, {a.dest for a in p._actions} - {"help", "config"})
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = AnomalyConfig(modality="CT", arch="recon-disc", intensity_ref=INTENSITY_REF, intensity_max=1.5,
                        outlier_region="intracranial", baseline_weight=float(args.baseline_weight),
                        seg_threshold=float(args.seg_threshold),
                        channels=tuple(int(v) for v in str(args.channels).split(",")),
                        disc_channels=tuple(int(v) for v in str(args.disc_channels).split(",")),
                        smooth_sigma=float(args.smooth_sigma), tta_flip=bool(args.tta_flip), error_scale=1.0)
    if args.data is None:
        from ..datasets import data_dir

        args.data = data_dir()
    started = time.time()
    sset = cached_training_slices(args.data, cfg, args.cache, build=build_training_slices)
    images = sset.images[: args.limit] if args.limit else sset.images
    sources = np.array(sset.sources[: len(images)])
    print(f"{len(images)} training slices ({', '.join(f'{s}: {int((sources == s).sum())}' for s in sorted(set(sources)))})",
          flush=True)
    weights = source_weights(sources) if args.balance_sources else None
    net = train(images, cfg, args.steps, batch=args.batch, lr=args.lr, seed=args.seed, max_minutes=args.max_minutes,
                checkpoint=args.out.with_suffix(".partial.safetensors"), log_every=max(1, min(50, args.steps // 4)),
                crop=args.crop, sample_weights=weights)
    cfg.extra = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "crop": args.crop, "seed": args.seed,
                 "threads": args.threads, "balance_sources": args.balance_sources, "train_slices": len(images),
                 "train_minutes": round((time.time() - started) / 60, 1),
                 "held_out": f"{HOLDOUT_SERIES} slices {HELD_OUT[0]}..{HELD_OUT[1] - 1}",
                 "ct_window_hu": list(CT_WINDOW)}
    save_trained(net, cfg, args.out)
    print(f"saved {args.out}", flush=True)
    return 0
