"""Retention: this node holds working copies, not records.

A series' instance files, and the result files of its jobs, are deleted ``[retention] days``
after the series' last instance arrived, once the series is complete and none of its jobs is
queued, running or sending. The database keeps the series row (state ``purged``, its UIDs),
its jobs and deliveries as history, and an audit row (``series-purged``: UIDs and counts, no
patient data). A series sent again later is received as a new generation and processed again.

No acknowledged instance is deleted by mistake. One process of a cluster purges at a time
(PostgreSQL: an advisory lock; SQLite: one node per database). A purge is three steps:

1. one transaction: the series row is locked and checked again, its instance rows are deleted,
   its state becomes ``purging`` and ``purge_cutoff`` records the cutoff; from then on the
   index never takes a file of that series written before the cutoff again
   (``Ingest._index``), whoever finds it (``index_missing_files`` at a receiver's restart);
2. the series folder and its jobs' result folders are *renamed* into ``storage/purging/<cutoff>-
   <study>-<series>-<random>/`` (one atomic step each, synced); instance files written after
   the cutoff (sent again meanwhile, acknowledged) are linked back into the series folder and
   synced, the others deleted, file by file, until the moved folder is empty (a rename that
   resolved the folder before the move can still land in it); then it is removed;
3. one transaction: ``purging`` becomes ``purged`` unless an instance sent again has reopened
   the series meanwhile (then it is ``receiving``, a new generation).

A stop or an error anywhere is finished by the next pass, or at the next start before the node
indexes files or receives (``finish_interrupted``): series still ``purging`` go through steps 2
and 3, folders left under ``purging/`` are emptied the same way (the cutoff is in their name).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import logging
import os
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from sqlalchemy import delete, exists, select, text, update
from sqlalchemy.orm import Session

from . import audit, metrics
from .config import RetentionSettings
from .store.files import FileStore, fsync_dir
from .store.index import Database, Instance, Job, Series, Study, utc_timestamp, utcnow

log = logging.getLogger(__name__)

#: job states in which a job still needs its series' files (or its own results)
ACTIVE = ("queued", "running", "sending")
PURGING_DIR = "purging"


@dataclass
class Purged:
    """What one sweep removed."""
    series: int = 0
    instances: int = 0
    result_folders: int = 0
    bytes: int = 0
    #: instance files written after the cutoff (sent again meanwhile): kept
    kept: int = 0


@dataclass
class _Doomed:
    series_id: int
    study_uid: str
    series_uid: str
    cutoff: dt.datetime
    instances: int = 0
    job_ids: list[int] = field(default_factory=list)


def sweep(db: Database, files: FileStore, days: float, now: dt.datetime | None = None, batch: int = 200) -> Purged:
    """Remove what retention says may go; ``days`` <= 0 removes nothing. One process of a
    cluster at a time (``_exclusive``); it first finishes purges a stop cut short."""
    total = Purged()
    if days <= 0:
        return total
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    with _exclusive(db) as mine:
        if not mine:
            return total
        _finish(db, files, total)
        while True:
            candidates = db.run(lambda s: list(s.execute(
                select(Series.id).where(Series.state == "complete", Series.last_received_at < cutoff,
                                        ~exists().where(Job.series_id == Series.id, Job.state.in_(ACTIVE)))
                .order_by(Series.last_received_at).limit(batch)).scalars()))
            progress = 0
            for series_id in candidates:
                doomed = db.run(lambda s, sid=series_id: _begin(s, sid, cutoff, db.is_sqlite))
                if doomed is None:  # changed meanwhile
                    continue
                progress += 1
                try:
                    _remove_files(files, doomed, total)
                except OSError:  # the series stays 'purging': the next pass (or start) finishes it
                    log.exception("retention: could not remove the files of series %s; trying again later",
                                  doomed.series_uid)
                    continue
                db.run(lambda s, d=doomed: _end(s, d, f"retention {days:g} days"))
            if len(candidates) < batch or not progress:
                return total


#: the PostgreSQL advisory lock that makes one process of a cluster the one that purges
_LOCK_KEY = 0x7061637352  # "pacsR"


@contextlib.contextmanager
def _exclusive(db: Database) -> Iterator[bool]:
    """True while this process may purge: always with SQLite (one node per database); with
    PostgreSQL while it holds the advisory lock (another node purging: False)."""
    if db.is_sqlite:
        yield True
        return
    with db.engine.connect() as conn:
        got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": _LOCK_KEY}).scalar())
        conn.commit()
        try:
            yield got
        finally:
            if got:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": _LOCK_KEY})
                conn.commit()


def _begin(session: Session, series_id: int, cutoff: dt.datetime, sqlite: bool) -> _Doomed | None:
    """Step 1: the index forgets the series' instances; the series is ``purging``."""
    query = select(Series).where(Series.id == series_id)
    if not sqlite:
        query = query.with_for_update(skip_locked=True)
    series = session.execute(query).scalar_one_or_none()
    if series is None or series.state != "complete" or series.last_received_at >= cutoff:
        return None
    if session.execute(select(Job.id).where(Job.series_id == series_id, Job.state.in_(ACTIVE)).limit(1)).first():
        return None
    instances = session.execute(delete(Instance).where(Instance.series_id == series_id)).rowcount
    series.state, series.instance_count, series.purge_cutoff = "purging", 0, cutoff
    return _doomed(session, series, instances)


