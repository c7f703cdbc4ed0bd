"""The receive path without the network: StorageSCP.c_store called in a loop over a series.

Usage: .venv/bin/python bench/receive_path.py [--series ct/vhf-head] [--reps 3]

Each instance is checked, written (fsync, rename, folder fsync) and queued for the index writer,
exactly as an association's thread does it; the loop then waits for the index. Prints wall and
CPU milliseconds per instance (CPU: the whole process, index writer and file writer included).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT  # noqa: F401 - puts the repo on sys.path

from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble

from pacs_node.config import parse
from pacs_node.datasets import data_dir
from pacs_node.net.acceptor import Association
from pacs_node.net.scp import StorageSCP
from pacs_node.store.files import FileStore
from pacs_node.store.index import Database
from pacs_node.store.ingest import Ingest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="ct/vhf-head")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    messages = []
    for path in sorted(p for p in (data_dir() / args.series).iterdir() if p.is_file()):
        with open(path, "rb") as fh:
            read_preamble(fh, False)
            meta = _read_file_meta_info(fh)
            body = fh.read()
        command = Dataset()
        command.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
        command.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
        messages.append((command, bytearray(body), str(meta.TransferSyntaxUID)))
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.reps):
            work = Path(tmp) / str(rep)
            settings = parse({"node": {"storage_dir": str(work / "storage"), "allow_any_caller": True,
                                       "database_url": f"sqlite:///{work}/node.db"}}, work)
            db = Database(settings.node.database_url)
            scp = StorageSCP(settings, db, Ingest(db, FileStore(settings.node.storage_dir)),
                             lambda key, series: None, lambda key: None)
            scp.start()
            try:
                assoc = Association("BENCH", "127.0.0.1", 0)
                scp.accepted(assoc)
                t0, c0 = time.perf_counter(), time.process_time()
                for command, body, syntax in messages:
                    assoc.contexts[1] = (str(command.AffectedSOPClassUID), syntax)
                    status = scp.c_store(assoc, 1, command, body)
                    if int(status.Status) != 0:
                        raise SystemExit(f"refused: {status}")
                scp.indexer.flush()
                walls.append((time.perf_counter() - t0) / len(messages) * 1e3)
                cpus.append((time.process_time() - c0) / len(messages) * 1e3)
            finally:
                scp.stop()
                db.dispose()
    print(f"series {args.series}: {len(messages)} instances, {args.reps} repetitions, in-process, no network")
    print(f"wall ms/instance: median {statistics.median(walls):.2f} (runs {', '.join(f'{w:.2f}' for w in walls)})")
    print(f"CPU  ms/instance: median {statistics.median(cpus):.2f} (runs {', '.join(f'{c:.2f}' for c in cpus)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
