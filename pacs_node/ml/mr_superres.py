"""MR super-resolution: training data, SRGAN-style training and the evaluation command.

``pacs-node models train mr-superres [--config F] [--out DIR] ...`` -> :func:`train_main`
``pacs-node models eval mr-superres --data DIR --scale 2 [--json F] [--plot F.png]`` -> :func:`eval_main`

Ground truth is MR at its *acquired* resolution: studyforrest-t1 (0.67 mm) as stored, and the
UIH 3D T1 cropped in k-space to its AcquisitionMatrix (256 x 230, 1 mm; the stored 512 x 460 is
a 2x scanner interpolation). Both are resliced into axial, coronal and sagittal planes. A
contiguous block of UIH sagittal slices (HELDOUT_UIH, plus a guard band each side) never enters
training; the evaluation runs on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import kspace

log = logging.getLogger(__name__)

UIH_SERIES = "mr/uih-t1-3d-sag"
FORREST_SERIES = "mr/studyforrest-t1"
#: held-out UIH sagittal slices (indices into the 160 slices sorted along the normal), end exclusive
HELDOUT_UIH = (72, 112)
GUARD = 4
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "models" / "mr-superres" / "train.toml"
DEFAULT_CACHE = Path(os.environ.get("TMPDIR", "/tmp")) / "pacs-node-mr-superres"


# --- data -----------------------------------------------------------------------------------

def _series_dir(data: Path | None, name: str) -> Path:
    if data is None:
        from ..datasets import data_dir

        data = data_dir()
    data = Path(data)
    if (data / name).is_dir():
        return data / name
    if data.name == Path(name).name and data.is_dir():
        return data
    raise FileNotFoundError(f"{name} not found under {data}")


def load_uih_truth(data: Path | None = None):
    """UIH volume at its acquired resolution: (array (160, 256, 230), Volume of the source).

    The returned array keeps the source's slice positions; pixel spacing is 1 mm (pixel 0 on
    source pixel 0, k-space crop convention).
    """
    from ..volume import load_series

    vol = load_series(sorted(_series_dir(data, UIH_SERIES).glob("*")))
    arr, spacing = kspace.to_acquired_resolution(vol.array, vol.datasets[0], vol.pixel_spacing)
    return arr.astype(np.float32), spacing, vol


def _pad_min(img: np.ndarray, size: int) -> np.ndarray:
    ph = max(0, size - img.shape[0])
    pw = max(0, size - img.shape[1])
    if ph == 0 and pw == 0:
        return img
    return np.pad(img, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))


def _planes(vol: np.ndarray, stride: int, min_signal: float) -> list[np.ndarray]:
    """Slices of a normalised volume along each of its three axes (every ``stride``-th)."""
    out = []
    for axis in range(3):
        for i in range(0, vol.shape[axis], stride):
            sl = np.take(vol, i, axis=axis)
            if min(sl.shape) < 32 or float((sl > 0.2).mean()) < min_signal:
                continue
            out.append(np.ascontiguousarray(sl, dtype=np.float32))
    return out


def build_bank(data: Path | None, cache: Path, cfg: "TrainConfig") -> tuple[list[np.ndarray], np.ndarray]:
    """Ground-truth 2-D slices for training and, per slice, whether it is UIH (cached under ``cache``)."""
    path = cache / f"bank-v2-s{cfg.stride}-p{cfg.min_size}.npz"
    if path.exists():
        with np.load(path) as z:
            keys = sorted(k for k in z.files if k.startswith("s"))
            return [z[k] for k in keys], z["is_uih"]
    from ..volume import load_series

    slices: list[np.ndarray] = []
    forrest = load_series(sorted(_series_dir(data, FORREST_SERIES).glob("*"))).array
    forrest = forrest / np.float32(np.percentile(forrest[::2, ::2, ::2], 99.5))
    slices += _planes(forrest, cfg.stride, cfg.min_signal)
    del forrest
    n_forrest = len(slices)
    uih, _, _ = load_uih_truth(data)
    uih = np.clip(uih, 0, None) / np.float32(np.percentile(uih[:, ::2, ::2], 99.5))
    lo, hi = HELDOUT_UIH
    for block in (uih[: lo - GUARD], uih[hi + GUARD:]):
        if block.shape[0] >= 32:
            slices += _planes(block, max(1, cfg.stride // 2), cfg.min_signal)
    slices = [_pad_min(s, cfg.min_size) for s in slices]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    is_uih = np.arange(len(slices)) >= n_forrest
    np.savez(tmp, is_uih=is_uih, **{f"s{i:05d}": s for i, s in enumerate(slices)})
    os.replace(tmp, path)
    return slices, is_uih


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Intensity, contrast (gamma), bias field, Rician noise and flips, before degradation."""
    x = np.clip(img, 0, None).astype(np.float32)
    if rng.random() < 0.5:
        x = x[::-1]
    if rng.random() < 0.5:
        x = x[:, ::-1]
    if rng.random() < 0.5:
        x = x.T
    x = np.ascontiguousarray(x)
    x = x ** np.float32(rng.uniform(0.7, 1.4))
    h, w = x.shape
    yy = np.linspace(-1, 1, h, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, :]
    c = rng.uniform(-0.25, 0.25, size=5).astype(np.float32)
    bias = np.exp(c[0] * yy + c[1] * xx + c[2] * yy * xx + c[3] * (yy**2 - 0.33) + c[4] * (xx**2 - 0.33))
    x = x * bias * np.float32(rng.uniform(0.6, 1.5))
    if rng.random() < 0.6:
        sigma = np.float32(rng.uniform(0.0, 0.03) * np.percentile(x[::3, ::3], 99.5))
        n1 = rng.normal(0, 1, x.shape).astype(np.float32) * sigma
        n2 = rng.normal(0, 1, x.shape).astype(np.float32) * sigma
        x = np.sqrt((x + n1) ** 2 + n2**2)
    return x