def _doomed(session: Session, series: Series, instances: int = 0) -> _Doomed:
    study_uid = session.execute(select(Study.study_uid).where(Study.id == series.study_id)).scalar_one()
    job_ids = list(session.execute(select(Job.id).where(Job.series_id == series.id)).scalars())
    assert series.purge_cutoff is not None
    return _Doomed(series.id, study_uid, series.series_uid, series.purge_cutoff, instances, job_ids)


def _end(session: Session, doomed: _Doomed, why: str) -> None:
    """Step 3: ``purged``, unless an instance sent again reopened the series meanwhile."""
    done = session.execute(update(Series).where(Series.id == doomed.series_id, Series.state == "purging")
                           .values(state="purged")).rowcount
    audit.add(session, "series-purged", study_uid=doomed.study_uid, series_uid=doomed.series_uid,
              count=doomed.instances,
              detail=f"{why}: files older than {doomed.cutoff:%Y-%m-%d %H:%M} UTC; {doomed.instances} instance(s), "
                     f"results of {len(doomed.job_ids)} job(s)" + ("" if done else "; the series was sent again "
                                                                        "meanwhile and is being received anew"))


def _remove_files(files: FileStore, doomed: _Doomed, total: Purged) -> None:
    """Step 2: move the series folder and its jobs' result folders away, put back what was
    written after the cutoff, delete the rest."""
    trash = files.root / PURGING_DIR / (f"{utc_timestamp(doomed.cutoff):.6f}-{doomed.study_uid}-{doomed.series_uid}-"
                                        f"{uuid.uuid4().hex[:8]}")
    trash.mkdir(parents=True)
    fsync_dir(trash.parent)
    series_dir = files.root / "instances" / doomed.study_uid / doomed.series_uid
    with contextlib.suppress(FileNotFoundError):
        os.rename(series_dir, trash / "instances")
        fsync_dir(series_dir.parent)
    moved_results = 0
    for job_id in doomed.job_ids:
        with contextlib.suppress(FileNotFoundError):
            os.rename(files.result_dir(job_id), trash / f"result-{job_id}")
            moved_results += 1
    fsync_dir(trash)
    if moved_results:
        fsync_dir(files.root / "results")
    total.result_folders += moved_results
    _empty_trash(files, trash, total)
    _remove_empty(series_dir.parent, files.root / "instances")
    total.series += 1


def _empty_trash(files: FileStore, trash: Path, total: Purged) -> None:
    """Put back, from a folder under purging/, the instance files written after its cutoff;
    delete the rest and the folder. A rename into the moved series folder can still land in it
    while this runs (resolved before the move): each file is first renamed to a private name
    (so what is judged is what is acted on) and the folder is listed again until it is empty."""
    cutoff_ts, study_uid, series_uid, _ = trash.name.split("-")
    limit = float(cutoff_ts)
    moved = trash / "instances"
    series_dir = files.root / "instances" / study_uid / series_uid
    kept = 0
    while moved.is_dir():
        for path in sorted(moved.iterdir()):
            private = trash / f"judged-{uuid.uuid4().hex[:8]}-{path.name}"
            os.rename(path, private)
            info = private.stat()
            if path.suffix == ".dcm" and info.st_mtime >= limit:
                # an instance of the series sent again after the cutoff (acknowledged): back it goes
                _put_back(private, series_dir / path.name)
                kept += 1
            else:
                total.instances += 1
                total.bytes += info.st_size
            private.unlink()
        try:
            moved.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
    if kept:
        log.warning("retention: series %s: %d instance file(s) were sent again while it was removed; kept",
                    series_uid, kept)
    total.kept += kept
    for folder in trash.glob("result-*"):
        total.bytes += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder)
    for leftover in trash.glob("judged-*"):  # renamed for judging before a stop: put back if new
        if leftover.stat().st_mtime >= limit:
            _put_back(leftover, series_dir / leftover.name.split("-", 2)[2])
        leftover.unlink()
    trash.rmdir()


