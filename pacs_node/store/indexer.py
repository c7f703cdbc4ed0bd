"""Index rows for received instances, written in batches on a thread of their own.

The DIMSE receive path acknowledges an instance once its file is durable (written, fsynced,
renamed, folder fsynced) and hands the index entry to this writer: a busy association then
waits for its files only, and many instances share one index transaction (one commit, one
WAL fsync). The files are the record; the index is derived from them:

* an association's instances are all indexed before its A-RELEASE-RP is sent and before the
  completion tracker hears that it ended (``flush``), so a released series is fully indexed;
* a node killed between an acknowledgement and the index commit loses no instance: at start,
  ``index_missing_files`` indexes every instance file that the index does not know;
* when the database fails, the writer keeps the entries and retries; meanwhile the receive
  path refuses new instances (0xA700) instead of piling up unindexed ones.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
from collections import deque
from pathlib import Path

import pydicom
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from .files import TEMP_SUFFIX
from .index import Instance, Series, utc_timestamp
from .ingest import Entry, Ingest

log = logging.getLogger(__name__)


class IndexWriter:
    """Queue of index entries; one thread indexes them, up to ``max_batch`` per transaction."""

    def __init__(self, ingest: Ingest, max_batch: int = 256, max_pending: int = 4096, linger: float = 0.05) -> None:
        self.ingest = ingest
        self.max_batch = max_batch
        #: how long the first entry of a batch waits for others to share its commit (each commit
        #: is a database fsync, which slows the instance files' fsyncs); a flush cuts it short
        self.linger = linger
        self._flushing = 0
        self.max_pending = max_pending
        self._cond = threading.Condition()
        self._queue: deque[Entry] = deque()
        self._submitted = 0
        self._indexed = 0
        self._stopping = False
        self._thread: threading.Thread | None = None
        #: why the last batch failed while it is still failing (the receive path refuses then)
        self.error: str | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._thread.start()

    def submit(self, entry: Entry) -> None:
        """Queue one entry; waits while ``max_pending`` entries are queued (back-pressure)."""
        with self._cond:
            while len(self._queue) >= self.max_pending and not self._stopping:
                self._cond.wait(0.5)
            self._queue.append(entry)
            self._submitted += 1
            self._cond.notify_all()

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Wait until every entry submitted so far is indexed; False if that took over ``timeout``."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            target = self._submitted
            self._flushing += 1
            self._cond.notify_all()
            try:
                while self._indexed < target:
                    left = None if end is None else end - time.monotonic()
                    if left is not None and left <= 0:
                        return False
                    self._cond.wait(left)
            finally:
                self._flushing -= 1
        return True

    @property
    def pending(self) -> int:
        with self._cond:
            return self._submitted - self._indexed

    def stop(self, timeout: float = 60.0) -> None:
        """Index what is queued, then end the thread (entries left are found again at the next start)."""
        if self._thread is None:
            return
        if not self.flush(timeout):
            log.error("index writer stopped with %d instance(s) not indexed; the next start indexes their files",
                      self.pending)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                until = time.monotonic() + self.linger
                while (len(self._queue) < self.max_batch and not self._flushing and not self._stopping
                       and (left := until - time.monotonic()) > 0):
                    self._cond.wait(left)
                batch = [self._queue[i] for i in range(min(self.max_batch, len(self._queue)))]
            done = self._index(batch)
            with self._cond:
                for _ in range(done):
                    self._queue.popleft()
                self._indexed += done
                self._cond.notify_all()
                if not done and self._stopping:
                    return  # the database still fails: the next start indexes these files

    def _index(self, batch: list[Entry]) -> int:
        """Index ``batch``; return how many entries from its start are done (indexed or given up)."""
        delay = 0.1
        while True:
            try:
                self.ingest.index(batch)
                if self.error is not None:
                    log.warning("index database writable again: %d instance(s) waiting", self.pending)
                self.error = None
                return len(batch)
            except OperationalError as exc:
                # the database is down, locked for long, or out of space: keep the entries, retry
                if self.error is None:
                    log.error("cannot index received instances (%s); retrying, new instances are refused meanwhile",
                              type(exc.orig or exc).__name__)
                self.error = "the index database is not writable"
                with self._cond:
                    if self._stopping:
                        return 0
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # noqa: BLE001 - e.g. one entry the database refuses
                if len(batch) > 1:
                    # one by one, so that one bad entry does not hold back the others
                    return self._index(batch[:1])
                log.exception("instance file %s could not be indexed; it is indexed again at the next start",
                              batch[0].rel)
                return 1


def index_missing_files(ingest: Ingest) -> int:
    """Index instance files that the index does not know (a kill between acknowledgement and
    index commit); remove files the index moved away from. Return how many were indexed.

    Compares, per series, the files on disk with the index's instance count; only series that
    differ are listed in detail, so a normal start reads no DICOM file."""
    files = ingest.files
    root = files.root / "instances"
    on_disk: dict[str, list[Path]] = {}
    for study_dir in root.iterdir() if root.is_dir() else ():
        # retention may move a folder away meanwhile (this also runs on a live node)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError):
            for series_dir in study_dir.iterdir():
                with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                    found = [p for p in series_dir.iterdir() if p.suffix == ".dcm" and not p.name.endswith(TEMP_SUFFIX)]
                    on_disk.setdefault(series_dir.name, []).extend(found)
    if not on_disk:
        return 0
    known_series = {row.series_uid: row for row in ingest.db.run(lambda s: list(s.execute(
        select(Series.series_uid, Series.instance_count, Series.state, Series.purge_cutoff))))}
    entries: list[Entry] = []
    removed = purged = 0
    for series_uid, paths in on_disk.items():
        series = known_series.get(series_uid)
        if series is not None and series.instance_count == len(paths):
            continue
        if series is not None and series.purge_cutoff is not None:
            # files from before the series' retention cutoff are retention's (pacs_node/retention.py):
            # never indexed again; once the series is purged, leftovers (a stop, a file system
            # that lost the removal) are deleted here
            limit = utc_timestamp(series.purge_cutoff)
            for path in list(paths):
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < limit:
                        paths.remove(path)
                        if series.state == "purged":
                            path.unlink()
                            purged += 1
            if not paths:
                continue
        known = set(ingest.db.run(lambda s, uid=series_uid: list(s.execute(
            select(Instance.path).join(Series, Series.id == Instance.series_id)
            .where(Series.series_uid == uid)).scalars())))
        for path in paths:
            rel = files.relative(path)
            if rel in known:
                continue
            try:
                info = path.stat()
                ds = pydicom.dcmread(path, stop_before_pixels=True)
                entry = ingest.entry(ds, info.st_size,
                                     str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip(),
                                     str(ds.file_meta.TransferSyntaxUID))
            except Exception as exc:  # noqa: BLE001 - a damaged file is reported, not fatal
                log.error("instance file %s could not be read to index it (%s); left in place", rel,
                          type(exc).__name__)
                continue
            if entry.rel != rel:
                log.error("instance file %s does not match its UIDs; left in place, not indexed", rel)
                continue
            elsewhere = ingest.db.run(lambda s, sop=entry.sop_uid: s.execute(
                select(Instance.path, Instance.received_at).where(Instance.sop_uid == sop)).first())
            mtime = dt.datetime.fromtimestamp(info.st_mtime, dt.timezone.utc).replace(tzinfo=None)
            if elsewhere is not None and elsewhere.path != rel and elsewhere.received_at >= mtime:
                # the instance moved to another series after this file was written; the old
                # file's removal was lost with the process
                path.unlink(missing_ok=True)
                removed += 1
                continue
            entries.append(dataclasses.replace(entry, received_at=mtime))
    for i in range(0, len(entries), 256):
        ingest.index(entries[i:i + 256])
    if entries or removed:
        log.warning("indexed %d instance file(s) that were stored but not yet indexed when the node stopped; "
                    "removed %d file(s) of instances that had moved", len(entries), removed)
    if purged:
        log.warning("removed %d file(s) of series that retention had removed (left by a stop)", purged)
    return len(entries)
