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
from pacs_node import retention
from pacs_node.retention import Purged, _begin, _end, _remove_files, sweep
from pacs_node.store.files import FileStore
from pacs_node.store.index import AuditEvent, Database, Instance, Job, Series, utcnow
from pacs_node.store.indexer import index_missing_files
from pacs_node.store.ingest import Ingest
from test_postgres import pg_url  # noqa: F401 - fixture (a fresh PostgreSQL database)

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


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path: Path, ge_head: Path):  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'node.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    db = Database(url)
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


def _leftovers(files: FileStore) -> list[Path]:
    folder = files.root / "purging"
    return sorted(folder.iterdir()) if folder.is_dir() else []


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
    assert got.bytes > 0
    assert not any(p.exists() for p in old_files) and not old_files[0].parent.exists()
    assert not files.result_dir(done_job).exists() and _leftovers(files) == []
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


def _begin_purge(db: Database, uid: str):  # type: ignore[no-untyped-def]
    cutoff = utcnow() - 7 * DAY
    series_id = db.run(lambda s: s.execute(select(Series.id).where(Series.series_uid == uid)).scalar_one())
    doomed = db.run(lambda s: _begin(s, series_id, cutoff, True))
    assert doomed is not None
    return doomed


def test_an_instance_sent_again_during_the_removal_stays(store):
    """Between the index's decision and the files' removal an instance of the series arrives
    again (acknowledged): its file stays, its index row with it, and the series is received anew."""
    db, files, ingest, series = store
    old = series["old"][0].SeriesInstanceUID
    _age(db, files, old, 10)
    doomed = _begin_purge(db, old)
    assert _state(db, old)[0] == "purging"
    _store(ingest, series["old"][1])  # sent again now: placed into the series folder, indexed
    assert _state(db, old) == ("receiving", 1, 2)
    total = Purged()
    _remove_files(files, doomed, total)
    db.run(lambda s: _end(s, doomed, "test"))
    assert (total.instances, total.kept) == (3, 1)
    left = list((files.root / "instances").rglob(f"{old}/*.dcm"))
    assert [p.name for p in left] == [f"{series['old'][1].SOPInstanceUID}.dcm"]
    indexed = db.run(lambda s: list(s.execute(select(Instance.path)).scalars()))
    assert files.relative(left[0]) in indexed
    assert _state(db, old) == ("receiving", 1, 2), "the purge's end overwrote a series received again"
    assert index_missing_files(ingest) == 0 and _leftovers(files) == []


def test_removals_cut_short_are_finished_at_start(store, monkeypatch):
    """A stop after the index's decision, or after the files were moved away: the next start
    deletes the old files (it does not index them again, which would reprocess the series) and
    keeps an instance sent again in between."""
    db, files, ingest, series = store
    first, second = series["old"][0].SeriesInstanceUID, series["busy"][0].SeriesInstanceUID
    for uid in (first, second):
        _age(db, files, uid, 10)
    # first: stopped right after step 1
    _begin_purge(db, first)
    # second: stopped after its folder was moved, with an instance sent again (file written,
    # acknowledged, not yet indexed) that went into the folder before the move
    doomed = _begin_purge(db, second)
    again = series["busy"][2]
    buf = io.BytesIO()
    again.save_as(buf, enforce_file_format=True)
    entry = ingest.entry(again, len(buf.getvalue()), "TESTSCU", str(again.file_meta.TransferSyntaxUID))
    files.place(files.write_temp((buf.getvalue(),)), entry.rel)

    def stop(*_args):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(retention, "_empty_trash", stop)
    with pytest.raises(KeyboardInterrupt):
        _remove_files(files, doomed, Purged())
    monkeypatch.undo()
    assert len(_leftovers(files)) == 1

    assert retention.finish_interrupted(db, files) == 2
    assert _state(db, first) == ("purged", 0, 1) and _state(db, second) == ("purged", 0, 1)
    assert list((files.root / "instances").rglob(f"{first}/*.dcm")) == []
    kept = list((files.root / "instances").rglob(f"{second}/*.dcm"))
    assert [p.name for p in kept] == [f"{again.SOPInstanceUID}.dcm"] and _leftovers(files) == []
    # the instance sent again is indexed at start, as any acknowledged file without a row
    assert index_missing_files(ingest) == 1
    assert _state(db, second) == ("receiving", 1, 2)