def make_batch(bank: list[np.ndarray], rng: np.random.Generator, axis: str, scale: int, patch: int,
               batch: int, per_slice: int = 4, is_uih: np.ndarray | None = None, uih_fraction: float = 0.0,
               min_patch_signal: float = 0.0):
    """(lr, base, hr) float32 patches, normalised by the LR slice's 99.5th percentile.

    In-plane: hr (patch, patch), lr (patch/s, patch/s), base = zero-fill of the *whole* LR slice,
    cropped. Through-plane (along rows): hr (patch+1, patch), lr (patch/s+1, patch).
    ``min_patch_signal``: redraw (up to 8 times) a patch position whose fraction of pixels above 0.1
    of the slice scale is below this (fewer all-background patches).
    """
    from .mr_superres_net import base_upsample

    lrs, bases, hrs = [], [], []
    uih_idx = np.flatnonzero(is_uih) if is_uih is not None and uih_fraction > 0 else None
    while len(hrs) < batch:
        if uih_idx is not None and len(uih_idx) and rng.random() < uih_fraction:
            pick = int(uih_idx[rng.integers(len(uih_idx))])
        else:
            pick = int(rng.integers(len(bank)))
        img = augment(bank[pick], rng)
        img, _ = kspace.crop_to_multiple(img, scale)
        if axis == "inplane":
            lr = kspace.degrade_inplane(img, scale)
            base = base_upsample(lr, scale, "inplane")
        else:
            lr = kspace.degrade_through(img, scale, axis=0)
            base = base_upsample(lr, scale, "through")
            img = img[: base.shape[0]]
        s = max(float(np.percentile(lr[::2, ::2], 99.5)), 0.05)
        lh, lw = lr.shape
        ph = patch // scale
        pw = patch // scale if axis == "inplane" else patch
        for _ in range(per_slice):
            if len(hrs) >= batch:
                break
            rows = ph if axis == "inplane" else ph + 1
            for _try in range(8):
                y = rng.integers(0, lh - rows + 1)
                x = rng.integers(0, lw - pw + 1)
                if min_patch_signal <= 0 or float((lr[y:y + rows, x:x + pw] > 0.1 * s).mean()) >= min_patch_signal:
                    break
            if axis == "inplane":
                lrs.append(lr[y:y + ph, x:x + pw] / s)
                bases.append(base[y * scale:(y + ph) * scale, x * scale:(x + pw) * scale] / s)
                hrs.append(img[y * scale:(y + ph) * scale, x * scale:(x + pw) * scale] / s)
            else:
                lrs.append(lr[y:y + ph + 1, x:x + pw] / s)
                bases.append(base[y * scale:y * scale + patch + 1, x:x + pw] / s)
                hrs.append(img[y * scale:y * scale + patch + 1, x:x + pw] / s)
    f = lambda xs: np.stack(xs)[:, None].astype(np.float32)  # noqa: E731
    return f(lrs), f(bases), f(hrs)


# --- config ---------------------------------------------------------------------------------

@dataclass
class TaskConfig:
    name: str
    pretrain_steps: int
    gan_steps: int
    l1_baseline: bool = False


