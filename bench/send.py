"""The C-STORE sender alone: a series sent by pacs-node's send_files to DCMTK storescp.

Usage: .venv/bin/python bench/send.py [--series ct/vhf-head] [--reps 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

from common import ENV, free_port, wait_port

from pacs_node.datasets import data_dir
from pacs_node.net.scu import send_files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="ct/vhf-head")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    files = sorted(p for p in (data_dir() / args.series).iterdir() if p.is_file())
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        scp = subprocess.Popen(["storescp", "-aet", "DEST", "-od", out, str(port)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_port(port)
            print(f"series {args.series}: {len(files)} instances to storescp (its default 16 KiB PDUs), loopback")
            for _ in range(args.reps):
                t0 = time.perf_counter()
                report = send_files(files, "PACSNODE", "DEST", "127.0.0.1", port)
                elapsed = time.perf_counter() - t0
                print(f"{len(report.ok)} stored, {len(report.rejected)} refused in {elapsed:.2f} s: "
                      f"{len(files) / elapsed:.0f} instances/s")
        finally:
            scp.terminate()
            scp.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