def _put_back(path: Path, target: Path) -> None:
    """Link ``path`` as ``target`` (unless a newer copy is there already), durably. Needs hard
    links: without them the error leaves the file where it is, for the next pass."""
    series_dir = target.parent
    FileStore.make_folders(series_dir)
    try:
        os.link(path, target)
    except FileExistsError:
        return  # a newer copy arrived since; that one is indexed
    fsync_dir(series_dir)


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty (FileStore.place
    makes a removed folder again)."""
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _finish(db: Database, files: FileStore, total: Purged) -> int:
    """Finish purges a stop cut short: series still 'purging' go through steps 2 and 3, folders
    left under purging/ are emptied (newer files put back). Errors are logged per item."""
    pending = db.run(lambda s: [_doomed(s, series) for series in
                                s.execute(select(Series).where(Series.state == "purging")).scalars()])
    finished = 0
    for doomed in pending:
        try:
            _remove_files(files, doomed, total)
        except OSError:
            log.exception("retention: could not finish removing series %s", doomed.series_uid)
            continue
        db.run(lambda s, d=doomed: _end(s, d, "retention, finished after a stop"))
        finished += 1
    folder = files.root / PURGING_DIR
    for trash in sorted(folder.glob("*-*-*-*")) if folder.is_dir() else ():
        try:
            _empty_trash(files, trash, total)
        except (OSError, ValueError):  # ValueError: a folder not named by retention
            log.exception("retention: could not empty %s", trash)
    return finished


def finish_interrupted(db: Database, files: FileStore) -> int:
    """At start, before files are indexed or received: finish purges a stop cut short (unless
    another node of the cluster is purging now: then that node does it)."""
    total = Purged()
    with _exclusive(db) as mine:
        finished = _finish(db, files, total) if mine else 0
    if finished or total.instances or total.kept:
        log.warning("retention: finished %d removal(s) cut short by a stop: %d instance file(s) deleted, %d kept",
                    finished, total.instances, total.kept)
    return finished


class Retention:
    """Runs ``sweep`` every ``interval_minutes`` (first a minute after start) in the serve process."""

    def __init__(self, db: Database, files: FileStore, settings: RetentionSettings, first_delay: float = 60.0) -> None:
        self.db, self.files, self.settings = db, files, settings
        self.first_delay = first_delay

    def run(self, stop: threading.Event) -> None:
        if self.settings.days <= 0:
            log.info("retention off ([retention] days = 0): received series are kept until deleted by hand")
            stop.wait()  # idle until the node stops: a loop that ended early reads as a fault (/healthz)
            return
        log.info("retention: series and their results are deleted %g day(s) after their last instance, once "
                 "no job needs them (checked every %g min)", self.settings.days, self.settings.interval_minutes)
        wait = self.first_delay
        while not stop.wait(wait):
            wait = self.settings.interval_minutes * 60
            try:
                done = sweep(self.db, self.files, self.settings.days)
            except Exception:  # noqa: BLE001 - the next pass (or the next start) finishes it; receiving goes on
                log.exception("retention pass failed; trying again in %g min", self.settings.interval_minutes)
                continue
            if done.series:
                metrics.retention_removed.labels("series").inc(done.series)
                metrics.retention_removed.labels("instances").inc(done.instances)
                metrics.retention_removed.labels("bytes").inc(done.bytes)
                log.info("retention: removed %d series older than %g day(s): %d instance file(s), %d result "
                         "folder(s), %.1f MB", done.series, self.settings.days, done.instances, done.result_folders,
                         done.bytes / 1e6)
