"""Series completion: quiet time after release, open associations, expected count, hard bound, reopen."""

import datetime as dt

import pydicom
import pytest

from pacs_node.complete import CompletionTracker
from pacs_node.config import CompletionSettings
from pacs_node.store.files import FileStore
from pacs_node.store.index import Database, Series, utcnow
from pacs_node.store.ingest import Ingest


@pytest.fixture
def env(tmp_path, ge_head):
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    ingest = Ingest(db, FileStore(tmp_path / "s"))
    completed: list[str] = []
    tracker = CompletionTracker(db, CompletionSettings(quiet_seconds=2, max_wait_seconds=60),
                                lambda session, series: completed.append(series.series_uid))
    files = sorted(ge_head.glob("*.dcm"))[:4]
    return db, ingest, tracker, completed, files


def receive(ingest, tracker, path, assoc=1):
    ds = pydicom.dcmread(path)
    stored = ingest.store(ds, path.read_bytes(), "STORESCU", "1.2.840.10008.1.2.1")
    tracker.instance_received(assoc, stored.series_uid)
    return stored.series_uid


def age(db, seconds):
    def go(s):
        for series in s.query(Series):
            series.last_received_at = utcnow() - dt.timedelta(seconds=seconds)
            series.first_received_at = min(series.first_received_at, series.last_received_at)
    db.run(go)


def test_waits_for_release_and_quiet_time(env):
    db, ingest, tracker, completed, files = env
    uid = receive(ingest, tracker, files[0], assoc=1)
    receive(ingest, tracker, files[1], assoc=2)  # the same series over a second association
    age(db, 5)
    assert tracker.tick() == []  # both associations still open
    tracker.association_ended(1)
    assert tracker.tick() == []  # association 2 still delivers it
    tracker.association_ended(2)
    assert tracker.tick() == [uid] and completed == [uid]
    assert tracker.tick() == []


def test_not_before_quiet_time(env):
    db, ingest, tracker, completed, files = env
    receive(ingest, tracker, files[0])
    tracker.association_ended(1)
    assert tracker.tick() == []


def test_expected_count_completes_while_association_open(env):
    db, ingest, tracker, completed, files = env
    uid = receive(ingest, tracker, files[0])
    db.run(lambda s: setattr(s.query(Series).one(), "expected_count", 2))
    assert tracker.tick() == []
    receive(ingest, tracker, files[1])
    assert tracker.tick() == [uid]


def test_max_wait_bounds_a_sender_that_never_releases(env):
    db, ingest, tracker, completed, files = env
    uid = receive(ingest, tracker, files[0])
    db.run(lambda s: setattr(s.query(Series).one(), "first_received_at", utcnow() - dt.timedelta(seconds=61)))
    assert tracker.tick() == [uid]
    by = db.run(lambda s: s.query(Series).one().completed_by)
    assert by == "max-wait"


def test_late_instance_reopens_series_as_next_generation(env):
    db, ingest, tracker, completed, files = env
    uid = receive(ingest, tracker, files[0])
    tracker.association_ended(1)
    age(db, 5)
    assert tracker.tick() == [uid]
    receive(ingest, tracker, files[2], assoc=3)
    series = db.run(lambda s: s.query(Series).one())
    assert (series.state, series.generation, series.instance_count) == ("receiving", 2, 2)
