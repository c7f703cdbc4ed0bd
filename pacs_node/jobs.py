"""Job state machine (queued -> running -> sending -> done | failed), the worker and the sender.

Every transition is a committed DB row, so a crash anywhere resumes from the last state:
running jobs whose lease ran out go back to the queue, deliveries in flight are retried, and
result UIDs are deterministic, so a resend replaces rather than duplicates.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import os
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydicom.dataset import Dataset
from sqlalchemy import and_, case, or_, select, update
from sqlalchemy.orm import Session

from . import audit, metrics
from .config import Rule, SendSettings, Settings
from .net.scu import SendError, send_files
from .net.tls import context_for_peer
from .process import process_series
from .readahead import ReadAhead
from .store.files import FileStore, fsync_dir, write_new
from .store.index import Database, Delivery, Instance, Job, Series, utcnow

log = logging.getLogger(__name__)

PRIORITY = {"stat": 0, "routine": 1, "research": 2}


def new_owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def create_jobs(session: Session, series: Series, rules: list[Rule]) -> list[Job]:
    """One job per matching rule for this completion of the series (idempotent per generation)."""
    jobs = []
    for rule in rules:
        exists = session.execute(
            select(Job).where(Job.series_id == series.id, Job.rule == rule.name, Job.generation == series.generation)
        ).scalar_one_or_none()
        if exists is not None:
            continue
        job = Job(series_id=series.id, generation=series.generation, rule=rule.name, pipeline=rule.pipeline,
                  priority=PRIORITY[rule.priority], state="queued", destinations=",".join(rule.destinations),
                  params=json.dumps(rule.params, sort_keys=True), outputs=",".join(rule.outputs),
                  last_instance_at=series.last_received_at, series_completed_at=series.completed_at,
                  created_at=utcnow())
        session.add(job)
        jobs.append(job)
    session.flush()
    return jobs


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return (b - a).total_seconds() if a and b else None


def _audit_end(session: Session, job: Job) -> None:
    """The job-done / job-failed audit row, added in the transaction that ends ``job``: a crash
    can't split them, and the job-end watchers (metrics, webhooks) read these rows, not the job
    row, which a retry changes."""
    audit.add(session, f"job-{job.state}", job_id=job.id, count=job.result_count,
              seconds=_seconds(job.last_instance_at, job.finished_at), detail=(job.error or "")[:200])


def in_window(window: str, now: dt.datetime | None = None) -> bool:
    """Whether local time ``now`` lies in "HH:MM-HH:MM" (which may wrap past midnight)."""
    if not window:
        return True
    now = now or dt.datetime.now()
    start, end = ([int(x) for x in part.split(":")] for part in window.split("-"))
    minute, a, b = now.hour * 60 + now.minute, start[0] * 60 + start[1], end[0] * 60 + end[1]
    return a <= minute < b if a <= b else minute >= a or minute < b


def recover(db: Database, single_process: bool) -> None:
    """Put interrupted work back in line after a restart.

    In the single-process mode every running job belonged to the previous run of this
    process; with several workers only jobs whose lease expired are taken back.
    """
    now = utcnow()

    def fix(session: Session) -> tuple[int, int]:
        cond = Job.state == "running"
        if not single_process:
            cond = and_(cond, or_(Job.lease_until.is_(None), Job.lease_until < now))
        jobs = session.execute(update(Job).where(cond).values(state="queued", lease_owner=None, lease_until=None)).rowcount
        deliveries = 0
        if single_process:
            deliveries = session.execute(
                update(Delivery).where(Delivery.state == "sending").values(state="pending", next_attempt_at=now)
            ).rowcount
        return jobs, deliveries

    jobs, deliveries = db.run(fix)
    if jobs or deliveries:
        log.info("recovered %d interrupted job(s) and %d interrupted deliver(y/ies)", jobs, deliveries)


def retry(db: Database, job_id: int) -> str:
    """Retry a failed job: resend if its results exist, else run it again. Returns what was done."""
    def go(session: Session) -> str:
        job = session.get(Job, job_id)
        if job is None:
            raise LookupError(f"job {job_id} does not exist")
        if job.state not in ("failed", "done"):
            raise ValueError(f"job {job_id} is {job.state}; only failed or done jobs can be retried")
        # locked: retention (which skips a locked series) must not purge it under the retry
        series = session.get(Series, job.series_id, with_for_update=True)
        if series is not None and series.state in ("purging", "purged"):
            raise ValueError(f"job {job_id}: the files of its series and results were removed by retention "
                             "([retention] days); have the series sent again")
        deliveries = session.execute(select(Delivery).where(Delivery.job_id == job.id)).scalars().all()
        if job.encoded_at is not None and deliveries:
            again = [d for d in deliveries if d.state == "failed"] or list(deliveries)
            for d in again:
                d.state, d.attempts, d.next_attempt_at, d.last_error, d.finished_at = "pending", 0, utcnow(), None, None
            job.state, job.error, job.finished_at = "sending", None, None
            return f"job {job_id}: resending to {', '.join(d.destination for d in again)}"
        for d in deliveries:
            session.delete(d)
        job.state, job.error, job.finished_at, job.encoded_at = "queued", None, None, None
        job.lease_owner = job.lease_until = None
        return f"job {job_id}: queued to run again"

    message = db.run(go)
    audit.record(db, "job-retry", job_id=job_id, detail=message)
    return message


@dataclass
class JobInput:
    job_id: int
    attempt: int
    pipeline: str
    params: dict
    outputs: tuple[str, ...]
    rule: str
    series_uid: str
    files: list[Path]


class Worker:
    """Claims queued jobs, runs the pipeline, encodes and writes results, hands over to the sender."""

    def __init__(self, db: Database, files: FileStore, settings: Settings, pipelines: list[str] | None = None) -> None:
        self.db = db
        self.files = files
        self.settings = settings
        self.pipelines = pipelines
        self.owner = new_owner()
        self.wake = threading.Event()
        #: a series read while it waits for completion (the node feeds it: Node._read_ahead)
        self.read_ahead = ReadAhead(settings.worker.read_ahead_mb * 2**20)
        #: set while a job is processed (the node reads ahead only for an idle worker)
        self.busy = threading.Event()
        #: called after a job's results were handed over (the node wakes its sender with it)
        self.on_hand_over: Callable[[], None] | None = None

    def claim(self) -> JobInput | None:
        """Take the next job: stat, then routine, then research (see config.toml [worker]).

        A routine job older than starvation_seconds ranks with stat, so a steady stream of
        stat work delays routine work by at most that long.
        """
        now = utcnow()
        worker = self.settings.worker
        starving = now - dt.timedelta(seconds=worker.starvation_seconds)
        rank = case((and_(Job.priority == PRIORITY["routine"], Job.created_at < starving), PRIORITY["stat"]),
                    else_=Job.priority)

        def go(session: Session) -> JobInput | None:
            q = select(Job).where(Job.state == "queued")
            if self.pipelines:
                q = q.where(Job.pipeline.in_(self.pipelines))
            if not in_window(worker.research_window):
                q = q.where(Job.priority != PRIORITY["research"])
            q = q.order_by(rank, Job.created_at, Job.id).limit(1)
            if not self.db.is_sqlite:
                q = q.with_for_update(skip_locked=True)
            job = session.execute(q).scalar_one_or_none()
            if job is None:
                return None
            claimed = session.execute(
                update(Job).where(Job.id == job.id, Job.state == "queued").values(
                    state="running", lease_owner=self.owner, lease_until=now + dt.timedelta(seconds=worker.lease_seconds),
                    started_at=now, attempts=Job.attempts + 1)
            ).rowcount
            if claimed != 1:
                return None
            series = session.get(Series, job.series_id)
            rows = session.execute(select(Instance.path).where(Instance.series_id == job.series_id)).scalars().all()
            return JobInput(job.id, job.attempts + 1, job.pipeline, json.loads(job.params or "{}"),
                            tuple(o for o in (job.outputs or "").split(",") if o), job.rule,
                            series.series_uid if series else "", [self.files.absolute(p) for p in rows])

        return self.db.run(go)

    def _heartbeat(self, job_id: int, stop: threading.Event) -> None:
        lease = self.settings.worker.lease_seconds
        while not stop.wait(lease / 3):
            try:
                self.db.run(lambda s: s.execute(update(Job).where(Job.id == job_id, Job.lease_owner == self.owner).values(
                    lease_until=utcnow() + dt.timedelta(seconds=lease))))
            except Exception:  # noqa: BLE001 - a missed beat is retried; the lease has slack
                log.warning("job %d: lease renewal failed, will retry", job_id)

    def process(self, item: JobInput) -> None:
        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(item.job_id, stop), daemon=True)
        beat.start()
        timings: dict[str, float] = {}
        try:
            t0 = time.perf_counter()
            volume, ahead = self.read_ahead.take(item.series_uid, item.files)  # may wait for the read to end
            waited = time.perf_counter() - t0
            datasets, timings = process_series(item.files, item.pipeline, item.params, item.outputs, item.rule,
                                               volume=volume)
            timings["load"] = timings.get("load", 0.0) + waited
            if volume is not None:
                timings["read_ahead"] = ahead  # read while the series waited for completion
            t0 = time.perf_counter()
            # one folder per attempt and worker: a worker that lost its lease writes beside,
            # never into, the folder of the worker that took the job over
            out_dir = self.files.result_dir(item.job_id) / f"{item.attempt}-{self.owner.rsplit(':', 1)[-1]}"
            if out_dir.exists():
                shutil.rmtree(out_dir)
            def write(ds: Dataset) -> None:
                buf = io.BytesIO()
                ds.save_as(buf, enforce_file_format=True)
                # straight to its name: the folder is this attempt's own, and nothing reads it
                # before the job's row names it (_hand_over), after the folder's fsync below
                write_new(out_dir / f"{ds.SOPInstanceUID}.dcm", buf.getbuffer())

            out_dir.mkdir(parents=True, exist_ok=True)
            # the syncs run side by side (they release the GIL)
            with ThreadPoolExecutor(max_workers=4, thread_name_prefix=f"job{item.job_id}-write") as pool:
                list(pool.map(write, datasets))
            if datasets:
                fsync_dir(out_dir)  # once for all results, before the job says they exist
            timings["write"] = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - any pipeline failure fails this job only
            message = f"{type(exc).__name__}: {exc}"[:1000]
            log.error("job %d (%s, series %s) failed: %s", item.job_id, item.pipeline, item.series_uid, message)
            self._finish_failed(item.job_id, message, timings)
            return
        finally:
            stop.set()
        self._hand_over(item, len(datasets), timings, self.files.relative(out_dir))

    def _finish_failed(self, job_id: int, message: str, timings: dict[str, float]) -> None:
        def go(session: Session) -> None:
            job = session.get(Job, job_id)
            if job is None or job.lease_owner != self.owner:
                return
            job.state, job.error, job.finished_at = "failed", message, utcnow()
            job.timings = _fmt(timings)
            job.lease_owner = job.lease_until = None
            _audit_end(session, job)
        self.db.run(go)

    def _hand_over(self, item: JobInput, count: int, timings: dict[str, float], result_path: str) -> None:
        def go(session: Session) -> str:
            job = session.get(Job, item.job_id)
            if job is None or job.lease_owner != self.owner or job.state != "running":
                return "lost-lease"
            series = session.get(Series, job.series_id)
            job.result_count = count
            job.result_path = result_path
            job.encoded_at = utcnow()
            job.timings = _fmt(timings)
            job.lease_owner = job.lease_until = None
            targets = [d for d in (job.destinations or "").split(",") if d]
            for name in targets:
                session.add(_delivery_for(job, name, series, self.settings))
            job.state = "sending" if targets else "done"
            if not targets:
                job.finished_at = utcnow()
                _audit_end(session, job)
            return job.state

        state = self.db.run(go)
        if state == "lost-lease":
            log.warning("job %d: lease lost while running (another worker took it); results discarded", item.job_id)
            shutil.rmtree(self.files.absolute(result_path), ignore_errors=True)
            return
        # folders of earlier attempts (a worker that died, a rerun) are superseded by this one
        current = self.files.absolute(result_path)
        job_dir = self.files.result_dir(item.job_id)
        for other in job_dir.iterdir() if job_dir.exists() else ():
            if other != current:
                shutil.rmtree(other, ignore_errors=True)
        log.info("job %d (%s, series %s): %d result instance(s) encoded [%s]", item.job_id, item.pipeline,
                 item.series_uid, count, _fmt(timings))
        if state == "sending" and self.on_hand_over is not None:
            self.on_hand_over()
        if state == "done":
            log.info("job %d done: no destinations", item.job_id)

    def run_once(self) -> bool:
        item = self.claim()
        if item is None:
            return False
        log.info("job %d claimed: pipeline %s, rule %s, series %s, %d instance(s)", item.job_id, item.pipeline,
                 item.rule, item.series_uid, len(item.files))
        self.busy.set()
        try:
            self.process(item)
        finally:
            self.busy.clear()
        return True

    def run(self, stop: threading.Event) -> None:
        next_reclaim = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_reclaim:
                    # jobs of workers that died are taken back once their lease expired
                    recover(self.db, single_process=False)
                    next_reclaim = time.monotonic() + self.settings.worker.lease_seconds / 3
                busy = self.run_once()
            except Exception:  # noqa: BLE001 - a DB hiccup must not kill the worker
                log.exception("worker loop error; retrying")
                busy = False
            if not busy:
                self.read_ahead.expire()
                self.wake.wait(self.settings.worker.poll_seconds)
                self.wake.clear()


def _fmt(timings: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.2f}" for k, v in timings.items())


def _delivery_for(job: Job, name: str, series: Series | None, settings: Settings) -> Delivery:
    if name == "sender":
        calling = series.calling_ae if series else ""
        peer = settings.peer_by_ae(calling)
        if peer is None or peer.host is None or peer.port is None:
            return Delivery(job_id=job.id, destination="sender", ae_title=calling, state="failed",
                            last_error=f"destination 'sender': calling AE {calling!r} is not a [[peers]] entry with host and port",
                            finished_at=utcnow())
        return Delivery(job_id=job.id, destination=f"sender:{peer.name}", ae_title=peer.ae_title, host=peer.host, port=peer.port)
    peer = settings.peer_by_name(name)
    if peer is None or peer.host is None or peer.port is None:
        return Delivery(job_id=job.id, destination=name, state="failed",
                        last_error=f"destination {name!r} is not a configured peer with host and port", finished_at=utcnow())
    return Delivery(job_id=job.id, destination=name, ae_title=peer.ae_title, host=peer.host, port=peer.port)


def backoff(settings: SendSettings, attempts: int) -> float:
    return min(settings.backoff_seconds * (2 ** max(0, attempts - 1)), settings.backoff_max_seconds)


class Sender:
    """Delivers encoded results: retries with exponential backoff, then marks the job failed."""

    def __init__(self, db: Database, files: FileStore, settings: Settings) -> None:
        self.db = db
        self.files = files
        self.settings = settings
        self.wake = threading.Event()

    def _claim(self) -> Delivery | None:
        now = utcnow()

        def go(session: Session) -> Delivery | None:
            q = (select(Delivery).join(Job, Job.id == Delivery.job_id)
                 .where(Delivery.state == "pending", Delivery.next_attempt_at <= now, Job.state == "sending")
                 .order_by(Job.priority, Delivery.next_attempt_at, Delivery.id).limit(1))
            if not self.db.is_sqlite:
                q = q.with_for_update(skip_locked=True, of=Delivery)
            d = session.execute(q).scalar_one_or_none()
            if d is None:
                return None
            n = session.execute(update(Delivery).where(Delivery.id == d.id, Delivery.state == "pending")
                                .values(state="sending", attempts=Delivery.attempts + 1)).rowcount
            if n != 1:
                return None
            session.refresh(d)
            return d

        return self.db.run(go)

    def run_once(self) -> bool:
        d = self._claim()
        if d is None:
            self._finish_jobs()
            return False
        result_path = self.db.run(lambda s: s.get(Job, d.job_id).result_path)
        files = sorted(self.files.absolute(result_path).glob("*.dcm")) if result_path else []
        send = self.settings.send
        state, error, status, sent, failed = "done", None, None, 0, 0
        t0 = time.perf_counter()
        try:
            if not files:
                raise SendError(f"job {d.job_id} has no result files to send (result folder {result_path!r})")
            peer = next((p for p in self.settings.peers
                         if (p.ae_title, p.host, p.port) == (d.ae_title, d.host, d.port)), None)
            report = send_files(files, self.settings.node.ae_title, d.ae_title, d.host, d.port, send.timeout_seconds,
                                tls=context_for_peer(self.settings.tls, peer))
            sent, failed = len(report.ok), len(report.rejected)
            if report.rejected:
                status = report.rejected[0][1]
                error = f"{failed} of {len(files)} instance(s) rejected by {d.ae_title}, first status {status}"
                # Out of resources (0xA7xx) is worth another try; other failures are the peer's answer.
                retryable = all(code.upper().startswith("0XA7") for _, code in report.rejected)
                state = "pending" if retryable and d.attempts < send.max_attempts else "failed"
        except (SendError, OSError, RuntimeError) as exc:
            error = str(exc)
            state = "pending" if d.attempts < send.max_attempts else "failed"
        elapsed = time.perf_counter() - t0

        def go(session: Session) -> None:
            row = session.get(Delivery, d.id)
            if row is None:
                return
            row.state, row.last_error, row.last_status = state, error, status
            row.sent_count, row.failed_count = sent, failed
            if state == "pending":
                row.next_attempt_at = utcnow() + dt.timedelta(seconds=backoff(send, row.attempts))
            else:
                row.finished_at = utcnow()

        self.db.run(go)
        if state == "done":
            log.info("job %d: %d instance(s) delivered to %s (%s@%s:%d) in %.2f s", d.job_id, sent, d.destination,
                     d.ae_title, d.host, d.port, elapsed)
            audit.record(self.db, "results-sent", job_id=d.job_id, called_ae=d.ae_title, count=sent, seconds=elapsed,
                         detail=d.destination)
        elif state == "pending":
            metrics.send_retries.inc()
            log.warning("job %d: delivery to %s failed (attempt %d/%d): %s; next try in %.1f s", d.job_id,
                        d.destination, d.attempts, send.max_attempts, error, backoff(send, d.attempts))
        else:
            log.error("job %d: delivery to %s failed after %d attempt(s): %s", d.job_id, d.destination, d.attempts, error)
            audit.record(self.db, "send-failed", job_id=d.job_id, called_ae=d.ae_title, count=failed, detail=error or "")
        self._finish_jobs()
        return True

    def _finish_jobs(self) -> None:
        """Close every sending job whose deliveries have all ended; log its latency."""
        def go(session: Session) -> list[Job]:
            closed = []
            q = select(Job).where(Job.state == "sending")
            if not self.db.is_sqlite:
                q = q.with_for_update(skip_locked=True)
            for job in session.execute(q).scalars():
                ds = session.execute(select(Delivery).where(Delivery.job_id == job.id)).scalars().all()
                if any(d.state in ("pending", "sending") for d in ds):
                    continue
                bad = [d for d in ds if d.state == "failed"]
                job.finished_at = utcnow()
                job.state = "failed" if bad else "done"
                job.error = "; ".join(f"{d.destination}: {d.last_error}" for d in bad)[:1000] or None
                _audit_end(session, job)
                closed.append(job)
            return closed

        for job in self.db.run(go):
            latency = _seconds(job.last_instance_at, job.finished_at)
            stages = [
                ("completion", _seconds(job.last_instance_at, job.series_completed_at)),
                ("queue", _seconds(job.series_completed_at, job.started_at)),
            ]
            parts = [f"{k}={v:.2f}" for k, v in stages if v is not None] + (job.timings.split() if job.timings else [])
            send_s = _seconds(job.encoded_at, job.finished_at)
            if send_s is not None:
                parts.append(f"send={send_s:.2f}")
            if job.state == "done":
                log.info("job %d done: last instance received -> last result acknowledged %.2f s [%s]",
                         job.id, latency or 0.0, " ".join(parts))
            else:
                log.error("job %d failed: %s", job.id, job.error)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # noqa: BLE001
                log.exception("sender loop error; retrying")
                busy = False
            if not busy:
                self.wake.wait(0.2)
                self.wake.clear()
