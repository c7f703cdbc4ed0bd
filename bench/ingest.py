"""Ingest throughput: the same series sent by DCMTK storescu to DCMTK storescp, Orthanc and
pacs-node, alternating, with 1, 4 and 8 concurrent associations; medians, ratios, peak RSS.

Usage: .venv/bin/python bench/ingest.py [--series ct/vhf-head] [--reps 3] [--conc 1,4,8] [--baseline REV] [--cpu] [--json F]

Each run starts the target fresh on an empty folder and waits until it is idle (done starting up),
after a sync(2) that writes back what the
previous runs left in the page cache (pacs-node: fsync + SQLite index on, no rules, so only
receive/store/index is timed); the series is split into `conc` parts sent by
`conc` storescu processes at once; the clock runs from the first process start to the last
exit. TCP_NODELAY=1 is set for DCMTK and Orthanc (else ~40 ms per instance).

--cpu adds where the CPU went during each run, in ms per instance (medians): the target's
processes (with their children: receiver processes), the storescu senders, the kernel's own
threads (kworker: e.g. ext4 finishing the block allocation of synced files; ksoftirqd), and how
busy the machine was (all cores, /proc/stat). Clock ticks are 10 ms: a run of a few hundred
instances is resolved to about 0.05 ms per instance.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

from common import BIN, ENV, free_port, peak_rss_mb, wait_port  # noqa: E402

from pacs_node.datasets import data_dir  # noqa: E402


class Target:
    name = ""
    ae = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def stop(self) -> float:
        rss = peak_rss_mb(self.proc.pid) if self.proc else float("nan")
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.work, ignore_errors=True)
        return rss


class StoreSCP(Target):
    name, ae = "dcmtk-storescp", "STORESCP"

    def start(self) -> None:
        (self.work / "out").mkdir(parents=True)
        self.proc = subprocess.Popen(["storescp", "-aet", self.ae, "-od", str(self.work / "out"), str(self.port)],
                                     env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)


class Orthanc(Target):
    name, ae = "orthanc", "ORTHANC"

    def start(self) -> None:
        self.work.mkdir(parents=True)
        http = free_port()
        cfg = {"StorageDirectory": str(self.work / "db"), "IndexDirectory": str(self.work / "db"), "HttpPort": http,
               "DicomPort": self.port, "DicomAet": self.ae, "RemoteAccessAllowed": False,
               "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "Plugins": []}
        (self.work / "o.json").write_text(json.dumps(cfg))
        exe = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
        self.proc = subprocess.Popen([exe, str(self.work / "o.json")], env=ENV, cwd=self.work,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        end = time.monotonic() + 30
        while time.monotonic() < end:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=1)
                return
            except OSError:
                time.sleep(0.2)


class PacsNode(Target):
    name, ae = "pacs-node", "PACSNODE"
    receivers = 1
    env = ENV

    def start(self) -> None:
        self.work.mkdir(parents=True)
        (self.work / "node.toml").write_text(
            f'[node]\nhost = "127.0.0.1"\nport = {self.port}\nstorage_dir = "storage"\n'
            f'database_url = "sqlite:///node.db"\nallow_any_caller = true\nlog_level = "INFO"\n'
            f'receivers = {self.receivers}\n')
        log = open(self.work / "node.log", "wb")
        self.proc = subprocess.Popen([str(BIN / "pacs-node"), "serve", "--config", str(self.work / "node.toml")],
                                     cwd=self.work, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port)
        end = time.monotonic() + 60  # extra receiver processes: wait until they listen too
        while (self.receivers > 1 and time.monotonic() < end
               and (self.work / "node.log").read_text().count("pacs_node.receivers: receiver process") <
               2 * (self.receivers - 1)):  # "... started" and "... listening" for each
            time.sleep(0.2)


class PacsNode2(PacsNode):
    name, receivers = "pacs-node-r2", 2


def _ticks() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, CPU clock ticks user + system, 1 if a kernel thread else 0)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = raw.rsplit(")", 1)[1].split()
        kernel = int(fields[6]) & 0x00200000  # PF_KTHREAD
        out[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]), 1 if kernel else 0)
    return out


def _tree(root: int, ticks: dict[int, tuple[int, int, int]]) -> set[int]:
    """``root`` and its descendants (a node's receiver processes) among ``ticks``' processes."""
    tree, changed = {root}, True
    while changed:
        changed = False
        for pid, (ppid, _, _) in ticks.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    return tree


def _machine() -> tuple[int, int]:
    """(busy, total) ticks of all cores since boot."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v[:8]) - idle, sum(v[:8])


def settle(pid: int, timeout: float = 20.0) -> None:
    """Wait until the process tree under ``pid`` is idle (it may still be starting up after its
    port opened: the node loads its pipelines, Orthanc its plugins), so the run times receiving only."""
    def tree_ticks() -> int:
        t = _ticks()
        return sum(t[p][1] for p in _tree(pid, t) if p in t)

    end = time.monotonic() + timeout
    last = tree_ticks()
    while time.monotonic() < end:
        time.sleep(0.3)
        now = tree_ticks()
        if now - last <= 1:
            return
        last = now


class CpuMeter:
    """CPU of the target's process tree, the senders (waited-for children) and kernel threads."""

    def __init__(self, root_pid: int) -> None:
        self.root = root_pid
        self.p0, self.m0 = _ticks(), _machine()
        self.c0 = resource.getrusage(resource.RUSAGE_CHILDREN)

    def stop(self, instances: int) -> dict[str, float]:
        p1, m1 = _ticks(), _machine()
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        hz = os.sysconf("SC_CLK_TCK")
        tree = _tree(self.root, p1)
        delta = {pid: t - self.p0.get(pid, (0, 0, 0))[1] for pid, (_, t, _) in p1.items()}
        per = 1e3 / hz / instances
        busy, total = m1[0] - self.m0[0], m1[1] - self.m0[1]
        return {"target_ms": sum(delta[p] for p in tree if p in delta) * per,
                "senders_ms": (c1.ru_utime + c1.ru_stime - self.c0.ru_utime - self.c0.ru_stime) * 1e3 / instances,
                "kernel_ms": sum(d for pid, d in delta.items() if p1[pid][2]) * per,
                "busy_pct": 100.0 * busy / max(total, 1)}


def send(target: Target, files: list[Path], conc: int) -> float:
    parts = [files[i::conc] for i in range(conc)]
    start = time.monotonic()
    procs = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", target.ae, "127.0.0.1", str(target.port),
                               *map(str, part)], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for part in parts]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu to {target.name} failed: {err.decode()[-500:]}")
    return time.monotonic() - start