@dataclass
class TrainConfig:
    seed: int = 1234
    channels: int = 32
    blocks: int = 6
    batch: int = 16
    lr: float = 2e-4
    adv_weight: float = 1e-3
    pixel_loss: str = "l1"  # pixel loss of the GAN generator: "l1" or "mse" (the L1 baseline always uses L1)
    disc_channels: int = 16
    stride: int = 4
    min_size: int = 128
    min_signal: float = 0.05
    patch_inplane: dict = field(default_factory=lambda: {"2": 96, "4": 128})
    patch_through: int = 64
    uih_fraction: float = 0.0  # probability of drawing a UIH slice (0: uniform over the bank)
    min_patch_signal: float = 0.0  # see make_batch
    tasks: list[TaskConfig] = field(default_factory=list)
    version: str = "1.0.0"

    @classmethod
    def load(cls, path: Path) -> "TrainConfig":
        raw = tomllib.loads(Path(path).read_text())
        tasks = [TaskConfig(**t) for t in raw.pop("tasks", [])]
        cfg = cls(**raw)
        cfg.tasks = tasks
        return cfg


# --- training -------------------------------------------------------------------------------

def _worker_batches(draw, seed: int, workers: int, pin_memory: bool = False):
    """Endless ``draw(rng)`` batches made in DataLoader worker processes, each worker with its own
    rng seeded from (``seed``, worker id). The DataLoader takes the workers' batches in turn, so a
    run with the same number of workers sees the same batches in the same order."""
    import torch

    class _Batches(torch.utils.data.IterableDataset):
        def __iter__(self):
            info = torch.utils.data.get_worker_info()
            rng = np.random.default_rng([seed, info.id if info else 0])
            while True:
                yield tuple(torch.from_numpy(a) for a in draw(rng))

    return iter(torch.utils.data.DataLoader(_Batches(), batch_size=None, num_workers=workers, prefetch_factor=4,
                                            persistent_workers=True, pin_memory=pin_memory))


