"""Job-end notifications: a watcher that sees jobs end, and signed webhook calls with retries.

The watcher reads job ends from their audit rows (written in the transaction that ends the
job; the worker and sender stay unaware of the watcher) and hands each end to its observers:
the webhook notifier and the metrics. A webhook body
carries UIDs, pipeline, outcome and timings, never a patient name or ID. It is signed with
HMAC-SHA256 over "<timestamp>.<body>" (header X-PacsNode-Signature: sha256=<hex>), so a
receiver can check both origin and freshness. A call that fails is retried with backoff; a
call that succeeded (or gave up) is written to the audit trail, which is how a restarted node
knows not to call again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import heapq
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

from sqlalchemy import select
from sqlalchemy.orm import Session

from . import audit, metrics
from .config import Settings
from .store.index import AuditEvent, Database, Delivery, Job, Series, Study, utcnow

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-PacsNode-Signature"
TIMESTAMP_HEADER = "X-PacsNode-Timestamp"
#: how far back a starting node looks for ended jobs whose webhook was never called
LOOKBACK = dt.timedelta(hours=24)


@dataclass(frozen=True)
class DeliveryOutcome:
    destination: str
    state: str
    sent: int
    failed: int
    status: str | None


@dataclass(frozen=True)
class JobEnded:
    """A job that reached done or failed, as the webhook and the metrics see it (no patient data)."""

    job_id: int
    rule: str
    pipeline: str
    outcome: str
    error: str | None
    study_uid: str
    series_uid: str
    generation: int
    result_count: int
    finished_at: dt.datetime
    #: seconds per stage: completion, queue, load, model, encode, write, send, total
    stages: dict[str, float | None] = field(default_factory=dict)
    deliveries: tuple[DeliveryOutcome, ...] = ()
    #: id of the job-end audit row this end was read from
    end_id: int | None = None

    @property
    def key(self) -> str:
        """Identifies this end of the job (a retried job ends again, with its own audit row)."""
        return f"{self.job_id}@end{self.end_id}"


def _seconds(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    return (b - a).total_seconds() if a and b else None


def job_stages(job: Job) -> dict[str, float | None]:
    """Stage durations of a job from its timestamps and its recorded timings."""
    stages: dict[str, float | None] = {
        "completion": _seconds(job.last_instance_at, job.series_completed_at),
        "queue": _seconds(job.series_completed_at, job.started_at),
    }
    for part in (job.timings or "").split():
        name, _, value = part.partition("=")
        try:
            stages[name] = float(value)
        except ValueError:
            continue
    stages["send"] = _seconds(job.encoded_at, job.finished_at)
    stages["total"] = _seconds(job.last_instance_at, job.finished_at)
    return stages


#: audit events written in the transaction that ends a job (pacs_node/jobs.py, web cancel)
END_EVENTS = ("job-done", "job-failed", "job-cancelled")


def ended_job(session: Session, job: Job, end: AuditEvent) -> JobEnded:
    """The end of ``job`` that its audit row ``end`` records: outcome, time and error of that
    end, even when the job has been retried (and its row changed) since."""
    series = session.get(Series, job.series_id)
    study = session.get(Study, series.study_id) if series else None
    deliveries = session.execute(select(Delivery).where(Delivery.job_id == job.id).order_by(Delivery.id)).scalars()
    outcome = "done" if end.event == "job-done" else "failed"
    error = None
    if outcome == "failed":
        # the job's own (longer) message while it still is in that failed state
        error = ((job.error if job.state == "failed" else None)
                 or (f"cancelled {end.detail}" if end.event == "job-cancelled" else end.detail) or None)
    return JobEnded(
        job_id=job.id, rule=job.rule, pipeline=job.pipeline, outcome=outcome, error=error,
        study_uid=study.study_uid if study else "", series_uid=series.series_uid if series else "",
        generation=job.generation, result_count=job.result_count or 0, finished_at=end.at,
        stages=job_stages(job),
        deliveries=tuple(DeliveryOutcome(d.destination, d.state, d.sent_count, d.failed_count, d.last_status)
                         for d in deliveries),
        end_id=end.id)


class JobWatcher:
    """Polls the job-end audit rows and calls each observer once per end.

    Those rows are written in the transaction that ends the job and never change, so every
    end is seen once, also a failure that `jobs retry` turned back into a queued job before
    this poll ran (the job row alone would show only its latest state).
    """

    def __init__(self, db: Database, observers: list[Callable[[JobEnded], None]], interval: float = 0.5,
                 lookback: dt.timedelta = LOOKBACK) -> None:
        self.db = db
        self.observers = observers
        self.interval = interval
        self.watermark = utcnow() - lookback
        self._seen: dict[int, dt.datetime] = {}

    def poll(self) -> list[JobEnded]:
        # An audit row's time is set before its transaction commits, so a row may become
        # visible with a time just below the newest one seen: look back a minute and dedupe.
        since = self.watermark - dt.timedelta(seconds=60)

        def read(session: Session) -> list[JobEnded]:
            ends = session.execute(select(AuditEvent).where(AuditEvent.event.in_(END_EVENTS), AuditEvent.at >= since)
                                   .order_by(AuditEvent.at, AuditEvent.id)).scalars().all()
            out = []
            for end in ends:
                if end.id in self._seen or end.job_id is None:
                    continue
                job = session.get(Job, end.job_id)
                if job is None:
                    self._seen[end.id] = end.at
                    continue
                out.append(ended_job(session, job, end))
            return out

        ended = self.db.run(read)
        for job in ended:
            self._seen[job.end_id] = job.finished_at  # type: ignore[index]
            self.watermark = max(self.watermark, job.finished_at)
            for observer in self.observers:
                try:
                    observer(job)
                except Exception:  # noqa: BLE001 - one observer's failure must not hide the end from the others
                    log.exception("job %d: observer %s failed", job.job_id, observer)
        horizon = self.watermark - dt.timedelta(seconds=120)
        self._seen = {k: t for k, t in self._seen.items() if t >= horizon}
        return ended

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - a busy database: try again next round
                log.exception("job watcher: poll failed; will retry")
            stop.wait(self.interval)


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The X-PacsNode-Signature value: HMAC-SHA256 of "<timestamp>.<body>" with the shared secret."""
    digest = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"sha256={digest}"


