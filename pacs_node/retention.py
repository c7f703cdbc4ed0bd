"""Retention: this node holds working copies, not records.

A series' instance files, and the result files of its jobs, are deleted ``[retention] days``
after the series' last instance arrived, once the series is complete and none of its jobs is
queued, running or sending. The database keeps the series row (state ``purged``, its UIDs),
its jobs and deliveries as history, and an audit row (``series-purged``: UIDs and counts, no
patient data). A series sent again later is received as a new generation and processed again.

No acknowledged instance is deleted by mistake: the decision is taken in one transaction per
series (row lock; PostgreSQL skips a series another node is purging), then each instance file
is removed only if it is older than the cutoff, under an exclusive lock on its series folder
that ``FileStore.place`` takes shared for every rename into it; an instance of the series sent
again meanwhile is newer than the cutoff and stays (and reopens the series when indexed).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import delete, exists, select
from sqlalchemy.orm import Session

from . import audit, metrics
from .config import RetentionSettings
from .store.files import FileStore
from .store.index import Database, Instance, Job, Series, Study, utcnow

log = logging.getLogger(__name__)

#: job states in which a job still needs its series' files (or its own results)
ACTIVE = ("queued", "running", "sending")


@dataclass
class Purged:
    """What one sweep removed."""
    series: int = 0
    instances: int = 0
    result_folders: int = 0
    bytes: int = 0
    #: instance files found newer than the cutoff (sent again meanwhile): left in place
    kept: int = 0


@dataclass
class _Doomed:
    series_uid: str
    paths: list[str] = field(default_factory=list)
    job_ids: list[int] = field(default_factory=list)


def sweep(db: Database, files: FileStore, days: float, now: dt.datetime | None = None, batch: int = 200) -> Purged:
    """Remove what retention says may go; ``days`` <= 0 removes nothing."""
    total = Purged()
    if days <= 0:
        return total
    cutoff = (now or utcnow()) - dt.timedelta(days=days)
    while True:
        candidates = db.run(lambda s: list(s.execute(
            select(Series.id).where(Series.state == "complete", Series.last_received_at < cutoff,
                                    ~exists().where(Job.series_id == Series.id, Job.state.in_(ACTIVE)))
            .order_by(Series.last_received_at).limit(batch)).scalars()))
        progress = 0
        for series_id in candidates:
            doomed = db.run(lambda s, sid=series_id: _purge_rows(s, sid, cutoff, days, db.is_sqlite))
            if doomed is None:  # changed meanwhile, or another node has it
                continue
            progress += 1
            _remove_files(files, doomed, cutoff, total)
        if len(candidates) < batch or not progress:
            return total


def _purge_rows(session: Session, series_id: int, cutoff: dt.datetime, days: float, sqlite: bool) -> _Doomed | None:
    query = select(Series).where(Series.id == series_id)
    if not sqlite:
        query = query.with_for_update(skip_locked=True)
    series = session.execute(query).scalar_one_or_none()
    if series is None or series.state != "complete" or series.last_received_at >= cutoff:
        return None
    if session.execute(select(Job.id).where(Job.series_id == series_id, Job.state.in_(ACTIVE)).limit(1)).first():
        return None
    doomed = _Doomed(series.series_uid)
    doomed.paths = list(session.execute(select(Instance.path).where(Instance.series_id == series_id)).scalars())
    doomed.job_ids = list(session.execute(select(Job.id).where(Job.series_id == series_id)).scalars())
    session.execute(delete(Instance).where(Instance.series_id == series_id))
    series.state = "purged"
    series.instance_count = 0
    study_uid = session.execute(select(Study.study_uid).where(Study.id == series.study_id)).scalar_one_or_none()
    audit.add(session, "series-purged", study_uid=study_uid, series_uid=series.series_uid, count=len(doomed.paths),
              detail=f"retention {days:g} days: last instance {series.last_received_at:%Y-%m-%d %H:%M} UTC; "
                     f"{len(doomed.paths)} instance file(s), results of {len(doomed.job_ids)} job(s)")
    return doomed


def _remove_files(files: FileStore, doomed: _Doomed, cutoff: dt.datetime, total: Purged) -> None:
    limit = cutoff.replace(tzinfo=dt.timezone.utc).timestamp()
    by_folder: dict[str, list[str]] = {}
    for rel in doomed.paths:
        path = files.absolute(rel)
        by_folder.setdefault(str(path.parent), []).append(str(path))
    removed = kept = size = 0
    for folder, paths in by_folder.items():
        try:
            fd = os.open(folder, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # FileStore.place renames into the folder under LOCK_SH
            for path in paths:
                try:
                    info = os.stat(path)
                    if info.st_mtime >= limit:  # the instance was sent again after the cutoff: it stays
                        kept += 1
                        continue
                    os.unlink(path)
                except FileNotFoundError:
                    continue
                removed += 1
                size += info.st_size
            os.fsync(fd)
        finally:
            os.close(fd)
        _remove_empty(Path(folder), files.root / "instances")
    for job_id in doomed.job_ids:
        folder = files.result_dir(job_id)
        if folder.exists():
            size += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
            total.result_folders += 1
    total.series += 1
    total.instances += removed
    total.kept += kept
    total.bytes += size
    if kept:
        log.warning("retention: series %s: %d instance file(s) were sent again while it was removed; kept",
                    doomed.series_uid, kept)


def _remove_empty(folder: Path, top: Path) -> None:
    """Remove ``folder`` and its parents up to ``top`` while they are empty (a concurrent rename
    into one makes rmdir fail, and FileStore.place makes a removed folder again)."""
    while folder != top and top in folder.parents:
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


class Retention:
    """Runs ``sweep`` every ``interval_minutes`` (first a minute after start) in the serve process."""

    def __init__(self, db: Database, files: FileStore, settings: RetentionSettings, first_delay: float = 60.0) -> None:
        self.db, self.files, self.settings = db, files, settings
        self.first_delay = first_delay

    def run(self, stop: threading.Event) -> None:
        if self.settings.days <= 0:
            log.info("retention off ([retention] days = 0): received series are kept until deleted by hand")
            return
        log.info("retention: series and their results are deleted %g day(s) after their last instance, once "
                 "no job needs them (checked every %g min)", self.settings.days, self.settings.interval_minutes)
        wait = self.first_delay
        while not stop.wait(wait):
            wait = self.settings.interval_minutes * 60
            try:
                done = sweep(self.db, self.files, self.settings.days)
            except Exception:  # noqa: BLE001 - the next pass tries again; receiving goes on
                log.exception("retention pass failed; trying again in %g min", self.settings.interval_minutes)
                continue
            if done.series:
                metrics.retention_removed.labels("series").inc(done.series)
                metrics.retention_removed.labels("instances").inc(done.instances)
                metrics.retention_removed.labels("bytes").inc(done.bytes)
                log.info("retention: removed %d series older than %g day(s): %d instance file(s), %d result "
                         "folder(s), %.1f MB", done.series, self.settings.days, done.instances, done.result_folders,
                         done.bytes / 1e6)
