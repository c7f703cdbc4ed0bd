"""Association set-up: one instance per association, as modalities that open an association
per image send; DCMTK storescu to DCMTK storescp, Orthanc and pacs-node, alternating.

Usage: .venv/bin/python bench/associations.py [--series ct/vhf-head] [--count 40] [--reps 3] [--targets ...] [--baseline REV] [--json F]

Each target starts fresh and idle (as in bench/ingest.py), takes one untimed association first
(a node in service has met its senders before), then `count` storescu runs one after the other,
each sending one instance of the series on an association of its own (storescu proposes its 128
storage contexts every time). Prints the median milliseconds per association (storescu start to
exit, the sender's own start-up included, so the differences between targets are what the
target adds) and the target's CPU milliseconds per association.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ENV  # noqa: E402
from ingest import CpuMeter, Orthanc, PacsNode, StoreSCP, baseline_node, settle  # noqa: E402

from pacs_node.datasets import data_dir  # noqa: E402


def one(target, path: Path) -> float:
    start = time.monotonic()
    done = subprocess.run(["storescu", "-aet", "STORESCU", "-aec", target.ae, "127.0.0.1", str(target.port), str(path)],
                          env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if done.returncode != 0:
        raise RuntimeError(f"storescu to {target.name} failed: {done.stderr.decode()[-500:]}")
    return time.monotonic() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="ct/vhf-head")
    ap.add_argument("--count", type=int, default=40, help="associations per run (one instance each)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--targets", default="dcmtk-storescp,orthanc,pacs-node")
    ap.add_argument("--baseline", metavar="REV", help="also pacs-node as of git revision REV (as in bench/ingest.py)")
    ap.add_argument("--json")
    args = ap.parse_args()
    files = sorted(p for p in (data_dir() / args.series).iterdir() if p.is_file())[: args.count + 1]
    kinds = {k.name: k for k in (StoreSCP, Orthanc, PacsNode)}
    targets = [kinds[t] for t in args.targets.split(",")]
    ms: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp, baseline_node(args.baseline, tmp) as baseline:
        targets += [baseline] if baseline else []
        for rep in range(args.reps):
            for kind in (targets if rep % 2 == 0 else targets[::-1]):
                target = kind(Path(tmp) / f"{kind.name}-{rep}")
                target.start()
                try:
                    settle(target.proc.pid)
                    one(target, files[0])  # untimed: the target meets this sender once
                    settle(target.proc.pid, timeout=5)
                    meter = CpuMeter(target.proc.pid)
                    times = [one(target, path) for path in files[1:]]
                    used = meter.stop(len(times))
                finally:
                    target.stop()
                ms.setdefault(kind.name, []).append(statistics.median(times) * 1e3)
                cpu.setdefault(kind.name, []).append(used["target_ms"])
    print(f"series {args.series}: {args.count} associations of one instance each, one after the other; "
          f"median of {args.reps} runs; loopback, TCP_NODELAY=1")
    print(f"{'target':22} {'ms/association':>14} {'target CPU ms/association':>26}")
    rows = []
    for name in ms:
        row = {"target": name, "ms_per_association": round(statistics.median(ms[name]), 1),
               "target_cpu_ms_per_association": round(statistics.median(cpu[name]), 1), "runs_ms": ms[name]}
        rows.append(row)
        print(f"{name:22} {row['ms_per_association']:>14.1f} {row['target_cpu_ms_per_association']:>26.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