@contextlib.contextmanager
def baseline_node(rev: str | None, tmp: str) -> Iterator[type[PacsNode] | None]:
    """pacs-node as of git revision ``rev`` (a temporary worktree under ``tmp``, first on
    PYTHONPATH), as target pacs-node@REV, for before/after in one run; None without a revision."""
    if not rev:
        yield None
        return
    repo, tree = Path(__file__).resolve().parent.parent, Path(tmp) / "baseline"
    subprocess.run(["git", "-C", str(repo), "worktree", "add", "-q", "--detach", str(tree), rev], check=True)

    class Baseline(PacsNode):
        name, env = f"pacs-node@{rev}", {**ENV, "PYTHONPATH": str(tree)}

    try:
        yield Baseline
    finally:
        subprocess.run(["git", "-C", str(repo), "worktree", "remove", "--force", str(tree)], check=False)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", default="ct/vhf-head", help="folder under the data cache (default ct/vhf-head)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--conc", default="1,4,8")
    ap.add_argument("--targets", default="dcmtk-storescp,orthanc,pacs-node",
                    help="any of dcmtk-storescp, orthanc, pacs-node, pacs-node-rN ([node] receivers = N)")
    ap.add_argument("--baseline", metavar="REV",
                    help="also run pacs-node as of git revision REV (a temporary worktree first on PYTHONPATH), "
                         "as target pacs-node@REV: before/after in one run")
    ap.add_argument("--cpu", action="store_true",
                    help="also print CPU ms per instance of the target, the senders and kernel threads")
    ap.add_argument("--json")
    args = ap.parse_args()
    files = sorted(p for p in (data_dir() / args.series).iterdir() if p.is_file())
    size_mb = sum(p.stat().st_size for p in files) / 1e6
    kinds = {k.name: k for k in (StoreSCP, Orthanc, PacsNode, PacsNode2)}
    for name in args.targets.split(","):  # pacs-node-rN: [node] receivers = N
        if name not in kinds and name.startswith("pacs-node-r") and name[11:].isdigit():
            kinds[name] = type(name, (PacsNode,), {"name": name, "receivers": int(name[11:])})
    targets = [kinds[t] for t in args.targets.split(",")]
    results: dict[tuple[str, int], list[float]] = {}
    rss: dict[tuple[str, int], float] = {}
    cpu: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp, baseline_node(args.baseline, tmp) as baseline:
        measure(targets + ([baseline] if baseline else []), files, args, tmp, results, rss, cpu)
    report(results, rss, files, size_mb, args, cpu)
    return 0


