"""Retention ([retention] days): old series and their results leave the disk once no job needs
them; nothing newer than the cutoff is touched, an interrupted removal is finished at start,
and a series sent again afterwards is received and processed again."""

from __future__ import annotations

import datetime as dt
import io
import os
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pacs_node.config import ConfigError, parse
from pacs_node.jobs import retry
from pacs_node.retention import _purge_rows, sweep
from pacs_node.store.files import FileStore
from pacs_node.store.index import AuditEvent, Database, Instance, Job, Series, utcnow
from pacs_node.store.indexer import index_missing_files
from pacs_node.store.ingest import Ingest

DAY = dt.timedelta(days=1)


def _store(ingest: Ingest, ds: pydicom.Dataset) -> None:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    ingest.store(ds, buf.getvalue(), "TESTSCU", str(ds.file_meta.TransferSyntaxUID))


def _series(ge_head: Path, series_uid: str, count: int) -> list[pydicom.Dataset]:
    out = []
    for i, path in enumerate(sorted(p for p in ge_head.iterdir() if p.is_file())[:count]):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series_uid}.{i + 1}"
        out.append(ds)
    return out


@pytest.fixture
def store(tmp_path: Path, ge_head: Path):  # type: ignore[no-untyped-def]
    db = Database(f"sqlite:///{tmp_path / 'node.db'}")
    files = FileStore(tmp_path / "storage")
    ingest = Ingest(db, files)
    series = {name: _series(ge_head, uid, 4) for name, uid in
              (("old", "1.2.826.0.1.9001.1"), ("busy", "1.2.826.0.1.9001.2"), ("new", "1.2.826.0.1.9001.3"))}
    for datasets in series.values():
        for ds in datasets:
            _store(ingest, ds)
    yield db, files, ingest, series
    db.dispose()


def _age(db: Database, files: FileStore, series_uid: str, days: float) -> None:
    """Make a complete series look as if its instances arrived ``days`` ago (rows and files)."""
    when = utcnow() - days * DAY

    def go(s):  # type: ignore[no-untyped-def]
        series = s.execute(select(Series).where(Series.series_uid == series_uid)).scalar_one()
        series.state, series.last_received_at, series.completed_at = "complete", when, when
        return [p for p in s.execute(select(Instance.path).where(Instance.series_id == series.id)).scalars()]

    stamp = when.replace(tzinfo=dt.timezone.utc).timestamp()
    for rel in db.run(go):
        os.utime(files.absolute(rel), (stamp, stamp))


def _job(db: Database, files: FileStore, series_uid: str, state: str) -> int:
    def go(s):  # type: ignore[no-untyped-def]
        series = s.execute(select(Series).where(Series.series_uid == series_uid)).scalar_one()
        job = Job(series_id=series.id, rule="r", pipeline="ct-denoise-classical", state=state)
        s.add(job)
        s.flush()
        job.result_path = f"results/{job.id}/1-test"
        return job.id

    job_id = db.run(go)
    folder = files.result_dir(job_id) / "1-test"
    folder.mkdir(parents=True)
    (folder / "result.dcm").write_bytes(b"result")
    return job_id


def _state(db: Database, series_uid: str) -> tuple[str, int, int]:
    row = db.run(lambda s: s.execute(select(Series.state, Series.instance_count, Series.generation)
                                     .where(Series.series_uid == series_uid)).one())
    return row.state, row.instance_count, row.generation