def verify(secret: str, headers: Mapping[str, str], body: bytes, tolerance_seconds: float = 300.0,
           now: float | None = None) -> bool:
    """For receivers: the signature matches and the timestamp is recent (no replay of old calls)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    timestamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    signature = lowered.get(SIGNATURE_HEADER.lower(), "")
    try:
        age = abs((now if now is not None else time.time()) - float(timestamp))
    except ValueError:
        return False
    return age <= tolerance_seconds and hmac.compare_digest(signature, sign(secret, timestamp, body))


def payload(job: JobEnded, node_ae: str, delivery_id: str) -> dict:
    return {
        "event": f"job.{job.outcome}",
        "delivery_id": delivery_id,
        "node": node_ae,
        "job": {"id": job.job_id, "rule": job.rule, "pipeline": job.pipeline, "outcome": job.outcome,
                "error": (job.error or "")[:500] or None, "generation": job.generation,
                "result_count": job.result_count, "finished_at": job.finished_at.isoformat() + "Z"},
        "study_uid": job.study_uid,
        "series_uid": job.series_uid,
        "timings_seconds": {k: round(v, 3) for k, v in job.stages.items() if v is not None},
        "deliveries": [asdict(d) for d in job.deliveries],
    }


@dataclass(order=True)
class _Call:
    due: float
    attempt: int
    job_id: int = field(compare=False)
    key: str = field(compare=False)
    url: str = field(compare=False)
    secret: str = field(compare=False)
    event: str = field(compare=False)
    delivery_id: str = field(compare=False)
    body: bytes = field(compare=False)


class Leadership:
    """One process of a shared PostgreSQL database calls the webhooks (a session advisory lock).

    Several `pacs-node serve` processes may share one database; each sees every job end, and
    without this each would call. The lock lives as long as the connection, so when the
    caller dies another process takes over (and, reading the audit trail, calls for what
    was not called yet). With SQLite there is one serving process: it always leads.
    """

    KEY = 0x7AC5_0DE0  # pg_advisory_lock key of "webhook caller"

    def __init__(self, db: Database) -> None:
        self.db = db
        self._conn = None

    def hold(self) -> bool:
        """True while this process leads: takes the lock if free, checks the connection if held."""
        if self.db.is_sqlite:
            return True
        from sqlalchemy import text

        try:
            if self._conn is None:
                conn = self.db.engine.connect()
                got = bool(conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": self.KEY}).scalar())
                conn.commit()
                if not got:
                    conn.close()
                    return False
                self._conn = conn
            else:
                self._conn.execute(text("SELECT 1"))
                self._conn.commit()
            return True
        except Exception:  # noqa: BLE001 - a lost connection is lost leadership; try again later
            log.warning("webhooks: lost the database connection that holds the caller lock")
            self.release()
            return False

    def release(self) -> None:
        if self._conn is not None:
            from sqlalchemy import text

            try:
                self._conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": self.KEY})
                self._conn.commit()
            except Exception:  # noqa: BLE001 - a broken connection has released the lock already
                pass
            # out of the pool for good: a pooled connection would keep a session lock alive
            self._conn.invalidate()
            self._conn.close()
            self._conn = None


class WebhookNotifier:
    """Calls the rule's (or the global) webhook once per job end, retrying with backoff.

    It watches the job table itself, only while it leads (see Leadership), from 24 hours back,
    skipping ends the audit trail says were called.
    """

    def __init__(self, db: Database, settings: Settings, poll_seconds: float = 1.0) -> None:
        self.db = db
        self.settings = settings
        self.rules = {r.name: r for r in settings.rules}
        self.poll_seconds = poll_seconds
        self.leadership = Leadership(db)
        self._queue: list[_Call] = []
        self._lock = threading.Lock()
        self.wake = threading.Event()
        self._done: set[str] = set()

    def _already_called(self) -> set[str]:
        since = utcnow() - LOOKBACK - dt.timedelta(hours=1)
        rows = self.db.run(lambda s: s.execute(select(AuditEvent.detail).where(
            AuditEvent.event.in_(("webhook-sent", "webhook-failed")), AuditEvent.at >= since)).scalars().all())
        return {d.split(" ", 1)[0] for d in rows if d}

    @property
    def configured(self) -> bool:
        return bool(self.settings.notify.webhook_url or any(r.webhook_url for r in self.settings.rules))

    def target(self, rule_name: str) -> tuple[str, str] | None:
        rule = self.rules.get(rule_name)
        notify = self.settings.notify
        if rule is not None and rule.webhook_url:
            url, secret = rule.webhook_url, rule.webhook_secret or notify.webhook_secret
        else:
            url, secret = notify.webhook_url, notify.webhook_secret
        return (url, secret) if url and secret else None

    def job_ended(self, job: JobEnded) -> None:
        target = self.target(job.rule)
        if target is None or job.key in self._done:
            return
        delivery_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"pacs-node:{self.settings.node.ae_title}:{job.key}"))
        body = json.dumps(payload(job, self.settings.node.ae_title, delivery_id), sort_keys=True).encode()
        with self._lock:
            self._done.add(job.key)
            heapq.heappush(self._queue, _Call(time.monotonic(), 1, job.job_id, job.key, target[0], target[1],
                                              f"job.{job.outcome}", delivery_id, body))
        self.wake.set()

    def _post(self, call: _Call) -> str | None:
        """Send one call; None when the receiver answered 2xx, else the reason."""
        timestamp = str(int(time.time()))
        request = urllib.request.Request(call.url, data=call.body, method="POST", headers={
            "Content-Type": "application/json", "User-Agent": "pacs-node",
            "X-PacsNode-Event": call.event, "X-PacsNode-Delivery": call.delivery_id,
            TIMESTAMP_HEADER: timestamp, SIGNATURE_HEADER: sign(call.secret, timestamp, call.body)})
        try:
            with urllib.request.urlopen(request, timeout=self.settings.notify.timeout_seconds) as response:
                response.read(65536)
                return None if 200 <= response.status < 300 else f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"{type(exc).__name__}: {reason}"

    def run_once(self) -> bool:
        with self._lock:
            if not self._queue or self._queue[0].due > time.monotonic():
                return False
            call = heapq.heappop(self._queue)
        where = urllib.request.urlparse(call.url)
        endpoint = f"{where.scheme}://{where.netloc}"  # the path may carry a receiver's secret: not logged
        error = self._post(call)
        cfg = self.settings.notify
        if error is None:
            metrics.webhook_calls.labels("ok").inc()
            log.info("job %d: webhook %s called (%s, attempt %d)", call.job_id, endpoint, call.event, call.attempt)
            audit.record(self.db, "webhook-sent", job_id=call.job_id, count=call.attempt,
                         detail=f"{call.key} {endpoint}")
        elif call.attempt < cfg.max_attempts:
            delay = cfg.backoff_seconds * 2 ** (call.attempt - 1)
            metrics.webhook_calls.labels("retry").inc()
            log.warning("job %d: webhook %s failed (attempt %d/%d): %s; next try in %.1f s", call.job_id, endpoint,
                        call.attempt, cfg.max_attempts, error, delay)
            call.due, call.attempt = time.monotonic() + delay, call.attempt + 1
            with self._lock:
                heapq.heappush(self._queue, call)
        else:
            metrics.webhook_calls.labels("failed").inc()
            log.error("job %d: webhook %s failed after %d attempt(s): %s", call.job_id, endpoint, call.attempt, error)
            audit.record(self.db, "webhook-failed", job_id=call.job_id, count=call.attempt,
                         detail=f"{call.key} {endpoint} {error}"[:2000])
        return True

    def run(self, stop: threading.Event) -> None:
        watcher: JobWatcher | None = None
        next_poll = 0.0
        try:
            while not stop.is_set():
                busy = False
                try:
                    if time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + self.poll_seconds
                        if not self.leadership.hold():
                            if watcher is not None:
                                log.warning("webhooks: no longer the caller; another node process takes over")
                            watcher = None
                            with self._lock:
                                self._queue.clear()
                            next_poll = time.monotonic() + 5.0
                            stop.wait(1.0)
                            continue
                        if watcher is None:
                            self._done = self._already_called()
                            watcher = JobWatcher(self.db, [self.job_ended])
                            log.info("webhooks: this process calls them (%d rule webhook(s)%s)",
                                     sum(1 for r in self.settings.rules if r.webhook_url),
                                     ", global" if self.settings.notify.webhook_url else "")
                        watcher.poll()
                    busy = self.run_once()
                except Exception:  # noqa: BLE001
                    log.exception("webhook loop error; retrying")
                if not busy:
                    with self._lock:
                        wait = min(0.5, max(0.0, self._queue[0].due - time.monotonic())) if self._queue else 0.5
                    self.wake.wait(wait)
                    self.wake.clear()
        finally:
            self.leadership.release()
