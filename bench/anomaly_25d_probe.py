"""Probe (session 16; not the served model): recon-disc with 2.5D input, the slice and its
neighbours 2 mm either side, against the same script's 2D network.

Training: the served recipe's data (studyforrest resliced a/c/s, UIH sagittal outside the
held-out block and its gaps; the neighbours of a UIH training slice are training slices too),
3000 steps, batch 12, 96 px crops, balanced sources, the served augmentation (same geometry and
intensity change for the three slices, own noise per slice). Training anomalies are 3D-consistent:
``corrupt3`` places and labels one on the centre slice (as ``synth_anomaly.corrupt``) and applies
the same region, opacity and kind of content to the neighbours; ``--indep``: each slice's fill
texture is its own in part and each slice gets its own noise over the content (never a
pixel-identical patch across slices).

Evaluation on the eval command's validation splits (never the held-out block), seeds 97-99:
the centre slices and their lesions are exactly the eval command's (same random stream; a 2D
network scores the card's numbers), and each lesion is drawn with the same mask and level into
both neighbours (a lesion 5-20 mm across reaches 2 mm either side). ``--rho R``: the correlation
of a neighbour's lesion texture with the centre's (1: the same patch; 0.78, the default: a 3D
texture smoothed like the 2D one, 1 px apart; 0: its own); ``--keep-noise``: the neighbours keep
their own fine structure (x - gauss(x, 1 px)) through the lesion; ``--keep-noise-all``: the
centre too (then the centre differs from the eval command's).

The neighbours' lesions are drawn from the blends ``lesions.insert_lesions`` records for the centre.
``corrupt3`` is ``synth_anomaly.corrupt`` for a slice stack (its own draw order, which the figures
in the model card were made with); it belongs in that function once a 2.5D model is served.

    python bench/anomaly_25d_probe.py train W.pt [--ctx 1|0] [--indep] [--steps N]   # ~21 min on 2 cores
    (--ctx 0 --indep: the 2D control trained with corrupt3's per-slice noise over the anomalies)
    python bench/anomaly_25d_probe.py eval W.pt [--rho R] [--keep-noise | --keep-noise-all]
    (W.safetensors: a model of `pacs-node models train anomaly-mr [--context-mm 2]`, scored on the same cases)
"""
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: F401,E402
from pacs_node.datasets import data_dir  # noqa: E402
from pacs_node.ml import anomaly_mr as A  # noqa: E402
from pacs_node.ml import lesions as L  # noqa: E402
from pacs_node.ml import synth_anomaly as S  # noqa: E402
from pacs_node.ml.anomaly import (AnomalyConfig, DenoisingUNet, foreground_mask,  # noqa: E402
                                  fuse_intensity_outliers, smooth, to_canvas)

torch.set_num_threads(2)
MM = 2.0  # neighbour distance
RHO = float(sys.argv[sys.argv.index("--rho") + 1]) if "--rho" in sys.argv else 0.78
KEEP_NOISE_ALL = "--keep-noise-all" in sys.argv
KEEP_NOISE = KEEP_NOISE_ALL or "--keep-noise" in sys.argv
INDEP_TRAIN = "--indep" in sys.argv  # training anomalies: per-slice texture and noise


class RD25(nn.Module):
    def __init__(self, k: int) -> None:
        from monai.networks.nets import BasicUNet
        super().__init__()
        self.k = k
        self.recon = DenoisingUNet((8, 16, 32, 64), in_channels=k)
        self.disc = BasicUNet(spatial_dims=2, in_channels=k + 1, out_channels=1, features=(8, 16, 32, 64, 128, 8),
                              norm=("instance", {"affine": True}))

    def forward(self, x):
        recon = self.recon(x)[0]
        return self.disc(torch.cat([x, recon], 1)), recon


def cfg_train():
    return AnomalyConfig(modality="MR", arch="recon-disc", intensity_ref="foreground-p99", intensity_max=1.5)


def cfg_serve():
    c = cfg_train()
    c.intensity_ref, c.intensity_max, c.baseline_weight, c.smooth_sigma, c.tta_flip = "central-p90", 3.0, 0.1, 1.0, True
    return c


def stacks_along(arr, spacing, axis, centres, step_vox, cfg):
    """(N, 3, canvas, canvas): planes at centres and +-step_vox along axis ('a', 'c', 's'), superior up."""
    sz, sy, sx = spacing
    def plane(i):
        if axis == "a":
            return arr[i], (sy, sx)
        if axis == "c":
            return arr[::-1, i, :], (sz, sx)
        return arr[::-1, :, i], (sz, sy)
    out = []
    for i in centres:
        out.append(np.stack([to_canvas(np.ascontiguousarray(plane(j)[0]), plane(j)[1], cfg.canvas, cfg.pixel_mm)[0]
                             for j in (i - step_vox, i, i + step_vox)]))
    return np.stack(out).astype(np.float32)


