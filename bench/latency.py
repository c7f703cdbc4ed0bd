"""End-to-end latency per pipeline, split into stages: from the last instance acknowledged to
the last result acknowledged by the destination.

Usage: .venv/bin/python bench/latency.py [--pipelines ct-denoise-classical] [--series ct/ge-head-tilt]
                                         [--quiet 1.5] [--reps 2] [--slices N] [--json F]
                                         [--read-ahead-mb 2048,0]

A fresh node (SQLite, fsync on) and a DCMTK storescp destination; storescu sends the series
and releases; stages come from the job row: completion wait (last instance -> series
complete), queue, load/decode, model, encode, write, send. "read ahead" is the time the node
spent reading the series while it waited out its quiet time ([worker] read_ahead_mb; not part
of the total: it overlaps the completion wait); with a list of values (e.g. 2048,0) each
pipeline runs once per value, alternating, so the two are compared at the same hour.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import BIN, ENV, free_port, wait_port  # noqa: E402

from pacs_node.datasets import data_dir  # noqa: E402

STAGES = ("completion", "queue", "load", "model", "encode", "write", "send")


def extend_series(src: Path, slices: int, out: Path) -> Path:
    """A copy of ``src`` stretched to ``slices`` slices (new series and SOP UIDs; slice k is a
    copy of source slice k mod n, placed one slice step further along the normal each time),
    for timing a series larger than any in the data."""
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    datasets = [pydicom.dcmread(p) for p in sorted(src.iterdir()) if p.is_file()]
    iop = np.asarray(datasets[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    datasets.sort(key=lambda d: float(np.dot(np.asarray(d.ImagePositionPatient, dtype=float), normal)))
    first = np.asarray(datasets[0].ImagePositionPatient, dtype=float)
    step = float(np.median(np.diff([np.dot(np.asarray(d.ImagePositionPatient, dtype=float), normal)
                                    for d in datasets])))
    series_uid = generate_uid()
    out.mkdir(parents=True)
    for k in range(slices):
        ds = datasets[k % len(datasets)]
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in first + k * step * normal]
        if "ImagesInAcquisition" in ds:
            del ds.ImagesInAcquisition
        ds.save_as(out / f"{k:04d}.dcm")
    return out


def one_run(work: Path, pipeline: str, series: Path, quiet: float, read_ahead_mb: int | None = None) -> dict[str, float]:
    work.mkdir(parents=True)
    port, dest = free_port(), free_port()
    (work / "out").mkdir()
    (work / "node.toml").write_text(f"""
[node]
host = "127.0.0.1"
port = {port}
storage_dir = "storage"
database_url = "sqlite:///node.db"
[completion]
quiet_seconds = {quiet}
{"" if read_ahead_mb is None else f"[worker]{chr(10)}read_ahead_mb = {read_ahead_mb}"}
[[peers]]
name = "modality"
ae_title = "STORESCU"
[[peers]]
name = "dest"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {dest}
[[rules]]
name = "bench"
when = "True"
pipeline = "{pipeline}"
destinations = ["dest"]
""")
    scp = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(work / "out"), str(dest)], env=ENV,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = open(work / "node.log", "wb")
    node = subprocess.Popen([str(BIN / "pacs-node"), "serve", "--config", str(work / "node.toml")], cwd=work, env=ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(port)
        wait_port(dest)
        # the node opens its port before its pipelines are loaded (a thread imports them); a job
        # that came first would wait for that import inside its "load" stage, which a node that
        # has been running for a while never does
        loaded = f"pipeline {pipeline} loaded in"
        deadline = time.monotonic() + 300
        while loaded not in (work / "node.log").read_text(errors="replace"):
            if node.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node did not load pipeline {pipeline}:\n{(work / 'node.log').read_text()[-2000:]}")
            time.sleep(0.1)
        subprocess.run(["storescu", "-aet", "STORESCU", "-aec", "PACSNODE", "127.0.0.1", str(port), str(series), "+sd"],
                       env=ENV, check=True, stdout=subprocess.DEVNULL)
        db = work / "node.db"
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            row = sqlite3.connect(db).execute("select state, error from job").fetchone()
            if row and row[0] in ("done", "failed"):
                break
            time.sleep(0.2)
        text = (work / "node.log").read_text()
        m = re.search(r"last result acknowledged ([\d.]+) s \[([^\]]*)\]", text)
        if not m:
            raise RuntimeError(f"job did not finish: {row}\n{text[-2000:]}")
        stages = dict(kv.split("=") for kv in m.group(2).split())
        out = {k: float(v) for k, v in stages.items()}
        out["total"] = float(m.group(1))
        failures = re.findall(r"delivery to \S+ failed \(attempt \d+/\d+\): (.*?); next try", text)
        if failures:  # a slow "send" is often a retry: say why the earlier attempts failed
            print(f"  {pipeline}: {len(failures)} failed send attempt(s) before success: {failures[0]}", file=sys.stderr)
        out["failed_send_attempts"] = float(len(failures))
        return out
    finally:
        for p in (node, scp):
            p.send_signal(signal.SIGTERM)
            p.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipelines", default="ct-denoise-classical")
    ap.add_argument("--series", default="ct/ge-head-tilt")
    ap.add_argument("--quiet", type=float, default=1.5, help="quiet_seconds (default: the shipped 1.5)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--slices", type=int, help="stretch the series to this many slices (e.g. 300)")
    ap.add_argument("--read-ahead-mb", default="",
                    help="comma-separated [worker] read_ahead_mb values to compare (default: the node's default)")
    ap.add_argument("--json")
    args = ap.parse_args()
    variants: list[int | None] = [int(v) for v in args.read_ahead_mb.split(",") if v] or [None]
    series = data_dir() / args.series
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if args.slices:
            series = extend_series(series, args.slices, Path(tmp) / "series")
        n = len([p for p in series.iterdir() if p.is_file()])
        for pipeline in args.pipelines.split(","):
            runs: dict[int | None, list[dict[str, float]]] = {v: [] for v in variants}
            for i in range(args.reps):
                for v in variants:  # alternating: each value meets the same hour of the machine
                    runs[v].append(one_run(Path(tmp) / f"{pipeline}-{v}-{i}", pipeline, series, args.quiet, v))
            for v in variants:
                med = {k: statistics.median(r.get(k, 0.0) for r in runs[v]) for k in (*STAGES, "total", "read_ahead")}
                label = pipeline if v is None else f"{pipeline} ra={v}"
                rows.append({"pipeline": label, "series": args.series, "instances": n, "read_ahead_mb": v,
                             "median_seconds": med, "runs": runs[v]})
    print(f"machine: {os.cpu_count()} CPU cores, CPU only; series {args.series} ({n} instances); quiet_seconds={args.quiet}; "
          f"median of {args.reps}; seconds")
    # "after complete" = total - completion - model: the issue's "<= 3 s plus model time once
    # the series is complete"
    print(f"{'pipeline':30}" + "".join(f"{s:>11}" for s in (*STAGES, "total")) + f"{'total-model':>12}"
          + f"{'after complete':>15}{'read ahead':>11}")
    for r in rows:
        m = r["median_seconds"]
        print(f"{r['pipeline']:30}" + "".join(f"{m[s]:>11.2f}" for s in (*STAGES, "total"))
              + f"{m['total'] - m['model']:>12.2f}" + f"{m['total'] - m['model'] - m['completion']:>15.2f}"
              + f"{m['read_ahead']:>11.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
