"""Model-stage throughput of the MR pipelines (mr-superres, anomaly-mr) on a real series; prints a table.

    .venv/bin/python bench/model_pipelines.py [--device cpu|cuda] [--slices 40] [--repeat 2]
                                              [--series mr/uih-t1-3d-sag] [--json F]

Times ``pipeline.run(volume, params)`` -- the code the node runs between "series loaded" and
"encode" -- on the first ``--slices`` slices from the middle of the series, after one warm-up
run. The device is chosen the way the node chooses it ($PACS_NODE_DEVICE, which this script
sets from ``--device``). ct-denoise has its own script (bench/model_ct_denoise.py: slices/s at
512 x 512 by batch size, and a whole 269-slice series). Never asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

CASES = (  # (pipeline, params, label)
    ("mr-superres", {"scale": 2}, "in-plane x2"),
    ("mr-superres", {"scale": 2, "generator": "small"}, "in-plane x2, small generator"),
    ("mr-superres", {"scale": 4}, "in-plane x4"),
    ("mr-superres", {"scale": 2, "axis": "through"}, "through-plane x2"),
    ("anomaly-mr", {}, "score map"),
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda (sets PACS_NODE_DEVICE)")
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.add_argument("--series", default="mr/uih-t1-3d-sag")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    os.environ["PACS_NODE_DEVICE"] = args.device
    warnings.simplefilter("ignore")

    import torch

    from pacs_node.datasets import data_dir
    from pacs_node.pipelines import get_pipeline
    from pacs_node.volume import load_series

    if args.threads:
        torch.set_num_threads(args.threads)
    files = sorted((data_dir() / args.series).iterdir())
    start = max(0, len(files) // 2 - args.slices // 2)
    volume = load_series(files[start:start + args.slices])
    n, h, w = volume.shape
    if args.device.startswith("cuda"):
        where = f"GPU {torch.cuda.get_device_name(0)}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, " \
                f"{os.cpu_count()} cores"
    print(f"model stage of the MR pipelines | {args.series}: {n} slices of {h}x{w} | {where} | torch {torch.__version__}")
    print(f"| pipeline | task | output | s per series | input slices/s |")
    print(f"|---|---|---|---:|---:|")
    rows = []
    for name, params, label in CASES:
        pipeline = get_pipeline(name)

        def once():
            out = pipeline.run(volume, dict(params))
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            return out

        outputs = once()  # warm-up (cuDNN autotuning, allocator)
        t0 = time.perf_counter()
        for _ in range(args.repeat):
            once()
        dt = (time.perf_counter() - t0) / args.repeat
        shape = getattr(outputs[0], "array", None)
        shape = "x".join(map(str, shape.shape)) if shape is not None else "-"
        print(f"| {name} | {label} | {shape} | {dt:.3f} | {n / dt:.1f} |", flush=True)
        rows.append({"pipeline": name, "params": params, "output": shape, "seconds": dt, "slices_per_s": n / dt})
    if args.json:
        args.json.write_text(json.dumps({"device": where, "series": args.series, "slices": n, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
