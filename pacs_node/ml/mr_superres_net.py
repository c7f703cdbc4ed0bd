"""Networks of the MR super-resolution model and the inference helpers that wrap them.

The generator works in low-resolution space (EDSR/SRResNet-style residual blocks without batch
norm) and predicts a *correction* that is added to the classical upsampling of its own input:
zero-filled k-space (sinc) interpolation in-plane, linear interpolation through-plane. An
untrained (zero) tail therefore reproduces the strongest classical baseline exactly, and the
output keeps its grid: output pixel s*m lies on input pixel m.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kspace

TASKS = ("inplane2", "inplane4", "through2", "through4")


def task_name(axis: str, scale: int) -> str:
    return f"{'inplane' if axis == 'inplane' else 'through'}{int(scale)}"


def parse_task(name: str) -> tuple[str, int]:
    return ("inplane" if name.startswith("inplane") else "through"), int(name[-1])


class ResBlock(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.c2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.5 * self.c2(F.relu(self.c1(x)))


class Generator(nn.Module):
    """LR-space residual generator; ``axis`` 'inplane' upsamples rows and columns, 'through' rows only."""

    def __init__(self, scale: int, axis: str = "inplane", channels: int = 48, blocks: int = 6) -> None:
        super().__init__()
        self.scale, self.axis = int(scale), axis
        self.head = nn.Conv2d(1, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResBlock(channels) for _ in range(blocks)])
        self.body_end = nn.Conv2d(channels, channels, 3, padding=1)
        n_sub = self.scale * self.scale if axis == "inplane" else self.scale
        self.tail = nn.Conv2d(channels, n_sub, 3, padding=1)
        nn.init.zeros_(self.tail.weight)
        nn.init.zeros_(self.tail.bias)

    def residual(self, lr: torch.Tensor) -> torch.Tensor:
        f = self.head(lr)
        f = f + self.body_end(self.body(f))
        r = self.tail(F.relu(f))
        s = self.scale
        b, _, h, w = r.shape
        if self.axis == "inplane":
            return F.pixel_shuffle(r, s)
        # (b, s, h, w) -> (b, 1, h*s, w): sub-row k of LR row j is HR row s*j + k
        return r.permute(0, 2, 1, 3).reshape(b, 1, h * s, w)

    def forward(self, lr: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        r = self.residual(lr)
        return base + r[..., : base.shape[-2], : base.shape[-1]]


class Discriminator(nn.Module):
    """Small patch critic on high-resolution patches (SRGAN layout, fewer channels)."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        c = channels
        layers: list[nn.Module] = []
        spec = [(1, c, 1), (c, c, 2), (c, 2 * c, 1), (2 * c, 2 * c, 2), (2 * c, 4 * c, 1), (4 * c, 4 * c, 2)]
        for cin, cout, stride in spec:
            layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.LeakyReLU(0.2)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Conv2d(4 * c, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).mean(dim=(1, 2, 3))


def base_upsample(lr: np.ndarray, scale: int, axis: str) -> np.ndarray:
    """The classical upsampling the generator corrects (axis 'through': along axis -2)."""
    if axis == "inplane":
        return kspace.zerofill_upsample(lr, scale)
    return kspace.linear_upsample_axis(lr, scale, axis=-2)


def norm_scale(lr: np.ndarray, floor: float) -> np.ndarray:
    """Per-slice intensity scale: 99.5th percentile of each LR slice, at least ``floor``."""
    flat = lr.reshape(lr.shape[0], -1)
    p = np.percentile(flat, 99.5, axis=1)
    return np.maximum(p, floor).astype(np.float32)


# --- weights --------------------------------------------------------------------------------

@dataclass
class ModelSet:
    generators: dict[str, Generator]
    meta: dict

    @property
    def version(self) -> str:
        return str(self.meta.get("version", "0"))