def training_stacks(cfg):
    data = data_dir()
    imgs, src = [], []
    vol, arr = A.load_normal_volume("mr/studyforrest-t1", data, cfg)
    for ax, n, sp in (("a", arr.shape[0], vol.spacing[0]), ("c", arr.shape[1], vol.spacing[1]), ("s", arr.shape[2], vol.spacing[2])):
        k = max(1, round(MM / sp))
        st = stacks_along(arr, vol.spacing, ax, range(k, n - k, 2), k, cfg)
        st = st[[A._enough_head(s[1], 0.12) for s in st]]
        imgs.append(st); src += ["sf"] * len(st)
    vol, arr = A.load_normal_volume(A.HOLDOUT_SERIES, data, cfg)
    k = max(1, round(MM / vol.spacing[0]))
    lo, hi = A.HELD_OUT[0] - A.HOLDOUT_GAP, A.HELD_OUT[1] + A.HOLDOUT_GAP
    centres = [i for i in range(k, arr.shape[0] - k) if i + k < lo or i - k >= hi]
    st = np.stack([np.stack([to_canvas(arr[j], vol.spacing[1:], cfg.canvas, cfg.pixel_mm)[0] for j in (i - k, i, i + k)])
                   for i in centres]).astype(np.float32)
    st = st[[A._enough_head(s[1], 0.12) for s in st]]
    imgs.append(st); src += ["uih"] * len(st)
    return np.concatenate(imgs), np.array(src)


def corrupt3(stack, other, rng):
    """synth_anomaly.corrupt on the centre slice, the same region, opacity and kind of content
    applied to all three slices."""
    mid = len(stack) // 2
    image = stack[mid]
    h, w = image.shape
    fg = ndimage.gaussian_filter(image, 1.0) > 0.06
    if fg.mean() < 0.05:
        return stack.copy(), np.zeros_like(image)
    inner = ndimage.binary_erosion(fg, iterations=4)
    pool = np.argwhere(inner if inner.any() and rng.random() < 0.8 else fg)
    cy, cx = pool[rng.integers(len(pool))]
    radius = float(np.exp(rng.uniform(np.log(2.0), np.log(16.0))))
    region = S._noise_shape((h, w), (int(cy), int(cx)), radius, rng) & fg
    if region.sum() < 6:
        return stack.copy(), np.zeros_like(image)
    level = float(np.median(image[fg]))
    kind = rng.choice(["foreign", "shift", "fill", "smear"], p=[0.3, 0.3, 0.25, 0.15])
    if kind == "foreign":
        dy, dx = (int(v) for v in rng.integers(-h // 4, h // 4 + 1, size=2))
        source = np.roll(other, (dy, dx), axis=(1, 2))
        if rng.random() < 0.5:
            source = source[:, :, ::-1]
        content = source * float(rng.uniform(0.7, 1.4))
    elif kind == "shift":
        if rng.random() < 0.5:
            content = stack * float(rng.choice([rng.uniform(0.1, 0.8), rng.uniform(1.2, 2.5)]))
        else:
            content = stack + float(rng.choice([-1, 1]) * rng.uniform(0.1, 0.7)) * level
    elif kind == "fill":
        tex = S._texture((h, w), rng)
        amp = float(rng.uniform(0.0, 0.25)) * level
        base = float(rng.uniform(0.0, 1.6)) * level
        if INDEP_TRAIN:
            r = float(rng.uniform(0.0, 0.95))
            content = np.stack([base + amp * (tex if c == mid else r * tex + np.sqrt(1 - r * r) * S._texture((h, w), rng))
                                for c in range(len(stack))])
        else:
            content = np.broadcast_to(base + amp * tex, stack.shape)
    else:
        if rng.random() < 0.5:
            s = float(rng.uniform(2.0, 5.0))
            content = np.stack([ndimage.gaussian_filter(c, s) for c in stack])
        else:
            tex = S._texture((h, w), rng)
            amt = float(rng.uniform(0.1, 0.4))
            content = np.stack([ndimage.gaussian_filter(c, 4.0) * (1.0 + amt * tex) for c in stack])
    if INDEP_TRAIN:  # each slice's own noise over the content: never a pixel-identical patch
        content = content + rng.normal(0.0, float(rng.uniform(0.0, 0.03)), size=stack.shape).astype(np.float32)
    edge = float(rng.uniform(0.3, 2.0))
    alpha = ndimage.gaussian_filter(region.astype(np.float32), edge) * float(rng.uniform(0.6, 1.0))
    out = np.clip(stack * (1.0 - alpha) + content.astype(np.float32) * alpha, 0.0, 1.5).astype(np.float32)
    visible = np.abs(ndimage.gaussian_filter(out[mid] - image, 1.0)) > 0.06 * max(level, 0.1)
    return out, ((alpha > 0.3) & visible).astype(np.float32)


def corrupt_batch3(stacks, rng):
    out = stacks.copy()
    labels = np.zeros((len(stacks),) + stacks.shape[2:], np.float32)
    n = len(stacks)
    for i in range(n):
        if rng.random() < 0.25:
            continue
        other = stacks[(i + 1 + int(rng.integers(max(1, n - 1)))) % n]
        for _ in range(2 if rng.random() < 0.25 else 1):
            out[i], lab = corrupt3(out[i], other, rng)
            labels[i] = np.maximum(labels[i], lab)
    return out, labels


def augment3(x, gen):
    x = A.augment(x, gen, degrade=False)  # same geometry / gamma / gain / bias for the 3 slices
    b = x.shape[0]
    blur = torch.rand(b, generator=gen) < 0.25
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kk = (k[:, None] * k[None, :]).view(1, 1, 3, 3).repeat(x.shape[1], 1, 1, 1)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), kk, groups=x.shape[1])
    x = x + torch.randn(x.shape, generator=gen) * (0.04 * torch.rand(b, generator=gen)).view(b, 1, 1, 1)
    return x.clamp(0.0, 1.5)