def _train_task(task: TaskConfig, cfg: TrainConfig, bank, steps_scale: float, max_steps: int | None,
                log_every: int = 50, init: Path | None = None, device: str = "cpu", workers: int = 0,
                time_budget: float | None = None):
    """Returns (gan_generator, l1_generator or None, history).

    ``time_budget`` (seconds, GPU runs): the config's step counts set the ratio of L1 to GAN steps;
    after 60 L1 steps the speed is measured and both counts are scaled to fill the budget (the
    steps taken are logged and returned in the history).
    """
    import copy

    import torch
    import torch.nn.functional as F

    from .mr_superres_net import Discriminator, Generator, parse_task

    axis, scale = parse_task(task.name)
    idx = [t.name for t in cfg.tasks].index(task.name) if task in cfg.tasks else 0
    torch.manual_seed(cfg.seed + idx)
    rng = np.random.default_rng(cfg.seed + 1000 * idx)
    patch = int(cfg.patch_inplane[str(scale)]) if axis == "inplane" else cfg.patch_through

    def n(steps: int) -> int:
        if steps <= 0:
            return 0
        k = max(1, int(round(steps * steps_scale)))
        return min(k, max_steps) if max_steps else k

    n_pre, n_gan = n(task.pretrain_steps), n(task.gan_steps)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    gen = Generator(scale, axis, cfg.channels, cfg.blocks)
    init_l1 = None
    if init is not None:  # continue from earlier weights (a second stage, or a longer run on a GPU)
        from .mr_superres_net import generator_arch, load_generators

        start = load_generators(init / "model.safetensors").generators.get(task.name)
        if start is None or generator_arch(start) != generator_arch(gen):
            # another width or depth than this config's (say a wide GPU generator next to the
            # small CPU ones): this task starts afresh; the folder's other generators are kept
            log.info("%s: %s has no %d x %d generator of this task; training it from scratch", task.name, init,
                     cfg.channels, cfg.blocks)
        else:
            gen.load_state_dict(start.state_dict())
            if task.l1_baseline and (init / "l1_baseline.safetensors").exists():
                init_l1 = load_generators(init / "l1_baseline.safetensors").generators[task.name].state_dict()
    history: list[dict] = []
    t0 = time.time()

    bank, is_uih = bank
    gen.to(dev)

    def draw(r: np.random.Generator):
        return make_batch(bank, r, axis, scale, patch, cfg.batch, is_uih=is_uih, uih_fraction=cfg.uih_fraction,
                          min_patch_signal=cfg.min_patch_signal)

    stream = _worker_batches(draw, cfg.seed + 1000 * idx, workers, pin_memory=dev.type == "cuda") if workers > 0 \
        else None  # None: batches drawn here from ``rng``, the CPU recipe's stream (reproduces its weights)

    def batch():
        arrays = next(stream) if stream is not None else (torch.from_numpy(a) for a in draw(rng))
        return tuple(t.to(dev, non_blocking=True) for t in arrays)

    def cosine(opt, step, total, lr0):
        for g in opt.param_groups:
            g["lr"] = lr0 * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))

    total = n_pre + n_gan
    opt = torch.optim.Adam(gen.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    run_loss = run_zf = 0.0
    run_n = 0
    step = 0
    t_mark = None
    while step < n_pre:
        if time_budget and step == 10:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t_mark = time.time()
        if time_budget and step == 60 and t_mark is not None:
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_step = (time.time() - t_mark) / 50
            # a GAN step also trains the discriminator (two passes) and, with l1_baseline, a second generator
            gan_cost = 3.2 if task.l1_baseline else 2.4
            k = time_budget / max(per_step * (n_pre + gan_cost * n_gan), 1e-9)
            n_pre, n_gan = max(61, int(n_pre * k)), max(1, int(n_gan * k))
            total = n_pre + n_gan
            log.info("%s: %.1f ms per L1 step; time budget %.0fs -> %d L1 + %d GAN steps", task.name,
                     1000 * per_step, time_budget, n_pre, n_gan)
            history.append({"task": task.name, "phase": "budget", "ms_per_l1_step": 1000 * per_step,
                            "pretrain_steps": n_pre, "gan_steps": n_gan, "device": str(dev)})
        cosine(opt, step, total, cfg.lr)
        lr, base, hr = batch()
        loss = F.l1_loss(gen(lr, base), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            run_loss += loss.item()
            run_zf += F.l1_loss(base, hr).item()
            run_n += 1
        if step % log_every == 0 or step == n_pre - 1:
            loss_m, zf = run_loss / run_n, run_zf / run_n
            run_loss = run_zf = 0.0
            run_n = 0
            history.append({"task": task.name, "phase": "l1", "step": step, "loss": loss_m, "zerofill_l1": zf})
            log.info("%s l1 %d/%d loss %.5f (zero-fill %.5f, ratio %.3f) %.0fs", task.name, step, n_pre, loss_m,
                     zf, loss_m / max(zf, 1e-12), time.time() - t0)
        step += 1

    l1_gen = None
    if task.l1_baseline:
        # the plain L1 CNN: same network, same total number of steps, no adversarial term
        l1_gen = copy.deepcopy(gen)
        if init_l1 is not None:
            l1_gen.load_state_dict(init_l1)
        opt_l1 = torch.optim.Adam(l1_gen.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
        opt_l1.load_state_dict(opt.state_dict())
    disc = Discriminator(cfg.disc_channels).to(dev)
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    gan_started = time.time()
    gan_done = 0
    for step in range(n_gan):
        if time_budget and step > 0 and time.time() - t0 > 1.25 * time_budget:
            log.warning("%s: over the time budget, GAN phase stopped at step %d of %d", task.name, step, n_gan)
            break
        gan_done = step + 1
        cosine(opt, n_pre + step, total, cfg.lr)
        lr, base, hr = batch()
        sr = gen(lr, base)
        # discriminator: real HR patches vs generated
        d_real = disc(hr)
        d_fake = disc(sr.detach())
        loss_d = F.softplus(-d_real).mean() + F.softplus(d_fake).mean()
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        # generator: pixel loss + non-saturating adversarial term
        pix = F.mse_loss(sr, hr) if cfg.pixel_loss == "mse" else F.l1_loss(sr, hr)
        adv = F.softplus(-disc(sr)).mean()
        loss = pix + cfg.adv_weight * adv
        opt.zero_grad()
        loss.backward()
        opt.step()
        if l1_gen is not None:
            cosine(opt_l1, n_pre + step, total, cfg.lr)
            loss_l1 = F.l1_loss(l1_gen(lr, base), hr)
            opt_l1.zero_grad()
            loss_l1.backward()
            opt_l1.step()
        if step % log_every == 0 or step == n_gan - 1:
            rec = {"task": task.name, "phase": "gan", "step": step, "pixel": pix.item(), "adv": adv.item(),
                   "disc": loss_d.item()}
            if l1_gen is not None:
                rec["l1_baseline"] = loss_l1.item()
            history.append(rec)
            log.info("%s gan %d/%d pixel %.5f adv %.3f disc %.3f %.0fs", task.name, step, n_gan, pix.item(),
                     adv.item(), loss_d.item(), time.time() - t0)
    log.info("%s: GAN phase %.0fs, task %.0fs", task.name, time.time() - gan_started, time.time() - t0)
    history.append({"task": task.name, "phase": "done", "pretrain_steps": n_pre, "gan_steps": gan_done,
                    "seconds": round(time.time() - t0, 1)})
    gen.cpu().eval()
    if l1_gen is not None:
        l1_gen.cpu().eval()
    return gen, l1_gen, history


def train_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pacs-node models train mr-superres",
                                description="Train the MR super-resolution generators (seeded, CPU or GPU).")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="training config (TOML)")
    p.add_argument("--out", type=Path, default=DEFAULT_CONFIG.parent, help="folder for model.safetensors")
    p.add_argument("--data", type=Path, default=None, help="data folder holding mr/ (default: shared data)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache of precomputed training slices")
    p.add_argument("--tasks", default="", help="comma-separated subset of the config's tasks")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every step count")
    p.add_argument("--max-steps", type=int, default=0, help="cap every phase at this many steps (smoke runs)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="torch device for training (cpu, cuda)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes preparing batches (0: in the training process, the CPU recipe)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds per task: scale the config's step counts to fill it (GPU runs)")
    p.add_argument("--init", type=Path, default=None,
                   help="folder with model.safetensors (and l1_baseline.safetensors) to continue from; "
                        "its other generators are kept in the output")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)

    import torch

    from .mr_superres_net import save_generators

    torch.set_num_threads(max(1, args.threads))
    cfg = TrainConfig.load(args.config)
    tasks = cfg.tasks
    if args.tasks:
        wanted = args.tasks.split(",")
        tasks = [t for t in cfg.tasks if t.name in wanted]
        if not tasks:
            print(f"no task among {wanted} in {args.config}", file=sys.stderr)
            return 2
    t0 = time.time()
    bank = build_bank(args.data, args.cache, cfg)
    if isinstance(bank, list):  # a plain list of slices (tests): no UIH tags
        bank = (bank, np.zeros(len(bank), bool))
    log.info("training bank: %d slices, %d UIH (%.0fs)", len(bank[0]), int(bank[1].sum()), time.time() - t0)
    gens, l1s, history, meta_tasks = {}, {}, [], {}
    if args.init is not None:
        from .mr_superres_net import load_generators

        init_set = load_generators(args.init / "model.safetensors")
        gens = dict(init_set.generators)
        meta_tasks = dict(init_set.meta.get("tasks", {}))
        if (args.init / "l1_baseline.safetensors").exists():
            l1s = dict(load_generators(args.init / "l1_baseline.safetensors").generators)
        hist_file = args.init / "train_history.json"
        if hist_file.exists():
            history = json.loads(hist_file.read_text())
    for task in tasks:
        g, l1, h = _train_task(task, cfg, bank, args.steps_scale, args.max_steps or None, init=args.init,
                               device=args.device, workers=args.workers, time_budget=args.time_budget or None)
        gens[task.name] = g
        if l1 is not None:
            l1s[task.name] = l1
        history += h
        done = next(r for r in reversed(h) if r["phase"] == "done")
        meta_tasks[task.name] = {"steps_scale": args.steps_scale, "max_steps": args.max_steps, "device": args.device,
                                 "workers": args.workers,
                                 **{k: v for k, v in done.items() if k not in ("task", "phase")}}
        meta = {"version": cfg.version, "channels": cfg.channels, "blocks": cfg.blocks, "seed": cfg.seed,
                "heldout_uih_sagittal": list(HELDOUT_UIH), "guard": GUARD,
                "tasks": dict(meta_tasks),
                "config": args.config.name, "init": str(args.init) if args.init else None}
        # write after every task so that a long run leaves usable weights behind
        save_generators(args.out / "model.safetensors", gens, meta)
        if l1s:
            save_generators(args.out / "l1_baseline.safetensors", l1s, {**meta, "kind": "plain L1 CNN baseline"})
        (args.out / "train_history.json").write_text(json.dumps(history))
    log.info("done in %.0fs", time.time() - t0)
    return 0


# --- metrics --------------------------------------------------------------------------------

def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    mse = float(np.mean((np.asarray(pred, np.float64) - np.asarray(ref, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim(pred: np.ndarray, ref: np.ndarray, data_range: float = 1.0) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(ref.astype(np.float64), pred.astype(np.float64), data_range=data_range,
                                       gaussian_weights=True, sigma=1.5, use_sample_covariance=False))


# --- evaluation -----------------------------------------------------------------------------

def _model_path(name: str) -> Path:
    from ..models_dir import model_path

    return model_path("mr-superres", name)


def evaluate(data: Path | None, scale: int, axis: str = "inplane", weights: Path | None = None,
             baseline: Path | None = None, block: tuple[int, int] = HELDOUT_UIH, ensemble: bool = False):
    """Metrics of every method on the held-out UIH block. Returns (rows, info, images for the panel)."""
    truth, spacing, _ = load_uih_truth(data)
    rows, info, images = evaluate_block(np.clip(truth[block[0]:block[1]], 0, None), spacing, scale, axis,
                                        weights, baseline, ensemble)
    info["heldout_uih_sagittal"] = [block[0], block[1] - 1]
    info["what"] = f"held-out UIH sagittal slices {block[0]}-{block[1] - 1}"
    return rows, info, images


def evaluate_block(gt: np.ndarray, spacing, scale: int, axis: str = "inplane", weights: Path | None = None,
                   baseline: Path | None = None, ensemble: bool = False):
    """Metrics of every method on one ground-truth block (z, y, x) at its acquired resolution,
    degraded here. Returns (rows, info, images for the panel)."""
    from .mr_superres_net import load_generators, superres_inplane, superres_through, task_name

    ref = float(np.percentile(gt, 99.5))
    name = task_name(axis, scale)
    methods: dict[str, np.ndarray] = {}
    if axis == "inplane":
        gt, _ = kspace.crop_to_multiple(gt, scale)
        lr = kspace.degrade_inplane(gt, scale)
        methods["zero-fill (sinc)"] = kspace.zerofill_upsample(lr, scale)
        methods["bicubic (true grid)"] = kspace.kernel_upsample(lr, scale, "bicubic")
        methods["lanczos3 (true grid)"] = kspace.kernel_upsample(lr, scale, "lanczos")
        run = lambda g, x: superres_inplane(g, x, ensemble=ensemble)  # noqa: E731
    else:
        n = (gt.shape[0] - 1) // scale * scale + 1
        gt = gt[:n]
        lr = kspace.degrade_through(gt, scale, axis=0)
        methods["linear (true grid)"] = kspace.linear_upsample_axis(lr, scale, axis=0)
        run = superres_through
    for label, path in (("plain L1 CNN", baseline or _model_path("l1_baseline.safetensors")),
                        ("mr-superres (GAN)", weights or _model_path("model.safetensors"))):
        if path.exists():
            ms = load_generators(path)
            if name in ms.generators:
                methods[label] = run(ms.generators[name], lr)
    rows = []
    for label, pred in methods.items():
        p = pred / ref
        g = gt / ref
        if axis == "inplane":
            pairs = list(zip(p, g))
        else:  # score the slices the method created (not the ones it was given)
            keep = [k for k in range(len(g)) if k % scale]
            pairs = [(p[k], g[k]) for k in keep]
        ps = [psnr(a, b) for a, b in pairs]
        ss = [ssim(a, b) for a, b in pairs]
        rows.append({"method": label, "psnr_db": float(np.mean(ps)), "ssim": float(np.mean(ss)),
                     "psnr_min_db": float(np.min(ps)), "n_slices": len(pairs)})
    zf = rows[0]
    for r in rows:
        r["delta_psnr_vs_first_db"] = r["psnr_db"] - zf["psnr_db"]
        r["delta_ssim_vs_first"] = r["ssim"] - zf["ssim"]
    info = {"task": name, "scale": scale, "axis": axis,
            "gt_shape": list(gt.shape), "gt_pixel_spacing_mm": [float(v) for v in spacing], "reference_intensity": ref,
            "normalisation": "every image divided by the 99.5th percentile of the ground-truth block "
                             "(negative ground truth clipped to 0, predictions unclipped); PSNR with data "
                             "range 1 and SSIM (Gaussian window sigma 1.5, data range 1) per full 2-D slice, "
                             "averaged over slices"}
    return rows, info, {"gt": gt / ref, "lr": lr / ref, **{k: v / ref for k, v in methods.items()}}


def holds_uih(data: Path) -> bool:
    """Whether ``data`` is the shared data folder (or its UIH series folder): the held-out evaluation."""
    try:
        _series_dir(data, UIH_SERIES)
    except FileNotFoundError:
        return False
    return True


def external_blocks(root: Path, max_slices: int = 40):
    """Ground truth from any folder of DICOM MR series (other scanners, subjects, contrasts): for
    each MR series, its central ``max_slices`` contiguous slices in the acquisition plane, at the
    acquired resolution where the scanner interpolated (the UIH convention, ``kspace``).

    Yields (description, block (z, y, x) float32 >= 0, in-plane spacing (mm), slice spacing (mm)).
    """
    from ..errors import PacsNodeError
    from ..volume import series_volumes

    found = 0
    for uid, vol in series_volumes(root, "MR", "external evaluation"):
        arr, spacing = kspace.to_acquired_resolution(vol.array.astype(np.float32), vol.datasets[0],
                                                     vol.pixel_spacing)
        if min(arr.shape[1:]) < 32:
            log.info("external evaluation: skipping series %s: %s pixels per slice is too small",
                     uid, "x".join(map(str, arr.shape[1:])))
            continue
        z = arr.shape[0]
        lo = max(0, z // 2 - max_slices // 2)
        block = np.clip(arr[lo: lo + max_slices], 0, None)
        if float(np.percentile(block, 99.5)) <= 0:
            log.info("external evaluation: skipping series %s: its central slices are blank", uid)
            continue
        plane = ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(vol.normal)))]
        step = float(vol.spacing[0])
        acquired = "" if tuple(arr.shape[1:]) == tuple(vol.array.shape[1:]) else \
            f", acquired matrix of a {vol.array.shape[1]}x{vol.array.shape[2]} reconstruction"
        what = (f"{plane} series {uid}: slices {lo}-{lo + len(block) - 1} of {z}, {block.shape[1]}x{block.shape[2]} "
                f"at {spacing[0]:.2f}x{spacing[1]:.2f} mm{acquired}, slice step {step:.2f} mm")
        found += 1
        yield what, block, spacing, step
    if not found:
        raise PacsNodeError(f"{root}: no MR series to evaluate (expected the shared data folder holding "
                            f"{UIH_SERIES}/, or a folder of DICOM MR series)")


def _plot(path: Path, images: dict, info: dict, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gt = images["gt"]
    scale = info["scale"]
    z = gt.shape[0] // 2
    names = [k for k in images if k not in ("gt", "lr")]
    metric = {r["method"]: r for r in rows}
    if info["axis"] == "inplane":
        h, w = gt.shape[1:]
        cy, cx, half = h // 2, w // 2, min(h, w) // 4
        crop = lambda im: im[z, cy - half:cy + half, cx - half:cx + half]  # noqa: E731
        lr_img = np.kron(images["lr"][z], np.ones((scale, scale)))[cy - half:cy + half, cx - half:cx + half]
    else:
        cy = gt.shape[1] // 2
        crop = lambda im: im[:, cy, :]  # noqa: E731
        lr_img = np.repeat(images["lr"][:, cy, :], scale, axis=0)[: gt.shape[0]]
    panels = [("ground truth", crop(gt)), (f"input (x{scale}, nearest)", lr_img)]
    panels += [(f"{k}\n{metric[k]['psnr_db']:.2f} dB / {metric[k]['ssim']:.4f}", crop(images[k])) for k in names]
    errs = [(f"|error| {k.split(' (')[0]}", np.abs(crop(images[k]) - crop(gt))) for k in names]
    cols = len(panels)
    # through-plane panels show a (z, x) cut: stretch z so the slices are drawn at their thickness
    aspect = "equal" if info["axis"] == "inplane" else "auto"
    fig, axes = plt.subplots(2, cols, figsize=(2.6 * cols, 5.6))
    for ax, (title, im) in zip(axes[0], panels):
        ax.imshow(im, cmap="gray", vmin=0, vmax=1, interpolation="nearest", aspect=aspect)
        ax.set_title(title, fontsize=7)
    for ax, (title, im) in zip(axes[1, 2:], errs):
        ax.imshow(im, cmap="magma", vmin=0, vmax=0.15, interpolation="nearest", aspect=aspect)
        ax.set_title(title, fontsize=7)
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"{info['what']}, {info['axis']} x{scale} (slice {z} of block)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _print_rows(rows: list[dict]) -> None:
    first = rows[0]["method"]
    print(f"{'method':<24}{'PSNR dB':>9}{'SSIM':>9}{'dPSNR':>9}{'dSSIM':>9}   (d = vs {first})")
    for r in rows:
        print(f"{r['method']:<24}{r['psnr_db']:9.2f}{r['ssim']:9.4f}{r['delta_psnr_vs_first_db']:+9.2f}"
              f"{r['delta_ssim_vs_first']:+9.4f}")


def pooled(per_series: list[list[dict]]) -> list[dict]:
    """Slice-weighted means over series of each method's PSNR / SSIM (methods every series has)."""
    methods = [r["method"] for r in per_series[0] if all(any(x["method"] == r["method"] for x in rows)
                                                          for rows in per_series)]
    out = []
    for m in methods:
        got = [next(x for x in rows if x["method"] == m) for rows in per_series]
        n = sum(g["n_slices"] for g in got)
        out.append({"method": m, "n_slices": n,
                    "psnr_db": sum(g["psnr_db"] * g["n_slices"] for g in got) / n,
                    "ssim": sum(g["ssim"] * g["n_slices"] for g in got) / n,
                    "psnr_min_db": min(g["psnr_min_db"] for g in got)})
    for r in out:
        r["delta_psnr_vs_first_db"] = r["psnr_db"] - out[0]["psnr_db"]
        r["delta_ssim_vs_first"] = r["ssim"] - out[0]["ssim"]
    return out


def _eval_external(args) -> int:
    """Every MR series under --data: the same degradation, methods and metrics as the held-out block."""
    min_slices = 2 * args.scale + 1 if args.axis == "through" else 1
    results, plotted = [], False
    t0 = time.time()
    for what, block, spacing, step in external_blocks(args.data, args.max_slices):
        if block.shape[0] < min_slices:
            print(f"\n{what}\n  skipped: through-plane x{args.scale} needs {min_slices} slices, the series has "
                  f"{block.shape[0]}")
            continue
        rows, info, images = evaluate_block(block, spacing, args.scale, args.axis, args.weights, args.baseline,
                                            ensemble=args.ensemble)
        info["what"] = what
        print(f"\n{what}")
        if args.axis == "through" and not 0.4 <= step <= 1.5:
            print(f"  note: the through-plane models were trained on 0.67-1 mm slice steps; this series' "
                  f"{step:.2f} mm is simulated as {args.scale * step:.2f} mm slices")
        _print_rows(rows)
        results.append({"info": info, "results": rows})
        if args.plot and not plotted:
            _plot(args.plot, images, info, rows)
            plotted = True
    if not results:
        print("no series could be evaluated")
        return 1
    summary = pooled([r["results"] for r in results])
    print(f"\nall {len(results)} series, slice-weighted mean ({summary[0]['n_slices']} slices)")
    _print_rows(summary)
    print(f"normalisation: {results[0]['info']['normalisation']}, per series")
    print(f"({time.time() - t0:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps({"split": "external", "series": results, "pooled": summary}, indent=2))
    return 0


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="pacs-node models eval mr-superres",
                                description="PSNR/SSIM of zero-fill, bicubic, Lanczos, a plain L1 CNN and the "
                                            "model: on the held-out UIH block, or on any folder of DICOM MR "
                                            "series (split 'external').")
    p.add_argument("--data", type=Path, default=None,
                   help="the shared data folder holding mr/uih-t1-3d-sag (or that folder): the held-out "
                        "evaluation; or any folder of DICOM MR series (other scanners, subjects): split 'external'")
    p.add_argument("--split", choices=("held-out", "external"), default=None,
                   help="held-out (default where --data holds the UIH series, or without --data); external "
                        "(default otherwise): each MR series' central --max-slices slices, degraded the same way")
    p.add_argument("--max-slices", type=int, default=40,
                   help="external: contiguous slices per series (default 40, the size of the held-out block)")
    p.add_argument("--scale", type=int, default=2, choices=(2, 4))
    p.add_argument("--axis", default="inplane", choices=("inplane", "through"))
    p.add_argument("--weights", type=Path, default=None, help="model weights (default models/mr-superres)")
    p.add_argument("--baseline", type=Path, default=None, help="plain L1 CNN weights")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write a crop panel PNG here (external: the first series)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("--ensemble", action="store_true", help="in-plane: average over 4 periodic flips (both CNNs)")
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.max_slices < 1:
        p.error("--max-slices must be at least 1")
    split = args.split or ("held-out" if args.data is None or holds_uih(args.data) else "external")
    if split == "external":
        if args.data is None:
            p.error("--split external needs --data (a folder of DICOM MR series)")
        return _eval_external(args)
    t0 = time.time()
    rows, info, images = evaluate(args.data, args.scale, args.axis, args.weights, args.baseline,
                                  ensemble=args.ensemble)
    info["ensemble"] = bool(args.ensemble)
    print(f"mr-superres eval: {info['axis']} x{info['scale']}, {info['what']} "
          f"(ground truth {info['gt_shape']} at {info['gt_pixel_spacing_mm'][0]:g} mm)")
    print(f"normalisation: {info['normalisation']}")
    _print_rows(rows)
    print(f"({time.time() - t0:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps({"info": info, "results": rows}, indent=2))
    if args.plot:
        _plot(args.plot, images, info, rows)
    return 0
