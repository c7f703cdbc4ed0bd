"""Scale-out on a real PostgreSQL: one receiver, several workers, leases, priorities.

Each test makes and drops its own database on the server at PACS_NODE_TEST_PG
(default postgresql://postgres@127.0.0.1:5432/postgres).
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import pydicom
import pytest
from pydicom.uid import generate_uid

from conftest import StoreSCP, storescu, wait_for

BIN = Path(sys.executable).parent
ADMIN_URL = os.environ.get("PACS_NODE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture
def pg_url() -> str:
    name = f"pacsnode_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    base = ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    yield f"{base}/{name}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sql(url: str, query: str, *params) -> list[tuple]:
    with psycopg.connect(url.replace("+psycopg", "")) as conn:
        return conn.execute(query, params).fetchall()


def make_series(src: list[Path], out: Path, count: int) -> list[Path]:
    """``count`` distinct series (new Series and SOP UIDs) from the same real slices."""
    folders = []
    for i in range(count):
        folder = out / f"series{i}"
        folder.mkdir(parents=True)
        series_uid = generate_uid()
        for j, path in enumerate(src):
            ds = pydicom.dcmread(path)
            ds.SeriesInstanceUID = series_uid
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.SeriesNumber = 100 + i
            ds.save_as(folder / f"{j}.dcm", enforce_file_format=True)
        folders.append(folder)
    return folders


def start_worker(config: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "pacs-node"), "worker", "--config", str(config)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, cwd=config.parent)


@pytest.fixture
def unique_storescp(tmp_path):
    # +uf: every received instance gets its own file, so a result sent twice shows up twice
    from conftest import tool, port_open

    scp = StoreSCP(tmp_path / "dest")
    scp._log = open(scp.root / "storescp.log", "ab")
    scp.proc = subprocess.Popen([tool("storescp"), "-aet", scp.ae_title, "-od", str(scp.out), "+uf", str(scp.port)],
                                stdout=scp._log, stderr=subprocess.STDOUT)
    wait_for(lambda: port_open(scp.port), 20, "storescp")
    yield scp
    scp.stop()


def cluster(node_factory, pg_url, scp, tmp_path, workers: int, lease: float = 60.0, params: dict | None = None):
    peers = [{"name": "modality", "ae_title": "STORESCU"},
             {"name": "dest", "ae_title": "STORESCP", "host": "127.0.0.1", "port": scp.port}]
    rules = [{"name": "ct", "when": "Modality == 'CT'", "pipeline": "ct-denoise-classical", "destinations": ["dest"],
              "params": params or {"patch_distance": 2}}]
    receiver = node_factory(peers, rules, args=("serve", "--no-worker"), database_url=pg_url,
                            worker={"enabled": False, "lease_seconds": lease, "poll_seconds": 0.2})
    procs = [start_worker(receiver.config, tmp_path / f"worker{i}.log") for i in range(workers)]
    return receiver, procs


def stop_all(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()


def test_three_workers_six_series_each_job_done_exactly_once(node_factory, pg_url, unique_storescp, ge_head, tmp_path):
    folders = make_series(sorted(ge_head.glob("*.dcm"))[10:13], tmp_path / "series", 6)
    receiver, workers = cluster(node_factory, pg_url, unique_storescp, tmp_path, workers=3)
    try:
        senders = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", "PACSNODE", "127.0.0.1",
                                     str(receiver.port), str(f), "+sd"], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True) for f in folders]
        outputs = [p.communicate(timeout=180)[0] for p in senders]
        assert all(p.returncode == 0 for p in senders), "\n".join(outputs) + receiver.log()[-3000:]
        wait_for(lambda: sql(pg_url, "select count(*) from job where state in ('done','failed')")[0][0] == 6, 300,
                 "six jobs to finish")
        jobs = sql(pg_url, "select state, attempts, lease_owner from job order by id")
        assert [j[0] for j in jobs] == ["done"] * 6
        assert all(j[1] == 1 for j in jobs), jobs  # each claimed once
        deliveries = sql(pg_url, "select state, sent_count from delivery")
        assert deliveries == [("done", 3)] * 6
        # exactly one result series per source series, every instance received exactly once
        received = [pydicom.dcmread(p, stop_before_pixels=True) for p in unique_storescp.files()]
        assert len(received) == 18
        assert len({r.SOPInstanceUID for r in received}) == 18
        assert len({r.SeriesInstanceUID for r in received}) == 6
        # the work was shared: more than one worker ran jobs
        ran = [(tmp_path / f"worker{i}.log").read_text().count("claimed") for i in range(3)]
        assert sum(ran) == 6
    finally:
        stop_all(workers)


def test_killed_worker_job_finished_by_another_after_lease(node_factory, pg_url, unique_storescp, ge_head, tmp_path):
    folder = make_series(sorted(ge_head.glob("*.dcm"))[8:14], tmp_path / "series", 1)[0]
    # a slow job (wide NLM search) so the kill lands mid-run; a short lease
    receiver, workers = cluster(node_factory, pg_url, unique_storescp, tmp_path, workers=1, lease=4.0,
                                params={"patch_distance": 9})
    second = None
    try:
        assert storescu(receiver.port, folder).returncode == 0
        wait_for(lambda: sql(pg_url, "select count(*) from job where state = 'running'")[0][0] == 1, 120,
                 "the job to start")
        first_owner = sql(pg_url, "select lease_owner from job")[0][0]
        workers[0].send_signal(signal.SIGKILL)
        workers[0].wait(10)
        second = start_worker(receiver.config, tmp_path / "worker-b.log")
        wait_for(lambda: sql(pg_url, "select state from job")[0][0] == "done", 300, "the job done by the other worker")
        state, attempts, owner_b = sql(pg_url, "select state, attempts, lease_owner from job")[0]
        assert attempts == 2
        assert "claimed" in (tmp_path / "worker-b.log").read_text()
        received = [pydicom.dcmread(p, stop_before_pixels=True) for p in unique_storescp.files()]
        assert len(received) == 6 and len({r.SOPInstanceUID for r in received}) == 6  # no duplicate
        job_id = sql(pg_url, "select id from job")[0][0]
        folders = list((receiver.root / "storage" / "results" / str(job_id)).iterdir())
        assert len(folders) == 1, folders  # the dead worker's partial attempt was cleared
        assert first_owner
    finally:
        stop_all(workers + ([second] if second else []))


def test_stat_series_runs_before_ten_routine(pg_url, tmp_path):
    from pacs_node.config import parse
    from pacs_node.jobs import Worker
    from pacs_node.store.files import FileStore
    from pacs_node.store.index import Database, Job, Patient, Series, Study

    db = Database(pg_url)
    settings = parse({"worker": {"starvation_seconds": 3600}})

    def seed(session):
        p = Patient(key="k")
        session.add(p)
        session.flush()
        st = Study(study_uid="1.2", patient_id=p.id)
        session.add(st)
        session.flush()
        now = dt.datetime.utcnow()
        for i in range(12):
            se = Series(series_uid=f"1.2.{i}", study_id=st.id, state="complete", first_received_at=now,
                        last_received_at=now)
            session.add(se)
            session.flush()
            prio, name = {10: (0, "stat"), 11: (2, "research")}.get(i, (1, "routine"))
            session.add(Job(series_id=se.id, rule=name, pipeline="x", priority=prio, state="queued",
                            created_at=now + dt.timedelta(seconds=i)))

    db.run(seed)
    worker = Worker(db, FileStore(tmp_path / "s"), settings)
    order = []
    while (item := worker.claim()) is not None:
        order.append(item.rule)
    assert order == ["stat"] + ["routine"] * 10 + ["research"]

    # a routine job that waited past starvation_seconds goes before a newer stat job
    def reseed(session):
        session.query(Job).update({"state": "queued"})
        old = session.query(Job).filter(Job.rule == "routine").order_by(Job.id).first()
        old.created_at = dt.datetime.utcnow() - dt.timedelta(hours=2)
    db.run(reseed)
    assert worker.claim().rule == "routine"
    db.dispose()


def test_concurrent_ingest_of_one_series_keeps_an_exact_count(pg_url, ge_head, tmp_path):
    import threading

    from pacs_node.store.files import FileStore
    from pacs_node.store.index import Database, Instance, Series
    from pacs_node.store.ingest import Ingest

    db = Database(pg_url)
    ingest = Ingest(db, FileStore(tmp_path / "s"))
    files = sorted(ge_head.glob("*.dcm"))[:16]
    errors: list[BaseException] = []

    def deliver(part: list[Path]) -> None:
        try:
            for path in part:
                ingest.store(pydicom.dcmread(path), path.read_bytes(), "STORESCU", "1.2.840.10008.1.2.1")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(files[i::4],)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    count, rows = db.run(lambda s: (s.query(Series).one().instance_count, s.query(Instance).count()))
    assert (count, rows) == (16, 16)
    db.dispose()
