"""Series completion: quiet time after the delivering associations end, expected count, hard bound.

A series is complete when
  * no association that delivered it is still open and no instance arrived for quiet_seconds, or
  * its expected instance count (ImagesInAcquisition, when trusted) has arrived, or
  * max_wait_seconds passed since its first instance (a sender that never releases).
Which associations are open is kept in memory: after a restart none is, and the quiet time
alone decides, so a crash never strands a series.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from typing import Callable

from sqlalchemy import select
from sqlalchemy.orm import Session

from .config import CompletionSettings
from .store.index import Database, Series, utcnow

log = logging.getLogger(__name__)

OnComplete = Callable[[Session, Series], None]
#: called (in the completion loop: return quickly) once a series waits out its quiet time
OnQuiet = Callable[[Series], None]


class CompletionTracker:
    #: extra quiet time before a receiver completes a series another receiver was receiving
    #: (only that one knows whether the association is still open)
    FOREIGN_GRACE_SECONDS = 10.0

    def __init__(self, db: Database, settings: CompletionSettings, on_complete: OnComplete,
                 receiver: str | None = None, shared: bool = False) -> None:
        """``receiver`` is this process's token (Ingest stamps series with it); ``shared``:
        other receivers may write to the same database."""
        self.db = db
        self.receiver = receiver
        self.shared = shared
        self.settings = settings
        self.on_complete = on_complete
        self._lock = threading.Lock()
        self._open: dict[int, set[str]] = {}
        self.wake = threading.Event()
        self.next_due: float | None = None
        self.on_quiet: OnQuiet | None = None
        self._quiet_seen: dict[str, dt.datetime] = {}

    def association_started(self, assoc_id: int) -> None:
        with self._lock:
            self._open.setdefault(assoc_id, set())

    def instance_received(self, assoc_id: int, series_uid: str, count_reached: bool = False) -> None:
        with self._lock:
            self._open.setdefault(assoc_id, set()).add(series_uid)
        if count_reached:
            self.wake.set()

    def association_ended(self, assoc_id: int) -> None:
        with self._lock:
            delivered = self._open.pop(assoc_id, set())
        if delivered:
            self.wake.set()

    def _busy(self) -> set[str]:
        with self._lock:
            return set().union(*self._open.values()) if self._open else set()

    def reason_to_complete(self, series: Series, busy: bool, now: dt.datetime) -> str | None:
        if series.expected_count and series.instance_count >= series.expected_count:
            return "expected-count"
        if now - series.first_received_at >= dt.timedelta(seconds=self.settings.max_wait_seconds):
            return "max-wait"
        if not busy and now - series.last_received_at >= dt.timedelta(seconds=self._quiet_for(series)):
            return "quiet"
        return None

    def _quiet_for(self, series: Series) -> float:
        quiet = self.settings.quiet_seconds
        if self.shared and series.receiver != self.receiver:
            quiet += self.FOREIGN_GRACE_SECONDS
        return quiet

    #: on_quiet waits until a series has been quiet this long (at most a third of its quiet time):
    #: a sender that opens one association per instance leaves no open association between
    #: them, and its next instance comes within milliseconds, not tenths of a second
    QUIET_HINT_SECONDS = 0.2

    def _announce_quiet(self, row: Series, now: dt.datetime, seen: dict[str, dt.datetime]) -> None:
        """Call on_quiet once per quiet spell of a series this process received (with shared
        receivers only this process knows whether its associations are open): its last instance
        tells one spell from the next."""
        if self.shared and row.receiver != self.receiver:
            return
        if seen.get(row.series_uid) == row.last_received_at:
            self._quiet_seen[row.series_uid] = row.last_received_at
            return
        if (now - row.last_received_at).total_seconds() < min(self.QUIET_HINT_SECONDS, self._quiet_for(row) / 3):
            return
        self._quiet_seen[row.series_uid] = row.last_received_at
        try:
            self.on_quiet(row)  # type: ignore[misc]
        except Exception:  # noqa: BLE001 - a hint; completion must go on
            log.exception("quiet-series hook failed for series %s", row.series_uid)

    def tick(self) -> list[str]:
        """Complete every series that is due; return their UIDs.

        Due-ness is decided on a plain read first, so the write transaction (which, on
        SQLite, takes the database's one write lock) is opened only for series that are due.
        Also sets ``next_due``: seconds until the next series could become due by quiet time.
        """
        busy = self._busy()
        now = utcnow()
        candidates = self.db.run(
            lambda s: list(s.execute(select(Series).where(Series.state == "receiving")).scalars()))
        done: list[str] = []
        self.next_due = None
        quiet_seen, self._quiet_seen = self._quiet_seen, {}
        for row in candidates:
            if self.reason_to_complete(row, row.series_uid in busy, now) is None:
                if row.series_uid not in busy:
                    due = (row.last_received_at - now).total_seconds() + self._quiet_for(row)
                    self.next_due = due if self.next_due is None else min(self.next_due, due)
                    if self.on_quiet is not None:
                        self._announce_quiet(row, now, quiet_seen)
                continue
            series_id, series_uid, seen_last = row.id, row.series_uid, row.last_received_at

            def complete(session: Session) -> str | None:
                series = session.get(Series, series_id)
                # Re-read inside the transaction: an instance may have arrived since the scan.
                if series is None or series.state != "receiving" or series.last_received_at != seen_last:
                    return None
                reason = self.reason_to_complete(series, series_uid in busy, now)
                if reason is None:
                    return None
                series.state = "complete"
                series.completed_at = utcnow()
                series.completed_by = reason
                self.on_complete(session, series)
                return reason

            reason = self.db.run(complete)
            if reason:
                if reason == "max-wait":
                    log.warning("series %s completed by max_wait_seconds=%s (sender kept the association open or kept sending)",
                                series_uid, self.settings.max_wait_seconds)
                done.append(series_uid)
        return done

    def run(self, stop: threading.Event, interval: float = 0.1) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - the loop must survive a bad series; the next tick retries
                log.exception("completion check failed; will retry")
            # wake when the next series is due rather than up to a whole interval later
            due = self.next_due
            self.wake.wait(interval if due is None else min(interval, max(due, 0.005)))
            self.wake.clear()
