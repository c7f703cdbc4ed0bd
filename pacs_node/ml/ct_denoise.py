"""ct-denoise: a residual CNN generator trained with L1 + SSIM + PatchGAN on simulated low dose.

Network: a compact 2-D U-Net (:class:`SmallUNet`, ~0.4 M parameters) predicting the noise;
the output is ``input - noise``. Input and output are HU / 1000 (air -1, water 0), one slice
at a time, any size (padded to a multiple of 8). The weights file (safetensors) carries the
architecture in its metadata, so the pipeline rebuilds the network from the file alone.

Training pairs come from :mod:`pacs_node.ml.lowdose` (projection-domain noise insertion) via
:mod:`pacs_node.ml.ct_denoise_data`; the loop adds a randomly rescaled noise image to each
normal-dose patch, so one model serves 10-50 % dose without being told the dose.

Entry points (``pacs-node models train|eval ct-denoise ...``): :func:`train_main`, :func:`eval_main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import toml_value
from ..models_dir import model_path

log = logging.getLogger(__name__)

MODEL_NAME = "ct-denoise"
MODEL_VERSION = "1.0.0"
HU_SCALE = 1000.0
SOFT_WINDOW = (-160.0, 240.0)
WIDE_WINDOW = (-1000.0, 1000.0)


def default_config_path() -> Path:
    return model_path(MODEL_NAME, "train.toml")


# ----------------------------------------------------------------------------- networks


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


class SmallUNet(nn.Module):
    """Compact 2-D U-Net (no normalisation layers, so the noise amplitude passes through).

    Full resolution carries one convolution in and one out; the depth sits at lower
    resolutions, which keeps a 512 x 512 slice at a few GMAC. The last 1x1 convolution starts
    at zero, so the residual denoiser starts as the identity.
    """

    def __init__(self, channels=(16, 32, 64, 128)) -> None:
        super().__init__()
        c = [int(v) for v in channels]
        self.inc = nn.Sequential(nn.Conv2d(1, c[0], 3, padding=1), _act())
        self.downs = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c[i], c[i + 1], 3, stride=2, padding=1), _act(),
                          nn.Conv2d(c[i + 1], c[i + 1], 3, padding=1), _act())
            for i in range(len(c) - 1)
        )
        self.ups = nn.ModuleList(nn.ConvTranspose2d(c[i + 1], c[i], 2, stride=2) for i in range(len(c) - 1))
        self.fuse = nn.ModuleList(
            nn.Sequential(nn.Conv2d(2 * c[i], c[i], 3, padding=1), _act()) for i in range(len(c) - 1)
        )
        self.out = nn.Conv2d(c[0], 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(skips[-1]))
        h = skips.pop()
        for i in reversed(range(len(self.ups))):
            h = self.fuse[i](torch.cat([self.ups[i](h), skips.pop()], dim=1))
        return self.out(h)


class ResidualDenoiser(nn.Module):
    """``x - UNet(x)``: the U-Net estimates the noise of a (B, 1, H, W) slice in HU/1000."""

    def __init__(self, channels=(16, 32, 64, 128)) -> None:
        super().__init__()
        self.arch = {"channels": [int(v) for v in channels]}
        self.net = SmallUNet(channels)
        self.multiple = 2 ** (len(channels) - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.net(x)


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) on two views of an image: HU/1000 and the soft-tissue window."""

    def __init__(self, channels=(16, 32, 64)) -> None:
        super().__init__()
        sn = nn.utils.spectral_norm
        layers: list[nn.Module] = []
        c_in = 2
        for i, c in enumerate(channels):
            stride = 2 if i < len(channels) - 1 else 1
            layers += [sn(nn.Conv2d(c_in, c, 4, stride, 1)), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c
        layers.append(sn(nn.Conv2d(c_in, 1, 4, 1, 1)))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        soft = (x * HU_SCALE).clamp(*SOFT_WINDOW)
        soft = (soft - SOFT_WINDOW[0]) / (SOFT_WINDOW[1] - SOFT_WINDOW[0]) * 2.0 - 1.0
        return self.net(torch.cat([x, soft], dim=1))


def _gauss_kernel(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2.0
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :])[None, None]


