"""Throughput of the ct-denoise model: slices/s at 512 x 512, and seconds for a 269-slice series.

    .venv/bin/python bench/model_ct_denoise.py [--threads N] [--batches 1,4,8] [--device cpu|cuda]
                                               [--repeats 3] [--weights PATH]

Prints a table (never asserts a time). On CPU the network runs in float32; on CUDA under bf16
autocast, as in the pipeline. Uses the committed weights when present (the speed does not
depend on the weights' values), else a freshly initialised network of the same architecture.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pacs_node.ml.ct_denoise import ResidualDenoiser, denoise_slices, load_model  # noqa: E402
from pacs_node.models_dir import model_path  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--series", type=int, default=269, help="slices of the whole-series timing")
    ap.add_argument("--weights", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    weights = args.weights or model_path("ct-denoise")
    if weights.exists():
        model, meta = load_model(weights)
        steps = int(meta.get("trained_steps", 0) or 0) + int(meta.get("prior_steps", 0) or 0)
        source = f"{weights.name} ({steps} training steps)"
    else:
        model, source = ResidualDenoiser().eval(), "untrained (no weights file)"
    n_params = sum(p.numel() for p in model.parameters())
    batches = [int(b) for b in (args.batches or ("1,4,8" if dev.type == "cpu" else "16,32,64,128")).split(",")]
    rng = np.random.default_rng(0)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        precision = "bf16 autocast"
    else:
        name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, {os.cpu_count()} cores"
        precision = "float32"
    print(f"ct-denoise throughput | model {source}, {n_params} params | device {dev.type}: {name} | {precision}")
    print(f"| batch | slices/s (512x512) | ms/slice |")
    print(f"|------:|-------------------:|---------:|")
    best = (0.0, batches[0])
    for b in batches:
        n = max(b, 8 if dev.type == "cpu" else 4 * b)
        x = (rng.normal(0, 30, (n, 512, 512)) + 40).astype(np.float32)
        denoise_slices(model, x[:b], batch=b, device=dev)  # warm-up
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            denoise_slices(model, x, batch=b, device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        rate = n / min(times)
        best = max(best, (rate, b))
        print(f"| {b:5d} | {rate:18.1f} | {1000 / rate:8.1f} |")
    if dev.type == "cuda":
        # the network alone on device-resident batches (no host preprocessing or copies)
        net = model.to(dev)
        for b in batches:
            x = torch.randn(b, 1, 512, 512, device=dev) * 0.03
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                for _ in range(3):
                    net(x)
                torch.cuda.synchronize()
                reps = max(5, 2000 // b)
                t = time.perf_counter()
                for _ in range(reps):
                    net(x)
                torch.cuda.synchronize()
            print(f"network only, batch {b}: {reps * b / (time.perf_counter() - t):.0f} slices/s")
    n = args.series
    vol = (rng.normal(0, 30, (n, 512, 512)) + 40).astype(np.float32)
    t = time.perf_counter()
    denoise_slices(model, vol, batch=best[1], device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    print(f"whole series: {n} slices of 512x512 in {dt:.1f} s (batch {best[1]}, including host<->device copies)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
