"""kill -9 soak: parallel senders stream CT studies into a real `pacs-node serve`, which is killed
at random moments and restarted; afterwards every acknowledged instance, job and delivery is checked.

    .venv/bin/python bench/crash_soak.py --kills 20            # the full run (docs/reliability.md)
    .venv/bin/python bench/crash_soak.py --kills 5 --studies 4  # what tests/test_crash.py runs

What is checked once the last restart has drained everything:
  * every instance that got status 0x0000 is on disk with the dataset bytes that were sent
    (byte-identical after the file meta) and in the index (row, path, size);
  * every job is `done`, one job per (series, rule, generation), no job audited done twice;
  * the destination received exactly one result series per (source series, pipeline), and
    the last job of each series delivered all its result instances;
  * no temporary (.partial) file is left in the storage folder.
The senders behave like a modality: when the node dies mid-association they reconnect and
send again the instances that were not acknowledged.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_file_meta_info, read_preamble
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BIN, free_port, memory_kib  # noqa: E402

PIPELINE = "ct-denoise-classical"


# -- data -----------------------------------------------------------------------------------
def synthetic_ct_series(folder: Path, slices: int, size: int = 128, patient_name: str = "SOAK^PATIENT",
                        patient_id: str = "SOAK-0001", study_uid: str | None = None, seed: int = 0,
                        description: str = "synthetic head") -> list[Path]:
    """A small CT series (a noisy ellipse phantom in HU) written as Explicit VR Little Endian files."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    yy, xx = np.mgrid[:size, :size]
    inside = ((yy - size / 2) / (size * 0.4)) ** 2 + ((xx - size / 2) / (size * 0.3)) ** 2 < 1
    paths = []
    for z in range(slices):
        hu = np.where(inside, 40.0, -1000.0) + rng.normal(0, 15, (size, size))
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = series_uid + ".1" if len(series_uid) < 62 else generate_uid()
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.Modality = "CT"
        ds.Manufacturer = "pacs-node soak"
        ds.SeriesDescription = description
        ds.SeriesNumber = 1
        ds.InstanceNumber = z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(z) * 2.5]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.8, 0.8]
        ds.SliceThickness = 2.5
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = np.clip(hu + 1024, -32768, 32767).astype("<i2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"{z:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its preamble and file meta: what travels in a C-STORE."""
    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)  # leaves fh just after the file meta group
        return fh.read()


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


# -- peers ----------------------------------------------------------------------------------
class Destination:
    """A pynetdicom storage SCP that records every result it receives (duplicates included)."""

    def __init__(self, ae_title: str = "SOAKDEST", delay: float = 0.0) -> None:
        self.ae_title = ae_title
        self.delay = delay
        self.port = free_port()
        self.received: list[tuple[str, str, str]] = []  # (series uid, sop uid, referenced source sop uid)
        self._lock = threading.Lock()
        self.server = None

    def _store(self, event) -> int:  # type: ignore[no-untyped-def]
        ds = event.dataset
        ref = ""
        if "SourceImageSequence" in ds and len(ds.SourceImageSequence):
            ref = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
        if self.delay:
            time.sleep(self.delay)
        with self._lock:
            self.received.append((str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID), ref))
        return 0x0000

    def start(self) -> "Destination":
        from pynetdicom import AllStoragePresentationContexts

        ae = AE(ae_title=self.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server = None


@dataclass
class Acknowledged:
    """What the senders were told: SOP UID -> the file whose dataset got status 0x0000."""

    files: dict[str, Path] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    reconnects: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def send_study(port: int, files: list[Path], sop_uids: list[str], acked: Acknowledged, calling: str = "SOAKSCU",
               deadline: float = 900.0) -> None:
    """Send like a modality: on a lost association, reconnect and resend what was not acknowledged."""
    # send each file's dataset bytes as they are on disk (no decode and re-encode), so that
    # "byte-identical" compares what travelled with what was stored
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    pending = list(zip(files, sop_uids))
    end = time.monotonic() + deadline
    first = True
    while pending and time.monotonic() < end:
        ae = AE(ae_title=calling)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.connection_timeout = 5
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
        if not first:
            with acked.lock:
                acked.reconnects += 1
        first = False
        if not assoc.is_established:
            time.sleep(0.3)
            continue
        while pending:
            path, sop = pending[0]
            try:
                status = assoc.send_c_store(path)
            except Exception:  # noqa: BLE001 - a connection dying mid-write is the point of the test
                status = None
            if status is not None and "Status" in status:
                code = int(status.Status)
                if code == 0x0000:
                    with acked.lock:
                        acked.files[sop] = path
                    pending.pop(0)
                    continue
                with acked.lock:
                    acked.failures.append(f"{sop}: status 0x{code:04X}")
            break  # no answer (node died) or a failure: reconnect and resend the rest
        if assoc.is_established:
            assoc.release()
        elif pending:
            time.sleep(0.2)
    if pending:
        with acked.lock:
            acked.failures.append(f"{len(pending)} instance(s) never acknowledged before the deadline")


# -- the node -------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """In the child: SIGKILL when the harness dies, so no node outlives an interrupted run."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Node:
    """`pacs-node serve` as a real process that can be killed with SIGKILL and started again."""

    def __init__(self, root: Path, dest: Destination | None, quiet_seconds: float = 1.0, rules: bool = True) -> None:
        self.root = root
        self.port = free_port()
        root.mkdir(parents=True, exist_ok=True)
        self.config = root / "node.toml"
        self.config.write_text("\n".join([
            "[node]", 'ae_title = "PACSNODE"', 'host = "127.0.0.1"', f"port = {self.port}",
            'storage_dir = "storage"', 'database_url = "sqlite:///node.db"', 'log_level = "INFO"', "",
            "[completion]", f"quiet_seconds = {quiet_seconds}", "max_wait_seconds = 300.0", "",
            "[send]", "max_attempts = 20", "backoff_seconds = 0.3", "backoff_max_seconds = 2.0", "timeout_seconds = 20.0", "",
            "[[peers]]", 'name = "modality"', 'ae_title = "SOAKSCU"', "",
        ] + ([
            "[[peers]]", 'name = "viewer"', f'ae_title = "{dest.ae_title}"', 'host = "127.0.0.1"', f"port = {dest.port}", "",
        ] if dest else []) + ([
            "[[rules]]", 'name = "ct-denoise"', "when = \"Modality == 'CT'\"", f'pipeline = "{PIPELINE}"',
            'destinations = ["viewer"]', "",
        ] if rules and dest else [])))
        self.log_path = root / "node.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 120.0) -> float:
        t0 = time.monotonic()
        log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([str(BIN / "pacs-node"), "serve", "--config", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT, cwd=self.root, env=env, preexec_fn=_die_with_parent)
        log.close()
        self.starts += 1
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}; see {self.log_path}")
            if port_open(self.port):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise RuntimeError(f"node did not listen within {timeout} s")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        db = sqlite3.connect(f"file:{self.root / 'node.db'}?mode=ro", uri=True, timeout=30)
        try:
            return db.execute(sql, args).fetchall()
        finally:
            db.close()

    def memory_kib(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) of the node process in KiB: now and the peak so far."""
        assert self.proc is not None
        return memory_kib(self.proc.pid)

    def phase(self) -> str:
        """What the node is doing right now, from its database: receive, infer, send or idle."""
        try:
            receiving = self.query("select count(*) from series where state = 'receiving'")[0][0]
            running = self.query("select count(*) from job where state = 'running'")[0][0]
            sending = self.query("select count(*) from delivery where state = 'sending'")[0][0]
        except sqlite3.Error:
            return "starting"
        parts = [name for name, n in (("receive", receiving), ("infer", running), ("send", sending)) if n]
        return "+".join(parts) or "idle"


# -- the soak -------------------------------------------------------------------------------
@dataclass
class SoakReport:
    kills: int = 0
    phases: Counter = field(default_factory=Counter)
    restart_seconds: list[float] = field(default_factory=list)
    instances_sent: int = 0
    instances_acknowledged: int = 0
    instances_verified: int = 0
    reconnects: int = 0
    series: int = 0
    jobs: int = 0
    jobs_done: int = 0
    jobs_resumed: int = 0
    jobs_audited_twice: int = 0
    jobs_without_done_audit: int = 0
    results_received: int = 0
    result_series_duplicates: int = 0
    temp_files: int = 0
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def lines(self) -> list[str]:
        phases = ", ".join(f"{k} {v}" for k, v in sorted(self.phases.items()))
        restart = (f"{np.median(self.restart_seconds):.1f} s median, {max(self.restart_seconds):.1f} s max"
                   if self.restart_seconds else "-")
        return [
            f"kills survived:               {self.kills} (node was in: {phases})",
            f"restart to listening:         {restart}",
            f"instances sent/acknowledged:  {self.instances_sent} / {self.instances_acknowledged} "
            f"({self.reconnects} association retries by the senders)",
            f"instances verified:           {self.instances_verified} byte-identical on disk and in the index",
            f"series / jobs:                {self.series} / {self.jobs} ({self.jobs_done} done, "
            f"{self.jobs_resumed} resumed after a kill, {self.jobs_audited_twice} audited done twice, "
            f"{self.jobs_without_done_audit} without a job-done audit row)",
            f"results at the destination:   {self.results_received} received (resends included), "
            f"{self.result_series_duplicates} duplicate result series",
            f"temporary files left:         {self.temp_files}",
            f"wall time:                    {self.seconds:.0f} s",
            f"problems:                     {len(self.problems)}",
            *[f"  - {p}" for p in self.problems[:30]],
        ]


def run_soak(workdir: Path, kills: int = 20, studies: int = 12, slices: int = 12, size: int = 128,
             senders: int = 3, seed: int = 1, min_delay: float = 0.5, max_delay: float = 4.0,
             drain_timeout: float = 600.0, log=print) -> SoakReport:  # type: ignore[no-untyped-def]
    rng = random.Random(seed)
    report = SoakReport()
    t_start = time.monotonic()
    data = workdir / "studies"
    series_files: list[list[Path]] = []
    for i in range(studies):
        series_files.append(synthetic_ct_series(data / f"study{i:03d}", slices, size, seed=seed * 1000 + i))
    sop_uids = {p: read_file_meta_info(p).MediaStorageSOPInstanceUID for files in series_files for p in files}
    source_series_of_sop: dict[str, int] = {str(sop_uids[p]): i for i, files in enumerate(series_files) for p in files}
    report.instances_sent = sum(len(f) for f in series_files)

    dest = Destination(delay=0.03).start()
    node = Node(workdir / "node", dest)
    acked = Acknowledged()
    try:
        report.restart_seconds.append(node.start())
        queue = list(range(studies))
        qlock = threading.Lock()

        def sender() -> None:
            while True:
                with qlock:
                    if not queue:
                        return
                    i = queue.pop(0)
                files = series_files[i]
                send_study(node.port, files, [str(sop_uids[p]) for p in files], acked)
                time.sleep(rng.uniform(0.0, 0.5))

        threads = [threading.Thread(target=sender, name=f"sender{k}", daemon=True) for k in range(senders)]
        for t in threads:
            t.start()

        for k in range(kills):
            time.sleep(rng.uniform(min_delay, max_delay))
            phase = node.phase()
            node.kill()
            report.kills += 1
            report.phases[phase] += 1
            log(f"kill {k + 1}/{kills}: node was in {phase}; {len(acked.files)} instance(s) acknowledged so far")
            time.sleep(rng.uniform(0.0, 0.5))
            report.restart_seconds.append(node.start())

        for t in threads:
            t.join(timeout=drain_timeout)
        # drain: every series complete, every job ended, no delivery left
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline:
            open_ = node.query("select (select count(*) from series where state = 'receiving')"
                               " + (select count(*) from job where state not in ('done', 'failed'))"
                               " + (select count(*) from delivery where state in ('pending', 'sending'))")[0][0]
            if open_ == 0 and node.query("select count(*) from series")[0][0] >= studies:
                break
            time.sleep(0.5)
        else:
            report.problems.append(f"work not drained after {drain_timeout:.0f} s")
        time.sleep(1.0)
        verify(node, dest, acked, series_files, source_series_of_sop, report)
    finally:
        node.stop()
        dest.stop()
    report.seconds = time.monotonic() - t_start
    return report


def verify(node: Node, dest: Destination, acked: Acknowledged, series_files: list[list[Path]],
           source_series_of_sop: dict[str, int], report: SoakReport) -> None:
    storage = node.root / "storage"
    report.instances_acknowledged = len(acked.files)
    report.reconnects = acked.reconnects
    report.problems += acked.failures
    if len(acked.files) != report.instances_sent:
        report.problems.append(f"{report.instances_sent - len(acked.files)} instance(s) never acknowledged")

    rows = {sop: (path, size) for sop, path, size in node.query("select sop_uid, path, size from instance")}
    for sop, src in acked.files.items():
        row = rows.get(sop)
        if row is None:
            report.problems.append(f"acknowledged {sop} is not in the index")
            continue
        stored = storage / row[0]
        if not stored.is_file():
            report.problems.append(f"acknowledged {sop} is indexed but its file {row[0]} is missing")
            continue
        if stored.stat().st_size != row[1]:
            report.problems.append(f"{sop}: index size {row[1]} != file size {stored.stat().st_size}")
        if dataset_bytes(stored) != dataset_bytes(src):
            report.problems.append(f"{sop}: stored dataset differs from the one sent")
            continue
        report.instances_verified += 1

    # jobs: all done, one per (series, rule, generation), none audited done twice
    jobs = node.query("select j.id, j.state, j.attempts, j.generation, j.result_count, s.series_uid, s.instance_count "
                      "from job j join series s on s.id = j.series_id")
    report.series = node.query("select count(*) from series")[0][0]
    report.jobs = len(jobs)
    report.jobs_done = sum(1 for j in jobs if j[1] == "done")
    report.jobs_resumed = sum(1 for j in jobs if j[2] > 1)
    for j in jobs:
        if j[1] != "done":
            report.problems.append(f"job {j[0]} ended {j[1]}")
    keys = Counter(node.query("select series_id, rule, generation from job"))
    report.problems += [f"{n} jobs for (series, rule, generation) {k}" for k, n in keys.items() if n > 1]
    audited = Counter(r[0] for r in node.query("select job_id from audit_event where event = 'job-done'"))
    report.jobs_audited_twice = sum(1 for n in audited.values() if n > 1)
    report.jobs_without_done_audit = sum(1 for j in jobs if j[1] == "done" and audited.get(j[0], 0) == 0)
    if report.jobs_audited_twice:
        report.problems.append(f"{report.jobs_audited_twice} job(s) audited done twice")
    if len(jobs) < len(series_files):
        report.problems.append(f"{len(jobs)} job(s) for {len(series_files)} series")

    # the destination: one result series per source series, the last job's results all there
    report.results_received = len(dest.received)
    result_series: dict[int, set[str]] = {}
    received_sops = set()
    for series_uid, sop, ref in dest.received:
        received_sops.add(sop)
        source = source_series_of_sop.get(ref)
        if source is None:
            report.problems.append(f"result {sop} references unknown source {ref}")
            continue
        result_series.setdefault(source, set()).add(series_uid)
    report.result_series_duplicates = sum(len(v) - 1 for v in result_series.values())
    if report.result_series_duplicates:
        report.problems.append(f"{report.result_series_duplicates} duplicate result series at the destination")
    missing_series = [i for i in range(len(series_files)) if i not in result_series]
    if missing_series:
        report.problems.append(f"no results at the destination for {len(missing_series)} source series")
    last_jobs = node.query("select j.id, j.result_count, s.instance_count from job j join series s on s.id = j.series_id "
                           "where j.generation = s.generation")
    columns = {row[1] for row in node.query("pragma table_info(job)")}
    result_paths = dict(node.query("select id, result_path from job")) if "result_path" in columns else {}
    for job_id, result_count, instance_count in last_jobs:
        if result_count != instance_count:
            report.problems.append(f"job {job_id}: {result_count} result(s) for {instance_count} instance(s)")
        rel = result_paths.get(job_id)
        result_dir = (storage / rel) if rel else storage / "results" / str(job_id)
        results = sorted(result_dir.glob("*.dcm"))
        if len(results) != result_count:
            report.problems.append(f"job {job_id}: {len(results)} result file(s) in {result_dir}, {result_count} recorded")
        for path in results:
            sop = str(read_file_meta_info(path).MediaStorageSOPInstanceUID)
            if sop not in received_sops:
                report.problems.append(f"job {job_id}: result {sop} never reached the destination")
    report.temp_files = len(list(storage.rglob("*.partial")))
    if report.temp_files:
        report.problems.append(f"{report.temp_files} temporary file(s) left")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--studies", type=int, default=16)
    parser.add_argument("--slices", type=int, default=12)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--senders", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--max-delay", type=float, default=4.0, help="longest wait before a kill, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (node log, database, storage)")
    args = parser.parse_args()
    os.environ.setdefault("TCP_NODELAY", "1")
    work = Path(tempfile.mkdtemp(prefix="pacs-node-soak-"))
    print(f"work folder {work} ({dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, seed {args.seed})", flush=True)
    report = run_soak(work, kills=args.kills, studies=args.studies, slices=args.slices, size=args.size,
                      senders=args.senders, seed=args.seed, max_delay=args.max_delay,
                      log=lambda m: print(m, flush=True))
    print("\n".join(report.lines()))
    print(json.dumps({"kills": report.kills, "instances_verified": report.instances_verified,
                      "jobs_done": report.jobs_done, "problems": len(report.problems)}))
    if not args.keep and not report.problems:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
