"""Throughput of the mr-superres pipeline: output slices per second, CPU and (when present) GPU.

    .venv/bin/python bench/model_mr_superres.py [--slices 8] [--threads 1] [--device cpu|cuda|all]

Input: held-out UIH slices at the acquired resolution (256 x 230, 1 mm), degraded by k-space
truncation for in-plane x2 / x4 (so the output is 256 x 230), and a thick-slice stack for
through-plane x2. Prints one table row per (device, task); never asserts a time.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pacs_node.ml import kspace  # noqa: E402
from pacs_node.ml.mr_superres import HELDOUT_UIH, load_uih_truth  # noqa: E402
from pacs_node.ml.mr_superres_net import (  # noqa: E402
    base_upsample,
    load_generators,
    norm_scale,
    superres_inplane,
    superres_through,
    volume_floor,
)
from pacs_node.models_dir import model_path  # noqa: E402


@torch.no_grad()
def _run_on(gen, lr: np.ndarray, device: str, batch: int) -> np.ndarray:
    """Same arithmetic as run_slices, with the network on ``device``."""
    g = gen.to(device)
    base = base_upsample(lr, gen.scale, gen.axis)
    s = norm_scale(lr, volume_floor(lr))[:, None, None]
    out = np.empty_like(base)
    for i in range(0, len(lr), batch):
        x = torch.from_numpy(lr[i:i + batch] / s[i:i + batch])[:, None].to(device)
        b = torch.from_numpy(base[i:i + batch] / s[i:i + batch])[:, None].to(device)
        out[i:i + batch] = g(x, b)[:, 0].float().cpu().numpy() * s[i:i + batch]
    if device == "cuda":
        torch.cuda.synchronize()
    gen.to("cpu")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=8, help="input slices per in-plane run")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--device", default="all", choices=("cpu", "cuda", "all"))
    p.add_argument("--repeat", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = load_generators(model_path("mr-superres"))
    truth, _, _ = load_uih_truth()
    gt = truth[HELDOUT_UIH[0]:HELDOUT_UIH[0] + args.slices]
    devices = ["cpu"] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all") and torch.cuda.is_available():
        devices.append("cuda")
    print(f"mr-superres {models.version} | torch {torch.__version__} | {platform.processor() or platform.machine()}"
          f" | CPU threads {args.threads}" + (f" | GPU {torch.cuda.get_device_name(0)}" if "cuda" in devices else ""))
    print(f"{'device':<8}{'task':<11}{'input':>16}{'output':>16}{'out slices/s':>14}{'s/out slice':>13}")
    for device in devices:
        for task in ("inplane2", "inplane4", "through2"):
            gen = models.generators[task]
            if task.startswith("inplane"):
                s = gen.scale
                hr, _ = kspace.crop_to_multiple(gt, s)
                lr = kspace.degrade_inplane(hr, s)
                run = (lambda lr=lr: superres_inplane(gen, lr)) if device == "cpu" else \
                    (lambda lr=lr: _run_on(gen, lr, "cuda", 16))
            else:
                n = args.slices * 2 + 1
                vol = truth[HELDOUT_UIH[0]:HELDOUT_UIH[0] + n]
                lr = kspace.degrade_through(vol, 2)
                if device == "cpu":
                    run = lambda lr=lr: superres_through(gen, lr)  # noqa: E731
                else:
                    def run(lr=lr):
                        zx = np.ascontiguousarray(np.transpose(lr, (1, 0, 2)))
                        zy = np.ascontiguousarray(np.transpose(lr, (2, 0, 1)))
                        return _run_on(gen, zx, "cuda", 64), _run_on(gen, zy, "cuda", 64)
            out = run()  # warm-up
            out_shape = out[0].shape if isinstance(out, tuple) else out.shape
            n_out = (lr.shape[0] - 1) * 2 + 1 if task.startswith("through") else lr.shape[0]
            t0 = time.perf_counter()
            for _ in range(args.repeat):
                run()
            dt = (time.perf_counter() - t0) / args.repeat
            shape_in = "x".join(map(str, lr.shape))
            shape_out = "x".join(map(str, (n_out,) + tuple(out_shape[-2:]))) if task.startswith("inplane") \
                else "x".join(map(str, (n_out,) + lr.shape[1:]))
            print(f"{device:<8}{task:<11}{shape_in:>16}{shape_out:>16}{n_out / dt:14.2f}{dt / n_out:13.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