def ssim_torch(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of (B, 1, H, W) images (Gaussian window 11, sigma 1.5, valid region)."""
    k = _gauss_kernel().to(a.device, a.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = F.conv2d(a, k), F.conv2d(b, k)
    saa = F.conv2d(a * a, k) - mu_a**2
    sbb = F.conv2d(b * b, k) - mu_b**2
    sab = F.conv2d(a * b, k) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (saa + sbb + c2))
    return s.mean()


def soft_window(x: torch.Tensor) -> torch.Tensor:
    """HU/1000 -> the [-160, 240] HU window scaled to [0, 1]."""
    return ((x * HU_SCALE).clamp(*SOFT_WINDOW) - SOFT_WINDOW[0]) / (SOFT_WINDOW[1] - SOFT_WINDOW[0])


# ----------------------------------------------------------------------------- weights


def save_model(model: ResidualDenoiser, path: Path, extra: dict[str, Any] | None = None) -> None:
    from safetensors.torch import save_file

    meta = {"name": MODEL_NAME, "version": MODEL_VERSION, "arch": json.dumps(model.arch)}
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)


def load_model(path: Path | None = None) -> tuple[ResidualDenoiser, dict[str, str]]:
    """Rebuild the generator from a weights file (architecture from its metadata)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path or model_path(MODEL_NAME))
    if not path.exists():
        raise FileNotFoundError(f"ct-denoise weights not found at {path} (train with `pacs-node models train ct-denoise`)")
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    arch = json.loads(meta.get("arch", "{}"))
    model = ResidualDenoiser(**arch)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    return model, meta


# ----------------------------------------------------------------------------- inference