def measure(targets: list, files: list[Path], args: argparse.Namespace, tmp: str,
            results: dict[tuple[str, int], list[float]], rss: dict[tuple[str, int], float],
            cpu: dict[tuple[str, int], list[dict[str, float]]]) -> None:
    for rep in range(args.reps):
        for conc in [int(c) for c in args.conc.split(",")]:
            order = targets if rep % 2 == 0 else targets[::-1]  # alternate to spread drift
            for kind in order:
                target = kind(Path(tmp) / f"{kind.name}-{rep}-{conc}")
                # storescp and Orthanc do not fsync: the kernel writes their files back up to
                # 30 s later, in the middle of the next target's run (whose fsyncs then wait
                # behind it). Flush before each run, untimed, so no target pays for another.
                os.sync()
                target.start()
                try:
                    settle(target.proc.pid)
                    meter = CpuMeter(target.proc.pid)
                    elapsed = send(target, files, conc)
                    cpu.setdefault((kind.name, conc), []).append(meter.stop(len(files)))
                finally:
                    peak = target.stop()
                results.setdefault((kind.name, conc), []).append(len(files) / elapsed)
                rss[(kind.name, conc)] = max(rss.get((kind.name, conc), 0.0), peak)


def report(results: dict[tuple[str, int], list[float]], rss: dict[tuple[str, int], float], files: list[Path],
           size_mb: float, args: argparse.Namespace, cpu: dict[tuple[str, int], list[dict[str, float]]]) -> None:
    print(f"machine: {os.cpu_count()} CPU cores; series {args.series}: {len(files)} instances, {size_mb:.0f} MB; "
          f"{args.reps} repetitions, median instances/s; loopback, TCP_NODELAY=1")
    keys = ("target_ms", "senders_ms", "kernel_ms", "busy_pct")
    extra = f" {'CPU ms/inst: target':>19} {'senders':>7} {'kernel':>6} {'busy %':>6}" if args.cpu else ""
    print(f"{'target':20} {'assocs':>6} {'inst/s':>8} {'MB/s':>7} {'peak RSS MB':>11} {'vs storescp':>11} {'vs orthanc':>10}"
          + extra)
    rows = []
    for (name, conc), rates in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        med = statistics.median(rates)
        ref_d = statistics.median(results.get(("dcmtk-storescp", conc), [float("nan")]))
        ref_o = statistics.median(results.get(("orthanc", conc), [float("nan")]))
        row = {"target": name, "associations": conc, "instances_per_s": round(med, 1),
               "mb_per_s": round(med * size_mb / len(files), 1), "peak_rss_mb": round(rss[(name, conc)], 1),
               "ratio_storescp": round(med / ref_d, 2), "ratio_orthanc": round(med / ref_o, 2), "runs": rates}
        used = {k: statistics.median(r[k] for r in cpu[(name, conc)]) for k in keys}
        row["cpu"] = {k: round(v, 2) for k, v in used.items()}
        rows.append(row)
        print(f"{name:20} {conc:>6} {med:>8.1f} {row['mb_per_s']:>7.1f} {row['peak_rss_mb']:>11.0f} "
              f"{row['ratio_storescp']:>11.2f} {row['ratio_orthanc']:>10.2f}"
              + (f" {used['target_ms']:>19.2f} {used['senders_ms']:>7.2f} {used['kernel_ms']:>6.2f} {used['busy_pct']:>6.0f}"
                 if args.cpu else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