def train(out, steps, ctx):
    cfg = cfg_train()
    stacks, src = training_stacks(cfg)
    if not ctx:
        stacks = stacks[:, 1:2]
    print(len(stacks), "stacks", {s: int((src == s).sum()) for s in set(src)}, flush=True)
    weights = torch.as_tensor(A.source_weights(src), dtype=torch.float64)
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    net = RD25(stacks.shape[1])
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    data = torch.from_numpy(stacks)
    t0 = time.time()
    for step in range(1, steps + 1):
        idx = torch.multinomial(weights, 12, replacement=True, generator=gen)
        clean = A.random_crops(augment3(data[idx].clone(), gen), 96, gen)
        if ctx or INDEP_TRAIN:  # --ctx 0 --indep: the 2D control with the same per-slice noise
            x, y = corrupt_batch3(clean.numpy(), rng)
        else:
            x, y = S.corrupt_batch(clean[:, 0].numpy(), rng)
            x = x[:, None]
        x, y = torch.from_numpy(x), torch.from_numpy(y)[:, None]
        logits, recon = net(x)
        c = clean[:, (clean.shape[1] // 2):(clean.shape[1] // 2) + 1]
        loss = F.binary_cross_entropy_with_logits(logits, y, pos_weight=torch.tensor(10.0)) + (recon - c).abs().mean()
        opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0); opt.step(); sched.step()
        if step % 250 == 0:
            print(f"step {step} loss {loss.item():.4f} {(time.time() - t0) / 60:.1f} min", flush=True)
            torch.save(net.state_dict(), out)
    torch.save(net.state_dict(), out)


def eval_stacks(split, cfg):
    data = data_dir()
    if split == "val-studyforrest":
        vol, arr = A.load_normal_volume("mr/studyforrest-t1", data, cfg)
        sz, sy, sx = vol.spacing
        canv = A._all_canvases(((arr[::-1, :, i], (sz, sy)) for i in range(arr.shape[2])), cfg)
        odd = [i for i in range(1, arr.shape[2], 2) if A._enough_head(canv[i], 0.2)]
        mid = len(odd) // 2
        picks, k = odd[mid - 12: mid + 12], max(1, round(MM / sx))
    else:
        vol, arr = A.load_normal_volume(A.HOLDOUT_SERIES, data, cfg)
        canv = A._all_canvases(((arr[i], vol.spacing[1:]) for i in range(arr.shape[0])), cfg)
        lo, hi = A.HELD_OUT
        if split == "val-uih-gap":
            picks = list(range(lo - A.HOLDOUT_GAP, lo)) + list(range(hi, hi + A.HOLDOUT_GAP))
        else:  # uih-train
            picks = list(range(lo - A.HOLDOUT_GAP - 10, lo - A.HOLDOUT_GAP)) + list(range(hi + A.HOLDOUT_GAP, hi + A.HOLDOUT_GAP + 10))
        picks = [i for i in picks if A._enough_head(canv[i], 0.2)]
        k = max(1, round(MM / vol.spacing[0]))
    return np.stack([canv[[i - k, i, i + k]] for i in picks]).astype(np.float32)


def cases3(stacks, cfg, seed):
    """make_eval_cases on the centres (same random stream); each lesion's blend, recorded by
    ``insert_lesions``, drawn into the neighbours too."""
    centre = stacks[:, 1]
    rng = np.random.default_rng(seed)
    tex_rng = np.random.default_rng(seed + 1000)
    masks = foreground_mask(torch.from_numpy(centre[:, None]), cfg.mask_erode_px)[:, 0].numpy() > 0
    regions = np.stack([A.brain_region(m, 0.55) for m in masks])
    out = stacks.copy()
    truth = []
    for n, (img, region) in enumerate(zip(centre, regions)):
        blends: list = []
        new, t, _ = L.insert_lesions(img, region, rng, count=int(rng.integers(1, 4)), record=blends)
        for alpha, target, level, amp, texture in blends:
            for c in (0, 2):
                # the neighbour's texture correlates RHO with the centre's (1: the same patch;
                # 0.78: a 3D texture smoothed like the 2D one, 2 mm = 1 px apart; 0: its own)
                fresh = ndimage.gaussian_filter(tex_rng.standard_normal(img.shape).astype(np.float32), 1.0)
                fresh /= fresh.std() + 1e-6
                tex = RHO * texture + np.sqrt(max(0.0, 1 - RHO ** 2)) * fresh
                target_c = level * (1.0 + amp * tex)
                if KEEP_NOISE:  # the neighbour keeps its own fine texture / noise through the lesion
                    target_c = target_c + (stacks[n, c] - ndimage.gaussian_filter(stacks[n, c], 1.0))
                out[n, c] = out[n, c] * (1 - alpha) + target_c * alpha
        out[n, 0] = np.clip(out[n, 0], 0, None); out[n, 2] = np.clip(out[n, 2], 0, None)
        out[n, 1] = new
        if KEEP_NOISE_ALL:  # the centre too keeps its own fine texture / noise through the lesion
            hf = img - ndimage.gaussian_filter(img, 1.0)
            c1 = img.astype(np.float32, copy=True)
            for alpha, target, *_ in blends:
                c1 = c1 * (1 - alpha) + (target + hf) * alpha
            out[n, 1] = np.clip(c1, 0, None)
        truth.append(t)
    return out, np.stack(truth), regions


def scores(net, x, cfg):
    def prob(v):
        with torch.no_grad():
            return torch.sigmoid(net(v)[0])
    p = (prob(x) + prob(x.flip(-1)).flip(-1)) / 2
    centre = x[:, x.shape[1] // 2: x.shape[1] // 2 + 1]
    err = smooth(p, cfg.smooth_sigma) * foreground_mask(centre, cfg.mask_erode_px)
    return err[:, 0].numpy(), fuse_intensity_outliers(err, centre, cfg)[:, 0].numpy()


def evaluate(path):
    if path.endswith(".safetensors"):  # a model made by `pacs-node models train anomaly-mr` (2D or 2.5D)
        from pacs_node.ml.anomaly import load_model
        net = load_model(Path(path))[0]
        k = getattr(net, "planes", 1)
    else:
        state = torch.load(path)
        k = state["recon.inc.0.weight"].shape[1]
        net = RD25(k); net.load_state_dict(state); net.eval()
    cfg = cfg_serve()
    for split in ("val-studyforrest", "val-uih-gap", "uih-train"):
        stacks = eval_stacks(split, cfg)
        res = []
        for seed in (97, 98, 99):
            imgs, truth, regions = cases3(stacks, cfg, seed)
            x = torch.from_numpy(imgs if k == 3 else imgs[:, 1:2])
            alone, fused = scores(net, x, cfg)
            res.append([A.pixel_metrics(s[regions], truth[regions]).auroc for s in (fused, alone)])
        m = np.mean(res, axis=0)
        print(f"{split:18} fused {m[0]:.4f}  network alone {m[1]:.4f}   per seed fused {' '.join(f'{r[0]:.3f}' for r in res)}",
              flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "train":
        steps = int(sys.argv[sys.argv.index("--steps") + 1]) if "--steps" in sys.argv else 3000
        ctx = int(sys.argv[sys.argv.index("--ctx") + 1]) if "--ctx" in sys.argv else 1
        train(sys.argv[2], steps, ctx)
    else:
        evaluate(sys.argv[2])