def denoise_slices(
    model: ResidualDenoiser,
    hu: np.ndarray,
    batch: int = 8,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Denoise a (z, y, x) or (y, x) HU array slice by slice, in batches; float32 HU out.

    Padding outside the scan field (values below -1024 HU) is fed to the network as air and
    restored unchanged in the output. On CUDA the network runs under bf16 autocast; on CPU in
    float32.
    """
    arr = np.asarray(hu, dtype=np.float32)
    squeeze = arr.ndim == 2
    if squeeze:
        arr = arr[None]
    device = torch.device(device)
    if device.type == "cuda":
        out = _denoise_cuda(model, arr, max(1, batch), device)
        return out[0] if squeeze else out
    pad_mask = arr < -1024.0
    x_all = np.where(pad_mask, np.float32(-1000.0), arr) / np.float32(HU_SCALE)
    m = model.multiple
    h, w = arr.shape[1:]
    ph, pw = (-h) % m, (-w) % m
    out = np.empty_like(arr)
    model = model.to(device)
    with torch.inference_mode():
        for i in range(0, arr.shape[0], max(1, batch)):
            x = torch.from_numpy(np.ascontiguousarray(x_all[i:i + batch]))[:, None].to(device)
            if ph or pw:
                x = F.pad(x, (0, pw, 0, ph), mode="replicate")
            if device.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    y = model(x)
            else:
                y = model(x)
            out[i:i + batch] = (y[:, 0, :h, :w].float() * HU_SCALE).cpu().numpy()
    out = np.where(pad_mask, arr, out).astype(np.float32)
    return out[0] if squeeze else out


def _denoise_cuda(model: ResidualDenoiser, arr: np.ndarray, batch: int, device: torch.device) -> np.ndarray:
    """denoise_slices on CUDA: the same arithmetic, with the padding mask, scaling and restore on
    the GPU, and the host side reduced to two copies per slice through pinned buffers.

    Two buffer slots alternate: while the GPU works on batch k, the host copies batch k-1's
    result out and batch k+1 in (all GPU work is on one stream, so it runs in order; events say
    when a slot's copies are done).
    """
    n, h, w = arr.shape
    m = model.multiple
    ph, pw = (-h) % m, (-w) % m
    out = np.empty_like(arr)
    model = model.to(device)
    b = min(batch, n)
    pin_in = [torch.empty((b, h, w), dtype=torch.float32).pin_memory() for _ in range(2)]
    pin_out = [torch.empty((b, h, w), dtype=torch.float32).pin_memory() for _ in range(2)]
    pending: tuple[int, int, int, torch.cuda.Event] | None = None

    def drain(item: tuple[int, int, int, torch.cuda.Event]) -> None:
        slot, start, k, done = item
        done.synchronize()
        out[start:start + k] = pin_out[slot][:k].numpy()

    with torch.inference_mode():
        for j, start in enumerate(range(0, n, b)):
            slot, k = j % 2, min(b, n - start)
            # this slot's previous batch (j - 2) was drained in round j - 1: its buffers are free
            pin_in[slot][:k].numpy()[...] = arr[start:start + k]
            x = pin_in[slot][:k].to(device, non_blocking=True)[:, None]
            pad = x < -1024.0
            xin = x.masked_fill(pad, -1000.0) / HU_SCALE
            if ph or pw:
                xin = F.pad(xin, (0, pw, 0, ph), mode="replicate")
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y = model(xin)
            y = torch.where(pad, x, y[:, :, :h, :w].float() * HU_SCALE)
            pin_out[slot][:k].copy_(y[:, 0], non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            if pending is not None:
                drain(pending)  # the previous batch, while this one runs
            pending = (slot, start, k, done)
        if pending is not None:
            drain(pending)
    return out


# ----------------------------------------------------------------------------- config


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    path = Path(path or default_config_path())
    with open(path, "rb") as f:
        cfg = tomllib.load(f)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key = key.strip()
        if key not in cfg:
            raise SystemExit(f"--set {key}: unknown config key (known: {', '.join(sorted(cfg))})")
        cfg[key] = toml_value(value)
    return cfg


# ----------------------------------------------------------------------------- training


class PatchSampler:
    """Random training patches: normal-dose target and low-dose input (HU), augmented."""

    def __init__(self, clean: np.ndarray, noise: np.ndarray, cfg: dict[str, Any], rng: np.random.Generator) -> None:
        self.clean, self.noise, self.cfg, self.rng = clean, noise, cfg, rng
        self.p = int(cfg["patch"])
        if self.p > min(clean.shape[1:]):
            raise ValueError(f"patch {self.p} larger than the slices {clean.shape[1:]}")

    def one(self) -> tuple[np.ndarray, np.ndarray]:
        rng, p, cfg = self.rng, self.p, self.cfg
        n, h, w = self.clean.shape
        i = int(rng.integers(n))
        for _ in range(20):
            y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
            c = self.clean[i, y:y + p, x:x + p]
            if (c > -900).mean() > 0.3:
                break
        r = int(rng.integers(self.noise.shape[1]))
        lo, hi = cfg["noise_scale"]
        s = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        nz = self.noise[i, r, y:y + p, x:x + p].astype(np.float32) * np.float32(s)
        k = rng.uniform(*cfg["hu_scale"])
        off = rng.uniform(*cfg["hu_offset"])
        c = ((c + 1000.0) * k - 1000.0 + off).astype(np.float32)
        inp = c + nz
        if cfg.get("flips", True):
            rot = int(rng.integers(4))
            c, inp = np.rot90(c, rot), np.rot90(inp, rot)
            if rng.random() < 0.5:
                c, inp = c[:, ::-1], inp[:, ::-1]
        return np.ascontiguousarray(inp), np.ascontiguousarray(c)

    def batch(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.one() for _ in range(b)]
        inp = torch.from_numpy(np.stack([q[0] for q in pairs]))[:, None] / HU_SCALE
        tgt = torch.from_numpy(np.stack([q[1] for q in pairs]))[:, None] / HU_SCALE
        return inp, tgt


def train(cfg: dict[str, Any], out: Path, cache: Path, data: Path, workers: int = 1,
          limit_slices: int | None = None, log_every: int = 50, save_every: int = 500,
          init: Path | None = None) -> dict[str, Any]:
    from .ct_denoise_data import build_cache, load_cache

    torch.set_num_threads(int(cfg.get("threads", 1)))
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    files = build_cache(cfg, cache, data, workers=workers, limit=limit_slices)
    clean, noise = load_cache(files)
    log.info("training pairs: %d slices x %d noise realisations (%.0f s to prepare)", clean.shape[0], noise.shape[1], time.time() - t0)

    gen = ResidualDenoiser(cfg["channels"])
    disc = PatchDiscriminator(cfg["disc_channels"])
    n_params = sum(p.numel() for p in gen.parameters())
    log.info("generator: %d parameters", n_params)
    prior_steps = 0
    if init is not None:
        prev, prev_meta = load_model(init)
        gen.load_state_dict(prev.state_dict())
        prior_steps = int(prev_meta.get("trained_steps", 0) or 0) + int(prev_meta.get("prior_steps", 0) or 0)
        log.info("generator initialised from %s (%d steps before)", init, prior_steps)
        rng = np.random.default_rng([seed, prior_steps])  # new patches, not a replay of phase 1
    sampler = PatchSampler(clean, noise, cfg, rng)
    steps = int(cfg["steps"])
    opt_g = torch.optim.Adam(gen.parameters(), lr=float(cfg["lr"]), betas=(0.9, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=float(cfg["lr_d"]), betas=(0.5, 0.999))
    base_lr = float(cfg["lr"])
    adv_start = float(cfg["adv_start"])
    w = {k: float(cfg[k]) for k in ("w_l1_wide", "w_l1_soft", "w_ssim", "w_adv")}
    budget = float(cfg.get("max_minutes", 0) or 0) * 60.0
    t_start = time.time()
    run_avg: dict[str, float] = {}
    history = []
    step = 0

    def save(final: bool) -> None:
        extra = {"trained_steps": step, "prior_steps": prior_steps, "config": cfg, "params": n_params,
                 "train_seconds": round(time.time() - t_start, 1), "final": final}
        save_model(gen, out / "model.safetensors", extra)

    for step in range(1, steps + 1):
        # progress drives the cosine learning rate and the adversarial switch-on; with a
        # time budget it is the larger of the step and the time fractions (set max_minutes = 0
        # for a purely step-based, bit-reproducible run)
        elapsed = time.time() - t_start
        progress = min(1.0, max((step - 1) / steps, elapsed / budget if budget else 0.0))
        for g in opt_g.param_groups:
            g["lr"] = base_lr * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * progress)))
        inp, tgt = sampler.batch(int(cfg["batch"]))
        gen.train()
        pred = gen(inp)
        l_wide = (pred - tgt).abs().mean()
        ps, ts = soft_window(pred), soft_window(tgt)
        l_soft = (ps - ts).abs().mean()
        l_ssim = 1.0 - ssim_torch(ps, ts, 1.0)
        loss = w["w_l1_wide"] * l_wide + w["w_l1_soft"] * l_soft + w["w_ssim"] * l_ssim
        use_adv = w["w_adv"] > 0 and progress >= adv_start
        l_adv = torch.zeros(())
        if use_adv:
            l_adv = ((disc(pred) - 1.0) ** 2).mean()
            loss = loss + w["w_adv"] * l_adv
        opt_g.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(gen.parameters(), 1.0)
        opt_g.step()
        l_d = torch.zeros(())
        if use_adv:
            d_real, d_fake = disc(tgt), disc(pred.detach())
            l_d = 0.5 * (((d_real - 1.0) ** 2).mean() + (d_fake**2).mean())
            opt_d.zero_grad(set_to_none=True)
            l_d.backward()
            opt_d.step()
        for k, v in (("loss", loss.detach()), ("l1_wide_hu", l_wide * HU_SCALE), ("l1_soft", l_soft), ("ssim", 1 - l_ssim), ("adv", l_adv), ("d", l_d)):
            v = float(v.detach())
            run_avg[k] = 0.98 * run_avg.get(k, v) + 0.02 * v
        elapsed = time.time() - t_start
        if step % log_every == 0 or step == 1:
            log.info("step %d/%d %.0fs %s", step, steps, elapsed, " ".join(f"{k}={v:.4f}" for k, v in run_avg.items()))
            history.append({"step": step, "seconds": round(elapsed, 1), **{k: round(v, 5) for k, v in run_avg.items()}})
        if save_every and step % save_every == 0:
            save(final=False)
        if budget and time.time() - t_start > budget:
            log.info("time budget of %.1f min reached at step %d", budget / 60, step)
            break
    save(final=True)
    summary = {"steps": step, "seconds": round(time.time() - t_start, 1), "params": n_params, "history": history}
    if out.resolve() != model_path(MODEL_NAME).parent.resolve():  # no generated logs inside the repo
        (out / "train_log.json").write_text(json.dumps(summary, indent=1))
    return summary


def train_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pacs-node models train ct-denoise", description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, default=None, help="TOML config (default models/ct-denoise/train.toml)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    ap.add_argument("--out", type=Path, default=None, help="output folder for model.safetensors (default models/ct-denoise)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/pacs-node-ctd-cache"), help="simulated pair cache")
    ap.add_argument("--data", type=Path, default=None, help="data folder holding ct/<series> (default: shared data cache)")
    ap.add_argument("--workers", type=int, default=1, help="processes for the one-off simulation")
    ap.add_argument("--limit-slices", type=int, default=None, help="slices per series (smoke runs)")
    ap.add_argument("--steps", type=int, default=None, help="shortcut for --set steps=N")
    ap.add_argument("--init", type=Path, default=None, help="start the generator from these weights (a second phase)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-every", type=int, default=500)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = load_config(args.config, args.set)
    if args.steps is not None:
        cfg["steps"] = args.steps
    if args.data is None:
        from ..datasets import data_dir

        args.data = data_dir()
    out = args.out or model_path(MODEL_NAME).parent
    summary = train(cfg, out, args.cache, args.data, workers=args.workers, limit_slices=args.limit_slices,
                    log_every=args.log_every, save_every=args.save_every, init=args.init)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))
    return 0


def eval_main(argv: list[str]) -> int:
    from .ct_denoise_eval import eval_main as _eval_main

    return _eval_main(argv)
