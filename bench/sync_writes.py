"""The disk alone: the receive path's file operations, without DICOM, Python parsing or an index.

Usage: .venv/bin/python bench/sync_writes.py [--dir var/sync-bench] [--files 240] [--threads 1,4] [--size-kb 527]

Each thread does, per file, what the node does per received instance (pacs_node/store/files.py):
create an empty temp file in one shared incoming/ folder and fsync it (FileStore.prepare_temp),
write the bytes with O_SYNC in one call (write_temp), rename it into one shared series folder
and fsync that folder (place). Prints files/s and the process's CPU ms per file. The folder
is made under --dir (on the file system to measure) and removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
import uuid
from pathlib import Path


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run(root: Path, threads: int, files: int, data: bytes) -> tuple[float, float]:
    incoming, series = root / "incoming", root / "series"
    incoming.mkdir(parents=True)
    series.mkdir()

    def work(count: int) -> None:
        for _ in range(count):
            tmp = str(incoming / f"{uuid.uuid4().hex}.partial")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_SYNC, 0o644)
            os.fsync(fd)
            os.write(fd, data)
            os.close(fd)
            os.replace(tmp, series / f"{uuid.uuid4().hex}.dcm")
            fsync_dir(str(series))

    per = files // threads
    t0, c0 = time.perf_counter(), os.times()
    workers = [threading.Thread(target=work, args=(per,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    wall, c1 = time.perf_counter() - t0, os.times()
    shutil.rmtree(root)
    n = per * threads
    return n / wall, (c1.user + c1.system - c0.user - c0.system) / n * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="var/sync-bench")
    ap.add_argument("--files", type=int, default=240)
    ap.add_argument("--threads", default="1,4")
    ap.add_argument("--size-kb", type=int, default=527, help="bytes per file, in kB (default: a 512 x 512 CT slice)")
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    data = os.urandom(args.size_kb * 1000)
    base = Path(args.dir)
    print(f"{args.files} files of {args.size_kb} kB under {base.resolve()}: create + fsync, O_SYNC write, "
          f"rename, folder fsync")
    print(f"{'threads':>7} {'files/s':>8} {'CPU ms/file':>11}")
    for rep in range(args.reps):
        for threads in [int(t) for t in args.threads.split(",")]:
            rate, cpu = run(base / f"run-{rep}-{threads}", threads, args.files, data)
            print(f"{threads:>7} {rate:>8.0f} {cpu:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