def save_generators(path: Path, gens: dict[str, Generator], meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, g in gens.items():
        for k, v in g.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().cpu().contiguous()
    # each generator's own width and depth (a file may mix a wide x2 generator with small others)
    meta = {**meta, "arch": {name: list(generator_arch(g)) for name, g in gens.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"meta": json.dumps(meta)})


def generator_arch(gen: Generator) -> tuple[int, int]:
    """(channels, residual blocks) of a generator."""
    return int(gen.head.out_channels), len(gen.body)


def load_generators(path: Path) -> ModelSet:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("meta", "{}"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    default = (int(meta.get("channels", 48)), int(meta.get("blocks", 6)))
    arch = meta.get("arch", {})
    gens: dict[str, Generator] = {}
    for name in sorted({k.split(".", 1)[0] for k in tensors}):
        axis, scale = parse_task(name)
        ch, blocks = arch.get(name, default)
        g = Generator(scale, axis, int(ch), int(blocks))
        g.load_state_dict({k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")})
        g.eval()
        gens[name] = g
    return ModelSet(gens, meta)


# --- inference ------------------------------------------------------------------------------

def _pflip(x: np.ndarray, axis: int) -> np.ndarray:
    """Periodic flip x[n] -> x[-n mod N]: keeps pixel 0 in place, so LR pixel m stays on HR pixel s*m."""
    return np.roll(np.flip(x, axis=axis), 1, axis=axis)


def run_slices(gen: Generator, lr: np.ndarray, floor: float, batch: int = 8, ensemble: bool = False) -> np.ndarray:
    """Apply ``gen`` to a stack of 2-D LR slices (n, h, w) in physical units.

    ``ensemble`` averages the outputs for the periodic flips of the input (4 in-plane, 2 through-plane
    along the columns), which commute with the k-space grid.
    """
    if not ensemble:
        return _run_slices(gen, lr, floor, batch)
    axes_sets = [(), (-1,), (-2,), (-2, -1)] if gen.axis == "inplane" else [(), (-1,)]
    acc = None
    for axes in axes_sets:
        x = np.asarray(lr, dtype=np.float32)
        for a in axes:
            x = _pflip(x, a)
        y = _run_slices(gen, np.ascontiguousarray(x), floor, batch)
        for a in axes:
            y = _pflip(y, a)
        acc = y if acc is None else acc + y
    return acc / len(axes_sets)


@torch.no_grad()
def _run_slices(gen: Generator, lr: np.ndarray, floor: float, batch: int = 8) -> np.ndarray:
    lr = np.asarray(lr, dtype=np.float32)
    scale = norm_scale(lr, floor)[:, None, None]
    dev = next(gen.parameters()).device  # the pipeline puts the generators on its device
    # on CUDA the in-plane zero-fill baseline runs there too (on the host it was most of the time)
    base = None if dev.type == "cuda" and gen.axis == "inplane" else base_upsample(lr, gen.scale, gen.axis)
    h, w = base.shape[-2:] if base is not None else (lr.shape[-2] * gen.scale, lr.shape[-1] * gen.scale)
    out = np.empty((len(lr), h, w), np.float32)
    for i in range(0, len(lr), batch):
        s = torch.from_numpy(scale[i:i + batch]).to(dev)
        x = torch.from_numpy(lr[i:i + batch]).to(dev)
        b = kspace.zerofill_upsample_torch(x, gen.scale) if base is None else torch.from_numpy(base[i:i + batch]).to(dev)
        out[i:i + batch] = (gen((x / s)[:, None], (b / s)[:, None])[:, 0].float() * s).cpu().numpy()
    return out


def volume_floor(array: np.ndarray) -> float:
    """Lower bound of the per-slice scale: 10 % of the volume's 99.5th percentile."""
    sub = np.asarray(array)[:, ::4, ::4]
    return max(0.1 * float(np.percentile(sub, 99.5)), 1e-6)


def superres_inplane(gen: Generator, array: np.ndarray, batch: int = 8, ensemble: bool = False) -> np.ndarray:
    """(z, y, x) -> (z, s*y, s*x); output pixel s*m on input pixel m."""
    return run_slices(gen, array, volume_floor(array), batch, ensemble)


def superres_through(gen: Generator, array: np.ndarray, batch: int = 8) -> np.ndarray:
    """(z, y, x) -> (s*(z-1)+1, y, x); output slice s*j on input slice j.

    The 2-D through-plane generator runs on the (z, x) planes and on the (z, y) planes; the
    two estimates are averaged.
    """
    if array.shape[0] < 2:
        raise ValueError("through-plane super-resolution needs at least 2 slices")
    floor = volume_floor(array)
    zx = np.ascontiguousarray(np.transpose(array, (1, 0, 2)))  # (y, z, x)
    a = np.transpose(run_slices(gen, zx, floor, batch), (1, 0, 2))
    zy = np.ascontiguousarray(np.transpose(array, (2, 0, 1)))  # (x, z, y)
    b = np.transpose(run_slices(gen, zy, floor, batch), (1, 2, 0))
    return 0.5 * (a + b)