def test_old_series_and_results_go_once_no_job_needs_them(store):
    db, files, ingest, series = store
    old, busy, new = (s[0].SeriesInstanceUID for s in (series["old"], series["busy"], series["new"]))
    for uid in (old, busy):
        _age(db, files, uid, 10)
    _age(db, files, new, 2)
    done_job = _job(db, files, old, "done")
    _job(db, files, busy, "queued")
    old_files = list((files.root / "instances").rglob(f"{old}/*.dcm"))
    assert len(old_files) == 4

    got = sweep(db, files, days=7)
    assert (got.series, got.instances, got.result_folders, got.kept) == (1, 4, 1, 0)
    assert not any(p.exists() for p in old_files) and not old_files[0].parent.exists()
    assert not files.result_dir(done_job).exists()
    assert _state(db, old) == ("purged", 0, 1)
    assert db.run(lambda s: s.get(Job, done_job).state) == "done"  # history stays
    # a series whose job still waits, and a recent one, are untouched
    for uid in (busy, new):
        assert _state(db, uid)[:2] == ("complete", 4)
        assert len(list((files.root / "instances").rglob(f"{uid}/*.dcm"))) == 4
    events = db.run(lambda s: list(s.execute(select(AuditEvent).where(AuditEvent.event == "series-purged")).scalars()))
    assert [(e.series_uid, e.count) for e in events] == [(old, 4)]
    patient = str(series["old"][0].PatientName)
    assert patient and patient not in events[0].detail and str(series["old"][0].PatientID) not in events[0].detail
    # its job cannot be retried: the files are gone
    with pytest.raises(ValueError, match="removed by retention"):
        retry(db, done_job)
    # nothing more goes on the next pass; 0 days keeps everything
    assert sweep(db, files, days=7).series == 0
    assert sweep(db, files, days=0).series == 0
    # the series sent again: received as a new generation
    _store(ingest, series["old"][0])
    assert _state(db, old) == ("receiving", 1, 2)


def test_an_instance_sent_again_during_the_removal_stays(store):
    """The decision is taken on the index; a file written after the cutoff (an instance of the
    series sent again while it is removed) is left in place, and indexing it reopens the series."""
    db, files, ingest, series = store
    old = series["old"][0].SeriesInstanceUID
    _age(db, files, old, 10)
    resent = files.absolute(db.run(lambda s: s.execute(
        select(Instance.path).where(Instance.sop_uid == series["old"][1].SOPInstanceUID)).scalar_one()))
    os.utime(resent, None)  # written just now
    got = sweep(db, files, days=7)
    assert (got.series, got.instances, got.kept) == (1, 3, 1)
    assert resent.exists()
    assert index_missing_files(ingest) == 1
    assert _state(db, old) == ("receiving", 1, 2)


def test_a_removal_cut_short_is_finished_at_start(store):
    """The index says purged but the node stopped before the files went: at start the old files
    are removed instead of being indexed again (which would reopen and reprocess the series)."""
    db, files, ingest, series = store
    old = series["old"][0].SeriesInstanceUID
    _age(db, files, old, 10)
    cutoff = utcnow() - 7 * DAY
    series_id = db.run(lambda s: s.execute(select(Series.id).where(Series.series_uid == old)).scalar_one())
    assert db.run(lambda s: _purge_rows(s, series_id, cutoff, 7, True)) is not None  # rows only
    left = list((files.root / "instances").rglob(f"{old}/*.dcm"))
    assert len(left) == 4
    assert index_missing_files(ingest) == 0
    assert not any(p.exists() for p in left)
    assert _state(db, old) == ("purged", 0, 1)


def test_retention_settings(tmp_path):
    assert parse({}, tmp_path).retention.days == 7.0
    got = parse({"retention": {"days": 0, "interval_minutes": 5}}, tmp_path).retention
    assert (got.days, got.interval_minutes) == (0.0, 5.0)
    with pytest.raises(ConfigError, match="retention.days"):
        parse({"retention": {"days": -1}}, tmp_path)
    with pytest.raises(ConfigError, match="retention.keep"):
        parse({"retention": {"keep": 3}}, tmp_path)


def test_renames_into_a_folder_wait_while_retention_removes_from_it(tmp_path):
    """FileStore.place renames under a shared lock on the series folder, which retention's
    removal holds exclusively: a rename cannot slip between its age check and its unlink."""
    import fcntl
    import threading

    files = FileStore(tmp_path / "storage")
    rel = "instances/1.2/1.2.3/1.2.3.4.dcm"
    folder = files.absolute(rel).parent
    folder.mkdir(parents=True)
    tmp = files.write_temp((b"x",))
    fd = os.open(folder, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    placing = threading.Thread(target=files.place, args=(tmp, rel))
    placing.start()
    placing.join(0.5)
    assert placing.is_alive() and not files.absolute(rel).exists(), "the rename did not wait for the lock"
    os.close(fd)
    placing.join(5)
    assert not placing.is_alive() and files.absolute(rel).read_bytes() == b"x"
    # and a folder removed (empty) under it is made again
    other = "instances/1.5/1.5.6/1.5.6.7.dcm"
    files.place(files.write_temp((b"y",)), other)
    assert files.absolute(other).read_bytes() == b"y"