def test_a_rename_reaches_the_disk_when_the_folder_moves_under_it(tmp_path, monkeypatch):
    """FileStore.place syncs the folder its rename went into, also when retention moved the
    series folder away between the open and the rename and another one took its name."""
    from pacs_node.store import files as files_module

    store = FileStore(tmp_path / "storage")
    rel = "instances/1.2/1.2.3/1.2.3.4.dcm"
    folder = store.absolute(rel).parent
    store.place(store.write_temp((b"a",)), "instances/1.2/1.2.3/1.2.3.1.dcm")
    real_replace, synced = os.replace, []

    def replace_after_a_move(src, dst):  # type: ignore[no-untyped-def]
        os.rename(folder, tmp_path / "moved")
        folder.mkdir()
        return real_replace(src, dst)

    monkeypatch.setattr(files_module.os, "replace", replace_after_a_move)
    monkeypatch.setattr(files_module, "fsync_dir", lambda path: synced.append(str(path)))
    store.place(store.write_temp((b"b",)), rel)
    monkeypatch.undo()
    assert store.absolute(rel).read_bytes() == b"b"
    assert synced == [str(folder)], "the folder that now holds the file was not synced"


def test_retention_settings(tmp_path):
    assert parse({}, tmp_path).retention.days == 7.0
    got = parse({"retention": {"days": 0, "interval_minutes": 5}}, tmp_path).retention
    assert (got.days, got.interval_minutes) == (0.0, 5.0)
    with pytest.raises(ConfigError, match="retention.days"):
        parse({"retention": {"days": -1}}, tmp_path)
    with pytest.raises(ConfigError, match="retention.keep"):
        parse({"retention": {"keep": 3}}, tmp_path)


def test_one_node_of_a_cluster_purges_at_a_time(store):
    """With PostgreSQL, several serve processes share the database and storage: a pass runs only
    in the process holding retention's advisory lock; the others skip it."""
    db, files, ingest, series = store
    if db.is_sqlite:
        pytest.skip("PostgreSQL only (SQLite: one node per database)")
    old = series["old"][0].SeriesInstanceUID
    _age(db, files, old, 10)
    other = Database(db.url, run_migrations=False)
    try:
        with retention._exclusive(other) as mine:
            assert mine
            assert sweep(db, files, days=7).series == 0, "purged while another node held the lock"
            assert retention.finish_interrupted(db, files) == 0
        assert sweep(db, files, days=7).series == 1
    finally:
        other.dispose()
    assert _state(db, old)[0] == "purged"


def test_files_from_before_the_cutoff_are_never_indexed_again(store):
    """While a purge runs, a receiver's restart makes the node index files it does not know:
    those of the series being purged are older than its cutoff and stay out of the index (they
    would reopen the series with files about to be deleted); once purged, leftovers are deleted."""
    db, files, ingest, series = store
    old = series["old"][0].SeriesInstanceUID
    _age(db, files, old, 10)
    doomed = _begin_purge(db, old)
    assert index_missing_files(ingest) == 0
    assert _state(db, old) == ("purging", 0, 1)
    # the purge's file step is lost (e.g. a file system without a journal after a power loss)
    db.run(lambda s: _end(s, doomed, "test"))
    left = list((files.root / "instances").rglob(f"{old}/*.dcm"))
    assert len(left) == 4
    assert index_missing_files(ingest) == 0
    assert not any(p.exists() for p in left) and _state(db, old) == ("purged", 0, 1)


def test_a_strange_folder_under_purging_does_not_stop_the_node(store):
    db, files, _ingest, _series = store
    (files.root / "purging" / "not-made-by-retention-x").mkdir(parents=True)
    assert retention.finish_interrupted(db, files) == 0  # logged, not raised
