"""Series/hour of the classical CT pipeline with 1, 2 and 4 worker processes on PostgreSQL.

Usage: .venv/bin/python bench/scale_workers.py [--series 8] [--slices 3] [--workers 1,2,4] [--json F]
Needs PostgreSQL (PACS_NODE_TEST_PG, default postgresql://postgres@127.0.0.1:5432/postgres) and
DCMTK storescu/storescp. One receiver (`serve --no-worker`) and N `pacs-node worker` processes
share a fresh database and storage folder per run; the clock runs from the first C-STORE to the
last job done. Prints a table; the machine's core count bounds the scaling.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg
import pydicom
from pydicom.uid import generate_uid

from common import BIN, ENV, free_port, wait_port  # noqa: E402

from pacs_node.datasets import data_dir  # noqa: E402

ADMIN = os.environ.get("PACS_NODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def make_series(work: Path, count: int, slices: int) -> list[Path]:
    src = sorted((data_dir() / "ct" / "ge-head-tilt").glob("*.dcm"))[8:8 + slices]
    folders = []
    for i in range(count):
        folder = work / f"s{i}"
        folder.mkdir(parents=True)
        uid = generate_uid()
        for j, path in enumerate(src):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / f"{j}.dcm", enforce_file_format=True)
        folders.append(folder)
    return folders


def run(workers: int, folders: list[Path], work: Path) -> float:
    name = f"pacsnode_bench_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1) + "/" + name
    root = work / f"run{workers}"
    root.mkdir()
    node_port, dest_port = free_port(), free_port()
    (root / "dest").mkdir()
    (root / "node.toml").write_text(f"""
[node]
host = "127.0.0.1"
port = {node_port}
storage_dir = "storage"
database_url = "{url}"
log_level = "WARNING"
[completion]
quiet_seconds = 1.0
[worker]
enabled = false
[[peers]]
name = "modality"
ae_title = "STORESCU"
[[peers]]
name = "dest"
ae_title = "STORESCP"
host = "127.0.0.1"
port = {dest_port}
[[rules]]
name = "ct"
when = "Modality == 'CT'"
pipeline = "ct-denoise-classical"
destinations = ["dest"]
""")
    procs = [subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(root / "dest"), str(dest_port)], env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    log = open(root / "log.txt", "ab")
    procs.append(subprocess.Popen([str(BIN / "pacs-node"), "serve", "--no-worker", "--config", str(root / "node.toml")],
                                  cwd=root, stdout=log, stderr=subprocess.STDOUT, env=ENV))
    wait_port(node_port)
    wait_port(dest_port)
    for _ in range(workers):
        procs.append(subprocess.Popen([str(BIN / "pacs-node"), "worker", "--config", str(root / "node.toml")],
                                      cwd=root, stdout=log, stderr=subprocess.STDOUT, env=ENV))
    time.sleep(3)  # let workers import and connect
    try:
        start = time.monotonic()
        senders = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", "PACSNODE", "127.0.0.1", str(node_port),
                                     str(f), "+sd"], env=ENV) for f in folders]
        for s in senders:
            s.wait()
        with psycopg.connect(url.replace("+psycopg", "")) as conn:
            while True:
                done = conn.execute("select count(*) from job where state in ('done', 'failed')").fetchone()[0]
                if done >= len(folders):
                    break
                time.sleep(0.2)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        with psycopg.connect(ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=8)
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        folders = make_series(work / "series", args.series, args.slices)
        for n in [int(x) for x in args.workers.split(",")]:
            elapsed = run(n, folders, work)
            rows.append({"workers": n, "series": args.series, "slices_per_series": args.slices,
                         "seconds": round(elapsed, 2), "series_per_hour": round(args.series / elapsed * 3600)})
    print(f"machine: {os.cpu_count()} CPU cores, CPU only; pipeline ct-denoise-classical, "
          f"{args.series} series x {args.slices} slices of 512x512")
    print(f"{'workers':>7} {'seconds':>8} {'series/h':>9} {'speed-up':>8}")
    for r in rows:
        print(f"{r['workers']:>7} {r['seconds']:>8.1f} {r['series_per_hour']:>9} {rows[0]['seconds'] / r['seconds']:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
