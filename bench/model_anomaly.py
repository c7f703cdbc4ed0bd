"""Benchmark of the anomaly-mr pipeline and its writers on a real MR series; prints a table.

    .venv/bin/python bench/model_anomaly.py [--series mr/uih-t1-3d-sag] [--slices 40] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from pacs_node.datasets import data_dir
from pacs_node.encode import EncodeContext, encode_outputs
from pacs_node.pipelines import get_pipeline
from pacs_node.volume import load_series


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--series", default="mr/uih-t1-3d-sag")
    p.add_argument("--slices", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")

    files = sorted((data_dir() / args.series).iterdir())
    start = max(0, len(files) // 2 - args.slices // 2)
    t = time.perf_counter()
    volume = load_series(files[start:start + args.slices])
    rows = [("load series", time.perf_counter() - t)]
    t = time.perf_counter()
    pipeline = get_pipeline("anomaly-mr")
    rows.append(("load model", time.perf_counter() - t))
    t = time.perf_counter()
    (score,) = pipeline.run(volume, {})
    rows.append(("pipeline run", time.perf_counter() - t))
    ctx = EncodeContext(pipeline.name, pipeline.version)
    for kind in ("secondary_capture", "parametric_map", "segmentation"):
        t = time.perf_counter()
        encode_outputs(volume, [score], (kind,), ctx)
        rows.append((f"encode {kind}", time.perf_counter() - t))

    n = volume.shape[0]
    print(f"series {args.series}: {n} slices of {volume.shape[1]}x{volume.shape[2]}, torch threads {args.threads}")
    print(f"{'stage':<28} {'total s':>8} {'ms/slice':>9}")
    for name, seconds in rows:
        print(f"{name:<28} {seconds:8.2f} {1000 * seconds / n:9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
