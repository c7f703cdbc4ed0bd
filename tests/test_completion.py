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


def test_quiet_hook_once_per_quiet_spell_after_a_short_quiet_time(env):
    """on_quiet (the node's read-ahead) is called once a series has had no open association and
    no instance for QUIET_HINT_SECONDS (0.2 s; 0.6 s here, so that a slow disk on a loaded machine
    does not age the just-received instance past it), once per spell; not for a series still arriving."""
    db, ingest, tracker, completed, files = env
    tracker.QUIET_HINT_SECONDS = 0.6  # still under a third of the 2 s quiet time
    quiet: list[str] = []
    tracker.on_quiet = lambda series: quiet.append(series.series_uid)
    uid = receive(ingest, tracker, files[0])
    age(db, 0.5)
    assert tracker.tick() == [] and quiet == []  # the association is open
    tracker.association_ended(1)
    age(db, 0.05)
    assert tracker.tick() == [] and quiet == []  # quiet for 0.05 s: not yet
    age(db, 0.8)
    assert tracker.tick() == [] and quiet == [uid]
    assert tracker.tick() == [] and quiet == [uid]  # once per spell
    receive(ingest, tracker, files[1], assoc=2)  # one association per instance
    tracker.association_ended(2)
    assert tracker.tick() == [] and quiet == [uid]  # the new instance is too recent
    age(db, 0.8)
    assert tracker.tick() == [] and quiet == [uid, uid]  # a new spell
    age(db, 5)
    assert tracker.tick() == [uid] and quiet == [uid, uid]


def test_quiet_hook_skips_series_another_receiver_took_in_shared_mode(tmp_path, ge_head):
    db = Database(f"sqlite:///{tmp_path / 'c.db'}")
    other = Ingest(db, FileStore(tmp_path / "s"), receiver="other-host:1:x")
    tracker = CompletionTracker(db, CompletionSettings(quiet_seconds=2, max_wait_seconds=60),
                                lambda session, series: None, receiver="this-host:2:y", shared=True)
    quiet: list[str] = []
    tracker.on_quiet = lambda series: quiet.append(series.series_uid)
    receive(other, tracker, sorted(ge_head.glob("*.dcm"))[0])
    tracker.association_ended(1)
    age(db, 1.0)
    tracker.tick()
    assert quiet == []  # only the receiver that holds its associations knows it is quiet
