"""Read a series ahead of its job, while the series waits out its quiet time.

When the last association that delivered a series is released, the series is complete
``completion.quiet_seconds`` later (1.5 s by default) unless more instances come. A worker in
the node process that has nothing to do uses that wait to read the series into its Volume, so
the job, once queued, starts at the model instead of at the disk (for a 300-slice CT the read
is about a second on a 2-core machine: docs/performance.md).

The read is only a hint. The job takes the volume only if the series' files are exactly the
ones that were read, unchanged (path, inode, size and modification time of every file); an
instance that arrived, or was sent again, since the read makes the job read the series itself.
One volume is held at a time, and only for a series some rule matched, up to
``worker.read_ahead_mb`` of float32 voxels.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from . import metrics
from .volume import Volume, load_series

log = logging.getLogger(__name__)

Fingerprint = frozenset[tuple[str, int, int, int]]


def fingerprint(files: Sequence[Path]) -> Fingerprint | None:
    """The files as they are now; None when one of them cannot be read."""
    try:
        stats = [(str(p), os.stat(p)) for p in files]
    except OSError:
        return None
    return frozenset((p, st.st_ino, st.st_size, st.st_mtime_ns) for p, st in stats)


@dataclass
class _Entry:
    series_uid: str
    key: Fingerprint
    started: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    volume: Volume | None = None
    seconds: float = 0.0


class ReadAhead:
    #: a volume read ahead and not taken within this many seconds is dropped (its series got
    #: more instances, or its job ran elsewhere)
    MAX_AGE_SECONDS = 120.0

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._entry: _Entry | None = None

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def read(self, series_uid: str, files: Sequence[Path], voxels: int) -> bool:
        """Read ``files`` (one series) into a Volume now, in the calling thread, and keep it for
        the series' job. False, without reading, when the volume would exceed the limit, another
        read is in progress, or a file is missing."""
        if not self.enabled or not files or voxels * 4 > self.max_bytes:
            return False
        key = fingerprint(files)  # before the read: a file replaced during it then misses
        if key is None:
            return False
        with self._lock:
            current = self._entry
            if current is not None and not current.done.is_set():
                return False
            entry = self._entry = _Entry(series_uid, key)  # replaces (drops) a finished one
        t0 = time.perf_counter()
        try:
            entry.volume = load_series(files)
        except Exception as exc:  # noqa: BLE001 - the job reads it again and reports the error
            log.debug("read-ahead of series %s failed (%s); its job will read it", series_uid, type(exc).__name__)
        finally:
            entry.seconds = time.perf_counter() - t0
            entry.done.set()
        log.debug("series %s read ahead: %d file(s) in %.2f s", series_uid, len(files), entry.seconds)
        return entry.volume is not None

    def expire(self) -> None:
        """Drop a volume read more than MAX_AGE_SECONDS ago and not taken (the worker calls this
        when idle), so that memory is not held for a job that ran elsewhere or never came."""
        with self._lock:
            entry = self._entry
            if entry is not None and entry.done.is_set() and time.monotonic() - entry.started > self.MAX_AGE_SECONDS:
                self._entry = None
                log.debug("read-ahead of series %s dropped: not taken within %.0f s", entry.series_uid,
                          self.MAX_AGE_SECONDS)

    def take(self, series_uid: str, files: Sequence[Path]) -> tuple[Volume | None, float]:
        """The volume read ahead for exactly these files as they are now, and the seconds its
        read took; (None, 0) otherwise, and the caller reads the series. A read of this series
        still in progress is waited for (reading it a second time beside it would be slower)."""
        with self._lock:
            entry = self._entry
            if entry is None:
                return None, 0.0
            if entry.series_uid != series_uid:
                return None, 0.0  # another series' (expire() drops it if its job never comes)
            waiting = not entry.done.is_set()
        # not the files being read (the series grew or changed since): no use waiting for it
        same = fingerprint(files) == entry.key
        if same and waiting:
            entry.done.wait()
            # again after the wait: an instance sent again during the read changes its file
            same = fingerprint(files) == entry.key
        with self._lock:
            if self._entry is entry:
                self._entry = None  # one job takes it; another rule's job reads its own
        if not same:
            log.info("series %s changed since it was read ahead (%d file(s) now); reading it again",
                     series_uid, len(files))
            metrics.read_ahead.labels("changed").inc()
            return None, 0.0
        if entry.volume is None:
            return None, 0.0
        metrics.read_ahead.labels("used").inc()
        return entry.volume, entry.seconds
