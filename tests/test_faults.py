"""Scenarios where something around the node fails: the destination is down or refuses an
instance, the disk fills up, a model raises or runs out of memory, the database is locked.
Each time the node records what happened, keeps serving, and loses nothing it acknowledged.
"""

from __future__ import annotations

import errno
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy.exc import OperationalError

from conftest import NodeProcess, free_port, node_config, wait_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from crash_soak import Destination, synthetic_ct_series  # noqa: E402

SCU = "FAULTSCU"


def peers(dest_port: int, dest_ae: str = "SOAKDEST") -> list[dict]:
    return [{"name": "modality", "ae_title": SCU},
            {"name": "viewer", "ae_title": dest_ae, "host": "127.0.0.1", "port": dest_port}]


def rule(name: str = "ct", **params: object) -> dict:
    r: dict = {"name": name, "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["viewer"]}
    if params:
        r["params"] = params
    return r


def c_store(port: int, files: list[Path], calling: str = SCU) -> list[int | None]:
    """Send ``files`` in one association; the status of each (None: no answer)."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    statuses = []
    for path in files:
        status = assoc.send_c_store(path)
        statuses.append(int(status.Status) if status and "Status" in status else None)
    assoc.release()
    return statuses


def echo_seconds(port: int, calling: str = SCU) -> float:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    t0 = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSNODE")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    assert status and status.Status == 0
    return time.perf_counter() - t0


def db_rows(node: NodeProcess, sql: str) -> list[tuple]:
    db = sqlite3.connect(node.root / "node.db", timeout=30)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def jobs_ended(node: NodeProcess, count: int) -> bool:
    rows = db_rows(node, "select state from job")
    return len(rows) >= count and all(r[0] in ("done", "failed") for r in rows)


def test_destination_down_then_back_gets_every_result(node_factory, tmp_path):
    dest = Destination()  # port chosen, not listening yet
    node = node_factory(peers(dest.port), [rule()],
                        send={"max_attempts": 30, "backoff_seconds": 0.5, "backoff_max_seconds": 1.0, "timeout_seconds": 10.0})
    first = synthetic_ct_series(tmp_path / "a", 4, 64, seed=1)
    second = synthetic_ct_series(tmp_path / "b", 4, 64, seed=2)
    assert c_store(node.port, first) == [0] * 4
    assert c_store(node.port, second) == [0] * 4
    wait_for(lambda: len(db_rows(node, "select id from delivery where attempts >= 2")) >= 2, 180,
             "both deliveries to fail at least twice while the destination is down")
    assert "delivery to viewer failed (attempt" in node.log()
    dest.start()
    try:
        wait_for(lambda: jobs_ended(node, 2), 180, "both jobs to end once the destination is back")
        assert [r[0] for r in db_rows(node, "select state from job order by id")] == ["done", "done"]
        assert len(dest.received) == 8
        assert len({sop for _, sop, _ in dest.received}) == 8
        # each job's results went in one association, in the order of its result files
        by_series: dict[str, list[str]] = {}
        for series, sop, _ in dest.received:
            by_series.setdefault(series, []).append(sop)
        assert all(sops == sorted(sops) for sops in by_series.values())
    finally:
        dest.stop()


class RejectingDestination(Destination):
    """Refuses one instance (the second it receives) with 0xC000, stores the rest."""

    def _store(self, event) -> int | Dataset:  # type: ignore[no-untyped-def]
        with self._lock:
            second = len(self.received) == 1 and not getattr(self, "_rejected", False)
            if second:
                self._rejected = True
        if second:
            status = Dataset()
            status.Status = 0xC000
            status.ErrorComment = "refused by test"
            return status
        return super()._store(event)


def test_destination_rejecting_one_instance_records_it_and_gets_the_rest(node_factory, tmp_path):
    dest = RejectingDestination().start()
    try:
        node = node_factory(peers(dest.port), [rule()])
        files = synthetic_ct_series(tmp_path / "a", 5, 64, seed=3)
        assert c_store(node.port, files) == [0] * 5
        wait_for(lambda: jobs_ended(node, 1), 180, "the job to end")
        delivery = db_rows(node, "select state, sent_count, failed_count, last_status, last_error, attempts from delivery")
        assert delivery[0][:4] == ("failed", 4, 1, "0xC000"), delivery
        assert delivery[0][5] == 1, "a final rejection (not 0xA7xx) is not retried"
        job = db_rows(node, "select state, error from job")[0]
        assert job[0] == "failed" and "0xC000" in job[1]
        assert len(dest.received) == 4
        assert node.proc.poll() is None
    finally:
        dest.stop()


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    out = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                         text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({out.stderr.strip()}); "
                    "test_disk_full_in_ingest_is_out_of_resources covers ENOSPC in-process")


def test_disk_full_while_receiving_answers_a700_and_keeps_serving(tmp_path):
    root = tmp_path / "node"
    root.mkdir()
    storage = root / "storage"
    _mount_tmpfs(storage, "1m")
    node = NodeProcess(root, node_config(free_port(), peers(free_port()), []))
    try:
        node.start(int(node.config.read_text().split("port = ")[1].split()[0]))
        # 128 x 128 x 2 bytes = 32 kB per instance: a 1 MB disk is full after about 30
        files = synthetic_ct_series(tmp_path / "big", 45, 128, seed=4)
        statuses = c_store(node.port, files)
        ok = statuses.count(0)
        full = statuses.count(0xA700)
        print(f"\n[faults] disk full: {ok} instance(s) stored, then {full} answered 0xA700")
        assert ok >= 10 and full >= 5 and ok + full == len(files), statuses
        assert statuses[:ok] == [0] * ok  # success until the disk filled, never after a failure a success
        assert echo_seconds(node.port) < 5
        assert node.proc.poll() is None
        assert "No space left on device" in node.log()
        # no partly written temp file is left (empty ones are made ahead of the next instance)
        assert all(p.stat().st_size == 0 for p in storage.rglob("*.partial"))
        # only what was acknowledged is indexed
        assert db_rows(node, "select count(*) from instance")[0][0] == ok
    finally:
        node.stop()
        subprocess.run(["umount", "-l", str(storage)], capture_output=True)


def test_disk_full_in_ingest_is_out_of_resources(tmp_path, monkeypatch):
    """ENOSPC without a mount: the write fails as the kernel would make it fail, at write()."""
    from pacs_node.store import files as files_mod
    from pacs_node.store.files import FileStore
    from pacs_node.store.index import Database
    from pacs_node.store.ingest import Ingest, OutOfResources

    import pydicom

    src = synthetic_ct_series(tmp_path / "s", 1, 32)[0]
    ds = pydicom.dcmread(src)
    ingest = Ingest(Database(f"sqlite:///{tmp_path / 'x.db'}"), FileStore(tmp_path / "storage"))

    def full(fd, buffers):  # type: ignore[no-untyped-def]
        raise OSError(errno.ENOSPC, "No space left on device")

    # the temp file's one synced write (FileStore.write_temp), as DIMSE and STOW-RS both store
    monkeypatch.setattr(files_mod.os, "writev", full)
    with pytest.raises(OutOfResources):
        ingest.store(ds, src.read_bytes(), SCU, ExplicitVRLittleEndian)
    assert not list((tmp_path / "storage").rglob("*.partial"))
    assert not list((tmp_path / "storage").rglob("*.dcm"))


def test_pipeline_that_raises_or_runs_out_of_memory_fails_only_its_job(node_factory, tmp_path):
    dest = Destination().start()
    try:
        # the classical pipeline itself, with parameters that make it fail: float("strong")
        # raises ValueError; a patch search distance of 10^6 pixels makes numpy ask for
        # terabytes and raise MemoryError, as a model that runs out of memory does
        rules = [rule("good"), rule("raises", strength="strong"), rule("oom", patch_distance=1_000_000)]
        node = node_factory(peers(dest.port), rules)
        files = synthetic_ct_series(tmp_path / "a", 3, 64, seed=5)
        assert c_store(node.port, files) == [0] * 3
        wait_for(lambda: jobs_ended(node, 3), 180, "three jobs to end")
        jobs = {r[0]: (r[1], r[2] or "") for r in db_rows(node, "select rule, state, error from job")}
        assert jobs["good"][0] == "done"
        assert jobs["raises"][0] == "failed" and "ValueError" in jobs["raises"][1]
        assert jobs["oom"][0] == "failed" and "MemoryError" in jobs["oom"][1]
        assert len(dest.received) == 3
        failed_audit = db_rows(node, "select count(*) from audit_event where event = 'job-failed'")[0][0]
        assert failed_audit == 2
        # the node is still there and takes the next series
        more = synthetic_ct_series(tmp_path / "b", 2, 64, seed=6)
        assert c_store(node.port, more) == [0] * 2
        wait_for(lambda: jobs_ended(node, 6), 180, "the next series' jobs to end")
        assert len(dest.received) == 5
    finally:
        dest.stop()


def test_database_locked_by_another_process_delays_but_loses_nothing(node_factory, tmp_path):
    node = node_factory(peers(free_port()), [])
    files = synthetic_ct_series(tmp_path / "a", 10, 64, seed=7)
    blocker = sqlite3.connect(node.root / "node.db", timeout=30, isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN EXCLUSIVE")
    released = threading.Timer(3.0, lambda: blocker.execute("COMMIT"))
    t0 = time.monotonic()
    released.start()
    try:
        statuses = c_store(node.port, files)
    finally:
        released.join()
        blocker.close()
    assert statuses == [0] * 10
    # the files are acknowledged at once; the index rows wait for the lock, and the release
    # is answered only once they are written
    assert time.monotonic() - t0 >= 2.5, "the release waited for the index"
    assert db_rows(node, "select count(*) from instance")[0][0] == 10


def test_node_killed_while_its_index_waits_indexes_the_files_at_restart(node_factory, tmp_path):
    node = node_factory(peers(free_port()), [])
    files = synthetic_ct_series(tmp_path / "a", 6, 64, seed=8)
    blocker = sqlite3.connect(node.root / "node.db", timeout=30, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        ae = AE(ae_title=SCU)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
        assert assoc.is_established
        statuses = [int(assoc.send_c_store(path).Status) for path in files]
        node.proc.kill()  # acknowledged, not yet indexed: the index writer waits for the lock
        node.proc.wait()
        assoc.abort()
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    assert statuses == [0] * 6
    assert db_rows(node, "select count(*) from instance")[0][0] == 0
    assert len(list((node.root / "storage" / "instances").rglob("*.dcm"))) == 6
    node.start(node.port)
    assert db_rows(node, "select count(*) from instance")[0][0] == 6
    assert db_rows(node, "select instance_count from series") == [(6,)]
    assert "indexed 6 instance file(s) that were stored but not yet indexed" in node.log()


def test_database_busy_error_is_retried(tmp_path):
    from pacs_node.store.index import Database

    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    calls = []

    def flaky(session):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) < 3:
            raise OperationalError("INSERT ...", {}, sqlite3.OperationalError("database is locked"))
        return "written"

    assert db.run(flaky) == "written"
    assert len(calls) == 3


def test_an_instance_over_max_instance_mb_aborts_its_association_and_the_node_carries_on(node_factory, tmp_path):
    """A valid but oversized C-STORE (here 3 MB against a 1 MB limit) must not be assembled in
    memory without bound: its association is aborted, the log names the limit, nothing is
    stored for it, and the next sender is served as usual."""
    node = node_factory(peers(free_port()), [], node={"max_instance_mb": 1.0})
    big = synthetic_ct_series(tmp_path / "big", 1, 1200, seed=3)  # 1200 x 1200 x 2 bytes = 2.9 MB
    small = synthetic_ct_series(tmp_path / "small", 2, 64, seed=4)
    assert big[0].stat().st_size > 2_500_000

    ae = AE(ae_title=SCU)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    status = assoc.send_c_store(big[0])
    assert not (status and "Status" in status and status.Status == 0), "an oversized instance was acknowledged"
    wait_for(lambda: not assoc.is_established, 30, "the oversized association to end")
    assoc.release()

    assert c_store(node.port, small) == [0x0000, 0x0000]
    wait_for(lambda: "exceeds [node] max_instance_mb (1 MB)" in node.log(), 10, "the limit in the log")
    stored = sorted(p.name for p in (node.root / "storage" / "instances").rglob("*.dcm"))
    assert len(stored) == 2, stored
    assert not any(p.name.endswith(".tmp") for p in (node.root / "storage").rglob("*"))
